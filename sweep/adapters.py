"""The adapter: any accepted model as the pure functions the engine trains.

The engine trains many copies of one model at once, so it needs a model as pure,
jittable functions over explicit values (`Model`):

- `init(key) -> (params, state)`: one run's trainable parameters and its other
  variables (BatchNorm statistics and the like; `{}` for most models);
- `apply(params, state, x, train, key) -> (predictions, new_state)`: with
  `train=True` the model runs in training mode (dropout on, batch statistics
  computed from the batch and updated), drawing its randomness from `key`; with
  `train=False` it runs in evaluation mode, and `new_state is state`; its key is
  None, except for a model that takes a key at call time (`rng_argument`), which is
  given one at evaluation too (`Model.eval_key`).

Accepted models: a flax.linen Module instance; a flax.nnx Module class (or a
functools.partial of one) or instance; an equinox Module instance; a Keras 3 model on
the JAX backend; a haiku `hk.transform` or `hk.transform_with_state` (also under
`hk.without_apply_rng`); a `sweep.models.SizedToData`; or an `(init_fn, apply_fn)` pair of plain
functions (`init_fn(key) -> params`, `apply_fn(params, x) -> predictions`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import inspect
import sys
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from sweep import layers
from sweep.data import describe_inputs, rows, signature
from sweep.errors import config_error

if TYPE_CHECKING:
  from sweep.config import SweepConfig

__all__ = ['KerasLoss', 'Model', 'NEGATED_SWITCHES', 'adapt', 'keras_loss']

# Names of a train/eval switch that mean "evaluation" when True: the engine passes
# `not train` to them.
NEGATED_SWITCHES = ('deterministic', 'use_running_average', 'inference', 'eval')
# Names that look like a train/eval switch; found in a module's call signature without
# `train_argument`, they are refused rather than left at their default (dropout off).
_SWITCH_NAMES = ('training', 'is_training', 'train_mode', *NEGATED_SWITCHES)

_ACCEPTED = (
  'an (init_fn, apply_fn) tuple of callables, a flax.linen Module instance, a flax.nnx '
  'Module class (or functools.partial of one) that accepts rngs=, a flax.nnx Module '
  'instance, an equinox Module instance, a Keras 3 model (JAX backend), a haiku '
  'hk.transform or hk.transform_with_state (also under hk.without_apply_rng), or a SizedToData '
  'such as sweep.models.mlp()'
)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model as the engine trains it.

  Compared and hashed by `key` (what it computes, see `structural_key`) where it has one,
  else by identity: the compiled programs of a sweep are cached on it, so two models that
  compute the same thing share them.

  Attributes:
    init: `key -> (params, state)`.
    apply: `(params, state, x, train, key) -> (predictions, new_state)`; `train` is a
      Python bool, `key` a JAX key while training and None at evaluation.
    name: a short description for messages.
    random: whether `apply` draws from its key while training (dropout, say); a model
      that does not is given no key.
    variables: `(params, state) -> ` what `Result.variables` returns (for flax linen,
      the variables dict `module.apply` takes; else `{'params': ..., 'state': ...}`).
    rebuild: `(params, state) -> ` the user's kind of model holding those values (an nnx
      or equinox module, a Keras model), or None.
    eval_key: whether `apply` draws from its key in evaluation mode too (a model given a
      key at call time, `rng_argument`); the engine then passes a key at evaluation.
    initial: `(params, state)` every seed starts from, for a model that holds its initial
      values (an equinox module, an nnx instance, a Keras model); `init` returns them
      whatever its key. None where `init` draws them from the key.
    key: what the model computes, hashable (`structural_key` with the input's shape), or
      None: then the model equals itself only.
  """

  init: Callable[[jax.Array], tuple[Any, Any]]
  apply: Callable[..., tuple[jax.Array, Any]]
  name: str
  random: bool = False
  variables: Callable[[Any, Any], Any] | None = None
  rebuild: Callable[[Any, Any], Any] | None = None
  state_layout: str = 'state'  # 'collections': the state's keys sit beside 'params' (linen)
  eval_key: bool = False
  initial: Any = None
  key: Any = None
  # Shared by the copies `with_values` makes: what is memoised on the model's code.
  memo: dict = dataclasses.field(default_factory=dict, repr=False)

  def __eq__(self, other: object) -> bool:
    if self is other:
      return True
    if not isinstance(other, Model) or self.key is None or other.key is None:
      return False
    return self.key == other.key

  def __hash__(self) -> int:
    return id(self) if self.key is None else hash(self.key)

  def with_values(self, initial: tuple[Any, Any]) -> Model:
    """This model (the same code, equal to it) starting from other initial values."""

    def init(key):
      del key  # every seed starts from the model's values
      return initial

    return dataclasses.replace(self, init=init, initial=initial)

  def initial_shapes(self) -> tuple[Any, Any]:
    """`init`'s output as shapes, traced without compiling."""
    return jax.eval_shape(lambda: self.init(jax.random.key(0)))

  def _pure(self) -> tuple[Callable, Callable]:
    init = self.init
    apply = self.apply

    def init_fn(key):
      return init(key)[0]

    shapes = self.initial_shapes()[1]

    def apply_fn(params, x):
      # Evaluation mode, on a model state of the right shapes (its values do not matter to
      # the traces this serves).
      state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return apply(params, state, x, False, None)[0]

    return init_fn, apply_fn

  def pure_functions(self) -> tuple[Callable, Callable]:
    """`(init_fn(key) -> params, apply_fn(params, x) -> predictions)`, the model in
    evaluation mode: for the traces that read the model's products (the same objects
    every call, and for every model equal to this one, so that what is memoised on them
    stays)."""
    if 'pure' not in self.memo:
      self.memo['pure'] = self._pure()
    return self.memo['pure']

  @property
  def stateful(self) -> bool:
    return bool(jax.tree.leaves(self.initial_shapes()[1]))


