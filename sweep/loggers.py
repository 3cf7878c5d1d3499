"""A finished sweep in TensorBoard, MLflow or Weights & Biases.

Each logger reads a `sweep.Result` (its table and its curves) and writes one tracker run per
sweep run: its hyperparameters, its metrics at every evaluation point (step = the run's own
optimizer updates), its final metrics and its status. Loggers run after training, from numbers
already on the host, never inside the training program; `sweep.run(cfg, workdir, loggers=...)`
calls them once the sweep is done, and `sweep export WORKDIR --to NAME` sends a finished
workdir (`Result.load`). Sending the same workdir twice leaves one copy: TensorBoard's event
files are rewritten in place, MLflow skips a sweep whose fingerprint it already holds, W&B a
run whose id (the fingerprint and the run's index) it already wrote.

  result = sweep.run(cfg, 'workdirs/a', loggers=['tensorboard', sweep.loggers.MLflow()])

Each tracker is an optional extra: `pip install 'lrbs-sweep[tensorboard]'` (or `[mlflow]`,
`[wandb]`, `[trackers]` for all three).

Names, the same in every tracker: the curves keep curves.csv's names (`train_loss`, `val_loss`,
`train_accuracy`, `val_accuracy`, `batch_loss`, `learning_rate`, `epoch`, `examples`), except
each point's noise-scale estimate, `noise_scale_estimate`; the final metrics keep results.csv's
names (`final_val_loss`, `best_val_accuracy`, `noise_scale` as the median over the second half
of training, `pareto_rank`, ...); in TensorBoard, which has no run summary, they are scalars
under `summary/` at the run's last step.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from sweep.errors import ConfigError, config_error
from sweep.expansion import axis_columns

NAMES = ('tensorboard', 'mlflow', 'wandb')

# Curves logged at every evaluation point (curves.csv names; noise_scale renamed, see above).
CURVES = (
  'train_loss',
  'val_loss',
  'train_accuracy',
  'val_accuracy',
  'batch_loss',
  'learning_rate',
  'noise_scale_estimate',
  'epoch',
  'examples',
)
_NOT_METRICS = {'run', 'best_eval', 'status'}
# Statuses each tracker shows as a failed run (TensorBoard's STATUS_FAILURE, MLflow's FAILED,
# W&B's failed state); every other status (ok, stopped by a scheduler) ended as meant. The
# word itself is always there too: a hyperparameter, a tag, the summary.
FAILED = ('diverged',)
_SHORT = {
  'learning_rate': 'lr',
  'batch_size': 'bs',
  'weight_decay': 'wd',
  'momentum': 'mom',
  'schedule': 'sched',
  'optimizer': 'opt',
}


class Logger(Protocol):
  """Sends a finished sweep to a tracker; returns one line saying where it went."""

  name: str

  def log(self, result: Any, workdir: str | None = None) -> str: ...


# ---------------------------------------------------------------- the sweep, run by run


@dataclasses.dataclass
class RunRecord:
  """One run of a sweep as every tracker sees it."""

  index: int
  name: str
  hparams: dict[str, bool | float | int | str]
  status: str
  final: dict[str, float]  # the results table's metrics
  steps: list[int]  # the run's updates at each evaluation point (each once)
  history: list[dict[str, float]]  # the curves at each point, missing values left out


def _plain(v: Any) -> Any:
  return v.item() if isinstance(v, np.generic) else v


def _missing(v: Any) -> bool:
  return v is None or (isinstance(v, float) and math.isnan(v))


def sweep_name(result: Any) -> str:
  return str(result.config.get('name') or 'sweep')


def fingerprint(result: Any) -> str | None:
  """The sweep's fingerprint (config.json's), None for a sweep run without a workdir."""
  return result.config.get('fingerprint')


def hparam_columns(result: Any) -> list[str]:
  return axis_columns(list(result.table.columns), result.config)


def fixed_hparams(result: Any) -> dict[str, Any]:
  """The axes every run shares (one value in config.json's `axes`), None left out."""
  swept = set(hparam_columns(result))
  out = {}
  for name, values in (result.config.get('axes') or {}).items():
    if name not in swept and isinstance(values, list) and len(values) == 1:
      if not _missing(values[0]) and isinstance(values[0], bool | int | float | str):
        out[name] = values[0]
  return out


def run_name(index: int, values: dict[str, Any]) -> str:
  """`run007_bs64_lr0.01`: the index, then the value of each axis that varies."""
  parts = [f'run{index:03d}']
  for name, v in values.items():
    shown = f'{v:.3g}' if isinstance(v, float) else str(v)
    shown = re.sub(r'[^A-Za-z0-9.+-]+', '-', shown)[:24]
    parts.append(f'{_SHORT.get(name, name)}{shown}')
  return '_'.join(parts)


def records(result: Any) -> Iterator[RunRecord]:
  """Every run of `result`, in table order."""
  table, curves = result.table, result.curves
  swept = hparam_columns(result)
  fixed = fixed_hparams(result)
  metric_columns = [
    c
    for c in table.columns
    if c not in _NOT_METRICS
    and c not in swept
    and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))
  ]
  by_run = dict(tuple(curves.groupby('run'))) if len(curves) else {}
  varying = {c for c in swept if table[c].nunique(dropna=False) > 1}
  for _, row in table.iterrows():
    i = int(row['run'])
    values = {c: _plain(row[c]) for c in swept if not _missing(_plain(row[c]))}
    hparams = {**fixed, **values}
    named = {c: v for c, v in values.items() if c in varying}
    final = {}
    for c in metric_columns:
      v = _plain(row[c])
      if not _missing(v):
        final[c] = float(v)
    steps, history = [], []
    points = by_run.get(i)
    if points is not None:
      for _, p in points.sort_values('eval').iterrows():
        if steps and int(p['updates']) == steps[-1]:
          continue  # a diverged run is frozen: its later points repeat its last update
        point = {}
        for c in CURVES:
          source = 'noise_scale' if c == 'noise_scale_estimate' else c
          if source in p and not _missing(_plain(p[source])):
            point[c] = float(p[source])
        steps.append(int(p['updates']))
        history.append(point)
    yield RunRecord(i, run_name(i, named), hparams, str(row['status']), final, steps, history)


