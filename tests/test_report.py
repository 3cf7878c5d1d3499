"""The HTML report: figures and one self-contained page, from a result or a workdir alone.

One tiny real sweep (an MLP on the digits set, Adam, 4 learning rates of which 30 diverges,
2 batch sizes, 2 seeds, 3 epochs) is trained once; its report is written from the Result in
memory and again from the workdir's files alone. A regression sweep with neither a validation
set nor a second batch size checks that figures without data are skipped with a note. The
other cases (a noise-scale curve, two optimizers, every run diverged) edit the first sweep's
tables by hand, so they train nothing.
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
from sweep import analysis, report
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


def check_self_contained(page: str) -> None:
  assert page.startswith('<!DOCTYPE html>')
  assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)
  assert 'http://' not in page and 'https://' not in page
  assert '<script' not in page.lower() and '<link' not in page.lower()
  for src in re.findall(r'src="([^"]*)"', page):
    assert src.startswith('data:image/png;base64,'), src[:40]


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
  assert page.count('data:image/png;base64,') == len(drawn)
  assert '<title>report_digits' in page

  best = result.best()
  summary = summary_of(page)
  assert f'{NUM_RUNS} runs' in summary
  assert '4 diverged' in summary
  assert f'run {int(best["run"])}' in summary
  assert f'learning rate {best["learning_rate"]:.4g}' in summary
  assert f'batch size {int(best["batch_size"])}' in summary

  # The recommended batch size opens the batch-size section, before the slope.
  choice = analysis.choose_batch_size(result)
  section = page.index('<h2>Batch size and learning-rate scaling</h2>')
  said = page.index(f'<b>Recommended batch size: {choice.batch_size}.</b>')
  assert section < said < page.index('Slope of log(best learning rate)')
  assert html.escape(choice.reason) in page
  for b in BATCH_SIZES:
    assert f'<tr><td>{b}</td>' in page[said:]  # an evidence row per batch size

  slope = analysis.lr_batch_slope(result)
  assert f'<b>{slope["slope"]:.2f}</b>' in page
  assert slope['interpretation'] in page  # plain text: nothing in it needs escaping
  assert 'Goyal et al. 2017' in page
  assert 'noise_scale.png</code> skipped' in page
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
  assert f'learning rate {result.best()["learning_rate"]:.4g}' in summary
  assert 'Wall time: about' in summary  # summed from results.csv: the wall time is not saved

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
    assert 'batch_size.png</code> skipped' in page and '1 batch size' in page
    assert 'Only batch size 32 was swept, so there is nothing to compare it with' in page
    assert 'lr_find.png</code> skipped' in page
    assert 'No validation curves' in page
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
  assert 'noise_scale.png</code> skipped' not in page
  assert page.count('data:image/png;base64,') == len(ALWAYS) + 1


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
  assert 'curves.png</code> skipped' in page and 'pareto.png</code> skipped' in page


def test_a_workdir_without_a_sweep(tmp_path):
  with pytest.raises(FileNotFoundError):
    report.write_report(str(tmp_path))
