"""What a sweep leaves: the results table, the learning curves, each run's parameters."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import textwrap
from typing import Any

import jax
import numpy as np
import pandas as pd

from kernels import optimizers
from sweep import analysis, checkpoints, columns, compile_log, files, lock, pareto
from sweep.expansion import Plan, axis_columns
from sweep.files import atomic_write, write_if_changed  # noqa: F401 - re-exported
from sweep.provenance import environment, resolved_config  # noqa: F401 - re-exported

CURVE_METRICS = columns.CURVES


def objectives(plan: Plan, table: pd.DataFrame) -> dict[str, str]:
  """The config's objectives; the defaults follow the data (without a validation set, the
  training probe's loss), as config.json records them."""
  del table
  return columns.objectives(plan.config.objectives, validation=bool(plan.config.data.n_val))


def tables(
  plan: Plan, points: list[list[dict]], seconds: list[float], extra: list[dict] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
  """The results table and the curves from each run's metrics at its evaluation points.

  Args:
    plan: the sweep.
    points: per run (in table order), its metrics at each evaluation point it reached
      (names of `columns.CURVES` -> scalars; point 0 is before training).
    seconds: per run, its share of the training time.
    extra: per run, more columns of its row (a scheduler's status, rung, lineage).
  """
  rows, curve_rows = [], []
  for i, run in enumerate(plan.runs):
    per_point = []
    for k, point in enumerate(points[i]):
      rec = {'run': i, 'eval': k}
      for name in CURVE_METRICS:
        if name in point:
          rec[name] = np.asarray(point[name]).item()
      rec['updates'] = int(point['updates'])
      # Under optax.MultiSteps a parameter update reads k batches: `batches` counts them.
      rec['examples'], batch = plan.examples(run, int(point.get('batches', rec['updates'])))
      rec['epoch'] = rec['examples'] / plan.config.data.n_train
      if plan.ramps:
        rec['batch_size'] = batch  # the batch size of its last update
      if 'grad_sq_full' in rec:
        rec['noise_scale'] = float(
          analysis.noise_scale(rec['grad_sq_half'], rec['grad_sq_full'], batch // 2, batch)[0]
        )
      per_point.append(rec)
    curve_rows.extend(per_point)
    last = per_point[-1]
    row = {'run': i}
    row.update({a: run.values[a] for a in plan.swept})
    row['status'] = 'ok' if last['alive'] else 'diverged'
    row['updates'] = last['updates']
    row['examples'] = last['examples']
    row['final_batch_loss'] = last.get('batch_loss', np.nan)
    row['final_train_loss'] = last['train_loss']
    if 'train_accuracy' in last:
      row['final_train_accuracy'] = last['train_accuracy']
    if 'val_loss' in last:
      vals = np.array([p['val_loss'] for p in per_point], np.float64)
      finite = np.where(np.isfinite(vals), vals, np.inf)
      best = int(np.argmin(finite))
      row['final_val_loss'] = last['val_loss']
      row['best_val_loss'] = vals[best] if np.isfinite(finite[best]) else np.nan
      row['best_eval'] = best
      if 'val_accuracy' in last:
        row['final_val_accuracy'] = last['val_accuracy']
        row['best_val_accuracy'] = float(np.nanmax([p['val_accuracy'] for p in per_point]))
    if plan.config.noise_scale:
      # Over the second half of training, where the estimate has settled.
      late = [
        p['noise_scale']
        for p in per_point[1:]
        if p['eval'] >= len(per_point) // 2 and 'noise_scale' in p
      ]
      row['noise_scale'] = float(np.nanmedian(late)) if late and np.isfinite(late).any() else np.nan
    row['seconds'] = seconds[i]
    if extra is not None:
      row.update(extra[i])
      if extra[i].get('status') is None:
        row['status'] = 'ok' if last['alive'] else 'diverged'
    rows.append(row)

  table = pd.DataFrame(rows).set_index('run', drop=False)
  table.index.name = None
  curves = pd.DataFrame(curve_rows)
  table = analysis.annotate_overfitting(table, curves)
  table = pareto.annotate(table, objectives(plan, table))
  return table, curves


def _params_fn(run_state, eval_fn=None):
  def params(i: int, best: bool = False, raw: bool = False):
    runs = run_state(i)
    if best and runs.best_params is None:
      raise ValueError('best parameters were not kept: run the sweep with keep_best=True')
    if best:
      return runs.best_params
    if raw:
      return runs.params
    if not optimizers.evaluates_elsewhere(runs.opt_state, eval_fn):
      return runs.params
    return jax.tree.map(np.asarray, optimizers.evaluated(runs.opt_state, runs.params, eval_fn))

  return params


def _state_fn(run_state):
  def state(i: int, best: bool = False):
    runs = run_state(i)
    return runs.best_model_state if best else runs.model_state

  return state


class Result:
  """A finished sweep.

  Attributes:
    table: one row per run (row i = run i): the swept axis values, `status`
      ('ok' or 'diverged'), `updates`, `examples`, the final and best metrics.
    curves: one row per run and evaluation point (point 0 is before training).
    config: the resolved config (a dict, as written to config.json).
    wall_time: seconds the sweep took, compiles included.
    logged: one line per logger of `sweep.run(..., loggers=...)`: where it wrote.
    compiles: the programs `sweep.run` compiled or read from the persistent compilation
      cache, each with its seconds, and their sums (`sweep.compile_log`); None for a
      result read back from a workdir.
  """

  def __init__(
    self,
    table: pd.DataFrame,
    curves: pd.DataFrame,
    config: dict,
    wall_time: float,
    params_fn=None,
    workdir: str | None = None,
    state_fn=None,
    model=None,
    run_state=None,
    eval_fn=None,
  ):
    self.table = table
    self.curves = curves
    self.config = config
    self.wall_time = wall_time
    self._params_fn = params_fn
    self._state_fn = state_fn  # (i, best) -> run i's model state
    self._run_state = run_state  # i -> run i's final `train.RunState` (host arrays)
    self._eval_fn = eval_fn  # the config's eval_params, or None
    if run_state is not None:
      self._params_fn = _params_fn(run_state, eval_fn)
      self._state_fn = _state_fn(run_state)
    self._model = model  # the sweep.adapters.Model, for variables() and model()
    self.workdir = workdir
    self.logged: list[str] = []  # each logger's line, from sweep.run(..., loggers=...)
    self.compiles: dict | None = None  # from sweep.run (sweep.compile_log)

  @classmethod
  def from_training(
    cls,
    plan: Plan,
    trained: list,
    wall_time: float,
    resolved: dict,
    model: Any = None,
    timer: Any = None,
  ) -> Result:
    """The result of a sweep from its trained units (`sweep.units.UnitResult`, in unit order).

    A run's `seconds` is the time it would take alone as `timer` (a `sweep.timing.Timer`)
    measured its batch group; where it measured none, the unit's seconds shared out
    equally over the unit's runs."""
    where: dict[int, tuple[int, int, int, int]] = {}  # run -> (unit, batch group, s, r)
    for c, t in enumerate(trained):
      for g, bg in enumerate(t.unit.groups):
        for s, r in zip(*np.nonzero(bg.slots >= 0), strict=True):
          where[int(bg.slots[s, r])] = (c, g, int(s), int(r))

    points, seconds = [], []
    for i in range(len(plan.runs)):
      c, g, s, r = where[i]
      unit, history = trained[c].unit, trained[c].history
      points.append([{k: v[s, r] for k, v in point[g].items()} for point in history])
      run = plan.runs[i]
      alone = None
      if timer is not None:
        g = plan.groups.index(run.group)
        # The timed step is one batch: under optax.MultiSteps, k of them make an update.
        b = run.values['batch_size']
        alone = timer.seconds(g, b, run.total_updates if run.stages else plan.total_updates[b])
      if alone is None:  # the wall time of the unit, shared out over its runs
        slots = sum(int(np.sum(bg.slots >= 0)) for bg in unit.groups)
        alone = trained[c].seconds / max(1, slots)
      seconds.append(alone)
    table, curves = tables(plan, points, seconds)

    loaded: dict[int, Any] = {}  # the last unit read (a unit kept on disk is read once)

    def run_state(i: int) -> Any:
      c, g, s, r = where[i]
      if c not in loaded:
        loaded.clear()
        loaded[c] = trained[c].final.get()
      return jax.tree.map(lambda a: np.asarray(a[s, r]), loaded[c][g].runs)

    return cls(
      table,
      curves,
      resolved,
      wall_time,
      model=model,
      run_state=run_state,
      eval_fn=plan.config.eval_params,
    )

  def params(self, i: int, best: bool = False, raw: bool = False) -> Any:
    """The final parameters of run `i` (a pytree of numpy arrays), as they were evaluated.

    These are the parameters the optimizer means to be evaluated: the config's
    `eval_params(opt_state, params)` when given; for a schedule-free optimizer
    (`optax.contrib.schedule_free*`, anywhere in a chain)
    `optax.contrib.schedule_free_eval_params(opt_state, params)`; for any other optimizer
    the parameters it trained. The table's and the curves' metrics are theirs.

    Args:
      i: the run (row of the table).
      best: the parameters at the run's best evaluation instead (lowest validation
        loss; needs `keep_best=True`); they too are the evaluated ones.
      raw: the parameters the optimizer trained (a schedule-free optimizer's
        interpolation point), which training would continue from.
    """
    if not 0 <= i < len(self.table):
      raise IndexError(f'run {i} does not exist: the sweep has runs 0..{len(self.table) - 1}')
    if best and raw:
      raise ValueError(
        'best=True gives the parameters evaluated at the best evaluation; the raw ones there '
        'are not kept: ask for one of best or raw'
      )
    if self._params_fn is None:
      raise ValueError('this result holds no parameters')
    if best:
      return self._params_fn(i, best)
    return self._params_fn(i, raw=True) if raw else self._params_fn(i)

  def variables(self, i: int, best: bool = False) -> dict[str, Any]:
    """Run `i`'s whole variables: `{'params': ..., **model_state}`.

    For a flax linen model this is the dict `module.apply(variables, x, train=False)`
    takes (batch statistics under 'batch_stats'); for an nnx model, the parameters and
    the other state as pure dicts (`result.model(i)` gives the module itself).

    Args:
      i: the run (row of the table).
      best: the variables at the run's best evaluation (needs `keep_best=True`).
    """
    params = self.params(i, best)
    if self._state_fn is None:
      if self.workdir is not None:
        return checkpoints.restore_variables(self.workdir, i, best=best)
      return {'params': params}
    state = self._state_fn(i, best)
    if self._model is not None and self._model.variables is not None:
      return self._model.variables(params, state)
    return {'params': params, **({'state': state} if jax.tree.leaves(state) else {})}

  def model(self, i: int, best: bool = False) -> Any:
    """Run `i` as a model of the user's kind: an nnx module holding its state (in
    evaluation mode), an equinox module or a Keras model."""
    if self._model is None or self._model.rebuild is None:
      raise ValueError(
        'result.model(i) rebuilds nnx, equinox and Keras models of a sweep run in this '
        'process; for other models use result.variables(i) or result.params(i)'
      )
    params = self.params(i, best)
    return self._model.rebuild(params, self._state_fn(i, best))

  def best(self, column: str = 'final_val_loss', mode: str = 'min') -> pd.Series:
    """The row of the best run that did not diverge."""
    ok = self.table[self.table.status == 'ok']
    if ok.empty:
      raise ValueError('every run diverged')
    return ok.loc[ok[column].idxmin() if mode == 'min' else ok[column].idxmax()]

  def summary(self, top: int = 5, width: int = 100, verbose: bool = False) -> str:
    """The sweep in a few lines: how many runs, diverged and stopped; what every run shares;
    with several seeds, the best configuration as the report defines it (the lowest seed
    mean, every seed finished); the best `top` runs that ended well, by final validation
    loss (else training loss).

    Args:
      top: how many of the best runs to show.
      width: the widest line of the best runs' table: it shows the axes that vary, the
        status and the objective, then accuracy, best validation loss, updates and the
        Pareto flag while they fit (the line naming what every run shares is whole).
      verbose: every column of the table instead, however wide.
    """
    t = self.table
    col = 'final_val_loss' if 'final_val_loss' in t else 'final_train_loss'
    # An optimizer or schedule shared by every run is said once (a factory's label can be long).
    same = [
      c for c in ('optimizer', 'schedule') if c in t.columns and t[c].nunique(dropna=False) == 1
    ]
    ok = t[t.status == 'ok'].sort_values(col)
    stopped = int((t.status == 'stopped').sum())
    head = (
      f'{len(t)} runs in {self.wall_time:.1f} s; {int((t.status == "diverged").sum())} diverged'
    )
    lines = [head + (f'; {stopped} stopped early by the scheduler.' if stopped else '.')]
    compiled = compile_log.summary(self.compiles)
    if compiled:
      # A figure and its unit stay on one line (a no-break space while wrapping).
      kept = re.sub(r'(\d) s\b', '\\1\xa0s', compiled)
      lines.extend(line.replace('\xa0', ' ') for line in textwrap.wrap(kept, width))
    if same:  # whole, however long: a factory's label is what tells the optimizer apart
      lines.append('Every run: ' + '; '.join(f'{c} {t[c].iloc[0]}' for c in same) + '.')
    best = self._best_configuration(col, width)
    if best:
      lines.append(best)
    lines.append(f'Best {min(top, len(ok))} by {col}:')
    fmt = lambda v: f'{v:.4g}'  # noqa: E731
    if verbose:
      shown = [c for c in t.columns if c not in ('run', 'seconds', 'best_eval') and c not in same]
      lines.append(ok[shown].head(top).to_string(index=False, float_format=fmt))
      return '\n'.join(lines)
    axes = [c for c in axis_columns(list(t.columns), self.config) if t[c].nunique() > 1]
    axes = axes or [c for c in ('batch_size', 'learning_rate') if c in t.columns]
    accuracy = 'final_val_accuracy' if 'final_val_accuracy' in t else 'final_train_accuracy'
    optional = [c for c in (accuracy, 'best_val_loss', 'updates', 'pareto') if c in t.columns]
    shown = list(dict.fromkeys([*axes, 'status', col, *optional]))
    while True:
      text = ok[shown].head(top).to_string(index=False, float_format=fmt)
      if not optional or max(len(line) for line in text.splitlines()) <= width:
        break
      shown.remove(optional.pop())
    lines.append(text)
    return '\n'.join(lines)

  def _best_configuration(self, col: str, width: int) -> str | None:
    """With several seeds, the best configuration as the report defines it
    (`analysis.best_configurations`: the lowest seed mean, every seed finished), in a line."""
    from sweep import analysis

    t = self.table
    if 'seed' not in t.columns or t['seed'].nunique() < 2:
      return None  # one seed: the first row of the table below is the best configuration
    ranked = analysis.best_configurations(self, col)
    if ranked.empty:
      return None
    top = ranked.iloc[0]
    axes = [c for c in axis_columns(list(t.columns), self.config) if c != 'seed']
    values = ', '.join(
      f'{a} {top[a]:.4g}' if isinstance(top[a], float) else f'{a} {top[a]}'
      for a in axes
      if a in top.index and t[a].nunique() > 1
    )
    line = f'Best configuration (mean of {int(top["seeds"])} seeds): {values}: {col} {top[col]:.4g}'
    runs = ' (runs ' + ', '.join(str(r) for r in top['runs']) + ').'
    return line + (runs if len(line + runs) <= width else '.')

  def save_front(self, workdir: str) -> None:
    """Saves every Pareto run's parameters and optimizer state with orbax (a run already
    saved whole with the same metadata is left as it is)."""
    wanted = set(int(i) for i in self.table.index[self.table.pareto])
    for i in checkpoints.saved_runs(workdir):
      if i not in wanted:  # a front of an earlier, interrupted pass over this workdir
        shutil.rmtree(checkpoints.run_path(workdir, i), ignore_errors=True)
    for i in sorted(wanted):
      row = self.table.loc[i]
      meta = {k: (v.item() if hasattr(v, 'item') else v) for k, v in row.items()}
      if checkpoints.run_is_saved(workdir, i, meta):
        continue
      runs = self._run_state(i)
      checkpoints.save_run(
        workdir,
        i,
        runs.params,
        runs.opt_state,
        meta,
        runs.best_params,
        model_state=runs.model_state,
        best_model_state=runs.best_model_state,
        state_layout=getattr(self._model, 'state_layout', 'collections'),
        eval_params=(
          optimizers.evaluated(runs.opt_state, runs.params, self._eval_fn)
          if optimizers.evaluates_elsewhere(runs.opt_state, self._eval_fn)
          else None
        ),
      )
    self.workdir = workdir

  def save(self, workdir: str) -> None:
    """Writes results.csv, curves.csv and config.json with their checksums
    (`checksums.json`), and a whole copy of the three in `state/results/` (each
    atomically; a file that already holds the same text is not rewritten)."""
    os.makedirs(workdir, exist_ok=True)
    contents = {
      'results.csv': self.table.to_csv(index=False).encode(),
      'curves.csv': self.curves.to_csv(index=False).encode(),
      'config.json': files.dumps(self.config, indent=2).encode(),
    }
    files.write_verified(workdir, contents, copy_path(workdir))

  @classmethod
  def load(cls, workdir: str) -> Result:
    """A result from a workdir alone: table, curves, config, saved parameters.

    The three files are checked against their checksums first. A damaged one (missing,
    truncated, edited) is read from the whole copy in `state/results/` and rebuilt from
    it (said in one line on stderr); with no whole copy it is refused.

    Raises:
      FileNotFoundError: the workdir holds no finished sweep.
      sweep.files.DamagedFile: a file is damaged and there is no whole copy (the message
        names the file and the command that rebuilds it).
    """
    contents = read_files(workdir)
    try:
      table = pd.read_csv(io.BytesIO(contents['results.csv']))
      try:
        curves = pd.read_csv(io.BytesIO(contents['curves.csv']))
      except pd.errors.EmptyDataError:
        curves = pd.DataFrame()
      config = json.loads(contents['config.json'])
      if 'run' not in table or not isinstance(config, dict):
        raise ValueError('not a results table and a config')
    except (ValueError, KeyError, UnicodeDecodeError) as e:  # checked bytes that do not parse
      raise files.DamagedFile(
        f'the results in {workdir!r} do not read ({type(e).__name__}: {e}); {_way_out(workdir)}'
      ) from None
    table.index = table['run'].to_numpy()
    return cls(
      table,
      curves,
      config,
      float('nan'),
      lambda i, best=False, raw=False: checkpoints.restore_params(workdir, i, best=best, raw=raw),
      workdir,
    )


# ------------------------------------------------------------------- the result files ----

FILES = ('results.csv', 'curves.csv', 'config.json')


def copy_path(workdir: str) -> str:
  """The whole copy of the result files, a checksummed directory with the state."""
  return os.path.join(workdir, 'state', 'results')


def _way_out(workdir: str) -> str:
  experiment = os.path.join(workdir, 'experiment.py')
  command = (
    f'sweep run {experiment} --workdir {workdir}'
    if os.path.isfile(experiment)
    else f'the sweep.run(cfg, workdir={workdir!r}) that wrote it'
  )
  return (
    f'rebuild the results from its checkpoints with {command} (finished units are not '
    'trained again)'
  )


def read_files(workdir: str) -> dict[str, bytes]:
  """The bytes of results.csv, curves.csv and config.json, checked against their
  checksums; a damaged file is rebuilt from the whole copy in `state/results/` (unless
  another process holds the workdir, or it is read-only: then only read from it).

  Raises:
    FileNotFoundError: the workdir holds no finished sweep.
    sweep.files.DamagedFile: a file is damaged and there is no whole copy.
  """
  try:
    contents, problem = files.read_verified(workdir, FILES, copy_path(workdir))
  except FileNotFoundError:
    raise FileNotFoundError(
      f'{workdir!r} holds no finished sweep: results.csv is missing'
    ) from None
  except files.DamagedFile as e:
    raise files.DamagedFile(
      f'{os.path.join(workdir, str(e))}, and {copy_path(workdir)} holds no whole copy: '
      + _way_out(workdir)
    ) from None
  if problem is None:
    return contents
  if all(files.same_content(os.path.join(workdir, n), data) for n, data in contents.items()):
    # Each file holds what the copy holds: what is wrong is their checksums.
    if not problem.startswith(files.CHECKSUMS):
      problem = f'{files.CHECKSUMS} does not match its files'
  damaged = f'{os.path.join(workdir, problem)}: read from the whole copy in {copy_path(workdir)}'
  try:
    with lock.WorkdirLock(workdir):
      files.restore_verified(workdir, contents)
    checkpoints.say(f'{damaged}, and rebuilt from it')
  except lock.WorkdirBusy as e:
    checkpoints.say(f'{damaged} (not rebuilt while {lock.describe(e.holder)} writes the workdir)')
  except OSError as e:
    checkpoints.say(f'{damaged} (not rebuilt: {e.strerror or e})')
  return contents
