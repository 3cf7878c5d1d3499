"""Optimizer families, built from optax with every numeric hyperparameter injected.

An optimizer family (sgd, adam, ...) changes the code of the step, so it is part of
the compiled structure. Its numeric hyperparameters (the learning rate, momentum,
betas, weight decay) are arrays in the optimizer state through
`optax.inject_hyperparams`: each run of a vmapped sweep carries its own values and
new values never recompile. The learning rate held there is overwritten before
every update with the value of the run's schedule (see `kernels.schedules`).

A researcher's own optimizer is a `Factory`: `callable(learning_rate, **hyperparameters)
-> optax.GradientTransformation`, injected the same way, so that its learning rate and
the keyword arguments the sweep fills are traced arrays too.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import logging
import numbers
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Family:
  """One optimizer family.

  Attributes:
    factory: the optax constructor, called as `factory(learning_rate=..., **hypers, **static)`.
    hypers: the numeric hyperparameters a sweep may set, with optax's defaults.
    static: fixed keyword arguments (booleans and the like) that pick the code path.
  """

  factory: Callable[..., optax.GradientTransformation]
  hypers: Mapping[str, float | None]
  static: Mapping[str, object] = dataclasses.field(default_factory=dict)


FAMILIES: dict[str, Family] = {
  'sgd': Family(optax.sgd, {}),
  'momentum': Family(optax.sgd, {'momentum': 0.9}),
  'nesterov': Family(optax.sgd, {'momentum': 0.9}, {'nesterov': True}),
  'adam': Family(optax.adam, {'b1': 0.9, 'b2': 0.999}),
  'adamw': Family(optax.adamw, {'b1': 0.9, 'b2': 0.999, 'weight_decay': 1e-4}),
  # rmsprop's momentum is off (None) unless a sweep sets it; setting it adds a trace.
  'rmsprop': Family(optax.rmsprop, {'momentum': None}),
  'adagrad': Family(optax.adagrad, {}),
  'lion': Family(optax.lion, {'b1': 0.9, 'b2': 0.99, 'weight_decay': 1e-3}),
}

# Every hyperparameter name some family accepts, in a stable order.
HYPERPARAMETERS = ('momentum', 'b1', 'b2', 'weight_decay')


def families_accepting(name: str) -> list[str]:
  """The families whose optimizer takes hyperparameter `name`."""
  return [f for f, fam in FAMILIES.items() if name in fam.hypers]


@dataclasses.dataclass(frozen=True)
class Factory:
  """A researcher's optimizer: `fn(learning_rate, **hyperparameters)`, with `names` the
  keyword arguments the sweep fills (and injects, traced). Equal factories (the same `fn`
  and names) share their compiled programs.

  Attributes:
    fn: the factory, returning an `optax.GradientTransformation` (or an `optax.MultiSteps`).
    names: the keyword arguments given to `fn`, in a stable order.
    label: how the results table names it.
    every_k: the batches per parameter update of an `optax.MultiSteps(opt, k)` it returns
      (see `accumulation`), 1 otherwise.
  """

  fn: Callable[..., optax.GradientTransformation]
  names: tuple[str, ...]
  label: str = dataclasses.field(default='', compare=False)  # not part of the program
  every_k: int = 1

  def __str__(self) -> str:
    return self.label


REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Signature:
  """What a factory takes: its learning-rate argument and its keyword arguments.

  Attributes:
    learning_rate: the name of the first parameter (the learning rate).
    keywords: every other parameter that may be given by keyword, with its default
      (`REQUIRED` when it has none).
    any_keyword: the factory takes `**kwargs`, so any name is accepted.
  """

  learning_rate: str
  keywords: Mapping[str, Any]
  any_keyword: bool

  def accepts(self, name: str) -> bool:
    return name in self.keywords or self.any_keyword

  def required(self) -> list[str]:
    return [k for k, d in self.keywords.items() if d is REQUIRED]


def signature(fn: Callable) -> Signature:
  """The parameters of factory `fn`; raises ValueError when it takes no learning rate."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError) as e:
    raise ValueError(f'its signature cannot be read ({e})') from None
  params = list(sig.parameters.values())
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  if not params or params[0].kind not in positional:
    raise ValueError('a factory takes the learning rate as its first positional argument')
  keywords = {}
  for p in params[1:]:
    if p.kind == inspect.Parameter.POSITIONAL_ONLY:
      if p.default is REQUIRED:
        raise ValueError(
          f'argument {p.name!r} is positional-only: the sweep passes hyperparameters by keyword'
        )
      continue
    if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
      keywords[p.name] = p.default
  any_keyword = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
  return Signature(params[0].name, keywords, any_keyword)


