"""Flax's own layers under `sweep.layers.fast_layers` equal flax's code, forward and backward.

The reference is the unmodified module applied outside the context. Every case also
checks that the fast code really ran (no convolution left in the traced program, the
fast layout really read), so that a silent fallback to flax cannot pass for a match.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import sweep
from sweep import engine, layers, models, units

RTOL, ATOL = 2e-5, 2e-5
RNG = np.random.default_rng(0)


def normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def loss(f):
  """A scalar of a model's output whose gradient differs per output entry."""
  return lambda p, x: jnp.sum(jnp.sin(f(p, x)))


def fast(f):
  def g(*args):
    with layers.fast_layers():
      return f(*args)

  return g


def count(f, *args, primitive='conv_general_dilated'):
  return str(jax.make_jaxpr(f)(*args)).count(primitive)


def outputs_and_grads(f):
  """f's outputs and the gradients of `loss(f)` wrt both arguments, in one program."""

  def both(p, x):
    (_, y), g = jax.value_and_grad(
      lambda p, x: (loss(f)(p, x), f(p, x)), argnums=(0, 1), has_aux=True
    )(p, x)
    return y, g

  return jax.jit(both)


def check_linen(module, x, *, convs_left=0):
  variables = module.init(jax.random.key(1), x)
  close(
    outputs_and_grads(fast(module.apply))(variables, x),
    outputs_and_grads(module.apply)(variables, x),
  )
  assert count(fast(module.apply), variables, x) == convs_left


# ------------------------------------------------------------ convolutions ----

CONVS = [
  # (input shape, features, kernel, options)
  ((3, 9, 7, 4), 6, (3, 2), {}),
  ((3, 9, 7, 4), 6, (3, 3), {'strides': 2}),
  ((3, 9, 7, 4), 6, (3, 2), {'strides': (2, 1), 'padding': 'VALID'}),
  ((3, 9, 7, 4), 6, (3, 2), {'padding': ((1, 2), (0, 3))}),
  ((3, 9, 7, 4), 6, (3, 2), {'padding': ((-1, 1), (2, 0))}),
  ((3, 9, 7, 4), 6, (2, 2), {'padding': 1}),
  ((3, 9, 7, 4), 6, (3, 2), {'padding': 'CIRCULAR'}),
  ((3, 9, 7, 4), 6, (3, 3), {'padding': 'REFLECT', 'strides': 2}),
  ((3, 9, 7, 4), 6, (3, 2), {'kernel_dilation': 2}),
  ((3, 9, 7, 4), 6, (3, 2), {'kernel_dilation': (1, 2), 'strides': 2, 'padding': 'CIRCULAR'}),
  ((3, 9, 7, 4), 6, (3, 2), {'feature_group_count': 2}),
  ((3, 9, 7, 4), 8, (3, 3), {'feature_group_count': 4, 'strides': 2}),
  ((3, 9, 7, 4), 6, (3, 2), {'use_bias': False}),
  ((2, 3, 9, 7, 4), 6, (3, 2), {}),  # two batch axes
  ((9, 7, 4), 6, (3, 3), {}),  # no batch axis
  ((2, 11, 3), 5, (3,), {'padding': 'CAUSAL', 'kernel_dilation': 2}),
  ((2, 11, 3), 5, (4,), {'strides': 3}),
  ((2, 5, 6, 5, 2), 3, (2, 3, 2), {'strides': (1, 2, 1)}),
  ((2, 16, 3), 4, (5,), {'strides': 2}),  # the 1-D CNN of docs/performance.md
  ((2, 13, 3), 4, (2,), {'strides': 3, 'padding': 'VALID'}),  # stride over the window
  ((2, 12, 3), 4, (3,), {'padding': 'REFLECT', 'feature_group_count': 1, 'use_bias': False}),
  ((2, 6, 5, 7, 2), 3, (3, 3, 3), {'strides': 2, 'padding': 'VALID'}),
  ((2, 6, 6, 6, 2), 4, (3, 2, 3), {'kernel_dilation': (1, 2, 1), 'padding': 'CIRCULAR'}),
  ((2, 6, 6, 6, 4), 4, (3, 3, 3), {'feature_group_count': 2, 'strides': (2, 1, 2)}),
]


@pytest.mark.parametrize('shape, features, kernel, options', CONVS)
def test_linen_conv_equals_flax(shape, features, kernel, options):
  check_linen(nn.Conv(features, kernel, **options), normal(*shape))


@pytest.mark.parametrize('layer', [nn.Conv, functools.partial(nn.ConvTranspose, strides=2)])
def test_linen_conv_with_a_mask_and_dtype(layer):
  mask = jnp.asarray(RNG.integers(0, 2, size=(3, 3, 4, 6)), jnp.float32)
  check_linen(layer(6, (3, 3), mask=mask), normal(2, 7, 7, 4))
  x = normal(2, 7, 7, 4)
  module = layer(6, (3, 3), dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(1), x)
  out = jax.jit(fast(module.apply))(variables, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32),
    np.asarray(module.apply(variables, x), np.float32),
    rtol=2e-2,
    atol=2e-2,
  )


