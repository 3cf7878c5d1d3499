"""The sweep configuration, its validation, and its expansion into runs.

Which settings compile and which are data:
- *data* (any values, no new compile): learning_rate, seed, schedule (between the
  built-in names), warmup, decay_rate, momentum, b1, b2, weight_decay, the
  `hyperparameters` of an optimizer factory, divergence_threshold.
- *structure* (a new program per distinct combination): the model, the loss, the
  optimizer family or factory (each is its own compile group), the schedule callables,
  the set of batch sizes, the budget in updates per segment, the dataset's shapes, and
  the run-axis width.

The runs are the product of every field given as a list (a grid); or the explicit list
`runs=[{...}, ...]`; or `samples=N` configurations drawn from the fields given as
`sweep.space` distributions, each trained at every point of the remaining lists.
  The run-axis width is rounded up to a power of two, so most changes in the number
  of values (3 -> 4 learning rates, say) reuse the program too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optax

from kernels import losses, optimizers, schedules
from sweep import adapters, batch_schedules, columns, schedulers
from sweep import space as spaces
from sweep.data import Dataset
from sweep.data import check as check_dataset
from sweep.errors import ConfigError, config_error

# The axes of a sweep, in the order runs are enumerated (the last varies fastest).
AXES = (
  'optimizer',
  'schedule',
  'batch_size',
  'learning_rate',
  'momentum',
  'b1',
  'b2',
  'weight_decay',
  'warmup',
  'decay_rate',
  'seed',
)

DEFAULT_OBJECTIVES = columns.DEFAULT_OBJECTIVES


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A sweep of training runs: the product of every axis given as a list, an explicit
  list of runs (`runs=`), or configurations sampled from `sweep.space` distributions.

  Attributes:
    model: `(init_fn, apply_fn)` with `init_fn(key) -> params` and
      `apply_fn(params, x_batch) -> predictions`; or a `flax.linen.Module` (with a
      `train` argument: trained with train=True, batch statistics carried, dropout
      keyed; see `train_argument`); or a `flax.nnx.Module` class (each seed initialises
      it) or instance (its values are every seed's start); or an equinox Module or a
      Keras 3 model (JAX backend); or a haiku `hk.transform` / `hk.transform_with_state`
      (state carried; apply's rng is the update's model key while training, None at
      evaluation; its `is_training` argument switched; also under
      `hk.without_apply_rng`); or a model of `sweep.models` sized to the data.
      See `sweep.adapters`.
    data: a `sweep.data.Dataset`, e.g. `sweep.data.arrays(x, y, x_val, y_val)`.
    loss: a name in `kernels.losses.LOSSES` or `callable(predictions, targets)`
      returning the per-example loss. None picks softmax_cross_entropy for integer
      labels and mse otherwise. A model with several outputs (a tuple or dict of arrays,
      such as a VAE's `(recon, mean, logvar)`) needs a callable loss: it is given them
      whole, and the validation loss is its mean; a named loss is refused.
    optimizer: a name: sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, lion;
      or a factory `callable(learning_rate, **hyperparameters) ->
      optax.GradientTransformation`, e.g. `lambda learning_rate, weight_decay:
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate,
      weight_decay=weight_decay))`; or a list of names and factories. Each is a
      compile group. A factory's keyword arguments are filled from the fields of the
      same name (momentum, b1, b2, weight_decay) and from `hyperparameters`; its
      learning rate (the run's scheduled value at each update) and those arguments
      are injected with `optax.inject_hyperparams`, so they are traced: new values
      compile nothing, and the factory must compute with them in jnp (no Python `if`
      on them). Arguments with defaults that no field fills keep their defaults. With
      several optimizers, a field is crossed only with those that take it (the others'
      runs leave it empty); a field none takes is an error. The
      table names a factory by its `__name__` (a lambda by its body, a partial as
      `name(arguments)`). A ready-made `optax.GradientTransformation` is refused: its
      learning rate is fixed inside it, so the sweep could not set it.
    learning_rate: the initial (or peak) learning rate; a number or a list.
    batch_size: a number or a list.
    seed: fixes a run's init key and its data order; a number or a list. Seed s
      initialises with `jax.random.fold_in(jax.random.key(s), 0)`; with shuffle, its
      epoch e reads the training set in the order
      `jax.random.permutation(jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 1), e), n)`.
      A run with batch size B takes consecutive slices of B of that order and drops
      the last `n % B` examples of each epoch (different ones each epoch when shuffled).
    schedule: constant, exponential, step, cosine, warmup_cosine, linear, onecycle,
      warmup_linear (linear warmup to the learning rate, then linear decay to 0); or
      `callable(learning_rate, total_updates) -> optax schedule` (or a number), e.g.
      `lambda lr, total: optax.warmup_cosine_decay_schedule(0.0, lr, total // 10,
      total)`, called with the run's learning rate traced and the run's number of
      updates as a Python int; a name, a callable or a list. Every schedule counts
      the run's own updates. Each callable is part of the compiled program.
    warmup: warmup_cosine's and warmup_linear's warmup, as a fraction of the run's
      updates.
    decay_rate: exponential decays to `decay_rate * lr` at the end of the run; step
      multiplies the rate by `decay_rate` every `decay_every` of the run's updates.
    decay_every: step's period as a fraction of the run's updates.
    momentum, b1, b2, weight_decay: optimizer hyperparameters; None keeps optax's
      default of each optimizer. Setting one an optimizer does not take is an error.
    hyperparameters: other keyword arguments of optimizer factories, name -> a number,
      a list (an axis) or a space, e.g. `{'clip_norm': [0.5, 1.0]}`. Each name is a
      column of the table.
    epochs: budget in passes over the training set (a run with batch size B makes
      round(epochs * (n // B)) updates). Give either epochs or updates; with
      neither, one epoch.
    updates: budget in updates, the same for every run.
    shuffle: a new per-seed permutation every epoch; False keeps the data order.
    num_evals: evaluation points after the start (segments); None: once per epoch
      for an epoch budget (at most 100), 10 for an updates budget.
    divergence_threshold: a run is frozen and marked diverged when a batch loss is
      NaN/inf or exceeds this multiple of its first batch loss. Under
      `optax.apply_if_finite` a non-finite batch is the optimizer's to skip: the run is
      frozen only when its update is not finite (the batch left out of `batch_loss`).
    eval_batch_size: examples per evaluation chunk.
    train_eval_size: size of the fixed random subset of the training set on which
      train metrics are measured at each evaluation point (the same for every run); None
      sizes it to the training (`probe_size`: its forward passes cost about a twentieth of
      a segment's training); `data.n_train` measures them on the whole training set.
    objectives: Pareto objectives, column -> "min" or "max".
    compute_dtype: "float32", or "bfloat16" for the forward and backward pass with
      float32 parameters and optimizer state.
    memory_budget: bytes the runs may occupy on a device; None: 60 % of an
      accelerator's memory, 15 % of host RAM on CPU. Runs that do not fit at once are
      trained in chunks that reuse one compiled program.
    noise_scale: measure the gradient noise scale during training (every batch size
      must be even): each batch's gradient is taken as the mean of its two halves'.
    keep_best: also keep each run's parameters at its best evaluation point (lowest
      validation loss: the early-stopping point); costs one more copy of the parameters.
      `result.params(i, best=True)`; saved beside the final ones for Pareto runs.
    runs: an explicit list of runs, each a dict of fields, e.g.
      `[{'learning_rate': 1e-3, 'batch_size': 32}, ...]`: the table has exactly these
      rows, in this order. A field a run does not name takes the config's value, which
      must then be a single value.
    samples: with fields given as `sweep.space` distributions (`loguniform`,
      `uniform`, `randint`, `choice`), the number of configurations drawn; each is
      trained at every point of the fields given as lists (seeds, say).
    sample_seed: the seed of the draws: the same seed gives the same runs.
    train_argument: the name of the argument of a linen module's `__call__` that switches
      training on (`train`, found by itself, is the flax examples' convention; e.g.
      'training', or 'deterministic', which is passed the opposite). The engine passes it
      True while training (dropout on, batch statistics updated) and False at every
      evaluation. A module whose call takes a switch-like argument other than `train`
      is refused until it is named here.
    rng_argument: the name of an argument of the model's call that takes a JAX key (the
      flax VAE example's `__call__(self, x, z_rng)`), for a linen or nnx module or an
      `(init_fn, apply_fn)` pair (`apply_fn(params, x, z_rng=key)`). While training, a
      seed's update t passes `jax.random.fold_in(k, 1)` with
      `k = fold_in(fold_in(key(seed), 2), t)` the update's model key (dropout draws
      from k itself), so the runs of a seed draw alike; linen's init is passed
      `fold_in(init_key, 1)`. Evaluation is done in whole chunks of
      `min(eval_batch_size, the larger of the probe and validation sets)` examples (a
      set padded by repeating its first example), chunk c passing
      `fold_in(fold_in(key(0), 4), c)` for every run and evaluation point. None: the
      model takes no key (a linen module may still call `self.make_rng('dropout')`).
    augment: `augment(key, x_batch) -> x_batch`, pure and jittable, applied to every
      training batch (never at evaluation), e.g. random crops and flips. Its key for
      a seed's update t (counted from 0) is
      `jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), t)`, so the runs
      of a seed see the same augmented batches. The model's own randomness (dropout)
      uses stream 2 the same way: `fold_in(fold_in(key(seed), 2), t)`.
    eval_params: `eval_params(opt_state, params) -> params`, pure and jittable: the
      parameters at which a run is evaluated (curves, table, best and Pareto runs,
      keep_best, `result.params(i)`, saved runs), from the state of the optimizer the
      factory built and the parameters it trains, e.g. an average of the parameters kept
      in a transformation's state. Its argument order is optax's
      `schedule_free_eval_params(state, params)`; schedule-free optimizers are
      recognised without it. None: the trained parameters (or schedule-free's).
    scheduler: adaptive search (`sweep.schedulers`): `SuccessiveHalving(...)`,
      `MedianStopping(...)`, `Patience(...)` (or a list of these), or `PBT(...)`. Runs are
      then judged at evaluation points and stopped, refilled or copied between segments
      of the same compiled programs; the table shows every configuration tried, its
      status (`stopped` for a run a rule stopped), the rung it reached and its updates.
      None trains every run to its end. With a scheduler and no `num_evals`, the
      evaluation points are chosen to fall on its rungs or intervals.
    name: a label for the sweep.
  """

  model: Any
  data: Dataset
  loss: str | Callable | None = None
  optimizer: str | Callable | Sequence[str | Callable] = 'adam'
  learning_rate: float | Sequence[float] = 1e-3
  batch_size: int | Sequence[int] = 32
  seed: int | Sequence[int] = 0
  schedule: str | Callable | Sequence[str | Callable] = 'constant'
  warmup: float | Sequence[float] = 0.1
  decay_rate: float | Sequence[float] = 0.1
  decay_every: float = 1 / 3
  momentum: float | Sequence[float] | None = None
  b1: float | Sequence[float] | None = None
  b2: float | Sequence[float] | None = None
  weight_decay: float | Sequence[float] | None = None
  hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  epochs: float | None = None
  updates: int | None = None
  shuffle: bool = True
  num_evals: int | None = None
  divergence_threshold: float = 100.0
  eval_batch_size: int = 1024
  train_eval_size: int | None = None
  objectives: Mapping[str, str] = dataclasses.field(
    default_factory=lambda: dict(DEFAULT_OBJECTIVES)
  )
  compute_dtype: str = 'float32'
  memory_budget: float | None = None
  noise_scale: bool = False
  keep_best: bool = False
  runs: Sequence[Mapping[str, Any]] | None = None
  samples: int | None = None
  sample_seed: int = 0
  train_argument: str | None = None
  rng_argument: str | None = None
  augment: Callable | None = None
  eval_params: Callable | None = None
  scheduler: Any = None
  name: str = 'sweep'

  def replace(self, **changes) -> SweepConfig:
    return dataclasses.replace(self, **changes)