# ---------------------------------------------------------------- choosing loggers


def _extra(name: str) -> str:
  return f"pip install 'lrbs-sweep[{name}]'"


def _require(name: str, module: str) -> None:
  if importlib.util.find_spec(module) is None:
    raise ConfigError(f"loggers: '{name}' needs the {module} package: {_extra(name)}")


def tracker_name(text: str, field: str = 'loggers') -> str:
  """A tracker's name ('tensorboard', 'mlflow', 'wandb'; also 'tb', 'W&B') or `ConfigError`."""
  key = text.strip().lower().replace('&', '').replace(' ', '')
  key = {'tb': 'tensorboard', 'wb': 'wandb', 'weightsandbiases': 'wandb'}.get(key, key)
  if key not in NAMES:
    close = difflib.get_close_matches(key, NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise config_error(field, text, f'expected one of {", ".join(NAMES)}{hint}')
  return key


def resolve(loggers: Sequence[str | Logger] | str | None, field: str = 'loggers') -> list[Logger]:
  """Loggers from names ('tensorboard', 'mlflow', 'wandb', or one comma-separated string)
  or logger objects; raises `ConfigError` (naming `field`) for an unknown name, or for a
  tracker whose package is not installed."""
  if not loggers:
    return []
  if isinstance(loggers, str):
    loggers = [s for s in (p.strip() for p in loggers.split(',')) if s]
  out: list[Logger] = []
  for entry in loggers:
    if isinstance(entry, str):
      entry = {'tensorboard': TensorBoard, 'mlflow': MLflow, 'wandb': WandB}[
        tracker_name(entry, field)
      ]()
    elif not callable(getattr(entry, 'log', None)):
      raise config_error(
        field, entry, 'expected a name (tensorboard, mlflow, wandb) or an object with log()'
      )
    check = getattr(entry, 'check', None)
    if check is not None:
      check()
    out.append(entry)
  return out


def send(result: Any, loggers: Sequence[Logger], workdir: str | None = None) -> list[str]:
  """Sends `result` to each logger; returns each one's line (where it went, or why not).

  A logger that fails (a tracking server out of reach) does not lose the sweep: its line
  says so, the next logger runs, and `sweep export WORKDIR --to NAME` tries again later.
  """
  lines = []
  for logger in loggers:
    name = getattr(logger, 'name', type(logger).__name__)
    try:
      lines.append(logger.log(result, workdir))
    except Exception as e:  # noqa: BLE001 - the trained sweep matters more than a tracker
      again = f'; retry with: sweep export {workdir} --to {name}' if workdir else ''
      reason = (str(e).strip().splitlines() or [''])[0]
      lines.append(f'{name}: not logged: {type(e).__name__}: {reason}{again}')
  return lines


# ---------------------------------------------------------------- TensorBoard

# One event file per run directory, under a fixed name, so that logging the same sweep again
# replaces it rather than adding a second copy of every point.
_EVENT_FILE = 'events.out.tfevents.0.sweep'


class TensorBoard:
  """TensorBoard event files: one directory per run (scalars at every evaluation point, the
  final metrics under `summary/`), and the HParams plugin's data (every run's
  hyperparameters, final metrics and status) for its table and parallel coordinates.
  Written with the `tensorboard` package's protobufs, without TensorFlow.

  Args:
    logdir: where the run directories go; by default `WORKDIR/tensorboard` (or
      `./tensorboard/NAME` for a sweep without a workdir). View with
      `tensorboard --logdir LOGDIR`.
  """

  name = 'tensorboard'

  def __init__(self, logdir: str | None = None):
    self.logdir = logdir

  def check(self) -> None:
    _require(self.name, 'tensorboard')

  def where(self, result: Any, workdir: str | None) -> str:
    if self.logdir is not None:
      return self.logdir
    if workdir is not None:
      return os.path.join(workdir, 'tensorboard')
    return os.path.join('tensorboard', sweep_name(result))

  def log(self, result: Any, workdir: str | None = None) -> str:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    logdir = self.where(result, workdir)
    runs = list(records(result))
    now = time.time()

    def hparams_summary(data) -> Any:
      summary = summary_pb2.Summary()
      summary.value.add(
        tag=data[0],
        metadata=metadata.create_summary_metadata(data[1]),
        tensor=metadata.NULL_TENSOR,
      )
      return summary

    # The experiment: which hyperparameters and metrics the HParams table shows.
    hparam_infos = []
    names = sorted({k for r in runs for k in r.hparams} | {'status'})
    for name in names:
      values = [r.status if name == 'status' else r.hparams.get(name) for r in runs]
      values = [v for v in values if v is not None]
      distinct = sorted(set(values), key=str) if values else []
      domain = None
      if distinct and all(isinstance(v, str) for v in distinct):
        domain = hp.Discrete(distinct)
      elif distinct and all(isinstance(v, bool) for v in distinct):
        domain = hp.Discrete(distinct)
      elif distinct and all(isinstance(v, int | float) for v in distinct):
        # A grid's few values as a list to tick in TensorBoard, a random search's as a range.
        numbers = sorted(float(v) for v in distinct)
        small = len(numbers) <= 16
        domain = hp.Discrete(numbers) if small else hp.RealInterval(numbers[0], numbers[-1])
      hparam_infos.append(hp.HParam(name, domain))
    metric_names = list(dict.fromkeys(k for r in runs for k in r.final))
    metrics = [hp.Metric(f'summary/{m}', display_name=m) for m in metric_names]
    experiment = hp.hparams_config_pb(hparam_infos, metrics, time_created_secs=now)
    events = [event_pb2.Event(wall_time=now, step=0, summary=experiment)]
    _write_events(logdir, events, now)

    for r in runs:
      events = [
        event_pb2.Event(
          wall_time=now,
          step=0,
          summary=hp.hparams_pb(
            {**r.hparams, 'status': r.status}, trial_id=r.name, start_time_secs=now
          ),
        )
      ]
      for step, point in zip(r.steps, r.history, strict=True):
        summary = summary_pb2.Summary()
        for tag, value in point.items():
          summary.value.add(tag=tag, simple_value=value)
        events.append(event_pb2.Event(wall_time=now, step=step, summary=summary))
      last = r.steps[-1] if r.steps else 0
      summary = summary_pb2.Summary()
      for tag, value in r.final.items():
        summary.value.add(tag=f'summary/{tag}', simple_value=value)
      events.append(event_pb2.Event(wall_time=now, step=last, summary=summary))
      status = api_pb2.STATUS_FAILURE if r.status in FAILED else api_pb2.STATUS_SUCCESS
      end = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=now)
      )
      events.append(
        event_pb2.Event(
          wall_time=now,
          step=last,
          summary=hparams_summary((metadata.SESSION_END_INFO_TAG, end)),
        )
      )
      _write_events(os.path.join(logdir, r.name), events, now)
    return f'TensorBoard: {len(runs)} runs in {logdir} (tensorboard --logdir {logdir})'


