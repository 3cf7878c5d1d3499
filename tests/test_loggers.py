"""TensorBoard, MLflow and W&B, each read back with its own reader.

One tiny sweep (an MLP on the digits set, 3 learning rates x 2 batch sizes, one learning rate
that diverges) runs once through `sweep run --log tensorboard,mlflow,wandb`, with W&B offline;
every check reads what the trackers hold: TensorBoard's event files through its
EventAccumulator and its HParams plugin served by a real TensorBoard, MLflow's store
through `MlflowClient`, W&B's offline run files through `wandb leet inspect --json`. Each
tracker is an optional extra; a test whose package is missing is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATES = [0.03, 0.3, 1e4]  # sgd at 1e4 diverges
BATCH_SIZES = [64, 256]
NUM_RUNS = len(LEARNING_RATES) * len(BATCH_SIZES)
TRACKERS = [m for m in ('tensorboard', 'mlflow', 'wandb') if importlib.util.find_spec(m)]

EXPERIMENT = f"""
import sweep


def get_config():
  return sweep.SweepConfig(
      model=sweep.models.mlp(hidden=(16,)),
      data=sweep.data.digits(),
      optimizer='sgd',
      learning_rate={LEARNING_RATES!r},
      batch_size={BATCH_SIZES!r},
      epochs=2,
      noise_scale=True,
      name='tracked',
  )
