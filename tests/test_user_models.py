"""A researcher's own model and data, trained as they would train it one run at a time.

Each reference here is the plain loop a user writes for one configuration, from the
documented semantics only: the init key `fold_in(key(seed), 0)`, the data order of each
seed, the model's key for update t `fold_in(fold_in(key(seed), 2), t)` (dropout), the
augmentation's key `fold_in(fold_in(key(seed), 3), t)`, optax built directly. It shares
no code with the engine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sweep
from sweep.errors import ConfigError

# Adam turns float rounding in near-zero gradients into steps of the learning rate's size,
# so single weights may part by ~1e-4 while every loss agrees to 2e-4 relative.
RTOL, ATOL = 2e-4, 2e-4
N_TRAIN, N_VAL = 192, 64


def _digits():
  from sklearn.datasets import load_digits

  bunch = load_digits()
  x = (bunch.images / 16.0).astype(np.float32)[: N_TRAIN + N_VAL]
  y = bunch.target.astype(np.int32)[: N_TRAIN + N_VAL]
  return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


XT, YT, XV, YV = _digits()
DIGITS = sweep.data.arrays(XT, YT, XV, YV, name='digits8x8', num_classes=10)


def init_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0)


def epoch_order(seed, epoch, n):
  return jax.random.permutation(
    jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch), n
  )


def update_key(seed, t, stream):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), t)


def batches(seed, batch, epochs, n=N_TRAIN):
  """(update t, example indices) in the documented order: drop-last, reshuffled per epoch."""
  t = 0
  for e in range(epochs):
    order = np.asarray(epoch_order(seed, e, n))
    for j in range(n // batch):
      yield t, order[j * batch : (j + 1) * batch]
      t += 1


def ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


# --------------------------------------------------------------- flax linen ----


class ExampleNet(nn.Module):
  """Written as the flax examples write their models: a `train` argument switches
  BatchNorm and Dropout. (No bias before BatchNorm: its gradient is float noise, which
  Adam would scale up to steps of the learning rate's size.)"""

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(16, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(10)(x)


def linen_reference(module, seed, lr, batch, epochs, dropout=True):
  variables = module.init(init_key(seed), XT[:1], train=False)
  params, stats = variables['params'], variables['batch_stats']
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, stats, opt_state, xb, yb, key):
    def loss_fn(p):
      logits, new = module.apply(
        {'params': p, 'batch_stats': stats},
        xb,
        train=True,
        rngs={'dropout': key},
        mutable=['batch_stats'],
      )
      return ce(logits, yb), new['batch_stats']

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  for t, idx in batches(seed, batch, epochs):
    key = update_key(seed, t, 2) if dropout else update_key(seed, t, 99)
    params, stats, opt_state = step(params, stats, opt_state, XT[idx], YT[idx], key)
  val = ce(module.apply({'params': params, 'batch_stats': stats}, XV, train=False), YV)
  return {'params': params, 'batch_stats': stats}, float(val)


@pytest.fixture(scope='module')
def linen_sweep():
  cfg = sweep.SweepConfig(
    model=ExampleNet(),
    data=DIGITS,
    optimizer='adam',
    learning_rate=[3e-3, 1e-2],
    batch_size=[16, 32],
    seed=[0, 1],
    epochs=2,
  )
  return cfg, sweep.run(cfg, progress=False)


def test_a_linen_model_with_batchnorm_and_dropout_equals_its_own_training_loop(linen_sweep):
  cfg, result = linen_sweep
  assert len(result.table) == 8 and (result.table.status == 'ok').all()
  for i, row in result.table.iterrows():
    variables, val = linen_reference(
      ExampleNet(), int(row.seed), row.learning_rate, int(row.batch_size), 2
    )
    got = result.variables(i)
    assert set(got) == {'params', 'batch_stats'}
    assert_close(got, variables, f'run {i}')
    assert_close(result.params(i), variables['params'], f'run {i} params')
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)
    # Ready for the module's own apply, in evaluation mode.
    out = ExampleNet().apply(got, XV, train=False)
    np.testing.assert_allclose(float(ce(out, YV)), val, rtol=RTOL)


