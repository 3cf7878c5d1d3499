"""What defines a sweep's numbers, written down so that a resume can check it.

A workdir's `sweep.json` holds the fingerprint of the sweep it holds. A rerun on that
workdir compares its own fingerprint, part by part, and resumes only when every part
that can change the numbers (or the shape of the saved state) is equal. The parts:

- `config`: every field of `SweepConfig`, taken from `dataclasses.fields` (so a field
  added later is covered without a change here), except the fields of `SOFT_FIELDS`,
  which cannot change a number (see there). Values are described by `describe`:
  numbers, strings and lists as they are; arrays by shape, dtype and the sha256 of
  their bytes; a `Dataset` by its name, class count and each array's hash (sha256 of
  every byte, once per sweep); code by its qualified name
  and, for code outside installed packages (an experiment's `apply_fn`, a callable loss,
  an optimizer factory), a hash of its bytecode, constants, defaults, closure values and
  the module-level values it reads (best effort: code reached only through objects
  other than these, or a change in an installed package, is not seen).
- `model`: the shapes and dtypes of one run's parameter tree.
- `layout`: how the run axis is cut into units (the chunk width of each optimizer
  family and which run sits in which slot): another memory budget or device count
  can change it, and a checkpoint of one layout cannot be read in another.
- `devices`: the backend, the local device count and the process count. Another device
  count is refused even where the layout stays the same: the shards compile to other
  programs, whose float rounding may differ.

Recorded but free to change (a rerun notes the change and resumes): the fields of
`SOFT_FIELDS` and the `environment` (package versions, Python; another version of jax
may round differently in the last bits, as another backend does).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import site
import sys
import sysconfig
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# SweepConfig fields left out of the strict fingerprint, and why none of them can change
# a number of the sweep.
SOFT_FIELDS = {
  'name': 'a label for the sweep',
  'objectives': 'they pick the Pareto front from the finished table; a rerun recomputes it',
  'memory_budget': 'it acts only through the chunk width, which the layout part holds',
}

FORMAT = 2
_MAX_DEPTH = 12


# --------------------------------------------------------------------- values ----


def array_digest(a: Any, content: bool = True) -> str:
  """'float32[100,8] sha256:0123456789abcdef' for an array (numpy or jax); without
  `content`, only 'float32[100,8]'."""
  a = np.asarray(a)
  if not content:
    return f'{a.dtype.name}[{",".join(str(d) for d in a.shape)}]'
  a = np.ascontiguousarray(a)
  h = hashlib.sha256()
  h.update(str((a.dtype.str, a.shape)).encode())
  h.update(memoryview(a.reshape(-1)).cast('B') if a.size else b'')
  shape = ','.join(str(d) for d in a.shape)
  return f'{a.dtype.name}[{shape}] sha256:{h.hexdigest()[:16]}'


@functools.cache
def _library_roots() -> tuple[str, ...]:
  """The directories installed packages and the standard library live in."""
  paths = sysconfig.get_paths()
  roots = {paths[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib') if k in paths}
  try:
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
  except AttributeError:  # a virtualenv without these
    pass
  return tuple(sorted(os.path.realpath(r) for r in roots if r))


def _is_library(obj: Any) -> bool:
  """Whether `obj` (a function or class) comes from an installed package or this one:
  such code is named, not hashed."""
  module = getattr(obj, '__module__', None) or ''
  top = module.split('.')[0]
  if top in ('sweep', 'kernels', 'jax', 'jaxlib', 'flax', 'optax', 'numpy', 'orbax', 'builtins'):
    return True
  loaded = sys.modules.get(module)
  file = getattr(loaded, '__file__', None)
  if file is None:
    return module in sys.builtin_module_names or not module
  file = os.path.realpath(file)
  return any(file.startswith(root + os.sep) for root in _library_roots())


def _name(obj: Any) -> str:
  module = getattr(obj, '__module__', None)
  qualname = (
    getattr(obj, '__qualname__', None) or getattr(obj, '__name__', None) or type(obj).__name__
  )
  return f'{module}.{qualname}' if module else qualname


class _Hasher:
  """Hashes user code: bytecode, constants, defaults, closures and referenced globals."""

  def __init__(self, content: bool = True):
    self.content = content  # hash the bytes of arrays (else: shapes and dtypes only)
    self.done: dict[int, str] = {}  # digests of the functions and classes hashed so far
    self.active: set[int] = set()  # those being hashed (a function that calls itself)

  def code(self, h, code: types.CodeType, function: bool = False) -> None:
    """Bytecode, names and constants (not line numbers, nor a function's docstring)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    h.update(repr((code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    consts = code.co_consts
    if function and consts and (consts[0] is None or isinstance(consts[0], str)):
      # A function's first constant is its docstring, or None without one.
      consts = consts[1:]
    for const in consts:
      if isinstance(const, types.CodeType):
        self.code(h, const)
      elif isinstance(const, frozenset):
        h.update(repr(sorted(map(repr, const))).encode())
      else:
        h.update(repr(const).encode())

  def names(self, code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:
      if isinstance(const, types.CodeType):
        out |= self.names(const)
    return out

  def memo(self, obj: Any, depth: int, fn) -> str:
    key = id(obj)
    if key in self.done:
      return self.done[key]
    if key in self.active or depth > _MAX_DEPTH:
      return 'recursive'
    self.active.add(key)
    try:
      self.done[key] = fn(obj, depth)
    finally:
      self.active.discard(key)
    return self.done[key]

  def function(self, fn: types.FunctionType, depth: int) -> str:
    return self.memo(fn, depth, self._function)

  def cls(self, cls: type, depth: int) -> str:
    return self.memo(cls, depth, self._cls)

  def _function(self, fn: types.FunctionType, depth: int) -> str:
    h = hashlib.sha256()
    self.code(h, fn.__code__, function=fn.__code__.co_consts[:1] == (fn.__doc__,))
    h.update(
      json.dumps(describe(fn.__defaults__, depth + 1, self), sort_keys=True, default=str).encode()
    )
    h.update(
      json.dumps(describe(fn.__kwdefaults__, depth + 1, self), sort_keys=True, default=str).encode()
    )
    for cell in fn.__closure__ or ():
      try:
        value = cell.cell_contents
      except ValueError:  # an empty cell
        value = None
      h.update(json.dumps(describe(value, depth + 1, self), sort_keys=True, default=str).encode())
    module_globals = getattr(fn, '__globals__', {})
    for name in sorted(self.names(fn.__code__)):
      if name in module_globals:
        value = module_globals[name]
        h.update(name.encode())
        h.update(json.dumps(describe(value, depth + 1, self), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]

  def _cls(self, cls: type, depth: int) -> str:
    h = hashlib.sha256()
    for base in cls.__bases__:
      h.update(json.dumps(describe(base, depth + 1, self), sort_keys=True, default=str).encode())
    for name, member in sorted(vars(cls).items()):
      if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
      if isinstance(member, property):
        member = member.fget
      if isinstance(member, types.FunctionType):
        h.update(name.encode())
        h.update(self.function(member, depth + 1).encode())
      elif isinstance(member, (int, float, str, bool, tuple)) and not name.startswith('__'):
        h.update(f'{name}={member!r}'.encode())
    return h.hexdigest()[:16]


def _scalar(v: Any) -> Any:
  if isinstance(v, float) and not math.isfinite(v):
    return repr(v)
  return v


def describe(value: Any, depth: int = 0, hasher: _Hasher | None = None) -> Any:
  """A JSON description of `value` that changes when anything that could change a
  sweep's numbers changes (see the module docstring for what is and is not seen)."""
  hasher = hasher or _Hasher()
  if depth > _MAX_DEPTH:
    return f'<{type(value).__name__}>'
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return _scalar(value)
  if isinstance(value, np.generic):
    return _scalar(value.item())
  if isinstance(value, (np.ndarray, jax.Array)):
    return array_digest(value, hasher.content)
  from sweep.data import Dataset  # sweep.data imports nothing of this module

  if isinstance(value, Dataset):
    out = {'name': value.name, 'num_classes': value.num_classes, 'ignore_label': value.ignore_label}
    for f in ('x_train', 'y_train', 'x_val', 'y_val'):
      a = getattr(value, f)
      # Inputs may be a tuple or dict of arrays: a digest each, as JSON holds them (a list,
      # a dict with string keys), so that the description read back compares equal.
      digest = lambda leaf: array_digest(leaf, hasher.content)  # noqa: E731
      if a is None:
        out[f] = None
      elif isinstance(a, tuple):
        out[f] = [digest(leaf) for leaf in a]
      elif isinstance(a, Mapping):
        out[f] = {str(k): digest(leaf) for k, leaf in a.items()}
      else:
        out[f] = digest(a)
    return out
  if isinstance(value, dict) or (
    hasattr(value, 'keys') and hasattr(value, '__getitem__') and not isinstance(value, type)
  ):
    try:
      items = sorted(((str(k), value[k]) for k in value.keys()), key=lambda kv: kv[0])
    except Exception:  # noqa: BLE001 - a mapping-like object that is not one
      items = None
    if items is not None:
      return {k: describe(v, depth + 1, hasher) for k, v in items}
  if isinstance(value, (list, tuple)):
    return [describe(v, depth + 1, hasher) for v in value]
  if isinstance(value, (set, frozenset)):
    return sorted((describe(v, depth + 1, hasher) for v in value), key=repr)
  if isinstance(value, types.ModuleType):
    return f'module {value.__name__}'
  if isinstance(value, functools.partial):
    return {
      'partial': describe(value.func, depth + 1, hasher),
      'args': describe(value.args, depth + 1, hasher),
      'keywords': describe(value.keywords, depth + 1, hasher),
    }
  if isinstance(value, types.MethodType):
    return {
      'method': describe(value.__func__, depth + 1, hasher),
      'of': describe(value.__self__, depth + 1, hasher),
    }
  wrapped = getattr(value, '__wrapped__', None)
  if wrapped is not None and callable(value) and not isinstance(value, type):
    # jax.jit, functools.wraps: the code that runs is the wrapped function's.
    return {'wraps': describe(wrapped, depth + 1, hasher)}
  if isinstance(value, types.FunctionType):
    if not _is_library(value):
      return f'function {_name(value)} code:{hasher.function(value, depth)}'
    if not value.__closure__:
      return f'function {_name(value)}'
    # A closure made by a library (an optax optimizer's update function): what it
    # closes over (learning rate, betas, inner transformations) is what differs.
    cells = []
    for cell in value.__closure__:
      try:
        cells.append(describe(cell.cell_contents, depth + 1, hasher))
      except ValueError:  # an empty cell
        cells.append(None)
    return {'function': _name(value), 'closure': cells}
  if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)) or type(
    value
  ).__name__ in ('ufunc', 'PjitFunction', 'custom_jvp', 'custom_vjp'):
    return f'function {_name(value)}'
  if isinstance(value, type):
    if _is_library(value):
      return f'class {_name(value)}'
    return f'class {_name(value)} code:{hasher.cls(value, depth)}'
  return _describe_object(value, depth, hasher)


def _describe_object(value: Any, depth: int, hasher: _Hasher) -> Any:
  cls = type(value)
  out: dict[str, Any] = {'class': describe(cls, depth + 1, hasher)}
  try:
    from flax import nnx

    if isinstance(value, nnx.Module):
      state = nnx.state(value)
      leaves = jax.tree_util.tree_leaves_with_path(state)
      out['state'] = {jax.tree_util.keystr(p): array_digest(a, hasher.content) for p, a in leaves}
      return out
  except ImportError:  # pragma: no cover - flax is a dependency
    pass
  if dataclasses.is_dataclass(value):
    # flax.linen modules are dataclasses; `parent` is where a module is bound, not what it is.
    out['fields'] = {
      f.name: describe(getattr(value, f.name, None), depth + 1, hasher)
      for f in dataclasses.fields(value)
      if f.name != 'parent'
    }
    return out
  attributes = getattr(value, '__dict__', None)
  if isinstance(attributes, dict):
    out['attributes'] = {k: describe(v, depth + 1, hasher) for k, v in sorted(attributes.items())}
    return out
  # Something without attributes: its repr, without the memory addresses that differ
  # from one process to the next.
  out['repr'] = re.sub(r' at 0x[0-9a-fA-F]+', '', repr(value))[:500]
  return out


# ------------------------------------------------------------------- the sweep ----


def config_fields(cfg: Any, content: bool = True) -> dict[str, Any]:
  """Every field of the config, described (all of `dataclasses.fields`); without
  `content`, arrays by shape and dtype only (a sweep without a workdir skips hashing)."""
  hasher = _Hasher(content)
  return {f.name: describe(getattr(cfg, f.name), 0, hasher) for f in dataclasses.fields(cfg)}


def _parameters(init_fn) -> dict[str, str]:
  shapes = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
  return {
    jax.tree_util.keystr(p) or '.': f'{a.dtype.name}[{",".join(str(d) for d in a.shape)}]'
    for p, a in jax.tree_util.tree_leaves_with_path(shapes)
  }


def _layout(units: list) -> dict[str, Any]:
  widths: dict[str, list[int]] = {}
  h = hashlib.sha256()
  for cg in units:
    widths.setdefault(str(cg.family), []).append(int(cg.groups[0].slots.shape[1]))
    for g in cg.groups:
      h.update(f'{cg.family}/{g.batch_size}'.encode())
      h.update(np.ascontiguousarray(g.slots, np.int64).tobytes())
  return {
    'chunk_width': {f: w[0] for f, w in widths.items()},
    'chunks': {f: len(w) for f, w in widths.items()},
    'slots': 'sha256:' + h.hexdigest()[:16],
  }


@dataclasses.dataclass
class Fingerprint:
  """The parts of a sweep's fingerprint: `strict` ones must match to resume, `soft` ones
  are recorded and may change."""

  strict: dict[str, Any]
  soft: dict[str, Any]

  @property
  def digest(self) -> str:
    text = json.dumps(self.strict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def record(self) -> dict[str, Any]:
    """What `sweep.json` holds."""
    return {'format': FORMAT, 'fingerprint': self.digest, 'strict': self.strict, 'soft': self.soft}


def of_sweep(
  plan: Any, units: list, init_fn, environment: dict[str, Any], fields: dict[str, Any] | None = None
) -> Fingerprint:
  """The fingerprint of a planned sweep: `plan` (validated config), its `units`
  (`sweep.units.plan_units`), one run's `init_fn`, the environment record, and the
  config's `config_fields` if already described (the data is then hashed once)."""
  fields = config_fields(plan.config) if fields is None else fields
  strict = {
    'config': {k: v for k, v in fields.items() if k not in SOFT_FIELDS},
    'model': {'parameters': _parameters(init_fn)},
    'layout': _layout(units),
    'devices': {
      'backend': jax.default_backend(),
      'local_device_count': jax.local_device_count(),
      'process_count': jax.process_count(),
    },
  }
  soft = {k: v for k, v in fields.items() if k in SOFT_FIELDS}
  soft['environment'] = {
    'python': environment.get('python'),
    'packages': environment.get('packages'),
  }
  return Fingerprint(strict=strict, soft=soft)


# ----------------------------------------------------------------- differences ----


def _short(v: Any) -> bool:
  """A list of these reads as one value (an axis); other lists are compared item by item."""
  return v is None or isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 30)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
  if isinstance(value, dict) and value:
    for k, v in value.items():
      _flatten(v, f'{prefix}.{k}' if prefix else str(k), out)
  elif isinstance(value, list) and value and not all(_short(v) for v in value):
    for i, v in enumerate(value):
      _flatten(v, f'{prefix}[{i}]', out)
  else:
    out[prefix] = value


def _show(value: Any, width: int = 70) -> str:
  text = json.dumps(value, default=str) if not isinstance(value, str) else value
  return text if len(text) <= width else text[: width - 3] + '...'


def _label(path: str) -> str:
  # Config fields read as SweepConfig fields; the other parts keep their names.
  return path.removeprefix('config.')


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'field: old -> new' for every leaf that differs between two described trees."""
  a, b = {}, {}
  _flatten(old, '', a)
  _flatten(new, '', b)
  if any(k.startswith('layout.chunk') and a.get(k) != b.get(k) for k in set(a) | set(b)):
    # Another chunk width moves every run to another slot: the slot digest says no more.
    a.pop('layout.slots', None)
    b.pop('layout.slots', None)
  out = []
  for key in sorted(set(a) | set(b)):
    if key not in a:
      out.append(f'{_label(key)}: (absent) -> {_show(b[key])}')
    elif key not in b:
      out.append(f'{_label(key)}: {_show(a[key])} -> (absent)')
    elif json.dumps(a[key], sort_keys=True, default=str) != json.dumps(
      b[key], sort_keys=True, default=str
    ):
      out.append(f'{_label(key)}: {_show(a[key])} -> {_show(b[key])}')
  return out
