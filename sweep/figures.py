"""The figures of a sweep report, each a function of the sweep's data frames.

Each figure function takes a `Result` (its `table`, `curves` and `config`) and returns a
`_Section`: the PNG bytes, or why the figure was not drawn. `sweep.report` assembles them
into the HTML page.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib import patches, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sweep import analysis
from sweep.expansion import axis_columns
from sweep.results import Result

if TYPE_CHECKING:
  from sweep.lr_find import LRFinderResult

REPORT_DIR = 'report'
FIGURES = (
  'heatmap',
  'curves',
  'pareto',
  'lr_find',
  'noise_scale',
  'batch_size',
  'search',
  'batch_schedules',
)

TOP_RUNS = 5  # runs drawn in curves.png
MAX_CELL_LABELS = 120  # heatmap cells beyond which values are not written in the cells
DPI = 110

LABELS = {
  'final_val_loss': 'final validation loss',
  'best_val_loss': 'best validation loss',
  'final_train_loss': 'final training loss',
  'final_batch_loss': 'final batch loss',
  'final_val_accuracy': 'final validation accuracy (fraction)',
  'final_train_accuracy': 'final training accuracy (fraction)',
  'best_val_accuracy': 'best validation accuracy (fraction)',
  'updates': 'updates per run (optimizer steps)',
  'examples': 'training examples seen',
  'epoch': 'epochs (passes over the training set)',
  'seconds': 'wall time per run (s)',
  'learning_rate': 'learning rate',
  'batch_size': 'batch size (examples per update)',
}


# --------------------------------------------------------------------- helpers ----


def _g(v: Any, digits: int = 4) -> str:
  """A number for people: 4 significant digits, integers as they are, '–' for missing."""
  if v is None:
    return '–'
  if isinstance(v, bool | np.bool_):
    return str(bool(v))
  if isinstance(v, int | np.integer):
    return str(int(v))
  try:
    f = float(v)
  except (TypeError, ValueError):
    return str(v)
  if math.isnan(f):
    return '–'
  if math.isinf(f):
    return '∞' if f > 0 else '-∞'
  if f.is_integer() and abs(f) < 1e6:
    return str(int(f))
  return f'{f:.{digits}g}'


def _tick(v: float) -> str:
  """A short tick label for a learning rate or batch size: 0.001, 3e-05, 30, 128."""
  text = f'{v:.2g}'
  if 'e' in text:
    mantissa, exponent = text.split('e')
    text = f'{mantissa}e{int(exponent)}'
  return text


def _e(text: Any) -> str:
  return html.escape(str(text), quote=True)


def _spans_decades(values: Any) -> bool:
  """Whether the finite positive values span at least a factor of 10 (and none is <= 0)."""
  v = np.asarray(values, np.float64).reshape(-1)
  v = v[np.isfinite(v)]
  if len(v) == 0 or np.any(v <= 0):
    return False
  return float(v.max() / v.min()) >= 10.0


def _ok(table: pd.DataFrame) -> pd.DataFrame:
  if 'status' not in table.columns:
    return table
  return table[table['status'] == 'ok']


def _has_values(table: pd.DataFrame, column: str) -> bool:
  return column in table.columns and bool(
    np.isfinite(pd.to_numeric(table[column], errors='coerce')).any()
  )


def _metric(table: pd.DataFrame) -> str:
  """The loss runs are ranked by: the final validation loss, else the final training loss."""
  return 'final_val_loss' if _has_values(table, 'final_val_loss') else 'final_train_loss'


def _loss_name(config: dict) -> str:
  loss = config.get('loss')
  return loss if isinstance(loss, str) else 'custom loss'


def _panel_keys(table: pd.DataFrame) -> list[str]:
  """The axes that get a panel (or a series) of their own: optimizer and schedule, when
  they vary."""
  return [
    k
    for k in ('optimizer', 'schedule')
    if k in table.columns and table[k].nunique(dropna=False) > 1
  ]


def _panels(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
  keys = _panel_keys(table)
  if not keys:
    return [('', table)]
  out = []
  for key, sub in table.groupby(keys, sort=True, dropna=False):
    key = key if isinstance(key, tuple) else (key,)
    out.append((', '.join(str(k) for k in key), sub))
  return out


def _axes(table: pd.DataFrame, config: dict | None) -> list[str]:
  """The hyperparameter columns of the table, in the sweep's order (with the config, the
  hyperparameters of optimizer factories too)."""
  return axis_columns(list(table.columns), config)


def _averaged_axes(table: pd.DataFrame, config: dict | None = None) -> list[str]:
  """Axes (other than those drawn) whose values a cell of the heatmap averages over."""
  drawn = {'learning_rate', 'batch_size', 'optimizer', 'schedule'}
  return [a for a in _axes(table, config) if a not in drawn and table[a].nunique(dropna=False) > 1]


def _varying(table: pd.DataFrame, config: dict | None = None) -> list[str]:
  """The axes whose values differ between runs, in the sweep's order."""
  return [a for a in _axes(table, config) if table[a].nunique(dropna=False) > 1]


