"""Models with several inputs: token ids with their lengths, an image with its mask.

Each reference is the plain optax loop a user writes, from the documented data order
(`fold_in(fold_in(key(seed), 1), epoch)` permutations, drop-last batches) and init key
(`fold_in(key(seed), 0)`); it shares no code with the engine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sweep
from sweep import fingerprint
from sweep.errors import ConfigError

RTOL, ATOL = 2e-4, 2e-4
N_TRAIN, N_VAL, T = 192, 64, 64


def _data():
  from sklearn.datasets import load_digits

  bunch = load_digits()
  pixels = bunch.data[: N_TRAIN + N_VAL].astype(np.int64)  # 0..16: a vocabulary of 17
  rng = np.random.default_rng(0)
  lengths = rng.integers(24, T + 1, len(pixels))
  tokens = np.where(np.arange(T) < lengths[:, None], pixels, 0)  # padded with id 0
  mask = (np.arange(T) < lengths[:, None]).astype(np.float32)
  y = bunch.target[: N_TRAIN + N_VAL].astype(np.int32)
  return tokens, lengths, mask, y


TOKENS, LENGTHS, MASK, Y = _data()
tr, va = slice(0, N_TRAIN), slice(N_TRAIN, None)


def init_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0)


def batches(seed, batch, epochs, n=N_TRAIN):
  for e in range(epochs):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), e)
    order = np.asarray(jax.random.permutation(key, n))
    for j in range(n // batch):
      yield order[j * batch : (j + 1) * batch]


def ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class BagOfTokens(nn.Module):
  """The flax sst2 example's signature, `__call__(token_ids, lengths)`: the embeddings of
  the first `lengths` tokens averaged."""

  @nn.compact
  def __call__(self, token_ids, lengths):
    e = nn.Embed(17, 8)(token_ids)
    keep = (jnp.arange(token_ids.shape[1]) < lengths[:, None]).astype(e.dtype)
    pooled = (e * keep[..., None]).sum(1) / lengths[:, None].astype(e.dtype)
    return nn.Dense(10)(nn.relu(nn.Dense(16)(pooled)))


class MaskedImage(nn.Module):
  """Takes a dict batch whole: `{'image': (B, 64) floats, 'mask': (B, 64)}`."""

  @nn.compact
  def __call__(self, batch):
    x = batch['image'] * batch['mask']
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


def reference(module, x_train, x_val, call, seed, lr, batch, epochs):
  params = module.init(init_key(seed), *call(jax.tree.map(lambda a: a[:1], x_train)))['params']
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(lambda p: ce(module.apply({'params': p}, *call(xb)), yb))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for idx in batches(seed, batch, epochs):
    xb = jax.tree.map(lambda a, idx=idx: a[idx], x_train)
    params, opt_state = step(params, opt_state, xb, Y[tr][idx])
  return params, float(ce(module.apply({'params': params}, *call(x_val)), Y[va]))


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


def assert_bags_equal_their_loops(result, rows, epochs):
  """Each of `rows` (a `BagOfTokens` run at batch 32, seed 0) against the two-input loop."""
  for i, row in rows.iterrows():
    params, val = reference(
      BagOfTokens(),
      (TOKENS[tr], LENGTHS[tr]),
      (TOKENS[va], LENGTHS[va]),
      lambda x: x,
      0,
      row.learning_rate,
      32,
      epochs,
    )
    assert_close(result.params(i), params, f'run {i}')
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)


def test_token_ids_and_lengths_as_a_tuple_equal_the_two_input_loop():
  data = sweep.data.arrays(
    (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va], num_classes=10
  )
  assert data.x_train[0].dtype == np.int32 and data.x_train[1].shape == (N_TRAIN,)
  cfg = sweep.SweepConfig(
    model=BagOfTokens(),
    data=data,
    learning_rate=[3e-3, 1e-2],
    batch_size=32,
    epochs=2,
    eval_batch_size=48,  # the validation set padded to 96: padding is left out
  )
  result = sweep.run(cfg, progress=False)
  assert (result.table.status == 'ok').all()
  assert_bags_equal_their_loops(result, result.table, epochs=2)


def test_an_image_and_its_mask_as_a_dict_equal_the_loop_that_passes_the_dict():
  images = TOKENS.astype(np.float32) / 16
  xt = {'image': images[tr], 'mask': MASK[tr]}
  xv = {'image': images[va], 'mask': MASK[va]}
  cfg = sweep.SweepConfig(
    model=MaskedImage(),
    data=sweep.data.arrays(xt, Y[tr], xv, Y[va], num_classes=10),
    learning_rate=1e-2,
    batch_size=[32, 64],
    epochs=2,
  )
  result = sweep.run(cfg, progress=False)
  for i, row in result.table.iterrows():
    params, val = reference(MaskedImage(), xt, xv, lambda x: (x,), 0, 1e-2, int(row.batch_size), 2)
    assert_close(result.params(i), params, f'run {i}')
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)


def test_a_missing_second_input_is_named():
  data = sweep.data.arrays(TOKENS[tr], Y[tr], num_classes=10)
  cfg = sweep.SweepConfig(model=BagOfTokens(), data=data, updates=2)
  with pytest.raises(ConfigError, match=r'takes 2 inputs \(token_ids, lengths\).*as a tuple'):
    sweep.check(cfg)

  def apply_fn(params, token_ids, lengths):
    return BagOfTokens().apply({'params': params}, token_ids, lengths)

  pair = (lambda key: BagOfTokens().init(key, TOKENS[:1], LENGTHS[:1])['params'], apply_fn)
  with pytest.raises(ConfigError, match=r'takes 2 inputs \(token_ids, lengths\)'):
    sweep.check(cfg.replace(model=pair))


def test_inputs_of_several_arrays_are_checked_array_by_array():
  with pytest.raises(ConfigError, match=r'data.x_train\[1\].*non-finite'):
    sweep.data.arrays((TOKENS[tr], np.full(N_TRAIN, np.nan)), Y[tr])
  with pytest.raises(ConfigError, match=r'data.x_train.*one row per example each'):
    sweep.data.check(
      sweep.data.Dataset(
        (TOKENS[tr].astype(np.int32), LENGTHS[:10].astype(np.int32)),
        Y[tr],
        None,
        None,
        num_classes=10,
      )
    )
  with pytest.raises(ConfigError, match=r'data.x_val.*structure of data.x_train'):
    sweep.data.arrays((TOKENS[tr], LENGTHS[tr]), Y[tr], TOKENS[va], Y[va])
  with pytest.raises(ConfigError, match=r'data.x_val\[1\].*must be int32'):
    sweep.data.arrays(
      (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va].astype(float)), Y[va]
    )


def test_the_fingerprint_sees_every_input():
  a = sweep.data.arrays((TOKENS[tr], LENGTHS[tr]), Y[tr])
  lengths = LENGTHS[tr].copy()
  lengths[0] -= 1
  b = sweep.data.arrays((TOKENS[tr], lengths), Y[tr])
  fa, fb = (fingerprint.describe(d) for d in (a, b))
  assert fa['x_train'][0] == fb['x_train'][0] and fa['x_train'][1] != fb['x_train'][1]


def test_inputs_of_several_arrays_in_a_workdir_a_dry_run_and_with_noise_scale(tmp_path):
  """The paths that read the inputs beyond training: the fingerprint of a workdir (a rerun
  finds the sweep finished, a changed second input is another sweep), the dry run's
  estimate, and the half batches of the noise scale."""
  from sweep import dryrun

  data = sweep.data.arrays(
    (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va], num_classes=10
  )
  cfg = sweep.SweepConfig(
    model=BagOfTokens(), data=data, learning_rate=1e-2, batch_size=32, updates=6, noise_scale=True
  )
  workdir = str(tmp_path / 'w')
  first = sweep.run(cfg, workdir=workdir, progress=False)
  assert (first.table.status == 'ok').all() and np.isfinite(first.table.final_val_loss).all()
  again = sweep.run(cfg, workdir=workdir, progress=False)
  np.testing.assert_array_equal(again.table.final_val_loss, first.table.final_val_loss)
  lengths = LENGTHS[tr].copy()
  lengths[0] -= 1
  changed = cfg.replace(
    data=sweep.data.arrays((TOKENS[tr], lengths), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va])
  )
  with pytest.raises(Exception, match='(?i)differ|fingerprint|another sweep'):
    sweep.run(changed, workdir=workdir, progress=False)
  assert 'BagOfTokens' in dryrun.describe(cfg) or dryrun.describe(cfg)


def test_a_pair_of_functions_is_called_with_the_tuples_arrays():
  """`apply_fn(params, token_ids, lengths)`: the same runs as the module."""
  module = BagOfTokens()

  def init_fn(key):
    return module.init(key, TOKENS[:1], LENGTHS[:1])['params']

  def apply_fn(params, token_ids, lengths):
    return module.apply({'params': params}, token_ids, lengths)

  data = sweep.data.arrays(
    (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va], num_classes=10
  )
  cfg = sweep.SweepConfig(
    model=(init_fn, apply_fn), data=data, learning_rate=1e-2, batch_size=32, epochs=1
  )
  result = sweep.run(cfg, progress=False)
  params, val = reference(
    module, (TOKENS[tr], LENGTHS[tr]), (TOKENS[va], LENGTHS[va]), lambda x: x, 0, 1e-2, 32, 1
  )
  assert_close(result.params(0), params, 'pair')
  np.testing.assert_allclose(result.table.final_val_loss[0], val, rtol=RTOL)


def test_an_equinox_module_takes_a_tuples_arrays_one_example_at_a_time():
  eqx = pytest.importorskip('equinox')

  class Bag(eqx.Module):
    embed: eqx.nn.Embedding
    out: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.embed = eqx.nn.Embedding(17, 8, key=k1)
      self.out = eqx.nn.Linear(8, 10, key=k2)

    def __call__(self, token_ids, length):  # one example: (T,) ids, a scalar length
      e = jax.vmap(self.embed)(token_ids)
      keep = (jnp.arange(token_ids.shape[0]) < length).astype(e.dtype)
      return self.out((e * keep[:, None]).sum(0) / length.astype(e.dtype))

  model = Bag(jax.random.key(3))
  data = sweep.data.arrays(
    (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va], num_classes=10
  )
  cfg = sweep.SweepConfig(model=model, data=data, learning_rate=1e-2, batch_size=32, epochs=1)
  result = sweep.run(cfg, progress=False)

  params, static = eqx.partition(model, eqx.is_inexact_array)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  def logits(p, ids, lengths):
    return jax.vmap(eqx.combine(p, static))(ids, lengths)

  @jax.jit
  def step(p, opt_state, ids, lengths, y):
    grads = jax.grad(lambda p: ce(logits(p, ids, lengths), y))(p)
    updates, opt_state = opt.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  for idx in batches(0, 32, 1):
    params, opt_state = step(params, opt_state, TOKENS[tr][idx], LENGTHS[tr][idx], Y[tr][idx])
  val = float(ce(logits(params, TOKENS[va], LENGTHS[va]), Y[va]))
  np.testing.assert_allclose(result.table.final_val_loss[0], val, rtol=RTOL)


class MaskedConv(nn.Module):
  @nn.compact
  def __call__(self, batch):
    x = nn.Conv(4, (3, 3))(batch['image'] * batch['mask'])
    return nn.Dense(10)(x.mean(axis=(1, 2)))  # global average pooling


def test_an_array_of_images_without_a_channel_axis_is_named():
  images = (TOKENS.astype(np.float32) / 16).reshape(-1, 8, 8)
  x = {'image': images[tr], 'mask': MASK[tr].reshape(-1, 8, 8)}
  cfg = sweep.SweepConfig(
    model=MaskedConv(), data=sweep.data.arrays(x, Y[tr], num_classes=10), updates=2
  )
  with pytest.raises(ConfigError, match=r"inputs\['image'\] \(n, 8, 8\).*a\[\.\.\., None\]"):
    sweep.check(cfg)


# ------------------------------------- several inputs beyond the plain sweep ----


class NnxBag(nnx.Module):
  """`BagOfTokens` written in nnx: `__call__(token_ids, lengths)`."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(17, 8, rngs=rngs)
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, token_ids, lengths):
    e = self.embed(token_ids)
    keep = (jnp.arange(token_ids.shape[1]) < lengths[:, None]).astype(e.dtype)
    pooled = (e * keep[..., None]).sum(1) / lengths[:, None].astype(e.dtype)
    return self.out(nnx.relu(self.hidden(pooled)))


