"""A saved run's optimizer state comes back in optax's own types: optax's helpers and
`update` work on it, and it equals the state of the same training done plainly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sweep
from sweep import checkpoints

N_TRAIN, N_VAL, D_IN, HIDDEN, CLASSES = 96, 32, 6, 8, 3


def init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.normal(k1, (HIDDEN, D_IN)) / math.sqrt(D_IN),
    'w2': jax.random.normal(k2, (CLASSES, HIDDEN)) / math.sqrt(HIDDEN),
  }


def apply(params, x):
  return jnp.tanh(x @ params['w1'].T) @ params['w2'].T


def _data():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(D_IN, CLASSES)), 1).astype(np.int32)
  return sweep.data.arrays(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


DATA = _data()
BATCH, EPOCHS = 16, 2


def plain_loop(opt, seed):
  """The run trained plainly: optax alone, the documented init key and data order."""
  params = jax.jit(init)(jax.random.fold_in(jax.random.key(seed), 0))
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y))

    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for epoch in range(EPOCHS):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
    perm = np.asarray(jax.random.permutation(key, N_TRAIN))
    for j in range(N_TRAIN // BATCH):
      idx = perm[j * BATCH : (j + 1) * BATCH]
      params, state = step(params, state, DATA.x_train[idx], DATA.y_train[idx])
  return params, state


def sweep_to(workdir, optimizer, learning_rate):
  cfg = sweep.SweepConfig(
    model=(init, apply),
    data=DATA,
    optimizer=optimizer,
    learning_rate=[learning_rate],
    batch_size=BATCH,
    epochs=EPOCHS,
  )
  sweep.run(cfg, str(workdir), progress=False)
  (i,) = checkpoints.saved_runs(str(workdir))
  return i


def close(a, b):
  return all(
    np.allclose(x, y, rtol=1e-4, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_a_named_optimizers_state_is_optax_own_and_equals_the_plain_loops(tmp_path):
  i = sweep_to(tmp_path, 'adam', 1e-2)
  saved = checkpoints.restore_run(str(tmp_path), i)
  state = saved['opt_state']
  # The state the sweep trained with: injected hyperparameters around optax.adam's own.
  assert float(state.hyperparams['learning_rate']) == pytest.approx(1e-2)
  adam_state = state.inner_state[0]
  assert isinstance(adam_state, optax.ScaleByAdamState)
  _, want = plain_loop(optax.adam(1e-2), seed=0)
  assert int(adam_state.count) == int(want[0].count) == EPOCHS * (N_TRAIN // BATCH)
  assert close(adam_state.mu, want[0].mu) and close(adam_state.nu, want[0].nu)
  assert close(optax.tree_utils.tree_get(state.inner_state, 'mu'), want[0].mu)

  # Given the transformation to go on with, its own state, ready for `update`.
  mine = checkpoints.restore_run(str(tmp_path), i, optimizer=optax.adam(1e-2))['opt_state']
  assert jax.tree.structure(mine) == jax.tree.structure(want)
  grads = jax.tree.map(np.ones_like, saved['params'])
  _, after = optax.adam(1e-2).update(grads, mine, saved['params'])
  assert int(after[0].count) == int(want[0].count) + 1


def test_a_schedule_free_factorys_state_gives_optax_its_evaluation_parameters(tmp_path):
  def schedule_free(learning_rate):
    return optax.contrib.schedule_free_adamw(learning_rate, warmup_steps=2)

  i = sweep_to(tmp_path, schedule_free, 3e-3)
  saved = checkpoints.restore_run(str(tmp_path), i, optimizer=schedule_free)
  (inner,) = [s for s in jax.tree.leaves(saved['opt_state'], is_leaf=_is_sf) if _is_sf(s)]
  evaluated = optax.contrib.schedule_free_eval_params(inner, saved['params'])
  assert close(evaluated, saved['eval_params'])
  plain = checkpoints.restore_run(
    str(tmp_path), i, optimizer=optax.contrib.schedule_free_adamw(3e-3)
  )
  assert _is_sf(plain['opt_state'])
  assert close(
    optax.contrib.schedule_free_eval_params(plain['opt_state'], saved['params']), evaluated
  )


def _is_sf(x):
  return isinstance(x, optax.contrib.ScheduleFreeState)


def test_an_optimizer_of_another_structure_is_refused_naming_the_run(tmp_path):
  i = sweep_to(tmp_path, 'adam', 1e-2)
  with pytest.raises(ValueError, match=f'run {i} .*another structure'):
    checkpoints.restore_run(str(tmp_path), i, optimizer=optax.sgd(0.1, momentum=0.9))
  with pytest.raises(TypeError, match='optax transformation'):
    checkpoints.restore_run(str(tmp_path), i, optimizer='adam')