def _write_events(directory: str, events: list, now: float) -> None:
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter

  from sweep import files

  class _Buffer(list):
    def write(self, data: bytes) -> None:
      self.append(data)

    def flush(self) -> None:
      pass

    def close(self) -> None:
      pass

  buffer = _Buffer()
  writer = RecordWriter(buffer)
  writer.write(event_pb2.Event(wall_time=now, file_version='brain.Event:2').SerializeToString())
  for event in events:
    writer.write(event.SerializeToString())
  files.atomic_write(os.path.join(directory, _EVENT_FILE), b''.join(buffer))


# ---------------------------------------------------------------- MLflow

_ROLE = 'sweep.role'
_FINGERPRINT = 'sweep.fingerprint'


class MLflow:
  """MLflow runs: a parent run for the sweep (its config, results, curves and report as
  artifacts) and a nested run per configuration (its hyperparameters as params, its
  metric histories with steps, its final metrics, a `status` tag; a diverged run is FAILED),
  logged in batches.

  Args:
    tracking_uri: the tracking store; by default MLFLOW_TRACKING_URI, else a SQLite
      store in the workdir (`sqlite:///WORKDIR/mlflow.db`, artifacts in
      `WORKDIR/mlartifacts`), else `./mlflow.db`. A new experiment in a SQLite store keeps
      its artifacts in `mlartifacts` beside the database. View with
      `mlflow ui --backend-store-uri URI`.
    experiment: the MLflow experiment; by default the sweep's name.
  """

  name = 'mlflow'

  def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
    self.tracking_uri = tracking_uri
    self.experiment = experiment

  def check(self) -> None:
    _require(self.name, 'mlflow')
    uri = self.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:'
    if not uri.startswith(('http:', 'https:', 'databricks', 'file:')):
      _require(self.name, 'sqlalchemy')  # a database store (the default SQLite one)

  def where(self, workdir: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment)."""
    uri = self.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI')
    if uri and uri.startswith('sqlite:///'):
      # Artifacts beside the database, not in MLflow's default ./mlruns of the current directory.
      database = uri[len('sqlite:///') :]
      return uri, os.path.join(os.path.dirname(os.path.abspath(database)), 'mlartifacts')
    if uri:
      return uri, None
    base = os.path.abspath(workdir if workdir is not None else '.')
    return f'sqlite:///{os.path.join(base, "mlflow.db")}', os.path.join(base, 'mlartifacts')

  def log(self, result: Any, workdir: str | None = None) -> str:
    import logging

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    # The store's schema migrations announce themselves at INFO on first use.
    for name in ('mlflow', 'alembic'):
      logging.getLogger(name).setLevel(logging.WARNING)
    uri, artifacts = self.where(workdir)
    client = MlflowClient(tracking_uri=uri)
    name = self.experiment or sweep_name(result)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
      experiment_id = client.create_experiment(
        name, artifact_location=None if artifacts is None else _file_uri(artifacts)
      )
    else:
      experiment_id = experiment.experiment_id
    fp = fingerprint(result)
    if fp is not None:
      found = client.search_runs(
        [experiment_id], f"tags.`{_FINGERPRINT}` = '{fp}' and tags.`{_ROLE}` = 'sweep'"
      )
      for run in found:
        if run.info.status == 'FINISHED':
          return f'MLflow: already holds this sweep as run {run.info.run_id} in {uri}'
        self._delete(client, experiment_id, run.info.run_id)  # an export cut short

    now = int(time.time() * 1000)
    runs = list(records(result))
    tags = {_ROLE: 'sweep', 'sweep.runs': str(len(runs))}
    if fp is not None:
      tags[_FINGERPRINT] = fp
    if workdir is not None:
      tags['sweep.workdir'] = os.path.abspath(workdir)
    parent = client.create_run(experiment_id, run_name=sweep_name(result), tags=tags).info.run_id
    try:
      params = [Param(k, _param(v)) for k, v in _sweep_params(result).items()]
      diverged = sum(r.status == 'diverged' for r in runs)
      summary = [Metric('runs', len(runs), now, 0), Metric('diverged', diverged, now, 0)]
      if np.isfinite(result.wall_time):
        summary.append(Metric('wall_time', float(result.wall_time), now, 0))
      _log_batches(client, parent, summary, params)
      self._artifacts(client, parent, result, workdir)
      for r in runs:
        child_tags = {
          'mlflow.parentRunId': parent,
          _ROLE: 'run',
          'sweep.run': str(r.index),
          'status': r.status,
        }
        run_id = client.create_run(experiment_id, run_name=r.name, tags=child_tags).info.run_id
        metrics = [
          Metric(k, v, now, step)
          for step, point in zip(r.steps, r.history, strict=True)
          for k, v in point.items()
        ]
        last = r.steps[-1] if r.steps else 0
        metrics += [Metric(k, v, now, last) for k, v in r.final.items() if k not in CURVES]
        params = [Param(k, _param(v)) for k, v in r.hparams.items()]
        _log_batches(client, run_id, metrics, params)
        client.set_terminated(run_id, 'FAILED' if r.status in FAILED else 'FINISHED')
    except BaseException:
      client.set_terminated(parent, 'FAILED')
      raise
    client.set_terminated(parent, 'FINISHED')
    return f'MLflow: run {parent} with {len(runs)} nested runs in {uri}'

  @staticmethod
  def _delete(client, experiment_id: str, parent: str) -> None:
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'"):
      client.delete_run(run.info.run_id)
    client.delete_run(parent)

  @staticmethod
  def _artifacts(client, run_id: str, result: Any, workdir: str | None) -> None:
    if workdir is not None and os.path.isfile(os.path.join(workdir, 'results.csv')):
      for name in ('config.json', 'results.csv', 'curves.csv', 'experiment.py'):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
          client.log_artifact(run_id, path)
      report = os.path.join(workdir, 'report')
      if os.path.isdir(report):
        client.log_artifacts(run_id, report, 'report')
      return
    from sweep import files

    with tempfile.TemporaryDirectory() as tmp:  # a sweep without a workdir: its tables
      result.table.to_csv(os.path.join(tmp, 'results.csv'), index=False)
      result.curves.to_csv(os.path.join(tmp, 'curves.csv'), index=False)
      with open(os.path.join(tmp, 'config.json'), 'w') as f:
        f.write(files.dumps(result.config, indent=2))
      for name in ('config.json', 'results.csv', 'curves.csv'):
        client.log_artifact(run_id, os.path.join(tmp, name))


def _file_uri(path: str) -> str:
  from pathlib import Path

  return Path(os.path.abspath(path)).as_uri()


def _param(v: Any) -> str:
  text = str(v)
  return text if len(text) <= 6000 else text[:5997] + '...'


def _sweep_params(result: Any) -> dict[str, Any]:
  """The config's one-line fields for the parent run (the axes are the children's)."""
  config = result.config
  out = {}
  for key in ('name', 'model', 'loss', 'num_runs', 'num_evals', 'epochs', 'updates'):
    if key in config and config[key] is not None:
      out[key] = config[key]
  data = config.get('data') or {}
  if isinstance(data, dict) and 'name' in data:
    out['data'] = data['name']
  for key, value in fixed_hparams(result).items():
    out[key] = value
  return out


def _log_batches(client, run_id: str, metrics: list, params: list) -> None:
  """MLflow's log_batch takes at most 1000 metrics and 100 params a call."""
  for start in range(0, len(params), 100):
    client.log_batch(run_id, params=params[start : start + 100])
  for start in range(0, len(metrics), 1000):
    client.log_batch(run_id, metrics=metrics[start : start + 1000])