class UnknownFieldError(ConfigError, TypeError):
  """A `SweepConfig` keyword that is no field (a TypeError too, as Python would raise)."""


def _checked_init(init):
  names = [f.name for f in dataclasses.fields(SweepConfig)]

  @functools.wraps(init)
  def __init__(self, *args, **kwargs):  # noqa: N807
    for key in kwargs:
      if key not in names:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        raise UnknownFieldError(
          f"SweepConfig has no field '{key}'{hint}; its fields are: {', '.join(names)}"
        )
    init(self, *args, **kwargs)

  return __init__


# Unknown keywords get the list of fields and a suggestion, not a bare TypeError.
SweepConfig.__init__ = _checked_init(SweepConfig.__init__)


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: its index in the table and its resolved hyperparameters.

  Attributes:
    index: its row in the table.
    values: every field as the table shows it (optimizer defaults filled in; factories
      and schedule callables by their labels).
    total_updates: the run's number of updates.
    family: what its optimizer is built from: a name of `optimizers.FAMILIES` or an
      `optimizers.Factory`.
    schedule: a name of `schedules.SCHEDULES` or the schedule callable.
    hypers: the optimizer hyperparameters injected (traced), name -> value.
    spec: every field as given (callables themselves, not their labels).
    stages: with a batch-size schedule (`sweep.batch_ramp`), `(first epoch, batch size)`
      of each stage; empty for a constant batch size (`values['batch_size']`, which is
      the first stage's otherwise).
  """

  index: int
  values: dict[str, Any]
  total_updates: int
  family: str | optimizers.Factory = 'adam'
  schedule: str | Callable = 'constant'
  hypers: dict[str, float] = dataclasses.field(default_factory=dict)
  spec: dict[str, Any] = dataclasses.field(default_factory=dict)
  stages: tuple[tuple[int, int], ...] = ()  # a batch-size schedule: (first epoch, batch size)

  @property
  def group(self) -> tuple[str | optimizers.Factory, tuple[str, ...]]:
    """The compile group: the optimizer and the names of its injected hyperparameters."""
    return self.family, tuple(self.hypers)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated config, expanded: the runs and the settings that shape the program."""

  config: SweepConfig
  runs: tuple[Run, ...]
  loss: str | Callable
  axes: dict[str, list]  # each field's distinct values in order (callables by their labels)
  swept: tuple[str, ...]  # axes with more than one value or set by the user
  batch_sizes: tuple[int, ...]
  steps_per_epoch: dict[int, int]
  total_updates: dict[int, int]
  num_evals: int
  output_dim: int
  fields: tuple[str, ...] = AXES  # the axes, the factories' hyperparameters after weight_decay
  groups: tuple = ()  # compile groups: (optimizer, hyperparameter names), in order
  custom_schedules: tuple[Callable, ...] = ()  # schedule callables; kind len(SCHEDULES) + j
  search: dict[str, Any] = dataclasses.field(default_factory=dict)  # how the runs were chosen
  # For runs drawn from a space, what the layout may depend on (not the draw): `samples`,
  # `grid` (runs per configuration and seed from the listed axes, at most), `p_optimizer`
  # and `batch_sizes` (each option's chance, and every batch size the space can draw).
  space: dict[str, Any] | None = None

  @property
  def ramps(self) -> bool:
    """Whether some run changes batch size (`sweep.batch_ramp`)."""
    return any(r.stages for r in self.runs)

  def stage_updates(self, run: Run) -> list[tuple[int, int, int]]:
    """`(updates, examples, batch size)` at the start of each of `run`'s stages (one
    stage for a constant batch size)."""
    stages = run.stages or ((0, run.values['batch_size']),)
    out, updates, examples = [], 0, 0
    for k, (epoch, b) in enumerate(stages):
      out.append((updates, examples, b))
      if k + 1 < len(stages):
        epochs = stages[k + 1][0] - epoch
        updates += epochs * self.steps_per_epoch[b]
        examples += epochs * self.steps_per_epoch[b] * b
    return out

  def examples(self, run: Run, updates: int) -> tuple[int, int]:
    """(examples read, batch size of the last update) after `updates` updates of `run`."""
    for start, examples, b in reversed(self.stage_updates(run)):
      if updates > start or start == 0:
        return examples + (updates - start) * b, b
    raise AssertionError('unreachable')


# The training probe sized to the training (train_eval_size=None): its forward passes cost
# at most PROBE_SHARE of a segment's training, a training step counted as three forward
# passes of its batch (forward and backward), so half of the tenth the probe and the
# validation pass may take together; a power of two (the evaluation chunks divide it), at
# least PROBE_MIN examples (a smaller probe's loss is mostly noise).
PROBE_SHARE = 0.05
PROBE_MIN = 256


def probe_size(plan: Plan) -> int:
  """Training examples the train metrics are measured on at each evaluation point."""
  cfg = plan.config
  n = cfg.data.n_train
  if cfg.train_eval_size is not None:
    return min(n, int(cfg.train_eval_size))
  per_segment = min(
    math.ceil(plan.total_updates[b] / plan.num_evals) * b for b in plan.total_updates
  )
  fits = 3 * PROBE_SHARE * per_segment
  size = 1 << int(math.floor(math.log2(max(fits, PROBE_MIN))))
  return min(n, max(size, PROBE_MIN))


def _as_list(field: str, value) -> list:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
    values = [value]
  else:
    values = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
  if not values:
    raise config_error(field, value, 'an axis needs at least one value')
  return values


def _positive_finite(
  field: str, values: list, *, allow_zero: bool = False, upper: float | None = None
):
  for v in values:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
      raise config_error(field, v, 'expected a finite number')
    if v < 0 or (v == 0 and not allow_zero) or (upper is not None and v > upper):
      bound = f'<= {upper}' if upper is not None else ''
      accepted = f'expected a number {">= 0" if allow_zero else "> 0"} {bound}'.strip()
      raise config_error(field, v, accepted)


def _names(field: str, values: list, accepted: Sequence[str]):
  for v in values:
    if not isinstance(v, str) or v not in accepted:
      raise config_error(field, v, 'expected one of ' + ', '.join(accepted))


def table_columns(cfg: SweepConfig, axes: dict[str, list]) -> list[str]:
  """The numeric columns the results table of `cfg` may have (objectives pick from these;
  `preflight` checks them again against the validation set)."""
  numeric_axes = [a for a in axes if a not in ('optimizer', 'schedule') and axes[a] != [None]]
  loss = (
    cfg.loss
    if cfg.loss is not None
    else ('softmax_cross_entropy' if cfg.data.is_classification else 'mse')
  )
  accuracy = isinstance(loss, str) and loss in losses.CLASSIFICATION
  return columns.numeric(numeric_axes, accuracy, bool(cfg.noise_scale), validation=True)


# ------------------------------------------------------------- field values ----


class _Shown(str):
  """A value shown as written in an error message (no quotes)."""

  def __repr__(self) -> str:
    return str(self)


OPTIMIZER_HYPERPARAMETERS = optimizers.HYPERPARAMETERS
# Names a factory hyperparameter cannot take: the table's other columns and the config's fields.
RESERVED = frozenset(
  set(AXES)
  | set(columns.NUMERIC)
  | set(columns.ACCURACY)
  | set(columns.OTHER)
  | {columns.NOISE_SCALE}
  | {
    'hyperparameters',
    'runs',
    'samples',
    'sample_seed',
    'epochs',
    'updates',
    'name',
    'model',
    'data',
    'loss',
  }
)
_FACTORY = 'a factory callable(learning_rate, **hyperparameters) -> optax.GradientTransformation'
_TRANSFORMATION_HINT = (
  'a ready-made transformation has its learning rate fixed inside it, so the sweep cannot set it; '
  'pass a factory that builds it from the learning rate, e.g. optimizer=lambda learning_rate: '
  'optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate)) (its other keyword '
  'arguments are filled from the fields of the same name and from hyperparameters=)'
)


def _label(v) -> str:
  if isinstance(v, str):
    return v
  return optimizers.label(v) if callable(v) else repr(v)


def _refuse_transformation(field: str, v) -> None:
  if isinstance(v, optax.GradientTransformation):
    raise config_error(field, _Shown('<an optax.GradientTransformation>'), _TRANSFORMATION_HINT)


def _takes_two(fn) -> bool:
  try:
    inspect.signature(fn).bind(0.1, 10)
  except TypeError:
    return False
  except ValueError:  # no signature to read (a builtin): let the trace tell
    return True
  return True


def _check_value(cfg: SweepConfig, field: str, v, where: str | None = None) -> None:
  """Raises `ConfigError` unless `v` is a valid single value of `field`."""
  where = where or field
  n = cfg.data.n_train
  if field == 'optimizer':
    _refuse_transformation(where, v)
    if isinstance(v, str):
      if v not in optimizers.FAMILIES:
        raise config_error(
          where, v, 'expected one of ' + ', '.join(optimizers.FAMILIES) + ', or ' + _FACTORY
        )
    elif callable(v):
      try:
        optimizers.signature(v)
      except ValueError as e:
        raise config_error(where, _Shown(_label(v)), f'expected {_FACTORY}: {e}') from None
    else:
      raise config_error(
        where, v, 'expected one of ' + ', '.join(optimizers.FAMILIES) + ', or ' + _FACTORY
      )
  elif field == 'schedule':
    if isinstance(v, str):
      _names(where, [v], list(schedules.SCHEDULES))
    elif callable(v):
      if not _takes_two(v):
        raise config_error(
          where,
          _Shown(_label(v)),
          'expected callable(learning_rate, total_updates) returning an optax schedule; a schedule '
          'of the '
          'update count alone fixes the learning rate: write it as lambda lr, total: '
          'optax.cosine_decay_schedule(lr, total)',
        )
    else:
      raise config_error(
        where,
        v,
        'expected one of '
        + ', '.join(schedules.SCHEDULES)
        + ', or callable(learning_rate, total_updates) returning an optax schedule',
      )
  elif field == 'learning_rate':
    if callable(v):
      raise config_error(
        where,
        _Shown(_label(v)),
        'expected a number; a schedule goes in schedule=, as callable(learning_rate, '
        'total_updates), '
        'e.g. schedule=lambda lr, total: optax.warmup_cosine_decay_schedule(0.0, lr, total // 10, '
        'total)',
      )
    _positive_finite(where, [v])
  elif field == 'batch_size':
    if isinstance(v, batch_schedules.BatchSchedule):
      _check_batch_schedule(cfg, v, where)
      return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
      raise config_error(
        where,
        v,
        'expected a positive integer, or a batch-size schedule (sweep.batch_ramp(32, factor=2, '
        'at=(0.5, 0.75)), sweep.batch_schedule([(0.0, 32), (0.5, 128)]))',
      )
    if v > n:
      raise config_error(where, v, f'a batch cannot be larger than the training set ({n} examples)')
    if cfg.noise_scale is True and v % 2:
      raise config_error(where, v, 'noise_scale=True needs even batch sizes (two half batches)')
  elif field == 'seed':
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**31:
      raise config_error(where, v, 'expected an integer in [0, 2**31)')
  elif field == 'warmup':
    _positive_finite(where, [v], allow_zero=True, upper=1.0)
  elif field == 'decay_rate':
    _positive_finite(where, [v], upper=1.0)
  elif field in OPTIMIZER_HYPERPARAMETERS:
    if v is not None:
      _positive_finite(where, [v], allow_zero=True, upper=None if field == 'weight_decay' else 1.0)
  elif v is not None and (
    isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
  ):
    raise config_error(
      where, v, 'expected a finite number (a hyperparameter of an optimizer factory)'
    )


def _check_space(cfg: SweepConfig, field: str, sp: spaces.Space) -> None:
  sp.check(field)
  if field in ('optimizer', 'schedule') and not isinstance(sp, spaces.Choice):
    raise config_error(field, sp, f'{field} takes a list or sweep.space.choice([...])')
  if field in ('batch_size', 'seed') and not sp.integer:
    raise config_error(
      field,
      sp,
      f'{field} takes integers: sweep.space.choice([...]) or sweep.space.randint(low, high)',
    )
  if field == 'batch_size' and cfg.noise_scale is True and isinstance(sp, spaces.RandInt):
    raise config_error(
      field, sp, 'noise_scale=True needs even batch sizes: use sweep.space.choice of even sizes'
    )
  for c in sp.candidates():
    try:
      _check_value(cfg, field, c)
    except ConfigError as e:
      accepted = str(e).split(' is invalid: ', 1)[-1].rstrip('.')
      raise config_error(
        field, _Shown(_space_repr(sp)), f'it can take {_label(c)}, which is refused: {accepted}'
      ) from None


def _space_repr(sp: spaces.Space) -> str:
  """A space as config.json records it (callables by their labels, so the text is stable)."""
  if isinstance(sp, spaces.Choice):
    return (
      'choice([' + ', '.join(repr(_label(o)) if callable(o) else repr(o) for o in sp.options) + '])'
    )
  return repr(sp)


def _check_batch_schedule(cfg: SweepConfig, v: batch_schedules.BatchSchedule, where: str) -> None:
  """A batch-size schedule's stages, against the data and the budget."""
  n = cfg.data.n_train
  for b in v.sizes:
    if b > n:
      raise config_error(
        where, v, f'its batch size {b} is larger than the training set ({n} examples)'
      )
    if cfg.noise_scale is True and b % 2:
      raise config_error(where, v, 'noise_scale=True needs even batch sizes (two half batches)')
  if cfg.updates is not None:
    raise config_error(
      where,
      v,
      'a batch-size schedule changes batch size at epoch boundaries: give the budget in '
      f'epochs=, not updates={cfg.updates}',
    )
  epochs = 1 if cfg.epochs is None else cfg.epochs
  if not float(epochs).is_integer():
    raise config_error(
      where, v, f'its stages start at epoch boundaries: epochs={epochs} must be a whole number'
    )
  v.epochs(int(epochs), where)
  if cfg.samples is not None:
    raise config_error(
      where, v, 'a batch-size schedule is a listed value: it is not drawn with samples='
    )
  if any(isinstance(r, schedulers.PBT) for r in schedulers.rules(cfg.scheduler)):
    raise config_error(
      where,
      v,
      'PBT copies runs within a batch size: a batch-size schedule runs with the stopping '
      'rules (SuccessiveHalving, MedianStopping, Patience) or with no scheduler',
    )


def _normalise(cfg: SweepConfig, field: str, value) -> list | spaces.Space:
  """A field's value as a list of valid values, or its space."""
  if isinstance(value, spaces.Space):
    _check_space(cfg, field, value)
    return value
  if field == 'optimizer':
    _refuse_transformation(field, value)  # a NamedTuple: it would read as a list of two values
  values = _as_list(field, value)
  for v in values:
    if isinstance(v, spaces.Space):
      raise config_error(
        field,
        value,
        f'a space is the whole field: {field}=sweep.space.{type(v).__name__.lower()}(...)',
      )
    _check_value(cfg, field, v)
  # Values compare as numbers (1 == 1.0 == np.float64(1.0)), so equal runs are caught.
  try:
    distinct = len(set(values)) == len(values)
  except TypeError:
    distinct = len({id(v) for v in values}) == len(values)
  if not distinct:
    raise config_error(field, value, 'axis values must be distinct')
  return values


def _hyperparameter_names(cfg: SweepConfig) -> list[str]:
  hp = cfg.hyperparameters
  if not isinstance(hp, Mapping):
    raise config_error(
      'hyperparameters', hp, "expected a dict name -> values, e.g. {'clip_norm': [0.5, 1.0]}"
    )
  for name in hp:
    _check_hyperparameter_name('hyperparameters', name)
  return list(hp)


def _check_hyperparameter_name(where: str, name) -> None:
  if not isinstance(name, str) or not name.isidentifier():
    raise config_error(
      where, name, 'a hyperparameter is named by a keyword argument of the optimizer factory'
    )
  if name in OPTIMIZER_HYPERPARAMETERS:
    raise config_error(where, name, f'{name} is a field of its own: set {name}=... instead')
  if name in RESERVED:
    raise config_error(
      where,
      name,
      f'{name!r} names a field or a column of the results table already; '
      'rename the keyword argument of the factory',
    )


def _runs_entries(cfg: SweepConfig) -> list[dict]:
  entries = cfg.runs
  if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
    raise config_error(
      'runs', entries, "expected a list of dicts, e.g. [{'learning_rate': 1e-3, 'batch_size': 32}]"
    )
  if not entries:
    raise config_error('runs', entries, 'expected at least one run')
  out = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, Mapping):
      raise config_error(
        f'runs[{i}]', entry, "expected a dict of fields, e.g. {'learning_rate': 1e-3}"
      )
    out.append(dict(entry))
  return out