def _run_label(
  row: pd.Series, table: pd.DataFrame, config: dict | None = None, seed: bool = True
) -> str:
  """lr=…, B=…, then the other axes that vary (the seed left out with seed=False)."""
  parts = []
  if 'learning_rate' in row:
    parts.append(f'lr={_g(row["learning_rate"], 3)}')
  if 'batch_size' in row:
    parts.append(f'B={_g(row["batch_size"])}')
  for a in _varying(table, config):
    if a in ('learning_rate', 'batch_size') or (a == 'seed' and not seed):
      continue
    parts.append(
      f'{a} {row[a]}' if a in ('optimizer', 'schedule', 'seed') else f'{a}={_g(row[a], 3)}'
    )
  return ', '.join(parts) or f'run {int(row["run"])}'


def _axis_label(column: str, log: bool) -> str:
  """The label of a column's axis, '(log scale)' added (inside a closing parenthesis)."""
  label = LABELS.get(column, column)
  if not log:
    return label
  return label[:-1] + ', log scale)' if label.endswith(')') else label + ' (log scale)'


def _log_ticks(low: float, high: float) -> np.ndarray:
  """Round ticks (1, 2, 5 x 10^k, or every digit when those are too few) within [low, high]."""
  for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(range(1, 10))):
    decades = np.arange(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    ticks = np.array(sorted(m * 10.0**k for k in decades for m in subs))
    ticks = ticks[(ticks >= low * (1 - 1e-9)) & (ticks <= high * (1 + 1e-9))]
    if 3 <= len(ticks) <= 8 or (subs == tuple(range(1, 10)) and len(ticks) >= 2):
      return ticks
    if len(ticks) > 8:
      return ticks[:: math.ceil(len(ticks) / 8)]
  return np.array([low, high])


def _label_log_axis(axis: Any, values: Any, fmt=None, at_values: bool = False) -> None:
  """Plain-number ticks on a log axis, not 10^k notation.

  Args:
    axis: a matplotlib Axis on a log scale.
    values: the data along it.
    fmt: number -> label; 3 significant digits by default.
    at_values: ticks at the values themselves when there are at most 8 of them (for
      values that come from a grid, such as updates or learning rates).
  """
  fmt = fmt or (lambda x: _g(x, 3))
  v = np.asarray(values, np.float64).reshape(-1)
  v = np.unique(v[np.isfinite(v) & (v > 0)])
  if len(v) == 0:
    return
  if at_values and len(v) <= 8:
    ticks = v
  else:
    # The visible range (which lines such as reference levels may have widened), not the data's.
    ax = axis.axes
    low, high = ax.get_xlim() if axis is ax.xaxis else ax.get_ylim()
    low, high = min(low, high), max(low, high)
    if not (low > 0 and math.isfinite(high)):
      low, high = float(v.min()), float(v.max())
    ticks = _log_ticks(low, high)
  axis.set_major_locator(ticker.FixedLocator(ticks))
  axis.set_minor_locator(ticker.NullLocator())
  axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: fmt(x)))


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=DPI)
  return buf.getvalue()


@dataclasses.dataclass
class _Section:
  """One figure of the report: its PNG bytes, or why it was not drawn."""

  name: str
  caption: str = ''
  png: bytes | None = None
  note: str = ''


class _Skip(Exception):
  """A figure's data is absent; the message says what is missing."""


# --------------------------------------------------------------------- figures ----


MAX_GRID_VALUES = 24  # distinct values of an axis beyond which the heatmap bins them


@dataclasses.dataclass
class _Cells:
  """How one axis of the heatmap is cut: a cell per value tried, or bins of a range."""

  labels: list[str]
  binned: bool
  edges: np.ndarray | None = None
  values: np.ndarray | None = None

  def index(self, v: float) -> int:
    if not self.binned:
      return int(np.searchsorted(self.values, v))
    return int(np.clip(np.searchsorted(self.edges, v, side='right') - 1, 0, len(self.labels) - 1))