def drop_tokens(key, batch):
  """An augmentation of both inputs: each token replaced by id 0 with probability 0.2."""
  token_ids, lengths = batch
  keep = jax.random.bernoulli(key, 0.8, token_ids.shape)
  return jnp.where(keep, token_ids, 0), lengths


def test_an_nnx_module_with_two_inputs_augmented_on_a_batch_ramp_equals_its_loop():
  """Two inputs through the sweep state that moves runs between batch sizes (a ramp runs
  on `Population`), with an augmentation that takes and returns the tuple, on an nnx
  module: each run against the nnx loop that changes batch size at the same epoch and
  augments with the documented keys (the batch group's step at that place of the data
  order)."""
  ramp = sweep.batch_ramp(16, factor=2, at=(0.5,))  # 16 in epoch 0, 32 in epoch 1
  data = sweep.data.arrays(
    (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va], num_classes=10
  )
  cfg = sweep.SweepConfig(
    model=NnxBag,
    data=data,
    learning_rate=[3e-3, 1e-2],
    batch_size=[16, ramp],
    epochs=2,
    augment=drop_tokens,
  )
  result = sweep.run(cfg, progress=False)
  assert (result.table.status == 'ok').all() and len(result.table) == 4

  def nnx_loop(lr, sizes):
    model = NnxBag(rngs=nnx.Rngs(params=init_key(0)))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, ids, lengths, y, key):
      ids, lengths = drop_tokens(key, (ids, lengths))
      grads = nnx.grad(lambda m: ce(m(ids, lengths), y))(model)
      optimizer.update(model, grads)

    for epoch, b in enumerate(sizes):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), epoch)
      order = np.asarray(jax.random.permutation(key, N_TRAIN))
      for j in range(N_TRAIN // b):
        idx = order[j * b : (j + 1) * b]
        t = epoch * (N_TRAIN // b) + j  # the batch group's step
        aug = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 3), t)
        step(model, optimizer, TOKENS[tr][idx], LENGTHS[tr][idx], Y[tr][idx], aug)
    return model, float(ce(model(TOKENS[va], LENGTHS[va]), Y[va]))

  for i, row in result.table.iterrows():
    sizes = (16, 32) if row.batch_schedule != 'constant' else (16, 16)
    model, val = nnx_loop(row.learning_rate, sizes)
    assert row.updates == sum(N_TRAIN // b for b in sizes)
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL, err_msg=f'run {i}')
    mine = result.model(i)
    np.testing.assert_allclose(
      np.asarray(mine(TOKENS[va], LENGTHS[va])),
      np.asarray(model(TOKENS[va], LENGTHS[va])),
      rtol=1e-3,
      atol=1e-4,
    )


