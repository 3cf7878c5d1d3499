"""Runs that grow their batch size: each equals a plain loop that changes its batch size
at the same epochs, new values compile nothing, and a resume mid-ramp is exact.

The reference shares no code with the engine: optax's optimizer and schedule built
directly, the documented init key and data order of each seed (epoch e of seed s,
batches of B consecutive examples of it, the remainder of an epoch dropped), and a
Python loop of jitted optax steps whose batch size follows the documented stages.
"""

import functools
import math
from html import escape as html_escape
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from compiles import COMPILE_EVENT

import sweep
from sweep import population

N_TRAIN, N_VAL, D_IN, HIDDEN, CLASSES = 200, 64, 8, 16, 3
ATOL, RTOL = 2e-5, 1e-4
EPOCHS = 4


def init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.normal(k1, (HIDDEN, D_IN)) / math.sqrt(D_IN),
    'b1': jnp.zeros(HIDDEN),
    'w2': jax.random.normal(k2, (CLASSES, HIDDEN)) / math.sqrt(HIDDEN),
  }


def apply(params, x):
  # Weights stored (outputs, inputs), the layout the engine's run axis wants.
  return jnp.tanh(x @ params['w1'].T + params['b1']) @ params['w2'].T


MODEL = (init, apply)


def _data():
  rng = np.random.default_rng(11)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(D_IN, CLASSES)) + 0.7 * rng.normal(size=(len(x), CLASSES)), 1)
  return sweep.data.arrays(
    x[:N_TRAIN], y[:N_TRAIN].astype(np.int32), x[N_TRAIN:], y[N_TRAIN:].astype(np.int32)
  )


DATA = _data()
RAMP = sweep.batch_ramp(16, factor=2, at=(0.5, 0.75))  # 16 for epochs 0-1, 32 for 2, 64 for 3


def config(**changes):
  base = dict(
    model=MODEL,
    data=DATA,
    optimizer='adam',
    schedule='cosine',
    learning_rate=[3e-3, 1e-2],
    batch_size=[16, RAMP, sweep.batch_schedule([(0.0, 16), (0.25, 64)])],
    seed=[0, 1],
    epochs=EPOCHS,
  )
  return sweep.SweepConfig(**{**base, **changes})


# ------------------------------------------------------------------ the reference ----


@functools.cache
def order(seed, epoch):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
  return np.asarray(jax.random.permutation(key, N_TRAIN))