def test_dropout_is_really_on_while_training(linen_sweep):
  """Without the documented keys (another stream), the reference parts from the engine: the
  masks matter, so the equality above is not the one of a model with dropout off."""
  _, result = linen_sweep
  row = result.table.loc[0]
  _, val = linen_reference(
    ExampleNet(), int(row.seed), row.learning_rate, int(row.batch_size), 2, dropout=False
  )
  assert abs(val - row.final_val_loss) > 1e-4


class TrainingNet(nn.Module):
  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
    return nn.Dense(10)(nn.Dropout(0.5, deterministic=not training)(x))


class DeterministicNet(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
    return nn.Dense(10)(nn.Dropout(0.5, deterministic=deterministic)(x))


@pytest.mark.parametrize(
  'module, name', [(TrainingNet(), 'training'), (DeterministicNet(), 'deterministic')]
)
def test_another_switch_name_is_refused_until_named(module, name):
  cfg = sweep.SweepConfig(model=module, data=DIGITS, updates=4)
  with pytest.raises(ConfigError, match=f"train_argument='{name}'"):
    sweep.check(cfg)
  plan = sweep.check(cfg.replace(train_argument=name))
  assert len(plan.runs) == 1


def test_a_named_switch_is_passed_the_training_mode():
  """train_argument='deterministic' is passed False while training: dropout is on."""
  cfg = sweep.SweepConfig(
    model=DeterministicNet(),
    data=DIGITS,
    updates=6,
    num_evals=1,
    learning_rate=0.01,
    batch_size=16,
    train_argument='deterministic',
    optimizer='sgd',
  )
  result = sweep.run(cfg, progress=False)
  module = DeterministicNet()
  params = module.init(init_key(0), XT[:1])['params']
  opt = optax.sgd(0.01)
  opt_state = opt.init(params)
  for t, idx in batches(0, 16, 1):
    if t == 6:
      break

    def loss(p, idx=idx, t=t):
      rngs = {'dropout': update_key(0, t, 2)}
      return ce(module.apply({'params': p}, XT[idx], deterministic=False, rngs=rngs), YT[idx])

    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  assert_close(result.params(0), params, 'deterministic=False while training')
  with pytest.raises(ConfigError, match='train_argument'):
    sweep.check(cfg.replace(train_argument='dropout_off'))


def test_resume_with_batch_statistics_and_saved_runs_hold_them(linen_sweep, tmp_path, monkeypatch):
  import os
  import signal
  import threading

  from kernels import train

  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are only installed in the main thread')
  cfg, _ = linen_sweep
  cfg = cfg.replace(learning_rate=[3e-3], seed=[0], batch_size=[16, 32], keep_best=True, epochs=3)
  whole = sweep.run(cfg, progress=False)
  calls, original = [], train.segment_jit

  def segment_jit(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  workdir = str(tmp_path / 'w')
  monkeypatch.setattr(train, 'segment_jit', segment_jit)
  with pytest.raises(SystemExit):
    sweep.run(cfg, workdir=workdir, progress=False)
  monkeypatch.setattr(train, 'segment_jit', original)
  resumed = sweep.run(cfg, workdir=workdir, progress=False)
  for i in whole.table.index:
    np.testing.assert_array_equal(resumed.table.final_val_loss[i], whole.table.final_val_loss[i])
    assert_close(resumed.variables(i), whole.variables(i), f'resumed run {i}')
  saved = [int(i) for i in resumed.table.index[resumed.table.pareto]]
  assert saved
  for i in saved:
    restored = sweep.restore_variables(workdir, i)
    assert set(restored) == {'params', 'batch_stats'}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(whole.variables(i)), strict=True):
      np.testing.assert_array_equal(a, b)
    best = sweep.restore_variables(workdir, i, best=True)
    assert_close(best, whole.variables(i, best=True), 'best variables')
    loaded = sweep.load(workdir)
    assert set(loaded.variables(i)) == {'params', 'batch_stats'}


# ---------------------------------------------------------------------- nnx ----


class NNXNet(nnx.Module):
  """As the flax nnx MNIST tutorial writes its CNN: BatchNorm and Dropout, modes switched
  with `train()` / `eval()`."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(64, 16, use_bias=False, rngs=rngs)
    self.batch_norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.linear2(self.dropout(nnx.relu(self.batch_norm(self.linear1(x)))))


def nnx_reference(seed, lr, batch, epochs):
  """The nnx tutorial's loop: nnx.Optimizer, nnx.value_and_grad, nnx.jit."""
  model = NNXNet(rngs=nnx.Rngs(params=init_key(seed), dropout=0))
  model.train()
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, xb, yb, key):
    # The module's one Rngs stream, keyed for this update (stream 0: fold_in(key, 0)).
    model.dropout.rngs.key[...] = jax.random.fold_in(key, 0)
    model.dropout.rngs.count[...] = jnp.zeros((), jnp.uint32)
    grads = nnx.grad(lambda m: ce(m(xb), yb))(model)
    optimizer.update(model, grads)

  for t, idx in batches(seed, batch, epochs):
    train_step(model, optimizer, XT[idx], YT[idx], update_key(seed, t, 2))
  model.eval()
  return model, float(ce(model(XV), YV))