def _injectable(
  fn: Callable, names: tuple[str, ...]
) -> Callable[..., optax.GradientTransformation]:
  """`fn` with the signature `(learning_rate, *, <names>)` that `optax.inject_hyperparams`
  reads, whatever `fn` calls its learning rate."""

  def build(**kwargs):
    learning_rate = kwargs.pop('learning_rate')
    made = fn(learning_rate, **kwargs)
    return made.gradient_transformation() if isinstance(made, optax.MultiSteps) else made

  kw = inspect.Parameter.KEYWORD_ONLY
  build.__signature__ = inspect.Signature(
    [inspect.Parameter('learning_rate', inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(n, kw) for n in names]
  )
  return build


def label(fn: Callable, limit: int = 100) -> str:
  """A readable name for a factory or schedule: its `__name__`; a partial as
  `name(arguments)`; a lambda as the source of its body (`optax.` dropped).

  Args:
    fn: the callable.
    limit: longer labels are cut to this many characters.
  """
  if isinstance(fn, functools.partial):
    args = [repr(a) for a in fn.args] + [f'{k}={v!r}' for k, v in fn.keywords.items()]
    text = f'{label(fn.func, limit)}({", ".join(args)})'
  else:
    name = getattr(fn, '__name__', None)
    if name == '<lambda>':
      text = _lambda_source(fn) or f'lambda {", ".join(inspect.signature(fn).parameters)}'
    elif isinstance(name, str):
      text = name
    else:
      text = type(fn).__name__
  text = ' '.join(text.replace('optax.', '').split()).replace('( ', '(').replace(' )', ')')
  return text if len(text) <= limit else text[: limit - 1] + '…'


def _lambda_source(fn: Callable) -> str | None:
  """The body of lambda `fn` as written, or None when its source cannot be found."""
  try:
    lines, _ = inspect.findsource(fn)
  except (OSError, TypeError):
    return None
  text = ''.join(lines)
  tree = _parse(text)
  if tree is None:
    return None
  code = fn.__code__
  # The first position of the body's instructions (RESUME and the like carry none).
  starts = [
    (line, col)
    for line, _, col, end in code.co_positions()
    if line is not None and col is not None and (col, end) != (0, 0)
  ]
  args = [a for a in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
  lambdas = [
    n for n in ast.walk(tree) if isinstance(n, ast.Lambda) and n.lineno == code.co_firstlineno
  ]
  exact = [n for n in lambdas if starts and (n.body.lineno, n.body.col_offset) == min(starts)]
  named = [
    n
    for n in lambdas
    if [a.arg for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs] == args
  ]
  found = exact or (named if len(named) == 1 else [])
  return ast.get_source_segment(text, found[0].body) if found else None


@functools.lru_cache(maxsize=16)
def _parse(text: str) -> ast.Module | None:
  try:
    return ast.parse(text)
  except SyntaxError:
    return None


def example_hypers(family: str | Factory) -> dict[str, float]:
  """Stand-in values for the hyperparameters of `family` (for shape-only traces)."""
  if isinstance(family, Factory):
    return {k: 0.5 for k in family.names}
  return {k: 0.5 for k, v in FAMILIES[family].hypers.items() if v is not None}


def make(family: str | Factory, hypers: Mapping[str, jnp.ndarray]) -> optax.GradientTransformation:
  """The optimizer of `family` with injected (traceable) hyperparameters.

  Args:
    family: a key of `FAMILIES`, or a `Factory`.
    hypers: values for the numeric hyperparameters the sweep sets; scalars or traced
      arrays. Hyperparameters of the family missing here take the family's default as a
      Python float, fixed (not injected): `adam` without b1/b2 is exactly `optax.adam(lr)`.

  Returns:
    An `optax.inject_hyperparams` transformation whose state holds
    `hyperparams['learning_rate']` and every entry of `hypers`.
  """
  # learning_rate starts at 0; the engine writes the scheduled value before each update.
  if isinstance(family, Factory):
    return optax.inject_hyperparams(_injectable(family.fn, family.names))(
      learning_rate=0.0, **hypers
    )
  fam = FAMILIES[family]
  fixed = {k: v for k, v in fam.hypers.items() if v is not None and k not in hypers}
  return optax.inject_hyperparams(fam.factory, static_args=tuple(fixed))(
    learning_rate=0.0, **hypers, **fixed, **fam.static
  )


def with_learning_rate(opt_state: optax.OptState, learning_rate: jnp.ndarray) -> optax.OptState:
  """Returns `opt_state` (an inject_hyperparams state) using `learning_rate` next."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(learning_rate, hyperparams['learning_rate'].dtype)
  return opt_state._replace(hyperparams=hyperparams)


# ------------------------------------------------------------ states inside a chain ----


def find_states(opt_state: Any, kind: type | tuple[type, ...]) -> list[Any]:
  """Every state of type `kind` (or of one of the types) inside `opt_state` (anywhere in a
  chain or wrapper), in the order of its leaves. The structure alone decides: this works
  on traced states."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
  return [n for n in nodes if isinstance(n, kind)]


def has_eval_params(opt_state: Any) -> bool:
  """Whether the optimizer means its run to be evaluated at other parameters than the
  ones it trains (a schedule-free optimizer or a lookahead, see `eval_params`)."""
  return bool(find_states(opt_state, (optax.contrib.ScheduleFreeState, optax.LookaheadState)))


def eval_params(opt_state: Any, params: Any) -> Any:
  """The parameters at which one run is evaluated: `params` themselves, except under a
  schedule-free optimizer (`optax.contrib.schedule_free*`, anywhere in a chain), whose
  training parameters are the interpolation `y` and whose evaluation parameters are
  `optax.contrib.schedule_free_eval_params(state, params)` (the average `x`), and under
  `optax.lookahead`, which trains `optax.LookaheadParams` and is evaluated at their `slow`
  half.

  Returns `params` unchanged (the same object) for every other optimizer, so the
  programs of ordinary optimizers do not change.
  """
  if isinstance(params, optax.LookaheadParams):
    return params.slow
  found = find_states(opt_state, optax.contrib.ScheduleFreeState)
  if not found:
    return params
  return optax.contrib.schedule_free_eval_params(found[0], params)


def evaluates_elsewhere(opt_state: Any, fn: Callable | None = None) -> bool:
  """Whether a run is evaluated at other parameters than it trains: `fn` (a config's
  `eval_params`) is given, or its optimizer is schedule-free. A state of None (not kept)
  has none."""
  return opt_state is not None and (fn is not None or has_eval_params(opt_state))


def evaluated(opt_state: Any, params: Any, fn: Callable | None = None) -> Any:
  """The parameters one run is evaluated at, from its state as `make` built it:
  `fn(state of the optimizer the factory built, params)` when `fn` is given, else
  `eval_params(opt_state, params)`."""
  if fn is not None:
    return fn(opt_state.inner_state, params)
  return eval_params(opt_state, params)


# ------------------------------------------------------------------ wrappers ----


def every_k(family: str | Factory) -> int:
  """The batches per parameter update of `family` (an `optax.MultiSteps` factory's k), 1
  for every other optimizer."""
  return family.every_k if isinstance(family, Factory) else 1


_COUNT = jax.ShapeDtypeStruct((), jnp.int32)
_DEFAULT_SKIP = optax.MultiSteps(optax.identity(), 1)._should_skip_update_fn.__code__


def accumulation(made: Any) -> int:
  """The k of `optax.MultiSteps(opt, every_k_schedule=k)` when a factory returned one (the
  object or its `gradient_transformation()`), 1 for anything else.

  Raises:
    ValueError: for a MultiSteps whose parameter updates do not fall on every k-th batch
      (an every_k_schedule that is a function of the update count, or a
      should_skip_update_fn, which leaves batches out of the count), so that the sweep's
      update count and schedule clock could not follow it.
  """
  if isinstance(made, optax.MultiSteps):
    wrapper = made
  elif isinstance(getattr(made, 'init', None), types.MethodType):
    wrapper = made.init.__self__  # MultiSteps(...).gradient_transformation()
  else:
    return 1
  if not isinstance(wrapper, optax.MultiSteps):
    return 1
  # Called on a traced count (compiling nothing): a constant comes back a Python int.
  found = []
  try:
    jax.eval_shape(lambda step: found.append(wrapper._every_k_schedule(step)) or step, _COUNT)
  except Exception:
    found = [None]  # it computes with the count in Python
  k = found[0]
  if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
    raise ValueError(
      'its optax.MultiSteps takes every_k_schedule as a function of the update count (or not '
      'a positive int); the sweep counts parameter updates and runs the learning-rate schedule '
      'on one update per k batches, so give every_k_schedule a constant int'
    )
  if wrapper._should_skip_update_fn.__code__ is not _DEFAULT_SKIP:
    raise ValueError(
      'its optax.MultiSteps has a should_skip_update_fn: a skipped batch leaves the update '
      'clock, which the sweep keeps as one update per k batches; leave it out (a run is '
      'frozen at a non-finite batch loss, or put optax.apply_if_finite around the inner '
      'optimizer)'
    )
  return int(k)


class _NoLookaheadWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return 'has no attribute `fast`' not in record.getMessage()


@contextlib.contextmanager
def _quiet_lookahead():
  """Silences optax's warning that lookahead's init was given plain parameters: that is how
  `trains_lookahead` recognises it."""
  logger, quiet = logging.getLogger('absl'), _NoLookaheadWarning()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def trains_lookahead(opt: optax.GradientTransformation, params: Any) -> bool:
  """Whether `opt` (anywhere in its chain) is an `optax.lookahead`, which trains
  `optax.LookaheadParams(fast, slow)` rather than the model's parameters. The structure of
  its state decides (traced shapes only, nothing runs)."""
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  with _quiet_lookahead():
    state = jax.eval_shape(opt.init, shapes)
  return bool(find_states(state, optax.LookaheadState))


def trained_params(opt: optax.GradientTransformation, params: Any) -> Any:
  """What `opt` trains from the model's `params`: `optax.LookaheadParams.init_synced(params)`
  under a lookahead (as a researcher's optax loop starts it), `params` itself otherwise."""
  return optax.LookaheadParams.init_synced(params) if trains_lookahead(opt, params) else params


def model_params(params: Any) -> Any:
  """The parameters the model is applied to while training: the `fast` half of
  `optax.LookaheadParams`, `params` itself otherwise."""
  return params.fast if isinstance(params, optax.LookaheadParams) else params


@functools.partial(jax.jit, static_argnums=0)
def probe(family: str | Factory, hypers: Mapping[str, Any], params: Any, learning_rates: Any):
  """The updates of `family` summed over three (parameter) updates from `params` with one fixed
  gradient, at each of `learning_rates` (k,): a check that the learning rate reaches the
  updates. Three steps, since some optimizers make no move on their first (mechanize); the
  updates rather than the parameters, since a learning-rate-free optimizer's first moves
  (d0 = 1e-6) vanish in float32 parameters. One small program per factory and shapes."""

  def moved(learning_rate):
    opt = make(family, hypers)
    p = trained_params(opt, params)
    state = opt.init(p)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    total = jax.tree.map(jnp.zeros_like, p)
    for _ in range(3 * every_k(family)):  # a MultiSteps moves once per k steps
      updates, state = opt.update(grads, with_learning_rate(state, learning_rate), p)
      p = optax.apply_updates(p, updates)
      total = jax.tree.map(jnp.add, total, updates)
    return total

  return jax.vmap(moved)(learning_rates)
