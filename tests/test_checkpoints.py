"""Checkpoints: the Pareto runs kept with orbax, resuming after SIGKILL and SIGTERM, workdirs.

Two groups of checks:
- In this process: a tiny sweep (an MLP on the digits set, 3 learning rates x 2 batch sizes,
  one learning rate far too large so that it diverges, one epoch per segment) runs into a
  workdir once; the saved Pareto runs, `sweep.load`, a resumed finished sweep, a changed
  config and a SIGTERM (sent from inside the segment call, so that it lands at a known
  segment) are checked against it. Every sweep here has the same program structure, so only
  the first one compiles.
- Through `sweep run` in subprocesses (the same grid on a small synthetic set, 40 segments,
  a checkpoint every 4): one uninterrupted run, one killed with SIGKILL and
  one stopped with SIGTERM once their first checkpoint is on disk, then resumed; the resumed
  runs must end with the numbers of the uninterrupted one. The subprocesses share a
  persistent JAX compilation cache so that only the first of them pays the compile.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import sweep
from kernels import train
from sweep import checkpoints

REPO = Path(__file__).resolve().parents[1]

LEARNING_RATES = [0.03, 0.3, 1e4]  # sgd at 1e4 diverges on its first update
DIVERGING_LR = 1e4
BATCH_SIZES = [32, 128]
NUM_RUNS = len(LEARNING_RATES) * len(BATCH_SIZES)
EPOCHS = 6  # one segment per epoch

ACCURACY = {'final_val_accuracy': 'max'}


@functools.cache
def _digits() -> sweep.data.Dataset:
  return sweep.data.digits()


def api_config(**changes) -> sweep.SweepConfig:
  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(8,)),
    data=_digits(),
    optimizer='sgd',
    learning_rate=LEARNING_RATES,
    batch_size=BATCH_SIZES,
    epochs=EPOCHS,
    num_evals=EPOCHS,
    name='checkpoint-test',
  )
  return cfg.replace(**changes)


# ------------------------------------------------------------------------------- helpers ----


def assert_trees_equal(actual, expected) -> None:
  """Same tree structure and every leaf equal bit for bit (NaN equal to NaN)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (
      jax.tree_util.keystr(path),
      a.dtype,
      b.dtype,
      a.shape,
      b.shape,
    )
    assert np.array_equal(a, b, equal_nan=True), jax.tree_util.keystr(path)


def assert_tables_equal(
  actual: pd.DataFrame, expected: pd.DataFrame, ignore: tuple[str, ...] = ()
) -> None:
  """Same columns and rows; numeric columns equal exactly (NaN-aware), others equal."""
  assert list(actual.columns) == list(expected.columns)
  assert list(actual.index) == list(expected.index)
  for column in expected.columns:
    if column in ignore:
      continue
    a, b = actual[column], expected[column]
    if pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b):
      assert pd.api.types.is_numeric_dtype(a) and not pd.api.types.is_bool_dtype(a), (
        column,
        a.dtype,
      )
      assert np.array_equal(a.to_numpy(np.float64), b.to_numpy(np.float64), equal_nan=True), column
    else:
      assert a.tolist() == b.tolist(), column


