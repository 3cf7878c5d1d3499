"""A report of a finished sweep: PNG figures and one self-contained HTML page.

    from sweep import report
    path = report.write_report('workdirs/seed_mlp')   # workdirs/seed_mlp/report/report.html

Everything goes to the `report/` folder of the workdir (the sweep's own files stay apart):

- `heatmap.png`: final validation loss over learning rate x batch size (seed mean).
- `curves.png`: train and validation loss curves of the best runs.
- `pareto.png`: the objectives of every run, the Pareto front as a step line.
- `lr_find.png`: the learning-rate range test and its suggestions.
- `noise_scale.png`: the gradient noise scale over training, per batch size.
- `batch_size.png`: the best learning rate per batch size, its fitted slope, slopes 1 and 0.5.
- `report.html`: the summary, tables and every figure embedded as a base64 data URI, and
  with plotly installed (`pip install 'lrbs-sweep[report]'`) the interactive figures of
  `sweep.interactive` (parallel coordinates, a heatmap with hover values, every run's
  curves) beside them, plotly.js inlined once; it loads nothing from elsewhere.

"Best" means one thing throughout (the page says it): the configuration with the lowest
seed-mean loss among those none of whose seeds diverged (`analysis.best_configurations`).

A figure whose data is absent (no validation set, one batch size, no range test, ...) is
not drawn and its section left out; a list at the end of the page, folded, says why; a PNG
of that name left by an earlier report is removed.
Every file is written to a temporary name and renamed, so none is ever half-written.

A learning-rate range test is read from `lr_find.csv` (columns `lr`, `loss`; a loss of
`inf` marks a diverged rate) and `lr_find.json` (optional: `method`, `suggest`,
`suggestion`, `suggestions` {rule: lr}, `curve_lrs`, `curve_losses`; NaN is written as
null) in the workdir. `save_lr_find` writes both from an `LRFinderResult`.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sweep import analysis, interactive
from sweep.figures import (
  FIGURES,
  LABELS,
  REPORT_DIR,
  _axes,
  _batch_schedules,
  _batch_size,
  _best,
  _choice,
  _curves,
  _draw,
  _e,
  _g,
  _heatmap,
  _loss_name,
  _lr_find,
  _metric,
  _noise_scale,
  _objective_columns,
  _objectives,
  _ok,
  _pareto,
  _scaling,
  _search,
  _Section,
  _varying,
)
from sweep.files import atomic_write
from sweep.results import Result

if TYPE_CHECKING:
  from sweep.lr_find import LRFinderResult

__all__ = ['FIGURES', 'REPORT_DIR', 'load_lr_find', 'save_lr_find', 'write_report']

from sweep.lr_find import LR_FIND_CSV, LR_FIND_JSON  # noqa: E402, F401 - where they were


def save_lr_find(workdir: str, lr_finder: LRFinderResult) -> tuple[str, str]:
  """`lr_finder.save(workdir)`: lr_find.csv and lr_find.json, for a report to read."""
  return lr_finder.save(workdir)


def load_lr_find(workdir: str) -> LRFinderResult | None:
  """`LRFinderResult.load(workdir)`: the range test saved there, or None."""
  from sweep.lr_find import LRFinderResult

  return LRFinderResult.load(workdir)


# ------------------------------------------------------------------------ HTML ----


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
p.note { color: #8a5a00; background: #fff8e6; border-left: 3px solid #e0a800;
         padding: 0.4em 0.8em; }
p.meta { color: #666; font-size: 0.85em; }
div.interactive { width: 100%; margin-bottom: 2.5em; }
details { margin: 0.6em 0; }
details > summary { cursor: pointer; color: #444; font-size: 0.9em; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def _html_table(frame: pd.DataFrame, index: bool = False) -> str:
  if frame.empty:
    return '<p class="note">(empty)</p>'
  frame = frame.reset_index() if index else frame
  head = ''.join(f'<th>{_e(c)}</th>' for c in frame.columns)
  rows = []
  for _, row in frame.iterrows():
    cells = []
    for v in row.to_numpy():
      numeric = isinstance(v, int | float | np.integer | np.floating) and not isinstance(
        v, bool | np.bool_
      )
      cells.append(f'<td>{_e(_g(v))}</td>' if numeric else f'<td class="text">{_e(_g(v))}</td>')
    rows.append('<tr>' + ''.join(cells) + '</tr>')
  return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _figure_html(section: _Section, title: str, folded: bool = False) -> str:
  """The PNG as an image (folded: under a line to open, beside an interactive figure)."""
  data = base64.b64encode(section.png).decode('ascii')
  figure = (
    f'<figure><img src="data:image/png;base64,{data}" alt="{_e(title)}">'
    f'<figcaption>{_e(section.caption)} (<code>{_e(section.name)}.png</code>)</figcaption></figure>'
  )
  if folded:
    return (
      f'<details><summary>The static figure ({_e(section.name)}.png)</summary>{figure}</details>'
    )
  return figure


def _interactive_html(fig: interactive.Interactive) -> str:
  return f'<figure>{interactive.html(fig)}<figcaption>{_e(fig.caption)}</figcaption></figure>'


def _wall_time(result: Result) -> str:
  if math.isfinite(result.wall_time):
    return f'{result.wall_time:.1f} s'
  if 'seconds' in result.table.columns:
    total = float(pd.to_numeric(result.table['seconds'], errors='coerce').sum())
    if math.isfinite(total) and total > 0 and result.config.get('run_seconds'):
      return f"about {total:.1f} s for its runs trained one by one (results.csv's seconds, summed)"
    if math.isfinite(total) and total > 0:
      return f'about {total:.1f} s (the per-run seconds of results.csv, summed)'
  return 'not recorded'


def _summary(result: Result) -> str:
  table, config = result.table, result.config
  n = len(table)
  diverged = int((table['status'] != 'ok').sum()) if 'status' in table.columns else 0
  metric = _metric(table)
  seeds = table['seed'].nunique() if 'seed' in table.columns else 1
  search = config.get('search') or {}
  parts = [f'<b>{n} runs</b>']
  if search.get('mode') == 'sampled':
    parts[0] += (
      f' ({search.get("samples")} configurations sampled with sample_seed '
      f'{search.get("sample_seed")}'
    )
    parts[0] += (
      f', × {n // max(1, int(search.get("samples") or 1))} grid points)'
      if n != search.get('samples')
      else ')'
    )
  elif search.get('mode') == 'runs':
    parts[0] += ' (an explicit list)'
  elif seeds > 1:
    parts[0] += f' ({n // seeds} configurations × {seeds} seeds)'
  parts[0] += f'; <b>{diverged} diverged</b> ({100.0 * diverged / max(n, 1):.0f} %).'
  top = _best(result)
  if top is None:
    parts.append(
      'No run finished without diverging.'
      if not len(_ok(table))
      else 'No configuration finished every seed without diverging.'
    )
  else:
    best = table.loc[table['run'] == top['runs'][0]].iloc[0]
    hypers = [
      f'learning rate {_g(best["learning_rate"])}' if 'learning_rate' in best else '',
      f'batch size {_g(best["batch_size"])}' if 'batch_size' in best else '',
    ]
    for a in _axes(table, config):
      if a in best.index and a not in ('learning_rate', 'batch_size', 'seed') and pd.notna(best[a]):
        hypers.append(f'{a} {_g(best[a])}')
    runs = [int(r) for r in top['runs']]
    who = f'run {runs[0]}' if len(runs) == 1 else 'runs ' + ', '.join(str(r) for r in runs)
    mean = ' (mean over its seeds)' if len(runs) > 1 else ''
    text = (
      f'Best configuration: <b>{who}</b> ({_e(", ".join(h for h in hypers if h))}) with '
      f'{LABELS.get(metric, metric)} <b>{_g(top[metric])}</b>{mean}'
    )
    accuracy = (
      table.loc[table['run'].isin(runs), 'final_val_accuracy']
      if ('final_val_accuracy' in table.columns)
      else pd.Series(dtype=float)
    )
    if accuracy.notna().any():
      text += f' and validation accuracy {100 * float(accuracy.mean()):.1f} %'
    if 'updates' in best.index:
      text += f' after {_g(best["updates"])} updates'
    parts.append(text + '.')
  parts.append(f'Wall time: {_e(_wall_time(result))}.')
  data = config.get('data') or {}
  if data:
    parts.append(
      f'Data: {_e(data.get("name", "?"))} ({_e(data.get("n_train", "?"))} training, '
      f'{_e(data.get("n_val", 0))} validation examples); loss {_e(_loss_name(config))}.'
    )
  return ' '.join(parts)


def _config_html(result: Result) -> str:
  config = result.config
  rows = []
  axes = config.get('axes') or {}
  search = config.get('search') or {}
  sampled = search.get('spaces') or {}
  if search.get('mode') == 'sampled':
    rows.append(
      (
        'search',
        f'{search.get("samples")} configurations sampled (sample_seed {search.get("sample_seed")})',
      )
    )
  elif search.get('mode') == 'runs':
    rows.append(('search', f'an explicit list of {len(search.get("runs") or [])} runs'))
  for a in _axes(result.table, config):
    values = axes.get(a)
    if a in sampled:
      rows.append((a, f'{sampled[a]} ({len(values or [])} distinct values drawn)'))
    # The axes the table records: the others keep defaults that may not apply (a warmup
    # without a warmup schedule).
    elif values and values != [None]:
      numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
      if len(values) > 12 and len(numeric) == len(values):
        rows.append((a, f'{len(values)} values from {_g(min(numeric))} to {_g(max(numeric))}'))
      else:
        rows.append((a, ', '.join(_g(v) for v in values)))
  if not axes:
    for a in _axes(result.table, config):
      rows.append((a, ', '.join(_g(v) for v in sorted(result.table[a].dropna().unique()))))
  budget = config.get('budget') or {}
  if budget:
    rows.append(('budget', ', '.join(f'{k} {_g(v)}' for k, v in budget.items() if v is not None)))
  for key in ('model', 'loss', 'num_evals', 'divergence_threshold', 'compute_dtype', 'objectives'):
    if key in config:
      value = config[key]
      rows.append((key, json.dumps(value) if isinstance(value, dict | list) else _g(value)))
  body = ''.join(
    f'<tr><th class="text">{_e(k)}</th><td class="text">{_e(v)}</td></tr>' for k, v in rows
  )
  return (
    f'<table>{body}</table>' if body else '<p class="note">config.json holds no configuration.</p>'
  )


# The evidence columns the page shows, those present (runs and edge flags stay in the table).
CHOICE_COLUMNS = (
  'learning_rate',
  'reached',
  'updates_to_target',
  'seconds_to_target',
  'seconds',
  'noise_scale',
  'lr_fit',
)


def _choice_html(choice: analysis.BatchSizeChoice | str) -> str:
  """The answer to "which batch size?": the recommendation, its reason and its evidence."""
  if isinstance(choice, str):
    return f'<p class="note">No batch-size recommendation: {_e(choice)}</p>'
  head = (
    f'Recommended batch size: {_g(choice.batch_size)}.'
    if choice.batch_size is not None
    else 'No batch size recommended.'
  )
  out = [f'<p id="batch-size-choice"><b>{_e(head)}</b> {_e(choice.reason)}</p>']
  if choice.evidence['learning_rate'].notna().any():
    op = '≤' if choice.mode == 'min' else '≥'
    shown = [c for c in (choice.metric, *CHOICE_COLUMNS) if c in choice.evidence.columns]
    out.append(
      f'<p>The evidence, per batch size: its best learning rate and the {_e(choice.metric)} it '
      f'reached; whether and when its seed-averaged {_e(choice.curve)} curve first reached '
      f"{op} {_g(choice.target)} (updates, and seconds estimated as the run's seconds times "
      'the share of its updates done by then); the gradient noise scale measured on its best '
      'runs (the critical batch size of McCandlish et al. 2018, where measured); the learning '
      'rate of the fitted scaling line.</p>'
    )
    out.append(_html_table(choice.evidence[shown], index=True))
  return '\n'.join(out)


def _scaling_html(scaling: list[dict[str, Any]]) -> str:
  out = []
  for s in scaling:
    if s['title']:
      out.append(f'<h3>{_e(s["title"])}</h3>')
    if 'error' in s:
      out.append(f'<p class="note">No batch-size table: {_e(s["error"])}</p>')
      continue
    frame = s['table'].drop(columns=['runs'], errors='ignore')
    metric = _e(LABELS.get(s['metric'], s['metric']))
    out.append(
      f'<p>The best learning rate of each batch size by seed-mean {metric} '
      '(configurations that diverged for any seed left out):</p>'
    )
    out.append(_html_table(frame, index=True))
    fit = s['slope']
    if fit['n'] >= 2 and math.isfinite(fit['slope']):
      if math.isfinite(fit['ci_low']) and math.isfinite(fit['ci_high']):
        interval = f'95% interval {fit["ci_low"]:.2f} to {fit["ci_high"]:.2f}'
      else:
        interval = f'no interval: {fit["n"]} batch sizes fit a line exactly'
      out.append(
        f'<p>Slope of log(best learning rate) on log(batch size): <b>{fit["slope"]:.2f}</b> '
        f'({_e(interval)}).</p>'
      )
    out.append(f'<p>{_e(fit["interpretation"])}</p>')
  if len(scaling) > 1:
    out.append(
      '<p class="meta">Each optimizer/schedule combination is fitted on its own: '
      'their best learning rates are not comparable.</p>'
    )
  return '\n'.join(out)


def _overfitting_html(result: Result) -> str | None:
  curves = result.curves
  if (
    curves is None
    or curves.empty
    or 'val_loss' not in curves.columns
    or not curves['val_loss'].notna().any()
  ):
    return None
  frame = analysis.overfitting(result)
  table = result.table
  ok_runs = _ok(table)['run'].to_numpy()
  frame = frame.loc[frame.index.isin(ok_runs)]
  flagged = frame[frame['overfit']]
  gap = frame['generalization_gap'].to_numpy(np.float64)
  gap = gap[np.isfinite(gap)]
  text = (
    f'<p><b>{len(flagged)} of {len(frame)}</b> runs that did not diverge overfit: '
    'their final validation loss lies more than 5 % above their lowest while their '
    'training loss kept falling.'
  )
  if len(gap):
    text += (
      f' Median generalization gap (final validation − final training loss): {_g(np.median(gap))}.'
    )
  text += '</p>'
  if len(flagged):
    keys = [a for a in _varying(table, result.config)] or ['learning_rate', 'batch_size']
    shown = table.set_index('run').loc[flagged.index, [k for k in keys if k in table.columns]]
    shown = shown.join(flagged[['best_val_epoch', 'val_rise', 'generalization_gap']])
    shown = shown.sort_values('val_rise', ascending=False).head(20)
    shown.index.name = 'run'
    text += _html_table(shown, index=True)
    if len(flagged) > 20:
      text += f'<p class="meta">The 20 with the largest rise of {len(flagged)} are shown.</p>'
  return text


def _pareto_html(result: Result) -> str | tuple[str, str]:
  """The front's table, or (what, why) it is not shown."""
  table = result.table
  if 'pareto' not in table.columns:
    return ('Pareto front', 'the results table has no pareto column.')
  front = table[table['pareto'].astype(bool)]
  if front.empty:
    return ('Pareto front', 'the front is empty: every run diverged.')
  (ycol, _), (xcol, _) = _objective_columns(result)
  objectives = _objectives(result)
  columns = ['run'] + _varying(table, result.config) + [c for c in objectives if c in table.columns]
  for c in (ycol, xcol, 'final_val_accuracy', 'final_train_loss', 'seconds'):
    if c in table.columns and c not in columns:
      columns.append(c)
  shown = front[columns].sort_values(xcol if xcol in front.columns else 'run')
  desc = ', '.join(f'{c} ({s})' for c, s in objectives.items()) or f'{ycol}, {xcol}'
  return (
    f'<p>{len(front)} run(s) on the front of {_e(desc)}: no other run is at least as good on every '
    'objective and better on one.</p>' + _html_table(shown)
  )