def _draw(field: str, sp: spaces.Space, seed: int, n: int) -> list:
  return sp.draw(spaces.stream(seed, field), n)


def check_fields(cfg: SweepConfig) -> Any:
  """Checks the fields that are one value each (data, loss, budgets, sizes, switches,
  objectives); returns the loss in use. The fields that make runs are checked as they
  are expanded (`expand`)."""
  if not isinstance(cfg.data, Dataset):
    raise config_error(
      'data', type(cfg.data).__name__, 'expected a sweep.data.Dataset, e.g. sweep.data.arrays(x, y)'
    )
  check_dataset(cfg.data)  # however it was built: Dataset(...), arrays, a loader
  loss = cfg.loss
  if loss is None:
    loss = 'softmax_cross_entropy' if cfg.data.is_classification else 'mse'
  if isinstance(loss, str):
    _names('loss', [loss], sorted(losses.LOSSES))
  elif not callable(loss):
    raise config_error(
      'loss', loss, 'expected a name (' + ', '.join(sorted(losses.LOSSES)) + ') or a callable'
    )
  loss = adapters.keras_loss(loss)
  if not isinstance(cfg.noise_scale, bool):
    raise config_error('noise_scale', cfg.noise_scale, 'expected True or False')
  _positive_finite('decay_every', [cfg.decay_every], upper=1.0)
  if (
    isinstance(cfg.sample_seed, bool)
    or not isinstance(cfg.sample_seed, numbers.Integral)
    or cfg.sample_seed < 0
  ):
    raise config_error('sample_seed', cfg.sample_seed, 'expected an integer >= 0')
  if cfg.samples is not None and (
    isinstance(cfg.samples, bool)
    or not isinstance(cfg.samples, numbers.Integral)
    or cfg.samples <= 0
  ):
    raise config_error(
      'samples', cfg.samples, 'expected a positive integer: how many configurations to draw'
    )
  if cfg.epochs is not None and cfg.updates is not None:
    raise config_error(
      'epochs',
      cfg.epochs,
      f'give one budget, epochs or updates, not both (updates={cfg.updates!r})',
    )
  epochs = 1 if cfg.epochs is None and cfg.updates is None else cfg.epochs
  if epochs is not None:
    _positive_finite('epochs', [epochs])
  if cfg.updates is not None and (
    isinstance(cfg.updates, bool)
    or not isinstance(cfg.updates, numbers.Integral)
    or cfg.updates <= 0
  ):
    raise config_error('updates', cfg.updates, 'expected a positive integer')
  if not isinstance(cfg.shuffle, bool):
    raise config_error('shuffle', cfg.shuffle, 'expected True or False')
  _positive_finite('divergence_threshold', [cfg.divergence_threshold])
  if cfg.divergence_threshold <= 1:
    raise config_error('divergence_threshold', cfg.divergence_threshold, 'expected a factor > 1')
  for name in ('eval_batch_size', 'train_eval_size'):
    v = getattr(cfg, name)
    if name == 'train_eval_size' and v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
      accepted = 'expected a positive integer' + (
        ', or None to size it to the training' if name == 'train_eval_size' else ''
      )
      raise config_error(name, v, accepted)
  if cfg.train_argument is not None and (
    not isinstance(cfg.train_argument, str) or not cfg.train_argument.isidentifier()
  ):
    raise config_error(
      'train_argument', cfg.train_argument, 'the name of an argument of the model, or None'
    )
  if cfg.rng_argument is not None and (
    not isinstance(cfg.rng_argument, str) or not cfg.rng_argument.isidentifier()
  ):
    raise config_error(
      'rng_argument', cfg.rng_argument, "the name of the model's key argument, or None"
    )
  if cfg.augment is not None and not callable(cfg.augment):
    raise config_error(
      'augment', cfg.augment, 'a function augment(key, x_batch) -> x_batch, or None'
    )
  if cfg.eval_params is not None and not callable(cfg.eval_params):
    raise config_error(
      'eval_params',
      cfg.eval_params,
      'a function eval_params(opt_state, params) -> params, or None',
    )
  if not isinstance(cfg.keep_best, bool):
    raise config_error('keep_best', cfg.keep_best, 'expected True or False')
  if cfg.memory_budget is not None:
    _positive_finite('memory_budget', [cfg.memory_budget])
  if cfg.compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise config_error('compute_dtype', cfg.compute_dtype, 'expected float32, bfloat16 or float16')
  if cfg.num_evals is not None and (
    isinstance(cfg.num_evals, bool)
    or not isinstance(cfg.num_evals, numbers.Integral)
    or cfg.num_evals <= 0
  ):
    raise config_error('num_evals', cfg.num_evals, 'expected a positive integer')
  if not isinstance(cfg.objectives, Mapping) or not cfg.objectives:
    raise config_error('objectives', cfg.objectives, 'expected a dict column -> "min" or "max"')
  if cfg.scheduler is not None:
    schedulers.check(cfg.scheduler)
  return loss


