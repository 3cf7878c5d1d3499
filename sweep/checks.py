"""The checks of a sweep's fields, each made once, in Python on host values (nothing is
traced or compiled).

`check_fields` checks the fields that are one value each; `normalise` and `check_value`
each value of the fields that make runs, as `sweep.expansion` expands them; then come
the checks that need the expansion: the evaluation points a scheduler or a batch-size
schedule needs, each run's built-in schedule against its own number of updates, and the
objectives against the columns the table will have. What needs the model (its outputs,
the optimizer factories and schedule callables traced) is `sweep.preflight`'s.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import optax

from kernels import losses, optimizers, schedules
from sweep import adapters, batch_schedules, columns, schedulers
from sweep import space as spaces
from sweep.columns import AXES
from sweep.data import Dataset
from sweep.data import check as check_dataset
from sweep.errors import ConfigError, config_error

if TYPE_CHECKING:
  from sweep.config import SweepConfig
  from sweep.expansion import Plan


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


# ------------------------------------------------------------- field values ----


class Shown(str):
  """A value shown as written in an error message (no quotes)."""

  def __repr__(self) -> str:
    return str(self)


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


def label(v) -> str:
  if isinstance(v, str):
    return v
  return optimizers.label(v) if callable(v) else repr(v)


def refuse_transformation(field: str, v) -> None:
  if isinstance(v, optax.GradientTransformation):
    raise config_error(field, Shown('<an optax.GradientTransformation>'), _TRANSFORMATION_HINT)


def _takes_two(fn) -> bool:
  try:
    inspect.signature(fn).bind(0.1, 10)
  except TypeError:
    return False
  except ValueError:  # no signature to read (a builtin): let the trace tell
    return True
  return True


def check_value(cfg: SweepConfig, field: str, v, where: str | None = None) -> None:
  """Raises `ConfigError` unless `v` is a valid single value of `field`."""
  where = where or field
  n = cfg.data.n_train
  if field == 'optimizer':
    refuse_transformation(where, v)
    if isinstance(v, str):
      if v not in optimizers.FAMILIES:
        raise config_error(
          where, v, 'expected one of ' + ', '.join(optimizers.FAMILIES) + ', or ' + _FACTORY
        )
    elif callable(v):
      try:
        optimizers.signature(v)
      except ValueError as e:
        raise config_error(where, Shown(label(v)), f'expected {_FACTORY}: {e}') from None
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
          Shown(label(v)),
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
        Shown(label(v)),
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
  elif field in optimizers.HYPERPARAMETERS:
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
      check_value(cfg, field, c)
    except ConfigError as e:
      accepted = str(e).split(' is invalid: ', 1)[-1].rstrip('.')
      raise config_error(
        field, Shown(space_repr(sp)), f'it can take {label(c)}, which is refused: {accepted}'
      ) from None


def space_repr(sp: spaces.Space) -> str:
  """A space as config.json records it (callables by their labels, so the text is stable)."""
  if isinstance(sp, spaces.Choice):
    return (
      'choice([' + ', '.join(repr(label(o)) if callable(o) else repr(o) for o in sp.options) + '])'
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


def normalise(cfg: SweepConfig, field: str, value) -> list | spaces.Space:
  """A field's value as a list of valid values, or its space."""
  if isinstance(value, spaces.Space):
    _check_space(cfg, field, value)
    return value
  if field == 'optimizer':
    refuse_transformation(field, value)  # a NamedTuple: it would read as a list of two values
  values = _as_list(field, value)
  for v in values:
    if isinstance(v, spaces.Space):
      raise config_error(
        field,
        value,
        f'a space is the whole field: {field}=sweep.space.{type(v).__name__.lower()}(...)',
      )
    check_value(cfg, field, v)
  # Values compare as numbers (1 == 1.0 == np.float64(1.0)), so equal runs are caught.
  try:
    distinct = len(set(values)) == len(values)
  except TypeError:
    distinct = len({id(v) for v in values}) == len(values)
  if not distinct:
    raise config_error(field, value, 'axis values must be distinct')
  return values


def hyperparameter_names(cfg: SweepConfig) -> list[str]:
  hp = cfg.hyperparameters
  if not isinstance(hp, Mapping):
    raise config_error(
      'hyperparameters', hp, "expected a dict name -> values, e.g. {'clip_norm': [0.5, 1.0]}"
    )
  for name in hp:
    check_hyperparameter_name('hyperparameters', name)
  return list(hp)


def check_hyperparameter_name(where: str, name) -> None:
  if not isinstance(name, str) or not name.isidentifier():
    raise config_error(
      where, name, 'a hyperparameter is named by a keyword argument of the optimizer factory'
    )
  if name in optimizers.HYPERPARAMETERS:
    raise config_error(where, name, f'{name} is a field of its own: set {name}=... instead')
  if name in RESERVED:
    raise config_error(
      where,
      name,
      f'{name!r} names a field or a column of the results table already; '
      'rename the keyword argument of the factory',
    )


def runs_entries(cfg: SweepConfig) -> list[dict]:
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


