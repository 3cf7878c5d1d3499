"""The user's own matrix products (`x @ W`, `jnp.einsum`, an equinox layer) in the fast
layout of `sweep.products`: the engine's runs equal a plain optax loop over the
unmodified model, the planned weights are really held in the fast layout, a second sweep
compiles nothing, and the slow-layer warning names only what stays slow.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles
from flax import linen as nn

import sweep
from sweep import layers, products, units

RTOL, ATOL = 1e-5, 1e-6
N_TRAIN, N_VAL, D_IN, CLASSES = 96, 32, 12, 3


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  y = (x[:, :CLASSES].argmax(axis=1)).astype(np.int32)
  return sweep.data.arrays(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


DATA = _data()


def close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def sequential(apply, params, opt, batch, epochs, seed):
  """One run, written plainly: the documented data order of `seed` (a permutation per
  epoch, drop-last), an optax step per batch of the unmodified model."""
  x, y = DATA.x_train, DATA.y_train
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()  # noqa: E731
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for epoch in range(epochs):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
    order = np.asarray(jax.random.permutation(key, len(x)))
    for j in range(len(x) // batch):
      idx = order[j * batch : (j + 1) * batch]
      params, state = step(params, state, x[idx], y[idx])
  return params


def init_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0)


def slow_said(caught):
  return [str(w.message) for w in caught if issubclass(w.category, layers.SlowLayerWarning)]


def run(model, optimizer='adam', lrs=(1e-3, 3e-2), seeds=(0, 1)):
  cfg = sweep.SweepConfig(
    model=model,
    data=DATA,
    optimizer=optimizer,
    learning_rate=list(lrs),
    seed=list(seeds),
    batch_size=16,
    epochs=2,
  )
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    result = sweep.run(cfg, progress=False)
  return result, slow_said(caught)


# ------------------------------------------------------------------- models ----


def mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.normal(k1, (D_IN, 16)) / np.sqrt(D_IN),
    'b1': jnp.zeros(16),
    'w2': jax.random.normal(k2, (16, CLASSES)) / 4.0,
    'b2': jnp.zeros(CLASSES),
  }


def mlp_apply(p, x):
  """The seed MLP as a JAX user writes it: weights (inputs, outputs), `x @ W`."""
  return jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']


def einsum_init(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    'w': jax.random.normal(k1, (4, 3, 8)) / np.sqrt(D_IN),  # two input axes
    'v': jax.random.normal(k2, (8, 5)) / 3.0,
    'u': jax.random.normal(k3, (5, CLASSES)) / 2.0,
  }


@jax.jit
def _jitted_product(h, v):
  return h @ v


def einsum_apply(p, x):
  """Products by `jnp.einsum` (two contracted weight axes), a jitted helper, and a
  `lax.dot_general` with the weight on the left."""
  h = jnp.tanh(jnp.einsum('bij,ijo->bo', x.reshape(x.shape[0], 4, 3), p['w']))
  h = jnp.sin(_jitted_product(h, p['v']))
  return jax.lax.dot_general(p['u'], h, (((0,), (1,)), ((), ()))).T


# ---------------------------------------------------------- the engine's runs ----


@pytest.mark.parametrize(
  'init, apply, held',
  [(mlp_init, mlp_apply, 2), (einsum_init, einsum_apply, 3)],
  ids=['x @ W', 'einsum, jit, dot_general'],
)
def test_a_pairs_products_are_held_fast_and_train_as_a_plain_optax_loop(init, apply, held):
  result, said = run((init, apply))
  assert said == []  # every product is served: nothing named slow
  assert result.config['run_axis']['adam']['fast_layout_kernels'] == held
  for i, row in result.table.iterrows():
    seed, lr = int(row.seed), float(row.learning_rate)
    ref = sequential(apply, init(init_key(seed)), optax.adam(lr), 16, 2, seed)
    got = result.params(i)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, ref)  # the user's layout
    close(got, ref)


def test_an_optimizer_that_does_not_commute_with_a_transpose_keeps_the_users_layout():
  # adafactor factors a matrix's second moment by its rows and columns: transposing the
  # weight changes its update, so no layout is used, and the runs are still exact.
  result, said = run((mlp_init, mlp_apply), optimizer=optax.adafactor, lrs=(1e-2,), seeds=(0,))
  (axis,) = result.config['run_axis'].values()
  assert axis['fast_layout_kernels'] == 0
  assert said == []  # no layout could serve the products: not reported as slow
  ref = sequential(mlp_apply, mlp_init(init_key(0)), optax.adafactor(1e-2), 16, 2, 0)
  close(result.params(0), ref)


def test_a_second_sweep_with_other_values_compiles_nothing():
  model = (mlp_init, mlp_apply)
  with counting_compiles() as names:
    run(model, lrs=(1e-3,))
    first = len(names)
    result, _ = run(model, lrs=(2e-3,))
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  ref = sequential(mlp_apply, mlp_init(init_key(1)), optax.adam(2e-3), 16, 2, 1)
  close(result.params(int(np.flatnonzero(result.table.seed == 1)[0])), ref)


class LinenMixed(nn.Module):
  """flax's own Dense beside a weight of the module's own multiplied in jnp."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.lecun_normal(), (x.shape[-1], 16))
    return nn.Dense(CLASSES)(jnp.tanh(x @ w))


