"""The sweep configuration, its validation, and its expansion into runs.

Which settings compile and which are data:
- *data* (any values, no new compile): learning_rate, seed, schedule, warmup,
  decay_rate, momentum, b1, b2, weight_decay, divergence_threshold.
- *structure* (a new program per distinct combination): the model, the loss, the
  optimizer family (each family is its own compile group), the set of batch sizes,
  the budget in updates per segment, the dataset's shapes, and the run-axis width.
  The run-axis width is rounded up to a power of two, so most changes in the number
  of values (3 -> 4 learning rates, say) reuse the program too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kernels import losses, optimizers, schedules
from sweep import adapters
from sweep.data import Dataset
from sweep.errors import config_error

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

DEFAULT_OBJECTIVES = {'final_val_loss': 'min', 'updates': 'min'}


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A grid of training runs: the product of every axis given as a list.

  Attributes:
    model: `(init_fn, apply_fn)` with `init_fn(key) -> params` and
      `apply_fn(params, x_batch) -> predictions`; or a `flax.linen.Module` (with a
      `train` argument: trained with train=True, batch statistics carried, dropout
      keyed; see `train_argument`); or a `flax.nnx.Module` class (each seed initialises
      it) or instance (its values are every seed's start); or an equinox Module or a
      Keras 3 model (JAX backend); or a model of `sweep.models` sized to the data.
      See `sweep.adapters`.
    data: a `sweep.data.Dataset`, e.g. `sweep.data.arrays(x, y, x_val, y_val)`.
    loss: a name in `kernels.losses.LOSSES` or `callable(predictions, targets)`
      returning the per-example loss. None picks softmax_cross_entropy for integer
      labels and mse otherwise.
    optimizer: a name or list of names: sgd, momentum, nesterov, adam, adamw,
      rmsprop, adagrad, lion. Each name is a compile group.
    learning_rate: the initial (or peak) learning rate; a number or a list.
    batch_size: a number or a list.
    seed: fixes a run's init key and its data order; a number or a list. Seed s
      initialises with `jax.random.fold_in(jax.random.key(s), 0)`; with shuffle, its
      epoch e reads the training set in the order
      `jax.random.permutation(jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 1), e), n)`.
      A run with batch size B takes consecutive slices of B of that order and drops
      the last `n % B` examples of each epoch (different ones each epoch when shuffled).
    schedule: constant, exponential, step, cosine, warmup_cosine, linear, onecycle;
      a name or a list. Every schedule counts the run's own updates.
    warmup: warmup_cosine's warmup, as a fraction of the run's updates.
    decay_rate: exponential decays to `decay_rate * lr` at the end of the run; step
      multiplies the rate by `decay_rate` every `decay_every` of the run's updates.
    decay_every: step's period as a fraction of the run's updates.
    momentum, b1, b2, weight_decay: optimizer hyperparameters; None keeps optax's
      default of each optimizer. Setting one an optimizer does not take is an error.
    epochs: budget in passes over the training set (a run with batch size B makes
      round(epochs * (n // B)) updates). Give either epochs or updates; with
      neither, one epoch.
    updates: budget in updates, the same for every run.
    shuffle: a new per-seed permutation every epoch; False keeps the data order.
    num_evals: evaluation points after the start (segments); None: once per epoch
      for an epoch budget (at most 100), 10 for an updates budget.
    divergence_threshold: a run is frozen and marked diverged when a batch loss is
      NaN/inf or exceeds this multiple of its first batch loss.
    eval_batch_size: examples per evaluation chunk.
    train_eval_size: size of the fixed random subset of the training set on which
      train metrics are measured at each evaluation point.
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
    train_argument: the name of the argument of a linen module's `__call__` that switches
      training on (`train`, found by itself, is the flax examples' convention; e.g.
      'training', or 'deterministic', which is passed the opposite). The engine passes it
      True while training (dropout on, batch statistics updated) and False at every
      evaluation. A module whose call takes a switch-like argument other than `train`
      is refused until it is named here.
    augment: `augment(key, x_batch) -> x_batch`, pure and jittable, applied to every
      training batch (never at evaluation), e.g. random crops and flips. Its key for
      a seed's update t (counted from 0) is
      `jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), t)`, so the runs
      of a seed see the same augmented batches. The model's own randomness (dropout)
      uses stream 2 the same way: `fold_in(fold_in(key(seed), 2), t)`.
    name: a label for the sweep.
  """

  model: Any
  data: Dataset
  loss: str | Callable | None = None
  optimizer: str | Sequence[str] = 'adam'
  learning_rate: float | Sequence[float] = 1e-3
  batch_size: int | Sequence[int] = 32
  seed: int | Sequence[int] = 0
  schedule: str | Sequence[str] = 'constant'
  warmup: float | Sequence[float] = 0.1
  decay_rate: float | Sequence[float] = 0.1
  decay_every: float = 1 / 3
  momentum: float | Sequence[float] | None = None
  b1: float | Sequence[float] | None = None
  b2: float | Sequence[float] | None = None
  weight_decay: float | Sequence[float] | None = None
  epochs: float | None = None
  updates: int | None = None
  shuffle: bool = True
  num_evals: int | None = None
  divergence_threshold: float = 100.0
  eval_batch_size: int = 1024
  train_eval_size: int = 4096
  objectives: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_OBJECTIVES))
  compute_dtype: str = 'float32'
  memory_budget: float | None = None
  noise_scale: bool = False
  keep_best: bool = False
  train_argument: str | None = None
  augment: Callable | None = None
  name: str = 'sweep'

  def replace(self, **changes) -> SweepConfig:
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: its index in the table and its resolved hyperparameters."""

  index: int
  values: dict[str, Any]  # every axis, resolved (optimizer defaults filled in)
  total_updates: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated config, expanded: the runs and the settings that shape the program."""

  config: SweepConfig
  runs: tuple[Run, ...]
  loss: str | Callable
  axes: dict[str, list]  # the axis values as given, normalised to lists
  swept: tuple[str, ...]  # axes with more than one value or set by the user
  batch_sizes: tuple[int, ...]
  steps_per_epoch: dict[int, int]
  total_updates: dict[int, int]
  num_evals: int
  output_dim: int