"""


def environment() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('WANDB_', 'MLFLOW_'))}
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
  return env


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    [sys.executable, '-m', 'sweep', *args],
    cwd=cwd,
    env=environment(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}'
  return proc


@pytest.fixture(scope='module')
def tracked(tmp_path_factory) -> Path:
  """The workdir of one sweep run with every installed tracker."""
  if not TRACKERS:
    pytest.skip('no tracker installed (pip install lrbs-sweep[trackers])')
  root = tmp_path_factory.mktemp('tracked')
  (root / 'experiment.py').write_text(EXPERIMENT)
  workdir = root / 'out'
  proc = run_cli(
    ['run', 'experiment.py', '--workdir', str(workdir), '--no-progress', '--no-report', '--log']
    + [','.join(TRACKERS)],
    cwd=root,
  )
  for name in TRACKERS:
    assert {'tensorboard': 'TensorBoard:', 'mlflow': 'MLflow:', 'wandb': 'W&B:'}[name] in (
      proc.stdout
    ), proc.stdout
  return workdir


@pytest.fixture(scope='module')
def table(tracked) -> pd.DataFrame:
  return pd.read_csv(tracked / 'results.csv')


@pytest.fixture(scope='module')
def curves(tracked) -> pd.DataFrame:
  """curves.csv as the trackers hold it: a diverged run's curve ends where it stopped
  (its later points, frozen at the same update, are left out)."""
  curves = pd.read_csv(tracked / 'curves.csv')
  return curves.drop_duplicates(['run', 'updates'], keep='first')


def close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))


# ---------------------------------------------------------------------------- TensorBoard


def tensorboard_runs(logdir: Path) -> dict[int, Path]:
  return {int(p.name[3:6]): p for p in logdir.iterdir() if p.is_dir() and p.name.startswith('run')}


def test_tensorboard_holds_every_run_with_its_curves_at_every_evaluation(tracked, curves):
  pytest.importorskip('tensorboard')
  from tensorboard.backend.event_processing import event_accumulator

  runs = tensorboard_runs(tracked / 'tensorboard')
  assert sorted(runs) == list(range(NUM_RUNS))
  for i, path in runs.items():
    acc = event_accumulator.EventAccumulator(str(path))
    acc.Reload()
    points = curves[curves.run == i]
    for tag in ('train_loss', 'val_loss', 'val_accuracy'):
      expected = [(int(u), v) for u, v in zip(points.updates, points[tag], strict=True) if v == v]
      got = [(e.step, e.value) for e in acc.Scalars(tag)]
      assert [s for s, _ in got] == [s for s, _ in expected], (i, tag)
      assert all(close(g, e) for (_, g), (_, e) in zip(got, expected, strict=True)), (i, tag)
    trained = points[points['eval'] > 0]
    assert [e.step for e in acc.Scalars('learning_rate')] == trained.updates.tolist()
    assert len(acc.Scalars('noise_scale_estimate')) >= 1


def test_tensorboards_hparams_table_shows_every_run_with_its_hyperparameters(tracked, table):
  """Served by a real TensorBoard: what its HParams dashboard asks for."""
  pytest.importorskip('tensorboard')
  from tensorboard import program

  board = program.TensorBoard()
  logdir = str(tracked / 'tensorboard')
  board.configure(argv=[None, '--logdir', logdir, '--port', '0', '--load_fast', 'false'])
  url = board.launch()
  request = {
    'experimentName': '',
    'allowedStatuses': ['STATUS_UNKNOWN', 'STATUS_SUCCESS', 'STATUS_FAILURE', 'STATUS_RUNNING'],
    'colParams': [],
    'startIndex': 0,
    'sliceSize': 100,
  }
  deadline = time.monotonic() + 60
  while True:  # TensorBoard reads the logdir in the background
    groups = post(url + 'data/plugin/hparams/session_groups', request)
    if groups.get('totalSize') == NUM_RUNS or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  assert groups['totalSize'] == NUM_RUNS
  experiment = post(url + 'data/plugin/hparams/experiment', {'experimentName': ''})
  names = {h['name'] for h in experiment['hparamInfos']}
  assert {'learning_rate', 'batch_size', 'status', 'optimizer'} <= names
  metrics = {m['name']['tag'] for m in experiment['metricInfos']}
  assert {'summary/final_val_loss', 'summary/best_val_accuracy'} <= metrics

  by_run = {int(g['name'][3:6]): g for g in groups['sessionGroups']}
  for _, row in table.iterrows():
    group = by_run[int(row.run)]
    assert group['hparams']['learning_rate'] == pytest.approx(row.learning_rate)
    assert group['hparams']['batch_size'] == row.batch_size
    assert group['hparams']['status'] == row.status
    status = group['sessions'][0]['status']
    assert status == ('STATUS_SUCCESS' if row.status == 'ok' else 'STATUS_FAILURE')
    values = {m['name']['tag']: m['value'] for m in group['metricValues']}
    if math.isfinite(row.final_val_loss):
      assert values['summary/final_val_loss'] == pytest.approx(row.final_val_loss, rel=1e-6)


def post(url: str, body: dict) -> dict:
  request = urllib.request.Request(
    url, data=json.dumps(body).encode(), headers={'Content-Type': 'application/json'}
  )
  with urllib.request.urlopen(request, timeout=30) as response:
    return json.loads(response.read())


# ---------------------------------------------------------------------------- MLflow


def mlflow_runs(workdir: Path) -> list:
  from mlflow.tracking import MlflowClient

  client = MlflowClient(f'sqlite:///{workdir / "mlflow.db"}')
  experiment = client.get_experiment_by_name('tracked')
  return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_mlflow_holds_the_sweep_and_a_nested_run_per_configuration(tracked, table, curves):
  pytest.importorskip('mlflow')
  client, runs = mlflow_runs(tracked)
  parents = [r for r in runs if r.data.tags.get('sweep.role') == 'sweep']
  assert len(parents) == 1
  parent = parents[0]
  assert parent.info.status == 'FINISHED'
  assert (
    parent.data.tags['sweep.fingerprint']
    == json.loads((tracked / 'config.json').read_text())['fingerprint']
  )
  artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
  assert {'config.json', 'results.csv', 'curves.csv', 'experiment.py'} <= artifacts

  children = {
    int(r.data.tags['sweep.run']): r
    for r in runs
    if r.data.tags.get('mlflow.parentRunId') == parent.info.run_id
  }
  assert sorted(children) == list(range(NUM_RUNS))
  for _, row in table.iterrows():
    child = children[int(row.run)]
    assert child.info.status == ('FINISHED' if row.status == 'ok' else 'FAILED')
    assert child.data.tags['status'] == row.status
    assert float(child.data.params['learning_rate']) == pytest.approx(row.learning_rate)
    assert int(child.data.params['batch_size']) == row.batch_size
    assert child.data.params['optimizer'] == 'sgd'
    if math.isfinite(row.final_val_loss):
      assert child.data.metrics['final_val_loss'] == pytest.approx(row.final_val_loss)
    points = curves[(curves.run == row.run) & curves.val_loss.notna()]
    history = client.get_metric_history(child.info.run_id, 'val_loss')
    assert [m.step for m in history] == points.updates.tolist()
    assert [m.value for m in history] == pytest.approx(points.val_loss.tolist(), rel=1e-6)


# ---------------------------------------------------------------------------- W&B


def wandb_records(run_dir: Path) -> list[dict]:
  """The records of an offline run, through wandb's own reader."""
  wandb = shutil.which('wandb', path=os.path.dirname(sys.executable)) or shutil.which('wandb')
  out = subprocess.run(
    [wandb, 'leet', 'inspect', '--json', str(run_dir)],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout
  return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_offline_runs_hold_every_configuration_grouped_by_the_sweep(tracked, table, curves):
  pytest.importorskip('wandb')
  run_dirs = sorted((tracked / 'wandb').glob('offline-run-*'))
  assert len(run_dirs) == NUM_RUNS
  seen = set()
  for run_dir in run_dirs:
    records = wandb_records(run_dir)
    run = next(r['run'] for r in records if r['type'] == 'run')
    config = run['config']['update']
    i = config['run_index']
    seen.add(i)
    row = table[table.run == i].iloc[0]
    assert run['run_group'] == 'tracked'
    assert run['project'] == 'tracked'
    assert config['learning_rate'] == pytest.approx(row.learning_rate)
    assert config['batch_size'] == row.batch_size
    history = [r['history'] for r in records if r['type'] == 'history']
    points = curves[curves.run == i]
    assert [h['step'].get('num', 0) for h in history] == points.updates.tolist()
    logged = [h['item'].get('val_loss', math.nan) for h in history]
    assert all(close(a, b) for a, b in zip(logged, points.val_loss, strict=True))
    summary = {}
    for r in records:
      if r['type'] == 'summary':
        summary.update(r['summary'].get('update', {}))
    assert summary['status'] == row.status
    if math.isfinite(row.final_val_loss):
      assert summary['final_val_loss'] == pytest.approx(row.final_val_loss)
    exit_record = next(r for r in records if r['type'] == 'exit')
    assert exit_record['exit'].get('exit_code', 0) == (0 if row.status == 'ok' else 1)
  assert seen == set(range(NUM_RUNS))


# ---------------------------------------------------------------------------- again


def test_a_rerun_and_an_export_of_the_finished_sweep_log_nothing_twice(tracked):
  before = snapshot(tracked)
  root = tracked.parent
  proc = run_cli(
    ['run', 'experiment.py', '--workdir', str(tracked), '--no-progress', '--no-report', '--log']
    + [','.join(TRACKERS)],
    cwd=root,
  )
  if 'mlflow' in TRACKERS:
    assert 'already holds this sweep' in proc.stdout
  run_cli(['export', str(tracked), '--to', ','.join(TRACKERS)], cwd=root)
  assert snapshot(tracked) == before


def snapshot(workdir: Path) -> dict:
  out = {}
  if 'tensorboard' in TRACKERS:
    out['tensorboard'] = sorted(
      str(p.relative_to(workdir)) for p in (workdir / 'tensorboard').rglob('*tfevents*')
    )
  if 'mlflow' in TRACKERS:
    out['mlflow'] = sorted(r.info.run_id for r in mlflow_runs(workdir)[1])
  if 'wandb' in TRACKERS:
    out['wandb'] = sorted(p.name for p in (workdir / 'wandb').glob('offline-run-*'))
  return out


def test_an_export_to_another_logdir_holds_the_same_scalars(tracked, tmp_path):
  pytest.importorskip('tensorboard')
  from tensorboard.backend.event_processing import event_accumulator

  from sweep import cli

  assert cli.main(['export', str(tracked), '--to', 'tensorboard', '--logdir', str(tmp_path)]) == 0
  for i, path in tensorboard_runs(tmp_path).items():
    a = event_accumulator.EventAccumulator(str(path))
    b = event_accumulator.EventAccumulator(str(tensorboard_runs(tracked / 'tensorboard')[i]))
    a.Reload()
    b.Reload()
    assert a.Tags()['scalars'] == b.Tags()['scalars']
    for tag in a.Tags()['scalars']:
      assert [(e.step, e.value) for e in a.Scalars(tag)] == [
        (e.step, e.value) for e in b.Scalars(tag)
      ]


def test_the_api_takes_logger_objects_and_says_where_each_wrote(tmp_path):
  pytest.importorskip('tensorboard')
  from tensorboard.backend.event_processing import event_accumulator

  import sweep

  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(8,)),
    data=sweep.data.digits(),
    learning_rate=[0.01, 0.1],
    epochs=1,
    name='api',
  )
  logdir = tmp_path / 'tb'
  result = sweep.run(cfg, loggers=[sweep.loggers.TensorBoard(str(logdir))], progress=False)
  assert result.logged == [f'TensorBoard: 2 runs in {logdir} (tensorboard --logdir {logdir})']
  for i, path in tensorboard_runs(logdir).items():
    acc = event_accumulator.EventAccumulator(str(path))
    acc.Reload()
    points = result.curves[result.curves.run == i]
    assert [e.step for e in acc.Scalars('val_loss')] == points.updates.tolist()


