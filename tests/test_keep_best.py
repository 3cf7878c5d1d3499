"""keep_best: each run's parameters at its lowest validation loss, kept and saved."""

import jax
import numpy as np
import pytest

import sweep


def _val_loss(params, x, y):
  """Mean softmax cross-entropy of an MLP 64 -> 32 -> 10 in float64 numpy."""
  p = params['params'] if 'params' in params else params
  h = np.maximum(x @ np.asarray(p['Dense_0']['weight'], np.float64).T + p['Dense_0']['bias'], 0.0)
  z = h @ np.asarray(p['Dense_1']['weight'], np.float64).T + p['Dense_1']['bias']
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return float(-logp[np.arange(len(y)), y].mean())


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  d = sweep.data.digits()
  # 150 training digits and a wide model: validation loss turns up, so best != final.
  data = sweep.data.arrays(d.x_train[:150], d.y_train[:150], d.x_val, d.y_val)
  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(32,)),
    data=data,
    optimizer='adam',
    learning_rate=[1e-2, 3e-2],
    batch_size=[16],
    seed=[0],
    epochs=30,
    num_evals=15,
    keep_best=True,
  )
  workdir = str(tmp_path_factory.mktemp('best'))
  return cfg, sweep.run(cfg, workdir=workdir, progress=False), workdir


def test_best_params_are_those_of_the_best_evaluation(swept):
  cfg, result, _ = swept
  x, y = cfg.data.x_val.astype(np.float64), cfg.data.y_val
  assert (result.table.best_eval < 15).any(), 'the case should overfit so that best != final'
  for i in result.table.index:
    row = result.table.loc[i]
    best = _val_loss(result.params(i, best=True), x, y)
    final = _val_loss(result.params(i), x, y)
    np.testing.assert_allclose(best, row.best_val_loss, rtol=1e-4)
    np.testing.assert_allclose(final, row.final_val_loss, rtol=1e-4)
    assert best <= final + 1e-6


def test_best_params_saved_for_the_front_bit_for_bit(swept):
  _, result, workdir = swept
  front = [int(i) for i in result.table.index[result.table.pareto]]
  assert front
  for i in front:
    got = sweep.restore_params(workdir, i, best=True)
    want = result.params(i, best=True)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert np.array_equal(a, b)
    loaded = sweep.load(workdir)
    for a, b in zip(
      jax.tree.leaves(loaded.params(i, best=True)), jax.tree.leaves(want), strict=True
    ):
      assert np.array_equal(a, b)


def test_without_keep_best_asking_for_best_is_a_clear_error(swept):
  cfg, _, _ = swept
  result = sweep.run(cfg.replace(keep_best=False, epochs=1, num_evals=1), progress=False)
  with pytest.raises(ValueError, match='keep_best=True'):
    result.params(0, best=True)