def test_successive_halving_on_two_inputs_stops_runs_and_the_survivors_equal_their_loops():
  """Adaptive search on a model of two inputs: the runs that reach the end equal the
  plain two-input loop; the stopped ones stopped at a rung with fewer updates."""
  data = sweep.data.arrays(
    (TOKENS[tr], LENGTHS[tr]), Y[tr], (TOKENS[va], LENGTHS[va]), Y[va], num_classes=10
  )
  cfg = sweep.SweepConfig(
    model=BagOfTokens(),
    data=data,
    learning_rate=[1e-4, 1e-3, 1e-2],
    batch_size=32,
    epochs=3,
    scheduler=sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 3),
  )
  result = sweep.run(cfg, progress=False)
  table = result.table
  finished = table[table.status == 'ok']
  assert len(finished) == 1 and (table.status == 'stopped').sum() == 2
  assert (table[table.status == 'stopped'].updates < finished.updates.iloc[0]).all()
  assert_bags_equal_their_loops(result, finished, epochs=3)


def test_a_keras_functional_model_of_two_inputs_equals_its_stateless_loop():
  """A Keras functional model over an image and its mask (`keras.Model([image, mask],
  out)`), against the loop a Keras-on-JAX user writes with `stateless_call`."""
  import os

  os.environ.setdefault('KERAS_BACKEND', 'jax')
  keras = pytest.importorskip('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('keras runs on another backend here')
  keras.utils.set_random_seed(0)
  image, mask = keras.Input((64,)), keras.Input((64,))
  hidden = keras.layers.Dense(16, activation='relu')(keras.layers.Multiply()([image, mask]))
  model = keras.Model([image, mask], keras.layers.Dense(10)(hidden))
  images = TOKENS.astype(np.float32) / 16
  data = sweep.data.arrays(
    (images[tr], MASK[tr]), Y[tr], (images[va], MASK[va]), Y[va], num_classes=10
  )
  cfg = sweep.SweepConfig(model=model, data=data, learning_rate=[3e-3, 1e-2], batch_size=32)
  result = sweep.run(cfg, progress=False)
  weights = [jnp.asarray(np.asarray(v.value)) for v in model.trainable_variables]
  for i, row in result.table.iterrows():
    params, opt = weights, optax.adam(row.learning_rate)
    opt_state = opt.init(params)

    def loss(p, a, m, y):
      return ce(model.stateless_call(p, [], [a, m], training=True)[0], y)

    for idx in batches(0, 32, 1):
      grads = jax.grad(loss)(params, images[tr][idx], MASK[tr][idx], Y[tr][idx])
      updates, opt_state = opt.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    val = float(loss(params, images[va], MASK[va], Y[va]))
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL, err_msg=f'run {i}')