def describe(model: Any) -> str:
  """A short name for a model in error messages."""
  if isinstance(model, type):
    return f'class {model.__qualname__}'
  if isinstance(model, functools.partial):
    return f'functools.partial({describe(model.func)}, ...)'
  return type(model).__name__


# Adapted models by what they compute, the most recent first out.
_MODELS: collections.OrderedDict = collections.OrderedDict()
_MODELS_KEPT = 64


def model_of(cfg: SweepConfig, output_dim: int) -> Model:
  """The `Model` of `cfg.model`, equal (and its programs shared) for a model that computes
  the same thing: an equal model, or one rebuilt the same way (`structural_key`), so that
  a second sweep of it with other values compiles nothing. A model that holds its
  initial values (equinox, an nnx instance, Keras) is given this instance's values."""
  model, example_x = cfg.model, rows(cfg.data.x_train, slice(0, 1))
  try:
    code = structural_key(model)
    key = _Key(
      (
        code,
        signature(example_x),
        output_dim,
        cfg.train_argument,
        cfg.rng_argument,
      )
    )
  except Exception:  # noqa: BLE001 - a model whose key cannot be read is adapted anew
    code = None
  if code is None:
    return adapt(model, example_x, output_dim, cfg.train_argument, cfg.rng_argument)
  cached = _MODELS.get(key)
  if cached is None:
    adapted = adapt(_detached(model), example_x, output_dim, cfg.train_argument, cfg.rng_argument)
    cached = dataclasses.replace(adapted, key=key)
    _MODELS[key] = cached
    while len(_MODELS) > _MODELS_KEPT:
      _MODELS.popitem(last=False)
    return cached
  _MODELS.move_to_end(key)
  if cached.initial is None:
    return cached
  return cached.with_values(_initial_values(model, output_dim))


def _detached(model: Any) -> Any:
  """A copy of a flax module or a factory's partial, so that the cached model keeps computing
  what its key says when the user later changes a list or dict the original holds."""
  if isinstance(model, nn.Module | functools.partial):
    try:
      return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - an uncopyable field: the model itself
      return model
  return model


def _initial_values(model: Any, output_dim: int) -> tuple[Any, Any]:
  """`(params, state)` of a model that holds its initial values, as its adapter takes them."""
  from sweep.models import SizedToData

  if isinstance(model, SizedToData):
    return _initial_values(model.make(int(output_dim)), output_dim)
  if isinstance(model, nnx.Module):
    return _nnx_values(model)
  keras = sys.modules.get('keras')
  if keras is not None and isinstance(model, keras.Model):
    return _keras_values(model)
  return _equinox_values(model)


# ------------------------------------------------------------------- structural keys ----


class _Key:
  """A structural key, its hash computed once (jit hashes its static arguments per call)."""

  __slots__ = ('hash', 'value')

  def __init__(self, value: Any):
    self.value = value
    self.hash = hash(value)

  def __eq__(self, other: object) -> bool:
    return self is other or (
      isinstance(other, _Key) and self.hash == other.hash and self.value == other.value
    )

  def __hash__(self) -> int:
    return self.hash

  def __repr__(self) -> str:
    return f'_Key({self.hash:#x})'


class _Unkeyable(Exception):
  pass


def structural_key(model: Any) -> Any:
  """What a model computes, as a hashable value, or None where it cannot be read.

  Two models with equal keys compute the same function of (parameters, state, input) and
  draw the same initial values from a key: the classes (by identity), every field that
  is not a trained value (sizes, activations, lists and dicts of them), the code of every
  function (its `__code__`, defaults and closure), the shapes and dtypes of the trained
  arrays (not their values, which the engine takes as data) and the contents of any other
  array (a constant the programs hold). A redefined class or function is another key.
  """
  if isinstance(model, nnx.Module):
    graph, state = nnx.split(model)
    return ('nnx', _key(graph), _shapes(state))
  eqx = sys.modules.get('equinox')
  if eqx is not None and isinstance(model, eqx.Module):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return ('equinox', _shapes(params), _key(static))
  keras = sys.modules.get('keras')
  if keras is not None and isinstance(model, keras.Model):
    return _keras_key(model)
  return ('model', _key(model))


