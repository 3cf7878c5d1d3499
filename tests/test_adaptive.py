"""Adaptive search: rules decide as brute force on recorded curves does, and every run,
stopped, refilled, compacted or copied, equals its plain optax loop.

The references share no code with the engine: a Python loop of jitted optax steps
reading each seed's documented data order, and the rules recomputed by brute force from
the curves of the same sweep run as a plain grid.
"""

import functools
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from compiles import counting_compiles

import sweep
from sweep import population, report

N_TRAIN, N_VAL, D_IN, HIDDEN, CLASSES = 192, 64, 8, 16, 3
ATOL, RTOL = 2e-5, 1e-4


def init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.normal(k1, (D_IN, HIDDEN)) / math.sqrt(D_IN),
    'b1': jnp.zeros(HIDDEN),
    'w2': jax.random.normal(k2, (HIDDEN, CLASSES)) / math.sqrt(HIDDEN),
  }


def apply(params, x):
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2']


MODEL = (init, apply)


def _data():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(D_IN, CLASSES)) + 0.7 * rng.normal(size=(len(x), CLASSES)), 1)
  y = y.astype(np.int32)
  return sweep.data.arrays(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


DATA = _data()
LRS = [float(v) for v in np.geomspace(3e-4, 3.0, 9)]


def config(**changes):
  base = dict(
    model=MODEL,
    data=DATA,
    optimizer='adam',
    learning_rate=LRS,
    batch_size=[16, 32],
    epochs=3,
  )
  return sweep.SweepConfig(**{**base, **changes})


# ------------------------------------------------------------------ the reference ----


@functools.partial(jax.jit, static_argnames=())
def _step(params, state, xb, yb, lr):
  def loss(p):
    logits = apply(p, xb)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  grads = jax.grad(loss)(params)
  direction, state = optax.scale_by_adam().update(grads, state, params)
  return optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, direction)), state


@functools.cache
def _order(seed, epoch):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
  return np.asarray(jax.random.permutation(key, N_TRAIN))


class Member:
  """One run trained plainly: Adam at a constant learning rate, the documented data order."""

  def __init__(self, seed, batch):
    self.params = jax.jit(init)(jax.random.fold_in(jax.random.key(seed), 0))
    self.state = optax.scale_by_adam().init(self.params)
    self.seed, self.batch, self.updates = seed, batch, 0

  def train(self, lr, n):
    per_epoch = N_TRAIN // self.batch
    for _ in range(n):
      epoch, j = divmod(self.updates, per_epoch)
      idx = _order(self.seed, epoch)[j * self.batch : (j + 1) * self.batch]
      self.params, self.state = _step(
        self.params, self.state, DATA.x_train[idx], DATA.y_train[idx], np.float32(lr)
      )
      self.updates += 1
    return self


def assert_close(got, want, what):
  # Float32 rounding differs with the order of a product's sums (the engine holds the
  # weights transposed): an element's error scales with its leaf's largest values (weights
  # of 10 at learning rates up to 3), not with the element itself.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    w = np.asarray(w)
    atol = max(ATOL, RTOL * float(np.max(np.abs(w))))
    np.testing.assert_allclose(np.asarray(g), w, rtol=RTOL, atol=atol, err_msg=what)


# ------------------------------------------------------------------ brute force ----


def values_at(curves, metric='val_loss'):
  """run -> its metric at each evaluation point it reached (not finite: +inf)."""
  out = {}
  for run, rows in curves.sort_values(['run', 'eval']).groupby('run'):
    v = rows[metric].to_numpy(np.float64)
    alive = rows['alive'].to_numpy(bool)
    out[int(run)] = np.where(np.isfinite(v) & alive, v, np.inf)
  return out


def brute_halving(curves, num_evals, eta=3, fractions=(1 / 9, 1 / 3)):
  """Synchronous successive halving on a grid's curves: run -> the point it ends at."""
  values = values_at(curves)
  alive = sorted(values)
  ends = {}
  for f in fractions:
    p = round(f * num_evals)
    keep = max(1, math.floor(len(alive) / eta))
    ranked = sorted(alive, key=lambda i: (values[i][p], i))
    for i in ranked[keep:]:
      ends[i] = p
    alive = ranked[:keep]
  ends.update({i: num_evals for i in alive})
  return ends


