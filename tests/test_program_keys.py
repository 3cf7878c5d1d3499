"""Compiled programs are keyed by what the model computes, not by its Python identity.

A model that cannot be hashed (an equinox module, a flax module with a list or dict
attribute) or one rebuilt identically reuses the programs of the last sweep: a second
sweep with other values compiles nothing, and trains from the new model's own values
(checked against a plain optax loop). A model that really changed (shapes, a static
field, its code) compiles again.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles
from flax import linen as nn

import sweep
from sweep.adapters import structural_key

eqx = pytest.importorskip('equinox')

N_TRAIN, N_VAL, D_IN = 96, 32, 12
RTOL, ATOL = 2e-4, 2e-5


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  y = (x[:, :3].argmax(axis=1)).astype(np.int32)
  return sweep.data.arrays(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], num_classes=3)


DATA = _data()


def config(model, lr, **kw):
  return sweep.SweepConfig(
    model=model, data=DATA, optimizer='adam', learning_rate=lr, batch_size=32, epochs=2, **kw
  )


def batches(seed, batch, epochs, n=N_TRAIN):
  """The documented data order: per seed and epoch a permutation, drop-last."""
  for e in range(epochs):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), e)
    order = np.asarray(jax.random.permutation(key, n))
    for j in range(n // batch):
      yield order[j * batch : (j + 1) * batch]


def ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def equinox_reference(model, lr, batch=32, epochs=2):
  """Adam on an equinox module, one batch at a time, from the module's own values."""
  params, static = eqx.partition(model, eqx.is_inexact_array)
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    grads = jax.grad(lambda p: ce(jax.vmap(eqx.combine(p, static))(xb), yb))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for idx in batches(0, batch, epochs):
    params, state = step(params, state, DATA.x_train[idx], DATA.y_train[idx])
  final = eqx.combine(params, static)
  return float(ce(jax.vmap(final)(DATA.x_val), DATA.y_val))


class ListNet(nn.Module):
  """A flax module with list and dict attributes (unhashable, as the flax examples'
  `partial(ResNet, stage_sizes=[2, 2, 2, 2])` is)."""

  sizes: list
  options: dict

  @nn.compact
  def __call__(self, x):
    for s in self.sizes:
      x = nn.Dense(s)(x)
      x = nn.tanh(x) if self.options.get('act') == 'tanh' else nn.relu(x)
    return nn.Dense(3)(x)


def mlp(key, width=8, activation=jax.nn.relu):
  return eqx.nn.MLP(D_IN, 3, width, 1, activation=activation, key=jax.random.key(key))