def _cells(values: pd.Series, config: dict, field: str, fmt) -> _Cells:
  """One cell per distinct value, or (for values sampled from a range, or too many to show)
  bins: log-spaced where the values are positive and span a factor of 10, else even."""
  v = np.sort(pd.to_numeric(values).unique().astype(np.float64))
  space = str(((config.get('search') or {}).get('spaces') or {}).get(field, ''))
  continuous = space.startswith(('loguniform', 'uniform', 'randint'))
  if not (continuous or len(v) > MAX_GRID_VALUES) or len(v) < 4:
    return _Cells([fmt(x) for x in v], False, values=v)
  k = int(np.clip(round(1.5 * math.sqrt(len(v))), 3, 12))
  if _spans_decades(v):
    edges = np.geomspace(v[0], v[-1], k + 1)
  else:
    edges = np.linspace(v[0], v[-1], k + 1)
  labels = [f'{fmt(lo)}–{fmt(hi)}' for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
  return _Cells(labels, True, edges=edges)


def _best(result: Result) -> pd.Series | None:
  """The best configuration (`analysis.best_configurations`' first row), or None."""
  ranked = analysis.best_configurations(result, _metric(result.table))
  return None if ranked.empty else ranked.iloc[0]


def _in_panel(best: pd.Series | None, sub: pd.DataFrame, table: pd.DataFrame) -> bool:
  """Whether the best configuration's runs are in this heatmap panel (a ramp run's are in
  none: it has no one batch size)."""
  if best is None or not set(best['runs']) <= set(table['run'].astype(int)):
    return False
  return all(best[k] == sub[k].iloc[0] for k in _panel_keys(table))


def _cell_meaning(table: pd.DataFrame, config: dict | None) -> tuple[str, str]:
  """(the title's words for a cell's value, the caption's), from the axes a cell holds."""
  others = [a for a in _averaged_axes(table, config) if a != 'seed']
  seeds = 'seed' in table.columns and table['seed'].nunique() > 1
  value = 'mean over seeds of the runs that did not diverge' if seeds else 'the run'
  if others:
    return (
      f': per cell, the best {" and ".join(others)} ({value})',
      f'; a cell shows its best {" and ".join(others)} by the {value}',
    )
  if seeds:
    return f': {value}', ', the mean over seeds (runs that diverged left out of the mean)'
  return ' of each run (one per cell)', ''


def _cell_values(
  sub: pd.DataFrame, metric: str, rows: _Cells, columns: _Cells, config: dict | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(value, runs tried, runs diverged) per heatmap cell (batch size rows, learning rate
  columns). A cell's value is its best configuration's seed mean: among the configurations
  whose every seed finished when it has any, else among the seeds that did."""
  shape = (len(rows.labels), len(columns.labels))
  values, tried, diverged = np.full(shape, np.nan), np.zeros(shape, int), np.zeros(shape, int)
  ok = (sub['status'] == 'ok').to_numpy() if 'status' in sub.columns else np.ones(len(sub), bool)
  metric_values = pd.to_numeric(sub[metric], errors='coerce').to_numpy(np.float64)
  good = ok & np.isfinite(metric_values)
  keys = analysis._config_columns(sub, config)
  config_id = sub.groupby(keys, dropna=False, sort=False).ngroup().to_numpy()
  cell = [
    (rows.index(float(b)), columns.index(float(lr)))
    for b, lr in zip(sub['batch_size'], sub['learning_rate'], strict=True)
  ]
  complete: dict[tuple[int, int], list[float]] = {}
  partial: dict[tuple[int, int], list[float]] = {}
  for c in np.unique(config_id):
    idx = np.flatnonzero(config_id == c)
    where = cell[idx[0]]
    if good[idx].any():
      target = complete if good[idx].all() else partial
      target.setdefault(where, []).append(float(metric_values[idx][good[idx]].mean()))
  for k, where in enumerate(cell):
    tried[where] += 1
    diverged[where] += int(not ok[k])
  for where in set(complete) | set(partial):
    values[where] = min(complete.get(where) or partial[where])
  return values, tried, diverged


def _heatmap(result: Result) -> _Section:
  table = analysis.constant_batch(result.table)  # a ramp run has no one batch size
  for column in ('learning_rate', 'batch_size'):
    if column not in table.columns:
      raise _Skip(f'the results table has no {column} column.')
  metric = _metric(table)
  if metric not in table.columns:
    raise _Skip('the results table holds no final loss.')
  columns = _cells(table['learning_rate'], result.config, 'learning_rate', _tick)
  rows = _cells(
    table['batch_size'], result.config, 'batch_size', lambda x: _g(round(x) if x > 10 else x, 3)
  )
  lrs, bss = columns.labels, rows.labels

  best = _best(result)
  grids = []
  for title, sub in _panels(table):
    values, tried, diverged = _cell_values(sub, metric, rows, columns, result.config)
    where = None
    if _in_panel(best, sub, table):
      where = (rows.index(float(best['batch_size'])), columns.index(float(best['learning_rate'])))
    grids.append((title, values, tried, diverged, where))

  finite = np.concatenate([g[1][np.isfinite(g[1])] for g in grids])
  if len(finite) and _spans_decades(finite):
    norm = mcolors.LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
  elif len(finite):
    low, high = float(finite.min()), float(finite.max())
    norm = mcolors.Normalize(vmin=low, vmax=high if high > low else low + 1e-12)
  else:
    norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
  cmap = matplotlib.colormaps['viridis']

  n = len(grids)
  ncols = min(n, 3)
  nrows = math.ceil(n / ncols)
  width = max(4.8, 0.62 * len(lrs) + 2.2) * ncols + 1.2
  height = max(3.4, 0.5 * len(bss) + 2.3) * nrows + 0.9
  fig = _new_figure(width, height)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  mesh = None
  label_cells = len(lrs) * len(bss) * n <= MAX_CELL_LABELS
  any_all_diverged = any_partial = False
  for k, (title, values, tried, diverged, where) in enumerate(grids):
    ax = axes[k // ncols][k % ncols]
    # One column per learning rate tried and one row per batch size: the grids are usually
    # log-spaced, and equal cells keep an irregular grid readable.
    mesh = ax.pcolormesh(
      np.ma.masked_invalid(values), cmap=cmap, norm=norm, edgecolors='white', linewidth=0.5
    )
    for i in range(len(bss)):
      for j in range(len(lrs)):
        if tried[i, j] == 0:
          continue
        if not np.isfinite(values[i, j]):
          any_all_diverged = any_all_diverged or diverged[i, j] > 0
          ax.add_patch(
            patches.Rectangle(
              (j, i), 1, 1, facecolor='0.85', edgecolor='0.55', hatch='///', linewidth=0.5
            )
          )
          ax.plot([j + 0.5], [i + 0.5], marker='x', color='0.2', markersize=9, markeredgewidth=2)
          continue
        if label_cells:
          text = _g(values[i, j], 3)
          if diverged[i, j]:
            text += f'\n{diverged[i, j]}/{tried[i, j]} div.'
          shade = float(np.ma.filled(norm(values[i, j]), 0.0))
          ax.text(
            j + 0.5,
            i + 0.5,
            text,
            ha='center',
            va='center',
            fontsize=7.5,
            color='white' if shade < 0.6 else 'black',
          )
        if diverged[i, j]:
          any_partial = True
          ax.plot(
            [j + 0.85], [i + 0.85], marker='x', color='red', markersize=5, markeredgewidth=1.5
          )
    if where is not None:
      i, j = where
      ax.add_patch(patches.Rectangle((j, i), 1, 1, fill=False, edgecolor='red', linewidth=2.5))
    ax.set_xlim(0, len(lrs))
    ax.set_ylim(0, len(bss))
    ax.set_xticks(np.arange(len(lrs)) + 0.5, lrs)
    ax.set_yticks(np.arange(len(bss)) + 0.5, bss)
    if len(lrs) > 6 or columns.binned:
      ax.tick_params(axis='x', labelrotation=45)
    ax.set_xlabel(
      'learning rate (bins of the range sampled)'
      if columns.binned
      else 'learning rate (one column per value tried)'
    )
    ax.set_ylabel(
      'batch size (bins of the range sampled)'
      if rows.binned
      else 'batch size (examples per update)'
    )
    if title:
      ax.set_title(title)
  for k in range(n, nrows * ncols):
    axes[k // ncols][k % ncols].set_visible(False)
  what, over = _cell_meaning(table, result.config)
  frame = '\n(red frame: the best configuration)' if best is not None else ''
  fig.suptitle(f'{LABELS.get(metric, metric)}{what}{frame}', fontsize=10)
  if len(finite):
    log = isinstance(norm, mcolors.LogNorm)
    bar = fig.colorbar(
      mesh,
      ax=axes.ravel().tolist(),
      shrink=0.9,
      label=f'{LABELS.get(metric, metric)}, '
      f'{_loss_name(result.config)}{" (log scale)" if log else ""}',
    )
    if log:
      _label_log_axis(bar.ax.yaxis, finite)
  handles = []
  if any_all_diverged:
    handles.append(
      patches.Patch(facecolor='0.85', edgecolor='0.55', hatch='///', label='every run diverged (x)')
    )
  if any_partial:
    handles.append(
      matplotlib.lines.Line2D(
        [], [], marker='x', color='red', linestyle='none', label='some runs diverged (k/n div.)'
      )
    )
  if handles:
    fig.legend(
      handles=handles, loc='outside lower center', ncols=len(handles), fontsize=8, frameon=False
    )
  caption = (
    f'{LABELS.get(metric, metric).capitalize()} of every learning rate and batch size{over}. '
    'Hatched grey cells with an x: every run diverged. The red frame marks the best '
    'configuration (the lowest seed-mean among those whose every seed finished).'
  )
  if columns.binned or rows.binned:
    cut = ' and '.join(
      n for n, c in (('learning rates', columns), ('batch sizes', rows)) if c.binned
    )
    caption += (
      f' The {cut} come from a continuous range (or are too many to show one by one): each is cut '
      'into bins, and a cell averages the runs that fall in it (empty cells: no run).'
    )
    what = ': the best configuration of each cell (seed mean)'
    fig.suptitle(f'{LABELS.get(metric, metric)}{what}{frame}', fontsize=10)
  if metric != 'final_val_loss':
    caption += ' The sweep has no validation set: the training loss is shown instead.'
  if len(grids) > 1:
    caption += (
      ' One panel per ' + ' and '.join(_panel_keys(table)) + '; the colour scale is shared.'
    )
  return _Section('heatmap', caption, _png(fig))


def _x_column(curves: pd.DataFrame) -> str:
  for column in ('epoch', 'examples', 'updates'):
    if column in curves.columns:
      return column
  return 'eval'


def _curves(result: Result) -> _Section:
  curves, table = result.curves, result.table
  if curves is None or curves.empty or 'train_loss' not in curves.columns:
    raise _Skip('the sweep left no learning curves (curves.csv).')
  metric = _metric(table)
  top = analysis.best_configurations(result, metric).head(TOP_RUNS)
  if top.empty:
    raise _Skip('no configuration finished every seed: there is no best run to draw.')
  has_val = 'val_loss' in curves.columns and curves['val_loss'].notna().any()
  xcol = _x_column(curves)
  fig = _new_figure(9.0, 4.6)
  ax = fig.add_subplot()
  palette = matplotlib.colormaps['tab10']
  plotted, handles = [], []
  columns = [c for c in (xcol, 'train_loss', 'val_loss') if c in curves.columns]
  for k, (_, row) in enumerate(top.iterrows()):
    # A configuration's curve: the mean over its seeds at each evaluation point.
    c = curves[curves['run'].isin(row['runs'])].groupby('eval')[columns].mean().sort_index()
    if c.empty:
      continue
    color = palette(k % 10)
    x = c[xcol].to_numpy(np.float64)
    train = c['train_loss'].to_numpy(np.float64)
    first = table.loc[table['run'] == row['runs'][0]].iloc[0]
    label = _run_label(first, table, result.config, seed=False)
    if len(row['runs']) > 1:
      label += f' ({len(row["runs"])} seeds)'
    (line,) = ax.plot(x, train, '-', color=color, marker='.', label=label)
    plotted.append(train)
    if has_val:
      val = c['val_loss'].to_numpy(np.float64)
      ax.plot(x, val, '--', color=color, marker='.')
      plotted.append(val)
    handles.append(line)
  if not handles:
    raise _Skip('the best runs have no curves in curves.csv.')
  values = np.concatenate(plotted)
  if _spans_decades(values):
    ax.set_yscale('log')
    _label_log_axis(ax.yaxis, values)
  ax.set_xlabel(LABELS.get(xcol, xcol))
  scale = ' (log scale)' if ax.get_yscale() == 'log' else ''
  ax.set_ylabel(f'loss, {_loss_name(result.config)}{scale}')
  what = 'train (solid) and validation (dashed) loss' if has_val else 'training loss'
  ax.set_title(
    f'{what} of the best {len(handles)} configurations by seed-mean {LABELS.get(metric, metric)}',
    fontsize=10,
  )
  # Outside the axes, on the right: the curves cross wherever a legend would go inside.
  fig.legend(handles=handles, loc='outside right upper', fontsize=8, title='run', title_fontsize=8)
  if has_val:
    styles = [
      matplotlib.lines.Line2D([], [], color='0.3', linestyle='-', label='training loss'),
      matplotlib.lines.Line2D([], [], color='0.3', linestyle='--', label='validation loss'),
    ]
    fig.legend(handles=styles, loc='outside right lower', fontsize=8)
  ax.grid(True, which='both', alpha=0.3)
  caption = (
    f'The {len(handles)} configurations with the lowest seed-mean {LABELS.get(metric, metric)} '
    '(every seed finished; each curve the mean over its seeds); the training loss is measured '
    'on a fixed subset of the training set at each evaluation.'
  )
  if not has_val:
    caption += ' There is no validation set.'
  return _Section('curves', caption, _png(fig))


def _objectives(result: Result) -> dict[str, str]:
  """The Pareto objectives as the table was annotated: the config's, or without a validation
  set (as `sweep.results.objectives` falls back) the final training loss and updates."""
  table = result.table
  objectives = dict(result.config.get('objectives') or {})
  if objectives and all(c in table.columns for c in objectives):
    return objectives
  return {_metric(table): 'min', 'updates': 'min'}


def _objective_columns(result: Result) -> tuple[tuple[str, str], tuple[str, str]]:
  """((y column, sense), (x column, sense)) of the Pareto figure."""
  items = list(_objectives(result).items())
  if len(items) == 2:
    return items[0], items[1]
  return (_metric(result.table), 'min'), ('updates', 'min')


def _pareto(result: Result) -> _Section:
  table = result.table
  if 'pareto' not in table.columns:
    raise _Skip('the results table has no pareto column.')
  (ycol, ysense), (xcol, xsense) = _objective_columns(result)
  if ycol not in table.columns or xcol not in table.columns:
    raise _Skip(f'the results table lacks {ycol} or {xcol}.')
  ok = _ok(table)
  x = pd.to_numeric(ok[xcol], errors='coerce').to_numpy(np.float64)
  y = pd.to_numeric(ok[ycol], errors='coerce').to_numpy(np.float64)
  finite = np.isfinite(x) & np.isfinite(y)
  ok, x, y = ok[finite], x[finite], y[finite]
  if ok.empty:
    raise _Skip('no run finished without diverging.')
  front = ok['pareto'].astype(bool).to_numpy()
  fig = _new_figure(7.0, 4.6)
  ax = fig.add_subplot()
  ax.scatter(
    x[~front], y[~front], s=22, color='0.6', label=f'other runs ({int(np.sum(~front))})', zorder=2
  )
  order = np.argsort(x[front], kind='stable')
  fx, fy = x[front][order], y[front][order]
  ax.step(fx, fy, where='post', color='C3', linewidth=1.5, zorder=3)
  ax.scatter(
    fx,
    fy,
    s=45,
    color='C3',
    edgecolor='black',
    linewidth=0.6,
    label=f'Pareto front ({len(fx)})',
    zorder=4,
  )
  log_x = bool(np.all(x > 0))
  if len(fx) <= 12:
    position = np.log(x) if log_x else x
    middle = (position.min() + position.max()) / 2
    rows = ok[front].iloc[order]
    for k in range(len(fx)):
      right = position[front][order][k] > middle  # labels point inwards, away from the frame
      # On the side of the front that no run reaches (below it when y is minimised).
      below = ysense == 'min'
      ax.annotate(
        _run_label(rows.iloc[k], table, result.config),
        (fx[k], fy[k]),
        textcoords='offset points',
        xytext=(-6 if right else 6, -6 if below else 6),
        ha='right' if right else 'left',
        va='top' if below else 'bottom',
        fontsize=7,
      )
  ax.margins(x=0.06, y=0.12)  # room for the labels of the front's outer points
  if log_x:
    ax.set_xscale('log')
    _label_log_axis(ax.xaxis, x, at_values=True)
  if _spans_decades(y):
    ax.set_yscale('log')
    _label_log_axis(ax.yaxis, y)
  ax.set_xlabel(_axis_label(xcol, ax.get_xscale() == 'log'))
  ax.set_ylabel(_axis_label(ycol, ax.get_yscale() == 'log'))
  goal = ', '.join(
    f'{"minimise" if sense == "min" else "maximise"} {column}'
    for column, sense in ((ycol, ysense), (xcol, xsense))
  )
  ax.set_title(f'Pareto front of the runs that did not diverge\n({goal})', fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(True, which='both', alpha=0.3)
  diverged = len(table) - len(_ok(table))
  caption = (
    f'Every run that did not diverge; the Pareto front on ({ycol}, {xcol}) in red, joined as a '
    'step '
    f'line. {diverged} diverged run(s) left out.'
  )
  return _Section('pareto', caption, _png(fig))


def _lr_find(lr_finder: LRFinderResult | None, workdir: str) -> _Section:
  found = lr_finder if lr_finder is not None else _load_lr_find(workdir)
  if found is None:
    raise _Skip(
      'no learning-rate range test: pass lr_finder= or save one to lr_find.csv '
      '(with lr_find.json) in the workdir (LRFinderResult.save).'
    )
  if not np.isfinite(np.asarray(found.losses, np.float64)).any():
    raise _Skip('the range test holds no finite loss.')
  fig = _new_figure(7.0, 4.6)
  ax = fig.add_subplot()
  found.plot(ax)
  ax.set_xlabel('learning rate (log scale)')
  ax.set_ylabel('loss' if found.method == 'ramp' else 'training loss after the budget')
  ax.title.set_fontsize(10)
  ax.grid(True, which='major', alpha=0.3)
  rules = ', '.join(f'{k} {_g(v, 3)}' for k, v in found.suggestions.items())
  caption = (
    f'Learning-rate range test ({found.method}): suggestions {rules}; the dotted line marks the '
    f'{found.suggest} rule.'
  )
  return _Section('lr_find', caption, _png(fig))


def _noise_scale(result: Result) -> _Section:
  curves, table = result.curves, result.table
  if curves is None or curves.empty or 'noise_scale' not in curves.columns:
    raise _Skip('the curves hold no gradient noise scale (a noise_scale column).')
  c = curves.copy()
  c['noise_scale'] = pd.to_numeric(c['noise_scale'], errors='coerce')
  c = c[np.isfinite(c['noise_scale']) & (c['noise_scale'] > 0)]
  if 'batch_size' not in c.columns:
    if 'batch_size' not in table.columns:
      raise _Skip('the results table has no batch_size column.')
    c = c.merge(table[['run', 'batch_size']].reset_index(drop=True), on='run', how='left')
  ok_runs = set(_ok(table)['run'].tolist())
  c = c[c['run'].isin(ok_runs)]
  if c.empty:
    raise _Skip('no run that did not diverge has a positive, finite noise scale.')
  xcol = 'examples' if 'examples' in c.columns else _x_column(c)
  fig = _new_figure(7.0, 4.6)
  ax = fig.add_subplot()
  for k, (b, g) in enumerate(c.groupby('batch_size', sort=True)):
    mean = g.groupby('eval')[[xcol, 'noise_scale']].mean().sort_index()
    color = f'C{k % 10}'
    ax.plot(mean[xcol], mean['noise_scale'], '-', marker='.', color=color, label=f'B={_g(b)}')
    ax.axhline(float(b), color=color, linestyle=':', linewidth=1)
  ax.set_yscale('log')
  _label_log_axis(ax.yaxis, c['noise_scale'])
  if xcol == 'examples' and (c[xcol] > 0).all() and _spans_decades(c[xcol]):
    ax.set_xscale('log')
  ax.set_xlabel(_axis_label(xcol, ax.get_xscale() == 'log'))
  ax.set_ylabel('gradient noise scale B_noise (examples, log scale)')
  ax.set_title(
    'gradient noise scale per batch size (mean over runs; dotted: the batch size)', fontsize=10
  )
  ax.legend(fontsize=8, title='batch size', title_fontsize=8)
  ax.grid(True, which='both', alpha=0.3)
  caption = (
    'The simple gradient noise scale (McCandlish et al. 2018) during training, averaged over the '
    'runs '
    'of each batch size that did not diverge; batches well above it gain little per example.'
  )
  return _Section('noise_scale', caption, _png(fig))


def _scaling(result: Result) -> list[dict[str, Any]]:
  """Per optimizer/schedule combination: its batch-size table and learning-rate slope."""
  table = result.table
  metric = _metric(table)
  out = []
  for title, sub in _panels(table):
    part = SimpleNamespace(table=sub, curves=result.curves, config=result.config)
    entry: dict[str, Any] = {'title': title, 'metric': metric}
    try:
      entry['table'] = analysis.batch_size_table(part, metric)
      entry['slope'] = analysis.lr_batch_slope(part, metric)
    except (ValueError, KeyError) as e:  # ConfigError is a ValueError; a report shows what it can
      entry['error'] = str(e)
    out.append(entry)
  return out


def _choice(result: Result) -> analysis.BatchSizeChoice | str:
  """`analysis.choose_batch_size` of the whole sweep, or why there is none."""
  if 'batch_size' not in result.table.columns:
    return 'the results table has no batch_size column.'
  try:
    return analysis.choose_batch_size(result)
  except (ValueError, KeyError) as e:  # ConfigError is a ValueError; a report shows what it can
    return str(e)


def _batch_size(result: Result, scaling: list[dict[str, Any]], choice: Any = None) -> _Section:
  usable = [s for s in scaling if 'slope' in s and s['slope']['n'] >= 2]
  if not usable:
    sizes = result.table['batch_size'].nunique() if 'batch_size' in result.table.columns else 0
    if sizes < 2:
      raise _Skip(
        f'the sweep has {sizes} batch size{"" if sizes == 1 else "s"}: a slope needs 2 at least.'
      )
    raise _Skip('fewer than two batch sizes have a learning rate at which every seed finished.')
  fig = _new_figure(7.0, 4.8)
  ax = fig.add_subplot()
  # Learning rates drawn from a range are no grid: round ticks, not one per value.
  sampled = 'learning_rate' in ((result.config.get('search') or {}).get('spaces') or {})
  all_b, all_lr = [], []
  for k, s in enumerate(usable):
    fit = s['slope']
    b, lr = fit['batch_sizes'], fit['best_lrs']
    edge = s['table']['lr_at_edge'].to_numpy(bool)
    color = f'C{k % 10}'
    prefix = f'{s["title"]}: ' if s['title'] else ''
    ax.scatter(
      b[~edge], lr[~edge], s=40, color=color, zorder=3, label=f'{prefix}best learning rate'
    )
    if edge.any():
      ax.scatter(
        b[edge],
        lr[edge],
        s=40,
        facecolor='white',
        edgecolor=color,
        linewidth=1.5,
        zorder=3,
        label=f'{prefix}best at the edge of the {"range" if sampled else "grid"}',
      )
    bb = np.geomspace(b.min(), b.max(), 50)
    interval = ''
    if math.isfinite(fit['ci_low']) and math.isfinite(fit['ci_high']):
      interval = f', 95% CI {fit["ci_low"]:.2f} to {fit["ci_high"]:.2f}'
    ax.plot(
      bb,
      math.exp(fit['intercept']) * bb ** fit['slope'],
      '-',
      color=color,
      label=f'{prefix}fit: slope {fit["slope"]:.2f}{interval}',
    )
    all_b.append(b)
    all_lr.append(lr)
  b, lr = np.concatenate(all_b), np.concatenate(all_lr)
  b0, lr0 = math.exp(np.mean(np.log(b))), math.exp(np.mean(np.log(lr)))
  bb = np.geomspace(b.min(), b.max(), 50)
  ax.plot(bb, lr0 * (bb / b0) ** 1.0, '--', color='0.35', label='linear scaling (slope 1)')
  ax.plot(bb, lr0 * (bb / b0) ** 0.5, ':', color='0.35', label='square-root scaling (slope 0.5)')
  tried = np.sort(pd.to_numeric(result.table['learning_rate']).unique().astype(np.float64))
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  sizes = np.unique(b)
  ax.xaxis.set_major_locator(ticker.FixedLocator(sizes))
  ax.xaxis.set_major_formatter(ticker.FixedFormatter([_g(v) for v in sizes]))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  low, high = ax.get_ylim()
  shown = tried[(tried >= low) & (tried <= high)]
  for v in shown:
    ax.axhline(v, color='0.85', linewidth=0.8, zorder=0)
  _label_log_axis(ax.yaxis, shown if len(shown) else lr, _tick, at_values=not sampled)
  recommended = getattr(choice, 'batch_size', None)
  if recommended is not None and b.min() <= recommended <= b.max():
    ax.axvline(
      recommended,
      color='C3',
      linewidth=6,
      alpha=0.15,
      zorder=0,
      label=f'recommended batch size {_g(recommended)}',
    )
  ax.set_xlabel('batch size (examples per update, log scale)')
  ax.set_ylabel('best learning rate (log scale)')
  ax.set_title(
    f'best learning rate per batch size (by seed-mean {LABELS.get(usable[0]["metric"], "loss")})\n'
    'grey lines: the learning rates tried',
    fontsize=10,
  )
  ax.legend(fontsize=7.5, loc='best')
  ax.grid(True, which='major', alpha=0.3)
  caption = (
    'The learning rate with the lowest seed-mean loss at each batch size, the least-squares line '
    'of '
    'log(best lr) on log(batch size), and the slopes of linear (1) and square-root (0.5) scaling '
    "through the points' geometric mean. Hollow points lie at the edge of the learning-rate grid."
  )
  if getattr(choice, 'batch_size', None) is not None:
    caption += ' The shaded band marks the recommended batch size.'
  return _Section('batch_size', caption, _png(fig))


def _search(result: Result) -> _Section:
  """An adaptive search: every run's metric against examples, where each one ended (successive
  halving, median stopping, patience); or PBT's learned learning rates and its copies."""
  sched = result.config.get('scheduler')
  if not sched:
    raise _Skip('the sweep had no scheduler.')
  curves, table = result.curves, result.table
  metric = 'val_loss' if 'val_loss' in curves.columns else 'train_loss'
  xcol = _x_column(curves)
  pbt = 'lineage' in table.columns
  fig = _new_figure(10.0, 4.2)
  axes = fig.subplots(1, 2)
  ok = table['status'] == 'ok'
  best = (
    table.loc[
      ok, metric.replace('val_loss', 'final_val_loss').replace('train_loss', 'final_train_loss')
    ]
    if ok.any()
    else None
  )
  norm = None
  if best is not None and len(best) and np.isfinite(best).any():
    norm = matplotlib.colors.Normalize(float(np.nanmin(best)), float(np.nanmax(best)) + 1e-12)
  cmap = matplotlib.colormaps['viridis_r']
  values = []
  for run, c in curves.groupby('run'):
    c = c.sort_values('eval')
    status = table.loc[run, 'status']
    x, y = c[xcol].to_numpy(np.float64), c[metric].to_numpy(np.float64)
    values.append(y[np.isfinite(y)])
    if status == 'ok' and norm is not None:
      color, width = cmap(norm(float(y[-1]))), 1.4
    else:
      color, width = '0.75', 0.7
    axes[0].plot(x, y, '-', color=color, lw=width)
    if status in ('stopped', 'diverged'):
      axes[0].plot(x[-1:], y[-1:], 'x', color='0.5', ms=3)
    if pbt:
      lr = c['learning_rate'].to_numpy(np.float64)
      axes[1].plot(c['updates'].to_numpy(np.float64), lr, '-', color=color, lw=width)
      for part in (
        str(table.loc[run, 'lineage']).split() if isinstance(table.loc[run, 'lineage'], str) else []
      ):
        point = int(part.split(':')[0])
        if point < len(c):
          axes[0].plot(x[point], y[point], 'o', color='tab:red', ms=3)
  flat = np.concatenate(values) if values else np.array([1.0])
  if _spans_decades(flat):
    axes[0].set_yscale('log')
  axes[0].set_xlabel(LABELS.get(xcol, xcol))
  axes[0].set_ylabel(LABELS.get(metric, metric))
  axes[0].grid(True, alpha=0.3)
  counts = ', '.join(f'{n} {k}' for k, n in table['status'].value_counts().items())
  axes[0].set_title(f'every run ({counts})', fontsize=10)
  if pbt:
    axes[1].set_yscale('log')
    axes[1].set_xlabel('updates')
    axes[1].set_ylabel('learning rate')
    axes[1].set_title('the learned learning rates', fontsize=10)
    axes[1].grid(True, which='both', alpha=0.3)
    caption = (
      "PBT: each member's metric (left; red dots where it copied a better member) and its "
      'learning rate at each evaluation (right), coloured by its final value (grey: diverged).'
    )
  else:
    ended = curves.sort_values('eval').groupby('run')['epoch'].last().round(2)
    counts_by = ended.value_counts().sort_index()
    axes[1].bar(range(len(counts_by)), counts_by.to_numpy(), color='tab:blue')
    axes[1].set_xticks(range(len(counts_by)), [f'{e:g}' for e in counts_by.index], rotation=45)
    axes[1].set_xlabel('epochs when the run ended')
    axes[1].set_ylabel('runs')
    axes[1].set_title('where the runs ended', fontsize=10)
    caption = (
      'Every configuration tried: its metric at each evaluation point (runs trained to the end '
      'coloured by their final value, stopped ones grey, ending with a cross), and how many '
      'runs ended after how many updates.'
    )
  if norm is not None:
    fig.colorbar(
      matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
      ax=axes,
      label=f'final {metric}',
      shrink=0.8,
    )
  return _Section('search', caption, _png(fig))


def _batch_schedules(result: Result) -> _Section:
  """Each strategy (a batch size or batch-size schedule, with the other axes that vary) at
  its best learning rate: its seed-mean curve against epochs and against updates."""
  table, curves = result.table, result.curves
  if 'batch_schedule' not in table.columns:
    raise _Skip('no run changed batch size.')
  metric = _metric(table)
  curve = 'val_loss' if 'val_loss' in curves.columns else 'train_loss'
  strategies = analysis.batch_schedule_table(result, metric).head(8)
  if strategies.empty:
    raise _Skip('every strategy diverged.')
  fig = _new_figure(10.0, 4.2)
  axes = fig.subplots(1, 2, sharey=True)
  colors = matplotlib.colormaps['tab10']
  values = []
  for k, (label, row) in enumerate(strategies.iterrows()):
    runs = curves[curves['run'].isin(row['runs'])]
    mean = runs.groupby('eval')[[curve, 'epoch', 'updates']].mean().sort_index()
    ramp = row.get('batch_schedule') not in (None, 'constant')
    style = dict(color=colors(k % 10), lw=1.6, ls='-' if ramp else '--')
    name = f'{label} (lr {_g(row["learning_rate"], 3)})'
    axes[0].plot(mean['epoch'], mean[curve], label=name, **style)
    axes[1].plot(mean['updates'], mean[curve], **style)
    values.append(mean[curve].to_numpy(np.float64))
  if _spans_decades(np.concatenate(values)):
    axes[0].set_yscale('log')
  axes[0].set_xlabel(LABELS['epoch'])
  axes[1].set_xlabel(LABELS['updates'])
  axes[0].set_ylabel(LABELS.get(curve, curve))
  for ax in axes:
    ax.grid(True, alpha=0.3)
  axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc='upper right')
  best = strategies.iloc[0]
  caption = (
    f'Each strategy at its best learning rate (the seed mean of {metric}, best first): '
    f'against epochs (left) and parameter updates (right); dashed: one batch size, solid: a '
    f'batch-size schedule. Best: {strategies.index[0]}, {metric} {_g(best[metric])} in '
    f'{_g(best["updates"])} updates.'
  )
  return _Section('batch_schedules', caption, _png(fig))


def _draw(name: str, fn, *args) -> _Section:
  """`fn(*args)`'s figure, or a section that says why there is none."""
  try:
    return fn(*args)
  except _Skip as e:
    return _Section(name, note=str(e))


def _load_lr_find(workdir: str):
  from sweep.lr_find import LRFinderResult

  return LRFinderResult.load(workdir)
