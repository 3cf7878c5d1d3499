"""`--set field=value`: a SweepConfig field changed from the command line.

  sweep run exp.py --set epochs=5 --set learning_rate='[1e-3, 3e-3]' --set optimizer=adamw

A value is read as a Python literal (`ast.literal_eval`: numbers, strings, lists, tuples,
dicts, True, False, None); a value that is no literal is taken as a string, so that
`optimizer=adamw` needs no quotes. The changed config is validated like any other, and
config.json and the fingerprint hold the values it ran with.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

from sweep.config import SweepConfig
from sweep.errors import ConfigError

# Fields that hold Python objects (a model, a data set, a function): an experiment file's.
_OBJECTS = ('model', 'data', 'augment')


def fields() -> list[str]:
  return [f.name for f in dataclasses.fields(SweepConfig)]


def parse(items: Sequence[str]) -> dict[str, Any]:
  """`['epochs=2', 'learning_rate=[1e-3,1e-2]']` -> `{'epochs': 2, 'learning_rate': [...]}`.

  Raises:
    ConfigError: an item without '=', an unknown field (naming the close matches), a field
      that holds a Python object, or a field set twice.
  """
  known = fields()
  out: dict[str, Any] = {}
  for item in items:
    name, eq, text = item.partition('=')
    name = name.strip()
    if not eq or not name:
      raise ConfigError(f'--set {item!r} is invalid: expected FIELD=VALUE, e.g. --set epochs=5')
    if name not in known:
      close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
      hint = f'did you mean {" or ".join(repr(c) for c in close)}? ' if close else ''
      raise ConfigError(
        f"--set {name}: SweepConfig has no field '{name}'; {hint}"
        f'its fields are: {", ".join(f for f in known if f not in _OBJECTS)}'
      )
    if name in _OBJECTS:
      raise ConfigError(
        f'--set {name}: {name} holds a Python object; set it in the experiment file'
      )
    if name in out:
      raise ConfigError(f'--set {name} is given twice ({out[name]!r} and {text.strip()!r})')
    out[name] = literal(text)
  return out


def literal(text: str) -> Any:
  """A Python literal, else the text itself (`adamw`, `cosine`)."""
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text


def apply(cfg: SweepConfig, overrides: dict[str, Any]) -> SweepConfig:
  """`cfg` with `overrides` (from `parse`) in place of its fields; the caller validates."""
  return dataclasses.replace(cfg, **overrides) if overrides else cfg