def _environment_html(config: dict) -> str:
  env = config.get('environment') or {}
  rows = []
  for key in ('python', 'platform', 'backend', 'process_count'):
    if key in env:
      rows.append((key, env[key]))
  if env.get('devices'):
    rows.append(('devices', ', '.join(str(d) for d in env['devices'])))
  for name, version in (env.get('packages') or {}).items():
    rows.append((name, version if version is not None else 'not installed'))
  for package in ('matplotlib', 'plotly'):
    try:
      rows.append((f'{package} (report)', metadata.version(package)))
    except metadata.PackageNotFoundError:
      pass
  if 'experiment' in config:
    exp = config['experiment'] or {}
    rows.append(
      (
        'experiment file',
        f'{exp.get("file")} (sha256 {str(exp.get("sha256"))[:12]}…, '
        f'commit {exp.get("git_commit")})',
      )
    )
  if not env:
    rows.insert(0, ('note', 'config.json records no environment'))
  body = ''.join(
    f'<tr><th class="text">{_e(k)}</th><td class="text">{_e(v)}</td></tr>' for k, v in rows
  )
  return f'<table>{body}</table>'


def _strategies_html(result: Result) -> str:
  """The batch-size schedules against one batch size, each at its best learning rate."""
  try:
    table = analysis.batch_schedule_table(result)
  except (ValueError, KeyError) as e:
    return f'<p class="note">{_e(e)}</p>'
  metric = table.attrs['metric']
  head = ''.join(
    f'<th>{_e(c)}</th>' for c in ('strategy', 'learning rate', metric, 'updates', 'examples')
  )
  body = ''.join(
    f'<tr><td class="text">{_e(label)}</td><td>{_g(r["learning_rate"])}</td>'
    f'<td>{_g(r[metric])}</td><td>{_g(r["updates"])}</td><td>{_g(r["examples"])}</td></tr>'
    for label, r in table.iterrows()
  )
  return (
    "<p>A run with a batch-size schedule trains at each stage's batch size from the epoch "
    'the stage starts; its updates are parameter updates, and its learning-rate schedule '
    'runs on them. Runs that change batch size are left out of the per-batch-size analyses '
    'below.</p>'
    f'<table><tr>{head}</tr>{body}</table>'
  )