def validate(cfg: SweepConfig) -> Plan:
  """Checks every field and expands the runs into a `Plan`; raises `ConfigError` on any
  mistake.

  Runs in Python on host values only: nothing is traced or compiled (`preflight` checks
  the model, the factories and the schedule callables, without compiling, once the model
  is known).
  """
  return expand(cfg, check_fields(cfg))


def _scheduler_evals(cfg: SweepConfig, num_evals: int, total: dict[int, int]) -> int:
  """The evaluation points of a sweep with a scheduler: on its rungs (successive halving)
  or its intervals (PBT), checked against the budget."""
  for rule in schedulers.rules(cfg.scheduler):
    if isinstance(rule, schedulers.PBT):
      if cfg.num_evals is None:
        num_evals = rule.num_evals(total[min(total)])
    elif isinstance(rule, schedulers.SuccessiveHalving):
      if cfg.num_evals is None:
        num_evals = rule.num_evals(num_evals)
      rule.points(num_evals)
  for rule in schedulers.rules(cfg.scheduler):
    # A rule that can never act before the end is a mistake, not a quiet no-op.
    if isinstance(rule, schedulers.MedianStopping | schedulers.Patience):
      needed = rule.grace + 2 if isinstance(rule, schedulers.MedianStopping) else rule.patience + 2
      if cfg.num_evals is None:
        num_evals = max(num_evals, 10, needed)
      elif num_evals < needed:
        raise config_error(
          'num_evals',
          num_evals,
          f'{type(rule).__name__} acts from evaluation point {needed - 1}, before the last: '
          f'at least {needed} evaluation points (or None to choose)',
        )
  if num_evals > min(total.values()):
    raise config_error(
      'num_evals',
      num_evals,
      f'the scheduler needs {num_evals} evaluation points, and the largest batch size makes '
      f'only {min(total.values())} updates: give more epochs or updates',
    )
  return num_evals