def _keras_key(model: Any) -> Any:
  """A Sequential or functional Keras model of Keras' own layers: its config with the layer
  names replaced by their places (a rebuilt model's layers are named anew), the layer
  classes, the variables' shapes. None for a subclassed model or a layer of the user's own
  (their code holds what the config does not say)."""
  layers = list(model._flatten_layers())
  if type(model).__module__ not in ('keras.src.models.sequential', 'keras.src.models.functional'):
    return None
  if not all(type(layer).__module__.startswith('keras.') for layer in layers):
    return None
  names = {layer.name: f'#{i}' for i, layer in enumerate(layers)}

  def canonical(v):
    if isinstance(v, str):
      return names.get(v, v)
    if isinstance(v, dict):
      return {k: canonical(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
      return type(v)(canonical(x) for x in v)
    return v

  variables = [(tuple(v.shape), str(v.dtype)) for v in model.variables]
  return (
    'keras',
    tuple(type(layer) for layer in layers),
    _key(canonical(model.get_config())),
    tuple(variables),
  )


def _shapes(tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return _key(treedef), tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves)


_SCALARS = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))


def _key(obj: Any, depth: int = 0) -> Any:
  if depth > 64:
    raise _Unkeyable('too deep')
  d = depth + 1
  if isinstance(obj, _SCALARS):
    return (type(obj), obj)
  if isinstance(obj, np.ndarray | np.generic | jax.Array):
    a = np.asarray(obj)
    if a.dtype == object:
      raise _Unkeyable('object array')
    return ('array', a.shape, str(a.dtype), hashlib.sha256(a.tobytes()).hexdigest())
  if isinstance(obj, type):
    return obj
  if isinstance(obj, list | tuple):
    return (type(obj), tuple(_key(v, d) for v in obj))
  if isinstance(obj, Mapping):
    return (type(obj), tuple((_key(k, d), _key(v, d)) for k, v in obj.items()))
  if isinstance(obj, set | frozenset):
    return (type(obj), frozenset(_key(v, d) for v in obj))
  if isinstance(obj, functools.partial):
    return ('partial', _key(obj.func, d), _key(obj.args, d), _key(obj.keywords, d))
  if isinstance(obj, types.FunctionType):
    cells = tuple(_key(c.cell_contents, d) for c in obj.__closure__ or ())
    defaults = (_key(obj.__defaults__, d), _key(obj.__kwdefaults__, d))
    return ('function', obj.__module__, obj.__qualname__, obj.__code__, defaults, cells)
  if isinstance(obj, types.MethodType):
    return ('method', _key(obj.__self__, d), _key(obj.__func__, d))
  if isinstance(obj, jax.tree_util.PyTreeDef):
    try:
      hash(obj)
      return ('treedef', obj)
    except TypeError:
      return ('treedef', str(obj))  # node data unhashable: read by its text
  if isinstance(obj, nn.Module):  # its fields, not the scope it may be bound to
    names = [f.name for f in dataclasses.fields(obj) if f.name != 'parent']
    return (type(obj), tuple((n, _key(getattr(obj, n), d)) for n in names))
  if dataclasses.is_dataclass(obj):
    fields = dataclasses.fields(obj)
    return (type(obj), tuple((f.name, _key(getattr(obj, f.name), d)) for f in fields))
  try:
    hash(obj)
  except TypeError as e:
    raise _Unkeyable(type(obj).__name__) from e
  return ('object', obj)  # its own equality (identity unless its class says otherwise)


def adapt(
  model: Any,
  example_x: np.ndarray,
  output_dim: int | None,
  train_argument: str | None = None,
  rng_argument: str | None = None,
) -> Model:
  """Turns any accepted model into a `Model`.

  Args:
    model: the model (see the module docstring for the accepted forms).
    example_x: inputs with the data's shape beyond the first axis (at least one row).
    output_dim: the output width the data needs (classes or target columns), for a
      `SizedToData`.
    train_argument: the name of the argument of a linen module's `__call__` that
      switches training on; None finds `train` by itself (the flax examples'
      convention) and refuses other switch-like names.
    rng_argument: the name of an argument of the model's call that takes a key (the flax
      VAE example's `z_rng`), for a linen or nnx module or an `(init_fn, apply_fn)` pair;
      see `rng_keys`.

  Raises:
    ConfigError: the model is of no accepted form, or cannot be adapted.
  """
  from sweep.models import SizedToData, check_width  # models builds on this module

  if _is_haiku(model):  # a NamedTuple of two functions, so before the plain pair
    if rng_argument is not None:
      raise config_error(
        'rng_argument',
        rng_argument,
        'None for a haiku model: it draws from the rng its apply is given (hk.next_rng_key())',
      )
    return _haiku(model, example_x, train_argument)
  if isinstance(model, tuple):
    if len(model) != 2 or not all(callable(f) for f in model):
      raise config_error(
        'model', f'tuple of {len(model)}', 'a tuple of two callables, (init_fn, apply_fn)'
      )
    return _pure_functions(*model, rng_argument=rng_argument)
  if rng_argument is not None and not (
    isinstance(model, nn.Module | nnx.Module) or _is_nnx_factory(model)
  ):
    raise config_error(
      'rng_argument',
      rng_argument,
      f'a key argument is passed to flax linen and nnx modules and (init_fn, apply_fn) pairs; '
      f'this model is a {describe(model)}'
      + (' (an equinox module is given its key as key=)' if _is_equinox(model) else ''),
    )
  if isinstance(model, SizedToData):
    if output_dim is None:
      raise config_error(
        'model',
        model,
        'a model sized to the data needs output_dim (the number of classes or target columns)',
      )
    check_width('output_dim', output_dim)
    built = model.make(int(output_dim))
    if isinstance(built, SizedToData):
      raise config_error('model', model, 'SizedToData.make must return a model, not a SizedToData')
    return adapt(built, example_x, output_dim, train_argument)
  if isinstance(model, nn.Module):
    return _linen(model, example_x, train_argument, rng_argument)
  if _is_nnx_factory(model):
    return _nnx(model, None, train_argument, rng_argument)
  if isinstance(model, nnx.Module):
    return _nnx(None, model, train_argument, rng_argument)
  eqx = sys.modules.get('equinox')
  if eqx is not None and isinstance(model, eqx.Module):
    return _equinox(model, example_x)
  keras = sys.modules.get('keras')
  if keras is not None and isinstance(model, keras.Model):
    return _keras(model, example_x)

  accepted = _ACCEPTED
  target = model.func if isinstance(model, functools.partial) else model
  if isinstance(target, type) and issubclass(target, nn.Module):
    accepted += f'; this is a linen Module class: pass an instance, e.g. {target.__name__}()'
  elif isinstance(model, list):
    accepted += '; pass (init_fn, apply_fn) as a tuple'
  raise config_error('model', describe(model), accepted)


