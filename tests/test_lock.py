"""One writer per workdir: the lock alone (no JAX), then real `sweep run`s on one workdir.

The lock (`sweep.lock`): a second writer is refused in one line naming the holder; each
process of a multi-process sweep has its own; a SIGKILLed holder leaves no stale lock;
`wait` takes it once the holder lets go; a lease stands in where the file system has no
locks.

The command, in subprocesses sharing a compilation cache: a `sweep run` on a workdir
whose run is stopped mid-run (SIGSTOP after its first checkpoint) is refused at once
(exit 3) while one with `--wait` waits and then reads the finished sweep; two started
together: one trains, the other is refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import sweep
from sweep import lock

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120


# ------------------------------------------------------------------ the lock alone ----


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path):
  workdir = str(tmp_path / 'w')
  with lock.WorkdirLock(workdir):
    with pytest.raises(lock.WorkdirBusy) as e:
      lock.WorkdirLock(workdir).acquire()
  message = str(e.value)
  assert '\n' not in message
  assert f'pid {os.getpid()} on host {socket.gethostname()} since 20' in message, message
  assert 'wait=True (CLI: --wait)' in message and os.path.join(workdir, '.lock') in message
  assert (tmp_path / 'w' / '.lock').read_text() == ''  # let go: it names nobody
  with lock.WorkdirLock(workdir) as again:
    assert again.held


def test_each_process_of_a_sweep_holds_its_own_lock(tmp_path):
  workdir = str(tmp_path)
  with lock.WorkdirLock(workdir, process=0), lock.WorkdirLock(workdir, process=1):
    with pytest.raises(lock.WorkdirBusy, match=r'\.lock-1'):
      lock.WorkdirLock(workdir, process=1).acquire()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['.lock', '.lock-1']


HOLD = """
import sys, time
from sweep import lock
lock.WorkdirLock(sys.argv[1]).acquire()
print('held', flush=True)
time.sleep(120)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  holder = subprocess.Popen(
    [sys.executable, '-c', HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(lock.WorkdirBusy, match=f'pid {holder.pid} on host'):
      lock.WorkdirLock(str(tmp_path)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=TIMEOUT)
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()
  start = time.monotonic()
  with lock.WorkdirLock(str(tmp_path)) as taken:
    assert taken.held and time.monotonic() - start < 0.5


def test_wait_takes_the_lock_once_the_holder_lets_go(tmp_path):
  workdir = str(tmp_path)
  holder = lock.WorkdirLock(workdir)
  holder.acquire()
  start = time.monotonic()
  with pytest.raises(lock.WorkdirBusy):
    lock.WorkdirLock(workdir, wait=0.3).acquire()  # waits that long at most
  assert 0.3 <= time.monotonic() - start < 2
  threading.Timer(0.5, holder.release).start()
  said = []
  waiting = lock.WorkdirLock(workdir, wait=True)
  waiting.acquire(say=said.append)
  assert waiting.held and len(said) == 1 and 'waiting for it' in said[0], said
  waiting.release()


def test_without_file_locks_a_lease_stands_in(tmp_path, monkeypatch):
  monkeypatch.setenv('SWEEP_TEST_NO_FLOCK', '1')
  monkeypatch.setattr(lock, 'SETTLE_SECONDS', 0.01)
  workdir = str(tmp_path)
  path = tmp_path / '.lock'
  with lock.WorkdirLock(workdir):
    with pytest.raises(lock.WorkdirBusy, match=f'pid {os.getpid()} on host'):
      lock.WorkdirLock(workdir).acquire()
  assert not path.exists()  # let go

  def lease(**fields) -> None:
    now = time.time()
    record = {'host': 'elsewhere', 'pid': 1, 'since': 'then', 'token': 'x', 'renewed': now}
    path.write_text(json.dumps({**record, **fields}))

  lease()  # live, on another host
  with pytest.raises(lock.WorkdirBusy, match='host elsewhere'):
    lock.WorkdirLock(workdir).acquire()
  lease(renewed=time.time() - 2 * lock.LEASE_SECONDS)  # not renewed: its holder is gone
  with lock.WorkdirLock(workdir) as taken:
    assert taken.held
  dead = subprocess.run(
    [sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True
  )
  lease(host=socket.gethostname(), pid=int(dead.stdout))  # on this host, and not running
  with lock.WorkdirLock(workdir) as taken:
    assert taken.held


def test_wait_is_checked_before_anything_runs(tmp_path):
  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(4,)),
    data=sweep.data.synthetic_regression(n_train=16, n_val=0, dim=2),
  )
  with pytest.raises(sweep.ConfigError, match=r'^wait=-1 is invalid: expected True, False'):
    sweep.run(cfg, str(tmp_path / 'w'), wait=-1, progress=False)
  assert not (tmp_path / 'w').exists()


# ------------------------------------------------------------------ the command ----

EXPERIMENT = textwrap.dedent("""
  import numpy as np
  import sweep


  def get_config():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = np.argmax(x[:, :4], axis=1).astype(np.int32)
    return sweep.SweepConfig(
        model=sweep.models.mlp(hidden=(16,)),
        data=sweep.data.arrays(x[:200], y[:200], x[200:], y[200:]),
        learning_rate=[0.01, 0.03],
        batch_size=[20],
        epochs=20,
        num_evals=20,
    )
""")


@pytest.fixture(scope='module')
def experiment(tmp_path_factory) -> tuple[Path, dict[str, str]]:
  root = tmp_path_factory.mktemp('lock-cli')
  path = root / 'experiment.py'
  path.write_text(EXPERIMENT)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
  env['SWEEP_CACHE_DIR'] = str(root / 'jax-cache')  # only the first process compiles
  env['SWEEP_CPU_DEVICES'] = '1'
  env.pop('XLA_FLAGS', None)
  return path, env


def start(experiment, workdir: Path, *flags: str, stderr=subprocess.PIPE) -> subprocess.Popen:
  path, env = experiment
  argv = [sys.executable, '-m', 'sweep', 'run', str(path), '--workdir', str(workdir)]
  return subprocess.Popen(
    argv + ['--no-progress', '--no-report', *flags],
    env=env,
    stdout=subprocess.PIPE,
    stderr=stderr,
    text=True,
  )


def until(condition, what: str) -> None:
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return proc.returncode, out, err


def holder_pid(workdir: Path) -> int | None:
  try:
    text = (workdir / '.lock').read_text()
  except FileNotFoundError:
    return None
  return json.loads(text)['pid'] if text.endswith('}') else None


def test_a_run_on_a_workdir_in_use_is_refused_at_once_or_waits(experiment, tmp_path):
  workdir = tmp_path / 'w'
  first = start(experiment, workdir)
  try:
    until(
      lambda: (workdir / 'state').is_dir() and any(workdir.glob('state/[0-9]*')), 'a checkpoint'
    )
    first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock
    began = time.monotonic()
    code, out, err = finish(start(experiment, workdir))
    assert code == 3, (code, out, err)
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    assert f'is in use by pid {first.pid} on host {socket.gethostname()} since 20' in err, err
    assert time.monotonic() - began < 60  # at once: no waiting, no training
    log = tmp_path / 'waiting.err'
    with open(log, 'w') as stderr:
      waiting = start(experiment, workdir, '--wait', stderr=stderr)
    until(lambda: 'waiting for it' in log.read_text(), 'the waiting line')
    assert waiting.poll() is None
    first.send_signal(signal.SIGCONT)
    code, out, err = finish(first)
    assert code == 0, (code, out, err)
    code, again, _ = finish(waiting)
    assert code == 0, (code, again, log.read_text())
    assert 'nothing to train' in again, again  # the finished sweep, read back

    def best(text: str) -> list[str]:
      lines = text.splitlines()
      return lines[next(i for i, line in enumerate(lines) if line.startswith('Best ')) :]

    assert best(again) == best(out)
  finally:
    for proc in (first,):
      if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
  assert len(sweep.load(str(workdir)).table) == 2


def test_two_runs_started_together_one_trains_the_other_is_refused(experiment, tmp_path):
  workdir = tmp_path / 'w'
  procs = [start(experiment, workdir), start(experiment, workdir)]
  try:
    until(lambda: holder_pid(workdir) is not None, 'a holder')
    winner = next(p for p in procs if p.pid == holder_pid(workdir))
    winner.send_signal(signal.SIGSTOP)  # the other claims while the winner holds the lock
    loser = next(p for p in procs if p is not winner)
    code, _, err = finish(loser)
    assert code == 3 and f'in use by pid {winner.pid}' in err, (code, err)
    winner.send_signal(signal.SIGCONT)
    code, out, err = finish(winner)
    assert code == 0 and out.startswith('2 runs'), (code, out, err)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
