"""The report's interactive figures, drawn with plotly and embedded in report.html.

    from sweep import interactive
    if interactive.AVAILABLE:
      figs = interactive.figures(result)   # [(name, Interactive | reason it was not drawn)]

Three figures, each a plotly figure serialised to JSON; the page inlines plotly.js once and
draws every figure from its JSON, so it works offline:

- `parallel`: parallel coordinates, one line per run that finished: the hyperparameters that
  vary, then the objectives. Drag along an axis to filter runs.
- `heatmap`: learning rate x batch size, a panel per optimizer/schedule; hover shows the
  value, the runs tried, diverged and stopped; every run diverged: x; some: a small x;
  stopped by a scheduler: an open circle; the best configuration: a red frame.
- `curves`: every run's loss curves; the best configuration's runs drawn, every other run a
  legend click (or the buttons above the plot) away.

"Best" is `analysis.best_configurations`' first row, as everywhere in the report.

plotly is an optional dependency (`pip install 'lrbs-sweep[report]'`): without it
`AVAILABLE` is False and the report keeps its PNG figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from sweep import analysis
from sweep.figures import (
  LABELS,
  _best,
  _cell_values,
  _cells,
  _e,
  _g,
  _in_panel,
  _loss_name,
  _metric,
  _panels,
  _run_label,
  _Skip,
  _spans_decades,
  _tick,
  _varying,
  _x_column,
)
from sweep.results import Result

try:
  import plotly
  import plotly.graph_objects as go
  import plotly.io as pio
  from plotly.subplots import make_subplots

  AVAILABLE = True
except ImportError:  # the report keeps its PNGs
  AVAILABLE = False

INSTALL_HINT = "pip install 'lrbs-sweep[report]'"
MAX_CURVE_RUNS = 1000  # runs beyond which the curves figure keeps the best ones only
CONFIG = {'displaylogo': False, 'responsive': True}
FONT = {'family': 'system-ui, -apple-system, "Segoe UI", sans-serif', 'size': 12}


@dataclasses.dataclass
class Interactive:
  """One interactive figure: its name (the HTML id), caption and plotly JSON."""

  name: str
  caption: str
  spec: str  # {"data": [...], "layout": {...}} as plotly.io.to_json writes it
  height: int = 450  # pixels: the div's, so that it does not depend on the window's


def plotly_js() -> str:
  """plotly.js itself, to inline once in the page."""
  from plotly.offline import get_plotlyjs

  return get_plotlyjs()


def version() -> str | None:
  return plotly.__version__ if AVAILABLE else None


def html(fig: Interactive) -> str:
  """The figure's div and the script that draws it (plotly.js must come before it)."""
  spec = fig.spec.replace('</', '<\\/')  # no "</script>" inside a string can end the script
  element = f'{fig.name}-plot'  # the page's section is `fig.name`
  return (
    f'<div id="{_e(element)}" class="interactive" style="height: {fig.height}px"></div>\n'
    '<script>(function () { var spec = ' + spec + ';\n'
    f'Plotly.newPlot("{_e(element)}", spec.data, spec.layout, {json.dumps(CONFIG)}); }})();'
    '</script>'
  )


def figures(result: Result) -> list[tuple[str, Interactive | str]]:
  """Each interactive figure, or the reason it was not drawn."""
  out = []
  for name, fn in (('parallel', parallel), ('heatmap', heatmap), ('curves', curves)):
    try:
      out.append((name, fn(result)))
    except _Skip as e:
      out.append((name, str(e)))
  return out


def _layout(**kwargs: Any) -> dict[str, Any]:
  base = {
    'template': 'none',
    'font': FONT,
    'paper_bgcolor': 'white',
    'plot_bgcolor': 'white',
    'margin': {'l': 70, 'r': 30, 't': 50, 'b': 60},
  }
  base.update(kwargs)
  return base


def _interactive(name: str, caption: str, fig: Any) -> Interactive:
  spec = pio.to_json(fig, validate=True, pretty=False)
  return Interactive(name, caption, spec, int(fig.layout.height or 450))


def _finite(values: Any) -> np.ndarray:
  return np.asarray(pd.to_numeric(pd.Series(values), errors='coerce'), np.float64)


# --------------------------------------------------------- parallel coordinates ----


def _objective_columns(result: Result, metric: str) -> list[str]:
  table = result.table
  wanted = [metric, *(result.config.get('objectives') or {})]
  wanted += ['final_val_accuracy', 'updates']
  return [
    c for c in dict.fromkeys(wanted) if c in table.columns and np.isfinite(_finite(table[c])).any()
  ]


