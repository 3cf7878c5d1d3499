"""What a finished sweep says about batch size, learning-rate scaling and overfitting.

Pure pandas and numpy on a `sweep.Result`'s table and curves (or tables read back from
results.csv and curves.csv):

    from sweep import analysis
    analysis.batch_size_table(result, target=0.3)   # best learning rate per batch size
    analysis.lr_batch_slope(result)                 # log(best lr) against log(batch size)
    analysis.choose_batch_size(result)              # one answer to "which batch size?"
    analysis.overfitting(result)                    # per run: gap, best evaluation, overfit
    analysis.noise_scale(g_small_sq, g_big_sq, b_small, b_big)   # McCandlish et al. 2018
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from sweep import columns
from sweep.errors import config_error
from sweep.expansion import axis_columns

__all__ = [
  'BatchSizeChoice',
  'annotate_overfitting',
  'batch_schedule_table',
  'batch_size_table',
  'best_configurations',
  'choose_batch_size',
  'lr_batch_slope',
  'noise_scale',
  'overfitting',
]

MODES = ('min', 'max')
# Added by `annotate_overfitting`, in this order.
OVERFITTING_COLUMNS = columns.OVERFITTING


# ---------------------------------------------------------------- batch size ----


def _check_metric(table: pd.DataFrame, metric: str, mode: str) -> None:
  if mode not in MODES:
    raise config_error('mode', mode, "expected 'min' or 'max'")
  if metric not in table.columns or not pd.api.types.is_numeric_dtype(table[metric]):
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    raise config_error('metric', metric, f'a numeric column of the results table: {numeric}')
  for column in ('batch_size', 'learning_rate'):
    if column not in table.columns:
      raise config_error('result.table', f'columns {list(table.columns)}', f'a {column!r} column')


def _curve_column(metric: str, curves: pd.DataFrame, given: str | None) -> str:
  """The curve that `metric` summarises: final_val_loss -> val_loss; else val_loss."""
  if given is not None:
    return given
  for prefix in ('final_', 'best_'):
    if metric.startswith(prefix) and metric[len(prefix) :] in curves.columns:
      return metric[len(prefix) :]
  return 'val_loss'


def constant_batch(table: pd.DataFrame) -> pd.DataFrame:
  """The rows of runs that keep one batch size (a run with a batch-size schedule,
  `sweep.batch_ramp`, has no single batch size to be compared by)."""
  if 'batch_schedule' not in table.columns:
    return table
  return table[table['batch_schedule'].isna() | (table['batch_schedule'] == 'constant')]


def _config_columns(table: pd.DataFrame, config: dict | None = None) -> list[str]:
  """The axes that tell configurations apart: every axis in the table but the seed (with
  the sweep's config, the hyperparameters of its optimizer factories too)."""
  return [a for a in axis_columns(list(table.columns), config) if a != 'seed']


def _per_config(
  table: pd.DataFrame, metric: str, require_all_seeds: bool, config: dict | None = None
) -> pd.DataFrame:
  """One row per configuration (every axis but the seed): the metric averaged over seeds.

  Returns:
    The configuration columns, then `metric`, `updates`, `examples`, `seconds` (means over
    the seeds kept), `seeds` (how many were averaged) and `runs` (their run ids, a tuple).
  """
  keys = _config_columns(table, config)
  n = len(table)
  runs = table['run'].to_numpy() if 'run' in table.columns else table.index.to_numpy()
  ok = (table['status'] == 'ok').to_numpy() if 'status' in table.columns else np.ones(n, bool)
  ok = ok & np.isfinite(table[metric].to_numpy(np.float64))
  group = table.groupby(keys, dropna=False, sort=True).ngroup().to_numpy()
  values = {'_group': group, '_ok': ok}
  for column in (metric, 'updates', 'examples', 'seconds'):
    v = table[column].to_numpy(np.float64) if column in table.columns else np.full(n, np.nan)
    values[column] = np.where(ok, v, np.nan)  # means over the seeds kept
  stats = (
    pd.DataFrame(values)
    .groupby('_group', sort=True)
    .agg(
      **{c: (c, 'mean') for c in (metric, 'updates', 'examples', 'seconds')},
      seeds=('_ok', 'sum'),
      size=('_ok', 'size'),
    )
  )
  # A learning rate that diverged for some seed is no safe best, however well the others did.
  keep = (stats['seeds'] > 0) & ((stats['seeds'] == stats['size']) | (not require_all_seeds))
  first_row = pd.Series(np.arange(n)).groupby(group).first()
  out = table.iloc[first_row.loc[stats.index[keep]].to_numpy()][keys].reset_index(drop=True)
  for column in (metric, 'updates', 'examples', 'seconds', 'seeds'):
    out[column] = stats.loc[keep, column].to_numpy()
  kept_runs = pd.Series(runs[ok]).groupby(group[ok]).agg(lambda r: tuple(int(i) for i in r))
  out['runs'] = kept_runs.reindex(stats.index[keep]).to_list()
  return out


def best_configurations(result: Any, metric: str | None = None) -> pd.DataFrame:
  """The configurations ranked best first: the one definition of "best" the report uses.

  A configuration is a point of the sweep without its seed (every axis but `seed`). Its
  score is the mean over its seeds of `metric`; a configuration any of whose seeds diverged,
  was stopped by a scheduler or has a NaN metric is left out (as `batch_size_table` leaves
  it out). With one seed this is the runs that finished, by their own metric.

  Args:
    result: a `sweep.Result` (anything with `.table`, and `.config` for factory axes).
    metric: the loss to rank by (lowest first); None: the final validation loss, or the
      final training loss for a sweep without a validation set.

  Returns:
    A DataFrame, best first: the configuration columns, `metric`, `updates`, `examples`,
    `seconds` (seed means), `seeds` and `runs` (the run ids averaged, a tuple). Empty when no
    configuration finished every seed.
  """
  table = result.table
  if metric is None:
    metric = _default_metric(table)
  if metric not in table.columns:
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    raise config_error('metric', metric, f'a numeric column of the results table: {numeric}')
  frame = _per_config(table, metric, True, getattr(result, 'config', None))
  return frame.sort_values(metric, kind='stable').reset_index(drop=True)


def _first_reached(
  curves: pd.DataFrame, runs: tuple[int, ...], column: str, target: float, mode: str
):
  """(updates, examples) at the first evaluation where the seed-averaged curve reached target."""
  if curves is None or curves.empty or column not in curves.columns:
    return math.nan, math.nan
  c = curves[curves['run'].isin(runs)]
  if c.empty:
    return math.nan, math.nan
  mean = c.groupby('eval')[[column, 'updates', 'examples']].mean().sort_index()
  values = mean[column].to_numpy(np.float64)
  hit = values <= target if mode == 'min' else values >= target
  if not hit.any():
    return math.nan, math.nan
  k = int(np.argmax(hit))
  return float(mean['updates'].iloc[k]), float(mean['examples'].iloc[k])


def batch_size_table(
  result: Any,
  metric: str = 'final_val_loss',
  mode: str = 'min',
  target: float | None = None,
  *,
  curve: str | None = None,
  require_all_seeds: bool = True,
) -> pd.DataFrame:
  """The best learning rate of each batch size, and what it cost.

  Runs are grouped into configurations (every axis but the seed); a configuration's
  metric is the mean over its seeds. A configuration any of whose seeds diverged (or has a
  NaN metric) is left out unless `require_all_seeds=False`, which averages the seeds that
  did not. Each batch size's best configuration is then the one with the lowest (`mode`
  'min') or highest ('max') mean metric; when the table holds other axes (optimizers,
  schedules, ...) they are part of the choice and reported when they vary.

  Args:
    result: a `sweep.Result` (anything with `.table` and `.curves`).
    metric: the results-table column to rank by.
    mode: 'min' or 'max'.
    target: a value of the curve `curve`; when given, the table says when the best
      configuration's seed-averaged curve first reached it (<= for 'min', >= for 'max').
    curve: the curve column `target` refers to; None derives it from `metric`
      (final_val_loss -> val_loss, final_val_accuracy -> val_accuracy), else val_loss.
    require_all_seeds: leave out configurations that diverged for any seed.

  Returns:
    A DataFrame indexed by batch size (increasing) with columns `learning_rate`, `metric`,
    `updates`, `examples`, `seconds` (the wall time the table charges each run, averaged
    over seeds), `seeds`, `runs` (run ids averaged), `lr_at_edge` (True when the best
    learning rate is the smallest or largest tried at that batch size: the true best may
    lie outside the grid), the other varying axes of the best configuration, and with a
    target `updates_to_target` and `examples_to_target` (NaN if never reached). Batch
    sizes without a usable configuration are left out.

  Raises:
    ConfigError: an unknown metric or mode, or a table without batch_size/learning_rate.
  """
  table = constant_batch(result.table)
  config = getattr(result, 'config', None)
  _check_metric(table, metric, mode)
  per_config = _per_config(table, metric, require_all_seeds, config)
  curves = getattr(result, 'curves', None)
  curve_column = _curve_column(metric, curves if curves is not None else pd.DataFrame(), curve)
  keys = _config_columns(table, config)
  varying = [
    k
    for k in keys
    if k not in ('batch_size', 'learning_rate') and table[k].nunique(dropna=False) > 1
  ]

  rows = []
  for b, g in per_config.groupby('batch_size', sort=True):
    best = g.loc[g[metric].idxmin() if mode == 'min' else g[metric].idxmax()]
    tried = table.loc[table['batch_size'] == b, 'learning_rate']
    row = {'batch_size': b, 'learning_rate': best['learning_rate'], metric: best[metric]}
    for column in ('updates', 'examples', 'seconds', 'seeds', 'runs'):
      row[column] = best[column]
    row['lr_at_edge'] = bool(best['learning_rate'] in (tried.min(), tried.max()))
    for k in varying:
      row[k] = best[k]
    if target is not None:
      row['updates_to_target'], row['examples_to_target'] = _first_reached(
        curves, best['runs'], curve_column, float(target), mode
      )
    rows.append(row)
  columns = [
    'batch_size',
    'learning_rate',
    metric,
    'updates',
    'examples',
    'seconds',
    'seeds',
    'runs',
    'lr_at_edge',
  ] + varying
  if target is not None:
    columns += ['updates_to_target', 'examples_to_target']
  return pd.DataFrame(rows, columns=columns).set_index('batch_size')


# ------------------------------------------------------------ lr scaling ----


def _ols(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
  """Slope, intercept and the two-sided t interval of the slope of y = a + b x."""
  n = len(x)
  xm, ym = x.mean(), y.mean()
  sxx = float(np.sum((x - xm) ** 2))
  if sxx == 0:
    return math.nan, math.nan, math.nan, math.nan
  slope = float(np.sum((x - xm) * (y - ym)) / sxx)
  intercept = float(ym - slope * xm)
  if n < 3:
    # Two points fit any line exactly: no residual degrees of freedom, no interval.
    return slope, intercept, -math.inf, math.inf
  from scipy import stats

  resid = y - intercept - slope * x
  se = math.sqrt(float(np.sum(resid**2)) / (n - 2) / sxx)
  t = float(stats.t.ppf(0.5 + confidence / 2, n - 2))
  return slope, intercept, slope - t * se, slope + t * se


def _interpret(slope: float, low: float, high: float, n: int, edge: list) -> str:
  if n < 2 or not math.isfinite(slope):
    return f'a slope needs the best learning rate at two batch sizes at least; found {n}.'
  text = f'best lr ~ batch^{slope:.2f}'
  if math.isfinite(low) and math.isfinite(high):
    text += f' (95% interval {low:.2f} to {high:.2f}, {n} batch sizes): '
    # A little slack: an exact power law has a zero-width interval, up to rounding.
    slack = 1e-9
    has_linear = low - slack <= 1.0 <= high + slack
    has_sqrt = low - slack <= 0.5 <= high + slack
    if has_linear and has_sqrt:
      text += (
        'consistent with both the linear scaling rule (1, Goyal et al. 2017) and square-root '
        'scaling (0.5); more batch sizes or seeds are needed to tell them apart.'
      )
    elif has_linear:
      text += (
        'consistent with the linear scaling rule (1, Goyal et al. 2017), '
        'not with square-root scaling (0.5).'
      )
    elif has_sqrt:
      text += (
        'consistent with square-root scaling (0.5), '
        'not with the linear scaling rule (1, Goyal et al. 2017).'
      )
    elif high < 0.5:
      text += (
        'flatter than square-root scaling (0.5): the best learning rate grows little with '
        'the batch, as past the critical batch size.'
      )
    elif low > 1.0:
      text += 'steeper than the linear scaling rule (1, Goyal et al. 2017).'
    else:
      text += (
        'between square-root scaling (0.5) and the linear scaling rule (1, Goyal et al. 2017).'
      )
  else:
    if slope < 0.25:
      near = 'flatter than square-root scaling (0.5)'
    elif slope < 0.75:
      near = 'nearer square-root scaling (0.5) than the linear scaling rule (1)'
    elif slope < 1.25:
      near = 'nearer the linear scaling rule (1, Goyal et al. 2017) than square-root scaling (0.5)'
    else:
      near = 'steeper than the linear scaling rule (1, Goyal et al. 2017)'
    text += f' from {n} batch sizes, too few for an interval; the estimate is {near}.'
  if edge:
    sizes = ('batch size ' if len(edge) == 1 else 'batch sizes ') + ', '.join(str(b) for b in edge)
    text += (
      f' The best learning rate at {sizes} is at the edge of the grid, which biases the slope: '
      'widen the learning-rate grid.'
    )
  return text


def lr_batch_slope(
  result: Any,
  metric: str = 'final_val_loss',
  mode: str = 'min',
  *,
  confidence: float = 0.95,
  bootstrap: int = 0,
  rng: int | np.random.Generator | None = 0,
  require_all_seeds: bool = True,
) -> dict[str, Any]:
  """How the best learning rate scales with the batch size: log(best lr) on log(batch size).

  The best learning rate of each batch size is `batch_size_table`'s (seed-averaged metric).
  The slope comes from ordinary least squares with a t-distribution interval (n - 2
  degrees of freedom). With 2 batch sizes the line is exact and has no interval:
  `ci_low, ci_high = -inf, inf`. The best rates lie on the grid's values, so the slope
  can only be as fine as the grid's spacing. Give it a sweep of one optimizer and schedule
  (filter the table first otherwise): the best of each batch size could come from different
  ones, and the slope would mix them.

  With several seeds, `bootstrap > 0` adds a percentile interval from resampling the seeds
  with replacement (the best rate of every batch size recomputed from each resample's mean
  metric), which also counts how much the choice of best rate depends on the seeds.

  Args:
    result: a `sweep.Result` (anything with `.table`).
    metric: the results-table column to rank by.
    mode: 'min' or 'max'.
    confidence: the level of the intervals.
    bootstrap: resamples of the seeds; 0 for none.
    rng: the bootstrap's numpy Generator or seed.
    require_all_seeds: as in `batch_size_table`.

  Returns:
    A dict: `slope`, `intercept` (of log(lr) = intercept + slope log(batch)), `ci_low`,
    `ci_high`, `n` (batch sizes), `batch_sizes` and `best_lrs` (arrays), and with a
    bootstrap `boot_low`, `boot_high`; `interpretation`, a sentence comparing the slope
    with 1 (the linear scaling rule, Goyal et al. 2017) and 0.5 (square-root scaling).
    With fewer than 2 batch sizes the numbers are NaN.
  """
  if not 0 < confidence < 1:
    raise config_error('confidence', confidence, 'expected a level in (0, 1)')
  best = batch_size_table(result, metric, mode, require_all_seeds=require_all_seeds)
  b = best.index.to_numpy(np.float64)
  lr = best['learning_rate'].to_numpy(np.float64)
  n = len(b)
  if n >= 2:
    slope, intercept, low, high = _ols(np.log(b), np.log(lr), confidence)
  else:
    slope = intercept = low = high = math.nan
  out = {
    'slope': slope,
    'intercept': intercept,
    'ci_low': low,
    'ci_high': high,
    'n': n,
    'batch_sizes': b,
    'best_lrs': lr,
  }
  table = result.table
  seeds = table['seed'].unique() if 'seed' in table.columns else []
  if bootstrap and len(seeds) > 1 and n >= 2:
    gen = np.random.default_rng(rng)
    slopes = []
    for _ in range(int(bootstrap)):
      pick = gen.choice(seeds, size=len(seeds), replace=True)
      # Each drawn seed's rows, as many times as it was drawn: the resampled sweep.
      resampled = pd.concat([table[table['seed'] == s] for s in pick], ignore_index=True)
      resampled['run'] = np.arange(len(resampled))
      t = batch_size_table(
        SimpleNamespace(table=resampled, curves=None, config=getattr(result, 'config', None)),
        metric,
        mode,
        require_all_seeds=require_all_seeds,
      )
      if len(t) >= 2:
        slopes.append(
          _ols(
            np.log(t.index.to_numpy(np.float64)),
            np.log(t['learning_rate'].to_numpy(np.float64)),
            confidence,
          )[0]
        )
    tail = 100 * (1 - confidence) / 2
    out['boot_low'], out['boot_high'] = (
      (float(np.nanpercentile(slopes, tail)), float(np.nanpercentile(slopes, 100 - tail)))
      if slopes
      else (math.nan,) * 2
    )
  edge = (
    [int(x) if float(x).is_integer() else x for x in best.index[best['lr_at_edge']]] if n else []
  )
  out['interpretation'] = _interpret(slope, low, high, n, edge)
  return out


# ------------------------------------------------------- batch-size choice ----

# The default target: the smallest batch size's best quality, this much (relative) worse.
TOLERANCE = 0.05
# Times to target this close (relative) count as equal, and the smaller batch size wins:
# it needs less memory and fewer examples, and timings are noisy.
TIE = 0.05
# The evidence columns `BatchSizeChoice.__str__` prints, those present.
_SHOWN = (
  'learning_rate',
  'lr_fit',
  'reached',
  'updates_to_target',
  'seconds_to_target',
  'seconds',
  'noise_scale',
)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchSizeChoice:
  """`choose_batch_size`'s answer: the batch size, why, and the table it was read from.

  Attributes:
    batch_size: the recommended batch size; None when every run diverged.
    reason: one sentence saying why.
    evidence: one row per swept batch size (see `choose_batch_size`).
    target: the value of the curve `curve` the batch sizes raced to; None when every
      run diverged.
    metric: the results-table column that ranked the learning rates.
    curve: the curve column the target is a value of (val_loss, train_loss, ...).
    mode: 'min' (the target is reached at or below) or 'max' (at or above).
    lr_scaling: how the best learning rate scales with the batch size, in words
      (`lr_batch_slope`'s interpretation).
    short: the answer in a clause that fits a terminal line ('128 recommended, reaching
      val_loss 0.21 in 0.64 s alone, 1.9x sooner than 32'), as `sweep run` prints it.
  """

  batch_size: int | None
  reason: str
  evidence: pd.DataFrame
  target: float | None
  metric: str = 'final_val_loss'
  curve: str = 'val_loss'
  mode: str = 'min'
  lr_scaling: str = ''
  short: str = ''

  def __str__(self) -> str:
    head = (
      f'Recommended batch size: {self.batch_size}.'
      if self.batch_size is not None
      else 'No batch size recommended.'
    )
    lines = [f'{head} {self.reason}']
    if self.target is not None:
      op = '<=' if self.mode == 'min' else '>='
      lines.append(f'Target: {self.curve} {op} {self.target:.4g}.')
    if not self.evidence.empty:
      shown = [c for c in (self.metric, *_SHOWN) if c in self.evidence.columns]
      lines.append(
        self.evidence[shown].to_string(
          float_format=lambda v: f'{v:.4g}', na_rep='-', justify='right'
        )
      )
    if self.lr_scaling:
      lines.append(f'Learning-rate scaling: {self.lr_scaling}')
    return '\n'.join(lines)


def batch_schedule_table(
  result: Any, metric: str | None = None, mode: str = 'min', *, require_all_seeds: bool = True
) -> pd.DataFrame:
  """Each training strategy at its best learning rate: a batch size or batch-size schedule
  (`sweep.batch_ramp`) with the other axes that vary (the learning-rate schedule, the
  optimizer), as Smith et al. 2018 compare a learning-rate decay with a batch-size ramp.

  The best learning rate of a strategy is the one with the best seed-mean `metric`
  (configurations that diverged for some seed left out, as in `batch_size_table`).

  Returns:
    One row per strategy, best first, indexed by its label (the batch schedule, or the
    batch size, then the other varying values): the varying axes, `learning_rate`,
    `metric`, `updates` (parameter updates), `examples`, `seconds`, `seeds`, `runs` (run
    ids averaged) and `lr_at_edge`; `attrs['metric']` names the metric.
  """
  table = result.table
  if metric is None:
    metric = _default_metric(table)
  _check_metric(table, metric, mode)
  config = getattr(result, 'config', None)
  per_config = _per_config(table, metric, require_all_seeds, config)
  keys = [k for k in _config_columns(table, config) if k != 'learning_rate']
  varying = [k for k in keys if table[k].nunique(dropna=False) > 1]
  for k in ('batch_schedule', 'batch_size')[::-1]:
    if k in keys and k not in varying:
      varying.insert(0, k)
  rows, labels = [], []
  for _, g in per_config.groupby(varying, dropna=False, sort=False):
    best = g.loc[g[metric].idxmin() if mode == 'min' else g[metric].idxmax()]
    row = {k: best[k] for k in varying}
    row['learning_rate'] = best['learning_rate']
    row[metric] = best[metric]
    for column in ('updates', 'examples', 'seconds', 'seeds', 'runs'):
      row[column] = best[column]
    row['lr_at_edge'] = bool(
      len(g) > 1 and best['learning_rate'] in (g['learning_rate'].min(), g['learning_rate'].max())
    )
    rows.append(row)
    sched = row.get('batch_schedule')
    parts = [str(sched) if sched not in (None, 'constant') else f'batch {_fmt(row["batch_size"])}']
    parts += [str(row[k]) for k in varying if k not in ('batch_size', 'batch_schedule')]
    labels.append(', '.join(parts))
  out = pd.DataFrame(rows, index=pd.Index(labels, name='strategy'))
  out = out.sort_values(metric, ascending=mode == 'min', kind='stable')
  out.attrs['metric'] = metric
  return out


def _default_metric(table: pd.DataFrame) -> str:
  """The final validation loss, else (no validation set) the final training loss."""
  return 'final_val_loss' if 'final_val_loss' in table.columns else 'final_train_loss'


def _noise_scales(table: pd.DataFrame, runs: pd.Series) -> np.ndarray:
  """Per batch size: the mean `noise_scale` of the runs (a tuple of run ids) it was read from."""
  if 'noise_scale' not in table.columns:
    return np.full(len(runs), np.nan)
  by_run = pd.Series(
    pd.to_numeric(table['noise_scale'], errors='coerce').to_numpy(np.float64),
    index=table['run'].to_numpy() if 'run' in table.columns else table.index.to_numpy(),
  )
  out = []
  for ids in runs:
    values = by_run.reindex(list(ids) if isinstance(ids, tuple) else []).to_numpy(np.float64)
    values = values[np.isfinite(values)]
    out.append(float(values.mean()) if len(values) else math.nan)
  return np.asarray(out, np.float64)


def _noise_clause(b: float, b_noise: float) -> str:
  """Where batch size `b` stands against the critical batch size B_noise estimates."""
  if not math.isfinite(b_noise) or b_noise <= 0:
    return ''
  where = f'the gradient noise scale measured at it (about {b_noise:.3g})'
  if b < b_noise / 2:
    return f'; it lies below {where}, so larger batches may still save time'
  if b > 2 * b_noise:
    return f'; it lies above {where}, past which larger batches buy little time'
  return f'; it lies near {where}, the critical batch size of McCandlish et al. (2018)'


def _fmt(b: Any) -> str:
  return str(int(b)) if float(b).is_integer() else f'{b:g}'


def choose_batch_size(
  result: Any,
  target: float | None = None,
  *,
  metric: str | None = None,
  mode: str = 'min',
  tolerance: float = TOLERANCE,
) -> BatchSizeChoice:
  """One answer to "which batch size?": the one that reaches a target quality soonest.

  Each batch size is represented by its best configuration (`batch_size_table`: the best
  learning rate by the seed-mean `metric`, configurations that diverged for any seed left
  out). The batch sizes race to `target`, a value of the curve that `metric` summarises
  (final_val_loss -> val_loss); by default the best `metric` of the smallest batch size,
  made `tolerance` (relative) worse, so that a larger batch size that trains almost as
  well still counts. The recommendation is the batch size that reaches the target in the
  least time; times within 5 % count as equal and the smaller batch size wins. When no
  batch size reaches the target, it is the one with the best quality.

  Time to target, measured as the time a run of that batch size takes alone, is
  approximated from each run's own `seconds` and its curves:
  `seconds_to_target = seconds * updates_to_target / updates`, where `updates_to_target` is
  the first evaluation point at which the seed-averaged curve reached the target. This
  assumes every update of a run costs the same time (evaluation time spread in proportion)
  and is only as fine as the evaluation points. `seconds` is what the results table charges
  each run: the time a run of its batch size takes alone, as `sweep.timing` measured it;
  in a sweep run with `time_runs=False` it is the unit's time shared equally between its
  runs, the same for every batch size, and tells them apart by nothing.
  When the seconds are equal for every batch size (or absent), the race is run on
  `updates_to_target` instead, the time on hardware where a larger batch's update costs no
  more than a smaller one's (McCandlish et al. 2018's steps to target), and the reason says
  so.

  The evidence also holds, where the sweep measured it (`noise_scale=True`), the gradient
  noise scale of each batch size's best runs (McCandlish et al. 2018: batch sizes well below
  it trade examples for time almost one for one, those above it buy little), and the
  learning rate of the line `lr_batch_slope` fits through the best learning rates.

  Args:
    result: a `sweep.Result` (anything with `.table`, `.curves` and `.config`).
    target: a value of the curve the batch sizes race to; None for the default.
    metric: the results-table column that ranks learning rates; None for final_val_loss,
      or final_train_loss for a sweep without a validation set.
    mode: 'min' (lower is better; the target is reached at or below it) or 'max'.
    tolerance: the default target's relative slack, >= 0.

  Returns:
    A `BatchSizeChoice`. Its `evidence` is indexed by every swept batch size (increasing),
    with columns `learning_rate` (the best, NaN where every configuration diverged),
    `metric`, `lr_at_edge`, `updates`, `seconds`, `seeds`, `runs`, the other axes that vary,
    `updates_to_target`, `examples_to_target`, `seconds_to_target` (NaN when not reached),
    `reached`, `noise_scale` (NaN when not measured) and `lr_fit`. A sweep of one batch size
    gets that batch size and a reason saying there is nothing to compare; a sweep whose every
    run diverged gets `batch_size=None`.

  Raises:
    ConfigError: an unknown metric or mode, a table without batch_size or learning_rate,
      a target that is not a finite number, a negative tolerance.

  Examples:
    >>> import pandas as pd
    >>> from sweep import analysis
    >>> from sweep.results import Result
    >>> table = pd.DataFrame({'run': [0, 1], 'batch_size': [32, 128],
    ...   'learning_rate': [0.1, 0.4], 'status': 'ok', 'updates': [400, 100],
    ...   'final_val_loss': [0.30, 0.31], 'seconds': [4.0, 1.5]})
    >>> curves = pd.DataFrame({'run': [0, 0, 1, 1], 'eval': [0, 1, 0, 1],
    ...   'updates': [0, 400, 0, 100], 'examples': [0, 12800, 0, 12800],
    ...   'val_loss': [2.3, 0.30, 2.3, 0.31]})
    >>> choice = analysis.choose_batch_size(Result(table, curves, {}, 0.0))
    >>> choice.batch_size
    128
  """
  table = result.table
  if 'batch_size' not in table.columns:
    raise config_error('result.table', f'columns {list(table.columns)}', "a 'batch_size' column")
  if 'batch_schedule' in table.columns:
    result = SimpleNamespace(
      table=constant_batch(table),
      curves=getattr(result, 'curves', None),
      config=getattr(result, 'config', None),
    )
    table = result.table
  if metric is None:
    metric = _default_metric(table)
  _check_metric(table, metric, mode)
  if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
    raise config_error('tolerance', tolerance, 'a relative slack >= 0, such as 0.05 for 5 %')
  if target is not None and (
    isinstance(target, bool)
    or not isinstance(target, int | float | np.integer | np.floating)
    or not math.isfinite(float(target))
  ):
    raise config_error('target', target, f'a finite number on the {metric} scale, or None')
  curves = getattr(result, 'curves', None)
  curve = _curve_column(metric, curves if curves is not None else pd.DataFrame(), None)
  sizes = np.sort(pd.unique(table['batch_size'].dropna()))
  choice = {'metric': metric, 'curve': curve, 'mode': mode}

  best = batch_size_table(result, metric, mode)
  if best.empty:
    evidence = best.reindex(pd.Index(sizes, name='batch_size'))
    for column in ('updates_to_target', 'examples_to_target', 'seconds_to_target'):
      evidence[column] = np.nan
    evidence['reached'] = False
    evidence['noise_scale'] = evidence['lr_fit'] = np.nan
    return BatchSizeChoice(
      None,
      'Every run diverged (or ended with a NaN metric): try smaller learning rates.',
      evidence,
      None,
      **choice,
      short='none recommended, every run diverged',
    )

  smallest = best.index[0]
  quality = float(best[metric].iloc[0])
  if target is None:
    slack = tolerance * abs(quality)
    target = quality + slack if mode == 'min' else quality - slack
    goal = (
      f'{curve} {target:.4g} (the best {metric} of batch size {_fmt(smallest)}, '
      f'{quality:.4g}, within {100 * tolerance:g} %)'
    )
  else:
    goal = f'{curve} {float(target):.4g}'
  target = float(target)

  evidence = batch_size_table(result, metric, mode, target=target).reindex(
    pd.Index(sizes, name='batch_size')
  )
  with np.errstate(divide='ignore', invalid='ignore'):
    evidence['seconds_to_target'] = (
      evidence['seconds'] * evidence['updates_to_target'] / evidence['updates']
    )
  evidence['reached'] = evidence['updates_to_target'].notna()
  evidence['noise_scale'] = _noise_scales(table, evidence['runs'])
  fit = lr_batch_slope(result, metric, mode)
  b = evidence.index.to_numpy(np.float64)
  evidence['lr_fit'] = (
    np.exp(fit['intercept']) * b ** fit['slope'] if math.isfinite(fit['slope']) else np.nan
  )
  choice['lr_scaling'] = fit['interpretation']

  if len(sizes) == 1:
    row = evidence.iloc[0]
    return BatchSizeChoice(
      sizes[0].item(),
      f'Only batch size {_fmt(sizes[0])} was swept, so there is nothing to compare it with: '
      f'sweep two batch sizes or more (its best learning rate, {row["learning_rate"]:.3g}, '
      f'reached {metric} {row[metric]:.4g}).',
      evidence,
      target,
      **choice,
      short=f'{_fmt(sizes[0])} recommended, the only one swept',
    )

  reached = evidence[evidence['reached']]
  if reached.empty:
    top = best[metric].idxmin() if mode == 'min' else best[metric].idxmax()
    row = evidence.loc[top]
    return BatchSizeChoice(
      top.item() if hasattr(top, 'item') else top,
      f'No batch size reached {goal}; batch size {_fmt(top)} came closest, with {metric} '
      f'{row[metric]:.4g} at learning rate {row["learning_rate"]:.3g}'
      + _noise_clause(float(top), float(row['noise_scale']))
      + '.',
      evidence,
      target,
      **choice,
      short=f'{_fmt(top)} recommended, closest to {curve} {target:.4g}, which none reached',
    )

  # Seconds equal for every batch size that finished are a unit's shared time, not each
  # batch size's own.
  seconds = evidence['seconds'].dropna().to_numpy(np.float64)
  timed = np.isfinite(reached['seconds_to_target'].to_numpy(np.float64)).all() and not (
    len(seconds) > 1 and np.allclose(seconds, seconds[0], rtol=1e-6, atol=0)
  )
  clock = 'seconds_to_target' if timed else 'updates_to_target'
  times = reached[clock].to_numpy(np.float64)
  fastest = times.min()
  pick = reached.index[np.flatnonzero(times <= fastest * (1 + TIE))[0]]
  row = evidence.loc[pick]
  first = reached.index[0]  # the smallest batch size that reached the target
  if len(reached) == 1:
    return BatchSizeChoice(
      pick.item() if hasattr(pick, 'item') else pick,
      f'Batch size {_fmt(pick)} is the only one to reach {goal}, at learning rate '
      f'{row["learning_rate"]:.3g} after {row["updates_to_target"]:.0f} updates'
      + _noise_clause(float(pick), float(row['noise_scale']))
      + '.',
      evidence,
      target,
      **choice,
      short=f'{_fmt(pick)} recommended, the only one to reach {curve} {target:.4g}',
    )
  if timed:
    how = (
      f'in the least time ({row["seconds_to_target"]:.3g} s for a run alone at learning '
      f'rate {row["learning_rate"]:.3g}'
    )
    unit = 'sooner'
  else:
    how = (
      f'in the fewest updates ({row["updates_to_target"]:.0f} at learning rate '
      f'{row["learning_rate"]:.3g}'
    )
    unit = 'fewer'
  short = f'{_fmt(pick)} recommended, reaching {curve} {target:.4g} in ' + (
    f'{row["seconds_to_target"]:.3g} s alone' if timed else f'{row[clock]:.0f} updates'
  )
  if pick != first:
    ratio = float(evidence.loc[first, clock]) / float(row[clock])
    how += f', {ratio:.2g}x {unit} than batch size {_fmt(first)})'
    short += f', {ratio:.2g}x {unit} than {_fmt(first)}'
  else:
    how += f'; no larger batch size is more than {100 * TIE:g} % {unit})'
    short += f'; no larger one is {100 * TIE:g} % {unit}'
  if not timed:
    how += (
      ', the table giving every batch size the same seconds (a unit trained together and '
      'its time shared out), so updates stand in for time'
    )
  reason = (
    f'Batch size {_fmt(pick)} reaches {goal} {how}'
    + _noise_clause(float(pick), float(row['noise_scale']))
    + '.'
  )
  return BatchSizeChoice(
    pick.item() if hasattr(pick, 'item') else pick, reason, evidence, target, **choice, short=short
  )


# ------------------------------------------------------------- overfitting ----


def _overfitting_frame(
  table: pd.DataFrame, curves: pd.DataFrame | None, margin: float
) -> pd.DataFrame:
  if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin >= 0:
    raise config_error('margin', margin, 'expected a relative margin >= 0')
  runs = table['run'].to_numpy() if 'run' in table.columns else table.index.to_numpy()
  out = pd.DataFrame(index=pd.Index(runs, name='run'))
  if 'final_val_loss' in table.columns and 'final_train_loss' in table.columns:
    out['generalization_gap'] = table['final_val_loss'].to_numpy(np.float64) - table[
      'final_train_loss'
    ].to_numpy(np.float64)
  else:
    out['generalization_gap'] = np.nan
  out['best_val_eval'] = np.nan
  out['best_val_epoch'] = np.nan
  out['val_rise'] = np.nan
  out['overfit'] = False
  if curves is None or curves.empty or 'val_loss' not in curves.columns:
    return out

  c = (
    curves[curves['run'].isin(runs)]
    .sort_values(['run', 'eval'], kind='stable')
    .reset_index(drop=True)
  )
  if c.empty:
    return out
  # Every run's evaluations as one row of a (runs, evaluations) grid: the rows of a run are
  # consecutive after the sort; a run with fewer evaluations is padded with its last one.
  index, starts, counts = np.unique(c['run'].to_numpy(), return_index=True, return_counts=True)
  k = int(counts.max())
  rows = np.minimum(starts[:, None] + np.arange(k)[None, :], (starts + counts - 1)[:, None])
  grid = lambda column: c[column].to_numpy(np.float64)[rows]  # noqa: E731
  val = grid('val_loss')
  pick = np.arange(len(index))
  best_at = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=1)  # first lowest evaluation
  last_at = np.argmax(grid('eval'), axis=1)
  min_val = val[pick, best_at]
  found = np.isfinite(min_val)
  best_eval = np.where(found, grid('eval')[pick, best_at], np.nan)
  best_epoch = (
    np.where(found, grid('epoch')[pick, best_at], np.nan)
    if 'epoch' in c.columns
    else np.full(len(index), np.nan)
  )
  min_val = np.where(found, min_val, np.nan)
  final_val = val[pick, last_at]
  with np.errstate(divide='ignore', invalid='ignore'):
    rise = (final_val - min_val) / np.abs(min_val)
  if 'train_loss' in c.columns:
    train = grid('train_loss')
    train_kept_falling = train[pick, last_at] < train[pick, best_at]
  else:
    train_kept_falling = np.zeros(len(index), bool)
  # Relative to |min| so the test reads the same for any loss scale; rise is NaN for a run
  # without a finite validation loss, and NaN compares False.
  overfit = (final_val - min_val > margin * np.abs(min_val)) & train_kept_falling
  out.loc[index, 'best_val_eval'] = best_eval
  out.loc[index, 'best_val_epoch'] = best_epoch
  out.loc[index, 'val_rise'] = rise
  out.loc[index, 'overfit'] = overfit
  out['overfit'] = out['overfit'].astype(bool)
  return out


def overfitting(result: Any, margin: float = 0.05) -> pd.DataFrame:
  """Per run: the generalization gap, the best validation point and whether it overfit.

  A run overfits when its final validation loss lies more than `margin` (relative) above
  its lowest validation loss, while its training loss at the end is below its training
  loss at that lowest point: the training loss kept falling while the validation loss rose.

  Args:
    result: a `sweep.Result` (anything with `.table` and `.curves`).
    margin: the relative rise of the validation loss that counts, 0.05 for 5 %.

  Returns:
    A DataFrame indexed by run with columns `generalization_gap` (final_val_loss -
    final_train_loss), `best_val_eval` (the first evaluation point of the lowest validation
    loss; 0 is before training), `best_val_epoch` (its epoch), `val_rise` ((final - lowest
    validation loss) / |lowest|) and `overfit` (bool). Without validation curves the numbers
    are NaN and `overfit` is False.
  """
  return _overfitting_frame(result.table, getattr(result, 'curves', None), margin)


def annotate_overfitting(
  table: pd.DataFrame, curves: pd.DataFrame | None, margin: float = 0.05
) -> pd.DataFrame:
  """A copy of a results table with `overfitting`'s columns added (replaced if present).

  Args:
    table: one row per run, with a `run` column (or the run ids as its index).
    curves: the runs' curves (columns run, eval, val_loss, train_loss, epoch, ...).
    margin: as in `overfitting`.

  Returns:
    The table with columns generalization_gap, best_val_eval, best_val_epoch, val_rise and
    overfit, in the table's row order.
  """
  frame = _overfitting_frame(table, curves, margin)
  runs = table['run'].to_numpy() if 'run' in table.columns else table.index.to_numpy()
  out = table.drop(columns=[c for c in OVERFITTING_COLUMNS if c in table.columns])
  for column in OVERFITTING_COLUMNS:
    out[column] = frame[column].reindex(runs).to_numpy()
  out['overfit'] = out['overfit'].astype(bool)
  return out


# ------------------------------------------------------------- noise scale ----


def noise_scale(
  g_small_sq: Any, g_big_sq: Any, b_small: Any, b_big: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The simple gradient noise scale from gradient norms at two batch sizes.

  McCandlish et al. 2018 ("An empirical model of large-batch training", appendix A): a
  mean gradient over a batch of b examples has E|G_b|^2 = |G|^2 + tr(Sigma) / b, with G the
  true gradient and Sigma the per-example gradient covariance. Two batch sizes give the
  unbiased estimates
    |G|^2    = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small),
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big),
  and B_noise = tr(Sigma) / |G|^2, the batch size near which larger batches stop paying.
  One measurement is noisy: average |G|^2 and tr(Sigma) (e.g. over steps) before taking
  their ratio, as the paper does.

  Args:
    g_small_sq: squared norms |G_small|^2 of mean gradients over b_small examples; any
      shape, broadcast against the others.
    g_big_sq: squared norms |G_big|^2 over b_big examples.
    b_small: the smaller batch size.
    b_big: the larger batch size.

  Returns:
    (B_noise, tr_sigma, g_sq), float64 arrays of the broadcast shape; B_noise is NaN where
    the |G|^2 estimate is not positive.

  Raises:
    ConfigError: batch sizes that are not positive or are equal.
  """
  g_small_sq, g_big_sq, b_small, b_big = (
    np.asarray(a, np.float64) for a in (g_small_sq, g_big_sq, b_small, b_big)
  )
  if np.any(b_small <= 0) or np.any(b_big <= 0):
    raise config_error(
      'batch sizes', (b_small.tolist(), b_big.tolist()), 'expected positive batch sizes'
    )
  if np.any(b_small == b_big):
    raise config_error(
      'batch sizes', (b_small.tolist(), b_big.tolist()), 'expected two different batch sizes'
    )
  g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
  tr_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
  with np.errstate(divide='ignore', invalid='ignore'):
    b_noise = np.where(g_sq > 0, tr_sigma / np.where(g_sq > 0, g_sq, 1.0), np.nan)
  return b_noise, tr_sigma, g_sq
