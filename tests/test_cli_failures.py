"""`sweep run` fails in one line, never a traceback, and a rerun then gives the right numbers.

In this process (`sweep.cli.main`, nothing compiles): an unknown or a missing
`SweepConfig` keyword, and a workdir that is a file.

Through the real command, on one workdir, in subprocesses (they share a compilation
cache, so only the first compiles): a run stopped by SIGINT once a checkpoint is on
disk (exit 130, the state saved); the same command on another device count (refused,
the workdir untouched); then, on a small file system that fills up, the run resumed
until the disk is full (exit 1: "no space left on ..."), resumed again once there is
room, and read once more from the file system mounted read-only (exit 0, nothing
written). The final numbers must be those of the same sweep run here in one go.
Where no file system can be mounted (no user namespaces), the disk fills through the
writers' fault hook and read-only is a chmod (skipped for root, which writes anyway).

And, without JAX: a write that fails half-way (a file size limit, as a full disk)
leaves the old file and the old checkpoint whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import sweep
from sweep import cli

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300

EXPERIMENT = """
import jax
import jax.numpy as jnp
import numpy as np

import sweep


def init(key):
  k1, k2 = jax.random.split(key)
  return {
      'w1': jax.random.normal(k1, (16, 32)) / 4, 'b1': jnp.zeros(32),
      'w2': jax.random.normal(k2, (32, 4)) / 6, 'b2': jnp.zeros(4),
  }


def apply(params, x):
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


def get_config():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 4))
  x = rng.normal(size=(700, 16)).astype(np.float32)
  y = np.argmax(x @ w + 0.5 * rng.normal(size=(700, 4)), axis=1).astype(np.int32)
  return sweep.SweepConfig(
      model=(init, apply),
      data=sweep.data.arrays(x[:600], y[:600], x[600:], y[600:], name='synthetic'),
      optimizer='adam',
      learning_rate=[0.003, 0.01, 0.03],
      batch_size=[25, 60],
      epochs=30,
      num_evals=60,
      name='cli-failures',
  )
