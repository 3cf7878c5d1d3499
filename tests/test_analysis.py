"""Batch-size tables, learning-rate scaling slopes, overfitting flags and the noise scale.

Tables and curves are built by hand where the answer is known by construction; one real
tiny sweep (a wide MLP on 100 digits for many epochs) checks that overfitting is found
where it happens. The noise-scale estimator is checked against per-example gradients of a
least-squares model, whose gradient covariance is computed exactly.
"""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import sweep
from sweep import analysis, data, models
from sweep.errors import ConfigError
from sweep.results import Result

# ------------------------------------------------------------ synthetic results ----

LRS = 1e-3 * 2.0 ** (np.arange(-4, 24) / 2)  # a grid in steps of sqrt(2)
EVALS = 5


def synthetic_result(best_lr, batch_sizes, seeds=(0,), jitter=None, diverged=(), lrs=LRS):
  """A Result whose final_val_loss is lowest, for every seed, at best_lr(batch size).

  final_val_loss = 0.1 + (log2(lr / best))^2 (+ jitter(seed, batch, lr)); the curves fall
  linearly from 1.1 to each run's final value over EVALS evaluation points.
  """
  rows, curves = [], []
  for b in batch_sizes:
    for lr in lrs:
      for s in seeds:
        i = len(rows)
        loss = 0.1 + np.log2(lr / best_lr(b)) ** 2 + (jitter(s, b, lr) if jitter else 0.0)
        status = 'diverged' if (b, lr, s) in diverged else 'ok'
        rows.append(
          {
            'run': i,
            'optimizer': 'sgd',
            'schedule': 'constant',
            'batch_size': b,
            'learning_rate': lr,
            'seed': s,
            'status': status,
            'updates': 1000 // b,
            'examples': (1000 // b) * b,
            'final_train_loss': loss / 2,
            'final_val_loss': loss,
            'seconds': 0.01 * b + s,
          }
        )
        for k in range(EVALS):
          val = 1.1 + (loss - 1.1) * k / (EVALS - 1)
          curves.append(
            {
              'run': i,
              'eval': k,
              'updates': k * 10,
              'examples': k * 10 * b,
              'epoch': k * 0.5,
              'val_loss': val,
              'train_loss': val / 2,
            }
          )
  table = pd.DataFrame(rows).set_index('run', drop=False)
  table.index.name = None
  return Result(table, pd.DataFrame(curves), config={}, wall_time=0.0)


# ---------------------------------------------------------- batch_size_table ----


def test_batch_size_table_picks_the_seed_averaged_best():
  # Seed 1 alone would pick the rate one step above the true best at every batch size; the
  # mean over seeds 0, 1 and 2 still picks the true best.
  def jitter(s, b, lr):
    return -0.5 * np.isclose(lr, 2**0.5 * 1e-3 * b / 16) if s == 1 else 0.0

  res = synthetic_result(lambda b: 1e-3 * b / 16, [16, 32, 64], seeds=(0, 1, 2), jitter=jitter)
  t = analysis.batch_size_table(res)
  assert t.index.tolist() == [16, 32, 64]
  np.testing.assert_allclose(t['learning_rate'], [1e-3, 2e-3, 4e-3])
  np.testing.assert_allclose(t['final_val_loss'], 0.1)
  assert t['seeds'].tolist() == [3, 3, 3]
  np.testing.assert_allclose(t['updates'], [62, 31, 15])
  np.testing.assert_allclose(t['examples'], [992, 992, 960])
  np.testing.assert_allclose(t['seconds'], [0.16 + 1, 0.32 + 1, 0.64 + 1])
  table = res.table
  for b, runs in t['runs'].items():
    chosen = table.loc[list(runs)]
    assert set(chosen['seed']) == {0, 1, 2} and set(chosen['batch_size']) == {b}
  assert not t['lr_at_edge'].any()


def test_batch_size_table_leaves_out_rates_that_diverged_for_a_seed():
  res = synthetic_result(lambda b: 1e-3 * b / 16, [16, 32], seeds=(0, 1), diverged={(32, 2e-3, 1)})
  t = analysis.batch_size_table(res)
  # At batch 32 the best rate diverged for seed 1: a neighbour of it wins.
  assert t.loc[16, 'learning_rate'] == pytest.approx(1e-3)
  assert t.loc[32, 'learning_rate'] in (pytest.approx(2e-3 / 2**0.5), pytest.approx(2e-3 * 2**0.5))
  kept = analysis.batch_size_table(res, require_all_seeds=False)
  assert kept.loc[32, 'learning_rate'] == pytest.approx(2e-3) and kept.loc[32, 'seeds'] == 1


def test_batch_size_table_max_mode_edges_and_other_axes():
  res = synthetic_result(lambda b: LRS[-1] if b == 16 else 2e-3, [16, 32])
  table = res.table.copy()
  table['final_val_accuracy'] = 1.0 - table['final_val_loss']
  table.loc[table.batch_size == 32, 'optimizer'] = 'adam'  # an axis that varies
  t = analysis.batch_size_table(
    Result(table, res.curves, {}, 0.0), metric='final_val_accuracy', mode='max'
  )
  assert t.loc[16, 'learning_rate'] == LRS[-1] and t.loc[16, 'lr_at_edge']
  assert t.loc[32, 'learning_rate'] == pytest.approx(2e-3) and not t.loc[32, 'lr_at_edge']
  assert t['optimizer'].tolist() == ['sgd', 'adam']
  with pytest.raises(ConfigError, match='metric'):
    analysis.batch_size_table(res, metric='nope')
  with pytest.raises(ConfigError, match='mode'):
    analysis.batch_size_table(res, mode='best')


def test_batch_size_table_time_to_target():
  res = synthetic_result(lambda b: 1e-3 * b / 16, [16, 32], seeds=(0, 1))
  # The best runs' val_loss goes 1.1, 0.85, 0.6, 0.35, 0.1 at updates 0, 10, 20, 30, 40.
  t = analysis.batch_size_table(res, target=0.61)
  assert t['updates_to_target'].tolist() == [20.0, 20.0]
  assert t['examples_to_target'].tolist() == [320.0, 640.0]
  assert analysis.batch_size_table(res, target=0.5)['updates_to_target'].tolist() == [30.0, 30.0]
  assert analysis.batch_size_table(res, target=0.0)['updates_to_target'].isna().all()
  # The seed-averaged curve: seed 1's curve is lower, so the mean reaches 0.61 a point earlier.
  curves = res.curves.copy()
  runs1 = res.table.index[res.table.seed == 1]
  curves.loc[curves.run.isin(runs1), 'val_loss'] -= 0.6
  t = analysis.batch_size_table(Result(res.table, curves, {}, 0.0), target=0.61)
  assert t['updates_to_target'].tolist() == [10.0, 10.0]


# ------------------------------------------------------------ lr_batch_slope ----


@pytest.mark.parametrize(
  'power, words',
  [(0.5, 'consistent with square-root scaling'), (1.0, 'consistent with the linear scaling rule')],
)
def test_slope_recovers_an_exact_power_law(power, words):
  batch_sizes = [16, 32, 64, 128, 256, 512]
  res = synthetic_result(lambda b: 1e-3 * (b / 16) ** power, batch_sizes)
  out = analysis.lr_batch_slope(res)
  assert out['n'] == 6
  assert out['slope'] == pytest.approx(power, abs=1e-12)
  assert out['intercept'] == pytest.approx(math.log(1e-3) - power * math.log(16), abs=1e-9)
  assert out['ci_low'] == pytest.approx(power, abs=1e-9) and out['ci_high'] == pytest.approx(
    power, abs=1e-9
  )
  assert words in out['interpretation']
  np.testing.assert_allclose(out['best_lrs'], [1e-3 * (b / 16) ** power for b in batch_sizes])


def test_slope_interval_is_the_t_interval_of_least_squares():
  batch_sizes = [16, 32, 64, 128, 256, 512]
  steps = dict(zip(batch_sizes, [0, 1, -1, 0, 1, -1], strict=True))  # best off by sqrt(2) steps
  res = synthetic_result(lambda b: 1e-3 * (b / 16) ** 0.5 * 2 ** (steps[b] / 2), batch_sizes)
  out = analysis.lr_batch_slope(res)
  x, y = np.log(batch_sizes), np.log(out['best_lrs'])
  fit = stats.linregress(x, y)
  t = stats.t.ppf(0.975, len(x) - 2)
  assert out['slope'] == pytest.approx(fit.slope)
  assert out['ci_low'] == pytest.approx(fit.slope - t * fit.stderr)
  assert out['ci_high'] == pytest.approx(fit.slope + t * fit.stderr)
  assert out['ci_low'] < 0.5 < out['ci_high']


def test_slope_with_two_batch_sizes_or_one():
  two = analysis.lr_batch_slope(synthetic_result(lambda b: 1e-3 * b / 16, [16, 64]))
  assert two['slope'] == pytest.approx(1.0)
  assert two['ci_low'] == -math.inf and two['ci_high'] == math.inf
  assert 'too few for an interval' in two['interpretation']
  one = analysis.lr_batch_slope(synthetic_result(lambda b: 1e-3, [16]))
  assert one['n'] == 1 and math.isnan(one['slope']) and math.isnan(one['ci_low'])


def test_slope_bootstrap_over_seeds():
  rng = np.random.default_rng(0)
  noise = {
    key: rng.normal(0, 0.6)
    for key in [(s, b, lr) for s in range(4) for b in (16, 32, 64, 128) for lr in LRS]
  }
  res = synthetic_result(
    lambda b: 1e-3 * (b / 16) ** 0.5,
    [16, 32, 64, 128],
    seeds=range(4),
    jitter=lambda s, b, lr: noise[s, b, lr],
  )
  out = analysis.lr_batch_slope(res, bootstrap=40, rng=1)
  assert out['boot_low'] <= out['boot_high']
  again = analysis.lr_batch_slope(res, bootstrap=40, rng=1)
  assert (again['boot_low'], again['boot_high']) == (out['boot_low'], out['boot_high'])
  assert 'boot_low' not in analysis.lr_batch_slope(res)


# --------------------------------------------------------------- overfitting ----


def hand_made_curves():
  val = {
    0: [2.0, 1.0, 0.5, 0.6, 0.8],  # falls, then rises 60 % while train falls: overfit
    1: [2.0, 1.0, 0.5, 0.6, 0.8],  # the same, but train rises too (unstable, not overfit)
    2: [2.0, 1.5, 1.0, 0.8, 0.7],  # still falling
    3: [2.0, 1.0, 0.5, 0.52, 0.51],  # a 2 % rise: under the default margin
    4: [np.nan] * 5,  # no finite validation loss
  }
  train = {
    0: [2.0, 1.0, 0.5, 0.3, 0.1],
    1: [2.0, 1.0, 0.5, 0.6, 0.9],
    2: [2.0, 1.4, 0.9, 0.7, 0.6],
    3: [2.0, 1.0, 0.5, 0.4, 0.3],
    4: [2.0, 1.0, 0.5, 0.4, 0.3],
  }
  curves = pd.DataFrame(
    [
      {
        'run': r,
        'eval': k,
        'updates': 10 * k,
        'examples': 320 * k,
        'epoch': 2.5 * k,
        'val_loss': val[r][k],
        'train_loss': train[r][k],
      }
      for r in val
      for k in range(5)
    ]
  )
  # Row order different from run order, as a table may be sorted.
  table = pd.DataFrame(
    {
      'run': [4, 3, 2, 1, 0],
      'status': 'ok',
      'final_train_loss': [train[r][-1] for r in (4, 3, 2, 1, 0)],
      'final_val_loss': [val[r][-1] for r in (4, 3, 2, 1, 0)],
    },
    index=[4, 3, 2, 1, 0],
  )
  return table, curves


def test_overfitting_on_hand_made_curves():
  table, curves = hand_made_curves()
  out = analysis.overfitting(Result(table, curves, {}, 0.0))
  assert sorted(out.index) == [0, 1, 2, 3, 4]
  assert out.loc[[0, 1, 2, 3, 4], 'overfit'].tolist() == [True, False, False, False, False]
  assert out.loc[[0, 1, 2, 3], 'best_val_eval'].tolist() == [2, 2, 4, 2]
  assert out.loc[[0, 1, 2, 3], 'best_val_epoch'].tolist() == [5.0, 5.0, 10.0, 5.0]
  np.testing.assert_allclose(out.loc[[0, 2, 3], 'val_rise'], [0.6, 0.0, 0.02])
  np.testing.assert_allclose(out.loc[[0, 1, 2], 'generalization_gap'], [0.7, -0.1, 0.1])
  assert math.isnan(out.loc[4, 'best_val_eval']) and math.isnan(out.loc[4, 'val_rise'])
  tight = analysis.overfitting(Result(table, curves, {}, 0.0), margin=0.01)
  assert tight.loc[[0, 3], 'overfit'].tolist() == [True, True]
  with pytest.raises(ConfigError, match='margin'):
    analysis.overfitting(Result(table, curves, {}, 0.0), margin=-0.1)


def test_annotate_overfitting_keeps_the_table():
  table, curves = hand_made_curves()
  out = analysis.annotate_overfitting(table, curves)
  assert out.index.tolist() == table.index.tolist()
  assert list(out.columns) == list(table.columns) + list(analysis.OVERFITTING_COLUMNS)
  assert out['overfit'].tolist() == [False, False, False, False, True]  # rows are runs 4..0
  assert out['overfit'].dtype == bool
  again = analysis.annotate_overfitting(out, curves, margin=0.01)
  assert list(again.columns) == list(out.columns)
  assert again['overfit'].tolist() == [False, True, False, False, True]
  # Without validation curves: NaN numbers and no run flagged.
  bare = analysis.annotate_overfitting(
    table.drop(columns='final_val_loss'), curves.drop(columns='val_loss')
  )
  assert bare['best_val_eval'].isna().all() and not bare['overfit'].any()
  assert bare['generalization_gap'].isna().all()


@pytest.fixture(scope='module')
def digits_sweep():
  """A wide MLP on 100 training digits for 100 epochs: the larger rates overfit."""
  d = data.digits()
  small = data.arrays(d.x_train[:100], d.y_train[:100], d.x_val, d.y_val, num_classes=10)
  cfg = sweep.SweepConfig(
    model=models.mlp(hidden=(256,)),
    data=small,
    optimizer='adam',
    learning_rate=[1e-4, 3e-3, 1e-2],
    batch_size=[20, 50],
    seed=[0, 1],
    epochs=100,
    num_evals=20,
  )
  return sweep.run(cfg, progress=False)


def test_a_real_sweep_overfits(digits_sweep):
  out = analysis.overfitting(digits_sweep)
  table = digits_sweep.table
  fast = table.index[table.learning_rate >= 3e-3]
  slow = table.index[table.learning_rate == 1e-4]
  assert out.loc[fast, 'overfit'].all()
  assert not out.loc[slow, 'overfit'].any()  # still improving at the end
  assert (out.loc[fast, 'best_val_eval'] < 20).all() and (
    out.loc[fast, 'generalization_gap'] > 0.2
  ).all()
  # best_val_eval agrees with the table's own best_eval.
  np.testing.assert_array_equal(
    out.loc[table.index, 'best_val_eval'].to_numpy(), table['best_eval'].to_numpy()
  )
  annotated = analysis.annotate_overfitting(table, digits_sweep.curves)
  assert annotated['overfit'].tolist() == out.loc[table.index, 'overfit'].tolist()


def test_batch_size_table_on_a_real_sweep(digits_sweep):
  t = analysis.batch_size_table(digits_sweep, target=0.6)
  assert t.index.tolist() == [20, 50] and t['seeds'].tolist() == [2, 2]
  table = digits_sweep.table
  for b, row in t.iterrows():
    cell = table[table.batch_size == b].groupby('learning_rate')['final_val_loss'].mean()
    assert row['learning_rate'] == cell.idxmin() and row['final_val_loss'] == pytest.approx(
      cell.min()
    )
    assert row['updates_to_target'] <= row['updates']
  out = analysis.lr_batch_slope(digits_sweep)
  assert out['n'] == 2 and math.isinf(out['ci_high'])


# --------------------------------------------------------------- noise scale ----


def per_example_gradients():
  """Gradients of (a_i . theta - y_i)^2 for each example of a small least-squares problem."""
  rng = np.random.default_rng(0)
  n, d = 64, 5
  x = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5, 1.0, 3.0])
  y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
  a = np.hstack([x, np.ones((n, 1))])
  theta = np.full(d + 1, 0.3)  # a fixed point away from the optimum
  return 2.0 * (a @ theta - y)[:, None] * a  # (n, d + 1)