def train_argument_error(model: Any, train_argument: str | None) -> str | None:
  """Why `train_argument` does not fit a linen module's `__call__`, or None."""
  try:
    _switch(model, train_argument)
  except Exception as e:  # noqa: BLE001 - the message is what is wanted
    return str(e)
  return None


def inputs(x: Any) -> tuple:
  """The positional arguments a model is called with on inputs `x`: a tuple's arrays one
  by one (`model(token_ids, lengths)`), else `x` itself (one array, or a dict, whole)."""
  return x if isinstance(x, tuple) else (x,)


def inputs_hint(model: Any, x: Any) -> str:
  """A likely cause to add to a model's failure: its call takes more (or fewer) inputs
  without defaults than the data gives (a second input missing)."""
  target = model[1] if isinstance(model, tuple) and len(model) == 2 else model
  try:
    fn = target if isinstance(model, tuple) else type(target).__call__
    parameters = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError, AttributeError):  # not callable, or no signature to read
    return ''
  parameters = parameters[1:]  # params of an apply_fn, self of a module
  if any(p.kind is p.VAR_POSITIONAL for p in parameters):
    return ''
  positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = [
    p.name
    for p in positional
    if p.default is p.empty
    and p.name not in _SWITCH_NAMES
    and p.name != 'train'
    and not ('rng' in p.name.lower() or 'key' in p.name.lower())
  ]
  given = len(inputs(x))
  if len(required) <= given:
    return ''
  names = ', '.join(required)
  return (
    f'; the call takes {len(required)} inputs ({names}) and the data gives {given} '
    f'{describe_inputs(x)}: give the inputs as a tuple, one array each, '
    f'sweep.data.arrays(({names}), y), which the engine passes as positional arguments'
  )


def _is_equinox(model: Any) -> bool:
  eqx = sys.modules.get('equinox')
  return eqx is not None and isinstance(model, eqx.Module)


# ---------------------------------------------------------------- keys at call time ----


def rng_keys(key: jax.Array | None, train: bool) -> jax.Array:
  """The key given to a model's `rng_argument`: `fold_in(key, 1)` of the update's model
  key while training (dropout draws from `key` itself), the evaluation chunk's key at
  evaluation (the engine passes it as `key`), `jax.random.key(0)` where none is given
  (a trace of shapes)."""
  if key is None:
    return jax.random.key(0)
  return jax.random.fold_in(key, 1) if train else key


def _check_rng_argument(fn: Callable, rng_argument: str, owner: str) -> None:
  """`fn`'s signature takes `rng_argument` (or any keyword)."""
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return  # a signature that cannot be read: the trace reports a wrong name
  if rng_argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
    return
  raise config_error(
    'rng_argument', rng_argument, f'an argument of {owner}, which takes {list(parameters)}'
  )


def _key_arguments(fn: Callable) -> list[str]:
  """The arguments of `fn` without a default, past the input, named like a key (rng, key)."""
  try:
    parameters = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return []
  return [
    p.name
    for p in parameters[1:]
    if p.default is p.empty
    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    and ('rng' in p.name.lower() or 'key' in p.name.lower())
  ]


def _rng_hint(fn: Callable) -> str:
  names = _key_arguments(fn)
  if not names:
    return ''
  return (
    f'; the call takes {names[0]!r} without a default: if it is a key, name it with '
    f'SweepConfig(rng_argument={names[0]!r}) and the engine passes one per seed and update'
  )


# --------------------------------------------------------------------------- haiku ----


def _is_haiku(model: Any) -> bool:
  hk = sys.modules.get('haiku')
  return hk is not None and isinstance(model, hk.Transformed | hk.TransformedWithState)


