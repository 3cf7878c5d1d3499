"""Tests for sweep.models: the built-in modules and the to_functions adapter."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from sweep import adapters, models
from sweep.errors import ConfigError


def param_shapes(params):
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def init_and_apply(module, x):
  """Shapes of the params and outputs, traced without compiling (compiles are slow on CPU)."""
  params = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  return params, jax.eval_shape(module.apply, {'params': params}, x)


# ---------------------------------------------------------------------------------------------
# Modules


def test_mlp_default_is_784_10_10():
  params, out = init_and_apply(models.MLP(), jnp.zeros((2, 784)))
  assert param_shapes(params) == {
    'Dense_0/weight': (10, 784),
    'Dense_0/bias': (10,),
    'Dense_1/weight': (10, 10),
    'Dense_1/bias': (10,),
  }
  assert out.shape == (2, 10)


def test_mlp_flattens_and_uses_activation():
  module = models.MLP(hidden=(5, 4), outputs=3, activation='tanh')
  params, out = init_and_apply(module, jnp.ones((2, 28, 28)))
  assert out.shape == (2, 3)
  assert param_shapes(params)['Dense_0/weight'] == (5, 784)
  # Hidden layers are squashed into (-1, 1) by tanh, the last layer is linear.
  x = jnp.ones((2, 2, 2))
  params = {
    'Dense_0': {'weight': jnp.full((5, 4), 10.0), 'bias': jnp.zeros(5)},
    'Dense_1': {'weight': jnp.eye(4, 5), 'bias': jnp.zeros(4)},
    'Dense_2': {'weight': jnp.full((3, 4), 10.0), 'bias': jnp.zeros(3)},
  }
  out = jax.jit(module.apply)({'params': params}, x)
  np.testing.assert_allclose(out, 10 * 4 * np.tanh(1.0), rtol=1e-5)
  with pytest.raises(ConfigError, match='model.activation'):
    models.MLP(activation='nope').init(jax.random.key(0), jnp.ones((1, 3)))


@pytest.mark.parametrize(
  'shape, module, kernel',
  [
    ((3, 40), models.CNN(), (32, 5, 1)),  # MNIST-1D signals
    ((3, 40, 2), models.CNN(spatial_dims=1), (32, 5, 2)),  # multi-channel signals
    ((3, 8, 8), models.CNN(), (32, 3, 3, 1)),  # digits images
    ((3, 28, 28, 1), models.CNN(outputs=4), (32, 3, 3, 1)),  # MNIST with a channel axis
  ],
)
def test_cnn_shapes(shape, module, kernel):
  params, out = init_and_apply(module, jnp.ones(shape))
  assert out.shape == (3, module.outputs)
  assert param_shapes(params)['Conv_0/weight'] == kernel
  assert param_shapes(params)['Dense_0/weight'][0] == 64


def test_cnn_stride_two_same_padding():
  params, _ = init_and_apply(models.CNN(channels=(4, 6), hidden=None), jnp.ones((1, 28, 28)))
  # 28 -> 14 -> 7 with stride 2 and SAME padding, 6 channels, straight to the output layer.
  assert param_shapes(params)['Dense_0/weight'] == (10, 7 * 7 * 6)


def test_dense_is_nn_dense_with_its_weight_transposed():
  x = jax.random.normal(jax.random.key(1), (3, 2, 7))
  theirs = nn.Dense(5).init(jax.random.key(2), x)['params']
  ours = models.Dense(5).init(jax.random.key(2), x)['params']
  np.testing.assert_array_equal(ours['weight'], theirs['kernel'].T)
  np.testing.assert_array_equal(ours['bias'], theirs['bias'])
  bias = jnp.arange(5.0)
  np.testing.assert_allclose(
    models.Dense(5).apply({'params': {'weight': ours['weight'], 'bias': bias}}, x),
    np.asarray(x, np.float64) @ np.asarray(theirs['kernel'], np.float64) + bias,
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize(
  'shape, window, stride, padding',
  [
    ((2, 40, 3), (5,), 2, 'SAME'),
    ((2, 7, 3), (4,), 3, 'SAME'),
    ((2, 9, 8, 3), (3, 3), 2, 'SAME'),
    ((2, 9, 8, 3), (3, 2), 1, 'VALID'),
  ],
)
def test_conv_is_nn_conv(shape, window, stride, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  theirs = nn.Conv(4, window, strides=stride, padding=padding)
  ours = models.Conv(4, window, strides=stride, padding=padding)
  p_theirs = theirs.init(jax.random.key(1), x)['params']
  p_ours = ours.init(jax.random.key(1), x)['params']
  np.testing.assert_array_equal(p_ours['weight'], jnp.moveaxis(p_theirs['kernel'], -1, 0))
  np.testing.assert_allclose(
    ours.apply({'params': p_ours}, x), theirs.apply({'params': p_theirs}, x), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ConfigError, match='model.padding'):
    models.Conv(4, window, padding='CIRCULAR').init(jax.random.key(1), x)


def test_cnn_rejects_other_ranks():
  with pytest.raises(ConfigError, match='model'):
    models.CNN().init(jax.random.key(0), jnp.ones((1, 2, 3, 4, 5)))


def test_linear():
  params, out = init_and_apply(models.Linear(outputs=2), jnp.ones((4, 3, 2)))
  assert param_shapes(params) == {'Dense_0/weight': (2, 6), 'Dense_0/bias': (2,)}
  assert out.shape == (4, 2)


def test_factories_size_to_data_or_not():
  assert models.mlp(outputs=3) == models.MLP(hidden=(10,), outputs=3)
  assert models.cnn(outputs=2).outputs == 2
  assert models.linear(outputs=1) == models.Linear(outputs=1)
  sized = models.mlp(hidden=[32, 16])
  assert isinstance(sized, models.SizedToData)
  assert sized.make(7) == models.MLP(hidden=(32, 16), outputs=7)
  # Equal configs are equal and hash alike, so compiled programs can be shared.
  assert sized == models.mlp(hidden=(32, 16)) and hash(sized) == hash(models.mlp(hidden=(32, 16)))
  assert isinstance(models.cnn(), models.SizedToData)
  assert models.linear().make(4) == models.Linear(outputs=4)


@pytest.mark.parametrize(
  'make, field',
  [
    (lambda: models.mlp(hidden=(0,)), 'model.hidden'),
    (lambda: models.mlp(activation='softmax'), 'model.activation'),
    (lambda: models.mlp(outputs=0), 'model.outputs'),
    (lambda: models.cnn(channels='32'), 'model.channels'),
    (lambda: models.cnn(spatial_dims=3), 'model.spatial_dims'),
    (lambda: models.linear(outputs=1.5), 'model.outputs'),
  ],
)
def test_factory_errors(make, field):
  with pytest.raises(ConfigError, match=f'^{field}='):
    make()


# ---------------------------------------------------------------------------------------------
# to_functions

KEYS = jax.random.split(jax.random.key(0), 3)
X = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)


def check_functions(init_fn, apply_fn, outputs, same_for_every_key=False):
  """Inits under jit(vmap) over 3 keys, then applies under vmap; returns the params."""
  params = jax.jit(jax.vmap(init_fn))(KEYS)
  leaves = jax.tree.leaves(params)
  assert leaves and all(leaf.shape[0] == 3 for leaf in leaves)
  kernels = [leaf for leaf in leaves if leaf.ndim == 3]
  assert kernels
  for leaf in kernels:
    same = np.allclose(leaf[0], leaf[1]) and np.allclose(leaf[1], leaf[2])
    assert same == same_for_every_key
  out = jax.jit(jax.vmap(apply_fn, in_axes=(0, None)))(params, X)
  assert out.shape == (3, len(X), outputs)
  return params


def test_tuple_is_returned_as_is():
  def init_fn(key):
    return {'w': jax.random.normal(key, (6, 2))}

  def apply_fn(params, x):
    return x @ params['w']

  pair = (init_fn, apply_fn)
  assert models.to_functions(pair, X, 2) is pair
  check_functions(*models.to_functions(pair, X, 2), outputs=2)


@pytest.mark.parametrize('bad', [(len,), (len, 3), (1, 2)])
def test_tuple_needs_two_callables(bad):
  with pytest.raises(ConfigError, match='^model='):
    models.to_functions(bad, X, 2)


def test_linen_module():
  init_fn, apply_fn = models.to_functions(models.MLP(hidden=(8,), outputs=4), X, 4)
  params = check_functions(init_fn, apply_fn, outputs=4)
  assert set(params) == {'Dense_0', 'Dense_1'}


def test_linen_with_other_collections_is_rejected():
  class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(nn.Dense(2)(x))

  # Pure (init_fn, apply_fn) functions cannot carry batch statistics; the engine's own
  # adapter (sweep.adapters) does.
  with pytest.raises(ConfigError, match='batch_stats'):
    models.to_functions(WithBatchNorm(), X, 2)
  assert adapters.adapt(WithBatchNorm(), X, 2).stateful


def test_sized_to_data():
  init_fn, apply_fn = models.to_functions(models.linear(), X, 3)
  check_functions(init_fn, apply_fn, outputs=3)
  init_fn, apply_fn = models.to_functions(models.cnn(channels=(2,), hidden=4), X, 5)
  params = jax.eval_shape(init_fn, jax.random.key(0))
  assert jax.eval_shape(apply_fn, params, X).shape == (5, 5)
  with pytest.raises(ConfigError, match='output_dim'):
    models.to_functions(models.mlp(), X, None)


class NnxMLP(nnx.Module):
  def __init__(self, din=6, dout=3, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(din, 8, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(8, dout, rngs=rngs)])

  def __call__(self, x):
    return self.layers[0](nnx.relu(self.hidden(x)))


def test_nnx_class():
  init_fn, apply_fn = models.to_functions(NnxMLP, X, 3)
  params = check_functions(init_fn, apply_fn, outputs=3)
  assert param_shapes(params)['hidden/kernel'] == (3, 6, 8)
  assert param_shapes(params)['layers/0/kernel'] == (3, 8, 3)


def test_nnx_partial_and_matches_eager_module():
  init_fn, apply_fn = models.to_functions(functools.partial(NnxMLP, dout=2), X, 2)
  check_functions(init_fn, apply_fn, outputs=2)
  # The functions reproduce the module built eagerly with the same key.
  key = KEYS[1]
  eager = NnxMLP(dout=2, rngs=nnx.Rngs(params=key))
  np.testing.assert_allclose(apply_fn(init_fn(key), X), eager(X), rtol=1e-5, atol=1e-6)


def test_nnx_instance_shares_its_parameters():
  instance = NnxMLP(rngs=nnx.Rngs(params=7))
  init_fn, apply_fn = models.to_functions(instance, X, 3)
  params = check_functions(init_fn, apply_fn, outputs=3, same_for_every_key=True)
  np.testing.assert_array_equal(params['hidden']['kernel'][2], instance.hidden.kernel[...])
  out = jax.vmap(apply_fn, in_axes=(0, None))(params, X)
  np.testing.assert_allclose(out[0], instance(X), rtol=1e-5, atol=1e-6)


class NnxWithBatchNorm(nnx.Module):
  def __init__(self, *, rngs):
    self.linear = nnx.Linear(6, 2, rngs=rngs)
    self.norm = nnx.BatchNorm(2, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


class NnxNeedsDropoutStream(nnx.Module):
  def __init__(self, *, rngs):
    self.linear = nnx.Linear(6, 2, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)


def test_nnx_state_other_than_params_is_rejected():
  with pytest.raises(ConfigError, match='BatchStat'):
    models.to_functions(NnxWithBatchNorm, X, 2)
  with pytest.raises(ConfigError, match='BatchStat'):
    models.to_functions(NnxWithBatchNorm(rngs=nnx.Rngs(0)), X, 2)
  # A Dropout stream is given by the engine: such a model is accepted, and known to draw keys.
  assert adapters.adapt(NnxNeedsDropoutStream, X, 2).random
  assert adapters.adapt(NnxWithBatchNorm, X, 2).stateful


@pytest.mark.parametrize(
  'model, hint',
  [
    ('mlp', 'SizedToData'),
    (None, 'SizedToData'),
    (models.MLP, r'pass an instance, e\.g\. MLP\(\)'),
    (functools.partial(models.MLP, hidden=(3,)), r'MLP\(\)'),
    ([len, len], 'as a tuple'),
    (object(), 'flax.nnx Module class'),
  ],
)
def test_unsupported_models(model, hint):
  with pytest.raises(ConfigError, match='^model=') as e:
    models.to_functions(model, X, 3)
  assert re.search(hint, str(e.value)), str(e.value)
  assert 'flax.linen Module instance' in str(e.value)
