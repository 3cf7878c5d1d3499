"""Every run of a sweep equals the same training done plainly, one run at a time.

The reference here shares no code with the engine. It is written from the documented
semantics only: the optax optimizer and the optax schedule built directly, the
documented init key and data order of each seed, and a Python loop of single jitted
optax steps. Each sweep trains many runs at once (optimizers, schedules, batch sizes,
learning rates, seeds and optimizer hyperparameters as axes), so that few programs are
compiled; every run of it is then compared with its reference.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from compiles import COMPILE_EVENT

import sweep

RTOL, ATOL = 1e-4, 1e-5

SCHEDULES = ('constant', 'exponential', 'step', 'cosine', 'warmup_cosine', 'linear', 'onecycle')
FAMILIES = ('sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop', 'adagrad', 'lion')
HYPERS = ('momentum', 'b1', 'b2', 'weight_decay')
# optax's defaults of each optimizer, as a user of optax gets them.
DEFAULTS = {
  'sgd': {},
  'momentum': {'momentum': 0.9},
  'nesterov': {'momentum': 0.9},
  'adam': {'b1': 0.9, 'b2': 0.999},
  'adamw': {'b1': 0.9, 'b2': 0.999, 'weight_decay': 1e-4},
  'rmsprop': {},
  'adagrad': {},
  'lion': {'b1': 0.9, 'b2': 0.99, 'weight_decay': 1e-3},
}
MAX_UPDATES = 64  # length of the reference's learning-rate table
MAX_BATCH = 64  # rows of the reference's padded batches

# 200 examples: no batch size used below divides it, so every epoch drops a remainder.
N_TRAIN, N_VAL, D_IN, HIDDEN, D_OUT = 200, 60, 8, 16, 3


# ------------------------------------------------------------------ model, data ----


def mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.uniform(k1, (D_IN, HIDDEN), minval=-1.0, maxval=1.0) / math.sqrt(D_IN),
    'b1': jnp.zeros(HIDDEN),
    'w2': jax.random.uniform(k2, (HIDDEN, D_OUT), minval=-1.0, maxval=1.0) / math.sqrt(HIDDEN),
    'b2': jnp.zeros(D_OUT),
  }


def mlp_apply(params, x):
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


# The same tuple object in every sweep, so that equal structures share their programs.
MODEL = (mlp_init, mlp_apply)


def _arrays():
  rng = np.random.default_rng(1234)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  teacher = rng.normal(size=(D_IN, D_OUT))
  y_reg = (np.tanh(x @ teacher) + 0.1 * rng.normal(size=(len(x), D_OUT))).astype(np.float32)
  y_cls = np.argmax(x @ teacher + 0.5 * rng.normal(size=(len(x), D_OUT)), axis=1).astype(np.int32)
  return x, y_reg, y_cls


X, Y_REG, Y_CLS = _arrays()
# No validation set for regression: its sweeps check params, and evaluate (and compile) less.
REGRESSION = sweep.data.arrays(X[:N_TRAIN], Y_REG[:N_TRAIN])
CLASSIFICATION = sweep.data.arrays(X[:N_TRAIN], Y_CLS[:N_TRAIN], X[N_TRAIN:], Y_CLS[N_TRAIN:])


# -------------------------------------------------------------- the reference ----


def make_optimizer(family, learning_rate, hp):
  """The optax optimizer of `family`, built as a user of optax would."""
  if family == 'sgd':
    return optax.sgd(learning_rate)
  if family == 'momentum':
    return optax.sgd(learning_rate, momentum=hp['momentum'])
  if family == 'nesterov':
    return optax.sgd(learning_rate, momentum=hp['momentum'], nesterov=True)
  if family == 'adam':
    return optax.adam(learning_rate, b1=hp['b1'], b2=hp['b2'])
  if family == 'adamw':
    return optax.adamw(learning_rate, b1=hp['b1'], b2=hp['b2'], weight_decay=hp['weight_decay'])
  if family == 'rmsprop':
    return optax.rmsprop(learning_rate, momentum=hp.get('momentum'))
  if family == 'adagrad':
    return optax.adagrad(learning_rate)
  assert family == 'lion'
  return optax.lion(learning_rate, b1=hp['b1'], b2=hp['b2'], weight_decay=hp['weight_decay'])


def make_schedule(name, lr, total):
  """The optax schedule of a run with `total` updates, as the config documents it."""
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'exponential':
    return optax.exponential_decay(lr, transition_steps=total, decay_rate=0.1)
  if name == 'step':
    every = max(1, round(total / 3))
    return optax.exponential_decay(lr, transition_steps=every, decay_rate=0.1, staircase=True)
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=total)
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=round(0.1 * total), decay_steps=total, end_value=0.0
    )
  if name == 'linear':
    return optax.linear_schedule(lr, 0.0, total)
  assert name == 'onecycle'
  return optax.cosine_onecycle_schedule(
    total, lr, pct_start=0.3, div_factor=25.0, final_div_factor=1e4
  )


@functools.cache
def lr_table(name, lr, total):
  """The schedule's value at update counts 0 .. MAX_UPDATES - 1 (a run reads the first
  `total`). The optimizer reads it at its own update count, so that one jitted step
  serves every schedule and learning rate.
  """
  assert total <= MAX_UPDATES
  return np.asarray(jax.vmap(make_schedule(name, lr, total))(jnp.arange(MAX_UPDATES)), np.float32)


def mse(predictions, targets):
  return jnp.mean(jnp.square(predictions - targets), axis=-1)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


LOSSES = {'mse': mse, 'softmax_cross_entropy': cross_entropy}  # per example


# Compiled without backend optimisations: the step is tiny, and its compile (once per
# optimizer and loss) costs more than the few thousand steps it runs.
@functools.partial(
  jax.jit,
  static_argnames=('family', 'loss', 'apply_fn'),
  compiler_options={'xla_backend_optimization_level': 0},
)
def reference_step(params, opt_state, xb, yb, real, lrs, hp, *, family, loss, apply_fn):
  """One plain optax update of one run on the batch of the `real` rows of (xb, yb).

  Batches come padded to MAX_BATCH rows, so that one compiled step serves every batch
  size; the loss is the mean over the real rows.
  """
  opt = make_optimizer(family, lambda count: lrs[count], hp)

  def batch_loss(p):
    per_example = LOSSES[loss](apply_fn(p, xb), yb)
    return jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.sum(real)

  value, grads = jax.value_and_grad(batch_loss)(params)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


@functools.cache
def initial_params(init_fn, seed):
  return jax.jit(init_fn)(jax.random.fold_in(jax.random.key(seed), 0))


@functools.cache
def data_order(seed, epoch, n, shuffle):
  """The documented order in which seed `seed` reads the training set in epoch `epoch`."""
  if not shuffle:
    return np.arange(n)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
  return np.asarray(jax.random.permutation(key, n))


def reference(
  *,
  family,
  schedule,
  learning_rate,
  batch_size,
  seed,
  total,
  x,
  y,
  loss,
  shuffle,
  hp=None,
  threshold=None,
  init_fn=mlp_init,
  apply_fn=mlp_apply,
):
  """Trains one run plainly; returns its final params (numpy) and the updates applied.

  With a `threshold`, the run stops (its params frozen) at the first batch loss that is
  not finite or exceeds `threshold` times the first batch loss, as the config documents.
  """
  hp = {**DEFAULTS[family], **{k: v for k, v in (hp or {}).items() if v is not None}}
  hp = {k: np.float32(v) for k, v in hp.items()}
  n = len(x)
  lrs = lr_table(schedule, float(learning_rate), int(total))
  params = initial_params(init_fn, int(seed))
  opt_state = make_optimizer(family, lambda count: lrs[count], hp).init(params)
  per_epoch = n // batch_size
  assert batch_size <= MAX_BATCH
  real = np.arange(MAX_BATCH) < batch_size
  loss0 = None
  done = 0
  for t in range(total):
    epoch, j = divmod(t, per_epoch)
    idx = data_order(int(seed), epoch, n, shuffle)[j * batch_size : (j + 1) * batch_size]
    padded = np.concatenate([idx, np.zeros(MAX_BATCH - batch_size, idx.dtype)])
    new_params, new_state, value = reference_step(
      params,
      opt_state,
      x[padded],
      y[padded],
      real,
      lrs,
      hp,
      family=family,
      loss=loss,
      apply_fn=apply_fn,
    )
    if threshold is not None:
      value = float(value)
      loss0 = value if t == 0 else loss0
      if not (math.isfinite(value) and value <= threshold * abs(loss0) + 1e-6):
        break
    params, opt_state = new_params, new_state
    done += 1
  return jax.tree.map(np.asarray, params), done


# ---------------------------------------------------------------- comparisons ----


def excess(got, want):
  """How far `got` is outside `|got - want| <= ATOL + RTOL |want|` (<= 0 inside)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  worst = -np.inf
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    worst = max(worst, float(np.max(np.abs(g - w) - (ATOL + RTOL * np.abs(w)))))
  return worst