def _haiku(model: Any, example_x: Any, train_argument: str | None) -> Model:
  """`hk.transform`, `hk.transform_with_state`, and either under `hk.without_apply_rng`.

  While training, apply's `rng` is the update's model key (dropout); at evaluation it is
  None, or the evaluation chunk's key for a function that draws in evaluation mode too.
  The function's train/eval switch is `train_argument`, else `is_training` or
  `train` where the function takes one (haiku's and flax's conventions); other
  switch-like names are refused until named. Initialised in training mode, as haiku's
  examples do (`forward.init(rng, batch, is_training=True)`)."""
  import haiku as hk

  with_state = isinstance(model, hk.TransformedWithState)
  name = 'hk.transform_with_state' if with_state else 'hk.transform'
  try:
    parameters = inspect.signature(model.apply).parameters
  except (TypeError, ValueError):
    parameters = {}
  names = list(parameters)
  takes_rng = 'rng' in names or not names
  own = names[(2 if with_state else 1) + int(takes_rng) :]  # the function's own arguments
  takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
  if train_argument is not None:
    if train_argument not in own and not takes_any:
      raise config_error(
        'train_argument', train_argument, f'an argument of the {name} function, which takes {own}'
      )
    switch = train_argument
  else:
    switch = next((n for n in ('is_training', 'train') if n in own), None)
    other = [n for n in own if n in _SWITCH_NAMES and n != switch]
    if switch is None and other:
      raise config_error(
        'model',
        name,
        f'the function takes {other[0]!r}, which looks like a train/eval switch; name it with '
        f'SweepConfig(train_argument={other[0]!r})',
      )
  x1 = rows(jax.tree.map(np.asarray, example_x), slice(0, 1))
  training, evaluation = _switch_kwargs(switch, True), _switch_kwargs(switch, False)

  def init(key):
    out = model.init(key, *inputs(x1), **training)
    return out if with_state else (out, {})

  try:
    params_shape = jax.eval_shape(init, jax.random.key(0))[0]
  except Exception as e:  # the function is the user's: report any failure as a config problem
    raise config_error(
      'model',
      name,
      f'init(rng, x) on an input of shape {describe_inputs(x1)} failed: {e}',
    ) from e
  if not jax.tree.leaves(params_shape):
    raise config_error('model', name, 'a model with parameters to train')

  def call(params, state, x, train, key):
    rng = (key,) if takes_rng else ()
    kwargs = training if train else evaluation
    if with_state:
      out, new = model.apply(params, state, *rng, *inputs(x), **kwargs)
      return out, (new if train else state)
    return model.apply(params, *rng, *inputs(x), **kwargs), state

  random = takes_rng and _uses_key(lambda p, s, x, k: call(p, s, x, True, k)[0], init, x1)
  # A function that draws in evaluation mode too (a VAE sampling its code) is given the
  # evaluation chunk's key there (`Model.eval_key`); the others None, as haiku's loops do.
  drawing = takes_rng and _uses_key(lambda p, s, x, k: call(p, s, x, False, k)[0], init, x1)

  def apply(params, state, x, train, key):
    if train:
      return call(params, state, x, True, key)
    return call(params, state, x, False, rng_keys(key, False) if drawing else None)

  return Model(init, apply, name=name, random=random, eval_key=drawing)


# ------------------------------------------------------------------------ functions ----


def _pure_functions(
  init_fn: Callable, apply_fn: Callable, rng_argument: str | None = None
) -> Model:
  name = getattr(apply_fn, '__qualname__', 'apply_fn')

  def init(key):
    return init_fn(key), {}

  if rng_argument is None:

    def apply(params, state, x, train, key):
      del train, key
      return apply_fn(params, *inputs(x)), state

    return Model(init, apply, name=name)
  _check_rng_argument(apply_fn, rng_argument, f'apply_fn {name}')

  def apply_keyed(params, state, x, train, key):
    return apply_fn(params, *inputs(x), **{rng_argument: rng_keys(key, train)}), state

  return Model(init, apply_keyed, name=name, random=True, eval_key=True)


# ---------------------------------------------------------------------------- linen ----


def _switch(module: nn.Module, train_argument: str | None) -> str | None:
  """The name of the train/eval argument of `module.__call__` to pass, or None."""
  try:
    signature = inspect.signature(module.__call__)
  except (TypeError, ValueError, AttributeError):  # no __call__ (an nnx module called otherwise)
    return train_argument
  names = list(signature.parameters)
  takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
  if train_argument is not None:
    if train_argument not in names and not takes_any:
      raise config_error(
        'train_argument',
        train_argument,
        f'an argument of {type(module).__name__}.__call__, which takes {names}',
      )
    return train_argument
  if 'train' in names:
    return 'train'
  found = [n for n in names if n in _SWITCH_NAMES]
  if found:
    name = found[0]
    meaning = (
      f'it is passed {name}=False while training and {name}=True at evaluation'
      if name in NEGATED_SWITCHES
      else f'it is passed {name}=True while training and {name}=False at evaluation'
    )
    raise config_error(
      'model',
      describe(module),
      f'{type(module).__name__}.__call__ takes {name!r}, which looks like a train/eval switch; '
      f'name it with SweepConfig(train_argument={name!r}) ({meaning}), so that dropout and '
      'batch statistics are not left in one mode',
    )
  return None