def _best_definition(result: Result) -> str:
  metric = LABELS.get(_metric(result.table), _metric(result.table))
  return (
    '<p class="meta" id="best-definition">"Best", in the summary, the heatmap, the curves and '
    'the tables of this page: the configuration (every hyperparameter but the seed) with the '
    f'lowest mean over its seeds of the {_e(metric)}, among the configurations none of whose '
    'seeds diverged or was stopped; with one seed, the run with the lowest '
    f'{_e(metric)}.</p>'
  )


def _page(
  result: Result,
  sections: dict[str, _Section],
  scaling: list[dict[str, Any]],
  choice: analysis.BatchSizeChoice | str,
  figures: dict[str, interactive.Interactive | str] | None,
) -> str:
  """The page: a section per thing with something to show; what was not shown, and why,
  listed at the end under a line to open."""
  name = result.config.get('name') or 'sweep'
  figures = figures or {}
  missing: list[tuple[str, str]] = []  # (what, why)

  def figure(key: str, title: str) -> list[str]:
    """The interactive figure and the PNG (folded), either alone, or nothing."""
    fig = figures.get(key)
    out = [_interactive_html(fig)] if isinstance(fig, interactive.Interactive) else []
    if isinstance(fig, str):
      missing.append((f'interactive {title.lower()}', fig))
    if key in sections:
      if sections[key].png is not None:
        out.append(_figure_html(sections[key], title, folded=bool(out)))
      else:
        missing.append((f'{key}.png', sections[key].note))
    return out

  def section(title: str, parts: list[str], anchor: str) -> list[str]:
    parts = [p for p in parts if p]
    return [f'<h2 id="{anchor}">{_e(title)}</h2>', *parts] if parts else []

  body = [
    f'<h1>Sweep report: {_e(name)}</h1>',
    f'<p class="meta">Written {_e(_now())} by sweep.report.</p>',
    f'<p id="summary">{_summary(result)}</p>',
    _best_definition(result),
  ]
  if not interactive.AVAILABLE:
    body.append(
      '<p class="meta" id="no-interactive">The interactive figures (hover values, parallel '
      f"coordinates, every run's curves) need plotly: <code>{_e(interactive.INSTALL_HINT)}"
      '</code>, then <code>sweep report WORKDIR</code>.</p>'
    )
  body += ['<h2 id="configuration">Configuration</h2>', _config_html(result)]
  body += section('Learning rate × batch size', figure('heatmap', 'Heatmap'), 'heatmap')
  body += section(
    'Hyperparameters against objectives',
    figure('parallel', 'Parallel coordinates'),
    'parallel',
  )
  body += section('Learning curves', figure('curves', 'Curves'), 'curves')
  if result.config.get('scheduler'):  # a plain grid has no search to show, nor to explain
    body += section('Adaptive search', figure('search', 'Search'), 'search')
  if sections['batch_schedules'].png is not None:  # only where a run changed batch size
    body += section(
      'Batch-size schedules',
      [_strategies_html(result), *figure('batch_schedules', 'Batch-size schedules')],
      'batch-schedules',
    )
  sizes = result.table['batch_size'].nunique() if 'batch_size' in result.table.columns else 0
  if sizes >= 2:
    body += section(
      'Batch size and learning-rate scaling',
      [_choice_html(choice), _scaling_html(scaling), *figure('batch_size', 'Batch size')],
      'batch-size',
    )
  else:
    reason = choice if isinstance(choice, str) else choice.reason
    missing.append(('batch-size comparison', reason))
    figure('batch_size', 'Batch size')
  overfitting = _overfitting_html(result)
  if overfitting is None:
    missing.append(('overfitting', 'no validation curves: overfitting cannot be judged.'))
  body += section('Overfitting', [overfitting], 'overfitting')
  pareto = _pareto_html(result)
  if isinstance(pareto, tuple):
    missing.append(pareto)
    figure('pareto', 'Pareto front')
  else:
    body += section('Pareto front', [pareto, *figure('pareto', 'Pareto front')], 'pareto')
  body += section('Learning-rate range test', figure('lr_find', 'Range test'), 'lr-find')
  body += section('Gradient noise scale', figure('noise_scale', 'Noise scale'), 'noise-scale')
  body += ['<h2 id="environment">Environment</h2>', _environment_html(result.config)]
  if missing:
    items = ''.join(f'<li><b>{_e(what)}</b>: {_e(why)}</li>' for what, why in missing)
    body.append(
      f'<details id="not-shown"><summary>Not shown ({len(missing)}): figures and tables '
      f'without data in this sweep</summary><ul>{items}</ul></details>'
    )
  head = f'<style>{STYLE}</style>\n'
  if any(isinstance(f, interactive.Interactive) for f in figures.values()):
    # plotly.js once, inline: the page loads nothing from elsewhere.
    head += f'<script>{interactive.plotly_js()}</script>\n'
  return (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    f'<title>{_e(name)}: sweep report</title>\n{head}</head>\n<body>\n'
    + '\n'.join(body)
    + '\n</body>\n</html>\n'
  )