def hyperparameters(row):
  return {k: float(row[k]) for k in HYPERS if k in row.index and pd.notna(row[k])}


def describe(row):
  cols = ['optimizer', 'schedule', 'batch_size', 'learning_rate', *HYPERS, 'seed', 'status']
  return ', '.join(f'{c}={row[c]}' for c in cols if c in row.index and pd.notna(row[c]))


def check_grid(table, **axes):
  """The table holds exactly one row per point of the product of `axes`."""
  assert len(table) == math.prod(len(v) for v in axes.values())
  got = set(zip(*(table[a].tolist() for a in axes), strict=True))
  assert got == set(itertools.product(*axes.values()))


def assert_matches_reference(result, rows, *, data, loss, shuffle, total, **kwargs):
  """Each run in `rows` (table index) has the final params of its plain reference."""
  x, y = data.x_train, data.y_train
  failures = []
  for i in rows:
    row = result.table.loc[i]
    want, done = reference(
      family=row.optimizer,
      schedule=row.schedule,
      learning_rate=row.learning_rate,
      batch_size=int(row.batch_size),
      seed=int(row.seed),
      total=total(int(row.batch_size)),
      x=x,
      y=y,
      loss=loss,
      shuffle=shuffle,
      hp=hyperparameters(row),
      **kwargs,
    )
    assert done == row.updates, f'run {i} ({describe(row)}): {row.updates} updates, expected {done}'
    worst = excess(result.params(i), want)
    if worst > 0:
      failures.append(f'run {i} ({describe(row)}): off by {worst:.3g} beyond tolerance')
  assert not failures, (
    f'{len(failures)} of {len(rows)} runs differ from their plain optax reference:\n'
    + '\n'.join(failures[:20])
  )


