"""Optuna's samplers in batches: the study proposes, the engine trains a batch at once.

    import optuna, sweep
    study = optuna.create_study(direction='minimize', sampler=optuna.samplers.TPESampler())
    cfg = sweep.SweepConfig(model=..., data=...,
                            learning_rate=sweep.space.loguniform(1e-4, 1e-1),
                            batch_size=sweep.space.choice([32, 64, 128]), epochs=3)
    sweep.optuna.optimize(study, cfg, n_trials=64, batch=16)

`optimize` asks the study for `batch` trials at a time (`study.ask`), translating the
config's `sweep.space` distributions into Optuna's, trains them as one sweep (the runs
of the batch given as `runs=`: one program per optimizer and batch size, hyperparameter
values as data), then tells every result. With a scheduler in `cfg`, a run it stopped is
told as pruned, after its intermediate values are reported; a diverged run as failed.
Any sampler works (TPE, CMA-ES, GP, NSGA-II for several objectives), and any storage:
with Optuna's RDB storage, optuna-dashboard and `optuna.visualization` show the sweep.
Optuna is an optional extra: `pip install 'lrbs-sweep[optuna]'`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from sweep import space as spaces
from sweep.config import AXES, SweepConfig
from sweep.errors import config_error


def _distribution(field: str, space: spaces.Space):
  import optuna

  d = optuna.distributions
  if isinstance(space, spaces.LogUniform):
    return d.FloatDistribution(space.low, space.high, log=True), None
  if isinstance(space, spaces.Uniform):
    return d.FloatDistribution(space.low, space.high), None
  if isinstance(space, spaces.RandInt):
    return d.IntDistribution(int(space.low), int(space.high), log=space.log), None
  if isinstance(space, spaces.Choice):
    options = list(space.options)
    plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in options)
    if plain:
      return d.CategoricalDistribution(options), None
    # Factories and schedule callables: Optuna stores their labels; the run gets the object.
    labels = [getattr(v, '__name__', repr(v)) for v in options]
    if len(set(labels)) != len(labels):
      labels = [f'{label}#{i}' for i, label in enumerate(labels)]
    return d.CategoricalDistribution(labels), dict(zip(labels, options, strict=True))
  raise config_error(field, space, 'a sweep.space distribution')


def _spaces(cfg: SweepConfig) -> dict[str, spaces.Space]:
  out = {}
  for f in AXES:
    v = getattr(cfg, f)
    if isinstance(v, spaces.Space):
      out[f] = v
    elif isinstance(v, (list, tuple)) and len(v) > 1:
      raise config_error(
        f, v, 'with sweep.optuna.optimize, a field is one value or a sweep.space distribution'
      )
  for f, v in cfg.hyperparameters.items():
    if isinstance(v, spaces.Space):
      out[f] = v
    elif isinstance(v, (list, tuple)) and len(v) > 1:
      raise config_error(
        f'hyperparameters[{f!r}]', v, 'one value or a sweep.space distribution with Optuna'
      )
  if not out:
    raise config_error(
      'learning_rate',
      cfg.learning_rate,
      'sweep.optuna.optimize searches fields given as sweep.space distributions: '
      'e.g. learning_rate=sweep.space.loguniform(1e-4, 1e-1)',
    )
  return out


def _objectives(study, cfg: SweepConfig, objectives: Sequence[str] | None) -> list[str]:
  wanted = list(objectives) if objectives is not None else list(cfg.objectives)
  directions = [d.name.lower() for d in study.directions]  # 'minimize' / 'maximize'
  wanted = wanted[: len(directions)]
  if len(wanted) != len(directions):
    raise config_error(
      'objectives', objectives, f'one column per direction of the study ({len(directions)})'
    )
  for col, direction in zip(wanted, directions, strict=True):
    sense = cfg.objectives.get(col)
    if sense is not None and {'min': 'minimize', 'max': 'maximize'}[sense] != direction:
      raise config_error(
        'objectives', col, f'the study {direction}s it, the config says {sense!r}: make them agree'
      )
  return wanted


def optimize(
  study,
  cfg: SweepConfig,
  n_trials: int,
  batch: int = 16,
  *,
  objectives: Sequence[str] | None = None,
  workdir: str | None = None,
  progress: bool = False,
) -> list[Any]:
  """Runs `n_trials` trials of `study`, `batch` at a time, each batch one sweep.

  Args:
    study: an `optuna.Study` (any sampler, any storage, one or several directions).
    cfg: the sweep; its searched fields are `sweep.space` distributions, the others
      single values (`samples`, `runs` are set here).
    n_trials: trials in all.
    batch: trials trained at once.
    objectives: the table's columns told to the study, one per direction (default: the
      first of `cfg.objectives`, e.g. final_val_loss).
    workdir: if given, batch k is trained in `workdir/batch-<k>` (resumable).
    progress: show each batch's progress bar.

  Returns:
    The `sweep.Result` of each batch.
  """
  import sweep

  for name, value, low in (('n_trials', n_trials, 1), ('batch', batch, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise config_error(name, value, 'expected a positive integer')
  searched = _spaces(cfg)
  dists = {f: _distribution(f, s) for f, s in searched.items()}
  columns = _objectives(study, cfg, objectives)
  out = []
  for k in range(math.ceil(n_trials / batch)):
    trials = [study.ask() for _ in range(min(batch, n_trials - k * batch))]
    runs = []
    for trial in trials:
      run = {}
      for f, (dist, objects) in dists.items():
        v = _suggest(trial, f, dist)
        run[f] = objects[v] if objects is not None else v
      runs.append(run)
    fixed = {f: getattr(cfg, f) for f in searched if f in AXES}
    plain = cfg.replace(
      runs=runs,
      samples=None,
      hyperparameters={f: v for f, v in cfg.hyperparameters.items() if f not in searched},
      **{f: _single(v) for f, v in fixed.items()},
    )
    path = None if workdir is None else os.path.join(workdir, f'batch-{k:03d}')
    result = sweep.run(plain, path, progress=progress)
    _tell(study, trials, result, columns)
    out.append(result)
  return out


def _suggest(trial, name: str, dist) -> Any:
  """The trial's value of `name`, through the public suggest API."""
  import optuna

  d = optuna.distributions
  if isinstance(dist, d.FloatDistribution):
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
  if isinstance(dist, d.IntDistribution):
    return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
  return trial.suggest_categorical(name, dist.choices)


def _single(space: spaces.Space) -> Any:
  """A placeholder value of a searched field (every run names its own)."""
  if isinstance(space, spaces.Choice):
    return space.options[0]
  return space.low


def _tell(study, trials: list, result, columns: list[str]) -> None:
  import optuna

  table, curves = result.table, result.curves
  metric = 'val_loss' if 'val_loss' in curves else 'train_loss'
  for i, trial in enumerate(trials):
    row = table.loc[i]
    points = curves[curves.run == i].sort_values('eval')
    for step, v in zip(points['updates'], points[metric], strict=True):
      if math.isfinite(v):
        trial.report(float(v), int(step))
    trial.set_user_attr('sweep_run', int(i))
    if row.status == 'stopped':
      study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif row.status == 'diverged':
      study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
      values = [float(row[c]) for c in columns]
      if not all(math.isfinite(v) for v in values):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
      else:
        study.tell(trial, values if len(values) > 1 else values[0])


__all__ = ['optimize']