def assert_curves_are_the_grids(result, grid):
  """Each run's curve is the plain grid's, up to the point it ended at."""
  for i, rows in result.curves.groupby('run'):
    want = grid.curves[grid.curves.run == i].iloc[: len(rows)]
    for col in ('val_loss', 'train_loss', 'updates', 'learning_rate'):
      np.testing.assert_allclose(
        rows[col].to_numpy(np.float64), want[col].to_numpy(np.float64), rtol=1e-5, atol=1e-6
      )


# ------------------------------------------------------------------ successive halving ----


@pytest.fixture(scope='module')
def grid():
  return sweep.run(config(num_evals=9), progress=False)


def test_successive_halving_stops_the_runs_brute_force_stops_on_the_grids_curves(grid):
  halving = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9)
  result = sweep.run(config(scheduler=halving), progress=False)
  assert result.config['num_evals'] == 9
  ends = brute_halving(grid.curves, 9)
  for i, row in result.table.iterrows():
    reached = int(result.curves[result.curves.run == i]['eval'].max())
    assert reached == ends[i], f'run {i} ended at point {reached}, brute force says {ends[i]}'
    assert row.status == ('ok' if ends[i] == 9 else 'stopped')
    assert row.rung == {1: 0, 3: 1, 9: 2}[ends[i]]
    if row.status == 'stopped':
      assert row.stopped_at_updates == row.updates
  assert (result.table.status == 'ok').sum() == 2  # 18 -> 6 -> 2
  assert_curves_are_the_grids(result, grid)


def test_every_run_of_asynchronous_halving_with_refilled_slots_equals_its_plain_loop():
  halving = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9, slots=5)
  result = sweep.run(config(scheduler=halving, seed=[0, 1], batch_size=[16]), progress=False)
  table = result.table
  assert len(table) == 18 and set(table.status) <= {'ok', 'stopped', 'diverged'}
  assert (table.status == 'ok').sum() >= 1 and (table.status == 'stopped').sum() >= 9
  # Never more than 5 runs trained at once: the run-updates are those of refilled slots.
  assert result.config['scheduler']['slots'] == 5
  for i, row in table.iterrows():
    member = Member(int(row.seed), int(row.batch_size)).train(row.learning_rate, int(row.updates))
    assert_close(result.params(i), member.params, f'run {i} ({row.status}, {row.updates} updates)')


