"""Models as researchers write them: several outputs, a key at call time.

Each reference is the plain optax loop a user writes for one configuration, from the
documented semantics only: the init key `fold_in(key(seed), 0)`, each seed's data order,
the model's key for update t `k = fold_in(fold_in(key(seed), 2), t)` and, for an
`rng_argument`, `fold_in(k, 1)`. It shares no code with the engine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles
from flax import linen as nn

import sweep
from sweep.errors import ConfigError

RTOL, ATOL = 2e-4, 2e-4
N_TRAIN, N_VAL = 192, 64


def _digits():
  from sklearn.datasets import load_digits

  x = (load_digits().data / 16.0).astype(np.float32)[: N_TRAIN + N_VAL]
  y = load_digits().target.astype(np.int32)[: N_TRAIN + N_VAL]
  return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


XT, YT, XV, YV = _digits()
# An autoencoder's data: the inputs are the targets.
IMAGES = sweep.data.arrays(XT, XT, XV, XV, name='digits-ae')


def init_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0)


def epoch_order(seed, epoch, n):
  return jax.random.permutation(
    jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch), n
  )


def model_key(seed, t):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), t)


def batches(seed, batch, epochs, n=N_TRAIN):
  t = 0
  for e in range(epochs):
    order = np.asarray(epoch_order(seed, e, n))
    for j in range(n // batch):
      yield t, order[j * batch : (j + 1) * batch]
      t += 1


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


# ------------------------------------------------------- the flax VAE example ----
# examples/vae/models.py of flax, at a size that trains in a second.


class Encoder(nn.Module):
  latents: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name='fc1')(x))
    mean_x = nn.Dense(self.latents, name='fc2_mean')(x)
    logvar_x = nn.Dense(self.latents, name='fc2_logvar')(x)
    return mean_x, logvar_x


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    z = nn.relu(nn.Dense(32, name='fc1')(z))
    return nn.Dense(64, name='fc2')(z)


def reparameterize(rng, mean, logvar):
  std = jnp.exp(0.5 * logvar)
  eps = jax.random.normal(rng, logvar.shape)
  return mean + eps * std


class VAE(nn.Module):
  latents: int = 4

  def setup(self):
    self.encoder = Encoder(self.latents)
    self.decoder = Decoder()

  def __call__(self, x, z_rng):
    mean, logvar = self.encoder(x)
    z = reparameterize(z_rng, mean, logvar)
    recon_x = self.decoder(z)
    return recon_x, mean, logvar


class MeanAE(nn.Module):
  """The VAE decoding its mean: the same three outputs, no key."""

  latents: int = 4

  @nn.compact
  def __call__(self, x):
    mean, logvar = Encoder(self.latents)(x)
    return Decoder()(mean), mean, logvar


class DictAE(nn.Module):
  @nn.compact
  def __call__(self, x):
    mean, logvar = Encoder(4)(x)
    return {'recon': Decoder()(mean), 'mean': mean, 'logvar': logvar}


def kl_divergence(mean, logvar):
  return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)


def vae_loss(outputs, x):
  """Per example: binary cross-entropy of the reconstruction plus the KL term."""
  recon_x, mean, logvar = outputs
  bce = optax.sigmoid_binary_cross_entropy(recon_x, x).sum(-1)
  return bce + kl_divergence(mean, logvar)


def dict_loss(outputs, x):
  return vae_loss((outputs['recon'], outputs['mean'], outputs['logvar']), x)


def multi_output_reference(module, loss, seed, lr, batch, epochs):
  params = module.init(init_key(seed), XT[:1])['params']
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb):
    grads = jax.grad(lambda p: loss(module.apply({'params': p}, xb), xb).mean())(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _, idx in batches(seed, batch, epochs):
    params, opt_state = step(params, opt_state, XT[idx])
  val = loss(module.apply({'params': params}, XV), XV).mean()
  return params, float(val)


@pytest.mark.parametrize('module, loss', [(MeanAE(), vae_loss), (DictAE(), dict_loss)])
def test_several_outputs_are_handed_whole_to_a_callable_loss(module, loss):
  cfg = sweep.SweepConfig(
    model=module,
    data=IMAGES,
    loss=loss,
    learning_rate=[1e-3, 3e-3],
    batch_size=32,
    epochs=2,
  )
  result = sweep.run(cfg, progress=False)
  assert (result.table.status == 'ok').all()
  assert 'final_val_accuracy' not in result.table
  for i, row in result.table.iterrows():
    params, val = multi_output_reference(
      module, loss, int(row.seed), row.learning_rate, int(row.batch_size), 2
    )
    assert_close(result.params(i), params, f'run {i}')
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)


def test_a_named_loss_with_several_outputs_is_refused_naming_them():
  cfg = sweep.SweepConfig(model=MeanAE(), data=IMAGES, loss='mse', updates=2)
  with pytest.raises(ConfigError, match=r"loss='mse'.*several outputs \(a tuple of 3: \(2, 64\), "):
    sweep.check(cfg)
  # The default loss (mse for float targets) is named too.
  with pytest.raises(ConfigError, match='callable loss'):
    sweep.check(cfg.replace(loss=None))


# ------------------------------------------------------------ a key at call time ----


def eval_key(chunk):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 4), chunk)


def vae_reference(seed, lr, batch, epochs):
  """The flax VAE example's loop: `vae.apply(params, x, z_rng)` with the documented keys."""
  module = VAE()
  key = init_key(seed)
  params = module.init(key, XT[:1], jax.random.fold_in(key, 1))['params']
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, z_rng):
    def loss(p):
      return vae_loss(module.apply({'params': p}, xb, z_rng), xb).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t, idx in batches(seed, batch, epochs):
    z_rng = jax.random.fold_in(model_key(seed, t), 1)
    params, opt_state = step(params, opt_state, XT[idx], z_rng)
  # The validation set is one evaluation chunk (eval_batch_size=64), chunk 0's key.
  val = vae_loss(module.apply({'params': params}, XV, eval_key(0)), XV).mean()
  return params, float(val)