# Transposed convolutions, phase by phase (`sweep.layers._transposed`): every padding flax
# takes, strides that divide the kernel or not, dilated kernels, transpose_kernel, batch axes.
TRANSPOSED = [
  # (input shape, features, kernel, options)
  ((3, 5, 6, 4), 6, (3, 3), {'strides': 2}),
  ((3, 5, 6, 4), 6, (3, 2), {'strides': (2, 3), 'padding': 'VALID'}),
  ((3, 5, 6, 4), 6, (4, 4), {'strides': 2, 'transpose_kernel': True}),
  ((3, 5, 6, 4), 6, (3, 3), {'strides': 2, 'padding': ((1, 2), (0, 1))}),
  ((3, 5, 6, 4), 6, (3, 3), {'strides': 3, 'padding': ((-1, 2), (2, -1))}),
  ((3, 5, 6, 4), 6, (3, 2), {'strides': 2, 'padding': 'CIRCULAR'}),
  ((3, 5, 6, 4), 6, (3, 2), {'strides': 2, 'padding': 'CIRCULAR', 'transpose_kernel': True}),
  ((3, 5, 6, 4), 6, (3, 3), {'strides': 2, 'kernel_dilation': 2}),
  ((3, 5, 6, 4), 6, (2, 3), {'strides': (3, 2), 'kernel_dilation': (2, 3)}),
  ((3, 5, 6, 4), 6, (1, 1), {'strides': 3}),  # phases that read no input: zeros
  ((3, 5, 6, 4), 6, (3, 3), {'use_bias': False}),  # stride 1: one phase
  ((2, 3, 5, 6, 4), 6, (3, 3), {'strides': 2}),  # two batch axes
  ((5, 6, 4), 6, (3, 3), {'strides': 2}),  # no batch axis
  ((2, 9, 3), 4, (5,), {'strides': 2}),
  ((2, 9, 3), 4, (4,), {'strides': 3, 'padding': 'VALID', 'kernel_dilation': 2}),
  ((2, 4, 3, 4, 2), 3, (3, 2, 3), {'strides': (2, 1, 2)}),
]


@pytest.mark.parametrize('shape, features, kernel, options', TRANSPOSED)
def test_linen_conv_transpose_equals_flax(shape, features, kernel, options):
  check_linen(nn.ConvTranspose(features, kernel, **options), normal(*shape))


@pytest.mark.parametrize(
  'shape, features, kernel, options', [TRANSPOSED[i] for i in (0, 2, 4, 6, 8, 9, 13)]
)
def test_nnx_conv_transpose_equals_flax(shape, features, kernel, options):
  def make():
    return nnx.ConvTranspose(shape[-1], features, kernel, rngs=nnx.Rngs(1), **options)

  check_nnx(make, normal(*shape))


# A convolution of a dilated input is a transposed one: computed phase by phase too.
DILATED = [
  ((3, 5, 6, 4), 6, (3, 3), {'input_dilation': 2, 'padding': ((1, 1), (1, 1))}),
  ((3, 5, 6, 4), 6, (3, 2), {'input_dilation': (2, 3), 'padding': ((0, 0), (2, -1))}),
  ((3, 5, 6, 4), 6, (2, 3), {'input_dilation': 2, 'kernel_dilation': 2, 'padding': 1}),
  ((2, 9, 3), 4, (3,), {'input_dilation': 3, 'padding': ((2, 1),)}),
]


@pytest.mark.parametrize('shape, features, kernel, options', DILATED)
def test_linen_conv_of_a_dilated_input_equals_flax(shape, features, kernel, options):
  check_linen(nn.Conv(features, kernel, **options), normal(*shape))
  check_nnx(functools.partial(nnx_conv, shape, features, kernel, options), normal(*shape))


@pytest.mark.parametrize(
  'module',
  [
    nn.Conv(4, (3, 3), input_dilation=2, strides=2, padding=1),  # strides on a dilated input
    nn.Conv(6, (3, 3), input_dilation=2, padding=((1, 1), (1, 1)), feature_group_count=3),
    nn.Conv(4, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated),  # the user's own
    nn.ConvLocal(4, (3, 3)),  # not a convolution with shared weights
  ],
)
def test_linen_conv_options_not_handled_run_flax(module):
  check_linen(module, normal(2, 6, 6, 3), convs_left=1)


class ConvSubclass(nn.Conv):
  """Subclasses may change what the layer does: they run flax's (their own) code."""


def test_linen_subclass_runs_its_own_code():
  check_linen(ConvSubclass(4, (3, 3)), normal(2, 6, 6, 3), convs_left=1)


def nnx_conv(shape, features, kernel, options):
  return nnx.Conv(shape[-1], features, kernel, rngs=nnx.Rngs(1), **options)


def check_nnx(make, x, *, convs_left=0):
  graphdef, params = nnx.split(make(), nnx.Param)
  params = nnx.to_pure_dict(params)
  plain = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
  close(outputs_and_grads(fast(plain))(params, x), outputs_and_grads(plain)(params, x))
  assert count(fast(plain), params, x) == convs_left
  # Outside the context nothing changed.
  assert count(plain, params, x) >= convs_left


