"""The HTML report: figures and one self-contained page, from a result or a workdir alone.

One tiny real sweep (an MLP on the digits set, Adam, 4 learning rates of which 30 diverges,
2 batch sizes, 2 seeds, 3 epochs) is trained once; its report is written from the Result in
memory and again from the workdir's files alone. A regression sweep with neither a validation
set nor a second batch size checks that sections without data are left out (and listed,
folded, at the end). The other cases (a noise-scale curve, two optimizers, every run
diverged) edit the first sweep's tables by hand, so they train nothing. The interactive page
is opened in a real headless Chromium (skipped where none is installed).
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mimage

import sweep
from sweep import analysis, interactive, report
from sweep.lr_find import RULES, LRFinderResult
from sweep.results import Result

LEARNING_RATES = [1e-3, 1e-2, 1e-1, 30.0]  # adam at 30 diverges on its first updates
BATCH_SIZES = [32, 128]
SEEDS = [0, 1]
NUM_RUNS = len(LEARNING_RATES) * len(BATCH_SIZES) * len(SEEDS)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
ALWAYS = ('heatmap', 'curves', 'pareto', 'batch_size')  # the figures the digits sweep has data for


@pytest.fixture(scope='module')
def digits_sweep(tmp_path_factory):
  cfg = sweep.SweepConfig(
    name='report_digits',
    model=sweep.models.mlp(hidden=(8,)),
    data=sweep.data.digits(),
    optimizer='adam',
    learning_rate=LEARNING_RATES,
    batch_size=BATCH_SIZES,
    seed=SEEDS,
    epochs=3,
    num_evals=3,
  )
  result = sweep.run(cfg, progress=False)
  workdir = str(tmp_path_factory.mktemp('digits'))
  result.save(workdir)  # results.csv, curves.csv, config.json: what a workdir holds
  return result, workdir


def fake_lr_finder() -> LRFinderResult:
  """A range test with a known shape: flat, a drop, a minimum near 0.05, a blow-up."""
  lrs = np.geomspace(1e-5, 10.0, 40)
  x = np.log10(lrs)
  losses = 2.3 - 1.0 / (1.0 + np.exp(-2.5 * (x + 2.5))) + 0.9 * np.maximum(x + 1.3, 0.0) ** 2
  losses[-2:] = np.inf
  finite = np.isfinite(losses)
  suggestions = {name: rule(lrs[finite], losses[finite]) for name, rule in RULES.items()}
  return LRFinderResult(
    lrs=lrs,
    losses=losses,
    suggestion=suggestions['valley'],
    suggestions=suggestions,
    method='grid',
    suggest='valley',
    raw_losses=losses.copy(),
  )


def check_png(path: str) -> None:
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC, path
  pixels = mimage.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] >= 250 and pixels.shape[1] >= 400, (
    path,
    pixels.shape,
  )
  assert pixels.std() > 0.05, f'{path} looks blank'


PLOTLY_BANNER = '* plotly.js v'  # the first line of plotly.js


def check_self_contained(page: str) -> None:
  """Nothing loaded by address; scripts inline (plotly.js once, where figures are drawn)."""
  assert page.startswith('<!DOCTYPE html>')
  assert page.count(PLOTLY_BANNER) == (1 if 'Plotly.newPlot' in page else 0)
  assert not re.search(r'<script[^>]*\ssrc=', page, re.I)
  # Outside the scripts (plotly.js holds addresses it never fetches here): no address at all.
  markup = without_scripts(page)
  assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', markup, re.I)
  assert 'http://' not in markup and 'https://' not in markup
  assert '<link' not in markup.lower()
  for src in re.findall(r'src="([^"]*)"', markup):
    assert src.startswith('data:image/png;base64,'), src[:40]


def without_scripts(page: str) -> str:
  return re.sub(r'<script>.*?</script>', '', page, flags=re.S)


def pngs(page: str) -> int:
  """How many PNG figures the page shows (plotly.js holds the same prefix once)."""
  return without_scripts(page).count('data:image/png;base64,')


def not_shown(page: str) -> str:
  """The folded list of what the page leaves out, and why ('' when nothing is)."""
  match = re.search(r'<details id="not-shown">(.*?)</details>', page, re.S)
  return match.group(1) if match else ''


def best_by_hand(table: pd.DataFrame) -> tuple[float, int, float]:
  """(learning rate, batch size, seed-mean final val loss) of the best configuration, from
  the table with plain pandas: configurations none of whose seeds diverged, lowest mean."""
  groups = table.groupby(['learning_rate', 'batch_size'])
  whole = groups['status'].agg(lambda s: bool((s == 'ok').all()))
  mean = groups['final_val_loss'].mean()[whole]
  (lr, b), value = mean.idxmin(), mean.min()
  return lr, int(b), value


def summary_of(page: str) -> str:
  match = re.search(r'<p id="summary">(.*?)</p>', page, re.S)
  assert match, 'the page has no summary paragraph'
  return match.group(1)


def read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


# --------------------------------------------------------------------------- tests ----


def test_report_from_a_result(digits_sweep):
  result, workdir = digits_sweep
  assert (result.table.status == 'diverged').sum() == len(BATCH_SIZES) * len(
    SEEDS
  )  # every lr=30 run
  found = fake_lr_finder()
  path = report.write_report(workdir, result, lr_finder=found)

  out = os.path.join(workdir, report.REPORT_DIR)
  assert path == os.path.join(out, 'report.html')
  drawn = ALWAYS + ('lr_find',)
  for name in drawn:
    check_png(os.path.join(out, name + '.png'))
  assert not os.path.exists(os.path.join(out, 'noise_scale.png'))  # the curves hold no noise scale
  assert not [f for f in os.listdir(out) if f.endswith('.tmp')]  # no temporary file left behind

  page = read(path)
  check_self_contained(page)
  assert pngs(page) == len(drawn)
  assert '<title>report_digits' in page
  assert '"Best", in the summary, the heatmap' in page  # the page says what best means

  lr, b, value = best_by_hand(result.table)
  best = analysis.best_configurations(result).iloc[0]
  assert (best['learning_rate'], best['batch_size']) == (lr, b)
  assert best['final_val_loss'] == pytest.approx(value)
  summary = summary_of(page)
  assert f'{NUM_RUNS} runs' in summary
  assert '4 diverged' in summary
  assert 'runs ' + ', '.join(str(r) for r in best['runs']) in summary
  assert f'learning rate {lr:.4g}' in summary
  assert f'batch size {b}' in summary
  assert f'{value:.4g}' in summary and 'mean over its seeds' in summary
  # The batch-size table's best learning rate at that batch size is the same one.
  assert analysis.batch_size_table(result).loc[b, 'learning_rate'] == lr

  # The recommended batch size opens the batch-size section, before the slope.
  choice = analysis.choose_batch_size(result)
  section = page.index('<h2 id="batch-size">Batch size and learning-rate scaling</h2>')
  said = page.index(f'<b>Recommended batch size: {choice.batch_size}.</b>')
  assert section < said < page.index('Slope of log(best learning rate)')
  assert html.escape(choice.reason) in page
  for b in BATCH_SIZES:
    assert f'<tr><td>{b}</td>' in page[said:]  # an evidence row per batch size

  slope = analysis.lr_batch_slope(result)
  assert f'<b>{slope["slope"]:.2f}</b>' in page
  assert slope['interpretation'] in page  # plain text: nothing in it needs escaping
  assert 'Goyal et al. 2017' in page
  assert 'noise_scale.png' in not_shown(page) and 'Gradient noise scale' not in page
  assert 'skipped' not in without_scripts(page) and 'class="note"' not in page
  for name in ('heatmap', 'parallel', 'curves'):  # interactive, beside the PNGs
    assert f'<div id="{name}-plot" class="interactive"' in page
  for version in result.config['environment']['packages'].values():
    assert str(version) in page
  for device in result.config['environment']['devices']:
    assert device in page
  # The Pareto table names the front's runs.
  for run in result.table.index[result.table.pareto]:
    assert f'<tr><td>{run}</td>' in page

  # The range test was saved beside the sweep, in the documented small format.
  saved = pd.read_csv(os.path.join(workdir, report.LR_FIND_CSV))
  assert list(saved.columns) == ['lr', 'loss'] and len(saved) == len(found.lrs)
  assert np.isinf(saved['loss'].iloc[-1])


def test_report_from_the_workdir_alone(digits_sweep):
  result, workdir = digits_sweep
  report.save_lr_find(workdir, fake_lr_finder())
  shutil.rmtree(os.path.join(workdir, report.REPORT_DIR), ignore_errors=True)

  path = report.write_report(workdir)  # result=None: read back from the files
  out = os.path.dirname(path)
  for name in ALWAYS + ('lr_find',):
    check_png(os.path.join(out, name + '.png'))
  page = read(path)
  check_self_contained(page)
  summary = summary_of(page)
  assert f'{NUM_RUNS} runs' in summary and '4 diverged' in summary
  assert 'Wall time: about' in summary  # summed from results.csv: the wall time is not saved
  assert f'learning rate {best_by_hand(result.table)[0]:.4g}' in summary

  loaded = report.load_lr_find(workdir)
  found = fake_lr_finder()
  np.testing.assert_allclose(loaded.lrs, found.lrs)
  np.testing.assert_array_equal(loaded.losses, found.losses)
  assert loaded.suggestions == pytest.approx(found.suggestions)
  assert f'valley {found.suggestions["valley"]:.3g}' in page


def test_regression_without_validation_and_one_batch_size(tmp_path):
  cfg = sweep.SweepConfig(
    name='report_regression',
    model=sweep.models.linear(),
    data=sweep.data.synthetic_regression(n_train=256, n_val=0, dim=4),
    loss='mse',
    optimizer='sgd',
    learning_rate=[0.01, 0.1],
    batch_size=32,
    epochs=2,
  )
  result = sweep.run(cfg, progress=False)
  assert 'final_val_loss' not in result.table.columns
  workdir = str(tmp_path)
  result.save(workdir)
  out = os.path.join(workdir, report.REPORT_DIR)
  os.makedirs(out)
  with open(os.path.join(out, 'batch_size.png'), 'wb') as f:
    f.write(PNG_MAGIC)  # a figure left by an earlier report, which this one cannot draw

  for given in (result, None):
    page = read(report.write_report(workdir, given))
    check_self_contained(page)
    check_png(os.path.join(out, 'heatmap.png'))  # the training loss instead
    check_png(os.path.join(out, 'curves.png'))
    assert not os.path.exists(os.path.join(out, 'batch_size.png'))
    left_out = not_shown(page)
    assert 'batch_size.png' in left_out and '1 batch size' in left_out
    assert 'Only batch size 32 was swept, so there is nothing to compare it with' in left_out
    assert 'lr_find.png' in left_out and 'no validation curves' in left_out
    for title in ('Batch size and learning-rate scaling', 'Overfitting', 'Learning-rate range'):
      assert title not in page  # sections with nothing to show are left out
    assert 'skipped' not in without_scripts(page) and 'class="note"' not in page
    assert 'final training loss' in page
    assert '2 runs' in summary_of(page) and '0 diverged' in summary_of(page)


def test_noise_scale_figure(digits_sweep, tmp_path):
  result, _ = digits_sweep
  curves = result.curves.copy()
  batch = result.table.set_index('run')['batch_size'].reindex(curves['run']).to_numpy()
  # A noise scale that grows as the loss falls, as McCandlish et al. observe.
  curves['noise_scale'] = np.where(
    curves['eval'] > 0, 20.0 * (1 + curves['eval']) ** 2 + batch / 8, np.nan
  )
  edited = Result(result.table, curves, result.config, result.wall_time)
  page = read(report.write_report(str(tmp_path), edited))
  check_png(os.path.join(tmp_path, report.REPORT_DIR, 'noise_scale.png'))
  assert 'noise_scale.png' not in not_shown(page) and 'Gradient noise scale' in page
  assert pngs(page) == len(ALWAYS) + 1


def test_two_optimizers_get_a_panel_each(digits_sweep, tmp_path):
  result, _ = digits_sweep
  n = len(result.table)
  other = result.table.copy()
  other['optimizer'] = 'sgd'
  other['run'] = other['run'] + n
  other['final_val_loss'] = other['final_val_loss'] * 1.5
  table = pd.concat([result.table, other])
  table.index = table['run'].to_numpy()
  curves = pd.concat(
    [result.curves, result.curves.assign(run=result.curves['run'] + n)], ignore_index=True
  )
  edited = Result(table, curves, result.config, result.wall_time)
  page = read(report.write_report(str(tmp_path), edited))
  check_png(os.path.join(tmp_path, report.REPORT_DIR, 'heatmap.png'))
  check_png(os.path.join(tmp_path, report.REPORT_DIR, 'batch_size.png'))
  assert '<h3>adam</h3>' in page and '<h3>sgd</h3>' in page  # a slope per optimizer
  assert f'{2 * NUM_RUNS} runs' in summary_of(page)


def test_every_run_diverged(digits_sweep, tmp_path):
  result, _ = digits_sweep
  table = result.table.copy()
  table['status'] = 'diverged'
  table['pareto'] = False
  edited = Result(table, result.curves, result.config, math.nan)
  page = read(report.write_report(str(tmp_path), edited))
  check_self_contained(page)
  check_png(os.path.join(tmp_path, report.REPORT_DIR, 'heatmap.png'))  # every cell hatched
  assert 'No run finished without diverging' in page
  assert '<b>No batch size recommended.</b> Every run diverged' in page
  assert f'{NUM_RUNS} diverged' in summary_of(page)
  left_out = not_shown(page)
  assert 'curves.png' in left_out and 'Pareto front' in left_out
  assert 'parallel coordinates' in left_out  # no run finished: nothing to draw
  assert '<h2 id="pareto">' not in page


def test_without_plotly_the_page_keeps_its_pngs_and_says_how(digits_sweep, tmp_path, monkeypatch):
  result, _ = digits_sweep
  monkeypatch.setattr(interactive, 'AVAILABLE', False)
  page = read(report.write_report(str(tmp_path), result))
  check_self_contained(page)
  assert '<script' not in page and 'Plotly' not in page
  assert interactive.INSTALL_HINT in html.unescape(page)
  assert pngs(page) == len(ALWAYS)
  assert '<details><summary>The static figure' not in page  # the PNGs shown, not folded


def test_a_workdir_without_a_sweep(tmp_path):
  with pytest.raises(FileNotFoundError):
    report.write_report(str(tmp_path))


# ---------------------------------------------------------------- in a browser ----


def test_the_page_in_a_headless_browser(digits_sweep, tmp_path):
  """Loads without console errors or requests elsewhere; the three interactive figures
  draw; hovering a heatmap cell shows its value; a click on "every run" draws every run;
  a screenshot is taken (left in the test's tmp_path)."""
  import _browser

  executable = _browser.find()
  if executable is None:
    pytest.skip(
      'no Chromium on the PATH (Debian: apt-get install chromium); the report is not '
      'checked in a browser'
    )
  result, _ = digits_sweep
  path = report.write_report(str(tmp_path), result)
  with _browser.Browser(executable) as browser:
    browser.open('file://' + os.path.abspath(path))
    drawn = browser.evaluate(
      "Array.from(document.querySelectorAll('.js-plotly-plot'))"
      ".filter(d => d.querySelector('.main-svg')).map(d => d.id)"
    )
    assert sorted(drawn) == ['curves-plot', 'heatmap-plot', 'parallel-plot']
    ids = browser.evaluate("Array.from(document.querySelectorAll('[id]')).map(e => e.id)")
    assert len(ids) == len(set(ids))  # every id once: plotly draws into the element named
    assert (
      browser.evaluate("document.querySelectorAll('#parallel-plot canvas').length") > 0
    )  # WebGL
    assert browser.evaluate("document.querySelectorAll('#heatmap-plot .hm image').length") == 1

    # Hover the cell of learning rate 0.001, batch size 32 (bottom left of 4 x 2 cells).
    left, top, width, height = browser.evaluate(
      "(() => { const e = document.querySelector('#heatmap-plot .hm image');"
      " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
      ' return [r.left, r.top, r.width, r.height]; })()'
    )
    browser.send(
      'Input.dispatchMouseEvent',
      session=True,
      type='mouseMoved',
      x=left + width / 8,
      y=top + 3 * height / 4,
    )
    browser.evaluate('new Promise(r => setTimeout(r, 300))')
    hover = browser.evaluate(
      "Array.from(document.querySelectorAll('#heatmap-plot .hovertext')).map(e => e.textContent)"
    )
    t = result.table
    cell = t[(t.learning_rate == 1e-3) & (t.batch_size == 32)]
    assert len(hover) == 1 and 'learning rate 0.001' in hover[0] and 'batch size 32' in hover[0]
    assert f'{cell.final_val_loss.mean():.4g}' in hover[0] and 'diverged 0' in hover[0]

    # The curves: the best configuration's runs drawn; "every run" draws them all.
    visible = "document.getElementById('curves-plot').data.filter(t => t.visible === true).length"
    traces = browser.evaluate("document.getElementById('curves-plot').data.length")
    assert browser.evaluate(visible) == 2 * len(SEEDS)  # train and val, per seed
    x, y = browser.evaluate(
      "(() => { const e = Array.from(document.querySelectorAll('#curves-plot .updatemenu-button'))"
      ".find(e => e.textContent === 'every run'); e.scrollIntoView({block: 'center'});"
      ' const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2];'
      ' })()'
    )
    for kind in ('mousePressed', 'mouseReleased'):
      browser.send(
        'Input.dispatchMouseEvent',
        session=True,
        type=kind,
        x=x,
        y=y,
        button='left',
        clickCount=1,
      )
    browser.evaluate('new Promise(r => setTimeout(r, 300))')
    assert browser.evaluate(visible) == traces == 2 * NUM_RUNS

    shot = os.path.join(tmp_path, 'report.png')
    browser.screenshot(shot)
    assert browser.errors() == []
    elsewhere = [u for u in browser.requests() if not u.startswith(('file:', 'data:'))]
    assert elsewhere == []
  check_png(shot)
  assert mimage.imread(shot).shape[0] > 2000  # the whole page, not the window


def test_the_terminal_summary_names_the_same_best_configuration(digits_sweep):
  result, _ = digits_sweep
  lr, b, value = best_by_hand(result.table)
  line = next(x for x in result.summary().splitlines() if x.startswith('Best configuration'))
  assert f'batch_size {b}, learning_rate {lr:.4g}' in line and f'{value:.4g}' in line
  assert len(line) <= 100


def test_sweep_report_without_plotly_says_how_to_get_the_interactive_figures(
  digits_sweep, monkeypatch, capsys
):
  from sweep import cli

  _, workdir = digits_sweep
  monkeypatch.setattr(interactive, 'AVAILABLE', False)
  assert cli.main(['report', workdir]) == 0
  out, err = capsys.readouterr()
  assert out.strip() == os.path.join(workdir, report.REPORT_DIR, 'report.html')  # the path alone
  assert interactive.INSTALL_HINT in err and 'PNG figures only' in err