def _as_list(field: str, value) -> list:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
    values = [value]
  else:
    values = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
  if not values:
    raise config_error(field, value, 'an axis needs at least one value')
  return values


def _positive_finite(field: str, values: list, *, allow_zero: bool = False, upper: float | None = None):
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


# Numeric columns every results table has, and those of classification losses.
NUMERIC_COLUMNS = (
    'updates', 'examples', 'final_batch_loss', 'final_train_loss', 'final_val_loss', 'best_val_loss',
    'best_eval', 'seconds', 'generalization_gap', 'best_val_epoch', 'best_val_eval', 'val_rise',
)
ACCURACY_COLUMNS = ('final_train_accuracy', 'final_val_accuracy', 'best_val_accuracy')


def table_columns(cfg: SweepConfig, axes: dict[str, list]) -> list[str]:
  """The numeric columns the results table of `cfg` will have (objectives pick from these)."""
  numeric_axes = [a for a in AXES if a not in ('optimizer', 'schedule') and axes[a] != [None]]
  columns = numeric_axes + list(NUMERIC_COLUMNS)
  loss = cfg.loss if cfg.loss is not None else ('softmax_cross_entropy' if cfg.data.is_classification else 'mse')
  if isinstance(loss, str) and loss in losses.CLASSIFICATION:
    columns += list(ACCURACY_COLUMNS)
  if cfg.noise_scale:
    columns += ['noise_scale']
  return columns