# nnx's Conv shares the code above: the cases that differ in how the options are read.
@pytest.mark.parametrize(
  'shape, features, kernel, options', [CONVS[i] for i in (2, 6, 9, 11, 12, 15, 18, 19, 21, 22, 23)]
)
def test_nnx_conv_equals_flax(shape, features, kernel, options):
  check_nnx(functools.partial(nnx_conv, shape, features, kernel, options), normal(*shape))


def test_nnx_conv_options_not_handled_run_flax():
  def make():
    return nnx.Conv(3, 4, (3, 3), input_dilation=2, strides=2, padding=1, rngs=nnx.Rngs(0))

  check_nnx(make, normal(2, 6, 6, 3), convs_left=1)


# ------------------------------------------------------------ dense layers ----


def fast_params(apply_fn, params, x):
  """The parameters in the layout the engine holds them in during a segment."""
  layout = layers.plan_layout(apply_fn, params, x)
  assert layout is not None
  return layout, layout.to_fast(params)


def check_fast_layout(apply_fn, params, x, kernels):
  """apply_fn reads its kernels in the fast layout and gives the module's outputs and
  gradients; `kernels` is the number of kernels the plan should hold transposed."""
  layout, fast_p = fast_params(apply_fn, params, x)
  assert len(layout.kernels) == kernels
  y_fast, (gp_fast, gx_fast) = outputs_and_grads(apply_fn)(fast_p, x)
  y, g = outputs_and_grads(apply_fn)(params, x)
  close((y_fast, layout.to_module(gp_fast), gx_fast), (y, g))
  # The same under the run axis: three runs reading the same input.
  stack = lambda p: jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), p)  # noqa: E731
  runs = jax.jit(jax.vmap(apply_fn, in_axes=(0, None)))
  close(runs(stack(fast_p), x), runs(stack(params), x))
  # And the fast layout really is what the products read: shapes differ from flax's.
  for i, _, _ in layout.kernels:
    assert jax.tree.leaves(fast_p)[i].shape[0] == 1
    assert jax.tree.leaves(fast_p)[i].ndim == jax.tree.leaves(params)[i].ndim + 1


class TwoDense(nn.Module):
  features: tuple = (5, 3)
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f, use_bias=self.use_bias)(x))
    return nn.Dense(self.features[-1], use_bias=self.use_bias)(x)


@pytest.mark.parametrize('shape', [(4, 7), (2, 3, 7)])
@pytest.mark.parametrize('use_bias', [True, False])
def test_linen_dense_in_the_fast_layout_equals_flax(shape, use_bias):
  x = normal(*shape)
  init_fn, apply_fn = models.to_functions(TwoDense(use_bias=use_bias), np.asarray(x), None)
  # On (batch, tokens, features) the second layer reads each run's own 3-dim activation,
  # which keeps flax's layout; the first reads the data, which the runs share.
  check_fast_layout(apply_fn, init_fn(jax.random.key(0)), x, kernels=2 if len(shape) == 2 else 1)


class General(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.DenseGeneral((3, 2), axis=(-2, -1))(x)  # (batch, 3, 2)
    z = nn.DenseGeneral(4, axis=(1, -1), use_bias=False)(x)  # non-trailing axes
    return jnp.concatenate([y.reshape(y.shape[0], -1), z.reshape(z.shape[0], -1)], axis=-1)


def test_linen_dense_general_in_the_fast_layout_equals_flax():
  x = normal(3, 4, 5)
  init_fn, apply_fn = models.to_functions(General(), np.asarray(x), None)
  params = init_fn(jax.random.key(0))
  check_fast_layout(apply_fn, params, x, kernels=2)
  layout = layers.plan_layout(apply_fn, params, x)
  assert sorted((n_in, n_out) for _, n_in, n_out in layout.kernels) == [(2, 1), (2, 2)]


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x).reshape(x.shape[0], -1)


def test_attention_projections_are_planned():
  x = normal(2, 5, 6)
  init_fn, apply_fn = models.to_functions(Attention(), np.asarray(x), None)
  # The query, key and value projections read the data, which the runs share; the output
  # projection reads each run's own attention output of 4 dims: flax's layout.
  check_fast_layout(apply_fn, init_fn(jax.random.key(0)), x, kernels=3)
  layout = layers.plan_layout(apply_fn, init_fn(jax.random.key(0)), x)
  assert sorted((n_in, n_out) for _, n_in, n_out in layout.kernels) == [(1, 2)] * 3


class TokenMLP(nn.Module):
  """Dense layers on (batch, tokens, width) activations of each run's own."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)  # reads the data: shared by the runs
    h = nn.Dense(8)(nn.relu(h))  # reads a 3-dim activation of each run: flax's layout
    return nn.Dense(3)(h.reshape(h.shape[0], -1))  # reads a matrix of each run: fast


def test_dense_layers_on_activations_of_more_dims_keep_their_layout():
  x = normal(2, 5, 6)
  init_fn, apply_fn = models.to_functions(TokenMLP(), np.asarray(x), None)
  params = init_fn(jax.random.key(0))
  layout = layers.plan_layout(apply_fn, params, x)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  planned = sorted(jax.tree_util.keystr(leaves[i][0]) for i, _, _ in layout.kernels)
  assert planned == ["['Dense_0']['kernel']", "['Dense_2']['kernel']"], planned
  check_fast_layout(apply_fn, params, x, kernels=2)


class Tied(nn.Module):
  """The first kernel is also read outside its layer: it must keep its layout."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3)
    y = dense(x)
    return y + jnp.sum(dense.variables['params']['kernel'])