@pytest.fixture(scope='module')
def vae_sweep():
  cfg = sweep.SweepConfig(
    model=VAE(),
    data=IMAGES,
    loss=vae_loss,
    rng_argument='z_rng',
    learning_rate=[1e-3, 3e-3],
    batch_size=32,
    seed=[0, 1],
    epochs=2,
    eval_batch_size=64,
  )
  return cfg, sweep.run(cfg, progress=False)


def test_the_flax_vae_with_its_z_rng_equals_the_loop_that_passes_the_same_keys(vae_sweep):
  _, result = vae_sweep
  assert len(result.table) == 4 and (result.table.status == 'ok').all()
  for i, row in result.table.iterrows():
    params, val = vae_reference(int(row.seed), row.learning_rate, 32, 2)
    assert_close(result.params(i), params, f'run {i}')
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)


def test_the_keys_matter(vae_sweep):
  """Decoding with other keys gives another validation loss: the equality above is not
  the one of a model whose draws do not count."""
  _, result = vae_sweep
  module, params = VAE(), result.params(0)
  at = lambda key: float(vae_loss(module.apply({'params': params}, XV, key), XV).mean())  # noqa: E731
  np.testing.assert_allclose(result.table.final_val_loss[0], at(eval_key(0)), rtol=RTOL)
  assert abs(at(eval_key(0)) - at(eval_key(1))) > 1e-3


def test_a_second_vae_sweep_with_other_values_compiles_nothing(vae_sweep):
  cfg, _ = vae_sweep
  cfg = cfg.replace(epochs=1, seed=0)
  with counting_compiles() as names:
    sweep.run(cfg.replace(learning_rate=[4e-3, 6e-3]), progress=False)
    first = len(names)
    sweep.run(cfg.replace(learning_rate=[7e-4, 9e-4], seed=3), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'


def test_a_pair_of_functions_takes_its_key_by_name():
  """`apply_fn(params, x, z_rng=key)`: the same keys as a module."""
  module = VAE()

  def init_fn(key):
    return module.init(key, XT[:1], jax.random.fold_in(key, 1))['params']

  def apply_fn(params, x, z_rng):
    return module.apply({'params': params}, x, z_rng)

  cfg = sweep.SweepConfig(
    model=(init_fn, apply_fn),
    data=IMAGES,
    loss=vae_loss,
    rng_argument='z_rng',
    learning_rate=3e-3,
    batch_size=32,
    updates=6,
    eval_batch_size=64,
  )
  result = sweep.run(cfg, progress=False)
  params, _ = vae_reference(0, 3e-3, 32, 1)  # one epoch is 6 updates
  assert_close(result.params(0), params, 'pair')


def test_a_key_argument_without_rng_argument_is_named_in_the_error():
  cfg = sweep.SweepConfig(model=VAE(), data=IMAGES, loss=vae_loss, updates=2)
  with pytest.raises(ConfigError, match=r"SweepConfig\(rng_argument='z_rng'\)"):
    sweep.check(cfg)
  with pytest.raises(ConfigError, match=r"rng_argument='rng'.*takes \['x', 'z_rng'\]"):
    sweep.check(cfg.replace(rng_argument='rng'))
  with pytest.raises(ConfigError, match="rng_argument='z rng'"):
    sweep.check(cfg.replace(rng_argument='z rng'))


def test_rng_argument_is_refused_for_an_equinox_model():
  import equinox as eqx

  cfg = sweep.SweepConfig(
    model=eqx.nn.MLP(64, 64, 8, 1, key=jax.random.key(0)),
    data=IMAGES,
    rng_argument='z_rng',
    updates=2,
  )
  with pytest.raises(ConfigError, match='equinox module is given its key as key='):
    sweep.check(cfg)