def epochs_budget(epochs, n=N_TRAIN):
  return lambda batch: round(epochs * (n // batch))


class CompileCounter:
  """Counts XLA compilations (backend compiles) while it is entered."""

  def __init__(self):
    self.names = []

  def _listener(self, event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      self.names.append(kwargs.get('fun_name', '?'))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)

  @property
  def count(self):
    return len(self.names)


# ---------------------------------------------------------------------- tests ----


# The first test's settings. Later tests whose sweeps share them (and the width of the
# run axes, 16 runs per seed) reuse its programs for the families they share.
BASE = dict(
  model=MODEL,
  data=REGRESSION,
  loss='mse',
  batch_size=[16, 48],
  seed=[0, 1],
  epochs=2,
  shuffle=False,
)
BASE_TOTAL = epochs_budget(2)  # 200 // 16 = 12 and 200 // 48 = 4 updates per epoch


def test_every_optimizer_and_schedule_with_mixed_batch_sizes():
  """8 optimizers x 7 schedules x 2 batch sizes x 2 learning rates x 2 seeds, unshuffled."""
  # Learning rates where rmsprop (whose first steps are ~3 lr long whatever the gradient)
  # trains smoothly: faster, it amplifies float32 rounding past the tolerance, in the
  # engine and the reference alike (each as far from a float64 run as the other).
  axes = dict(
    optimizer=list(FAMILIES),
    schedule=list(SCHEDULES),
    learning_rate=[0.005, 0.01],
    batch_size=BASE['batch_size'],
    seed=BASE['seed'],
  )
  result = sweep.run(sweep.SweepConfig(**{**BASE, **axes}), progress=False)
  table = result.table
  check_grid(table, **axes)
  assert (table.status == 'ok').all()
  # A run makes epochs * (n // B) updates: the last 8 examples of each epoch are skipped.
  assert (table.updates == table.batch_size.map(BASE_TOTAL)).all()
  assert (table.examples == table.updates * table.batch_size).all()
  assert_matches_reference(
    result, table.index, data=REGRESSION, loss='mse', shuffle=False, total=BASE_TOTAL
  )


UPDATES = 8  # batch 32: 6 updates per epoch; batch 64: 3 per epoch. Both wrap.


@pytest.fixture(scope='module')
def shuffled_classification():
  """Cross-entropy on integer labels, shuffled, with an updates budget past one epoch."""
  axes = dict(
    optimizer=['sgd'],
    schedule=['constant', 'cosine', 'onecycle'],
    batch_size=[32, 64],
    learning_rate=[0.03, 0.3],
    seed=[0, 1, 2],
  )
  cfg = sweep.SweepConfig(
    model=MODEL,
    data=CLASSIFICATION,
    loss='softmax_cross_entropy',
    epochs=None,
    updates=UPDATES,
    shuffle=True,
    **axes,
  )
  result = sweep.run(cfg, progress=False)
  check_grid(result.table, **axes)
  return result


def test_shuffled_order_per_seed_and_epoch_with_updates_budget(shuffled_classification):
  result = shuffled_classification
  table = result.table
  assert (table.status == 'ok').all()
  assert (table.updates == UPDATES).all()
  assert (table.examples == UPDATES * table.batch_size).all()
  # Runs of one seed with batch sizes 32 and 64 read the same permutation (the two first
  # batches of 32 are the first batch of 64), and epoch 1 reads a new one. Every run
  # equals its reference, which reads the per-seed order whatever the batch size.
  budget = lambda batch: UPDATES  # noqa: E731
  assert_matches_reference(
    result,
    table.index,
    data=CLASSIFICATION,
    loss='softmax_cross_entropy',
    shuffle=True,
    total=budget,
  )
  # The comparison can tell data orders apart: the unshuffled order does not match.
  i = table.index[table.learning_rate == 0.3][0]
  row = table.loc[i]
  unshuffled, _ = reference(
    family='sgd',
    schedule=row.schedule,
    learning_rate=0.3,
    batch_size=int(row.batch_size),
    seed=int(row.seed),
    total=UPDATES,
    x=CLASSIFICATION.x_train,
    y=CLASSIFICATION.y_train,
    loss='softmax_cross_entropy',
    shuffle=False,
  )
  assert excess(result.params(i), unshuffled) > 0


def _forward64(params, x):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  return np.tanh(np.asarray(x, np.float64) @ p['w1'] + p['b1']) @ p['w2'] + p['b2']


def _cross_entropy_and_accuracy(params, x, y):
  logits = _forward64(params, x)
  top = logits.max(axis=1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
  ce = lse - logits[np.arange(len(y)), y]
  return float(ce.mean()), float((logits.argmax(axis=1) == y).mean())


def test_classification_metrics(shuffled_classification):
  result = shuffled_classification
  data = CLASSIFICATION
  for i, row in result.table.iterrows():
    params = result.params(i)
    val_loss, val_acc = _cross_entropy_and_accuracy(params, data.x_val, data.y_val)
    # The default probe (at least 256 examples) exceeds the 200: it is the whole training set.
    train_loss, train_acc = _cross_entropy_and_accuracy(params, data.x_train, data.y_train)
    where = f'run {i} ({describe(row)})'
    assert row.final_val_loss == pytest.approx(val_loss, rel=1e-4, abs=1e-6), where
    assert row.final_val_accuracy == pytest.approx(val_acc, abs=1e-6), where
    assert row.final_train_loss == pytest.approx(train_loss, rel=1e-4, abs=1e-6), where
    assert row.final_train_accuracy == pytest.approx(train_acc, abs=1e-6), where
    assert row.best_val_loss <= row.final_val_loss + 1e-7, where


def test_divergence_is_isolated():
  """A learning rate that blows sgd up, next to healthy runs that read the same batches."""
  axes = dict(
    optimizer=['sgd'],
    schedule=['constant', 'cosine', 'linear', 'step'],
    learning_rate=[1e-2, 5e-2, 1e3],
    batch_size=BASE['batch_size'],
    seed=BASE['seed'],
  )
  cfg = sweep.SweepConfig(**{**BASE, **axes}, divergence_threshold=100.0)
  result = sweep.run(cfg, progress=False)  # it finishes despite the diverged runs
  table = result.table
  check_grid(table, **axes)
  total = table.batch_size.map(BASE_TOTAL)
  huge = table.learning_rate == 1e3
  assert (table.status[huge] == 'diverged').all(), table[huge]
  assert (table.status[~huge] == 'ok').all(), table[~huge]
  assert (table.updates[~huge] == total[~huge]).all()
  assert (table.updates[huge] < total[huge]).all()
  assert (table.examples == table.updates * table.batch_size).all()
  # The healthy runs equal their reference as if the diverged runs never existed.
  assert_matches_reference(
    result, table.index[~huge], data=REGRESSION, loss='mse', shuffle=False, total=BASE_TOTAL
  )
  # A diverged run is frozen, not poisoned: its params are finite and equal the reference's
  # after the updates it applied. The update that blew it up is applied; the next batch
  # loss trips the threshold, and neither that update nor any later one is.
  assert_matches_reference(
    result,
    table.index[huge],
    data=REGRESSION,
    loss='mse',
    shuffle=False,
    total=BASE_TOTAL,
    threshold=100.0,
  )
  for i in table.index[huge]:
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(result.params(i)))


def test_hyperparameter_axes_and_new_values_compile_nothing():
  """b1, b2 and weight_decay of adamw and lion as axes; then a sweep that changes only
  values, and one with 3 learning rates instead of 4 (run axes are padded to a power of
  two), which compile nothing. Every run, next to padding slots too, equals its reference."""
  first = sweep.SweepConfig(
    **BASE,
    optimizer=['adamw', 'lion'],
    schedule='constant',
    learning_rate=[1e-3, 3e-3, 1e-2, 3e-2],
    b1=[0.8, 0.95],
    b2=[0.99, 0.999],
    weight_decay=0.1,
  )
  second = first.replace(
    schedule='warmup_cosine',
    learning_rate=[2e-3, 5e-3, 2e-2, 4e-2],
    b1=[0.85, 0.9],
    b2=[0.98, 0.995],
    weight_decay=0.0,
    seed=[3, 5],
    divergence_threshold=1e3,
  )
  third = second.replace(schedule='onecycle', learning_rate=[4e-3, 6e-3, 8e-3])
  for k, cfg in enumerate((first, second, third)):
    with CompileCounter() as compiles:
      result = sweep.run(cfg, progress=False)
    if k:
      assert compiles.count == 0, f'sweep {k + 1} changed only values but compiled {compiles.names}'
    check_grid(
      result.table,
      optimizer=cfg.optimizer,
      batch_size=cfg.batch_size,
      learning_rate=cfg.learning_rate,
      b1=cfg.b1,
      b2=cfg.b2,
      seed=cfg.seed,
    )
    assert (result.table.weight_decay == cfg.weight_decay).all()
    assert (result.table.status == 'ok').all()
    assert_matches_reference(
      result, result.table.index, data=REGRESSION, loss='mse', shuffle=False, total=BASE_TOTAL
    )


def test_momentum_axis_and_new_values_compile_nothing():
  """momentum of nesterov and rmsprop (where setting it adds a trace); then new values.

  Small learning rates and moderate momentum keep rmsprop well conditioned (see above).
  """
  first = sweep.SweepConfig(
    **BASE,
    optimizer=['nesterov', 'rmsprop'],
    schedule=['constant', 'linear'],
    learning_rate=[0.002, 0.005],
    momentum=[0.2, 0.5],
  )
  second = first.replace(
    schedule=['cosine', 'step'],
    learning_rate=[0.004, 0.001],
    momentum=[0.7, 0.4],
    seed=[4, 7],
    divergence_threshold=50.0,
  )
  for k, cfg in enumerate((first, second)):
    with CompileCounter() as compiles:
      result = sweep.run(cfg, progress=False)
    if k:
      assert compiles.count == 0, f'new values compiled {compiles.names}'
    assert (result.table.status == 'ok').all()
    assert_matches_reference(
      result, result.table.index, data=REGRESSION, loss='mse', shuffle=False, total=BASE_TOTAL
    )


def test_equal_builtin_models_reuse_programs():
  """`sweep.models.mlp()` called afresh for each sweep: equal models share programs."""

  def mlp_sweep(**values):
    return sweep.SweepConfig(
      model=sweep.models.mlp(hidden=(16,)),
      data=CLASSIFICATION,
      optimizer='momentum',
      batch_size=[25],
      epochs=1,
      shuffle=True,
      **values,
    )

  with CompileCounter() as compiles:
    a = sweep.run(mlp_sweep(learning_rate=[0.1, 0.2], momentum=[0.9], seed=[0]), progress=False)
  assert compiles.count > 0  # a structure no other test uses: the counter sees its compiles
  with CompileCounter() as compiles:
    b = sweep.run(
      mlp_sweep(learning_rate=[0.05, 0.15], momentum=[0.5], seed=[9], schedule='cosine'),
      progress=False,
    )
  assert compiles.count == 0, f'an equal model compiled {compiles.names}'
  assert (a.table.status == 'ok').all() and (b.table.status == 'ok').all()
  assert a.table.final_train_loss[0] != b.table.final_train_loss[0]