@pytest.mark.parametrize('module', [Tied()])
def test_kernels_read_otherwise_keep_their_layout(module):
  x = normal(4, 3)
  init_fn, apply_fn = models.to_functions(module, np.asarray(x), None)
  assert layers.plan_layout(apply_fn, init_fn(jax.random.key(0)), x) is None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    body = nn.scan(
      lambda mdl, c, _: (nn.tanh(mdl(c)), None),
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=2,
    )
    return body(nn.Dense(x.shape[-1]), x, None)[0]


class Reused(nn.Module):
  """One layer applied twice (the same kernel read by two products)."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(x.shape[-1])
    return dense(nn.tanh(dense(x)))


def test_a_layer_used_twice_shares_one_layout():
  x = normal(4, 3)
  init_fn, apply_fn = models.to_functions(Reused(), np.asarray(x), None)
  check_fast_layout(apply_fn, init_fn(jax.random.key(0)), x, kernels=1)


def test_layers_inside_lifted_transforms_keep_their_layout():
  x = normal(4, 3)
  init_fn, apply_fn = models.to_functions(Scanned(), np.asarray(x), None)
  params = init_fn(jax.random.key(0))
  assert layers.plan_layout(apply_fn, params, x) is None
  close(jax.jit(apply_fn)(params, x), Scanned().apply({'params': params}, x))


class NnxDense(nnx.Module):
  def __init__(self, *, rngs):
    self.first = nnx.Linear(6, 5, rngs=rngs)
    self.general = nnx.LinearGeneral((2, 3), (2, 2), axis=(-2, -1), rngs=rngs)
    self.last = nnx.Linear(9, 3, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.first(x.reshape(x.shape[0], -1)))
    g = self.general(x).reshape(x.shape[0], -1)
    return self.last(jnp.concatenate([h, g], axis=-1))


def test_nnx_linear_in_the_fast_layout_equals_flax():
  x = normal(4, 2, 3)
  init_fn, apply_fn = models.to_functions(NnxDense, np.asarray(x), None)
  params = init_fn(jax.random.key(0))
  check_fast_layout(apply_fn, params, x, kernels=3)
  # The reference: the module built eagerly, outside the context.
  eager = NnxDense(rngs=nnx.Rngs(params=jax.random.key(0)))
  close(apply_fn(layers.plan_layout(apply_fn, params, x).to_fast(params), x), eager(x))


class WithEmbed(nn.Module):
  """Embed (lookup and attend) is flax's own code; around it the rest is fast."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, 6)
    h = nn.tanh(nn.Dense(6)(embed(tokens)))
    return embed.attend(h).reshape(tokens.shape[0], -1)


def test_embed_lookup_and_attend_equal_flax():
  tokens = jnp.asarray(RNG.integers(0, 11, size=(3, 4)), jnp.int32)
  module = WithEmbed()
  params = module.init(jax.random.key(0), tokens)['params']
  init_fn, apply_fn = models.to_functions(module, np.asarray(tokens), None)
  close(jax.jit(apply_fn)(params, tokens), module.apply({'params': params}, tokens))
  g = lambda f: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(f(p)))))(params)  # noqa: E731
  close(g(lambda p: apply_fn(p, tokens)), g(lambda p: module.apply({'params': p}, tokens)))


def test_a_trace_made_before_the_plan_does_not_hide_the_layers():
  # JAX caches traces by function and shapes: the engine's shape check traces the model
  # before the plan does, and the plan must still see the tagged products.
  x = normal(4, 7)
  init_fn, apply_fn = models.to_functions(TwoDense(), np.asarray(x), None)
  params = jax.eval_shape(init_fn, jax.random.key(0))
  jax.eval_shape(apply_fn, params, x)
  jax.make_jaxpr(apply_fn)(params, x)
  assert layers.plan_layout(apply_fn, params, x) is not None


def test_layout_round_trip_with_run_axes():
  x = normal(4, 3, 5)
  init_fn, apply_fn = models.to_functions(General(), np.asarray(x), None)
  params = init_fn(jax.random.key(0))
  layout = layers.plan_layout(apply_fn, params, x)
  runs = jax.tree.map(lambda a: jnp.stack([jnp.stack([a, 2 * a])] * 3), params)  # (3, 2, ...)
  there = layout.to_fast(runs)
  assert jax.tree.structure(there) == jax.tree.structure(runs)
  for i, _, _ in layout.kernels:
    assert jax.tree.leaves(there)[i].shape[:3] == (3, 2, 1)
  jax.tree.map(np.testing.assert_array_equal, layout.to_module(there), runs)