def test_a_linen_modules_own_product_and_its_dense_layer_are_both_held_fast():
  result, said = run(LinenMixed(), lrs=(1e-3, 3e-2), seeds=(0,))
  assert said == []
  assert result.config['run_axis']['adam']['fast_layout_kernels'] == 2
  module = LinenMixed()
  apply = lambda p, xb: module.apply({'params': p}, xb)  # noqa: E731
  params = module.init(init_key(0), DATA.x_train[:1])['params']
  for i, lr in enumerate((1e-3, 3e-2)):
    close(result.params(i), sequential(apply, params, optax.adam(lr), 16, 2, 0))


# ------------------------------------------------------------------ equinox ----

eqx = pytest.importorskip('equinox')


class InputsOutputs(eqx.Module):
  """A layer of the user's own: weight stored (inputs, outputs), `x @ W` (one example)."""

  weight: jax.Array
  bias: jax.Array

  def __init__(self, d_in, d_out, key):
    self.weight = jax.random.normal(key, (d_in, d_out)) / np.sqrt(d_in)
    self.bias = jnp.zeros(d_out)

  def __call__(self, x):
    return x @ self.weight + self.bias


class EqxNet(eqx.Module):
  own: InputsOutputs
  mlp: eqx.nn.MLP

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.own = InputsOutputs(D_IN, 16, k1)
    self.mlp = eqx.nn.MLP(16, CLASSES, 8, 1, activation=jnp.tanh, key=k2)

  def __call__(self, x):
    return self.mlp(jnp.tanh(self.own(x)))


def test_an_equinox_model_trains_as_a_plain_optax_loop_and_a_rebuilt_one_compiles_nothing():
  with counting_compiles() as names:
    _, said = run(EqxNet(jax.random.key(0)), lrs=(2e-3, 1e-2), seeds=(0,))
    first = len(names)
    model = EqxNet(jax.random.key(1))  # rebuilt, other values
    result, _ = run(model, lrs=(1e-3, 3e-2), seeds=(0,))
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  assert said == []
  # The own layer's weight is held fast; eqx.nn.Linear's (outputs, inputs) needs no layout.
  assert result.config['run_axis']['adam']['fast_layout_kernels'] == 1
  params, static = eqx.partition(model, eqx.is_inexact_array)
  apply = lambda p, xb: jax.vmap(eqx.combine(p, static))(xb)  # noqa: E731
  for i, lr in enumerate((1e-3, 3e-2)):
    ref = sequential(apply, params, optax.adam(lr), 16, 2, 0)
    close(eqx.partition(result.model(i), eqx.is_inexact_array)[0], ref)


# -------------------------------------------------------- the plan, the rewrite ----


def per_run_tokens(p, x):
  """A product on activations (batch, tokens, width) of each run's own: left as written."""
  h = jnp.tanh(x.reshape(x.shape[0], 4, 3) @ p['a'])
  return (h @ p['b']).sum(axis=1)


def tied(p, x):
  """One weight read by a product and by another operation."""
  return x @ p['w'] + jnp.sum(p['w'] ** 2)


