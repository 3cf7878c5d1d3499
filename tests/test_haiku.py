"""haiku models (`hk.transform`, `hk.transform_with_state`, `hk.without_apply_rng`) against
the plain haiku loop: init key `fold_in(key(seed), 0)`, each seed's documented data order,
apply's rng for update t `fold_in(fold_in(key(seed), 2), t)`, `is_training` switched."""

import jax
import numpy as np
import optax
import pytest

import sweep
from sweep.errors import ConfigError

hk = pytest.importorskip('haiku')

RTOL, ATOL = 2e-4, 2e-4
N_TRAIN, N_VAL = 192, 64


def _digits():
  from sklearn.datasets import load_digits

  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)[: N_TRAIN + N_VAL]
  y = bunch.target.astype(np.int32)[: N_TRAIN + N_VAL]
  return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


XT, YT, XV, YV = _digits()
DIGITS = sweep.data.arrays(XT, YT, XV, YV, num_classes=10)


def init_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0)


def model_key(seed, t):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), t)


def batches(seed, batch, epochs, n=N_TRAIN):
  t = 0
  for e in range(epochs):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), e)
    order = np.asarray(jax.random.permutation(key, n))
    for j in range(n // batch):
      yield t, order[j * batch : (j + 1) * batch]
      t += 1


def ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


def dropout_mlp(x, is_training):
  x = jax.nn.relu(hk.Linear(16)(x))
  if is_training:
    x = hk.dropout(hk.next_rng_key(), 0.3, x)
  return hk.Linear(10)(x)


def batchnorm_mlp(x, is_training):
  x = hk.Linear(16, with_bias=False)(x)
  x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
  x = jax.nn.relu(x)
  if is_training:
    x = hk.dropout(hk.next_rng_key(), 0.3, x)
  return hk.Linear(10)(x)


def plain_mlp(x):
  return hk.Linear(10)(jax.nn.relu(hk.Linear(16)(x)))


def reference(model, seed, lr, batch, epochs, with_state, takes_rng, switch=True, evaluate=True):
  """The loop a haiku user writes (its validation loss with `evaluate`)."""
  kw = {'is_training': True} if switch else {}
  out = model.init(init_key(seed), XT[:1], **kw)
  params, state = out if with_state else (out, {})
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  def call(p, s, x, rng, training):
    args = (rng,) if takes_rng else ()
    kw = {'is_training': training} if switch else {}
    if with_state:
      return model.apply(p, s, *args, x, **kw)
    return model.apply(p, *args, x, **kw), s

  @jax.jit
  def step(params, state, opt_state, xb, yb, rng):
    def loss(p):
      logits, new = call(p, state, xb, rng, True)
      return ce(logits, yb), new

    (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  for t, idx in batches(seed, batch, epochs):
    params, state, opt_state = step(params, state, opt_state, XT[idx], YT[idx], model_key(seed, t))
  if not evaluate:
    return params, state, None
  logits, _ = call(params, state, XV, None, False)
  return params, state, float(ce(logits, YV))


CASES = {
  'transform-dropout': (hk.transform(dropout_mlp), False, True, True),
  'with-state-batchnorm': (hk.transform_with_state(batchnorm_mlp), True, True, True),
  'without-apply-rng': (hk.without_apply_rng(hk.transform(plain_mlp)), False, False, False),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_haiku_model_equals_its_own_loop(case):
  model, with_state, takes_rng, switch = CASES[case]
  cfg = sweep.SweepConfig(
    model=model, data=DIGITS, learning_rate=[3e-3, 1e-2], batch_size=32, seed=[0, 1], epochs=2
  )
  result = sweep.run(cfg, progress=False)
  assert (result.table.status == 'ok').all()
  for i, row in result.table.iterrows():
    params, state, val = reference(
      model, int(row.seed), row.learning_rate, 32, 2, with_state, takes_rng, switch
    )
    assert_close(result.params(i), params, f'{case} run {i}')
    if with_state:
      assert_close(result.variables(i)['state'], state, f'{case} run {i} state')
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)


def test_haiku_dropout_is_keyed_by_the_documented_keys():
  """Another key stream parts the loop from the engine: the masks count."""
  model = hk.transform(dropout_mlp)
  cfg = sweep.SweepConfig(model=model, data=DIGITS, learning_rate=1e-2, batch_size=32, epochs=1)
  got = sweep.run(cfg, progress=False).table.final_val_loss[0]
  global model_key
  documented = model_key
  try:
    model_key = lambda seed, t: jax.random.fold_in(jax.random.key(seed + 7), t)  # noqa: E731
    _, _, other = reference(model, 0, 1e-2, 32, 1, False, True)
  finally:
    model_key = documented
  _, _, same = reference(model, 0, 1e-2, 32, 1, False, True)
  np.testing.assert_allclose(got, same, rtol=RTOL)
  assert abs(other - got) > 1e-4


def test_a_second_haiku_sweep_with_other_values_compiles_nothing():
  from compiles import counting_compiles

  def config(lr):
    return sweep.SweepConfig(
      model=hk.transform(dropout_mlp), data=DIGITS, learning_rate=lr, batch_size=32, updates=4
    )

  with counting_compiles() as names:
    sweep.run(config([1e-2, 3e-2]), progress=False)
    first = len(names)
    sweep.run(config([2e-3, 5e-3]), progress=False)  # rebuilt: hk.transform anew
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'


def test_haiku_mistakes_are_refused_before_compiling():
  def other_switch(x, training):
    return hk.Linear(10)(x)

  cfg = sweep.SweepConfig(model=hk.transform(other_switch), data=DIGITS, updates=2)
  with pytest.raises(ConfigError, match=r"train_argument='training'"):
    sweep.check(cfg)
  sweep.check(cfg.replace(train_argument='training'))
  with pytest.raises(ConfigError, match=r"train_argument='mode'.*takes \['x', 'training'\]"):
    sweep.check(cfg.replace(train_argument='mode'))
  with pytest.raises(ConfigError, match='rng_argument.*hk.next_rng_key'):
    sweep.check(cfg.replace(rng_argument='rng'))
  # Dropout drawn without an rng to draw from: haiku's own message, as a config error.
  no_rng = hk.without_apply_rng(hk.transform(dropout_mlp))
  with pytest.raises(ConfigError, match='model'):
    sweep.check(cfg.replace(model=no_rng))


def noisy_mlp(x, is_training):
  """Draws in evaluation mode too (as a VAE samples its code): noise on the hidden layer."""
  del is_training
  h = jax.nn.relu(hk.Linear(16)(x))
  return hk.Linear(10)(h + 0.3 * jax.random.normal(hk.next_rng_key(), h.shape))


def test_a_haiku_function_that_draws_at_evaluation_gets_the_evaluation_chunks_key():
  """apply's rng at evaluation is the chunk's documented key, `fold_in(fold_in(key(0), 4),
  c)`, over the validation set padded to the chunk (192: the probe, the whole training set)
  by repeating its first example; haiku would otherwise refuse a None rng."""
  model = hk.transform(noisy_mlp)
  cfg = sweep.SweepConfig(model=model, data=DIGITS, learning_rate=1e-2, batch_size=32, epochs=1)
  got = sweep.run(cfg, progress=False).table.final_val_loss[0]
  params, _, _ = reference(model, 0, 1e-2, 32, 1, False, True, evaluate=False)
  padded = np.concatenate([XV, np.repeat(XV[:1], N_TRAIN - N_VAL, axis=0)])

  def val(chunk):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 4), chunk)
    return float(ce(model.apply(params, key, padded, is_training=False)[:N_VAL], YV))

  np.testing.assert_allclose(got, val(0), rtol=RTOL)
  assert abs(val(1) - got) > 1e-3  # the key counts