def test_outside_the_context_nothing_changes():
  # Patching nnx happens inside the context only, and is undone after it.
  original = nnx.Linear.__call__
  with layers.fast_layers():
    assert nnx.Linear.__call__ is not original
    with layers.fast_layers():
      pass
    assert nnx.Linear.__call__ is not original
  assert nnx.Linear.__call__ is original


# ------------------------------------------------------------- engine runs ----
# An engine run of a model built from flax's layers equals the same training done
# plainly: the unmodified module, one run at a time, in an optax loop written here from
# the documented semantics (init key, data order), outside `fast_layers`.

N_TRAIN = 96


def images(n, shape, classes, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n,) + shape).astype(np.float32)
  return x, rng.integers(0, classes, size=n).astype(np.int32)


def sequential(apply, params, opt, x, y, batch, epochs, seed, shuffle):
  """One run: the documented data order of `seed`, an optax step per batch."""
  import optax

  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()  # noqa: E731
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  n = len(x)
  for epoch in range(epochs):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
    order = np.asarray(jax.random.permutation(key, n)) if shuffle else np.arange(n)
    for j in range(n // batch):
      idx = order[j * batch : (j + 1) * batch]
      params, state = step(params, state, x[idx], y[idx])
  return params


def init_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0)


class MnistCNN(nn.Module):
  """The flax examples/mnist CNN's layers, smaller: Conv, relu, avg_pool, Conv, Dense, Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(features=4, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(features=6, kernel_size=(3, 3), strides=2, padding='CIRCULAR')(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=8)(x))
    return nn.Dense(features=3)(x)


def test_engine_trains_a_flax_cnn_as_a_sequential_loop():
  import optax

  x, y = images(N_TRAIN, (8, 8, 1), 3, seed=0)
  cfg = sweep.SweepConfig(
    model=MnistCNN(),
    data=sweep.data.arrays(x, y),
    optimizer='momentum',
    learning_rate=[0.01, 0.05],
    seed=[0, 1],
    batch_size=16,
    epochs=2,
    num_evals=2,
  )
  result = sweep.run(cfg, progress=False)
  module = MnistCNN()
  for i, row in result.table.iterrows():
    seed, lr = int(row.seed), float(row.learning_rate)
    params = module.init(init_key(seed), x[:1])['params']
    ref = sequential(
      lambda p, xb: module.apply({'params': p}, xb),
      params,
      optax.sgd(lr, momentum=0.9),
      x,
      y,
      16,
      2,
      seed,
      shuffle=True,
    )
    got = result.params(i)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, ref)  # the module's own layout
    close(got, ref)


class Signal1D(nn.Module):
  """The 1-D CNN of docs/performance.md, smaller: `nn.Conv` of kernel 5, stride 2."""

  @nn.compact
  def __call__(self, x):
    for features in (4, 6, 6):
      x = nn.relu(nn.Conv(features, (5,), strides=2)(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class Volume3D(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3, 3))(x))
    x = nn.relu(nn.Conv(4, (3, 3, 3), strides=2, padding='VALID')(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class Decoder(nn.Module):
  """A strided `nn.Conv`, then `nn.ConvTranspose` back up (a decoder's, on each run's own
  input), then `nn.Dense`."""

  dims: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3,) * self.dims, strides=2)(x))
    h = nn.relu(nn.ConvTranspose(3, (3,) * self.dims, strides=2)(h))
    return nn.Dense(3)(h.reshape((x.shape[0], -1)))


@pytest.mark.parametrize(
  'module, shape',
  [(Signal1D(), (24, 1)), (Volume3D(), (5, 6, 5, 2)), (Decoder(2), (8, 8, 1))],
  ids=['1-D', '3-D', 'ConvTranspose'],
)
def test_engine_trains_1d_and_3d_cnns_as_a_sequential_loop(module, shape):
  import optax

  x, y = images(64, shape, 3, seed=5)
  cfg = sweep.SweepConfig(
    model=module,
    data=sweep.data.arrays(x, y),
    optimizer='adam',
    learning_rate=[1e-3, 3e-2],
    batch_size=16,
    epochs=2,
    num_evals=1,
  )
  result = sweep.run(cfg, progress=False)
  params = module.init(init_key(0), x[:1])['params']
  assert str(jax.make_jaxpr(lambda p: module.apply({'params': p}, x[:2]))(params)).count(
    'conv_general_dilated'
  )  # the reference is XLA's convolution
  for i, lr in enumerate(cfg.learning_rate):
    apply = lambda p, xb: module.apply({'params': p}, xb)  # noqa: E731
    ref = sequential(apply, params, optax.adam(lr), x, y, 16, 2, 0, shuffle=True)
    close(result.params(i), ref)


class Signals(Signal1D):
  """Signal1D by another name: a model not yet warned about in this process."""


def test_per_run_convolutions_are_named_once_on_a_cpu_and_grouped_ones_everywhere():
  x, y = images(64, (24, 1), 3, seed=6)
  data = sweep.data.arrays(x, y)
  said = slow_warnings(Signals(), data)
  if jax.default_backend() == 'cpu':
    # The first layer reads the data, which the runs share: one product for all of them.
    assert len(said) == 2 and all('1-D convolution on an input of each run' in m for m in said)
    scopes = [m.split(', ', 1)[1].split(':')[0] for m in said]
    assert scopes == ['Signals/Conv_1', 'Signals/Conv_2'], scopes
    assert "XLA's convolution in a loop of jitted steps" in said[0]
    assert slow_warnings(Signals(), data) == []  # once
  else:
    assert said == []
  init_fn, apply_fn = sweep.adapters.adapt(Signal1D(), x[:2], None).pure_functions()
  params = jax.eval_shape(init_fn, jax.random.key(0))
  for backend, n in (('cpu', 2), ('gpu', 0), ('tpu', 0)):  # measured on a CPU only
    assert len(layers.slow_layers(apply_fn, params, x[:2], dense=False, backend=backend)) == n
  # A convolution vmap makes grouped (a kernel and an input per run) is named everywhere;
  # the same XLA convolution on the data and the (inputs, outputs) product on a CPU only.
  init_fn, apply_fn = raw_init, raw_apply_twice
  params = jax.eval_shape(init_fn, jax.random.key(0))
  xs = np.ones((2, 6, 6, 1), np.float32)
  for backend in ('cpu', 'gpu', 'tpu'):
    found = [s.what for s in layers.slow_layers(apply_fn, params, xs, backend=backend)]
    grouped = [w for w in found if 'grouped' in w]
    assert len(grouped) == 1, found
    assert len(found) == (3 if backend == 'cpu' else 1), found


def raw_apply_twice(p, x):
  """`raw_apply` with its convolution applied again to its own output."""
  conv = lambda h, k: jax.lax.conv_general_dilated(  # noqa: E731
    h, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  h = jnp.tanh(conv(x, p['k']))
  h = conv(h, jnp.tile(p['k'], (1, 1, 4, 1)))
  return jnp.tanh(h).reshape(x.shape[0], -1) @ p['w']


class NnxNet(nnx.Module):
  def __init__(self, *, rngs):
    self.first = nnx.Linear(12, 8, rngs=rngs)
    self.second = nnx.LinearGeneral(8, (2, 3), rngs=rngs)
    self.out = nnx.Linear(6, 3, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.first(x.reshape(x.shape[0], -1)))
    return self.out(jnp.tanh(self.second(h)).reshape(x.shape[0], -1))


def test_engine_trains_an_nnx_model_as_a_sequential_loop():
  import optax

  x, y = images(N_TRAIN, (3, 4), 3, seed=1)
  cfg = sweep.SweepConfig(
    model=NnxNet,
    data=sweep.data.arrays(x, y, x[:32], y[:32]),
    optimizer='adam',
    learning_rate=[1e-3, 1e-2],
    batch_size=32,
    epochs=3,
    num_evals=3,
    keep_best=True,
    shuffle=False,
  )
  result = sweep.run(cfg, progress=False)
  # Every kernel was held transposed during the segments ...
  assert result.config['run_axis']['adam']['fast_layout_kernels'] == 3
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: NnxNet(rngs=nnx.Rngs(0))), nnx.Param)
  apply = lambda p, xb: nnx.merge(graphdef, p)(xb)  # noqa: E731
  for i, lr in enumerate(cfg.learning_rate):
    params = nnx.to_pure_dict(nnx.state(NnxNet(rngs=nnx.Rngs(params=init_key(0))), nnx.Param))
    ref = sequential(apply, params, optax.adam(lr), x, y, 32, 3, 0, shuffle=False)
    # ... and comes back in the module's layout, the best parameters too.
    close(result.params(i), ref)
    assert jax.tree.map(jnp.shape, result.params(i, best=True)) == jax.tree.map(jnp.shape, ref)


class DenseNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(16)(x)))


def test_any_run_axis_width_gives_the_same_numbers():
  x, y = images(N_TRAIN, (10,), 3, seed=2)
  data = sweep.data.arrays(x, y, x[:32], y[:32])
  cfg = sweep.SweepConfig(
    model=DenseNet(),
    data=data,
    learning_rate=list(np.geomspace(1e-3, 1e-1, 8)),
    batch_size=16,
    epochs=1,
    num_evals=2,
  )
  plan = sweep.config.validate(cfg)
  model = engine.model_of(cfg, plan.output_dim)
  eval_chunk = min(cfg.eval_batch_size, N_TRAIN)  # as sweep.run picks it
  per_run = units.run_bytes(plan, model, 'adam', eval_chunk)
  widths = {}
  for budget in (None, data.x_train.nbytes + data.y_train.nbytes + 2 * per_run):
    result = sweep.run(cfg.replace(memory_budget=budget), progress=False)
    widths[result.config['run_axis']['adam']['width']] = result
  assert sorted(widths) == [2, 8]
  wide, narrow = widths[8], widths[2]
  assert (
    narrow.config['run_axis']['adam']['chunks'] == 4
  )  # the later ones reuse the initial metrics
  columns = ['final_val_loss', 'final_train_loss', 'best_val_loss', 'updates']
  np.testing.assert_allclose(narrow.table[columns], wide.table[columns], rtol=1e-6)
  numeric = [c for c in wide.curves.columns if np.issubdtype(wide.curves[c].dtype, np.number)]
  np.testing.assert_allclose(narrow.curves[numeric], wide.curves[numeric], rtol=1e-6)
  for i in range(8):
    close(narrow.params(i), wide.params(i))


@pytest.mark.parametrize(
  'flops, widest, devices, backend, expected',
  [
    (1e6, 64, 2, 'cpu', (64, 'memory')),  # the seed MLP: the widest that fits
    (7e7, 16, 2, 'cpu', (16, 'memory')),  # the flax MNIST CNN on 8x8 digits
    (6e8, 16, 2, 'cpu', (2, 'step FLOPs')),  # the 1M-parameter MLP: one run per device
    (1.5e8, 64, 2, 'cpu', (8, 'step FLOPs')),
    (1.5e8, 64, 1, 'cpu', (4, 'step FLOPs')),
    (1e10, 64, 4, 'cpu', (4, 'step FLOPs')),  # never less than one run per device
    (6e8, 16, 2, 'gpu', (16, 'memory')),  # accelerators: the widest that fits
  ],
)
def test_run_axis_width_rule(flops, widest, devices, backend, expected):
  assert units.run_axis_width(flops, widest, devices, backend) == expected


def test_the_step_flops_count_products_forward_and_backward():
  x, y = images(64, (10,), 3, seed=3)
  cfg = sweep.SweepConfig(model=DenseNet(), data=sweep.data.arrays(x, y), batch_size=8, epochs=1)
  plan = sweep.config.validate(cfg)
  model = engine.model_of(cfg, plan.output_dim)
  # Forward 2*8*(10*16 + 16*3); backward: both weight gradients, and one input gradient.
  expected = 2 * 8 * (10 * 16 + 16 * 3) + 2 * 8 * (10 * 16 + 16 * 3) + 2 * 8 * 16 * 3
  assert units.step_flops(plan, model) == expected


def raw_init(key):
  k1, k2 = jax.random.split(key)
  return {
    'k': jax.random.normal(k1, (3, 3, 1, 4)) * 0.3,
    'w': jax.random.normal(k2, (144, 3)) * 0.1,
  }


def raw_apply(p, x):
  h = jax.lax.conv_general_dilated(
    x, p['k'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  # `w` is also read outside its product, so the fast layout of `sweep.products` leaves
  # it as written: a product that stays slow.
  return jnp.tanh(h).reshape(x.shape[0], -1) @ p['w'] + 1e-3 * jnp.sum(p['w'] ** 2)


class FlaxCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1))


def slow_warnings(model, data):
  import warnings

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    sweep.run(
      sweep.SweepConfig(
        model=model, data=data, learning_rate=[1e-3, 1e-2], batch_size=16, updates=2
      ),
      progress=False,
    )
  return [str(w.message) for w in caught if issubclass(w.category, layers.SlowLayerWarning)]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the estimates are for a CPU')
def test_layers_that_stay_slow_are_named_once():
  x, y = images(64, (6, 6, 1), 3, seed=4)
  data = sweep.data.arrays(x, y)
  model = (raw_init, raw_apply)
  first = slow_warnings(model, data)
  assert len(first) == 2, first
  conv, dense = sorted(first)
  assert (
    'raw_apply' in conv
    and 'convolution' in conv
    and 'flax.linen.Conv' in conv
    and 'x slower' in conv
  )
  assert 'raw_apply' in dense and '(inputs, outputs)' in dense and 'flax.linen.Dense' in dense
  assert slow_warnings(model, data) == []  # once
  assert slow_warnings(FlaxCNN(), data) == []  # flax's own layers are fast


class Stacked(nn.Module):
  """Two convolutions of `dims` spatial dims: the second reads each run's own input."""

  dims: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3,) * self.dims)(x))
    return nn.Conv(3, (3,) * self.dims, strides=2)(h).reshape(x.shape[0], -1)


