"""Evaluation sized to the training: the training probe's default size, and the sets it
is measured on (recomputed here in numpy from each run's final parameters)."""

import jax
import jax.numpy as jnp
import numpy as np

import sweep

N_TRAIN, N_VAL, D_IN, D_OUT = 2048, 300, 8, 2


def init(key):
  return {'w': jax.random.normal(key, (D_IN, D_OUT)) * 0.3, 'b': jnp.zeros(D_OUT)}


def apply(params, x):
  return x @ params['w'] + params['b']


MODEL = (init, apply)
RNG = np.random.default_rng(5)
X = RNG.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
Y = (X @ RNG.normal(size=(D_IN, D_OUT)) + 0.1 * RNG.normal(size=(len(X), D_OUT))).astype(np.float32)
DATA = sweep.data.arrays(X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], Y[N_TRAIN:])


def mse(params, x, y):
  w, b = (np.asarray(params[k], np.float64) for k in ('w', 'b'))
  return float(np.mean(np.mean((x.astype(np.float64) @ w + b - y) ** 2, axis=1)))


def run(**kw):
  cfg = sweep.SweepConfig(
    model=MODEL,
    data=DATA,
    loss='mse',
    optimizer='sgd',
    learning_rate=[0.01, 0.05],
    batch_size=64,
    epochs=1,
    num_evals=1,
    **kw,
  )
  return sweep.run(cfg, progress=False)


def test_the_default_probe_costs_a_twentieth_of_a_segment_and_the_validation_set_is_whole():
  result = run()
  probe = result.config['train_probe']
  # One segment trains 2048 examples (three forward passes each): 5 % of that is 307
  # forward passes, rounded down to a power of two.
  assert probe['examples'] == 256 and probe['of'] == N_TRAIN
  subset = np.sort(np.random.default_rng(0).permutation(N_TRAIN)[:256])
  for i in range(len(result.table)):
    row = result.table.loc[i]
    params = result.params(i)
    want = mse(params, X[subset], Y[subset])
    np.testing.assert_allclose(row.final_train_loss, want, rtol=1e-4)
    val = mse(params, X[N_TRAIN:], Y[N_TRAIN:])
    np.testing.assert_allclose(row.final_val_loss, val, rtol=1e-4)


def test_the_whole_training_set_is_one_field_away():
  result = run(train_eval_size=N_TRAIN)
  assert result.config['train_probe']['examples'] == N_TRAIN
  for i in range(len(result.table)):
    want = mse(result.params(i), X[:N_TRAIN], Y[:N_TRAIN])
    np.testing.assert_allclose(result.table.final_train_loss[i], want, rtol=1e-4)