def _dimension(column: str, values: pd.Series) -> dict[str, Any]:
  """A parallel-coordinates axis: categories as codes, decades on a log10 axis."""
  label = column.replace('_', ' ')
  numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
  if not numeric:
    categories = sorted(values.astype(str).unique())
    codes = values.astype(str).map({c: k for k, c in enumerate(categories)})
    return {
      'label': label,
      'values': codes.to_numpy(np.float64),
      'tickvals': list(range(len(categories))),
      'ticktext': categories,
    }
  v = _finite(values)
  distinct = np.unique(v[np.isfinite(v)])
  if _spans_decades(v):
    dim = {'label': label + ' (log)', 'values': np.log10(v)}
    ticks = (
      distinct
      if len(distinct) <= 10
      else 10.0
      ** np.arange(
        math.floor(math.log10(distinct.min())), math.ceil(math.log10(distinct.max())) + 1
      )
    )
    dim['tickvals'] = np.log10(ticks).tolist()
    dim['ticktext'] = [_tick(t) for t in ticks]
    return dim
  dim = {'label': label, 'values': v}
  if len(distinct) <= 10:
    dim['tickvals'] = distinct.tolist()
    dim['ticktext'] = [_g(t, 3) for t in distinct]
  return dim


def parallel(result: Result) -> Interactive:
  table = result.table
  metric = _metric(table)
  axes = [a for a in _varying(table, result.config) if a != 'seed']
  if not axes:
    raise _Skip('no hyperparameter varies between runs.')
  objectives = _objective_columns(result, metric)
  ok = table['status'] == 'ok' if 'status' in table.columns else pd.Series(True, table.index)
  finite = np.all([np.isfinite(_finite(table[c])) for c in objectives], axis=0)
  shown = table[ok.to_numpy() & finite]
  if len(shown) < 2:
    raise _Skip('fewer than two runs finished: there is nothing to compare.')
  dims = [_dimension(a, shown[a]) for a in axes] + [_dimension(c, shown[c]) for c in objectives]
  color = _finite(shown[metric])
  log = _spans_decades(color)
  line = {
    'color': np.log10(color) if log else color,
    'colorscale': 'Viridis',  # low = dark, as in the heatmap
    'showscale': True,
    'colorbar': {'title': {'text': metric.replace('_', ' ') + (' (log scale)' if log else '')}},
  }
  if log:  # the values themselves at round ticks, not their logarithms
    ticks = _round_ticks(color[np.isfinite(color) & (color > 0)])
    line['colorbar'].update(tickvals=np.log10(ticks).tolist(), ticktext=[_g(t, 3) for t in ticks])
  fig = go.Figure(go.Parcoords(dimensions=dims, line=line, labelangle=-20, labelside='bottom'))
  fig.update_layout(**_layout(height=460, margin={'l': 70, 'r': 70, 't': 40, 'b': 80}))
  left = len(table) - len(shown)
  caption = (
    f'One line per run that finished ({len(shown)} of {len(table)}), coloured by its '
    f'{LABELS.get(metric, metric)} (dark: lower). Drag along any axis to keep only the runs in '
    'that range; drag an axis by its title to reorder.'
  )
  if left:
    caption += f' {left} run(s) that diverged or were stopped are left out (see the heatmap).'
  return _interactive('parallel', caption, fig)


# --------------------------------------------------------------------- heatmap ----


def _status_counts(sub: pd.DataFrame, rows: Any, columns: Any, status: str) -> np.ndarray:
  counts = np.zeros((len(rows.labels), len(columns.labels)), int)
  if 'status' not in sub.columns:
    return counts
  for b, lr, s in zip(sub['batch_size'], sub['learning_rate'], sub['status'], strict=True):
    if s == status:
      counts[rows.index(float(b)), columns.index(float(lr))] += 1
  return counts