class NnxStacked(nnx.Module):
  def __init__(self, dims, *, rngs):
    self.first = nnx.Conv(2, 4, (3,) * dims, rngs=rngs)
    self.second = nnx.Conv(4, 3, (3,) * dims, strides=2, rngs=rngs)

  def __call__(self, x):
    return self.second(nnx.relu(self.first(x))).reshape(x.shape[0], -1)


# flax's layers under the run axis, each either fast (computed by `sweep.layers`: its kernel
# in the fast layout, or its convolution as windows times one product) or named in a
# SlowLayerWarning. What each is today; the speed of the fast path itself is measured in
# docs/performance.md, not here.
FLAX_LAYERS = [
  ('Dense', lambda: nn.Dense(4), (2, 6), 'fast'),
  ('DenseGeneral', lambda: nn.DenseGeneral((2, 3)), (2, 6), 'fast'),
  ('Conv 1-D', lambda: nn.Conv(4, (3,)), (2, 10, 2), 'fast'),
  ('Conv 1-D strided', lambda: nn.Conv(4, (5,), strides=2), (2, 16, 2), 'fast'),
  ('Conv 2-D', lambda: nn.Conv(4, (3, 3)), (2, 6, 6, 2), 'fast'),
  ('Conv 3-D', lambda: nn.Conv(4, (3, 3, 3)), (2, 5, 5, 5, 2), 'fast'),
  ('Conv grouped', lambda: nn.Conv(4, (3, 3), feature_group_count=2), (2, 6, 6, 2), 'fast'),
  # After a first layer each run reads its own input: windows times one product per run,
  # slower than XLA's own convolution run by run in 1-D and 2-D, many times faster in 3-D.
  ('Conv 1-D after a layer', lambda: Stacked(1), (2, 16, 2), '1-D convolution on an input of each'),
  (
    'Conv 2-D after a layer',
    lambda: Stacked(2),
    (2, 6, 6, 2),
    '2-D convolution on an input of each',
  ),
  ('Conv 3-D after a layer', lambda: Stacked(3), (2, 5, 5, 5, 2), 'fast'),
  (
    'Conv input dilation',
    lambda: nn.Conv(4, (3, 3), input_dilation=2, padding=((1, 1), (1, 1))),
    (2, 6, 6, 2),
    'fast',
  ),
  (
    'Conv input dilation and strides',
    lambda: nn.Conv(4, (3, 3), input_dilation=2, strides=2, padding=1),
    (2, 6, 6, 2),
    'convolution',
  ),
  ('ConvTranspose', lambda: nn.ConvTranspose(4, (3, 3), strides=2), (2, 6, 6, 2), 'fast'),
  # Phase by phase on each run's own input: faster than XLA's one run at a time.
  ('ConvTranspose after a layer', lambda: Decoder(2), (2, 6, 6, 2), 'fast'),
  ('ConvLocal', lambda: nn.ConvLocal(4, (3, 3)), (2, 6, 6, 2), 'matrix product'),
  ('Embed', lambda: nn.Embed(10, 4), (2, 5), 'fast'),
  ('LayerNorm', lambda: nn.LayerNorm(), (2, 6), 'fast'),
  ('Einsum', lambda: nn.Einsum((6, 4), '...i,ij->...j'), (2, 6), 'fast'),  # sweep.products
  ('nnx.Linear', lambda: functools.partial(nnx.Linear, 6, 4), (2, 6), 'fast'),
  ('nnx.LinearGeneral', lambda: functools.partial(nnx.LinearGeneral, 6, (2, 3)), (2, 6), 'fast'),
  ('nnx.Conv 1-D', lambda: functools.partial(nnx.Conv, 2, 4, (3,)), (2, 10, 2), 'fast'),
  ('nnx.Conv 2-D', lambda: functools.partial(nnx.Conv, 2, 4, (3, 3)), (2, 6, 6, 2), 'fast'),
  ('nnx.Conv 3-D', lambda: functools.partial(nnx.Conv, 2, 4, (3, 3, 3)), (2, 5, 5, 5, 2), 'fast'),
  ('nnx.Conv 1-D after a layer', lambda: functools.partial(NnxStacked, 1), (2, 16, 2), '1-D'),
  ('nnx.Conv 3-D after a layer', lambda: functools.partial(NnxStacked, 3), (2, 5, 5, 5, 2), 'fast'),
  (
    'nnx.ConvTranspose',
    lambda: functools.partial(nnx.ConvTranspose, 2, 4, (3, 3), strides=2),
    (2, 6, 6, 2),
    'fast',
  ),
  ('nnx.Embed', lambda: functools.partial(nnx.Embed, 10, 4), (2, 5), 'fast'),
  ('nnx.LayerNorm', lambda: functools.partial(nnx.LayerNorm, 6), (2, 6), 'fast'),
  ('nnx.Einsum', lambda: functools.partial(nnx.Einsum, '...i,ij->...j', (6, 4)), (2, 6), 'fast'),
]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the estimates are for a CPU')
@pytest.mark.parametrize('name, make, shape, verdict', FLAX_LAYERS, ids=[c[0] for c in FLAX_LAYERS])
def test_every_flax_layer_is_fast_or_warned(name, make, shape, verdict):
  import warnings

  x = np.ones(shape, np.int32 if 'Embed' in name else np.float32)
  init_fn, apply_fn = sweep.adapters.adapt(make(), x, None).pure_functions()
  layout = units.fast_layout(init_fn, apply_fn, 'adam', x)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    units.warn_slow_layers(init_fn, apply_fn, 'adam', layout, x)
  said = [str(w.message) for w in caught if issubclass(w.category, layers.SlowLayerWarning)]
  if verdict == 'fast':
    assert said == [], said
  else:
    assert said and any(verdict in m for m in said), said


@pytest.mark.parametrize(
  'chunk, per_example, runs, backend, expected',
  [
    (1024, 200.0, 32, 'cpu', 1024),  # the seed MLP: small intermediates, one chunk
    (1024, 120e3, 8, 'cpu', 32),  # the flax MNIST CNN: its windows, at least 32 examples
    (1024, 16e3, 8, 'cpu', 128),
    (360, 16e3, 8, 'cpu', 120),  # a divisor of the padded chunk
    (1024, 120e3, 8, 'gpu', 1024),  # accelerators: as configured
    (20, 1e9, 8, 'cpu', 20),
  ],
)
def test_eval_chunk_rule(chunk, per_example, runs, backend, expected):
  assert units.eval_chunk_width(chunk, per_example, runs, backend) == expected