def test_an_nnx_model_with_batchnorm_and_dropout_equals_its_own_training_loop():
  cfg = sweep.SweepConfig(
    model=NNXNet, data=DIGITS, learning_rate=[3e-3, 3e-2], batch_size=32, seed=[0, 1], epochs=2
  )
  result = sweep.run(cfg, progress=False)
  for i, row in result.table.iterrows():
    model, val = nnx_reference(int(row.seed), row.learning_rate, 32, 2)
    np.testing.assert_allclose(row.final_val_loss, val, rtol=RTOL)
    mine = result.model(i)
    assert isinstance(mine, NNXNet)
    np.testing.assert_allclose(np.asarray(mine(XV)), np.asarray(model(XV)), rtol=1e-3, atol=1e-4)
    assert_close(
      nnx.to_pure_dict(nnx.state(mine, nnx.BatchStat)),
      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
      'batch statistics',
    )
    assert set(result.variables(i)) == {'params', 'state'}


# ------------------------------------------------------------------- tokens ----

VOCAB, T, PAD = 11, 6, -1


def _tokens(n, seed, empty=0):
  """n sequences of varying length (the rest padding), then `empty` of padding only."""
  rng = np.random.default_rng(seed)
  seq = np.cumsum(rng.integers(1, 3, size=(n, T + 1)), axis=1) % VOCAB  # a learnable pattern
  x, y = seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)
  lengths = rng.integers(2, T + 1, size=n)
  y = np.where(np.arange(T)[None, :] < lengths[:, None], y, PAD)
  return np.concatenate([x, x[:empty]]), np.concatenate([y, np.full((empty, T), PAD)])


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(VOCAB, 8)(tokens)
    h = nn.Dense(16)(h)
    return nn.Dense(VOCAB)(nn.relu(h))


def test_token_sequences_with_padding_equal_a_masked_loop():
  xt, yt = _tokens(96, 0)
  xv, yv = _tokens(32, 1, empty=8)
  data = sweep.data.arrays(xt, yt, xv, yv, ignore_label=PAD, num_classes=VOCAB)
  assert data.x_train.dtype == np.int32 and data.y_train.shape == (96, T)
  cfg = sweep.SweepConfig(
    model=TinyLM(), data=data, optimizer='sgd', learning_rate=[0.1, 0.5], batch_size=16, epochs=2
  )
  result = sweep.run(cfg, progress=False)
  module = TinyLM()

  def per_example(logits, y):
    mask = (y != PAD).astype(jnp.float32)
    tok = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(y == PAD, 0, y))
    hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    count = jnp.maximum(mask.sum(1), 1.0)
    return (tok * mask).sum(1) / count, (hits * mask).sum(1) / count

  for _i, row in result.table.iterrows():
    params = module.init(init_key(0), xt[:1])['params']
    opt = optax.sgd(row.learning_rate)
    opt_state = opt.init(params)
    for _, idx in batches(0, 16, 2, n=96):
      loss = lambda p: per_example(module.apply({'params': p}, xt[idx]), yt[idx])[0].mean()  # noqa: B023, E731
      updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
      params = optax.apply_updates(params, updates)
    # Evaluation is per token: every real token counts once.
    logits = module.apply({'params': params}, xv)
    mask = yv != PAD
    tok = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(mask, yv, 0))
    hits = np.asarray(jnp.argmax(logits, -1) == yv)
    np.testing.assert_allclose(
      row.final_val_loss, float(np.sum(tok * mask) / mask.sum()), rtol=RTOL
    )
    np.testing.assert_allclose(
      row.final_val_accuracy, float(np.sum(hits * mask) / mask.sum()), rtol=RTOL
    )