def snapshot(directory: Path) -> dict[str, tuple]:
  """Every file and directory under `directory`: path -> (size, mtime, sha256 of the bytes)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory) + '/'] = ()
    for name in files:
      if name.startswith('.lock'):
        continue  # the writer's lock (sweep.lock), not the workdir's content
      path = os.path.join(root, name)
      st = os.stat(path)
      with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def leftovers(directory: Path) -> list[str]:
  """Temporary files or directories (ours or orbax's) anywhere under `directory`."""
  found = []
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      if name.endswith('.tmp') or '.orbax-checkpoint-tmp' in name:
        found.append(os.path.relpath(os.path.join(root, name), directory))
  return found


def checkpoint_steps(workdir: Path) -> list[int]:
  """The finished checkpoint steps of a workdir: directories under state/ named by an integer."""
  state = workdir / 'state'
  if not state.is_dir():
    return []
  return sorted(int(p.name) for p in state.iterdir() if p.is_dir() and p.name.isdigit())


def expected_front(table: pd.DataFrame, objectives: dict[str, str]) -> set[int]:
  """The Pareto front by brute force: the runs that did not diverge and no other such run
  dominates."""
  ok = table[table.status == 'ok']
  flip = np.array([-1.0 if s == 'max' else 1.0 for s in objectives.values()])
  values = ok[list(objectives)].to_numpy(np.float64) * flip
  front = set()
  for i, row in zip(ok.index, values, strict=True):
    if not any(np.all(other <= row) and np.any(other < row) for other in values):
      front.add(int(i))
  return front


# --------------------------------------------------------------------- in this process ----


@pytest.fixture(scope='module')
def api_sweep(tmp_path_factory) -> tuple[Path, sweep.Result]:
  workdir = tmp_path_factory.mktemp('api') / 'out'
  result = sweep.run(api_config(), workdir=str(workdir), progress=False)
  return workdir, result


def test_pareto_columns_and_diverged_runs(api_sweep):
  _, result = api_sweep
  table = result.table
  assert len(table) == NUM_RUNS
  assert {'pareto', 'pareto_rank'} <= set(table.columns)
  assert table['pareto'].tolist() == (table['pareto_rank'] == 0).tolist()

  diverged = table[table.status == 'diverged']
  assert sorted(diverged.learning_rate) == [DIVERGING_LR] * len(BATCH_SIZES)
  assert (diverged.pareto_rank == -1).all()
  assert not diverged.pareto.any()
  assert (table[table.status == 'ok'].pareto_rank >= 0).all()

  objectives = result.config['objectives']
  assert objectives == {'final_val_loss': 'min', 'updates': 'min'}
  assert set(table.index[table.pareto]) == expected_front(table, objectives)


def test_pareto_runs_are_saved_bit_for_bit(api_sweep):
  workdir, result = api_sweep
  front = [int(i) for i in result.table.index[result.table.pareto]]
  assert front
  assert checkpoints.saved_runs(str(workdir)) == sorted(front)
  for i in front:
    restored = sweep.restore_params(str(workdir), i)
    assert_trees_equal(restored, result.params(i))
    meta = json.loads((workdir / 'runs' / f'{i:06d}.json').read_text())
    assert meta['run'] == i
    assert meta['pareto'] is True
    assert meta['final_val_loss'] == result.table.loc[i, 'final_val_loss']


def test_runs_off_the_front_are_not_saved(api_sweep):
  workdir, result = api_sweep
  front = sorted(int(i) for i in result.table.index[result.table.pareto])
  off = [int(i) for i in result.table.index[~result.table.pareto]]
  assert off
  for i in off:
    with pytest.raises(KeyError) as info:
      sweep.restore_params(str(workdir), i)
    message = str(info.value)
    assert f'run {i}' in message
    assert str(front) in message, message


def test_load_gives_back_the_table_and_the_saved_params(api_sweep):
  workdir, result = api_sweep
  loaded = sweep.load(str(workdir))
  assert_tables_equal(loaded.table, result.table)
  assert loaded.table['pareto'].dtype == bool
  assert loaded.config == json.loads((workdir / 'config.json').read_text())
  assert_tables_equal(loaded.curves, result.curves)
  for i in result.table.index[result.table.pareto]:
    assert_trees_equal(loaded.params(int(i)), result.params(int(i)))
  off = int(result.table.index[~result.table.pareto][0])
  with pytest.raises(KeyError):
    loaded.params(off)


def test_a_single_objective_gives_the_best_runs_as_the_front(tmp_path):
  workdir = tmp_path / 'accuracy'
  result = sweep.run(api_config(objectives=ACCURACY), workdir=str(workdir), progress=False)
  table = result.table
  ok = table[table.status == 'ok']
  best = set(int(i) for i in ok.index[ok.final_val_accuracy == ok.final_val_accuracy.max()])
  assert set(int(i) for i in table.index[table.pareto]) == best
  assert set(table.index[table.pareto]) == expected_front(table, ACCURACY)
  assert (table[table.status == 'diverged'].pareto_rank == -1).all()
  assert checkpoints.saved_runs(str(workdir)) == sorted(best)
  for i in best:
    assert_trees_equal(sweep.restore_params(str(workdir), i), result.params(i))


def test_a_finished_workdir_gives_back_the_same_result(api_sweep, tmp_path):
  workdir, result = api_sweep
  again_dir = tmp_path / 'again'
  shutil.copytree(workdir, again_dir)
  again = sweep.run(api_config(), workdir=str(again_dir), progress=False)
  assert_tables_equal(again.table, result.table, ignore=('seconds',))
  assert_tables_equal(again.curves, result.curves)
  for i in result.table.index[result.table.pareto]:
    assert_trees_equal(again.params(int(i)), result.params(int(i)))
    assert_trees_equal(sweep.restore_params(str(again_dir), int(i)), result.params(int(i)))


def test_the_outputs_of_a_finished_run(api_sweep):
  workdir, result = api_sweep
  for name in ('results.csv', 'config.json', 'curves.csv', 'sweep.json'):
    assert (workdir / name).is_file(), sorted(os.listdir(workdir))
  assert not (workdir / 'experiment.py').exists()
  assert leftovers(workdir) == []
  config = json.loads((workdir / 'config.json').read_text())
  assert 'experiment' not in config
  held = json.loads((workdir / 'sweep.json').read_text())['fingerprint']
  assert held == config['fingerprint']
  # The state is checkpointed every segment and the latest two are kept.
  assert checkpoint_steps(workdir) == [EPOCHS - 1, EPOCHS]


def test_checkpoint_every(tmp_path):
  workdir = tmp_path / 'every'
  sweep.run(api_config(), workdir=str(workdir), progress=False, checkpoint_every=4)
  assert checkpoint_steps(workdir) == [4, EPOCHS]  # every 4 segments, and the last one
  seconds_dir = tmp_path / 'seconds'
  sweep.run(
    api_config(),
    workdir=str(seconds_dir),
    progress=False,
    checkpoint_every=100,
    checkpoint_seconds=0,
  )
  assert checkpoint_steps(seconds_dir) == [EPOCHS - 1, EPOCHS]  # a checkpoint after every segment
  for bad in (0, -1, True, 1.5):
    bad_dir = tmp_path / f'bad-{bad}'
    with pytest.raises(sweep.ConfigError, match='checkpoint_every'):
      sweep.run(api_config(), workdir=str(bad_dir), progress=False, checkpoint_every=bad)
    assert not bad_dir.exists()


def test_a_changed_config_is_refused_and_fresh_starts_afresh(api_sweep, tmp_path):
  source, result = api_sweep
  workdir = tmp_path / 'held'
  shutil.copytree(source, workdir)
  before = snapshot(workdir)
  other = api_config(learning_rate=[0.01, 0.1, DIVERGING_LR])

  with pytest.raises(sweep.ConfigError) as info:
    sweep.run(other, workdir=str(workdir), progress=False)
  message = str(info.value)
  assert 'holds another sweep' in message and 'fresh=True' in message, message
  assert snapshot(workdir) == before

  # A mistake in the config itself is reported the same way, and changes nothing either.
  with pytest.raises(sweep.ConfigError):
    sweep.run(other.replace(learning_rate=-1.0), workdir=str(workdir), progress=False)
  assert snapshot(workdir) == before

  fresh = sweep.run(other, workdir=str(workdir), progress=False, fresh=True)
  assert sorted(fresh.table.learning_rate.unique()) == sorted(other.learning_rate)
  assert fresh.table.loc[0, 'final_val_loss'] != result.table.loc[0, 'final_val_loss']
  front = sorted(int(i) for i in fresh.table.index[fresh.table.pareto])
  assert checkpoints.saved_runs(str(workdir)) == front
  for i in front:
    assert_trees_equal(sweep.restore_params(str(workdir), i), fresh.params(i))
  loaded = sweep.load(str(workdir))
  assert_tables_equal(loaded.table, fresh.table)
  held = json.loads((workdir / 'sweep.json').read_text())['fingerprint']
  assert held == fresh.config['fingerprint'] != result.config['fingerprint']
  assert leftovers(workdir) == []


def test_fresh_leaves_no_experiment_file_of_the_old_sweep(tmp_path):
  """The experiment.py a workdir holds is the one its config.json records."""
  experiment = tmp_path / 'old_experiment.py'
  experiment.write_text('# the old sweep\n')
  workdir = tmp_path / 'out'
  sweep.run(api_config(), workdir=str(workdir), progress=False, experiment_file=str(experiment))
  assert (workdir / 'experiment.py').read_text() == '# the old sweep\n'

  sweep.run(
    api_config(learning_rate=[0.01, 0.1, 1.0]), workdir=str(workdir), progress=False, fresh=True
  )
  config = json.loads((workdir / 'config.json').read_text())
  if 'experiment' in config:
    digest = hashlib.sha256((workdir / 'experiment.py').read_bytes()).hexdigest()
    assert digest == config['experiment']['sha256']
  else:
    assert not (workdir / 'experiment.py').exists(), 'experiment.py of the old sweep is left behind'


def _sigterm_at(monkeypatch, segment: int) -> list[int]:
  """Sends this process a SIGTERM during segment call number `segment` (1-based); returns
  the list the calls are counted in."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are only installed in the main thread')
  calls = []
  original = train.segment_jit

  def segment_jit(*args, **kwargs):
    calls.append(1)
    if len(calls) == segment:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(train, 'segment_jit', segment_jit)
  return calls


def _count_segments(monkeypatch) -> list[int]:
  calls = []
  original = train.segment_jit

  def segment_jit(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(train, 'segment_jit', segment_jit)
  return calls


def test_sigterm_saves_and_the_rerun_resumes(api_sweep, tmp_path, monkeypatch, capsys):
  _, result = api_sweep
  workdir = tmp_path / 'preempted'
  handler = signal.getsignal(signal.SIGTERM)
  _sigterm_at(monkeypatch, 2)
  with pytest.raises(SystemExit) as info:
    sweep.run(api_config(), workdir=str(workdir), progress=False, checkpoint_every=100)
  assert info.value.code == 143
  err = capsys.readouterr().err
  assert 'SIGTERM' in err and 'resume' in err, err
  assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is back
  # checkpoint_every=100 saves nothing on its own: the SIGTERM saved segment 2.
  assert checkpoint_steps(workdir) == [2]
  assert not (workdir / 'results.csv').exists()

  calls = _count_segments(monkeypatch)
  resumed = sweep.run(api_config(), workdir=str(workdir), progress=False)
  assert len(calls) == EPOCHS - 2  # started at segment 2
  assert_tables_equal(resumed.table, result.table, ignore=('seconds',))
  assert_tables_equal(resumed.curves, result.curves)
  for i in result.table.index[result.table.pareto]:
    assert_trees_equal(sweep.restore_params(str(workdir), int(i)), result.params(int(i)))
  assert leftovers(workdir) == []


def test_sigterm_without_a_workdir(monkeypatch):
  """Nothing to save: the run exits with status 143 (or leaves the signal to the handler that
  was there before), but fails with no unrelated error."""
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    _sigterm_at(monkeypatch, 2)
    try:
      result = sweep.run(api_config(), progress=False)
    except SystemExit as e:
      assert e.code == 143
    else:
      assert received == [signal.SIGTERM]
      assert len(result.table) == NUM_RUNS
  finally:
    signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------- command line ----

EXPERIMENT = """
import numpy as np

import sweep


def get_config():
  # A small synthetic classification set: no scikit-learn to import in every process.
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 4))
  x = rng.normal(size=(1200, 16)).astype(np.float32)
  y = np.argmax(x @ w + 0.5 * rng.normal(size=(1200, 4)), axis=1).astype(np.int32)
  return sweep.SweepConfig(
      model=sweep.models.mlp(hidden=(8,)),
      data=sweep.data.arrays(x[:1000], y[:1000], x[1000:], y[1000:], name='synthetic'),
      optimizer='sgd',
      learning_rate={learning_rates!r},
      batch_size={batch_sizes!r},
      epochs=20,
      num_evals=40,
      name='checkpoint-cli-test',
  )
