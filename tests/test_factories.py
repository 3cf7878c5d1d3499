"""A researcher's own optimizer and schedule: every run equals a plain optax loop.

The reference builds the optax chain with the factory the sweep was given and feeds it the
schedule the sweep was given, evaluated at the run's own learning rate and number of updates
(concrete values, as a user of optax would write it); then a Python loop of single jitted
steps over the documented data order. It shares no code with the engine.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import COMPILE_EVENT

import sweep
from sweep.config import validate

RTOL, ATOL = 1e-4, 1e-5
MAX_UPDATES = 64
MAX_BATCH = 64
N_TRAIN, D_IN, HIDDEN, D_OUT = 200, 8, 16, 3


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


MODEL = (mlp_init, mlp_apply)


def _data():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(N_TRAIN, D_IN)).astype(np.float32)
  y = (
    np.tanh(x @ rng.normal(size=(D_IN, D_OUT))) + 0.1 * rng.normal(size=(N_TRAIN, D_OUT))
  ).astype(np.float32)
  return sweep.data.arrays(x, y)


DATA = _data()


# ------------------------------------------------ the researcher's optimizer and schedules ----


def clipped_adamw(learning_rate, weight_decay, clip_norm):
  """The standard transformer optimizer."""
  return optax.chain(
    optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, weight_decay=weight_decay)
  )


def nesterov_sgd(learning_rate):
  return optax.sgd(learning_rate, momentum=0.9, nesterov=True)


# The schedule, word for word (optax checks `peak_value == 0.0` in Python).
warmup_cosine = lambda lr, total: optax.warmup_cosine_decay_schedule(0.0, lr, total // 10, total)  # noqa: E731


def halving(lr, total):
  return optax.exponential_decay(
    lr, transition_steps=max(1, total // 3), decay_rate=0.5, staircase=True
  )


def warmup_linear(lr, total):
  """The built-in 'warmup_linear' as its documentation describes it, in optax."""
  warmup = round(0.1 * total)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, total - warmup)],
    [warmup],
  )


# ------------------------------------------------------------------------- the reference ----


@functools.cache
def lr_table(schedule, lr, total):
  fn = schedule(lr, total)
  return np.asarray([fn(c) if callable(fn) else fn for c in range(MAX_UPDATES)], np.float32)


@functools.partial(
  jax.jit, static_argnames=('make',), compiler_options={'xla_backend_optimization_level': 0}
)
def reference_step(params, opt_state, xb, yb, real, lrs, hp, *, make):
  opt = make(lambda count: lrs[count], **hp)

  def batch_loss(p):
    per_example = jnp.mean(jnp.square(mlp_apply(p, xb) - yb), axis=-1)
    return jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.sum(real)

  value, grads = jax.value_and_grad(batch_loss)(params)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


@functools.cache
def data_order(seed, epoch, n):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
  return np.asarray(jax.random.permutation(key, n))


def reference(make, hp, schedule, lr, batch_size, seed, total, threshold=None):
  """One run trained plainly: the final params and the updates applied."""
  hp = {k: np.float32(v) for k, v in hp.items()}
  lrs = lr_table(schedule, float(lr), int(total))
  params = jax.jit(mlp_init)(jax.random.fold_in(jax.random.key(int(seed)), 0))
  opt_state = make(lambda count: lrs[count], **hp).init(params)
  x, y = DATA.x_train, DATA.y_train
  per_epoch = N_TRAIN // batch_size
  real = np.arange(MAX_BATCH) < batch_size
  loss0, done = None, 0
  for t in range(total):
    epoch, j = divmod(t, per_epoch)
    idx = data_order(int(seed), epoch, N_TRAIN)[j * batch_size : (j + 1) * batch_size]
    padded = np.concatenate([idx, np.zeros(MAX_BATCH - batch_size, idx.dtype)])
    new_params, new_state, value = reference_step(
      params, opt_state, x[padded], y[padded], real, lrs, hp, make=make
    )
    if threshold is not None:
      value = float(value)
      loss0 = value if t == 0 else loss0
      if not (math.isfinite(value) and value <= threshold * abs(loss0) + 1e-6):
        break
    params, opt_state = new_params, new_state
    done += 1
  return jax.tree.map(np.asarray, params), done


def excess(got, want, rtol=RTOL):
  worst = -np.inf
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    worst = max(worst, float(np.max(np.abs(g - w) - (ATOL + rtol * np.abs(w)))))
  return worst


def assert_runs_match(
  result, rows, makers, schedules_by_label, hp_names, threshold=None, rtol=RTOL
):
  failures = []
  for i in rows:
    row = result.table.loc[i]
    total = 2 * (N_TRAIN // int(row.batch_size))
    hp = {k: float(row[k]) for k in hp_names.get(row.optimizer, ())}
    want, done = reference(
      makers[row.optimizer],
      hp,
      schedules_by_label[row.schedule],
      row.learning_rate,
      int(row.batch_size),
      int(row.seed),
      total,
      threshold,
    )
    assert row.updates == done, f'run {i}: {row.updates} updates, the reference {done}'
    worst = excess(result.params(i), want, rtol)
    if worst > 0:
      failures.append(
        f'run {i} ({row.optimizer}, {row.schedule}, lr={row.learning_rate}, '
        f'B={row.batch_size}): off by {worst:.3g}'
      )
  assert not failures, (
    f'{len(failures)} of {len(rows)} runs differ from their optax loop:\n'
    + '\n'.join(failures[:20])
  )


class CompileCounter:
  """Counts XLA compilations while entered (the caches are left as they are)."""

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


BASE = dict(model=MODEL, data=DATA, loss='mse', batch_size=[16, 48], epochs=2, shuffle=True)
SCHEDULE_LABELS = {
  'warmup_cosine_decay_schedule(0.0, lr, total // 10, total)': warmup_cosine,
  'halving': halving,
  'warmup_linear': warmup_linear,
}


# ----------------------------------------------------------------------------------- tests ----


def test_factory_and_schedule_callables_equal_an_optax_loop():
  """A clipped AdamW factory (weight_decay and clip_norm injected), two schedule callables
  and the built-in warmup_linear, 2 learning rates, 2 batch sizes and 2 seeds: 96 runs."""
  cfg = sweep.SweepConfig(
    **BASE,
    optimizer=clipped_adamw,
    weight_decay=[1e-4, 0.1],
    hyperparameters={'clip_norm': [0.05, 10.0]},
    learning_rate=[0.01, 0.03],
    schedule=[warmup_cosine, halving, 'warmup_linear'],
    seed=[0, 1],
  )
  result = sweep.run(cfg, progress=False)
  table = result.table
  assert len(table) == 96
  assert set(table.optimizer) == {'clipped_adamw'}
  assert set(table.schedule) == set(SCHEDULE_LABELS)
  assert set(table.clip_norm) == {0.05, 10.0}
  assert (table.status == 'ok').all()
  assert_runs_match(
    result,
    table.index,
    {'clipped_adamw': clipped_adamw},
    SCHEDULE_LABELS,
    {'clipped_adamw': ('weight_decay', 'clip_norm')},
  )
  # The comparison tells clip norms apart: the tight one does clip.
  a = table[(table.clip_norm == 0.05)].iloc[0]
  b = table[
    (table.clip_norm == 10.0)
    & (table.learning_rate == a.learning_rate)
    & (table.seed == a.seed)
    & (table.batch_size == a.batch_size)
    & (table.schedule == a.schedule)
    & (table.weight_decay == a.weight_decay)
  ].iloc[0]
  assert excess(result.params(int(a.run)), result.params(int(b.run))) > 0


def test_factories_and_names_in_one_list_are_compile_groups():
  lion = functools.partial(optax.lion, b1=0.95)
  cfg = sweep.SweepConfig(
    **{**BASE, 'batch_size': 16},
    optimizer=[nesterov_sgd, 'adam', lion],
    learning_rate=[1e-3, 1e-2],
    schedule=warmup_cosine,
    seed=[0, 1],
  )
  plan = validate(cfg)
  assert len(plan.groups) == 3
  result = sweep.run(cfg, progress=False)
  table = result.table
  assert list(dict.fromkeys(table.optimizer)) == ['nesterov_sgd', 'adam', 'lion(b1=0.95)']
  makers = {'nesterov_sgd': nesterov_sgd, 'adam': optax.adam, 'lion(b1=0.95)': lion}
  assert_runs_match(result, table.index, makers, SCHEDULE_LABELS, {})


def test_a_diverged_factory_run_stays_frozen():
  """add_decayed_weights after the scale moves parameters without a gradient or a learning
  rate: a run that diverged must still keep its parameters of the last good step."""

  def sgd_then_decay(learning_rate, weight_decay):
    return optax.chain(optax.sgd(learning_rate), optax.add_decayed_weights(weight_decay))

  cfg = sweep.SweepConfig(
    **BASE,
    optimizer=sgd_then_decay,
    weight_decay=[0.01],
    learning_rate=[0.01, 30.0],
    seed=[0, 1],
    schedule='constant',
    divergence_threshold=100.0,
  )
  result = sweep.run(cfg, progress=False)
  table = result.table
  huge = table.learning_rate == 30.0
  assert (table.status[huge] == 'diverged').all() and (table.status[~huge] == 'ok').all()
  assert (table.updates[huge] < 2 * (N_TRAIN // table.batch_size[huge])).all()
  constant = lambda lr, total: lr  # noqa: E731
  args = (
    {'sgd_then_decay': sgd_then_decay},
    {'constant': constant},
    {'sgd_then_decay': ('weight_decay',)},
  )
  assert_runs_match(result, table.index[~huge], *args)
  # The step that blew a run up amplifies float32 rounding; unfrozen, the decay would move the
  # parameters by 1 % per later update.
  assert_runs_match(result, table.index[huge], *args, threshold=100.0, rtol=1e-3)


def test_new_factory_and_schedule_values_compile_nothing():
  first = sweep.SweepConfig(
    **BASE,
    optimizer=clipped_adamw,
    weight_decay=[1e-4, 1e-2],
    hyperparameters={'clip_norm': [0.5, 1.0]},
    learning_rate=[1e-3, 3e-3],
    schedule=[warmup_cosine, 'cosine'],
    seed=[0, 1],
  )
  # New learning rates, weight decays, clip norms (through hyperparameters=), seeds, built-in
  # schedule: data only. Then 3 x 1 weight decays and clip norms instead of 2 x 2 (12 runs per
  # seed and batch size instead of 16: the run axis is padded to the same width).
  second = first.replace(
    weight_decay=[0.05, 0.2],
    hyperparameters={'clip_norm': [0.1, 2.0]},
    learning_rate=[2e-3, 5e-3],
    schedule=[warmup_cosine, 'onecycle'],
    seed=[3, 8],
    divergence_threshold=50.0,
  )
  third = second.replace(hyperparameters={'clip_norm': 0.3}, weight_decay=[0.01, 0.02, 0.03])
  results = []
  for k, cfg in enumerate((first, second, third)):
    with CompileCounter() as compiles:
      results.append(sweep.run(cfg, progress=False))
    if k == 0:
      assert compiles.names, 'the first sweep compiled nothing: the counter sees no compiles'
    else:
      assert compiles.names == [], (
        f'sweep {k + 1} changed only values but compiled {compiles.names}'
      )
  assert results[1].table.clip_norm.tolist() != results[0].table.clip_norm.tolist()
  assert set(results[2].table.clip_norm) == {0.3}
  # Another factory is another program: the counter would see a compile there.
  with CompileCounter() as compiles:
    sweep.run(
      first.replace(
        optimizer=lambda learning_rate, weight_decay, clip_norm: clipped_adamw(
          learning_rate, weight_decay, clip_norm
        )
      ),
      progress=False,
    )
  assert compiles.names


def test_labels_are_readable_and_distinct():
  a = lambda learning_rate: optax.sgd(learning_rate)  # noqa: E731
  b = lambda learning_rate: optax.sgd(learning_rate)  # noqa: E731
  cfg = sweep.SweepConfig(
    model=MODEL,
    data=DATA,
    loss='mse',
    optimizer=[a, b, nesterov_sgd, functools.partial(optax.adamw, b1=0.8)],
    schedule=[warmup_cosine, 'cosine'],
  )
  plan = validate(cfg)
  assert plan.axes['optimizer'] == [
    'sgd(learning_rate)',
    'sgd(learning_rate) #2',
    'nesterov_sgd',
    'adamw(b1=0.8)',
  ]
  assert plan.axes['schedule'] == [
    'warmup_cosine_decay_schedule(0.0, lr, total // 10, total)',
    'cosine',
  ]


@pytest.mark.parametrize(
  'transformation',
  [
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    optax.adam(1e-3),
  ],
)
def test_a_ready_made_transformation_is_refused_with_the_factory_to_write(transformation):
  for optimizer in (transformation, [transformation]):
    with pytest.raises(sweep.ConfigError) as info:
      validate(sweep.SweepConfig(model=MODEL, data=DATA, optimizer=optimizer))
    message = str(info.value)
    assert message.startswith('optimizer=<an optax.GradientTransformation> is invalid')
    assert 'lambda learning_rate: optax.chain(' in message
    assert 'init_fn' not in message