def heatmap(result: Result) -> Interactive:
  table = analysis.constant_batch(result.table)  # a ramp run has no one batch size
  for column in ('learning_rate', 'batch_size'):
    if column not in table.columns:
      raise _Skip(f'the results table has no {column} column.')
  metric = _metric(table)
  columns = _cells(table['learning_rate'], result.config, 'learning_rate', _tick)
  rows = _cells(
    table['batch_size'], result.config, 'batch_size', lambda x: _g(round(x) if x > 10 else x, 3)
  )
  best = _best(result)
  panels = _panels(table)
  grids = []
  for title, sub in panels:
    values, tried, _ = _cell_values(sub, metric, rows, columns, result.config)
    diverged = _status_counts(sub, rows, columns, 'diverged')
    stopped = _status_counts(sub, rows, columns, 'stopped')
    grids.append((title, sub, values, tried, diverged, stopped))
  finite = np.concatenate([g[2][np.isfinite(g[2])] for g in grids])
  log = bool(len(finite)) and _spans_decades(finite)

  fig = make_subplots(
    rows=1,
    cols=len(grids),
    subplot_titles=[g[0] for g in grids] if len(grids) > 1 else None,
    horizontal_spacing=0.08,
  )
  name = LABELS.get(metric, metric)
  x, y = columns.labels, rows.labels
  for k, (title, sub, values, tried, diverged, stopped) in enumerate(grids):
    col = k + 1
    text = [[_g(v, 4) if np.isfinite(v) else '' for v in row] for row in values]
    custom = np.dstack([tried, diverged, stopped])
    fig.add_trace(
      go.Heatmap(
        z=np.log10(values) if log else values,
        x=x,
        y=y,
        text=text,
        customdata=custom,
        coloraxis='coloraxis',
        xgap=1,
        ygap=1,
        hovertemplate=(
          'learning rate %{x}<br>batch size %{y}<br>'
          f'{_e(name)}: %{{text}}<br>runs %{{customdata[0]}}, '
          'diverged %{customdata[1]}, stopped %{customdata[2]}'
          f'<extra>{_e(title)}</extra>'
        ),
        texttemplate='%{text}' if values.size <= 120 else None,
        textfont={'size': 10},
        name=title or 'heatmap',
      ),
      row=1,
      col=col,
    )
    marks = (
      ('every run diverged', (tried > 0) & (diverged == tried), 'x', '#333', 14),
      ('some runs diverged', (diverged > 0) & (diverged < tried), 'x-thin-open', 'red', 9),
      ('stopped by the scheduler', stopped > 0, 'circle-open', '#d62728', 12),
    )
    for label, mask, symbol, color, size in marks:
      i, j = np.nonzero(mask)
      if not len(i):
        continue
      fig.add_trace(
        go.Scatter(
          x=[x[jj] for jj in j],
          y=[y[ii] for ii in i],
          mode='markers',
          marker={'symbol': symbol, 'color': color, 'size': size, 'line': {'width': 2}},
          name=label,
          legendgroup=label,
          showlegend=label not in _shown_labels(fig),
          customdata=np.stack([diverged[i, j], stopped[i, j], tried[i, j]], axis=-1),
          hovertemplate=(
            f'{label}<br>learning rate %{{x}}, batch size %{{y}}<br>diverged '
            '%{customdata[0]}, stopped %{customdata[1]} of %{customdata[2]}<extra></extra>'
          ),
        ),
        row=1,
        col=col,
      )
    if _in_panel(best, sub, table):
      i, j = rows.index(float(best['batch_size'])), columns.index(float(best['learning_rate']))
      # A red frame, as in heatmap.png, and an invisible point under it to hover.
      axis = '' if col == 1 else str(col)
      fig.add_shape(
        type='rect',
        x0=j - 0.5,
        x1=j + 0.5,
        y0=i - 0.5,
        y1=i + 0.5,
        xref=f'x{axis}',
        yref=f'y{axis}',
        line={'color': 'red', 'width': 3},
      )
      fig.add_trace(
        go.Scatter(
          x=[x[j]],
          y=[y[i]],
          mode='markers',
          marker={'size': 20, 'opacity': 0},
          showlegend=False,
          name='best configuration',
          hovertemplate=(
            f'best configuration<br>{_e(name)} (seed mean) {_g(best[metric])}<br>'
            f'runs {", ".join(str(r) for r in best["runs"])}<extra></extra>'
          ),
        ),
        row=1,
        col=col,
      )
    fig.update_xaxes(title_text='learning rate', type='category', row=1, col=col)
    fig.update_yaxes(title_text='batch size' if k == 0 else None, type='category', row=1, col=col)
  colorbar = {'title': {'text': name + (' (log scale)' if log else '')}}
  if log:
    ticks = _round_ticks(finite)
    colorbar.update(tickvals=np.log10(ticks).tolist(), ticktext=[_g(t, 3) for t in ticks])
  fig.update_layout(
    **_layout(
      height=max(360, 40 * len(y) + 200),
      coloraxis={'colorscale': 'Viridis', 'colorbar': colorbar},
      plot_bgcolor='#e4e4e4',  # cells without a value (every run diverged): grey
      legend={'orientation': 'h', 'y': -0.25},
    )
  )
  caption = (
    f'{name.capitalize()} of each learning rate and batch size ({_loss_name(result.config)}); '
    "a cell shows its best configuration's mean over seeds. Hover a cell for its value and how "
    'many of its runs diverged or were stopped; the red frame marks the best configuration.'
  )
  return _interactive('heatmap', caption, fig)


def _shown_labels(fig: Any) -> set[str]:
  return {t.name for t in fig.data if t.showlegend}


def _log_ticks(values: np.ndarray) -> dict[str, Any]:
  """Ticks at 1, 2 and 5 times powers of ten on a log axis (plotly's own label every digit)."""
  ticks = _round_ticks(values[np.isfinite(values) & (values > 0)])
  return {'tickvals': ticks.tolist(), 'ticktext': [_g(t, 3) for t in ticks]}