def test_an_equinox_module_rebuilt_with_other_values_compiles_nothing_and_trains_its_own():
  with counting_compiles() as names:
    sweep.run(config(mlp(0), [1e-2, 5e-2]), progress=False)
    first = len(names)
    second = mlp(1)  # the same structure, other initial values
    result = sweep.run(config(second, [3e-3, 2e-2]), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  for _, row in result.table.iterrows():
    expected = equinox_reference(second, row.learning_rate)
    np.testing.assert_allclose(row.final_val_loss, expected, rtol=RTOL, atol=ATOL)


def test_a_flax_module_with_list_and_dict_attributes_rebuilt_compiles_nothing():
  with counting_compiles() as names:
    a = sweep.run(config(ListNet([8, 8], {'act': 'tanh'}), [1e-2, 5e-2]), progress=False)
    first = len(names)
    b = sweep.run(config(ListNet([8, 8], {'act': 'tanh'}), [1e-2, 3e-2]), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  # The same model, the same seed: the run both sweeps hold is the same run.
  np.testing.assert_allclose(b.table.final_val_loss[0], a.table.final_val_loss[0], rtol=1e-6)


@pytest.mark.parametrize(
  'before, after',
  [
    (lambda: ListNet([8, 8], {'act': 'tanh'}), lambda: ListNet([8, 6], {'act': 'tanh'})),
    (lambda: ListNet([8, 8], {'act': 'tanh'}), lambda: ListNet([8, 8], {'act': 'relu'})),
    (lambda: mlp(0), lambda: mlp(0, width=6)),
    (lambda: mlp(0), lambda: mlp(0, activation=jax.nn.tanh)),
  ],
  ids=['linen-list-value', 'linen-dict-value', 'equinox-shape', 'equinox-static-field'],
)
def test_a_model_that_really_changed_compiles_again_and_trains_as_itself(before, after):
  with counting_compiles() as names:
    sweep.run(config(before(), [1e-2]), progress=False)
    first = len(names)
    changed = after()
    result = sweep.run(config(changed, [1e-2]), progress=False)
  assert any('segment' in n for n in names[first:]), f'no new program: {names[first:]}'
  if isinstance(changed, eqx.Module):
    expected = equinox_reference(changed, 1e-2)
    np.testing.assert_allclose(result.table.final_val_loss[0], expected, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ the key itself ----


def _pair(scale):
  def init(key):
    return {'w': jax.random.normal(key, (D_IN, 3)) * scale}

  def apply(params, x):
    return x @ params['w']

  return init, apply


class Redefined(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def _redefined():
  class Redefined(nn.Module):  # the same source, another class (a notebook cell run again)
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  return Redefined()


def _tanh_pair():
  init, _ = _pair(1.0)
  return init, lambda params, x: jnp.tanh(x @ params['w'])


@pytest.mark.parametrize(
  'a, b, equal',
  [
    (lambda: mlp(0), lambda: mlp(1), True),  # values are data
    (lambda: mlp(0), lambda: mlp(0, width=6), False),
    (lambda: mlp(0), lambda: mlp(0, activation=jax.nn.tanh), False),
    (lambda: ListNet([8], {'act': 'tanh'}), lambda: ListNet([8], {'act': 'tanh'}), True),
    (lambda: ListNet([8], {}), lambda: ListNet([9], {}), False),
    (lambda: _pair(1.0), lambda: _pair(1.0), True),  # new closures, the same code and values
    (lambda: _pair(1.0), lambda: _pair(2.0), False),  # a constant in a closure
    (lambda: _pair(1.0), _tanh_pair, False),  # other code
    (lambda: Redefined(), _redefined, False),  # a class defined again
    (
      lambda: functools.partial(ListNet, sizes=[8])(options={}),
      lambda: functools.partial(ListNet, sizes=[8])(options={}),
      True,
    ),
  ],
)
def test_the_structural_key_separates_what_computes_differently(a, b, equal):
  assert (structural_key(a()) == structural_key(b())) == equal


# ------------------------------------------------------------------------- keras ----


def test_a_keras_model_and_loss_rebuilt_compile_nothing_and_train_the_new_weights():
  import os

  os.environ.setdefault('KERAS_BACKEND', 'jax')
  keras = pytest.importorskip('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('keras runs on another backend here')

  def build(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
      [keras.Input((D_IN,)), keras.layers.Dense(8, activation='relu'), keras.layers.Dense(3)]
    )

  def cfg(model, lr):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return config(model, lr, loss=loss)

  with counting_compiles() as names:
    sweep.run(cfg(build(0), [1e-2, 5e-2]), progress=False)
    first = len(names)
    model = build(1)  # the same layers, named anew, other initial weights
    result = sweep.run(cfg(model, [3e-3, 2e-2]), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  # Reference: Adam on the model's stateless_call, one batch at a time.
  others = [v.value for v in model.non_trainable_variables]
  for _, row in result.table.iterrows():
    params = [jnp.asarray(v.value) for v in model.trainable_variables]
    opt = optax.adam(row.learning_rate)
    state = opt.init(params)

    def loss(p, xb, yb):
      return ce(model.stateless_call(p, others, xb)[0], yb)

    step = jax.jit(jax.value_and_grad(loss))
    for idx in batches(0, 32, 2):
      _, grads = step(params, DATA.x_train[idx], DATA.y_train[idx])
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    val = float(loss(params, DATA.x_val, DATA.y_val))
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL, atol=ATOL)
  other = keras.Sequential(
    [keras.Input((D_IN,)), keras.layers.Dense(8, activation='tanh'), keras.layers.Dense(3)]
  )
  assert structural_key(other) != structural_key(build(2))


def test_a_list_changed_in_place_after_a_sweep_does_not_change_the_kept_model():
  sizes = [8]
  first = sweep.run(config(ListNet(sizes, {}), [1e-2, 5e-2]), progress=False)
  sizes.append(8)  # the first module now says [8, 8]; its cached program must not
  jax.clear_caches()  # traced again, the kept model must still be the one keyed
  again = sweep.run(config(ListNet([8], {}), [1e-2, 5e-2]), progress=False)
  np.testing.assert_allclose(again.table.final_val_loss, first.table.final_val_loss, rtol=1e-6)
  assert [a.shape for a in jax.tree.leaves(again.params(0))] == [(8,), (12, 8), (3,), (8, 3)]


# ------------------------------------------------------------- across processes ----

_PROCESS = """
import collections, json, sys

import jax

import sweep

sweep.enable_compilation_cache(sys.argv[1])  # before JAX compiles anything
from tests.test_program_keys import config, mlp

# Every program goes to the cache: a miss is a compile, a hit a program read back.
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
key, lrs = int(sys.argv[2]), [float(v) for v in sys.argv[3].split(',')]
cfg = config(mlp(key), lrs, num_evals=2)
events.clear()  # the sweep's own programs, not the module's construction
result = sweep.run(cfg, progress=False, time_runs=True)
print(json.dumps({'misses': events['/jax/compilation_cache/cache_misses'],
                  'hits': events['/jax/compilation_cache/cache_hits'],
                  'log': result.compiles, 'summary': result.summary(),
                  'loss': [float(v) for v in result.table.final_val_loss]}))
"""


def test_a_second_process_with_a_rebuilt_equinox_module_compiles_nothing(tmp_path):
  """What a script run again does: the module built anew, other values and learning rates,
  the programs read from JAX's persistent cache (`sweep.enable_compilation_cache`, which the
  CLI turns on), none compiled; and the run trains the new module's own values."""
  import json
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / 'tests')]))

  def process(key, lrs):
    out = subprocess.run(
      [sys.executable, '-c', _PROCESS, str(tmp_path / 'cache'), str(key), lrs],
      env=env,
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])

  first = process(0, '0.01,0.05')
  assert first['misses'] > 0 and first['hits'] == 0, first
  second = process(1, '0.003,0.02')
  assert second['misses'] == 0 and second['hits'] == first['misses'], second
  # ... and the result says so (sweep.compile_log).
  assert (first['log']['compiled'], first['log']['from_cache']) == (first['misses'], 0)
  assert (second['log']['compiled'], second['log']['from_cache']) == (0, second['hits'])
  assert f'{second["hits"]} read from the compilation cache' in second['summary']
  for lr, loss in zip([3e-3, 2e-2], second['loss'], strict=True):
    np.testing.assert_allclose(loss, equinox_reference(mlp(1), lr), rtol=RTOL, atol=ATOL)