"""


def describe(proc) -> str:
  return f'exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'


# ------------------------------------------------------------------ in this process ----


def main(argv, monkeypatch, capsys) -> tuple[int, str]:
  monkeypatch.setenv('SWEEP_NO_CACHE', '1')
  jax.local_devices()  # JAX is up: the command keeps this process's devices as they are
  code = cli.main(argv)
  return code, capsys.readouterr().err


@pytest.mark.parametrize(
  'source, fragments',
  [
    (
      'sweep.SweepConfig(model=sweep.models.mlp(), data=data, lerning_rate=0.1)',
      [
        "SweepConfig has no field 'lerning_rate' (did you mean 'learning_rate'?)",
        'its fields are: model, data, loss',
      ],
    ),
    (
      'sweep.SweepConfig(model=sweep.models.mlp(), data=data).replace(batchsize=8)',
      ["no field 'batchsize' (did you mean 'batch_size'?)"],
    ),
    ('sweep.SweepConfig(data=data)', ["SweepConfig needs 'model'"]),
    ('undefined_name + 1', ['experiment.py line 8: NameError']),
  ],
  ids=['unknown-keyword', 'unknown-in-replace', 'missing-model', 'error-in-the-file'],
)
def test_mistakes_in_the_experiment_are_one_line(tmp_path, monkeypatch, capsys, source, fragments):
  experiment = tmp_path / 'experiment.py'
  experiment.write_text(
    textwrap.dedent(f"""
    import numpy as np
    import sweep


    def get_config():
      data = sweep.data.arrays(np.zeros((8, 2), np.float32), np.zeros(8, np.int32))
      return {source}
  """)
  )
  code, err = main(
    ['run', str(experiment), '--workdir', str(tmp_path / 'out'), '--no-progress'],
    monkeypatch,
    capsys,
  )
  assert code == 2, err
  assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
  for fragment in fragments:
    assert fragment in err, err
  assert not (tmp_path / 'out').exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
  experiment = tmp_path / 'experiment.py'
  experiment.write_text(EXPERIMENT)
  workdir = tmp_path / 'results'
  workdir.write_text('not a directory')
  code, err = main(['run', str(experiment), '--workdir', str(workdir)], monkeypatch, capsys)
  assert (
    code == 2 and err.strip() == f'sweep: --workdir {str(workdir)!r} is a file, not a directory'
  ), err
  with pytest.raises(sweep.ConfigError, match='this path is a file'):
    sweep.run(cli.load_experiment(str(experiment)), workdir=str(workdir), progress=False)
  assert workdir.read_text() == 'not a directory'


# ------------------------------------------------------------ the real command ----


def environment(root: Path, devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
  env['SWEEP_CACHE_DIR'] = str(root / 'jax-cache')
  env['SWEEP_CPU_DEVICES'] = str(devices)
  env.pop('XLA_FLAGS', None)
  env.pop('SWEEP_TEST_WRITE_LIMIT', None)
  return env


def command(experiment: Path, workdir: Path | str) -> list[str]:
  return [
    sys.executable,
    '-m',
    'sweep',
    'run',
    str(experiment),
    '--workdir',
    str(workdir),
    '--no-progress',
    '--no-report',
  ]


def steps(workdir: Path) -> list[int]:
  state = workdir / 'state'
  return sorted(int(p.name) for p in state.iterdir() if p.name.isdigit()) if state.is_dir() else []


def snapshot(directory: Path) -> dict[str, tuple]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name.startswith('.lock'):
        continue  # the writer's lock (sweep.lock), not the workdir's content
      path = Path(root) / name
      out[str(path.relative_to(directory))] = (
        path.stat().st_mtime_ns,
        hashlib.sha256(path.read_bytes()).hexdigest(),
      )
  return out


def mountable() -> bool:
  """Whether this process may mount a small file system of its own (a user namespace)."""
  if not shutil.which('unshare'):
    return False
  probe = subprocess.run(
    [
      'unshare',
      '--user',
      '--map-root-user',
      '--mount',
      'sh',
      '-c',
      'mount -t tmpfs -o size=1m tmpfs "$0"',
      '/tmp',
    ],
    capture_output=True,
    timeout=60,
  )
  return probe.returncode == 0


# Each step: a name, the shell commands before it, and whether its run is expected to write.
SCRIPT = """
set -u
W="$1"; OUT="$2"; shift 2
step() {{ name="$1"; shift; "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"; echo $? >"$OUT/$name.rc"; }}
{setup}
step full {command}
{loosen}
step resumed {command}
{readonly}
step readonly {command}
{teardown}
"""

TMPFS = dict(
  setup='M=$(mktemp -d); mount -t tmpfs -o size=64m tmpfs "$M"; cp -a "$W" "$M/w"; '
  'used=$(df -B1 --output=used "$M" | tail -1); mount -o remount,size=$((used + 16384)) "$M"; '
  'W="$M/w"',
  loosen='mount -o remount,size=64m "$M"',
  readonly='mount -o remount,ro "$M"',
  teardown='mkdir -p "$OUT/w"; cp -a "$W/." "$OUT/w/"',
)
HOOK = dict(
  setup='export SWEEP_TEST_WRITE_LIMIT=16384',
  loosen='unset SWEEP_TEST_WRITE_LIMIT',
  readonly='chmod -R a-w "$W"' if os.geteuid() != 0 else 'true',
  teardown='chmod -R u+w "$W"; mkdir -p "$OUT/w"; cp -a "$W/." "$OUT/w/"',
)


@pytest.fixture(scope='module')
def scenario(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli-failures')
  experiment = root / 'experiment.py'
  experiment.write_text(EXPERIMENT)
  workdir = root / 'w'
  out = {'root': root, 'experiment': experiment, 'workdir': workdir}

  # SIGINT once the first checkpoint is on disk.
  err_path = root / 'sigint.err'
  with open(err_path, 'w') as err:
    proc = subprocess.Popen(
      command(experiment, workdir),
      cwd=root,
      env=environment(root),
      stdout=subprocess.DEVNULL,
      stderr=err,
    )
    try:
      deadline = time.monotonic() + TIMEOUT
      while not steps(workdir):
        assert proc.poll() is None, f'exited with {proc.returncode} first:\n{err_path.read_text()}'
        assert time.monotonic() < deadline, 'no checkpoint appeared'
        time.sleep(0.01)
      proc.send_signal(signal.SIGINT)
      out['sigint'] = (proc.wait(timeout=TIMEOUT), err_path.read_text(), steps(workdir))
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  # Another device count: refused, nothing changed.
  before = snapshot(workdir)
  refused = subprocess.run(
    command(experiment, workdir),
    cwd=root,
    env=environment(root, devices=2),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  out['refused'] = (refused, before == snapshot(workdir))

  # The full disk, the resume and the read-only rerun, in one script.
  results = root / 'steps'
  results.mkdir()
  real = mountable()
  script = SCRIPT.format(
    command=' '.join(map(str, command(experiment, '"$W"'))), **(TMPFS if real else HOOK)
  )
  argv = ['sh', '-c', script, 'sh', str(workdir), str(results)]
  if real:
    argv = ['unshare', '--user', '--map-root-user', '--mount', *argv]
  else:
    shutil.copytree(workdir, root / 'copy')
    argv[-2] = str(root / 'copy')
  done = subprocess.run(
    argv, cwd=root, env=environment(root), capture_output=True, text=True, timeout=3 * TIMEOUT
  )
  assert done.returncode == 0, describe(done)
  out['real'] = real
  out['steps'] = {
    name: (
      int((results / f'{name}.rc').read_text()),
      (results / f'{name}.out').read_text(),
      (results / f'{name}.err').read_text(),
    )
    for name in ('full', 'resumed', 'readonly')
  }
  out['final'] = results / 'w'
  return out


@pytest.fixture(scope='module')
def reference(scenario) -> sweep.Result:
  """The same sweep in this process, in one go, on one device."""
  if jax.local_device_count() != 1:
    pytest.skip('the reference must run on one device, as the command does')
  return sweep.run(cli.load_experiment(str(scenario['experiment'])), progress=False)


def test_sigint_saves_exits_130_and_says_so_in_lines_not_tracebacks(scenario):
  code, err, saved = scenario['sigint']
  assert code == 130, err
  assert 'SIGINT received' in err and 'state saved at segment' in err, err
  assert 'Traceback' not in err and 'Exception in thread' not in err, err
  assert saved and not (scenario['workdir'] / 'results.csv').exists()


def test_another_device_count_is_refused_naming_it(scenario):
  proc, unchanged = scenario['refused']
  assert proc.returncode == 2, describe(proc)
  assert 'local_device_count: 1 -> 2' in proc.stderr and '--fresh' in proc.stderr, describe(proc)
  assert len(proc.stderr.strip().splitlines()) == 1, describe(proc)
  assert unchanged


def test_a_full_disk_is_one_line_and_frees_the_partial_files(scenario):
  code, _, err = scenario['steps']['full']
  assert code == 1, err
  # Warnings about slow layers (one line each) may come first; the failure is one line.
  lines = [
    line
    for line in err.splitlines()
    if line.startswith('sweep:') and 'under the run axis' not in line
  ]
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith('sweep: no space left on ') and 'rerun to resume' in lines[0], err
  freed = int(lines[0].split('freed ')[1].split(' bytes')[0])
  assert freed > 0, lines[0]


def test_the_rerun_resumes_and_a_read_only_rerun_writes_nothing(scenario, reference):
  for name in ('resumed', 'readonly'):
    code, out, err = scenario['steps'][name]
    assert code == 0, f'{name}: {err}'
    # Only the warnings about the experiment's slow layers, and those only while training.
    failures = [
      line
      for line in err.splitlines()
      if line.startswith('sweep:') and 'under the run axis' not in line
    ]
    assert 'Traceback' not in err and not failures, f'{name}: {err}'
    if name == 'readonly':
      assert 'sweep:' not in err, err
      assert 'holds this sweep finished: nothing to train' in out, out
    else:  # where the full disk stopped it: training, or writing the results
      said = r'^(Resuming .*(units finished|goes on after evaluation)|.* holds this sweep finished)'
      assert re.search(said, out, re.M), out
    assert '6 runs in' in out, out
  final = scenario['final']
  expected = pd.read_csv(pd.io.common.StringIO(reference.table.to_csv(index=False)))
  actual = pd.read_csv(final / 'results.csv')
  pd.testing.assert_frame_equal(
    actual.drop(columns='seconds'), expected.drop(columns='seconds'), check_exact=True
  )
  curves = pd.read_csv(pd.io.common.StringIO(reference.curves.to_csv(index=False)))
  pd.testing.assert_frame_equal(pd.read_csv(final / 'curves.csv'), curves, check_exact=True)
  for i in sweep.checkpoints.saved_runs(str(final)):
    for a, b in zip(
      jax.tree.leaves(sweep.restore_params(str(final), i)),
      jax.tree.leaves(reference.params(i)),
      strict=True,
    ):
      assert np.array_equal(a, b), i


# ------------------------------------------------------------------- half a write ----

HALF_A_WRITE = """
import importlib.util, os, resource, signal, sys