# ---------------------------------------------------------------- Weights & Biases


class WandB:
  """Weights & Biases runs: one per configuration, grouped by the sweep's name, with the
  hyperparameters as config, the curves as history (step = updates) and the final metrics
  and status in the summary (a diverged run ends failed, with exit code 1).

  Args:
    project: the W&B project; by default WANDB_PROJECT, else the sweep's name.
    mode: 'offline', 'online' or 'disabled'; by default WANDB_MODE, else 'online' when
      WANDB_API_KEY is set, else 'offline' (`wandb sync DIR/wandb/offline-run-*` uploads
      later).
    directory: where wandb keeps its files; by default the workdir (else '.').
    entity: the W&B entity (user or team); by default wandb's.
  """

  name = 'wandb'

  def __init__(
    self,
    project: str | None = None,
    mode: str | None = None,
    directory: str | None = None,
    entity: str | None = None,
  ):
    self.project = project
    self.mode = mode
    self.directory = directory
    self.entity = entity

  def check(self) -> None:
    _require(self.name, 'wandb')
    if self.mode not in (None, 'online', 'offline', 'disabled'):
      raise config_error('WandB.mode', self.mode, "expected 'online', 'offline' or 'disabled'")

  def resolved_mode(self) -> str:
    if self.mode is not None:
      return self.mode
    if os.environ.get('WANDB_MODE'):
      return os.environ['WANDB_MODE']
    return 'online' if os.environ.get('WANDB_API_KEY') else 'offline'

  def log(self, result: Any, workdir: str | None = None) -> str:
    import wandb

    directory = os.path.abspath(self.directory or workdir or '.')
    os.makedirs(directory, exist_ok=True)
    mode = self.resolved_mode()
    project = self.project or os.environ.get('WANDB_PROJECT') or sweep_name(result)
    fp = fingerprint(result)
    settings = wandb.Settings(
      silent=True, console='off', save_code=False, disable_git=True, x_disable_stats=True
    )
    logged, skipped = 0, 0
    for r in records(result):
      run_id = None if fp is None else f'{fp}-{r.index:04d}'
      if run_id is not None and _wandb_has(directory, run_id):
        skipped += 1
        continue
      config = {**r.hparams, 'sweep': sweep_name(result), 'run_index': r.index}
      if fp is not None:
        config['sweep_fingerprint'] = fp
      run = wandb.init(
        project=project,
        entity=self.entity,
        group=sweep_name(result),
        job_type='sweep-run',
        name=r.name,
        id=run_id,
        config=config,
        tags=[r.status],
        dir=directory,
        mode=mode,
        reinit='create_new',
        settings=settings,
      )
      try:
        for step, point in zip(r.steps, r.history, strict=True):
          run.log(point, step=step)
        run.summary.update(r.final)
        run.summary['status'] = r.status
      finally:
        run.finish(exit_code=1 if r.status in FAILED else 0)
      logged += 1
    where = os.path.join(directory, 'wandb')
    kept = f' ({skipped} already there)' if skipped else ''
    if mode == 'offline':
      return (
        f'W&B: {logged} offline runs{kept} in {where} (upload: wandb sync {where}/offline-run-*)'
      )
    return f'W&B: {logged} runs{kept} in project {project}, group {sweep_name(result)}'


def _wandb_has(directory: str, run_id: str) -> bool:
  """Whether wandb's directory already holds run `run_id` (offline or online)."""
  folder = os.path.join(directory, 'wandb')
  if not os.path.isdir(folder):
    return False
  return any(
    name.endswith('-' + run_id) and (name.startswith('offline-run-') or name.startswith('run-'))
    for name in os.listdir(folder)
  )