def loss_fn(params, x, y):
  logits = apply(params, x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def warmup_cosine(lr, total):
  """A schedule callable, as researchers write them."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, total // 8, total)


def reference(*, optimizer, schedule, learning_rate, seed, sizes):
  """One run trained plainly: `sizes[e]` is its batch size in epoch e. Returns its final
  parameters, its updates and its examples."""
  total = sum(N_TRAIN // b for b in sizes)
  lr = {
    'constant': optax.constant_schedule(learning_rate),
    'cosine': optax.cosine_decay_schedule(learning_rate, decay_steps=total),
    'warmup_cosine_callable': warmup_cosine(learning_rate, total),
  }[schedule]
  opt = {'adam': optax.adam(lr), 'momentum': optax.sgd(lr, momentum=0.9)}[optimizer]
  params = jax.jit(init)(jax.random.fold_in(jax.random.key(seed), 0))
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  updates = examples = 0
  for epoch, b in enumerate(sizes):
    perm = order(seed, epoch)
    for j in range(N_TRAIN // b):
      idx = perm[j * b : (j + 1) * b]
      params, state = step(params, state, DATA.x_train[idx], DATA.y_train[idx])
      updates, examples = updates + 1, examples + b
  return params, updates, examples


SPECS = {
  s.label: s
  for s in [
    RAMP,
    sweep.batch_schedule([(0.0, 16), (0.25, 64)]),
    sweep.batch_ramp(16, factor=2, at=(0.25, 0.5)),
    sweep.batch_schedule([(0.0, 16), (0.75, 64)]),
  ]
}


def epoch_sizes(row):
  """Each epoch's batch size, from the table's columns as documented."""
  if row.batch_schedule == 'constant':
    return [int(row.batch_size)] * EPOCHS
  spec = SPECS[row.batch_schedule]
  sizes = []
  for e in range(EPOCHS):
    sizes.append([b for f, b in spec.stages if math.floor(f * EPOCHS + 0.5) <= e][-1])
  return sizes


def assert_equal_to_reference(result, rows=None):
  table = result.table
  failures = []
  for i in table.index if rows is None else rows:
    row = table.loc[i]
    want, updates, examples = reference(
      optimizer=row.optimizer,
      schedule=row.schedule,
      learning_rate=float(row.learning_rate),
      seed=int(row.seed),
      sizes=epoch_sizes(row),
    )
    assert row.updates == updates and row.examples == examples, (i, row.updates, updates)
    for g, w in zip(jax.tree.leaves(result.params(i)), jax.tree.leaves(want), strict=True):
      if not np.allclose(g, w, rtol=RTOL, atol=ATOL):
        failures.append(f'run {i} ({row.batch_schedule}): off by {np.max(np.abs(g - w)):.3g}')
  assert not failures, failures


# ------------------------------------------------------------------ tests ----


@pytest.fixture(scope='module')
def ramped():
  return sweep.run(config(), progress=False)


def test_every_ramp_run_equals_a_plain_loop_that_changes_batch_size_at_the_same_epochs(ramped):
  table = ramped.table
  assert list(table.batch_schedule.unique()) == ['constant', '16>32>64 @0.5,0.75', '16>64 @0.25']
  assert (table.batch_size == 16).all()  # the batch size each run starts at
  # 200 examples: 12 updates an epoch at 16, 6 at 32, 3 at 64.
  ramp = table[table.batch_schedule == RAMP.label]
  assert (ramp.updates == 12 + 12 + 6 + 3).all()
  assert (table.status == 'ok').all()
  assert_equal_to_reference(ramped)


def test_the_curves_count_examples_epochs_and_the_batch_size_of_each_point(ramped):
  c = ramped.curves
  run = int(ramped.table.index[ramped.table.batch_schedule == RAMP.label][0])
  points = c[c.run == run].sort_values('eval')
  assert list(points.updates) == [0, 12, 24, 30, 33]
  assert list(points.batch_size) == [16, 16, 16, 32, 64]
  assert list(points.examples) == [0, 192, 384, 576, 768]
  assert np.allclose(points.epoch, [0, 0.96, 1.92, 2.88, 3.84])
  # The learning rate is the cosine schedule at the run's own update count (33 updates).
  lr = float(ramped.table.loc[run, 'learning_rate'])
  want = optax.cosine_decay_schedule(lr, 33)
  assert np.allclose(points.learning_rate.iloc[1:], [want(u - 1) for u in [12, 24, 30, 33]])


def test_new_learning_rates_and_new_ramps_over_the_same_batch_sizes_compile_nothing(ramped):
  # `ramped` compiled the programs of batch sizes 16, 32 and 64 in this process.
  other = config(
    learning_rate=[5e-3, 2e-2],
    batch_size=[
      16,
      sweep.batch_ramp(16, factor=2, at=(0.25, 0.5)),
      sweep.batch_schedule([(0.0, 16), (0.75, 64)]),
    ],
  )
  compiled = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if event == COMPILE_EVENT:
      compiled.append(kwargs.get('fun_name', '?'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    result = sweep.run(other, progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled == [], compiled
  assert_equal_to_reference(result)


def test_a_resume_in_the_middle_of_a_ramp_gives_the_uninterrupted_result(
  tmp_path, monkeypatch, ramped
):
  calls = {'n': 0}
  advance = population.Population.advance

  def interrupted(self):
    calls['n'] += 1
    if calls['n'] == 3:  # after the first moves, before the second stage of the ramp ends
      raise KeyboardInterrupt
    return advance(self)

  monkeypatch.setattr(population.Population, 'advance', interrupted)
  with pytest.raises(KeyboardInterrupt):
    sweep.run(config(), str(tmp_path), progress=False, checkpoint_every=1)
  monkeypatch.setattr(population.Population, 'advance', advance)
  got = sweep.run(config(), str(tmp_path), progress=False)
  cols = [c for c in ramped.table.columns if c != 'seconds']
  pd.testing.assert_frame_equal(got.table[cols], ramped.table[cols])
  pd.testing.assert_frame_equal(got.curves, ramped.curves)
  for i in ramped.table.index:
    for g, w in zip(jax.tree.leaves(got.params(i)), jax.tree.leaves(ramped.params(i)), strict=True):
      assert np.array_equal(g, w)
  loaded = sweep.load(str(tmp_path))
  assert list(loaded.table.batch_schedule) == list(ramped.table.batch_schedule)


# ------------------------------------------------------------------ errors ----


@pytest.mark.parametrize(
  'make, field, says',
  [
    (lambda: sweep.batch_ramp(0), r'batch_ramp\(start\)', 'positive integer'),
    (lambda: sweep.batch_ramp(16, factor=1), r'batch_ramp\(factor\)', 'other than 1'),
    (lambda: sweep.batch_ramp(15, factor=1.5), r'batch_ramp\(factor\)', '22.5'),
    (lambda: sweep.batch_ramp(16, at=(1.2,)), r'batch_ramp\(at\)', r'\(0, 1\)'),
    (lambda: sweep.batch_schedule([(0.5, 16), (0.7, 32)]), r'batch_schedule\[0\]', 'fraction 0'),
    (lambda: sweep.batch_schedule([(0.0, 16), (0.5, 16)]), r'batch_schedule\[1\]', 'change'),
    (lambda: sweep.batch_schedule([(0.0, 16), (0.6, 32), (0.5, 64)]), 'batch_schedule', 'increase'),
    (lambda: sweep.batch_schedule([(0.0, 16)]), 'batch_schedule', 'constant batch size'),
  ],
)
def test_a_bad_batch_schedule_is_refused_naming_the_argument(make, field, says):
  with pytest.raises(sweep.ConfigError, match=field) as e:
    make()
  assert e.match(says)


@pytest.mark.parametrize(
  'changes, field, says',
  [
    (dict(epochs=2.5), 'batch_size', 'whole number'),
    (dict(epochs=None, updates=40), 'batch_size', 'epochs='),
    (dict(epochs=1), 'batch_size', r'at epochs \[0, 1, 1\] of 1'),
    (dict(batch_size=[sweep.batch_ramp(128, at=(0.5,))]), 'batch_size', 'larger than the training'),
    (dict(num_evals=3), 'num_evals', 'evaluation point'),
    (dict(scheduler=sweep.schedulers.PBT(interval_updates=4)), 'batch_size', 'PBT'),
  ],
)
def test_a_batch_schedule_the_sweep_cannot_honour_is_refused_before_training(changes, field, says):
  with pytest.raises(sweep.ConfigError, match=field) as e:
    sweep.check(config(**changes))
  assert e.match(says)


def test_a_schedule_callable_is_built_with_the_ramp_runs_own_number_of_updates():
  cfg = config(
    schedule=warmup_cosine,
    optimizer='momentum',
    learning_rate=[0.05],
    batch_size=[16, RAMP],
    seed=[3],
  )
  result = sweep.run(cfg, progress=False)
  table = result.table.copy()
  table['schedule'] = 'warmup_cosine_callable'
  assert list(result.table.updates) == [48, 33]
  assert_equal_to_reference(SimpleNamespace(table=table, params=result.params))


# ------------------------------------------------------------------ analyses and report ----


def test_strategies_compare_at_their_best_learning_rates_and_ramps_leave_batch_analyses():
  # A table built by hand: two learning rates per strategy, two seeds each.
  rows = []
  for sched, b, lr, loss, updates in [
    ('constant', 16, 0.1, 0.50, 48),
    ('constant', 16, 0.2, 0.40, 48),
    ('constant', 64, 0.1, 0.90, 12),
    ('constant', 64, 0.2, 0.70, 12),
    ('16>64 @0.5', 16, 0.1, 0.45, 30),
    ('16>64 @0.5', 16, 0.2, 0.60, 30),
  ]:
    for seed, noise in ((0, -0.01), (1, 0.01)):
      rows.append(
        dict(
          run=len(rows),
          learning_rate=lr,
          batch_size=b,
          batch_schedule=sched,
          seed=seed,
          status='ok',
          final_val_loss=loss + noise,
          updates=updates,
          examples=updates * 16,
          seconds=1.0,
        )
      )
  table = pd.DataFrame(rows)
  result = SimpleNamespace(table=table, curves=pd.DataFrame(), config={})
  got = sweep.analysis.batch_schedule_table(result)
  assert list(got.index) == ['batch 16', '16>64 @0.5', 'batch 64']
  assert list(got.learning_rate) == [0.2, 0.1, 0.2]
  assert np.allclose(got.final_val_loss, [0.40, 0.45, 0.70])
  assert list(got.updates) == [48, 30, 12]
  assert [tuple(r) for r in got.runs] == [(2, 3), (8, 9), (6, 7)]
  # The ramp's rows (which start at 16) do not enter batch size 16's best.
  per_batch = sweep.analysis.batch_size_table(result, 'final_val_loss')
  assert list(per_batch.index) == [16, 64]
  assert np.allclose(per_batch.final_val_loss, [0.40, 0.70])
  assert per_batch.loc[16, 'runs'] == (2, 3)


def test_the_report_compares_the_strategies_from_the_workdir_alone(tmp_path):
  from sweep import report

  cfg = config(learning_rate=[1e-2], seed=[0], batch_size=[16, 64, RAMP], epochs=EPOCHS)
  sweep.run(cfg, str(tmp_path), progress=False)
  html = open(report.write_report(str(tmp_path))).read()
  assert 'Batch-size schedules' in html and html_escape(RAMP.label) in html
  assert (tmp_path / 'report' / 'batch_schedules.png').exists()
  loaded = sweep.load(str(tmp_path))
  assert list(loaded.table.batch_schedule) == ['constant', 'constant', RAMP.label]
  assert list(loaded.curves[loaded.curves.run == 2].batch_size) == [16, 16, 16, 32, 64]


def test_the_experiment_after_smith_et_al_is_a_valid_sweep():
  import importlib.util
  from pathlib import Path

  path = Path(__file__).parent.parent / 'experiments' / 'increase_batch_size.py'
  spec = importlib.util.spec_from_file_location('increase_batch_size', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  plan = sweep.check(module.get_config())
  by_schedule = {r.values['batch_schedule']: r.total_updates for r in plan.runs}
  assert by_schedule == {'constant': 3750, '32>160>800 @0.333,0.667': 1550, '32>160 @0.333': 1750}


# ------------------------------------------------------------------ dropout, batch statistics ----


def test_a_flax_model_with_dropout_and_batchnorm_ramps_as_its_loop_with_the_documented_keys():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(16, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
      return nn.Dense(CLASSES)(x)

  module = Net()
  ramp = sweep.batch_schedule([(0.0, 16), (0.5, 32)])
  cfg = config(
    model=module, learning_rate=[1e-2], batch_size=[ramp], seed=[4], epochs=2, schedule='constant'
  )
  result = sweep.run(cfg, progress=False)

  # The loop: epoch 0 at batch 16, epoch 1 at batch 32; the dropout key of a step is the
  # key of its batch group's step at that place of the data order (e * (n // B) + j).
  variables = module.init(jax.random.fold_in(jax.random.key(4), 0), DATA.x_train[:1], train=False)
  params, stats = variables['params'], variables['batch_stats']
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, stats, state, x, y, key):
    def loss(p):
      logits, new = module.apply(
        {'params': p, 'batch_stats': stats},
        x,
        train=True,
        rngs={'dropout': key},
        mutable=['batch_stats'],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']

    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), stats, state

  for epoch, b in enumerate([16, 32]):
    perm = order(4, epoch)
    for j in range(N_TRAIN // b):
      idx = perm[j * b : (j + 1) * b]
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(4), 2), epoch * (N_TRAIN // b) + j)
      params, stats, state = step(params, stats, state, DATA.x_train[idx], DATA.y_train[idx], key)
  got = result.variables(0)
  for g, w in zip(
    jax.tree.leaves(got), jax.tree.leaves({'params': params, 'batch_stats': stats}), strict=True
  ):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)
  assert int(result.table.updates[0]) == 12 + 6


def test_sweep_run_from_the_command_line_with_a_ramp_set_there(tmp_path, monkeypatch, capsys):
  from sweep import cli

  experiment = tmp_path / 'exp.py'
  experiment.write_text(
    'import sweep\n\n\n'
    'def get_config():\n'
    '  return sweep.SweepConfig(model=sweep.models.mlp(hidden=(8,)), data=sweep.data.digits(),\n'
    "    optimizer='momentum', learning_rate=[0.05], epochs=2)\n"
  )
  monkeypatch.setenv('SWEEP_NO_CACHE', '1')
  argv = ['run', str(experiment), '--workdir', str(tmp_path / 'w'), '--set']
  argv.append('batch_size=[32, batch_ramp(32, factor=4, at=(1/2,))]')
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert 'Batch-size strategies, each at its best learning rate (final_val_loss):' in out
  lines = [line for line in out.splitlines() if line.startswith('  ') and 'updates' in line]
  assert any(
    line.startswith('  32>128 @0.5, lr 0.05: ') and 'in 55 updates' in line for line in lines
  )
  assert any(line.startswith('  batch 32, lr 0.05: ') and 'in 88 updates' in line for line in lines)
  assert all(len(line) <= 100 for line in lines)
  loaded = sweep.load(str(tmp_path / 'w'))
  assert list(loaded.table.batch_schedule) == ['constant', '32>128 @0.5']


def test_a_ramp_runs_seconds_alone_add_its_stages_measured_costs(tmp_path):
  cfg = config(learning_rate=[1e-2], seed=[0], batch_size=[16, 64, RAMP])
  result = sweep.run(cfg, str(tmp_path), progress=False, time_runs=True)
  timings = {t['batch_size']: t for t in result.config['run_seconds']['timings']}
  assert set(timings) == {16, 32, 64}  # 32 only the ramp trains at: timed there
  table = result.table.set_index('batch_schedule', drop=False)
  evals = EPOCHS + 1

  def alone(parts):
    return sum(timings[b]['update_seconds'] * n for b, n in parts) + (
      timings[16]['eval_seconds'] * evals
    )

  assert np.isclose(table.loc[RAMP.label, 'seconds'], alone([(16, 24), (32, 6), (64, 3)]))
  constant = table[table.batch_schedule == 'constant'].set_index('batch_size')
  assert np.isclose(constant.loc[16, 'seconds'], alone([(16, 48)]))
  assert np.isclose(constant.loc[64, 'seconds'], alone([(64, 12)]))
  # Written to config.json, so that a report from the workdir reads the same seconds.
  assert sweep.load(str(tmp_path)).table.seconds.tolist() == result.table.seconds.tolist()
