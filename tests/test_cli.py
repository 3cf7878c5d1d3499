"""The `sweep run` command line, end to end, in subprocesses.

A tiny experiment (an MLP on the digits set, 3 learning rates x 2 batch sizes, 2 epochs,
one learning rate far too large so that it diverges) runs once through the `sweep` console
script and once through `python -m sweep`; every check reads what those two runs printed
and wrote. Each subprocess pays for importing jax and compiling, so there are few of them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

LEARNING_RATES = [0.03, 0.3, 1e4]  # sgd at 1e4 diverges on its first update
DIVERGING_LR = 1e4
BATCH_SIZES = [64, 256]
EPOCHS = 2
NUM_RUNS = len(LEARNING_RATES) * len(BATCH_SIZES)

EXPERIMENT = f"""
import sweep


def get_config():
  return sweep.SweepConfig(
      model=sweep.models.mlp(hidden=(16,)),
      data=sweep.data.digits(),
      optimizer='sgd',
      learning_rate={LEARNING_RATES!r},
      batch_size={BATCH_SIZES!r},
      epochs={EPOCHS!r},
      name='cli-test',
  )
"""

RESULT_COLUMNS = {
  'run',
  'optimizer',
  'schedule',
  'batch_size',
  'learning_rate',
  'seed',
  'status',
  'updates',
  'examples',
  'final_train_loss',
  'final_val_loss',
  'best_val_loss',
  'final_val_accuracy',
}
OUTPUTS = ('results.csv', 'curves.csv', 'config.json')


def sweep_script() -> str:
  found = shutil.which('sweep', path=os.path.dirname(sys.executable)) or shutil.which('sweep')
  if found is None:
    pytest.skip('the sweep console script is not installed')
  return found


def run_cli(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
  return f'exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'


@dataclasses.dataclass
class CliRun:
  proc: subprocess.CompletedProcess
  workdir: Path
  experiment: Path

  def read_json(self) -> dict:
    return json.loads((self.workdir / 'config.json').read_text())


@pytest.fixture(scope='module', params=['sweep', 'python -m sweep'])
def cli_run(request, tmp_path_factory) -> CliRun:
  """One sweep through the console script (no progress bar), one through `python -m`."""
  root = tmp_path_factory.mktemp('cli')
  experiment = root / 'tiny_experiment.py'
  experiment.write_text(EXPERIMENT)
  workdir = root / 'out'
  if request.param == 'sweep':
    argv = [sweep_script(), 'run', str(experiment), '--workdir', str(workdir), '--no-progress']
  else:
    argv = [sys.executable, '-m', 'sweep', 'run', str(experiment), '--workdir', str(workdir)]
  return CliRun(run_cli(argv, cwd=root), workdir, experiment)


@pytest.fixture
def ok_run(cli_run) -> CliRun:
  assert cli_run.proc.returncode == 0, describe(cli_run.proc)
  return cli_run


def test_exits_zero_and_writes_the_outputs(cli_run):
  assert cli_run.proc.returncode == 0, describe(cli_run.proc)
  assert 'Traceback' not in cli_run.proc.stderr
  for name in OUTPUTS:
    assert (cli_run.workdir / name).is_file(), (
      f'{name} missing: {sorted(os.listdir(cli_run.workdir))}'
    )
  assert str(cli_run.workdir / 'results.csv') in cli_run.proc.stdout


def test_results_csv_has_one_row_per_run(ok_run):
  table = pd.read_csv(ok_run.workdir / 'results.csv')
  assert len(table) == NUM_RUNS
  assert RESULT_COLUMNS <= set(table.columns), f'missing {RESULT_COLUMNS - set(table.columns)}'
  assert table['run'].tolist() == list(range(NUM_RUNS))
  assert sorted(zip(table.learning_rate, table.batch_size, strict=True)) == sorted(
    itertools.product(LEARNING_RATES, BATCH_SIZES)
  )
  assert set(table.optimizer) == {'sgd'}
  assert set(table.status) <= {'ok', 'diverged'}

  diverged = table[table.status == 'diverged']
  assert sorted(diverged.learning_rate) == [DIVERGING_LR] * len(BATCH_SIZES)

  n_train = ok_run.read_json()['data']['n_train']
  ok = table[table.status == 'ok']
  assert len(ok) == NUM_RUNS - len(BATCH_SIZES)
  for _, row in ok.iterrows():
    assert row.updates == round(EPOCHS * (n_train // row.batch_size)), row.to_dict()
    assert row.examples == row.updates * row.batch_size
    assert math.isfinite(row.final_val_loss) and math.isfinite(row.final_train_loss)
    assert 0 <= row.final_val_accuracy <= 1
  for _, row in diverged.iterrows():
    assert row.updates < round(EPOCHS * (n_train // row.batch_size)), row.to_dict()


def test_summary_names_the_best_runs_and_the_diverged_count(ok_run):
  out = ok_run.proc.stdout
  table = pd.read_csv(ok_run.workdir / 'results.csv')
  ok = table[table.status == 'ok'].sort_values('final_val_loss')

  head = re.search(r'(\d+) runs in [\d.]+ s; (\d+) diverged', out)
  assert head, out
  assert int(head.group(1)) == NUM_RUNS
  assert int(head.group(2)) == int((table.status == 'diverged').sum()) == len(BATCH_SIZES)

  lines = out.splitlines()
  best = [i for i, line in enumerate(lines) if re.match(r'Best \d+ by final_val_loss:', line)]
  assert best, out
  shown = min(5, len(ok))
  assert lines[best[0]].startswith(f'Best {shown} by final_val_loss')
  header = lines[best[0] + 1].split()
  rows = [dict(zip(header, line.split(), strict=True)) for line in lines[best[0] + 2 :][:shown]]
  for printed, (_, expected) in zip(rows, ok.head(shown).iterrows(), strict=True):
    assert printed['status'] == 'ok'
    assert int(printed['batch_size']) == expected.batch_size
    assert math.isclose(float(printed['learning_rate']), expected.learning_rate, rel_tol=1e-3)
    assert math.isclose(float(printed['final_val_loss']), expected.final_val_loss, rel_tol=1e-3)


def test_the_summary_fits_a_100_column_terminal(ok_run):
  out = ok_run.proc.stdout
  summary = out[: out.index('Wrote ')].splitlines()
  assert max(len(line) for line in summary) <= 100, out
  header = next(line for line in summary if 'status' in line).split()
  assert header[:2] == ['batch_size', 'learning_rate'] and 'final_val_loss' in header
  assert 'seed' not in header  # an axis that does not vary is left out


def test_the_recommended_batch_size_is_one_line(ok_run):
  import sweep
  from sweep.results import Result

  lines = [line for line in ok_run.proc.stdout.splitlines() if line.startswith('Batch size:')]
  assert len(lines) == 1 and len(lines[0]) <= 100, ok_run.proc.stdout
  found = re.match(r'Batch size: (\d+) recommended, (.+)\.$', lines[0])
  assert found and int(found.group(1)) in BATCH_SIZES, lines[0]
  # The same answer as the analysis of the workdir's files.
  choice = sweep.analysis.choose_batch_size(Result.load(str(ok_run.workdir)))
  assert lines[0] == f'Batch size: {choice.short}.'
  assert int(found.group(1)) == choice.batch_size


def test_config_json_records_axes_budget_versions_and_devices(ok_run):
  config = ok_run.read_json()
  assert config['name'] == 'cli-test'
  assert config['num_runs'] == NUM_RUNS
  axes = config['axes']
  assert axes['learning_rate'] == LEARNING_RATES
  assert axes['batch_size'] == BATCH_SIZES
  assert axes['optimizer'] == ['sgd']
  assert axes['schedule'] == ['constant']
  assert axes['seed'] == [0]
  assert config['budget'] == {'epochs': EPOCHS, 'updates': None}
  assert config['data']['name'] == 'digits'
  env = config['environment']
  for package in ('jax', 'jaxlib', 'optax', 'flax', 'numpy'):
    assert env['packages'][package] == metadata.version(package), package
  assert env['devices'] and all(isinstance(d, str) and d for d in env['devices'])
  assert env['python'] == '.'.join(map(str, sys.version_info[:3]))


def test_curves_csv_has_every_evaluation_point(ok_run):
  curves = pd.read_csv(ok_run.workdir / 'curves.csv')
  num_evals = ok_run.read_json()['num_evals']
  assert {'run', 'eval', 'updates', 'train_loss', 'val_loss'} <= set(curves.columns)
  assert sorted(curves['run'].unique()) == list(range(NUM_RUNS))
  for run, points in curves.groupby('run'):
    assert points['eval'].tolist() == list(range(num_evals + 1)), run
    assert points['updates'].iloc[0] == 0


def test_no_temporary_files_are_left(ok_run):
  leftovers = [
    str(p.relative_to(ok_run.workdir))
    for p in ok_run.workdir.rglob('*')
    if p.name.startswith('.') and p.name.endswith('.tmp')
  ]
  assert leftovers == []


def test_written_files_respect_the_umask(ok_run):
  """Results are ordinary files: readable by whoever the umask lets read them."""
  umask = os.umask(0)
  os.umask(umask)
  for name in OUTPUTS:
    mode = (ok_run.workdir / name).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, f'{name} has mode {oct(mode)}, umask {oct(umask)}'


# ---------------------------------------------------------------------------------------------
# Mistakes: a clear message on stderr, no traceback, a non-zero exit.

BAD_CONFIG = """
import sweep