def test_a_second_adaptive_sweep_with_other_values_compiles_nothing():
  halving = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9, slots=6)
  other = [lr * 1.3 for lr in LRS]
  with counting_compiles() as names:
    sweep.run(config(scheduler=halving, batch_size=[16]), progress=False)
    first = len(names)
    # Other values: other runs stop and refill other slots, with the same widths.
    sweep.run(config(scheduler=halving, batch_size=[16], learning_rate=other), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'


# ------------------------------------------------------------------ median, patience ----


def test_median_stopping_and_patience_stop_as_brute_force_does_and_change_no_run(grid):
  rule = sweep.schedulers.MedianStopping(grace=2, min_runs=4)
  result = sweep.run(config(num_evals=9, scheduler=rule), progress=False)
  values = values_at(grid.curves)
  alive, ends = set(values), {}
  for p in range(3, 9):
    averages = {i: float(np.mean(values[i][1 : p + 1])) for i in alive}
    stop = set()
    for i in alive:
      others = [averages[j] for j in alive if j != i]
      if len(others) >= 4 and min(values[i][1 : p + 1]) > np.median(others):
        stop.add(i)
    ends.update({i: p for i in stop})
    alive -= stop
  ends.update({i: 9 for i in alive})
  reached = result.curves.groupby('run')['eval'].max().to_dict()
  assert reached == ends
  assert_curves_are_the_grids(result, grid)

  patience = sweep.schedulers.Patience(patience=2)
  result = sweep.run(config(num_evals=9, scheduler=patience), progress=False)
  for i, v in values.items():
    end = next((p for p in range(3, 9) if not min(v[p - 1 : p + 1]) < min(v[: p - 1])), 9)
    assert result.curves[result.curves.run == i]['eval'].max() == end, f'run {i}'
  assert_curves_are_the_grids(result, grid)


# ------------------------------------------------------------------ PBT ----


def test_pbt_exploit_copies_every_state_bit_for_bit_and_writes_the_hyperparameters():
  rng = np.random.default_rng(0)
  runs = sweep.population.train.RunState(
    params={'w': rng.normal(size=(2, 4, 3)).astype(np.float32)},
    model_state={},
    opt_state=optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.1).init(
      {'w': np.zeros(3, np.float32)}
    ),
    alive=rng.random((2, 4)) > 0.5,
    updates=rng.integers(9, size=(2, 4)).astype(np.int32),
    loss0=rng.random((2, 4)).astype(np.float32),
    loss_sum=rng.random((2, 4)).astype(np.float32),
    loss_count=np.ones((2, 4), np.int32),
    gsq_half=np.zeros((2, 4), np.float32),
    gsq_full=np.zeros((2, 4), np.float32),
  )
  runs = runs._replace(
    opt_state=jax.tree.map(
      lambda a: np.broadcast_to(a, (2, 4) + np.shape(a)).copy(), runs.opt_state
    )
  )
  runs = runs._replace(
    opt_state=jax.tree.map(
      lambda a: (
        (a + rng.normal(size=a.shape)).astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else a
      ),
      runs.opt_state,
    )
  )
  groups = (sweep.population.train.GroupState(runs=runs, step=np.int32(3)),)
  before = jax.tree.map(np.array, groups)
  rows = np.array([[0, 0, 1, 0], [1, 0, 1, 1]], np.int32)  # (0, 2) <- (1, 0); (1, 1) <- (0, 1)
  cols = np.array([[0, 1, 0, 3], [0, 1, 2, 3]], np.int32)
  wd = np.full((2, 4), 0.1, np.float32)
  wd[0, 2], wd[1, 1] = 0.25, 0.08
  (after,) = population._exploit(jax.device_put(groups), rows, cols, {'weight_decay': wd})
  for (s, r), (ss, sr) in {(0, 2): (1, 0), (1, 1): (0, 1), (0, 0): (0, 0), (1, 3): (1, 3)}.items():
    got = jax.tree.map(lambda a, s=s, r=r: np.asarray(a)[s, r], after.runs)
    want = jax.tree.map(lambda a, s=ss, r=sr: np.asarray(a)[s, r], before[0].runs)
    got_hp = dict(got.opt_state.hyperparams)
    want_hp = dict(want.opt_state.hyperparams)
    assert got_hp.pop('weight_decay') == wd[s, r]
    want_hp.pop('weight_decay')
    got = got._replace(opt_state=got.opt_state._replace(hyperparams=got_hp))
    want = want._replace(opt_state=want.opt_state._replace(hyperparams=want_hp))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert np.array_equal(g, w), f'slot {(s, r)} is not a bit-for-bit copy of {(ss, sr)}'


def _pbt_config(**changes):
  pbt = sweep.schedulers.PBT(interval_updates=4, quantile=0.25, perturb=(0.8, 1.25), seed=3)
  base = dict(
    learning_rate=[float(v) for v in np.geomspace(1e-3, 0.3, 8)],
    batch_size=[16],
    epochs=2,
    scheduler=pbt,
  )
  return config(**{**base, **changes})