def entries_hyperparameters(cfg: SweepConfig, entries: list[dict], names: list[str]) -> list[str]:
  """The keyword arguments of a run's own optimizer factory that `runs=` entries name and
  no other field fills (after `names`); any other key of an entry is refused."""
  found: list[str] = []
  for i, entry in enumerate(entries):
    opt = entry.get('optimizer', cfg.optimizer)
    if 'optimizer' in entry:
      check_value(cfg, 'optimizer', opt, f'runs[{i}][{"optimizer"!r}]')
    for key in entry:
      if key in AXES or key in names or key in found:
        continue
      if (
        isinstance(key, str) and callable(opt) and not isinstance(opt, optax.GradientTransformation)
      ):
        try:
          accepted = optimizers.signature(opt).accepts(key)
        except ValueError:
          accepted = False
        if accepted:
          check_hyperparameter_name(f'runs[{i}]', key)
          found.append(key)
          continue
      raise config_error(
        f'runs[{i}]',
        Shown(repr(key)),
        'a run names fields of the sweep: '
        + ', '.join(list(AXES) + names + found)
        + ', or keyword arguments of its optimizer factory',
      )
  return found


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
  for name in ('eval_batch_size', 'train_eval_size', 'val_eval_size'):
    v = getattr(cfg, name)
    if name != 'eval_batch_size' and v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
      accepted = 'expected a positive integer' + (
        ', or None to size it to the training' if name != 'eval_batch_size' else ''
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


def scheduler_evals(cfg: SweepConfig, num_evals: int, total: dict[int, int]) -> int:
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


def check_stage_points(
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
          num_evals if cfg.num_evals is not None else Shown(f'{num_evals} (the default)'),
          f'a batch-size schedule changes batch size at epoch {epoch}, which must be an '
          f'evaluation point of each of its batch sizes: num_evals={cfg.epochs or 1} (one per '
          'epoch) always is',
        )


def check_schedule(cfg: SweepConfig, raw: dict, name: str, total: int, batch: int, field) -> None:
  """A run's built-in schedule `name` is buildable for its own `total` updates (a warmup
  that leaves no step to decay is refused here, not in the middle of `sweep.run`)."""
  try:
    schedules.make_params(
      name,
      float(raw['learning_rate']),
      total,
      decay_rate=raw['decay_rate'],
      decay_every=cfg.decay_every,
      warmup=raw['warmup'],
    )
  except ValueError as e:
    where, value = (
      (field('warmup'), raw['warmup']) if name == 'warmup_cosine' else (field('schedule'), name)
    )
    raise config_error(
      where,
      value,
      f'{e} (schedule {name!r} at batch size {batch}, whose runs make {total} updates)',
    ) from None


def accumulation(fn, learning_rate: float, hypers: dict, label: str, field) -> int:
  """The batches per parameter update of optimizer factory `fn` (its `optax.MultiSteps`'s k,
  see `optimizers.accumulation`), from one call with a run's values; 1 when the call fails
  (`sweep.preflight` reports that)."""
  try:
    made = fn(learning_rate, **hypers)
  except Exception:
    return 1
  try:
    return optimizers.accumulation(made)
  except ValueError as e:
    raise config_error(field('optimizer'), Shown(label), str(e)) from None


def parameter_updates(
  cfg: SweepConfig, family: optimizers.Factory, stages, batches: int, field
) -> int:
  """The parameter updates of a run of `batches` batches under `optax.MultiSteps(opt, k)`
  (a last partial accumulation updates nothing), or the reason its budget cannot be kept."""
  k, shown = family.every_k, Shown(family.label)
  if cfg.updates is not None:
    raise config_error(
      'updates',
      cfg.updates,
      f'optimizer {family.label} accumulates k={k} batches per parameter update '
      '(optax.MultiSteps) and the updates budget counts batches for every run alike: give the '
      'budget in epochs=',
    )
  if stages:
    raise config_error(
      field('optimizer'),
      shown,
      f'it accumulates k={k} batches per parameter update (optax.MultiSteps), which a batch-size '
      'schedule (sweep.batch_ramp) would cut across: ramp the batch size or accumulate, not both',
    )
  if batches < k:
    raise config_error(
      field('optimizer'),
      shown,
      f'it accumulates k={k} batches per parameter update (optax.MultiSteps) and a run reads '
      f'only {batches} batches: give more epochs',
    )
  return batches // k


def table_columns(plan: Plan) -> list[str]:
  """The numeric columns the results table of `plan` will have (objectives pick from these)."""
  cfg = plan.config
  axes = [a for a in plan.swept if a not in ('optimizer', 'schedule', 'batch_schedule')]
  accuracy = isinstance(plan.loss, str) and plan.loss in losses.CLASSIFICATION
  return columns.numeric(axes, accuracy, bool(cfg.noise_scale), validation=bool(cfg.data.n_val))


def check_objectives(plan: Plan) -> None:
  """The objectives name columns this sweep's table will have, each to "min" or "max"
  (without a validation set the default objectives fall back to the training loss)."""
  cfg = plan.config
  for column, sense in cfg.objectives.items():
    if sense not in ('min', 'max'):
      raise config_error(f'objectives[{column!r}]', sense, 'expected "min" or "max"')
  numeric = table_columns(plan)
  for column in columns.objectives(cfg.objectives, validation=bool(cfg.data.n_val)):
    if column in numeric:
      continue
    if column in columns.VALIDATION and not cfg.data.n_val:
      reason = (
        'this sweep has no validation set (data.x_val is None), so its table has no such column'
      )
    else:
      reason = "this sweep's table will have no such column"
    raise config_error(
      'objectives', column, f'{reason}; its numeric columns are ' + ', '.join(numeric)
    )