# ---------------------------------------------------------------------------- mistakes


def test_an_unknown_tracker_is_refused_before_training_naming_the_close_match(tmp_path):
  import sweep

  cfg = sweep.SweepConfig(model=sweep.models.mlp(hidden=(4,)), data=sweep.data.digits())
  with pytest.raises(sweep.ConfigError, match=r"loggers='tensorbord' .*did you mean 'tensorboard'"):
    sweep.run(cfg, str(tmp_path / 'out'), loggers=['tensorbord'], progress=False)
  assert not (tmp_path / 'out').exists()


def test_a_tracker_that_fails_says_so_and_the_next_one_still_logs(tracked, tmp_path):
  pytest.importorskip('mlflow')
  pytest.importorskip('tensorboard')
  import sweep
  from sweep import loggers

  result = sweep.load(str(tracked))
  lines = loggers.send(
    result,
    [loggers.MLflow(tracking_uri='nosuchscheme://x'), loggers.TensorBoard(str(tmp_path))],
    str(tracked),
  )
  assert lines[0].startswith('mlflow: not logged: ') and 'sweep export' in lines[0]
  assert lines[1].startswith('TensorBoard: 6 runs')


def test_a_stopped_run_is_its_own_run_that_ended_as_meant_and_a_diverged_one_failed(tmp_path):
  """Statuses as an adaptive search leaves them, on a result built by hand (no training)."""
  pytest.importorskip('tensorboard')
  pytest.importorskip('mlflow')
  from mlflow.tracking import MlflowClient
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import api_pb2, metadata

  import sweep
  from sweep import loggers

  statuses = ['ok', 'stopped', 'diverged']
  table = pd.DataFrame(
    {
      'run': [0, 1, 2],
      'learning_rate': [0.01, 0.001, 10.0],
      'status': statuses,
      'updates': [40, 10, 3],
      'final_train_loss': [0.5, 1.5, math.nan],
      'rung': [2, 0, 0],
    }
  )
  curves = pd.DataFrame(
    [
      {'run': i, 'eval': k, 'updates': u, 'train_loss': 2.0 - k}
      for i, steps in enumerate([[0, 20, 40], [0, 10], [0, 3, 3]])
      for k, u in enumerate(steps)
    ]
  )
  config = {'name': 'by-hand', 'axes': {'learning_rate': [0.01, 0.001, 10.0], 'seed': [0]}}
  result = sweep.Result(table, curves, config, 1.0)
  tb = tmp_path / 'tb'
  uri = f'sqlite:///{tmp_path / "mlflow.db"}'
  lines = loggers.send(result, [loggers.TensorBoard(str(tb)), loggers.MLflow(uri)], None)
  assert not any('not logged' in line for line in lines), lines

  names = sorted(p.name for p in tb.iterdir() if p.is_dir())
  assert names == ['run000_lr0.01', 'run001_lr0.001', 'run002_lr10']
  for name, status in zip(names, statuses, strict=True):
    acc = event_accumulator.EventAccumulator(str(tb / name))
    acc.Reload()
    assert [e.step for e in acc.Scalars('train_loss')] == {
      'ok': [0, 20, 40],
      'stopped': [0, 10],
      'diverged': [0, 3],  # the frozen point after it diverged is left out
    }[status]
    content = acc.SummaryMetadata(metadata.SESSION_END_INFO_TAG).plugin_data.content
    end = metadata.parse_session_end_info_plugin_data(content)
    failed = status == 'diverged'
    assert end.status == (api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS)
    assert acc.Scalars('summary/rung')[0].value == table.rung[names.index(name)]

  client = MlflowClient(uri)
  experiment = client.get_experiment_by_name('by-hand')
  runs = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'run'")
  by_status = {r.data.tags['status']: r.info.status for r in runs}
  assert by_status == {'ok': 'FINISHED', 'stopped': 'FINISHED', 'diverged': 'FAILED'}
