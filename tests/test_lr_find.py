"""The learning-rate range test against a problem whose largest stable learning rate is known.

Linear least squares with plain SGD diverges above 2 / lambda_max of the Hessian of its
loss (`sweep.data.lstsq_max_stable_lr`). Its features here have scales spread over a factor
of 25, so that limit is set by the largest-scale features and is far from what unit-scale
data would give, while the targets depend on every feature. Every rule of both forms of the
test must suggest a rate below the limit; the grid's valley within a factor of 10 of it,
the ramp's within a factor of 100.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sweep
from sweep import data, models
from sweep.errors import ConfigError
from sweep.lr_find import RULES, LRFinderResult, lr_find, minimum, steep, valley

DIM = 16
SCALES = np.geomspace(0.2, 5.0, DIM).astype(np.float32)  # curvatures 0.04 .. 25


def regression(seed: int, n_train: int = 1024, outputs: int = 1) -> data.Dataset:
  base = data.synthetic_regression(
    n_train=n_train, n_val=128, dim=DIM, outputs=outputs, noise=0.1, seed=seed
  )
  return data.arrays(base.x_train * SCALES, base.y_train, base.x_val * SCALES, base.y_val)


def config(ds: data.Dataset, **changes) -> sweep.SweepConfig:
  cfg = sweep.SweepConfig(
    model=models.linear(), data=ds, loss='mse', optimizer='sgd', batch_size=64, seed=0
  )
  return cfg.replace(**changes)


# ------------------------------------------------------------ the known limit ----


@pytest.mark.parametrize('outputs', [1, 2])
def test_limit_is_the_engines_full_batch_limit(outputs):
  """The engine's mse is J of `lstsq_max_stable_lr` (times k for k outputs, as it says):
  full-batch gradient descent converges just below the limit and diverges just above."""
  ds = regression(0, n_train=256, outputs=outputs)
  limit = outputs * data.lstsq_max_stable_lr(ds.x_train)
  cfg = config(
    ds,
    batch_size=256,
    learning_rate=[0.9 * limit, 1.1 * limit],
    updates=300,
    epochs=None,
    num_evals=1,
  )
  table = sweep.run(cfg, progress=False).table.sort_values('learning_rate')
  assert table['status'].tolist() == ['ok', 'diverged']
  # Below the limit it converged to the noise level (0.1^2), not merely stayed finite.
  assert table['final_train_loss'].iloc[0] < 0.02


# --------------------------------------------------------------- suggestions ----


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_every_suggestion_is_below_the_limit(seed):
  ds = regression(seed)
  limit = data.lstsq_max_stable_lr(ds.x_train)
  cfg = config(ds, seed=seed)
  found = {method: lr_find(cfg, method=method) for method in ('grid', 'ramp')}
  for method, res in found.items():
    assert set(res.suggestions) == set(RULES)
    for rule, lr in res.suggestions.items():
      assert 0 < lr < limit, (method, rule, lr / limit)
  assert limit / 10 < found['grid'].suggestions['valley'] < limit
  assert limit / 100 < found['ramp'].suggestions['valley'] < limit
  assert found['grid'].suggestion == found['grid'].suggestions['valley']


# ---------------------------------------------------------------------- ramp ----


def _reference_ramp(cfg, start_lr, end_lr, num_it, beta=0.98):
  """The ramp as a plain Python loop over single SGD steps, from the documented semantics."""
  ds = cfg.data
  init_fn, apply_fn = models.to_functions(cfg.model, ds.x_train[:1], ds.output_dim)
  seed, batch, n = cfg.seed, cfg.batch_size, ds.n_train
  params = init_fn(jax.random.fold_in(jax.random.key(seed), 0))

  @jax.jit
  def loss_and_grad(p, xb, yb):
    return jax.value_and_grad(lambda p: jnp.mean((apply_fn(p, xb) - yb) ** 2))(p)

  lrs, raw, smooth = [], [], []
  avg, best = 0.0, math.inf
  for i in range(num_it):
    epoch, j = divmod(i, n // batch)
    order = np.asarray(
      jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch), n
      )
    )
    idx = order[j * batch : (j + 1) * batch]
    lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1))
    loss, grads = loss_and_grad(params, ds.x_train[idx], ds.y_train[idx])
    params = jax.tree.map(lambda p, g, lr=lr: p - np.float32(lr) * g, params, grads)
    avg = beta * avg + (1 - beta) * float(loss)
    s = avg / (1 - beta ** (i + 1))
    lrs.append(lr)
    raw.append(float(loss))
    smooth.append(s)
    best = min(best, s)
    if s > 4 * best:
      break
  return np.array(lrs), np.array(raw), np.array(smooth)


def test_ramp_is_the_plain_loop_and_stops_at_divergence():
  # 256 examples in batches of 48: 5 batches an epoch, so the ramp crosses several epochs
  # (each with its own shuffle) and drops 16 examples of each.
  ds = regression(3, n_train=256)
  cfg = config(ds, batch_size=48, seed=3)
  res = lr_find(cfg, method='ramp', start_lr=1e-4, end_lr=10.0, num_it=60)
  lrs, raw, smooth = _reference_ramp(cfg, 1e-4, 10.0, 60)
  assert 10 < len(res.lrs) < 60  # it stopped early: 10 is far above the limit
  np.testing.assert_allclose(res.lrs, lrs, rtol=1e-12)
  np.testing.assert_allclose(res.raw_losses, raw, rtol=2e-4)
  np.testing.assert_allclose(res.losses, smooth, rtol=2e-4)
  # The last step kept is the one whose smoothed loss passed 4x its best; none before it did.
  assert res.losses[-1] > 4 * res.losses[:-1].min()
  assert np.all(res.losses[:-1] <= 4 * np.minimum.accumulate(res.losses[:-1]))


def test_ramp_uses_the_first_value_of_each_axis():
  ds = regression(4, n_train=256)
  cfg = config(
    ds, batch_size=[48, 16], seed=[3, 0], learning_rate=[1e-3, 1e-2], schedule=['cosine', 'linear']
  )
  a = lr_find(cfg, method='ramp', start_lr=1e-4, end_lr=1.0, num_it=20)
  b = lr_find(
    config(ds, batch_size=48, seed=3), method='ramp', start_lr=1e-4, end_lr=1.0, num_it=20
  )
  np.testing.assert_array_equal(a.raw_losses, b.raw_losses)


# ---------------------------------------------------------------------- grid ----


def test_grid_trains_the_first_run_at_every_rate():
  ds = regression(5, n_train=256)
  cfg = config(ds, batch_size=[32, 64], seed=[2, 0], schedule=['cosine', 'linear'], epochs=3)
  res = lr_find(cfg, method='grid', start_lr=1e-4, end_lr=10.0, num_it=12, budget=20)
  table = res.result.table
  assert len(table) == 12
  assert set(table['batch_size']) == {32} and set(table['seed']) == {2}
  assert set(table['schedule']) == {'constant'} and set(table['updates'][table.status == 'ok']) == {
    20
  }
  np.testing.assert_allclose(res.lrs, np.geomspace(1e-4, 10.0, 12), rtol=1e-6)
  # Rates far above the limit diverge and read +inf; the rest are the table's train losses.
  diverged = (table.sort_values('learning_rate')['status'] == 'diverged').to_numpy()
  assert diverged.any() and not diverged.all()
  assert np.all(np.isinf(res.losses[diverged])) and np.all(np.isfinite(res.losses[~diverged]))
  # The fitted curve covers the rates before the first divergence.
  assert (
    res.curve_lrs[0] == pytest.approx(1e-4) and res.curve_lrs[-1] < res.lrs[np.argmax(diverged)]
  )


def test_grid_all_diverged_gives_nan():
  ds = regression(5, n_train=256)
  res = lr_find(
    config(ds, batch_size=32), method='grid', start_lr=100.0, end_lr=1000.0, num_it=12, budget=20
  )
  assert np.all(np.isinf(res.losses))
  assert all(math.isnan(v) for v in res.suggestions.values())


# --------------------------------------------------------------------- rules ----


def test_rules_on_a_known_curve():
  lrs = np.geomspace(1e-5, 1.0, 51)
  x = np.log10(lrs)
  # Flat and noisy up to index 10, falling from 10 to 40, rising after.
  losses = np.where(x < -4, 1.0 + 0.01 * (np.arange(51) % 2), 1.0 - (x + 4) ** 2 / 9)
  losses[41:] = losses[40] + np.linspace(0.1, 1.0, 10)
  # The longest decreasing subsequence is 1.01 at index 9, then indices 10..40: 32 points.
  assert valley(lrs, losses) == lrs[9 + round(2 / 3 * 31)]
  assert valley(lrs, losses, position=0.5) == lrs[9 + round(0.5 * 31)]
  assert minimum(lrs, losses) == pytest.approx(lrs[40] / 10)
  slopes = np.diff(losses[:41]) / np.diff(np.log(lrs[:41]))
  assert steep(lrs[:41], losses[:41]) == lrs[int(np.argmin(slopes))] == lrs[39]
  with pytest.raises(ValueError, match='finite'):
    valley(lrs, np.where(x > -1, np.inf, losses))


# ---------------------------------------------------------------- arguments ----


@pytest.mark.parametrize(
  'kwargs, field',
  [
    ({'start_lr': 1.0, 'end_lr': 1.0}, 'start_lr'),
    ({'start_lr': 2.0, 'end_lr': 1.0}, 'start_lr'),
    ({'start_lr': 0.0}, 'start_lr'),
    ({'end_lr': -1.0}, 'end_lr'),
    ({'start_lr': math.nan}, 'start_lr'),
    ({'num_it': 4}, 'num_it'),
    ({'num_it': 10.5}, 'num_it'),
    ({'method': 'range'}, 'method'),
    ({'suggest': 'slide'}, 'suggest'),
    ({'budget': 0}, 'budget'),
    ({'beta': 1.0}, 'beta'),
    ({'stop_factor': 1.0}, 'stop_factor'),
  ],
)
def test_bad_arguments_are_config_errors(kwargs, field):
  with pytest.raises(ConfigError, match=f'^{field}='):
    lr_find(config(regression(0, n_train=64)), **kwargs)


def test_a_bad_config_is_a_config_error():
  with pytest.raises(ConfigError, match='optimizer'):
    lr_find(config(regression(0, n_train=64), optimizer='sgdd'), method='ramp')


# ---------------------------------------------------------------------- plot ----


def test_plot_opens_no_window():
  import matplotlib.pyplot as plt

  before = plt.get_fignums()
  res = LRFinderResult(
    lrs=np.geomspace(1e-3, 1.0, 5),
    losses=np.array([1.0, 0.8, 0.5, 0.7, np.inf]),
    suggestion=0.01,
    suggestions={'valley': 0.01, 'steep': 0.003, 'minimum': 0.003},
    method='grid',
    curve_lrs=np.geomspace(1e-3, 0.2, 9),
    curve_losses=np.linspace(1.0, 0.6, 9),
  )
  ax = res.plot()
  assert ax.get_xscale() == 'log'
  assert plt.get_fignums() == before
  assert any('valley' in t.get_text() for t in ax.get_legend().get_texts())
  ax.figure.canvas.draw()  # renders with Agg
