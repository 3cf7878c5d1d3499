"""Evaluation sized to the training: the training probe's default size, the validation
subset of the intermediate evaluation points, and the sets each is measured on (recomputed
here in numpy from the parameters of a plain optax loop, or from each run's final ones)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sweep

N_TRAIN, N_VAL, D_IN, D_OUT = 2048, 1200, 8, 2


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
    **{'num_evals': 1, **kw},
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


def loop(lr, batch, epochs, points):
  """The plain optax loop (documented data order and init key): the parameters at each of
  `points` evenly spaced evaluation points, the start included."""
  params = init(jax.random.fold_in(jax.random.key(0), 0))
  opt = optax.sgd(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(lambda p: jnp.mean(jnp.mean((apply(p, x) - y) ** 2, axis=1)))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  per_epoch = N_TRAIN // batch
  every = per_epoch * epochs // points
  out = [params]
  for e in range(epochs):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), e)
    order = np.asarray(jax.random.permutation(key, N_TRAIN))
    for j in range(per_epoch):
      idx = order[j * batch : (j + 1) * batch]
      params, state = step(params, state, X[idx], Y[idx])
      if (e * per_epoch + j + 1) % every == 0:
        out.append(params)
  return out


@pytest.mark.parametrize('scheduler', [None, 'halving'])
def test_intermediate_points_evaluate_a_validation_subset_and_the_last_the_whole_set(scheduler):
  """Four evaluation points of 512 examples' training each: the validation pass at the
  start and the intermediate points takes 256 of the 1200 validation examples (5 % of a
  segment's 1536 forward passes, at least 256), the last all of them; each point against
  numpy on the plain loop's parameters there. The same under successive halving (the
  sweep state of adaptive search), whose decisions read the intermediate points."""
  kw = {}
  if scheduler:
    kw['scheduler'] = sweep.schedulers.SuccessiveHalving(eta=2, min_fraction=1 / 2)
  result = run(num_evals=4, **kw)
  val = result.config['val_probe']
  assert (val['examples'], val['of']) == (256, N_VAL)
  subset = np.sort(np.random.default_rng(1).permutation(N_VAL)[:256])
  xv, yv = X[N_TRAIN:], Y[N_TRAIN:]
  for i, row in result.table.iterrows():
    curve = result.curves[result.curves.run == i].sort_values('eval')
    points = loop(row.learning_rate, 64, 1, 4)[: len(curve)]
    for k, (params, got) in enumerate(zip(points, curve.val_loss, strict=True)):
      last = k == 4
      want = mse(params, xv, yv) if last else mse(params, xv[subset], yv[subset])
      np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f'run {i}, point {k}')
      if not last:  # the subset's loss is not the whole set's: the test tells them apart
        assert abs(mse(params, xv, yv) - want) > 1e-4 * want
    if row.status == 'ok':
      np.testing.assert_allclose(row.final_val_loss, mse(points[-1], xv, yv), rtol=1e-4)
  if scheduler:
    assert set(result.table.status) == {'ok', 'stopped'}


def test_the_whole_validation_set_at_every_point_is_one_field_away():
  result = run(num_evals=4, val_eval_size=N_VAL)
  assert result.config['val_probe']['examples'] == N_VAL
  xv, yv = X[N_TRAIN:], Y[N_TRAIN:]
  for i, row in result.table.iterrows():
    curve = result.curves[result.curves.run == i].sort_values('eval')
    for params, got in zip(loop(row.learning_rate, 64, 1, 4), curve.val_loss, strict=True):
      np.testing.assert_allclose(got, mse(params, xv, yv), rtol=1e-4)


def test_a_second_sweep_with_another_validation_subset_size_compiles_nothing():
  """The subset is a count of evaluation chunks given to the program as data."""
  from compiles import counting_compiles

  with counting_compiles() as names:
    run(num_evals=4)
    first = len(names)
    run(num_evals=4, val_eval_size=512)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