def test_a_callable_loss_keeps_the_accuracy_columns():
  def my_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  def with_accuracy(logits, labels):
    return my_loss(logits, labels), (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

  base = sweep.SweepConfig(model=sweep.models.mlp(), data=DIGITS, updates=20, num_evals=2)
  named = sweep.run(base, progress=False).table
  for loss in (my_loss, with_accuracy):
    table = sweep.run(base.replace(loss=loss), progress=False).table
    np.testing.assert_allclose(table.final_val_accuracy, named.final_val_accuracy, rtol=1e-6)


# ------------------------------------------------------------- augmentation ----


def flip_and_shift(key, x):
  """Random horizontal flips of 8x8 digits, one per example."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {'w1': jax.random.normal(k1, (64, 16)) * 0.1, 'w2': jax.random.normal(k2, (16, 10)) * 0.1}


def mlp_apply(params, x):
  return jnp.tanh(x.reshape((x.shape[0], -1)) @ params['w1']) @ params['w2']


def test_augmentation_equals_the_loop_that_augments_each_batch():
  cfg = sweep.SweepConfig(
    model=(mlp_init, mlp_apply),
    data=DIGITS,
    optimizer='sgd',
    learning_rate=[0.1, 0.3],
    batch_size=[16, 32],
    seed=[0, 3],
    epochs=1,
    augment=flip_and_shift,
  )
  result = sweep.run(cfg, progress=False)
  plain = sweep.run(cfg.replace(augment=None), progress=False)
  for i, row in result.table.iterrows():
    seed, batch = int(row.seed), int(row.batch_size)
    params = mlp_init(init_key(seed))
    for t, idx in batches(seed, batch, 1):
      xb = flip_and_shift(update_key(seed, t, 3), XT[idx])
      grads = jax.grad(lambda p: ce(mlp_apply(p, xb), YT[idx]))(params)  # noqa: B023
      params = jax.tree.map(lambda p, g, lr=row.learning_rate: p - lr * g, params, grads)
    assert_close(result.params(i), params, f'augmented run {i}')
    np.testing.assert_allclose(row.final_val_loss, float(ce(mlp_apply(params, XV), YV)), rtol=RTOL)
    assert abs(row.final_val_loss - plain.table.final_val_loss[i]) > 1e-5  # augmentation happened


def test_bad_augment_and_train_argument_are_refused_before_compiling():
  from compiles import counting_compiles

  with counting_compiles() as compiled:
    with pytest.raises(ConfigError, match='augment'):
      sweep.check(sweep.SweepConfig(model=(mlp_init, mlp_apply), data=DIGITS, augment='flip'))
    with pytest.raises(ConfigError, match='train_argument'):
      sweep.check(sweep.SweepConfig(model=ExampleNet(), data=DIGITS, train_argument=3))
    with pytest.raises(ConfigError, match='noise_scale'):
      sweep.check(sweep.SweepConfig(model=ExampleNet(), data=DIGITS, noise_scale=True))
  assert compiled == []


# ------------------------------------------------------------ equinox, keras ----


def test_an_equinox_model_with_dropout_equals_its_own_loop():
  eqx = pytest.importorskip('equinox')

  class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.l1 = eqx.nn.Linear(64, 16, key=k1)
      self.drop = eqx.nn.Dropout(0.3)
      self.l2 = eqx.nn.Linear(16, 10, key=k2)

    def __call__(self, x, *, key=None):
      return self.l2(self.drop(jax.nn.relu(self.l1(x.reshape(-1))), key=key))

  model = EqxNet(jax.random.key(7))
  cfg = sweep.SweepConfig(
    model=model, data=DIGITS, optimizer='adam', learning_rate=[1e-3, 1e-2], batch_size=32, epochs=1
  )
  result = sweep.run(cfg, progress=False)
  for i, row in result.table.iterrows():
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.adam(row.learning_rate)
    opt_state = opt.init(params)
    for t, idx in batches(0, 32, 1):
      keys = jax.random.split(update_key(0, t, 2), 32)

      def loss(p, xb=XT[idx], yb=YT[idx], keys=keys, static=static):
        m = eqx.combine(p, static)
        return ce(jax.vmap(lambda x, k: m(x, key=k))(xb, keys), yb)  # noqa: B023

      updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
      params = optax.apply_updates(params, updates)
    final = eqx.nn.inference_mode(eqx.combine(params, static))
    np.testing.assert_allclose(row.final_val_loss, float(ce(jax.vmap(final)(XV), YV)), rtol=RTOL)
    rebuilt = result.model(i)
    np.testing.assert_allclose(
      np.asarray(jax.vmap(rebuilt)(XV)), np.asarray(jax.vmap(final)(XV)), rtol=1e-3, atol=1e-5
    )


def test_the_seed_keras_model_with_its_own_loss():
  import os

  os.environ.setdefault('KERAS_BACKEND', 'jax')
  keras = pytest.importorskip('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('keras runs on another backend here')
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((64,)),
      keras.layers.Dense(10, activation='relu'),
      keras.layers.Dense(10, activation='softmax'),
    ]
  )
  onehot = np.eye(10, dtype=np.float32)
  data = sweep.data.arrays(XT.reshape(-1, 64), onehot[YT], XV.reshape(-1, 64), onehot[YV])
  with pytest.raises(ConfigError, match='softmax'):
    sweep.check(sweep.SweepConfig(model=model, data=data, loss='softmax_cross_entropy'))
  loss = keras.losses.CategoricalCrossentropy()
  cfg = sweep.SweepConfig(
    model=model,
    data=data,
    loss=loss,
    optimizer='adam',
    learning_rate=[1e-2, 3e-2],
    batch_size=32,
    epochs=2,
  )
  result = sweep.run(cfg, progress=False)
  # The function form takes (y_true, y_pred) too: the same numbers.
  functional = sweep.run(cfg.replace(loss=keras.losses.categorical_crossentropy), progress=False)
  np.testing.assert_allclose(
    functional.table.final_val_loss, result.table.final_val_loss, rtol=1e-6
  )
  weights = [np.asarray(v.value) for v in model.trainable_variables]
  for _i, row in result.table.iterrows():
    params = [jnp.asarray(w) for w in weights]
    opt = optax.adam(row.learning_rate)
    opt_state = opt.init(params)
    for _, idx in batches(0, 32, 2):
      xb, yb = XT[idx].reshape(-1, 64), onehot[YT[idx]]
      f = lambda p: loss(yb, model.stateless_call(p, [], xb, training=True)[0])  # noqa: B023, E731
      updates, opt_state = opt.update(jax.grad(f)(params), opt_state, params)
      params = optax.apply_updates(params, updates)
    probs = model.stateless_call(params, [], XV.reshape(-1, 64))[0]
    np.testing.assert_allclose(row.final_val_loss, float(loss(onehot[YV], probs)), rtol=RTOL)
    acc = float(np.mean(np.argmax(probs, -1) == YV))
    np.testing.assert_allclose(row.final_val_accuracy, acc, rtol=1e-6)


class SoftmaxNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.softmax(nn.Dense(10)(x.reshape((x.shape[0], -1))))


def test_probabilities_with_softmax_cross_entropy_are_refused():
  """A softmax at the end, then the loss's own softmax: refused, not trained silently."""
  with pytest.raises(ConfigError, match='probabilities'):
    sweep.check(sweep.SweepConfig(model=SoftmaxNet(), data=DIGITS, loss='softmax_cross_entropy'))

  # log_softmax outputs (log-probabilities) are fine: log_softmax is idempotent.
  class LogSoftmaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.log_softmax(nn.Dense(10)(x.reshape((x.shape[0], -1))))

  sweep.check(sweep.SweepConfig(model=LogSoftmaxNet(), data=DIGITS))


def test_the_char_lm_experiment_through_the_cli(tmp_path):
  """experiments/char_lm.py's own model and data, through `sweep run` and `sweep report`
  (a smaller transformer and budget, so that the test stays short)."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path

  import pandas as pd

  repo = Path(__file__).resolve().parents[1]
  experiment = tmp_path / 'char_lm_small.py'
  experiment.write_text(
    'import importlib.util\n'
    'spec = importlib.util.spec_from_file_location("char_lm", '
    f'{str(repo / "experiments" / "char_lm.py")!r})\n'
    'char_lm = importlib.util.module_from_spec(spec)\n'
    'spec.loader.exec_module(char_lm)\n\n'
    'def get_config():\n'
    '  cfg = char_lm.get_config()\n'
    '  model = char_lm.CharTransformer(vocab=cfg.data.num_classes, width=16, heads=2, layers=1)\n'
    '  return cfg.replace(model=model, learning_rate=[3e-3, 1e-2], batch_size=[32], epochs=None, '
    'updates=6,\n'
    '                     num_evals=2, train_eval_size=64)\n'
  )
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get('PYTHONPATH')) if p),
  )
  env['SWEEP_NO_CACHE'] = '1'
  workdir = tmp_path / 'w'
  argv = [
    sys.executable,
    '-m',
    'sweep',
    'run',
    str(experiment),
    '--workdir',
    str(workdir),
    '--no-progress',
  ]
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = pd.read_csv(workdir / 'results.csv')
  assert len(table) == 2 and (table.status == 'ok').all()
  assert {'final_val_accuracy', 'final_train_accuracy'} <= set(table.columns)
  curves = pd.read_csv(workdir / 'curves.csv')
  for _, run in curves.groupby('run'):
    assert run.val_loss.iloc[-1] < run.val_loss.iloc[0]  # it learns
  assert json.loads((workdir / 'config.json').read_text())
  assert (workdir / 'report' / 'report.html').exists()


def test_the_lr_range_test_takes_a_model_with_state_and_dropout():
  """The ramp steps the model as the engine does: training mode, batch statistics carried,
  the seed's dropout keys; its first loss is the reference's first batch loss."""
  cfg = sweep.SweepConfig(model=ExampleNet(), data=DIGITS, batch_size=16)
  found = sweep.lr_find(cfg, method='ramp', start_lr=1e-4, end_lr=1.0, num_it=30)
  module = ExampleNet()
  variables = module.init(init_key(0), XT[:1], train=False)
  _, idx = next(batches(0, 16, 1))
  logits, _ = module.apply(
    variables, XT[idx], train=True, rngs={'dropout': update_key(0, 0, 2)}, mutable=['batch_stats']
  )
  np.testing.assert_allclose(found.raw_losses[0], float(ce(logits, YT[idx])), rtol=1e-5)
  assert np.isfinite(found.suggestion) and 1e-4 <= found.suggestion <= 1.0


class NNXCallRngs(nnx.Module):
  """The nnx tutorial's other form: Dropout without stored Rngs, keys given at the call."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(64, 16, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.3)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = nnx.relu(self.linear1(x.reshape((x.shape[0], -1))))
    return self.linear2(self.dropout(x, rngs=rngs))


def test_an_nnx_model_given_its_rngs_at_the_call():
  cfg = sweep.SweepConfig(
    model=NNXCallRngs,
    data=DIGITS,
    optimizer='sgd',
    learning_rate=0.1,
    batch_size=32,
    updates=5,
    num_evals=1,
  )
  result = sweep.run(cfg, progress=False)
  model = NNXCallRngs(rngs=nnx.Rngs(params=init_key(0)))
  model.train()
  graph, params = nnx.split(model, nnx.Param)
  for t, idx in batches(0, 32, 1):
    if t == 5:
      break

    def loss(p, idx=idx, t=t):
      return ce(nnx.merge(graph, p)(XT[idx], rngs=nnx.Rngs(dropout=update_key(0, t, 2))), YT[idx])

    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))
  assert_close(result.params(0), nnx.to_pure_dict(params), 'call-time rngs')