def validate(cfg: SweepConfig) -> Plan:
  """Checks every field and expands the grid; raises `ConfigError` on any mistake.

  Runs in Python on host values only: nothing is traced or compiled.
  """
  if not isinstance(cfg.data, Dataset):
    raise config_error('data', type(cfg.data).__name__, 'expected a sweep.data.Dataset, e.g. sweep.data.arrays(x, y)')
  data = cfg.data
  n = data.n_train

  loss = cfg.loss
  if loss is None:
    loss = 'softmax_cross_entropy' if data.is_classification else 'mse'
  if isinstance(loss, str):
    _names('loss', [loss], sorted(losses.LOSSES))
  elif not callable(loss):
    raise config_error('loss', loss, 'expected a name (' + ', '.join(sorted(losses.LOSSES)) + ') or a callable')
  loss = adapters.keras_loss(loss)

  axes = {name: _as_list(name, getattr(cfg, name)) for name in AXES}
  _names('optimizer', axes['optimizer'], list(optimizers.FAMILIES))
  _names('schedule', axes['schedule'], list(schedules.SCHEDULES))
  _positive_finite('learning_rate', axes['learning_rate'])
  _positive_finite('warmup', axes['warmup'], allow_zero=True, upper=1.0)
  _positive_finite('decay_rate', axes['decay_rate'], upper=1.0)
  _positive_finite('decay_every', [cfg.decay_every], upper=1.0)
  for v in axes['batch_size']:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
      raise config_error('batch_size', v, 'expected a positive integer')
    if v > n:
      raise config_error('batch_size', v, f'a batch cannot be larger than the training set ({n} examples)')
  for v in axes['seed']:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**31:
      raise config_error('seed', v, 'expected an integer in [0, 2**31)')
  for name in optimizers.HYPERPARAMETERS:
    if axes[name] == [None]:
      continue
    _positive_finite(name, axes[name], allow_zero=True, upper=None if name == 'weight_decay' else 1.0)
    refusing = [o for o in axes['optimizer'] if name not in optimizers.FAMILIES[o].hypers]
    if refusing:
      takers = optimizers.families_accepting(name)
      raise config_error(
          name, getattr(cfg, name),
          f'optimizer {refusing[0]!r} takes no {name}; it applies to ' + ', '.join(takers),
      )
  for name in AXES:
    # Values compare as numbers (1 == 1.0 == np.float64(1.0)), so equal runs are caught.
    if len(set(axes[name])) != len(axes[name]):
      raise config_error(name, getattr(cfg, name), 'axis values must be distinct')

  if cfg.epochs is not None and cfg.updates is not None:
    raise config_error('epochs', cfg.epochs, f'give one budget, epochs or updates, not both (updates={cfg.updates!r})')
  epochs = 1 if cfg.epochs is None and cfg.updates is None else cfg.epochs
  if epochs is not None:
    _positive_finite('epochs', [epochs])
  if cfg.updates is not None and (
      isinstance(cfg.updates, bool) or not isinstance(cfg.updates, numbers.Integral) or cfg.updates <= 0
  ):
    raise config_error('updates', cfg.updates, 'expected a positive integer')
  if not isinstance(cfg.shuffle, bool):
    raise config_error('shuffle', cfg.shuffle, 'expected True or False')
  _positive_finite('divergence_threshold', [cfg.divergence_threshold])
  if cfg.divergence_threshold <= 1:
    raise config_error('divergence_threshold', cfg.divergence_threshold, 'expected a factor > 1')
  for name in ('eval_batch_size', 'train_eval_size'):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
      raise config_error(name, v, 'expected a positive integer')
  if cfg.train_argument is not None and (not isinstance(cfg.train_argument, str) or not cfg.train_argument.isidentifier()):
    raise config_error('train_argument', cfg.train_argument, 'the name of an argument of the model, or None')
  if cfg.augment is not None and not callable(cfg.augment):
    raise config_error('augment', cfg.augment, 'a function augment(key, x_batch) -> x_batch, or None')
  if not isinstance(cfg.keep_best, bool):
    raise config_error('keep_best', cfg.keep_best, 'expected True or False')
  if not isinstance(cfg.noise_scale, bool):
    raise config_error('noise_scale', cfg.noise_scale, 'expected True or False')
  if cfg.noise_scale:
    for b in axes['batch_size']:
      if b % 2:
        raise config_error('batch_size', b, 'noise_scale=True needs even batch sizes (two half batches)')
  if cfg.memory_budget is not None:
    _positive_finite('memory_budget', [cfg.memory_budget])
  if cfg.compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise config_error('compute_dtype', cfg.compute_dtype, 'expected float32, bfloat16 or float16')
  if not isinstance(cfg.objectives, Mapping) or not cfg.objectives:
    raise config_error('objectives', cfg.objectives, 'expected a dict column -> "min" or "max"')
  columns = table_columns(cfg, axes)
  for col, sense in cfg.objectives.items():
    if sense not in ('min', 'max'):
      raise config_error(f'objectives[{col!r}]', sense, 'expected "min" or "max"')
    if col not in columns:
      raise config_error('objectives', col, 'a numeric column of the results table: ' + ', '.join(columns))

  batch_sizes = tuple(sorted(axes['batch_size']))
  steps_per_epoch = {b: n // b for b in batch_sizes}
  if cfg.updates is not None:
    total = {b: int(cfg.updates) for b in batch_sizes}
  else:
    total = {b: max(1, round(epochs * steps_per_epoch[b])) for b in batch_sizes}
  if cfg.num_evals is None:
    num_evals = min(100, max(1, math.ceil(epochs))) if cfg.updates is None else min(10, cfg.updates)
  else:
    num_evals = cfg.num_evals
    if isinstance(num_evals, bool) or not isinstance(num_evals, numbers.Integral) or num_evals <= 0:
      raise config_error('num_evals', num_evals, 'expected a positive integer')
  num_evals = min(num_evals, min(total.values()))

  if data.is_classification:
    output_dim = int(data.num_classes)
  else:
    output_dim = int(np.prod(data.y_train.shape[1:]))

  runs = []
  for i, combo in enumerate(itertools.product(*(axes[a] for a in AXES))):
    values = dict(zip(AXES, combo, strict=True))
    defaults = optimizers.FAMILIES[values['optimizer']].hypers
    for name in optimizers.HYPERPARAMETERS:
      if name not in defaults:
        values[name] = None
      elif values[name] is None:
        values[name] = defaults[name]
    runs.append(Run(index=i, values=values, total_updates=total[values['batch_size']]))

  swept = tuple(
      a for a in AXES
      if len(axes[a]) > 1 or a in ('learning_rate', 'batch_size', 'seed', 'optimizer', 'schedule')
      or (a in optimizers.HYPERPARAMETERS and axes[a] != [None])
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
  )