"""
CLI_SEGMENTS = 40
CHECKPOINT_EVERY = 4  # a checkpoint takes about as long as a segment of this tiny sweep
TIMEOUT = 300


def sweep_command() -> list[str]:
  found = shutil.which('sweep', path=os.path.dirname(sys.executable))
  return [found] if found else [sys.executable, '-m', 'sweep']


class Cli:
  """Runs `sweep run EXPERIMENT --workdir DIR --no-progress --checkpoint-every N` in
  subprocesses."""

  def __init__(self, root: Path):
    self.root = root
    self.env = dict(os.environ)
    self.env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(REPO), self.env.get('PYTHONPATH')) if p
    )
    # Compiled programs are shared through the cache; the numbers do not depend on it.
    self.env['JAX_COMPILATION_CACHE_DIR'] = str(root / 'jax-cache')
    self.env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    self.env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

  def argv(self, experiment: Path, workdir: Path, *flags: str) -> list[str]:
    return [
      *sweep_command(),
      'run',
      str(experiment),
      '--workdir',
      str(workdir),
      '--no-progress',
      '--checkpoint-every',
      str(CHECKPOINT_EVERY),
      *flags,
    ]

  def start(self, experiment: Path, workdir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
      self.argv(experiment, workdir, *flags),
      cwd=self.root,
      env=self.env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  def run(
    self, experiment: Path, workdir: Path, *flags: str
  ) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    return finish(self.start(experiment, workdir, *flags)), time.perf_counter() - start

  def interrupt(self, experiment: Path, workdir: Path, sig: int) -> tuple[int, str]:
    """Starts a run, sends `sig` once its first checkpoint is on disk, waits for the end;
    returns the exit status and stderr."""
    stderr = self.root / f'{workdir.name}.stderr'
    with open(stderr, 'w') as err:
      proc = subprocess.Popen(
        self.argv(experiment, workdir),
        cwd=self.root,
        env=self.env,
        stdout=subprocess.DEVNULL,
        stderr=err,
      )
      try:
        deadline = time.monotonic() + TIMEOUT
        while not checkpoint_steps(workdir):
          assert proc.poll() is None, f'exited with {proc.returncode} first:\n{stderr.read_text()}'
          assert time.monotonic() < deadline, 'no checkpoint appeared'
          time.sleep(0.02)
        proc.send_signal(sig)
        code = proc.wait(timeout=TIMEOUT)
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    return code, stderr.read_text()


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def describe(proc: subprocess.CompletedProcess) -> str:
  return f'exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'


@pytest.fixture(scope='module')
def cli(tmp_path_factory) -> Cli:
  return Cli(tmp_path_factory.mktemp('cli'))


@pytest.fixture(scope='module')
def experiment(cli) -> Path:
  path = cli.root / 'checkpoint_experiment.py'
  path.write_text(EXPERIMENT.format(learning_rates=LEARNING_RATES, batch_sizes=BATCH_SIZES))
  return path


@pytest.fixture(scope='module')
def uninterrupted_started(cli, experiment):
  """Starts the run never interrupted (workdir A); yields the process and its start time."""
  start = time.perf_counter()
  proc = cli.start(experiment, cli.root / 'A')
  yield proc, start
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope='module', autouse=True)
def _start_the_cli_run_early(request):
  """Starts workdir A's run before the in-process tests when a test here needs it: its
  compile then overlaps theirs."""
  if any('uninterrupted' in item.fixturenames for item in request.session.items):
    request.getfixturevalue('uninterrupted_started')


@pytest.fixture(scope='module')
def uninterrupted(cli, uninterrupted_started) -> tuple[Path, float]:
  """Workdir A: the run never interrupted, and how long it took (from its start, which may
  have been alongside the in-process tests)."""
  proc, start = uninterrupted_started
  done = finish(proc)
  seconds = time.perf_counter() - start
  assert done.returncode == 0, describe(done)
  print(f'uninterrupted CLI run: {seconds:.1f} s')
  return cli.root / 'A', seconds


def assert_same_outcome(workdir: Path, reference: Path) -> None:
  """The same results (but wall times), curves and saved Pareto runs as the reference."""
  assert_tables_equal(
    pd.read_csv(workdir / 'results.csv'),
    pd.read_csv(reference / 'results.csv'),
    ignore=('seconds',),
  )
  assert_tables_equal(pd.read_csv(workdir / 'curves.csv'), pd.read_csv(reference / 'curves.csv'))
  front = checkpoints.saved_runs(str(reference))
  assert front and checkpoints.saved_runs(str(workdir)) == front
  for i in front:
    assert_trees_equal(
      sweep.restore_params(str(workdir), i), sweep.restore_params(str(reference), i)
    )


def test_cli_outputs_of_a_finished_run(uninterrupted, experiment):
  workdir, _ = uninterrupted
  for name in ('results.csv', 'config.json', 'curves.csv', 'experiment.py', 'sweep.json'):
    assert (workdir / name).is_file(), sorted(os.listdir(workdir))
  assert leftovers(workdir) == []
  assert (workdir / 'experiment.py').read_bytes() == experiment.read_bytes()
  config = json.loads((workdir / 'config.json').read_text())
  record = config['experiment']
  assert record['sha256'] == hashlib.sha256(experiment.read_bytes()).hexdigest()
  assert record['file'] == experiment.name
  assert config['num_evals'] == CLI_SEGMENTS
  assert checkpoint_steps(workdir) == [CLI_SEGMENTS - CHECKPOINT_EVERY, CLI_SEGMENTS]
  table = pd.read_csv(workdir / 'results.csv')
  assert len(table) == NUM_RUNS
  assert (table[table.status == 'diverged'].pareto_rank == -1).all()


def test_cli_resumes_after_sigkill(cli, experiment, uninterrupted):
  reference, full_seconds = uninterrupted
  workdir = cli.root / 'B'
  code, err = cli.interrupt(experiment, workdir, signal.SIGKILL)
  assert code == -signal.SIGKILL, err
  steps = checkpoint_steps(workdir)
  assert steps and 0 < max(steps) < CLI_SEGMENTS, steps
  assert not (workdir / 'results.csv').exists()

  proc, seconds = cli.run(experiment, workdir)
  assert proc.returncode == 0, describe(proc)
  print(
    f'killed at checkpoint {max(steps)} of {CLI_SEGMENTS}; resumed run: {seconds:.1f} s, '
    f'uninterrupted run: {full_seconds:.1f} s'
  )
  assert_same_outcome(workdir, reference)
  assert leftovers(workdir) == []


def test_cli_sigterm_saves_exits_143_and_resumes(cli, experiment, uninterrupted):
  reference, full_seconds = uninterrupted
  workdir = cli.root / 'C'
  code, err = cli.interrupt(experiment, workdir, signal.SIGTERM)
  assert code == 143, err
  assert 'SIGTERM' in err and 'resume' in err, err
  assert 'Traceback' not in err, err
  saved = re.search(r'state saved at segment (\d+)', err)
  steps = checkpoint_steps(workdir)
  assert steps and 0 < max(steps) < CLI_SEGMENTS, steps
  if saved:
    assert int(saved.group(1)) == max(steps), (err, steps)
  assert not (workdir / 'results.csv').exists()
  assert leftovers(workdir / 'state') == []

  proc, seconds = cli.run(experiment, workdir)
  assert proc.returncode == 0, describe(proc)
  print(
    f'stopped at checkpoint {max(steps)} of {CLI_SEGMENTS}; resumed run: {seconds:.1f} s, '
    f'uninterrupted run: {full_seconds:.1f} s'
  )
  assert_same_outcome(workdir, reference)
  assert leftovers(workdir) == []


def test_cli_refuses_another_sweep_and_fresh_starts_afresh(cli, uninterrupted):
  reference, _ = uninterrupted
  other = cli.root / 'other_experiment.py'
  other_rates = [0.01, 0.1, DIVERGING_LR]
  other.write_text(EXPERIMENT.format(learning_rates=other_rates, batch_sizes=BATCH_SIZES))
  workdir = cli.root / 'D'
  shutil.copytree(reference, workdir)
  before = snapshot(workdir)

  proc, _ = cli.run(other, workdir)
  assert proc.returncode == 2, describe(proc)
  assert 'holds another sweep' in proc.stderr and '--fresh' in proc.stderr, describe(proc)
  assert 'Traceback' not in proc.stderr, describe(proc)
  assert snapshot(workdir) == before

  proc, _ = cli.run(other, workdir, '--fresh')
  assert proc.returncode == 0, describe(proc)
  table = pd.read_csv(workdir / 'results.csv')
  assert sorted(table.learning_rate.unique()) == sorted(other_rates)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['experiment']['sha256'] == hashlib.sha256(other.read_bytes()).hexdigest()
  assert (workdir / 'experiment.py').read_bytes() == other.read_bytes()
  assert checkpoints.saved_runs(str(workdir)) == sorted(int(i) for i in table.run[table.pareto])
  assert leftovers(workdir) == []