spec = importlib.util.spec_from_file_location('files', sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
failed = []
for write in (lambda: files.atomic_write(sys.argv[2], b'new' * (1 << 20)),
              lambda: files.write_directory(sys.argv[3], {'state.npz': b'new' * (1 << 20)})):
  try:
    write()
  except OSError as e:
    failed.append(e.errno)
print(failed)
"""


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path):
  old = tmp_path / 'results.csv'
  old.write_text('run,final_val_loss\n0,0.25\n')
  checkpoint = tmp_path / 'state' / '7'
  sweep.files.write_directory(str(checkpoint), {'state.npz': b'old state', 'meta.json': b'{}'})
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      HALF_A_WRITE,
      str(REPO / 'sweep' / 'files.py'),
      str(old),
      str(checkpoint),
    ],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  assert proc.returncode == 0, describe(proc)
  assert proc.stdout.split() == ['[27,', '27]'], describe(proc)  # EFBIG, twice: both writes failed
  assert old.read_text() == 'run,final_val_loss\n0,0.25\n'
  assert sweep.files.verify(str(checkpoint)) is None
  assert (checkpoint / 'state.npz').read_bytes() == b'old state'
  assert sorted(p.name for p in tmp_path.rglob('*')) == [
    '7',
    'checksums.json',
    'meta.json',
    'results.csv',
    'state',
    'state.npz',
  ]