@pytest.mark.parametrize(
  'family, plain',
  [
    ('adam', optax.adam),
    ('momentum', lambda lr: optax.sgd(lr, momentum=0.9)),
    ('adamw', optax.adamw),
  ],
)
def test_a_named_optimizer_without_set_hyperparameters_is_exactly_optax(family, plain):
  """Defaults stay Python floats inside optax (1 - float32(0.999) is not 1e-3): five updates
  of the engine's optimizer equal optax's own, bit for bit."""
  from kernels import optimizers

  params = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)}
  mine, theirs = optimizers.make(family, {}), plain(0.01)
  s1, s2 = mine.init(params), theirs.init(params)
  p1 = p2 = params
  for k in range(5):
    g = {'w': jnp.asarray(np.random.default_rng(k + 1).normal(size=(5, 3)), jnp.float32)}
    u1, s1 = mine.update(g, optimizers.with_learning_rate(s1, jnp.float32(0.01)), p1)
    u2, s2 = theirs.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  np.testing.assert_array_equal(np.asarray(p1['w']), np.asarray(p2['w']))


def test_mistakes_in_augment_are_refused_before_compiling():
  from compiles import counting_compiles

  base = sweep.SweepConfig(model=(mlp_init, mlp_apply), data=DIGITS)
  bad = {
    'one argument': lambda x: x,
    'arguments swapped': lambda x, key: jnp.where(jax.random.bernoulli(key), x, -x),
    'drops an example': lambda key, x: x[1:],
    'returns a tuple': lambda key, x: (x, key),
  }
  with counting_compiles() as compiled:
    for what, fn in bad.items():
      with pytest.raises(ConfigError, match='augment') as info:
        sweep.check(base.replace(augment=fn))
      assert 'augment(key, x_batch)' in str(info.value), what
  assert compiled == []