def _switch_kwargs(name: str | None, train: bool) -> dict[str, bool]:
  if name is None:
    return {}
  return {name: (not train) if name in NEGATED_SWITCHES else train}


# Collections flax writes for inspection, not state to carry.
_TRANSIENT = ('intermediates', 'perturbations')


def _linen(
  module: nn.Module,
  example_x: np.ndarray,
  train_argument: str | None,
  rng_argument: str | None = None,
) -> Model:
  switch = _switch(module, train_argument)
  if rng_argument is not None:
    _check_rng_argument(module.__call__, rng_argument, f'{type(module).__name__}.__call__')
  x1 = rows(jax.tree.map(np.asarray, example_x), slice(0, 1))
  evaluation = _switch_kwargs(switch, False)
  training = _switch_kwargs(switch, True)

  def keyed(key, train):
    return {} if rng_argument is None else {rng_argument: rng_keys(key, train)}

  def initialise(key, x):
    # A key argument at init: the initial parameters' key folded with 1 (as in training).
    return module.init(key, *inputs(x), **evaluation, **keyed(key, True))

  try:
    shapes = jax.eval_shape(lambda x: initialise(jax.random.key(0), x), x1)
  except Exception as e:  # the module is the user's: report any failure as a config problem
    hint = inputs_hint(module, x1) or ('' if rng_argument else _rng_hint(module.__call__))
    raise config_error(
      'model',
      describe(module),
      f'init on an input of shape {describe_inputs(x1)} failed: {e}{hint}',
    ) from e
  if not jax.tree.leaves(shapes.get('params', {})):
    raise config_error('model', describe(module), 'a model with parameters to train')
  collections = sorted(set(shapes) - {'params', *_TRANSIENT})

  def init(key):
    variables = initialise(key, x1)
    return variables['params'], {c: variables[c] for c in collections}

  def apply(params, state, x, train, key):
    with layers.fast_layers():  # flax's own layers at full speed under the run axis
      variables = {'params': params, **state}
      if not train:
        return module.apply(variables, *inputs(x), **evaluation, **keyed(key, False)), state
      rngs = None if key is None else {'dropout': key}
      call = {**training, **keyed(key, True)}
      if not collections:
        return module.apply(variables, *inputs(x), rngs=rngs, **call), state
      out, new = module.apply(variables, *inputs(x), rngs=rngs, mutable=collections, **call)
      return out, {c: new[c] for c in collections}

  # Does training draw randomness? Traced once with a key: a module that never calls
  # make_rng('dropout') gives a jaxpr with no use of it.
  random = rng_argument is not None or _uses_key(
    lambda p, s, x, k: apply(p, s, x, True, k)[0], init, x1
  )

  def variables(params, state):
    return {'params': params, **state}

  return Model(
    init,
    apply,
    name=describe(module),
    random=random,
    variables=variables,
    state_layout='collections',
    eval_key=rng_argument is not None,
  )


def _uses_key(fn: Callable, init: Callable, x1: np.ndarray) -> bool:
  """Whether `fn(params, state, x, key)`'s output depends on the key (traced only)."""
  params, state = jax.eval_shape(lambda: init(jax.random.key(0)))
  key = jax.eval_shape(lambda: jax.random.key(0))  # made eagerly, a key would compile
  try:
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x1)
    jaxpr = jax.jit(fn).trace(params, state, x, key).jaxpr
  except Exception:  # noqa: BLE001 - the shape check reports a failing model properly
    return True
  key_var = jaxpr.jaxpr.invars[-1]
  return _var_used(jaxpr.jaxpr, key_var)


def _var_used(jaxpr, var) -> bool:
  for eqn in jaxpr.eqns:
    if any(v is var for v in eqn.invars):
      return True
  return False


# ------------------------------------------------------------------------------ nnx ----


def _is_nnx_factory(model: Any) -> bool:
  target = model.func if isinstance(model, functools.partial) else model
  return isinstance(target, type) and issubclass(target, nnx.Module)


def _rngs(key: jax.Array) -> nnx.Rngs:
  # `params` draws the initial parameters (as nnx.Rngs(params=key) always did); the other
  # streams are only placeholders: the engine sets every stream's key before each update.
  return nnx.Rngs(
    params=key, dropout=jax.random.fold_in(key, 1), default=jax.random.fold_in(key, 2)
  )