def expand(cfg: SweepConfig, loss: Any) -> Plan:
  """The runs of `cfg` (checked by `check_fields`), its axes and budgets, as a `Plan`."""
  data = cfg.data
  n = data.n_train
  epochs = 1 if cfg.epochs is None and cfg.updates is None else cfg.epochs

  # ---- the fields, each a list of values or a space
  hyper_names = _hyperparameter_names(cfg)
  entries = _runs_entries(cfg) if cfg.runs is not None else None
  if entries is not None:
    # A run may name keyword arguments of its own factory that no other field fills.
    default_opt = cfg.optimizer
    for i, entry in enumerate(entries):
      opt = entry.get('optimizer', default_opt)
      if 'optimizer' in entry:
        _check_value(cfg, 'optimizer', opt, f'runs[{i}][{"optimizer"!r}]')
      for key in entry:
        if key in AXES or key in hyper_names:
          continue
        if (
          isinstance(key, str)
          and callable(opt)
          and not isinstance(opt, optax.GradientTransformation)
        ):
          try:
            accepted = optimizers.signature(opt).accepts(key)
          except ValueError:
            accepted = False
          if accepted:
            _check_hyperparameter_name(f'runs[{i}]', key)
            hyper_names.append(key)
            continue
        known = list(AXES) + hyper_names
        raise config_error(
          f'runs[{i}]',
          _Shown(repr(key)),
          'a run names fields of the sweep: '
          + ', '.join(known)
          + ', or keyword arguments of its optimizer factory',
        )
  position = AXES.index('weight_decay') + 1
  fields = AXES[:position] + tuple(hyper_names) + AXES[position:]
  raw_field = {f: getattr(cfg, f) if f in AXES else cfg.hyperparameters.get(f) for f in fields}
  norm = {f: _normalise(cfg, f, raw_field[f]) for f in fields}
  sampled = [f for f in fields if isinstance(norm[f], spaces.Space)]

  # ---- the runs, as given (callables themselves)
  search: dict[str, Any] = {}
  space = None
  if entries is not None:
    if sampled:
      raise config_error(
        sampled[0],
        _Shown(_space_repr(norm[sampled[0]])),
        'runs= lists every run: give each run its own value instead of a space',
      )
    if cfg.samples is not None:
      raise config_error(
        'samples', cfg.samples, 'runs= lists every run: samples= draws runs from spaces instead'
      )
    for f in fields:
      if len(norm[f]) > 1:
        raise config_error(
          f,
          raw_field[f],
          'with runs=, a field a run does not name takes one value: name it in each run instead',
        )
    raw_runs = []
    for i, entry in enumerate(entries):
      raw = {f: norm[f][0] for f in fields}
      for key, v in entry.items():
        where = f'runs[{i}][{key!r}]'
        if key == 'optimizer':
          _refuse_transformation(where, v)
        if isinstance(v, spaces.Space) or isinstance(v, (list, tuple, np.ndarray)):
          raise config_error(
            where, v, 'a run takes one value per field (a list of values is a list of runs)'
          )
        _check_value(cfg, key, v, where)
        raw[key] = v
      raw_runs.append(raw)
    seen: dict[tuple, int] = {}
    for i, raw in enumerate(raw_runs):
      key = tuple((f, id(v) if callable(v) else v) for f, v in raw.items())
      if key in seen:
        raise config_error(
          f'runs[{i}]', entries[i], f'it repeats runs[{seen[key]}]: the same configuration twice'
        )
      seen[key] = i
    search = {'mode': 'runs'}
  elif sampled:
    if cfg.samples is None:
      raise config_error(
        sampled[0],
        _Shown(_space_repr(norm[sampled[0]])),
        'a sampled field needs samples=N: how many configurations to draw',
      )
    count = int(cfg.samples)
    draws = {f: _draw(f, norm[f], int(cfg.sample_seed), count) for f in sampled}
    # The sampled configurations form one axis, at the place of the first sampled field.
    listed = [f for f in fields if f not in sampled]
    k = sum(1 for f in fields[: fields.index(sampled[0])] if f not in sampled)
    raw_runs = []
    for combo in itertools.product(
      *(norm[f] for f in listed[:k]), range(count), *(norm[f] for f in listed[k:])
    ):
      j = combo[k]
      raw = dict(zip(listed[:k], combo[:k], strict=True))
      raw.update({f: draws[f][j] for f in sampled})
      raw.update(zip(listed[k:], combo[k + 1 :], strict=True))
      raw_runs.append({f: raw[f] for f in fields})
    grid = math.prod(len(norm[f]) for f in listed if f not in ('seed', 'batch_size', 'optimizer'))
    batch_space, opt_space = norm['batch_size'], norm['optimizer']
    space = {
      'samples': count,
      'grid': grid,
      'p_optimizer': 1 / len(opt_space.options) if isinstance(opt_space, spaces.Choice) else 1.0,
      'batch_sizes': tuple(sorted(int(b) for b in batch_space.options))
      if isinstance(batch_space, spaces.Choice) and batch_space.integer
      else None,
    }
    if 'seed' in sampled:  # the seed rows follow the draw: laid out by it, as a grid is
      space = None
    search = {
      'mode': 'sampled',
      'samples': count,
      'sample_seed': int(cfg.sample_seed),
      'spaces': {f: _space_repr(norm[f]) for f in sampled},
    }
  else:
    if cfg.samples is not None:
      raise config_error(
        'samples',
        cfg.samples,
        'samples=N draws from sampled fields, and none is given: '
        'e.g. learning_rate=sweep.space.loguniform(1e-4, 1e-1)',
      )
    raw_runs = [
      dict(zip(fields, combo, strict=True))
      for combo in itertools.product(*(norm[f] for f in fields))
    ]
  if entries is None:
    raw_runs = _conditional(raw_runs, fields, hyper_names)

  ramps = {
    id(r['batch_size']): r['batch_size'].epochs(int(epochs))
    for r in raw_runs
    if isinstance(r['batch_size'], batch_schedules.BatchSchedule)
  }
  batch_sizes = tuple(
    sorted(
      {int(r['batch_size']) for r in raw_runs if id(r['batch_size']) not in ramps}
      | {b for stages in ramps.values() for _, b in stages}
    )
  )
  # A space's batch sizes all have a budget, drawn or not: the layout holds them all, and
  # the number of evaluations does not depend on the draw.
  budgeted = sorted(set(batch_sizes) | set((space or {}).get('batch_sizes') or ()))
  steps_per_epoch = {b: n // b for b in budgeted}
  if cfg.updates is not None:
    total = {b: int(cfg.updates) for b in budgeted}
  else:
    total = {b: max(1, round(epochs * steps_per_epoch[b])) for b in budgeted}
  if cfg.num_evals is None:
    num_evals = min(100, max(1, math.ceil(epochs))) if cfg.updates is None else min(10, cfg.updates)
    if ramps:
      num_evals = int(epochs)  # every stage starts at an evaluation point
  else:
    num_evals = cfg.num_evals
  num_evals = min(num_evals, min(total.values()))
  if cfg.scheduler is not None:
    num_evals = _scheduler_evals(cfg, num_evals, total)
  if ramps:
    _check_stage_points(cfg, ramps, num_evals, total, steps_per_epoch)

  if data.is_classification:
    output_dim = int(data.num_classes)
  else:
    output_dim = int(np.prod(data.y_train.shape[1:]))

  runs = _resolve(
    cfg, fields, hyper_names, raw_runs, total, explicit=entries is not None, ramps=ramps
  )
  custom = tuple(_distinct(r.schedule for r in runs if not isinstance(r.schedule, str)))

  # ---- what the table and config.json show
  axes = {f: _distinct(_display(r.spec[f], r.values, f) for r in runs) for f in fields}
  always = ('learning_rate', 'batch_size', 'seed', 'optimizer', 'schedule')
  swept = tuple(
    f
    for f in fields
    if f in always
    or f in hyper_names
    or len(axes[f]) > 1
    or (f in OPTIMIZER_HYPERPARAMETERS and axes[f] != [None])
  )
  if ramps:
    # The schedule beside the batch size it starts at: 'constant' or its stages.
    axes['batch_schedule'] = _distinct(r.values['batch_schedule'] for r in runs)
    at = swept.index('batch_size') + 1
    swept = swept[:at] + ('batch_schedule',) + swept[at:]
  if entries is not None:
    search['runs'] = [
      {k: (r.values[k] if k in ('optimizer', 'schedule') else v) for k, v in entry.items()}
      for r, entry in zip(runs, entries, strict=True)
    ]

  numeric = table_columns(cfg, axes)
  for col, sense in cfg.objectives.items():
    if sense not in ('min', 'max'):
      raise config_error(f'objectives[{col!r}]', sense, 'expected "min" or "max"')
    if col not in numeric:
      raise config_error(
        'objectives', col, 'a numeric column of the results table: ' + ', '.join(numeric)
      )

  return Plan(
    config=cfg,
    runs=tuple(runs),
    loss=loss,
    axes=axes,
    swept=swept,
    batch_sizes=batch_sizes,
    steps_per_epoch=steps_per_epoch,
    total_updates=total,
    num_evals=num_evals,
    output_dim=output_dim,
    fields=fields,
    groups=tuple(_distinct(r.group for r in runs)),
    custom_schedules=custom,
    search=search,
    space=space,
  )


def _conditional(raw_runs: list[dict], fields, hyper_names: list[str]) -> list[dict]:
  """A grid's or a space's hyperparameter applies to the optimizers that take it: the
  runs of the others take None for it (the table leaves it empty) and are not repeated
  for its values. A field that no optimizer of the sweep takes is left as it is (an error
  in `_resolve`); so are explicit runs, which name their fields on purpose."""
  takers: dict[Any, Callable[[str], bool]] = {}
  for opt in _distinct(r['optimizer'] for r in raw_runs):
    if isinstance(opt, str):
      family = optimizers.FAMILIES.get(opt)
      takers[_identity(opt)] = lambda f, family=family: family is None or f in family.hypers
    else:
      try:
        takers[_identity(opt)] = optimizers.signature(opt).accepts
      except ValueError:
        takers[_identity(opt)] = lambda f: True  # refused with its reason in `_resolve`
  conditional = [
    f
    for f in fields
    if _fills(f, hyper_names)
    and any(r[f] is not None for r in raw_runs)
    and 0 < sum(t(f) for t in takers.values()) < len(takers)
  ]
  if not conditional:
    return raw_runs
  out, seen = [], set()
  for raw in raw_runs:
    takes = takers[_identity(raw['optimizer'])]
    raw = {f: (None if f in conditional and not takes(f) else v) for f, v in raw.items()}
    key = tuple((f, _identity(v)) for f, v in raw.items())
    if key not in seen:
      seen.add(key)
      out.append(raw)
  return out


def _distinct(items) -> list:
  """The distinct items in order of first appearance (callables by identity)."""
  out, seen = [], set()
  for x in items:
    key = _identity(x)
    if key not in seen:
      seen.add(key)
      out.append(x)
  return out


def _identity(x):
  if isinstance(x, tuple):
    return tuple(_identity(v) for v in x)
  if isinstance(x, optimizers.Factory):
    return ('factory', id(x.fn), x.names)
  if callable(x) and not isinstance(x, str):
    return ('callable', id(x))
  return x


def _display(spec_value, values: dict, field: str):
  return values[field] if field in ('optimizer', 'schedule', 'batch_size') else spec_value


def _check_stage_points(
  cfg: SweepConfig, ramps: dict, num_evals: int, total: dict[int, int], per_epoch: dict[int, int]
) -> None:
  """Every stage of every batch-size schedule starts at an evaluation point, the same for
  each of its batch sizes (its state moves between batch groups there)."""
  for stages in ramps.values():
    for epoch, _ in stages[1:]:
      points = set()
      for _, b in stages:
        length = math.ceil(total[b] / num_evals)
        step = epoch * per_epoch[b]
        points.add(step / length if length * num_evals == total[b] else None)
      if len(points) != 1 or None in points or not next(iter(points)).is_integer():
        raise config_error(
          'num_evals',
          num_evals if cfg.num_evals is not None else _Shown(f'{num_evals} (the default)'),
          f'a batch-size schedule changes batch size at epoch {epoch}, which must be an '
          f'evaluation point of each of its batch sizes: num_evals={cfg.epochs or 1} (one per '
          'epoch) always is',
        )


def _labels(callables: list, taken: set[str]) -> dict[int, str]:
  """A distinct readable label for each callable (by id), none equal to a name in `taken`."""
  out, used = {}, set(taken)
  for fn in callables:
    base = optimizers.label(fn)
    name, k = base, 2
    while name in used:
      name, k = f'{base} #{k}', k + 1
    used.add(name)
    out[id(fn)] = name
  return out


def _resolve(
  cfg, fields, hyper_names, raw_runs, total, *, explicit: bool, ramps: dict | None = None
) -> list[Run]:
  """Each raw run as a `Run`: the optimizer and its injected hyperparameters, the schedule,
  the values the table shows."""
  factories = _distinct(r['optimizer'] for r in raw_runs if not isinstance(r['optimizer'], str))
  scheds = _distinct(r['schedule'] for r in raw_runs if not isinstance(r['schedule'], str))
  opt_labels = _labels(
    factories, {r['optimizer'] for r in raw_runs if isinstance(r['optimizer'], str)}
  )
  sched_labels = _labels(
    scheds, {r['schedule'] for r in raw_runs if isinstance(r['schedule'], str)}
  )
  signatures = {id(fn): optimizers.signature(fn) for fn in factories}
  names_of = {id(fn): [] for fn in factories}  # per factory: every name any of its runs fills
  for r in raw_runs:
    if not isinstance(r['optimizer'], str):
      names = names_of[id(r['optimizer'])]
      names.extend(
        h for h in fields if _fills(h, hyper_names) and r[h] is not None and h not in names
      )
  ordered = {k: [h for h in fields if h in v] for k, v in names_of.items()}

  # Per named optimizer, the hyperparameters some run sets: those are injected (in every
  # run of that optimizer, so that its runs share one program); the others stay fixed.
  injected: dict[str, set[str]] = {}
  for raw in raw_runs:
    if isinstance(raw['optimizer'], str):
      injected.setdefault(raw['optimizer'], set()).update(
        k for k in OPTIMIZER_HYPERPARAMETERS if raw[k] is not None
      )
  runs = []
  for i, raw in enumerate(raw_runs):
    field = (lambda f, i=i: f'runs[{i}][{f!r}]') if explicit else (lambda f: f)
    opt = raw['optimizer']
    values = dict(raw)
    if isinstance(opt, str):
      fam = optimizers.FAMILIES[opt]
      for name in OPTIMIZER_HYPERPARAMETERS:
        if raw[name] is not None and name not in fam.hypers:
          takers = optimizers.families_accepting(name)
          shown = raw[name] if explicit else getattr(cfg, name)
          raise config_error(
            field(name),
            shown,
            f'optimizer {opt!r} takes no {name}; it applies to '
            + ', '.join(takers)
            + ', and to optimizer factories that take it',
          )
      for name in hyper_names:
        if raw[name] is not None:
          shown = raw[name] if explicit else cfg.hyperparameters.get(name)
          raise config_error(
            field(name) if explicit else f'hyperparameters[{name!r}]',
            shown,
            f'optimizer {opt!r} takes no {name}: hyperparameters= fills keyword arguments '
            'of optimizer factories',
          )
      for name in OPTIMIZER_HYPERPARAMETERS:
        if name not in fam.hypers:
          values[name] = None
        elif values[name] is None:
          values[name] = fam.hypers[name]
      # Only what the sweep sets is injected (traced, float32); the defaults stay Python
      # floats inside optax, so that `adam` is exactly `optax.adam(lr)` (1 - float32(0.999)
      # is 0.99998713e-3: a learning rate 6.4e-6 larger in effect).
      hypers = {
        k: float(values[k])
        for k in OPTIMIZER_HYPERPARAMETERS
        if k in injected[opt] and values[k] is not None
      }
      family = opt
    else:
      sig = signatures[id(opt)]
      label = opt_labels[id(opt)]
      for name in fields:
        if _fills(name, hyper_names) and raw[name] is not None and not sig.accepts(name):
          shown = (
            raw[name]
            if explicit
            else (getattr(cfg, name) if name in AXES else cfg.hyperparameters.get(name))
          )
          where = field(name) if explicit or name in AXES else f'hyperparameters[{name!r}]'
          raise config_error(
            where,
            shown,
            f'the optimizer factory {label!r} takes no {name}; its keyword arguments are '
            + (', '.join(sig.keywords) or 'none'),
          )
      hypers = {}
      for name in ordered[id(opt)]:
        v = raw[name]
        if v is None:
          default = sig.keywords.get(name, optimizers.REQUIRED)
          if isinstance(default, numbers.Real) and not isinstance(default, bool):
            v = values[name] = float(default)
          else:
            continue  # a default that is no number (None) stays the factory's own
        hypers[name] = float(v)
      for name in sig.required():
        if name not in hypers:
          how = f'set {name}=...' if name in AXES else f'give hyperparameters={{{name!r}: [...]}}'
          raise config_error(
            field('optimizer'),
            _Shown(label),
            f'the factory takes {name} and nothing fills it: {how}',
          )
      for name in OPTIMIZER_HYPERPARAMETERS:
        if name not in hypers:
          values[name] = None
      family = optimizers.Factory(opt, tuple(hypers), label)
      values['optimizer'] = label
    sched = raw['schedule']
    stages = (ramps or {}).get(id(raw['batch_size']), ())
    if stages:
      values['batch_size'] = b = stages[0][1]
      values['batch_schedule'] = raw['batch_size'].label
      ends = [e for e, _ in stages[1:]] + [int(cfg.epochs or 1)]
      run_total = sum(
        (end - epoch) * (cfg.data.n_train // size)
        for (epoch, size), end in zip(stages, ends, strict=True)
      )
    else:
      b = int(raw['batch_size'])
      if ramps:
        values['batch_schedule'] = 'constant'
      run_total = total[b]
    if isinstance(sched, str):
      try:
        schedules.make_params(
          sched,
          float(raw['learning_rate']),
          run_total,
          decay_rate=raw['decay_rate'],
          decay_every=cfg.decay_every,
          warmup=raw['warmup'],
        )
      except ValueError as e:
        where, value = (
          (field('warmup'), raw['warmup'])
          if sched == 'warmup_cosine'
          else (field('schedule'), sched)
        )
        raise config_error(
          where,
          value,
          f'{e} (schedule {sched!r} at batch size {b}, whose runs make {run_total} updates)',
        ) from None
    else:
      values['schedule'] = sched_labels[id(sched)]
    for h in hyper_names:
      values.setdefault(h, None)
    runs.append(
      Run(
        index=i,
        values=values,
        total_updates=run_total,
        family=family,
        schedule=sched,
        hypers=hypers,
        spec=dict(raw),
        stages=stages,
      )
    )
  return runs


def _fills(name: str, hyper_names: list[str]) -> bool:
  """Whether field `name` fills a keyword argument of an optimizer."""
  return name in OPTIMIZER_HYPERPARAMETERS or name in hyper_names


def run_fields(plan: Plan, run: Run) -> dict[str, Any]:
  """The fields that make `run` a sweep of its own:
  `plan.config.replace(**run_fields(plan, run))`."""
  out = {f: run.spec[f] for f in AXES}
  out['hyperparameters'] = {
    h: run.spec[h] for h in plan.fields if h not in AXES and run.spec[h] is not None
  }
  out.update(runs=None, samples=None)
  return out


def axis_columns(table_columns_: Sequence[str], config: Mapping | None = None) -> list[str]:
  """The columns of a results table that hold hyperparameters: the axes, and the factories'
  hyperparameters recorded in `config['axes']` (config.json), in the sweep's order."""
  recorded = list((config or {}).get('axes') or {})
  extra = [a for a in recorded if a not in AXES and a != 'batch_schedule']
  position = AXES.index('weight_decay') + 1
  order = list(AXES[:position]) + extra + list(AXES[position:])
  # A sweep with batch-size schedules (`sweep.batch_ramp`): beside the size each run starts at.
  order.insert(order.index('batch_size') + 1, 'batch_schedule')
  return [a for a in order if a in table_columns_]


_MULTISTEPS = (
  'optax.MultiSteps (gradient accumulation) is not supported: the sweep counts, schedules and '
  'checks divergence per call of the optimizer, so MultiSteps(opt, k) would count k '
  'micro-steps as k updates and run the schedule per micro-step; sweep batch_size=k*B with '
  'opt itself instead (the same mean gradient per update for a model without batch statistics)'
)
_LOOKAHEAD = (
  'optax.lookahead is not supported: it takes its parameters as optax.LookaheadParams (fast '
  "and slow), and the sweep trains and evaluates the model's own parameters"
)


def _takes_lookahead_params(made: optax.GradientTransformation, params: Any) -> bool:
  """Whether `made` steps on `optax.LookaheadParams` and not on the parameters themselves
  (an `optax.lookahead`)."""
  import jax

  try:
    both = optax.LookaheadParams(params, params)
    jax.eval_shape(lambda p: made.update(p.fast, made.init(p), p), both)
  except Exception:
    return False
  try:
    jax.eval_shape(lambda p: made.update(p, made.init(p), p), params)
  except Exception:
    return True
  return False


def _check_learns(family: optimizers.Factory, run: Run, shapes: Any) -> None:
  """Refuses a factory whose updates never move the parameters at any learning rate (an
  `optax.inject_hyperparams(...)` inside it keeps the learning rate it was built with), or
  whose state holds gradient accumulation (`MultiSteps(...).gradient_transformation()`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  opt_state = jax.eval_shape(optimizers.make(family, run.hypers).init, params)
  if optimizers.find_states(opt_state, optax.MultiStepsState):
    raise config_error('optimizer', _Shown(family.label), _MULTISTEPS)
  lr = float(run.values['learning_rate'])
  hypers = {k: jnp.float32(v) for k, v in run.hypers.items()}
  moved = optimizers.probe(family, hypers, params, jnp.array([lr, 2 * lr], jnp.float32))
  leaves = [np.asarray(a) for a in jax.tree.leaves(moved)]
  if any(np.any(a != 0) for a in leaves):
    return  # it moves (a scale-free optimizer such as cocob may move alike at both rates)
  # Its own state (inside the sweep's injection) holds a second injection.
  nested = optimizers.find_states(
    opt_state.inner_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
  )
  cause = (
    'it holds an optax.inject_hyperparams(...) of its own, which keeps the learning rate it '
    'was built with (0 at init) whatever the sweep sets: pass the optax factory itself (e.g. '
    'optimizer=optax.adam), the sweep injects the hyperparameters'
    if nested
    else 'check that the factory builds its optimizer from its learning_rate argument'
  )
  raise config_error(
    'optimizer',
    _Shown(family.label),
    f'it trains nothing: three updates at learning rates {lr:g} and {2 * lr:g} leave the '
    f'parameters where they were; {cause}',
  )


def check_callables(plan: Plan, model: Any) -> None:
  """Traces every optimizer factory and schedule callable of `plan` (with `jax.eval_shape`,
  compiling nothing) and raises `ConfigError` for one that fails or returns the wrong thing."""
  import jax
  import jax.numpy as jnp

  f32 = jax.ShapeDtypeStruct((), jnp.float32)
  factories = [g for g in plan.groups if isinstance(g[0], optimizers.Factory)]
  params = model.initial_shapes()[0] if factories else None
  for family, names in factories:
    run = next(r for r in plan.runs if r.group == (family, names))
    lr = float(run.values['learning_rate'])
    shown = ', '.join([repr(lr)] + [f'{k}={v!r}' for k, v in run.hypers.items()])
    try:
      made = family.fn(lr, **run.hypers)
    except Exception as e:  # the researcher's code: report it as theirs
      raise config_error(
        'optimizer', _Shown(family.label), f'factory({shown}) failed: {type(e).__name__}: {e}'
      ) from e
    if isinstance(made, optax.MultiSteps):
      raise config_error('optimizer', _Shown(family.label), _MULTISTEPS)
    if not isinstance(made, optax.GradientTransformation):
      raise config_error(
        'optimizer',
        _Shown(family.label),
        f'a factory must return an optax.GradientTransformation; factory({shown}) returned '
        f'{type(made).__name__}',
      )

    def step(p, hp, lr, family=family):
      opt = optimizers.make(family, hp)
      state = optimizers.with_learning_rate(opt.init(p), lr)
      updates, _ = opt.update(p, state, p)
      return updates

    try:
      out = jax.eval_shape(step, params, {k: f32 for k in names}, f32)
    except Exception as e:
      if _takes_lookahead_params(made, params):
        raise config_error('optimizer', _Shown(family.label), _LOOKAHEAD) from e
      raise config_error(
        'optimizer',
        _Shown(family.label),
        f'it fails with its learning rate and hyperparameters traced ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}); they are traced arrays so that one program '
        'serves every '
        'value: compute with them in jnp, not in a Python if or float()',
      ) from e
    if jax.tree.structure(out) != jax.tree.structure(params):
      raise config_error(
        'optimizer', _Shown(family.label), 'its updates must have the structure of the parameters'
      )
    _check_learns(family, run, params)

  for fn in plan.custom_schedules:
    users = [r for r in plan.runs if r.schedule is fn]
    label = users[0].values['schedule']
    for total in sorted({r.total_updates for r in users}):
      try:
        out = jax.eval_shape(
          lambda lr, c, fn=fn, total=total: schedules.custom_value(fn, lr, total, c),
          f32,
          jax.ShapeDtypeStruct((), jnp.int32),
        )
      except Exception as e:
        raise config_error(
          'schedule',
          _Shown(label),
          f'schedule(learning_rate, total_updates={total}) failed with the learning rate traced '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); expected an optax '
          'schedule '
          '(a function of the update count) or a number, computed with jnp',
        ) from e
      if out.shape != ():
        raise config_error(
          'schedule',
          _Shown(label),
          f'schedule(learning_rate, total_updates={total})(count) must be a scalar; it has shape '
          f'{out.shape}',
        )