class NNXTrainArg(nnx.Module):
  """An nnx module switched by a `train` argument of its call, as linen modules are."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(64, 16, use_bias=False, rngs=rngs)
    self.batch_norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x, train: bool = False):
    h = self.batch_norm(self.linear(x.reshape((x.shape[0], -1))), use_running_average=not train)
    return self.out(nnx.relu(h))


def test_an_nnx_train_argument_is_passed():
  result = sweep.run(
    sweep.SweepConfig(model=NNXTrainArg, data=DIGITS, updates=3, num_evals=1), progress=False
  )
  stats = result.variables(0)['state']['batch_norm']
  assert np.abs(stats['mean']).max() > 0  # batch statistics were updated while training

  class NNXTraining(NNXTrainArg):
    def __call__(self, x, training: bool = False):
      return super().__call__(x, train=training)

  with pytest.raises(ConfigError, match="train_argument='training'"):
    sweep.check(sweep.SweepConfig(model=NNXTraining, data=DIGITS))


def test_ignored_labels_leave_the_evaluation_averages():
  """Examples whose label is ignore_label count nowhere: the validation metrics are those of
  the labelled examples."""
  yv = YV.copy()
  yv[::2] = -1
  data = sweep.data.arrays(XT, YT, XV, yv, ignore_label=-1, num_classes=10)
  cfg = sweep.SweepConfig(
    model=(mlp_init, mlp_apply),
    data=data,
    optimizer='sgd',
    learning_rate=0.1,
    updates=5,
    num_evals=1,
  )
  result = sweep.run(cfg, progress=False)
  logits = mlp_apply(result.params(0), XV[1::2])
  np.testing.assert_allclose(result.table.final_val_loss[0], float(ce(logits, YV[1::2])), rtol=1e-5)
  np.testing.assert_allclose(
    result.table.final_val_accuracy[0], float(np.mean(np.argmax(logits, -1) == YV[1::2])), rtol=1e-6
  )


def test_whole_number_float_labels_get_a_hint():
  data = sweep.data.arrays(XT, YT.astype(np.float32))
  with pytest.raises(ConfigError, match='integers'):
    sweep.check(
      sweep.SweepConfig(model=sweep.models.mlp(outputs=10), data=data, loss='softmax_cross_entropy')
    )