def test_pbt_members_equal_plain_loops_that_copy_and_perturb_as_the_lineage_says():
  result = sweep.run(_pbt_config(), progress=False)
  table, curves = result.table, result.curves
  num_evals = result.config['num_evals']
  assert num_evals == 6  # 24 updates at batch 16, every 4
  lr = {
    i: rows.sort_values('eval')['learning_rate'].to_numpy() for i, rows in curves.groupby('run')
  }
  loss = values_at(curves)
  copies = {}
  for i, row in table.iterrows():
    for part in str(row.lineage).split() if isinstance(row.lineage, str) else []:
      p, src = map(int, part.split(':'))
      copies.setdefault(p, []).append((i, src))
  assert copies, 'PBT never exploited'
  members = [Member(0, 16) for _ in range(len(table))]
  rate = {i: float(table.learning_rate[i]) for i in table.index}
  for p in range(1, num_evals + 1):
    for i, m in enumerate(members):
      m.train(rate[i], 4)
      assert abs(lr[i][p] - rate[i]) <= 1e-6 * rate[i], (
        f'run {i} at {p}: lr {lr[i][p]} not {rate[i]}'
      )
    # The decision: the bottom quarter by val_loss copies from the top quarter.
    ranked = sorted(loss, key=lambda i: (loss[i][p], i))
    pairs = copies.get(p, [])
    if p < num_evals:
      assert sorted(t for t, _ in pairs) == sorted(ranked[-2:]), f'targets at {p}'
      assert all(src in ranked[:2] for _, src in pairs), f'sources at {p}'
    snapshot = {j: (members[j].params, members[j].state) for j in range(len(members))}
    for target, src in pairs:
      members[target].params, members[target].state = snapshot[src]
      new = lr[target][p + 1]
      assert any(abs(new - rate[src] * f) <= 1e-5 * new for f in (0.8, 1.25)), 'perturbed'
      rate[target] = new
  for i in table.index:
    assert_close(result.params(i), members[i].params, f'member {i}')
    assert abs(table['final_learning_rate'][i] - rate[i]) <= 1e-6 * rate[i]


def test_pbt_with_other_values_compiles_nothing_after_the_first():
  with counting_compiles() as names:
    sweep.run(_pbt_config(), progress=False)
    first = len(names)
    sweep.run(_pbt_config(seed=1), progress=False)  # other draws, other copies
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'


# ------------------------------------------------------------------ resume ----


@pytest.mark.parametrize(
  'scheduler',
  [
    sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9, slots=7),
    sweep.schedulers.PBT(interval_updates=4, seed=1),
  ],
  ids=['asha', 'pbt'],
)
def test_a_resume_in_the_middle_of_a_rung_or_interval_gives_the_uninterrupted_result(
  tmp_path, monkeypatch, scheduler
):
  cfg = config(scheduler=scheduler, batch_size=[16, 32], epochs=2)
  want = sweep.run(cfg, progress=False)
  calls = {'n': 0}
  advance = population.Population.advance

  def interrupted(self):
    calls['n'] += 1
    if calls['n'] == 4:
      raise KeyboardInterrupt
    return advance(self)

  monkeypatch.setattr(population.Population, 'advance', interrupted)
  with pytest.raises(KeyboardInterrupt):
    sweep.run(cfg, str(tmp_path), progress=False)
  monkeypatch.setattr(population.Population, 'advance', advance)
  got = sweep.run(cfg, str(tmp_path), progress=False)
  cols = [c for c in want.table.columns if c != 'seconds']
  pd.testing.assert_frame_equal(got.table[cols], want.table[cols])
  pd.testing.assert_frame_equal(got.curves, want.curves)
  for i in want.table.index:
    for g, w in zip(jax.tree.leaves(got.params(i)), jax.tree.leaves(want.params(i)), strict=True):
      assert np.array_equal(g, w)
  loaded = sweep.load(str(tmp_path))
  assert list(loaded.table.status) == list(want.table.status)
  # The report draws the search from the workdir alone.
  html = open(report.write_report(str(tmp_path))).read()
  assert 'Adaptive search' in html and (tmp_path / 'report' / 'search.png').exists()
  shutil.rmtree(tmp_path)


# ------------------------------------------------------------------ errors ----


@pytest.mark.parametrize(
  'scheduler, field',
  [
    (sweep.schedulers.SuccessiveHalving(eta=1), 'SuccessiveHalving.eta'),
    (sweep.schedulers.SuccessiveHalving(metric='loss'), 'SuccessiveHalving.metric'),
    (sweep.schedulers.SuccessiveHalving(slots=0), 'SuccessiveHalving.slots'),
    (sweep.schedulers.MedianStopping(mode='low'), 'MedianStopping.mode'),
    (sweep.schedulers.PBT(quantile=0.9), 'PBT.quantile'),
    ('asha', 'scheduler'),
  ],
)
def test_a_bad_scheduler_is_refused_naming_the_field(scheduler, field):
  with pytest.raises(sweep.ConfigError, match=field.replace('.', r'\.')):
    sweep.check(config(scheduler=scheduler))


