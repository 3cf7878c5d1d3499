"""Checks of a planned sweep that need its runs, made before anything compiles.

`sweep.config.validate` checks each field alone; these check what only the expanded
plan shows: each run's schedule against its own number of updates, and the objectives
against the columns this sweep's table will really have.
"""

from __future__ import annotations

from kernels import losses, schedules
from sweep.config import ACCURACY_COLUMNS, DEFAULT_OBJECTIVES, NUMERIC_COLUMNS, Plan
from sweep.errors import config_error

# Columns of the results table that need a validation set.
VALIDATION_COLUMNS = (
    'final_val_loss', 'best_val_loss', 'best_eval', 'final_val_accuracy', 'best_val_accuracy',
    'generalization_gap', 'best_val_eval', 'best_val_epoch', 'val_rise',
)


def check(plan: Plan) -> None:
  """Raises `ConfigError` for a schedule a run cannot follow or an objective its table
  will not have."""
  check_schedules(plan)
  check_objectives(plan)


def check_schedules(plan: Plan) -> None:
  """Every run's built-in schedule is buildable for the run's own updates (a warmup that
  leaves no step to decay is refused here, not in the middle of `sweep.run`)."""
  cfg = plan.config
  seen = set()
  for run in plan.runs:
    v = run.values
    name = v.get('schedule')
    if not isinstance(name, str) or name not in schedules.SCHEDULES:
      continue  # another kind of schedule: checked where it is built
    key = (name, v.get('warmup'), v.get('decay_rate'), run.total_updates)
    if key in seen:
      continue
    seen.add(key)
    try:
      schedules.make_params(
          name, v['learning_rate'], run.total_updates,
          decay_rate=v['decay_rate'], decay_every=cfg.decay_every, warmup=v['warmup'],
      )
    except ValueError as e:
      field, value = ('warmup', v['warmup']) if name == 'warmup_cosine' else ('schedule', name)
      raise config_error(
          field, value,
          f'{e} (schedule {name!r} at batch size {v["batch_size"]}, whose runs make {run.total_updates} updates)',
      ) from None


def table_columns(plan: Plan) -> list[str]:
  """The numeric columns the results table of `plan` will have."""
  cfg = plan.config
  columns = [a for a in plan.swept if a not in ('optimizer', 'schedule')] + list(NUMERIC_COLUMNS)
  if isinstance(plan.loss, str) and plan.loss in losses.CLASSIFICATION:
    columns += list(ACCURACY_COLUMNS)
  if cfg.noise_scale:
    columns.append('noise_scale')
  if not cfg.data.n_val:
    columns = [c for c in columns if c not in VALIDATION_COLUMNS]
  return columns


def check_objectives(plan: Plan) -> None:
  """The objectives name columns this sweep's table will have (without a validation set
  the default objectives fall back to the training loss)."""
  cfg = plan.config
  if dict(cfg.objectives) == DEFAULT_OBJECTIVES and not cfg.data.n_val:
    return
  columns = table_columns(plan)
  for column in cfg.objectives:
    if column in columns:
      continue
    if column in VALIDATION_COLUMNS and not cfg.data.n_val:
      reason = 'this sweep has no validation set (data.x_val is None), so its table has no such column'
    else:
      reason = 'this sweep\'s table will have no such column'
    raise config_error('objectives', column, f'{reason}; its numeric columns are ' + ', '.join(columns))