def test_noise_scale_recovers_exact_expectations():
  g = per_example_gradients()
  mean = g.mean(axis=0)
  g_sq = float(mean @ mean)
  tr_sigma = float(np.trace(np.cov(g.T, bias=True)))  # population covariance, 1/n
  b_small = np.array([1, 2, 4, 8])
  b_big = np.array([16, 32, 64, 256])
  # E|mean of b examples drawn with replacement|^2 = |G|^2 + tr(Sigma) / b, exactly.
  expected = lambda b: g_sq + tr_sigma / b  # noqa: E731
  b_noise, tr, gg = analysis.noise_scale(expected(b_small), expected(b_big), b_small, b_big)
  assert b_noise.shape == (4,)
  np.testing.assert_allclose(gg, g_sq, rtol=1e-9)
  np.testing.assert_allclose(tr, tr_sigma, rtol=1e-9)
  np.testing.assert_allclose(b_noise, tr_sigma / g_sq, rtol=1e-9)


def test_noise_scale_from_sampled_batches():
  g = per_example_gradients()
  n = len(g)
  mean = g.mean(axis=0)
  g_sq, tr_sigma = float(mean @ mean), float(np.trace(np.cov(g.T, bias=True)))
  rng = np.random.default_rng(1)

  def sampled(b, k=100_000):
    # A batch drawn with replacement is a multinomial count of each example.
    counts = rng.multinomial(b, np.full(n, 1.0 / n), size=k)
    means = counts @ g / b
    return float(np.mean(np.sum(means**2, axis=1)))

  b_noise, tr, gg = analysis.noise_scale(sampled(2), sampled(32), 2, 32)
  assert gg == pytest.approx(g_sq, rel=0.05)
  assert tr == pytest.approx(tr_sigma, rel=0.05)
  assert b_noise == pytest.approx(tr_sigma / g_sq, rel=0.05)


def test_noise_scale_edge_cases():
  b_noise, tr, gg = analysis.noise_scale([10.0, 1.0], [1.0, 0.5], 4, 16)
  assert math.isnan(b_noise[0]) and gg[0] < 0  # |G|^2 estimate not positive
  assert b_noise[1] == pytest.approx(tr[1] / gg[1])
  with pytest.raises(ConfigError):
    analysis.noise_scale(1.0, 0.5, 8, 8)
  with pytest.raises(ConfigError):
    analysis.noise_scale(1.0, 0.5, 0, 8)