def test_rungs_off_the_evaluation_points_are_refused():
  halving = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9)
  with pytest.raises(sweep.ConfigError, match='num_evals'):
    sweep.check(config(scheduler=halving, num_evals=4))


# ------------------------------------------------------------------ Optuna ----


def test_optuna_trials_in_batches_tell_the_tables_values_and_prune_stopped_runs(tmp_path):
  optuna = pytest.importorskip('optuna')
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = f'sqlite:///{tmp_path}/study.db'
  study = optuna.create_study(
    study_name='lr', storage=storage, sampler=optuna.samplers.TPESampler(seed=0)
  )
  cfg = config(
    learning_rate=sweep.space.loguniform(1e-3, 1.0),
    batch_size=sweep.space.choice([16, 32]),
    epochs=3,
    scheduler=sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 3),
  )
  results = sweep.optuna.optimize(study, cfg, n_trials=12, batch=6)
  assert len(results) == 2 and len(study.trials) == 12
  # Read back through the storage, as optuna-dashboard would.
  trials = optuna.load_study(study_name='lr', storage=storage).trials
  for k, result in enumerate(results):
    for i, row in result.table.iterrows():
      trial = trials[6 * k + i]
      assert trial.params['learning_rate'] == pytest.approx(row.learning_rate)
      assert trial.params['batch_size'] == row.batch_size
      curve = result.curves[result.curves.run == i]
      assert set(trial.intermediate_values) == set(curve['updates'])
      if row.status == 'stopped':
        assert trial.state == optuna.trial.TrialState.PRUNED
      else:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == pytest.approx(row.final_val_loss)
  assert sum(t.state == optuna.trial.TrialState.PRUNED for t in trials) >= 6


def test_optuna_refuses_a_config_with_nothing_to_search():
  optuna = pytest.importorskip('optuna')
  with pytest.raises(sweep.ConfigError, match='sweep.space'):
    sweep.optuna.optimize(optuna.create_study(), config(), n_trials=2)


# ------------------------------------------------------------------ several processes ----