def get_config():
  return sweep.SweepConfig(
      model=sweep.models.mlp(hidden=(4,)), data=sweep.data.digits(), learning_rate=-1.0
  )
"""

BAD_DATA = """
import numpy as np
import sweep


def get_config():
  x = np.zeros((10, 3), np.float32)
  y = np.zeros(9, np.int32)
  return sweep.SweepConfig(model=sweep.models.mlp(), data=sweep.data.arrays(x, y))
"""

NOT_A_CONFIG = """
def get_config():
  return {'learning_rate': 0.1}
"""

ERROR_CASES = [
  # id, experiment source (None: the file does not exist), exit code (None: any non-zero), stderr
  ('missing-file', None, None, ('does not exist', '{path}')),
  ('no-get-config', 'X = 1\n', None, ('get_config', '{path}')),
  ('not-a-sweep-config', NOT_A_CONFIG, None, ('SweepConfig', 'dict')),
  ('bad-config', BAD_CONFIG, 2, ('learning_rate', '-1.0', '{path}')),
  # A ConfigError raised while get_config builds the config is a bad config too.
  ('bad-data-in-get-config', BAD_DATA, 2, ('data.y_train', '9', '10')),
]


@pytest.mark.parametrize(
  'source, code, fragments', [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_mistakes_give_a_message_and_a_nonzero_exit(tmp_path, source, code, fragments):
  experiment = tmp_path / 'experiment.py'
  if source is not None:
    experiment.write_text(textwrap.dedent(source))
  workdir = tmp_path / 'out'
  proc = run_cli(
    [
      sys.executable,
      '-m',
      'sweep',
      'run',
      str(experiment),
      '--workdir',
      str(workdir),
      '--no-progress',
    ],
    cwd=tmp_path,
  )
  if code is None:
    assert proc.returncode != 0, describe(proc)
  else:
    assert proc.returncode == code, describe(proc)
  assert 'Traceback' not in proc.stderr, describe(proc)
  for fragment in fragments:
    assert fragment.format(path=experiment.name) in proc.stderr, describe(proc)
  assert not (workdir / 'results.csv').exists()
