"""The engine's gradient-norm measurements against exact expectations (noise_scale=True)."""

import numpy as np

import sweep


def test_measured_gradient_norms_match_their_exact_expectations():
  data = sweep.data.synthetic_regression(n_train=1024, n_val=64, dim=8, noise=0.5, seed=3)
  batch, n = 64, data.n_train
  cfg = sweep.SweepConfig(
    model=sweep.models.linear(),
    data=data,
    loss='mse',
    optimizer='sgd',
    learning_rate=1e-12,  # the parameters stay where they start: one point, many batches
    batch_size=batch,
    seed=0,
    epochs=16,
    num_evals=1,
    noise_scale=True,
  )
  result = sweep.run(cfg, progress=False)
  p = result.params(0)
  p = p['params'] if 'params' in p else p
  w, b = (
    np.asarray(p['Dense_0']['weight'], np.float64).T,
    np.asarray(p['Dense_0']['bias'], np.float64),
  )
  x, y = data.x_train.astype(np.float64), data.y_train.astype(np.float64)
  r = y - (x @ w + b)  # (n, 1)
  per_example = np.concatenate([-2 * r * x, -2 * r], axis=1)  # d/d(w, b) of (y - f)^2
  g = per_example.mean(axis=0)
  tr_sigma = per_example.var(axis=0).sum()  # population covariance, as in McCandlish et al.

  def expected(size):  # E|mean of `size` examples drawn without replacement|^2
    return g @ g + tr_sigma / size * (n - size) / (n - 1)

  last = result.curves[result.curves['eval'] == 1].iloc[0]
  np.testing.assert_allclose(last.grad_sq_full, expected(batch), rtol=0.05)
  np.testing.assert_allclose(last.grad_sq_half, expected(batch // 2), rtol=0.05)
  # The estimate itself: tr(Σ)/|G|² up to the finite-population factor and sampling noise.
  assert 0.7 < result.table.noise_scale[0] / (tr_sigma / (g @ g)) < 1.3