def _free_port() -> int:
  import socket

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _worker(root, name, scheduler, *flags):
  import os
  import subprocess
  import sys
  from pathlib import Path

  here = Path(__file__).parent
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  count = '--xla_force_host_platform_device_count'
  xla = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(count)]
  env['XLA_FLAGS'] = ' '.join([*xla, f'{count}=1'])
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(here.parent), env.get('PYTHONPATH')) if p)
  log = open(root / f'{name}.log', 'w')  # noqa: SIM115 - closed with the process
  proc = subprocess.Popen(
    [sys.executable, str(here / '_adaptive_worker.py'), str(root / name), scheduler, *flags],
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  return proc, root / f'{name}.log'


def _wait(workers, code):
  """Waits for each worker process (killed after 5 minutes); each must exit with `code`."""
  for proc, log in workers:
    try:
      proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
    assert proc.returncode == code, log.read_text()[-4000:]


@pytest.mark.parametrize(
  'scheduler',
  [
    pytest.param('asha', marks=pytest.mark.slow),
    'pbt',
    pytest.param('ramp', marks=pytest.mark.slow),
  ],
)
def test_two_processes_take_every_decision_alike_and_equal_one_process(tmp_path, scheduler):
  port = _free_port()
  workers = [_worker(tmp_path, 'one', scheduler)] + [
    _worker(
      tmp_path,
      f'two{i}',
      scheduler,
      '--process-id',
      str(i),
      '--num-processes',
      '2',
      '--port',
      str(port),
    )
    for i in range(2)
  ]
  _wait(workers, 0)
  want = pd.read_csv(tmp_path / 'one' / 'results.csv').drop(columns='seconds')
  with np.load(tmp_path / 'one' / 'params.npz') as f:
    want_params = {k: f[k] for k in f.files}
  assert (want.status == 'stopped').any() or scheduler != 'asha'
  if scheduler == 'ramp':  # runs moved between batch groups, each process its own
    assert set(want.batch_schedule) == {'constant', '32>128 @0.5'}
    assert set(want.updates) == {88, 44 + 11}
  for i in range(2):  # every process holds the whole result
    got = pd.read_csv(tmp_path / f'two{i}' / 'results.csv').drop(columns='seconds')
    pd.testing.assert_frame_equal(got, want)
    curves = pd.read_csv(tmp_path / f'two{i}' / 'curves.csv')
    pd.testing.assert_frame_equal(curves, pd.read_csv(tmp_path / 'one' / 'curves.csv'))
    with np.load(tmp_path / f'two{i}' / 'params.npz') as f:
      assert set(f.files) == set(want_params)
      for k in f.files:
        np.testing.assert_array_equal(f[k], want_params[k], err_msg=k)


@pytest.mark.slow
def test_two_processes_preempted_mid_search_resume_to_the_uninterrupted_result(tmp_path):
  """SIGTERM reaches process 0 only: both save at the same round and exit 143; the same
  command again resumes both from their checkpoints and ends as one uninterrupted process."""
  workdir = tmp_path / 'w'

  def two(name, *extra):
    port = _free_port()
    return [
      _worker(
        tmp_path,
        f'{name}{i}',
        'asha',
        '--process-id',
        str(i),
        '--num-processes',
        '2',
        '--port',
        str(port),
        '--workdir',
        str(workdir),
        *extra,
      )
      for i in range(2)
    ]

  one, cut = [_worker(tmp_path, 'one', 'asha')], two('cut', '--preempt-at', '3')
  _wait(one, 0)
  _wait(cut, 143)
  assert 'SIGTERM received' in (tmp_path / 'cut0.log').read_text()
  _wait(two('again'), 0)
  assert 'Resuming' in (tmp_path / 'again0.log').read_text()
  want = pd.read_csv(tmp_path / 'one' / 'results.csv').drop(columns='seconds')
  with np.load(tmp_path / 'one' / 'params.npz') as f:
    want_params = {k: f[k] for k in f.files}
  for i in range(2):
    got = pd.read_csv(tmp_path / f'again{i}' / 'results.csv').drop(columns='seconds')
    pd.testing.assert_frame_equal(got, want)
    with np.load(tmp_path / f'again{i}' / 'params.npz') as f:
      for k in f.files:
        np.testing.assert_array_equal(f[k], want_params[k], err_msg=k)


def test_a_diverged_pbt_member_copies_a_good_one_and_trains_on():
  cfg = _pbt_config(learning_rate=[1e-3, 3e-3, 1e-2, 1e4])
  result = sweep.run(cfg, progress=False)
  curves = result.curves[result.curves.run == 3].sort_values('eval')
  alive = curves['alive'].astype(bool).to_numpy()
  assert not alive[1], 'the learning rate 1e4 should diverge in its first segment'
  assert alive[-1] and result.table.status[3] == 'ok'
  assert result.table.lineage[3].startswith('1:')
  assert result.table.final_learning_rate[3] < 1.0


def test_a_stopping_rule_that_could_never_act_is_refused():
  with pytest.raises(sweep.ConfigError, match='Patience acts from evaluation point 6'):
    sweep.check(config(scheduler=sweep.schedulers.Patience(patience=5), num_evals=4))
  # Without num_evals, enough points are chosen.
  plan = sweep.check(config(scheduler=sweep.schedulers.Patience(patience=5)))
  assert plan.num_evals >= 7


def test_a_schedule_free_run_is_reported_at_its_evaluation_parameters():
  halving = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 3)
  cfg = config(
    optimizer=optax.contrib.schedule_free_adamw,
    learning_rate=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    batch_size=[32],
    epochs=3,
    scheduler=halving,
  )
  result = sweep.run(cfg, progress=False)
  for i, row in result.table.iterrows():
    params, raw = result.params(i), result.params(i, raw=True)
    logits = np.asarray(apply(params, DATA.x_val), np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want = -log_p[np.arange(len(DATA.y_val)), DATA.y_val].mean()
    assert row.final_val_loss == pytest.approx(want, rel=1e-4), f'run {i} ({row.status})'
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(raw), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)