def _now() -> str:
  return datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')


# ---------------------------------------------------------------------- report ----


def write_report(
  workdir: str, result: Result | None = None, lr_finder: LRFinderResult | None = None
) -> str:
  """Writes the figures and report.html of a finished sweep into `workdir/report/`.

  The figures (heatmap, curves, pareto, lr_find, noise_scale, batch_size) are PNG files;
  report.html embeds each of them as a base64 data URI with the summary (runs, diverged
  runs, the best run, wall time), the recommended batch size with its evidence
  (`analysis.choose_batch_size`), the batch-size table and learning-rate slope, the
  overfitting summary, the Pareto front and the environment, and needs nothing else to
  display. With plotly, the interactive figures of `sweep.interactive` too. A section
  without data is left out (the folded list at the end says why; a stale PNG of its name is
  removed). Each file is written to a temporary name and renamed.

  Args:
    workdir: the sweep's workdir.
    result: the sweep's `Result`; None loads it from the workdir (results.csv,
      curves.csv, config.json).
    lr_finder: a learning-rate range test to draw. It is also saved into the workdir
      (lr_find.csv, lr_find.json) so that a later report from the workdir alone draws it;
      without it, the range test saved there (if any) is drawn.

  Returns:
    The path of report.html.

  Raises:
    FileNotFoundError: `result` is None and the workdir holds no finished sweep.
  """
  if result is None:
    result = Result.load(workdir)
  if lr_finder is not None:
    save_lr_find(workdir, lr_finder)
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)

  scaling = _scaling(result)
  choice = _choice(result)
  sections = {
    'heatmap': _draw('heatmap', _heatmap, result),
    'curves': _draw('curves', _curves, result),
    'pareto': _draw('pareto', _pareto, result),
    'lr_find': _draw('lr_find', _lr_find, lr_finder, workdir),
    'noise_scale': _draw('noise_scale', _noise_scale, result),
    'batch_size': _draw('batch_size', _batch_size, result, scaling, choice),
    'search': _draw('search', _search, result),
    'batch_schedules': _draw('batch_schedules', _batch_schedules, result),
  }
  for name in FIGURES:
    path = os.path.join(out_dir, name + '.png')
    if sections[name].png is not None:
      atomic_write(path, sections[name].png)
    elif os.path.exists(path):
      os.remove(path)  # left by an earlier report; its data is gone
  figures = dict(interactive.figures(result)) if interactive.AVAILABLE else None
  html_path = os.path.join(out_dir, 'report.html')
  atomic_write(html_path, _page(result, sections, scaling, choice, figures))
  return html_path
