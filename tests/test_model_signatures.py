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
    batch_size=[32, 64],
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
