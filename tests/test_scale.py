"""Scaling a sweep out changes where runs train, never what they compute.

One grid (`_scale_worker.config`: an MLP on the digits set, adam and sgd, 3 learning
rates one of which diverges, 2 batch sizes, 2 seeds, 2 epochs in 2 segments) is trained
- in this process: in one chunk per optimizer (the baseline), with a workdir, in
  bfloat16, and in chunks of a tiny memory budget (whose later chunks compile nothing);
- in subprocesses, started first so that they train meanwhile: on 1 and on 4 (forced
  host) CPU devices, and by 2 processes joined with `jax.distributed.initialize`.
Where the run axis is laid out differently (chunk width, devices), XLA may round the
wider or narrower matmuls differently, so numbers agree to a tolerance; where the layout
is the same (one process or two, each on one device; with a workdir or without) they
agree bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from compiles import counting_compiles

import sweep
from sweep import engine, units

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / '_scale_worker.py'
TIMEOUT = 240  # seconds a subprocess sweep may take (a few on an idle machine)

# A different run-axis width may round differently in XLA's matmuls.
TABLE_RTOL = 1e-5
LOSS_COLUMNS = ('final_batch_loss', 'final_train_loss', 'final_val_loss', 'best_val_loss')
PARAMS_RTOL, PARAMS_ATOL = 1e-4, 1e-6
# bfloat16 against float32: relative difference of the final validation loss of the runs
# that did not diverge. Measured on this grid (16 runs, CPU): median 8e-4; sgd at most
# 1.2e-3; adam up to 2.2e-2 (at the learning rate 5e-2, batch 32, where it trains fastest
# and least smoothly). The bound is 3x the largest.
BF16_VAL_LOSS_RTOL = 7e-2


def _load_worker():
  spec = importlib.util.spec_from_file_location('_scale_worker', WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()


# --------------------------------------------------------------------- helpers ----


def assert_tables_close(
  actual: pd.DataFrame, expected: pd.DataFrame, rtol: float, example: float = 0.0
) -> None:
  """Same rows and columns (`seconds` aside), numbers within `rtol`.

  A float agrees within `rtol` relative to the larger of itself and its run's loss (a
  difference of two losses, like the generalization gap, keeps only their absolute
  error). The accuracy of a diverged run may also differ by `example`, one example:
  its huge logits leave near ties that rounding breaks either way. The rest is equal.
  """
  assert list(actual.columns) == list(expected.columns)
  assert list(actual['run']) == list(expected['run'])
  scale = expected[list(LOSS_COLUMNS)].abs().max(axis=1).to_numpy()
  diverged = (expected['status'] == 'diverged').to_numpy()
  for column in expected.columns:
    if column == 'seconds':
      continue
    a, b = actual[column].to_numpy(), expected[column].to_numpy()
    if not pd.api.types.is_float_dtype(b):
      assert a.tolist() == b.tolist(), column
      continue
    tol = rtol * np.maximum(np.abs(b), scale)
    if 'accuracy' in column:
      tol = np.where(diverged, tol + example, tol)
    bad = ~((np.abs(a - b) <= tol) | (np.isnan(a) & np.isnan(b)))
    assert not bad.any(), f'{column}, runs {np.flatnonzero(bad)}: {a[bad]} against {b[bad]}'


def assert_params_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert sorted(actual) == sorted(expected)
  for key, b in expected.items():
    assert actual[key].dtype == b.dtype, key
    np.testing.assert_allclose(actual[key], b, rtol=PARAMS_RTOL, atol=PARAMS_ATOL, err_msg=key)


def all_params(result: sweep.Result) -> dict[str, np.ndarray]:
  return worker.flat_params(result, len(result.table))


def widths(planned: list) -> list[int]:
  return [unit.groups[0].slots.shape[1] for unit in planned]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class Worker:
  """`_scale_worker.py OUT ...` in a subprocess on `devices` forced host CPU devices."""

  def __init__(self, root: Path, name: str, devices: int, *flags: str, env: dict | None = None):
    self.out = root / name
    self.log = root / f'{name}.log'
    env = {**os.environ, **(env or {})}
    count = '--xla_force_host_platform_device_count'
    xla = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(count)]
    env['XLA_FLAGS'] = ' '.join([*xla, f'{count}={devices}'])
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
    with open(self.log, 'w') as log:
      self.proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(self.out), *flags],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
      )

  def output(self) -> str:
    return self.log.read_text()

  def report(self) -> dict:
    assert self.proc.returncode == 0, f'exit code {self.proc.returncode}:\n{self.output()[-5000:]}'
    lines = [ln for ln in self.output().splitlines() if ln.startswith('SCALE_WORKER ')]
    assert len(lines) == 1, self.output()[-5000:]
    return json.loads(lines[0].removeprefix('SCALE_WORKER '))

  def table(self) -> pd.DataFrame:
    return pd.read_csv(self.out / 'results.csv')

  def params(self) -> dict[str, np.ndarray]:
    with np.load(self.out / 'params.npz') as f:
      return {k: f[k] for k in f.files}


def wait_all(workers: list[Worker], linked: list[Worker], timeout: float = TIMEOUT) -> None:
  """Waits for every worker; stops the `linked` ones (a multi-process sweep) once one of
  them failed, and every one once time is up."""
  deadline = time.monotonic() + timeout
  try:
    while any(w.proc.poll() is None for w in workers) and time.monotonic() < deadline:
      if any(w.proc.returncode not in (None, 0) for w in linked):
        for w in linked:
          if w.proc.poll() is None:
            w.proc.kill()
      time.sleep(0.05)
  finally:
    for w in workers:
      if w.proc.poll() is None:
        w.proc.kill()
      w.proc.wait()


def one_example(cfg: sweep.SweepConfig) -> float:
  """An accuracy step: one example of the smaller evaluation set."""
  from sweep.config import validate
  from sweep.expansion import probe_size

  return 1 / min(cfg.data.n_val, probe_size(validate(cfg)))


# -------------------------------------------------------------------- fixtures ----


def two_processes(root: Path, tag: str, workdir: Path, env: dict | None = None) -> list[Worker]:
  port = free_port()
  return [
    Worker(
      root,
      f'{tag}{i}',
      1,
      '--workdir',
      str(workdir),
      '--process-id',
      str(i),
      '--num-processes',
      '2',
      '--port',
      str(port),
      env=env,
    )
    for i in range(2)
  ]


class SubprocessSweeps:
  """The grid in subprocesses, all started at once: on 1 CPU device (the reference), on
  4, and in 2 processes of 1 device each joined into one sweep with a workdir."""

  def __init__(self, root: Path):
    self.workdir = root / 'workdir'
    self.hosts = two_processes(root, 'host', self.workdir)
    self.one = Worker(root, 'one', 1)
    self.four = Worker(root, 'four', 4)
    self.all = [self.one, self.four, *self.hosts]
    self._waited = False

  def wait(self) -> SubprocessSweeps:
    if not self._waited:
      self._waited = True
      wait_all(self.all, linked=self.hosts)
    return self

  def stop(self) -> None:
    for w in self.all:
      if w.proc.poll() is None:
        w.proc.kill()
      w.proc.wait()


@pytest.fixture(scope='module')
def subprocess_sweeps(tmp_path_factory):
  sweeps = SubprocessSweeps(tmp_path_factory.mktemp('scale'))
  try:
    yield sweeps
  finally:
    sweeps.stop()


@pytest.fixture(scope='module')
def baseline(request) -> sweep.Result:
  """The grid in this process, memory budget None: one chunk per optimizer.

  The subprocess sweeps, if a selected test needs them, start first: they train while
  this process does.
  """
  if any('subprocess_sweeps' in item.fixturenames for item in request.session.items):
    request.getfixturevalue('subprocess_sweeps')
  cfg = worker.config()
  assert widths(worker.units(cfg)) == [4, 4]  # 3 runs per seed, padded to 4
  return sweep.run(cfg, progress=False)


# ----------------------------------------------------------------------- tests ----


def test_one_process_workdir_matches_in_memory_result(baseline, tmp_path):
  """The 1-process path with a workdir: results.csv and the Pareto runs as in memory."""
  workdir = tmp_path / 'workdir'
  result = sweep.run(worker.config(), workdir=str(workdir), progress=False)
  assert_tables_close(result.table, baseline.table, rtol=0)
  written = pd.read_csv(workdir / 'results.csv')
  assert_tables_close(written, baseline.table, rtol=0)
  front = sorted(int(i) for i in baseline.table.index[baseline.table.pareto])
  assert sweep.checkpoints.saved_runs(str(workdir)) == front
  for i in front:
    saved = jax.tree.leaves(sweep.restore_params(str(workdir), i))
    for a, b in zip(saved, jax.tree.leaves(baseline.params(i)), strict=True):
      assert a.dtype == b.dtype and np.array_equal(a, b), i


def test_bfloat16_stays_close_to_float32(baseline):
  result = sweep.run(worker.config(compute_dtype='bfloat16'), progress=False)
  for i in range(len(result.table)):
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(result.params(i))}
    assert dtypes == {np.dtype(np.float32)}, (i, dtypes)

  f32, bf16 = baseline.table, result.table
  diverging = f32.learning_rate == worker.DIVERGING_LR
  assert (f32.status[diverging] == 'diverged').all()
  assert (bf16.status[diverging] == 'diverged').all()
  stable = f32.status == 'ok'
  assert stable.sum() == len(f32) - diverging.sum()
  assert (bf16.status[stable] == 'ok').all()
  assert (bf16.updates[stable] == f32.updates[stable]).all()
  relative = ((bf16.final_val_loss - f32.final_val_loss) / f32.final_val_loss).abs()[stable]
  shown = f32.loc[stable, ['optimizer', 'learning_rate', 'batch_size', 'seed']].assign(
    relative=relative
  )
  print('bfloat16 against float32, relative difference of the final val loss:')
  print(shown.to_string())
  assert relative.max() <= BF16_VAL_LOSS_RTOL, relative.sort_values().to_string()
  assert relative.max() > 0, 'bfloat16 computed exactly as float32'


def test_chunks_match_one_chunk_and_share_one_program(baseline, monkeypatch):
  full = worker.config()
  plan, model, eval_chunk = worker.functions(full)
  data = full.data
  slots_per_column = sum(g.slots.shape[0] for g in worker.units(full)[0].groups)
  per_run = max(
    units.run_bytes(plan, model, family, eval_chunk) for family in plan.axes['optimizer']
  )
  # Room for 2 runs of each slot: chunks of width 2, the second of 3 runs padded.
  budget = data.x_train.nbytes + data.y_train.nbytes + 2 * slots_per_column * per_run
  chunked = full.replace(memory_budget=budget)
  planned = worker.units(chunked)
  assert widths(planned) == [2, 2, 2, 2]  # against [4, 4] without a budget
  assert [unit.family for unit in planned] == ['adam', 'adam', 'sgd', 'sgd']

  # A mark at the start of each unit's training.
  train_unit, started = engine.train_unit, {}

  def marking(c, *args, **kwargs):
    started.setdefault(c, len(compiled))
    return train_unit(c, *args, **kwargs)

  monkeypatch.setattr(engine, 'train_unit', marking)
  with counting_compiles() as compiled:
    result = sweep.run(chunked, progress=False)
  marks = [started[c] for c in range(len(planned))] + [len(compiled)]
  per_unit = [compiled[a:b] for a, b in zip(marks, marks[1:], strict=False)]
  # The first chunk of each optimizer compiles its programs of width 2 (the baseline's
  # are of width 4); its second chunk reuses every one of them.
  assert any('segment' in name for name in per_unit[0]), per_unit
  assert any('segment' in name for name in per_unit[2]), per_unit
  assert per_unit[1] == [] and per_unit[3] == [], per_unit

  assert_tables_close(result.table, baseline.table, TABLE_RTOL, one_example(full))
  assert_params_close(all_params(result), all_params(baseline))


def test_set_cpu_devices_only_before_jax_starts():
  code = (
    'import jax, sweep\n'
    'first = sweep.set_cpu_devices(3)\n'
    'n = jax.local_device_count()\n'
    'print(first, n, sweep.set_cpu_devices(2), jax.local_device_count())\n'
  )
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=TIMEOUT
  )
  assert out.stdout.split() == ['True', '3', 'False', '3'], out.stderr
  # A device count the user set is kept.
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=TIMEOUT
  )
  assert out.stdout.split() == ['False', '2', 'False', '2'], out.stderr
  with pytest.raises(sweep.ConfigError, match='count'):
    sweep.set_cpu_devices(0)


def test_four_devices_match_one(subprocess_sweeps):
  sweeps = subprocess_sweeps.wait()
  one, four = sweeps.one, sweeps.four
  report_one, report_four = one.report(), four.report()
  segments = 2 * worker.config().num_evals  # 2 units, each trained segment by segment
  assert report_one['local_device_count'] == 1
  assert report_one['param_devices'] == [1] * segments
  assert report_four['local_device_count'] == 4
  # The parameters entering every segment are split over the 4 devices along the run
  # axis: one slot of the 4 (3 runs and a pad) on each device.
  assert report_four['param_devices'] == [4] * segments
  assert report_four['run_axis_shards'] == [[1, 4]] * segments

  assert_tables_close(four.table(), one.table(), TABLE_RTOL, one_example(worker.config()))
  assert_params_close(four.params(), one.params())


def test_two_processes_match_one(subprocess_sweeps):
  sweeps = subprocess_sweeps.wait()
  one, hosts, workdir = sweeps.one, sweeps.hosts, sweeps.workdir
  one.report()
  reports = [h.report() for h in hosts]
  num_evals = worker.config().num_evals
  owners = reports[0]['owners']
  assert len(owners) >= 2
  for i, report in enumerate(reports):
    assert report['process_index'] == i and report['process_count'] == 2
    assert report['owners'] == owners
    # Each process trained its own units, at least one, segment by segment.
    assert owners.count(i) >= 1, owners
    assert report['segments'] == num_evals * owners.count(i)

  expected = one.table()
  actual = pd.read_csv(workdir / 'results.csv')
  assert_tables_close(actual, expected, rtol=0)
  front = sorted(int(i) for i in expected.loc[expected.pareto, 'run'])
  assert front and sweep.checkpoints.saved_runs(str(workdir)) == front
  params = one.params()
  for i in front:
    saved = jax.tree_util.tree_leaves_with_path(sweep.restore_params(str(workdir), i))
    assert saved
    for path, leaf in saved:
      reference = params[f'{i}/{jax.tree_util.keystr(path)}']
      assert leaf.dtype == reference.dtype and np.array_equal(leaf, reference), (i, path)


def test_two_processes_resume_after_sigterm(subprocess_sweeps, tmp_path):
  """Preempted after its first segment, each of 2 processes saves its own state; the
  same two commands again resume from there and end with one process's numbers."""
  one = subprocess_sweeps.wait().one
  one.report()
  workdir = tmp_path / 'workdir'
  stopped = two_processes(tmp_path, 'stopped', workdir, env={'SCALE_WORKER_SIGTERM_AFTER': '1'})
  wait_all(stopped, linked=[])
  for w in stopped:
    assert w.proc.returncode == 143, f'exit code {w.proc.returncode}:\n{w.output()[-5000:]}'
  for p in range(2):
    steps = [n for n in os.listdir(workdir / 'state' / f'process-{p}-of-2') if n.isdigit()]
    assert steps, p
  assert not (workdir / 'results.csv').exists()

  resumed = two_processes(tmp_path, 'resumed', workdir)
  wait_all(resumed, linked=resumed)
  reports = [w.report() for w in resumed]
  owners = reports[0]['owners']
  num_evals = worker.config().num_evals
  for i, report in enumerate(reports):
    # Only what was left: each unit's segments after the first.
    assert report['segments'] == (num_evals - 1) * owners.count(i), report
  assert_tables_close(pd.read_csv(workdir / 'results.csv'), one.table(), rtol=0)
