"""`--set field=value`: a SweepConfig field changed from the command line.

  sweep run exp.py --set epochs=5 --set learning_rate='[1e-3, 3e-3]' --set optimizer=adamw

A value is read as a Python literal (`ast.literal_eval`: numbers, strings, lists, tuples,
dicts, True, False, None); a value that is no literal is taken as a string, so that
`optimizer=adamw` needs no quotes. The changed config is validated like any other, and
config.json and the fingerprint hold the values it ran with.

Besides literals, a value may call the library's own value constructors, with literal
arguments and arithmetic on numbers (`1/3`):

  --set "batch_size=[32, batch_ramp(32, factor=5, at=(1/3, 2/3))]"
  --set "learning_rate=loguniform(1e-4, 1e-1)" --set samples=20

namely `batch_ramp`, `batch_schedule` (`sweep.batch_schedules`) and `uniform`,
`loguniform`, `randint`, `choice` (`sweep.space`), also written `sweep.batch_ramp(...)` or
`space.loguniform(...)`. Nothing else is evaluated: any other name or call is text.
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
  """A Python literal or a call of the value constructors (see the module docstring), else
  the text itself (`adamw`, `cosine`)."""
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    pass
  try:
    tree = ast.parse(text, mode='eval')
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return text
  if not _allowed(tree.body):
    return text
  # Every node checked: literals, arithmetic on them and calls of the constructors only.
  return eval(compile(tree, '<--set>', 'eval'), {'__builtins__': {}}, _constructors())  # noqa: S307


def _constructors() -> dict[str, Any]:
  from sweep import batch_schedules, space

  calls = {
    'batch_ramp': batch_schedules.batch_ramp,
    'batch_schedule': batch_schedules.batch_schedule,
    'uniform': space.uniform,
    'loguniform': space.loguniform,
    'randint': space.randint,
    'choice': space.choice,
  }
  return calls


_PREFIXES = ('sweep', 'space', 'sweep.space')
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)


def _allowed(node: ast.AST) -> bool:
  if isinstance(node, ast.Constant):
    return isinstance(node.value, int | float | str | bool | type(None))
  if isinstance(node, ast.List | ast.Tuple):
    return all(_allowed(e) for e in node.elts)
  if isinstance(node, ast.Dict):
    return all(k is not None and _allowed(k) for k in node.keys) and all(
      _allowed(v) for v in node.values
    )
  if isinstance(node, ast.UnaryOp):
    return isinstance(node.op, _OPERATORS) and _allowed(node.operand)
  if isinstance(node, ast.BinOp):
    return isinstance(node.op, _OPERATORS) and _allowed(node.left) and _allowed(node.right)
  if isinstance(node, ast.Call):
    func = node.func
    if isinstance(func, ast.Attribute):
      # sweep.batch_ramp(...), space.loguniform(...), sweep.space.choice(...): the name alone.
      if ast.unparse(func.value) not in _PREFIXES:
        return False
      node.func = ast.copy_location(ast.Name(func.attr, ast.Load()), func)
      func = node.func
    return (
      isinstance(func, ast.Name)
      and func.id in _constructors()
      and all(_allowed(a) for a in node.args)
      and all(k.arg is not None and _allowed(k.value) for k in node.keywords)
    )
  return False


def apply(cfg: SweepConfig, overrides: dict[str, Any]) -> SweepConfig:
  """`cfg` with `overrides` (from `parse`) in place of its fields; the caller validates."""
  return dataclasses.replace(cfg, **overrides) if overrides else cfg