def _nnx(
  factory: Any,
  instance: nnx.Module | None,
  train_argument: str | None = None,
  rng_argument: str | None = None,
) -> Model:
  name = describe(factory if instance is None else instance)
  if instance is None:

    def construct(key):
      return factory(rngs=_rngs(key))

    try:
      # Abstract construction: the graph structure without allocating any parameters.
      abstract = nnx.eval_shape(lambda: construct(jax.random.key(0)))
    except Exception as e:  # the class is the user's: report any failure as a config problem
      raise config_error(
        'model',
        name,
        f'constructing it as cls(rngs=nnx.Rngs(params=key, dropout=...)) failed '
        f'({type(e).__name__}: {e}); the class must accept a rngs keyword',
      ) from e
  else:
    abstract = instance
  # Modes are static attributes (deterministic, use_running_average), so each mode has a
  # graph definition of its own. `train()`/`eval()` change the module in place: done on a
  # copy, the user's instance is left as it was.
  template = nnx.clone(abstract) if instance is not None else abstract
  template.train()
  graph_train, params_s, rngs_s, state_s = nnx.split(template, nnx.Param, nnx.RngState, ...)
  template.eval()
  graph_eval = nnx.split(template, nnx.Param, nnx.RngState, ...)[0]
  if not jax.tree.leaves(params_s):
    raise config_error('model', name, 'a model with nnx.Param parameters to train')
  rng_paths = [path for path, _ in nnx.to_flat_state(rngs_s)]
  # A `train` argument of `__call__` (or the one named by train_argument) is passed as in
  # linen, beside the modes train()/eval() set; other switch-like names are refused.
  switch = _switch(template, train_argument)
  if rng_argument is not None:
    _check_rng_argument(type(template).__call__, rng_argument, f'{name}.__call__')

  def keyed(key, train):
    return {} if rng_argument is None else {rng_argument: rng_keys(key, train)}

  try:
    # The tutorials' other way: Dropout without stored Rngs, `__call__(self, x, rngs=None)`.
    takes_rngs = 'rngs' in inspect.signature(type(template).__call__).parameters
  except (TypeError, ValueError):
    takes_rngs = False
  random = bool(rng_paths) or takes_rngs or rng_argument is not None

  if instance is None:

    def init(key):
      _, params, _, state = nnx.split(construct(key), nnx.Param, nnx.RngState, ...)
      return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

  else:
    # A snapshot: later changes to the instance do not change these initial values.
    initial = (nnx.to_pure_dict(params_s), nnx.to_pure_dict(state_s))

    def init(key):
      del key  # every seed starts from the instance's values
      return initial

  def rng_values(key):
    """Every Rngs stream of the module keyed from `key` (stream j: fold_in(key, j))."""
    out: dict = {}
    for j, path in enumerate(p for p in rng_paths if p[-1] == 'key'):
      _put(out, path, jax.random.fold_in(key, j))
      _put(out, path[:-1] + ('count',), jnp.zeros((), jnp.uint32))
    return out

  def apply(params, state, x, train, key):
    if not train:
      module = nnx.merge(graph_eval, params, rng_values(jax.random.key(0)), state)
      with layers.fast_layers():
        return module(*inputs(x), **_switch_kwargs(switch, False), **keyed(key, False)), state
    key = key if key is not None else jax.random.key(0)
    module = nnx.merge(graph_train, params, rng_values(key), state)
    extra = {'rngs': nnx.Rngs(dropout=key)} if takes_rngs else {}
    extra.update(keyed(key, True))
    with layers.fast_layers():  # flax's own layers at full speed under the run axis
      out = module(*inputs(x), **extra, **_switch_kwargs(switch, True))
    new_state = nnx.to_pure_dict(nnx.split(module, nnx.Param, nnx.RngState, ...)[3])
    return out, new_state

  def rebuild(params, state):
    return nnx.merge(graph_eval, params, rng_values(jax.random.key(0)), state)

  def variables(params, state):
    return {'params': params, **({'state': state} if jax.tree.leaves(state) else {})}

  return Model(
    init,
    apply,
    name=name,
    random=random,
    variables=variables,
    rebuild=rebuild,
    initial=None if instance is None else initial,
    eval_key=rng_argument is not None,
  )


def _nnx_values(instance: nnx.Module) -> tuple[Any, Any]:
  """An nnx instance's `(params, state)` as `_nnx` snapshots them (the instance untouched)."""
  _, params, _, state = nnx.split(nnx.clone(instance), nnx.Param, nnx.RngState, ...)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(state)