def cast(p, x):
  """Mixed precision in the user's code: the weight cast before its product."""
  return (x.astype(jnp.bfloat16) @ p['w'].astype(jnp.bfloat16)).astype(jnp.float32)


def returned(p, x):
  """A weight cast and returned beside its product."""
  w = p['w'].astype(jnp.bfloat16)
  return (x.astype(jnp.bfloat16) @ w).astype(jnp.float32), w


def batched(p, x):
  """A weight with a batch axis in its product."""
  return jnp.einsum('bhi,hio->bho', x.reshape(x.shape[0], 3, 4), p['w']).reshape(x.shape[0], -1)


@pytest.mark.parametrize(
  'apply, params, planned',
  [
    (mlp_apply, mlp_init(jax.random.key(0)), {'w1', 'w2'}),
    (per_run_tokens, {'a': jnp.ones((3, 5)), 'b': jnp.ones((5, 2))}, {'a'}),
    (tied, {'w': jnp.ones((D_IN, 2))}, set()),
    (batched, {'w': jnp.ones((3, 4, 2))}, set()),
    (cast, {'w': mlp_init(jax.random.key(0))['w1']}, {'w'}),
    (returned, {'w': jnp.ones((D_IN, 2))}, set()),
  ],
  ids=['mlp', 'per-run tokens', 'tied', 'batch axis', 'cast', 'returned'],
)
def test_the_plan_holds_only_weights_whose_every_use_it_serves(apply, params, planned):
  x = jnp.asarray(DATA.x_train[:5])
  layout = products.plan(apply, params, x)
  keys = sorted(params)
  got = set() if layout is None else {keys[i] for i, _, _ in layout.kernels}
  assert got == planned
  if layout is not None:  # the rewrite equals the model, outputs and gradients
    fast = layout.to_fast(params)
    f = layout.rewrite(apply)
    # bfloat16 products summed in another order differ in their last bits.
    tol = 2e-2 if apply is cast else RTOL
    both = lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol)  # noqa: E731
    both(f(fast, x), apply(params, x))
    # Served from the held weight: no held weight is transposed back (the fallback).
    held = {tuple(fast[keys[i]].shape[1:]) for i, _, _ in layout.kernels}
    transposed = [
      e.invars[0].aval.shape
      for e in jax.make_jaxpr(f)(fast, x).jaxpr.eqns
      if e.primitive.name == 'transpose'
    ]
    assert not held & set(transposed), transposed
    g_fast = jax.grad(lambda p: jnp.sum(jnp.sin(f(p, x))))(fast)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(apply(p, x))))(params)
    jax.tree.map(both, layout.to_module(g_fast), g)


def test_a_held_weight_read_otherwise_at_run_time_is_read_transposed_back():
  params = {'w': mlp_init(jax.random.key(0))['w1']}
  x = jnp.asarray(DATA.x_train[:5])
  layout = products.plan(lambda p, x: x @ p['w'], params, x)
  assert layout is not None
  # A function other than the planned one (a training-mode trace may differ): exact still.
  f = layout.rewrite(tied)
  fast = layout.to_fast(params)
  close(f(fast, x), tied(params, x))
  eqns = jax.make_jaxpr(f)(fast, x).jaxpr.eqns
  assert any(e.primitive.name == 'transpose' and e.invars[0].aval.shape == (16, D_IN) for e in eqns)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the estimates are for a CPU')
@pytest.mark.parametrize(
  'apply, params, named',
  [
    (mlp_apply, mlp_init(jax.random.key(0)), False),
    (tied, {'w': jnp.ones((D_IN, 2))}, True),
    (batched, {'w': jnp.ones((3, 4, 2))}, True),
  ],
  ids=['served', 'tied', 'batch axis'],
)
def test_the_warning_names_the_products_left_slow_and_no_others(apply, params, named):
  x = DATA.x_train[:2]
  init = lambda key: params  # noqa: E731
  layout = units.fast_layout(init, apply, 'adam', x)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    units.warn_slow_layers(init, apply, 'adam', layout, x)
  said = slow_said(caught)
  if named:
    assert len(said) == 1 and apply.__name__ in said[0] and '(inputs, outputs)' in said[0], said
  else:
    assert said == []