def _round_ticks(values: np.ndarray) -> np.ndarray:
  low, high = float(values.min()), float(values.max())
  decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
  ticks = [m * 10.0**k for k in decades for m in (1, 2, 5)]
  ticks = [t for t in ticks if low <= t <= high]
  return np.array(sorted(ticks) or [low, high])


# ---------------------------------------------------------------------- curves ----


def curves(result: Result) -> Interactive:
  curves_, table = result.curves, result.table
  if curves_ is None or curves_.empty or 'train_loss' not in curves_.columns:
    raise _Skip('the sweep left no learning curves (curves.csv).')
  metric = _metric(table)
  ranked = analysis.best_configurations(result, metric)
  order = [r for runs in ranked['runs'] for r in runs]
  order += [int(r) for r in table['run'] if int(r) not in set(order)]
  order = order[:MAX_CURVE_RUNS]
  best = set(ranked['runs'].iloc[0]) if len(ranked) else set()
  top5 = {r for runs in ranked['runs'].head(5) for r in runs}
  has_val = 'val_loss' in curves_.columns and curves_['val_loss'].notna().any()
  xcol = _x_column(curves_)
  status = table.set_index('run')['status'] if 'status' in table.columns else None
  by_run = dict(tuple(curves_.groupby('run')))
  fig = go.Figure()
  palette = plotly.colors.qualitative.D3
  groups = {'best': [], 'top': [], 'all': []}
  values = []
  for k, run in enumerate(order):
    c = by_run.get(run)
    if c is None:
      continue
    c = c.sort_values('eval')
    row = table.loc[table['run'] == run].iloc[0]
    state = status.loc[run] if status is not None else 'ok'
    label = f'run {run}: {_run_label(row, table, result.config)}'
    if state != 'ok':
      label += f' ({state})'
    color = 'red' if run in best else ('#999' if state != 'ok' else palette[k % len(palette)])
    width = 3 if run in best else 1.3
    visible = True if run in best else 'legendonly'
    kinds = [('train_loss', 'solid', 'train')] + ([('val_loss', 'dash', 'val')] if has_val else [])
    for column, dash, short in kinds:
      y = _finite(c[column].replace([np.inf, -np.inf], np.nan))
      values.append(y[np.isfinite(y)])
      fig.add_trace(
        go.Scatter(
          x=_finite(c[xcol]),
          y=y,
          mode='lines',
          name=label,
          legendgroup=str(run),
          showlegend=column == 'train_loss',
          visible=visible,
          line={'color': color, 'width': width, 'dash': dash},
          hovertemplate=(
            f'{_e(label)}<br>{short} loss %{{y:.4g}} at {xcol} %{{x:.4g}}<extra></extra>'
          ),
        )
      )
      groups['best'].append(run in best)
      groups['top'].append(run in top5)
      groups['all'].append(True)
  if not fig.data:
    raise _Skip('curves.csv holds no curve of a run in the results table.')
  flat = np.concatenate(values) if values else np.array([1.0])
  log = bool(np.all(flat > 0)) and _spans_decades(flat)

  def vis(keep: list[bool]) -> list[Any]:
    return [True if on else 'legendonly' for on in keep]

  buttons = [
    {
      'label': 'best configuration',
      'method': 'restyle',
      'args': [{'visible': vis(groups['best'])}],
    },
    {'label': 'best 5', 'method': 'restyle', 'args': [{'visible': vis(groups['top'])}]},
    {'label': 'every run', 'method': 'restyle', 'args': [{'visible': vis(groups['all'])}]},
  ]
  fig.update_layout(
    **_layout(
      height=520,
      xaxis={'title': {'text': LABELS.get(xcol, xcol)}, 'gridcolor': '#eee'},
      yaxis={
        'title': {'text': f'loss, {_loss_name(result.config)}' + (' (log scale)' if log else '')},
        'type': 'log' if log else 'linear',
        'gridcolor': '#eee',
        **(_log_ticks(flat) if log else {}),
      },
      legend={'font': {'size': 10}, 'groupclick': 'togglegroup'},
      updatemenus=[
        {'type': 'buttons', 'direction': 'right', 'x': 0, 'y': 1.12, 'buttons': buttons}
      ],
      hovermode='closest',
    )
  )
  what = 'training (solid) and validation (dashed) loss' if has_val else 'training loss'
  caption = (
    f"Every run's {what}. The best configuration's runs are drawn in red; click a run in the "
    'legend to draw it (double-click to draw it alone), or use the buttons for the best 5 '
    'configurations or every run.'
  )
  if len(table) > MAX_CURVE_RUNS:
    caption += f' The {MAX_CURVE_RUNS} best of {len(table)} runs are listed.'
  return _interactive('curves', caption, fig)