def _put(tree: dict, path: tuple, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ------------------------------------------------------------------------- equinox ----


def _equinox(model: Any, example_x: np.ndarray) -> Model:
  """An equinox module, called on one example at a time (equinox's convention) and
  vmapped over the batch; its Dropout layers follow `eqx.nn.inference_mode`."""
  import equinox as eqx

  name = describe(model)
  if any(
    isinstance(m, eqx.nn.StateIndex)
    for m in jax.tree.leaves(model, is_leaf=lambda m: isinstance(m, eqx.nn.StateIndex))
  ):
    raise config_error(
      'model',
      name,
      'equinox modules with eqx.nn.State (BatchNorm, stateful layers) are not supported; '
      'use a flax model for batch statistics',
    )
  params, static = eqx.partition(model, eqx.is_inexact_array)
  if not jax.tree.leaves(params):
    raise config_error('model', name, 'a model with floating-point arrays to train')
  try:
    takes_key = 'key' in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    takes_key = False
  training = eqx.nn.inference_mode(model, value=False)
  evaluation = eqx.nn.inference_mode(model, value=True)
  static_train = eqx.partition(training, eqx.is_inexact_array)[1]
  static_eval = eqx.partition(evaluation, eqx.is_inexact_array)[1]

  def init(key):
    del key  # every seed starts from the instance's values
    return params, {}

  def apply(p, state, x, train, key):
    if not train:
      module = eqx.combine(p, static_eval)
      return jax.vmap(lambda xi: module(*inputs(xi)))(x), state
    module = eqx.combine(p, static_train)
    if takes_key and key is not None:
      keys = jax.random.split(key, jax.tree.leaves(x)[0].shape[0])
      return jax.vmap(lambda xi, k: module(*inputs(xi), key=k))(x, keys), state
    return jax.vmap(lambda xi: module(*inputs(xi)))(x), state

  def rebuild(p, state):
    del state
    return eqx.combine(jax.tree.map(jnp.asarray, p), static_eval)

  del static, example_x
  return Model(init, apply, name=name, random=takes_key, rebuild=rebuild, initial=(params, {}))


def _equinox_values(model: Any) -> tuple[Any, Any]:
  import equinox as eqx

  return eqx.partition(model, eqx.is_inexact_array)[0], {}


# --------------------------------------------------------------------------- keras ----


def keras_ends_in_softmax(model: Any) -> bool:
  """Whether a Keras model's last layer applies a softmax (its outputs are probabilities)."""
  keras = sys.modules.get('keras')
  if keras is None or not isinstance(model, keras.Model) or not getattr(model, 'layers', None):
    return False
  activation = getattr(model.layers[-1], 'activation', None)
  return activation is keras.activations.softmax or getattr(activation, '__name__', '') == 'softmax'


def _keras(model: Any, example_x: np.ndarray) -> Model:
  """A Keras 3 model on the JAX backend, through `stateless_call` (training=True while
  training). Every seed starts from the model's current weights; Keras' own random
  seed state is replaced by the engine's key before each update."""
  import keras

  name = describe(model)
  if keras.backend.backend() != 'jax':
    raise config_error(
      'model',
      name,
      'a Keras model on the JAX backend (KERAS_BACKEND=jax); this one runs on '
      f'{keras.backend.backend()}',
    )
  if not model.built:
    model(np.asarray(example_x)[:1])
  trainable, initial_state = _keras_values(model)
  others = list(model.non_trainable_variables)
  seeds = [i for i, v in enumerate(others) if 'seed_generator' in v.path]
  if not trainable:
    raise config_error('model', name, 'a model with trainable weights')

  def init(key):
    del key
    return trainable, initial_state

  def apply(params, state, x, train, key):
    state = list(state)
    if train and key is not None:
      for j, i in enumerate(seeds):
        state[i] = (
          jax.random.key_data(jax.random.fold_in(key, j))
          .astype(state[i].dtype)
          .reshape(state[i].shape)
        )
    out, new = model.stateless_call(params, state, x, training=train)
    return out, (list(new) if train else state)

  def rebuild(params, state):
    clone = keras.models.clone_model(model)
    clone.build(model.input_shape) if not clone.built else None
    for v, a in zip(clone.trainable_variables, params, strict=True):
      v.assign(np.asarray(a))
    for v, a in zip(clone.non_trainable_variables, state, strict=True):
      v.assign(np.asarray(a))
    return clone

  return Model(
    init, apply, name=name, random=bool(seeds), rebuild=rebuild, initial=(trainable, initial_state)
  )


def _keras_values(model: Any) -> tuple[list, list]:
  return (
    [np.asarray(v.value) for v in model.trainable_variables],
    [np.asarray(v.value) for v in model.non_trainable_variables],
  )


@dataclasses.dataclass(frozen=True, eq=False)
class KerasLoss:
  """A Keras loss object as the engine's per-example loss `loss(predictions, targets)`
  (Keras takes `(y_true, y_pred)` and averages over the batch). Equal for losses of one
  Keras class and config (a loss object made anew compiles nothing), else by identity."""

  loss: Any

  @functools.cached_property
  def _key(self) -> Any:
    config = getattr(self.loss, 'get_config', None)
    if type(self.loss).__module__.startswith('keras.') and config is not None:
      try:
        return type(self.loss), _key(config())
      except Exception:  # noqa: BLE001 - an unreadable config: compared by identity
        pass
    return self.loss

  def __eq__(self, other: object) -> bool:
    return isinstance(other, KerasLoss) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def __call__(self, predictions: jax.Array, targets: jax.Array) -> jax.Array:
    fn = self.loss.call if hasattr(self.loss, 'call') else self.loss  # an object, or a function
    out = fn(targets, predictions)
    return jnp.mean(out, axis=tuple(range(1, out.ndim))) if out.ndim > 1 else out

  @property
  def __name__(self) -> str:
    return getattr(self.loss, '__name__', type(self.loss).__name__)


def keras_loss(loss: Any) -> Any:
  """`loss` as the engine calls it: a Keras loss object wrapped in `KerasLoss`."""
  keras = sys.modules.get('keras')
  if keras is not None and isinstance(loss, keras.losses.Loss):
    return KerasLoss(loss)
  # keras.losses.categorical_crossentropy and the like take (y_true, y_pred) too.
  if keras is not None and callable(loss) and getattr(loss, '__module__', '').startswith('keras'):
    return KerasLoss(loss)
  return loss
