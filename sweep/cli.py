"""`sweep run EXPERIMENT.py [--workdir DIR]`: a thin shell over `sweep.run`; also `sweep report`,
`sweep export` (a finished workdir to TensorBoard, MLflow or W&B) and `sweep lr-find`."""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib.util
import os
import re
import sys
import traceback

DEFAULT_EXPERIMENT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'seed_mlp.py'
)


# Exit codes: 0 done; 1 a failure of the machine (a full disk, a read-only workdir); 2 a
# mistake (the config, the experiment file, a workdir holding another sweep, a damaged
# result that cannot be rebuilt); 3 the workdir is in use by another live `sweep run`;
# 130 and 143 stopped by SIGINT and SIGTERM, the state saved.
EXIT_BUSY = 3


class _Failure(Exception):
  """A failure the CLI reports in one line (and exits with `code`)."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


def _config_fields() -> list[str]:
  import dataclasses

  from sweep.config import SweepConfig

  return [f.name for f in dataclasses.fields(SweepConfig)]


def _explain_type_error(e: TypeError) -> str | None:
  """A sentence for a SweepConfig built with an unknown or a missing keyword."""
  text = str(e)
  if 'SweepConfig' not in text and 'replace()' not in text:
    return None
  fields = _config_fields()
  unknown = re.search(r"unexpected keyword argument '(\w+)'", text)
  if unknown:
    name = unknown.group(1)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return f"SweepConfig has no field '{name}'{hint}; its fields are: {', '.join(fields)}"
  missing = re.search(r'missing \d+ required (?:positional |keyword-only )?arguments?: (.*)$', text)
  if missing:
    return f'SweepConfig needs {missing.group(1)}; its fields are: {", ".join(fields)}'
  return None


def _where(e: BaseException, path: str) -> str:
  """'file.py line N' of the innermost frame of the experiment file in `e`'s traceback."""
  frames = [
    f
    for f in traceback.extract_tb(e.__traceback__)
    if os.path.abspath(f.filename) == os.path.abspath(path)
  ]
  name = os.path.basename(path)
  return f'{name} line {frames[-1].lineno}' if frames else name


def load_experiment(path: str):
  """Imports the experiment file at `path` and returns its `get_config()`."""
  from sweep.errors import ConfigError

  if not os.path.isfile(path):
    raise SystemExit(f'sweep: experiment file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    get_config = getattr(module, 'get_config', None)
    if get_config is None:
      raise SystemExit(f'sweep: {path} defines no get_config() -> sweep.SweepConfig')
    return get_config()
  except (SystemExit, KeyboardInterrupt, ConfigError):
    raise
  except TypeError as e:
    explained = _explain_type_error(e)
    if explained is not None:
      raise ConfigError(explained) from None
    raise _Failure(f'{_where(e, path)}: {type(e).__name__}: {e}', 2) from None
  except Exception as e:  # the experiment's own code: where it failed, in one line
    raise _Failure(f'{_where(e, path)}: {type(e).__name__}: {e}', 2) from None


def _run(args) -> int:
  import sweep
  from sweep import checkpoints, files, lock, loggers, overrides

  if args.distributed:
    sweep.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  path = args.experiment or DEFAULT_EXPERIMENT
  if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise _Failure(f'--workdir {args.workdir!r} is a file, not a directory', 2)
  try:
    changes = overrides.parse(args.set or [])
    chosen = loggers.resolve(args.log, '--log')
  except sweep.ConfigError as e:
    raise _Failure(str(e), 2) from None
  where = path + ''.join(f' --set {item}' for item in args.set or [])
  writes = files.write_count()
  try:
    cfg = load_experiment(path)
    if not isinstance(cfg, sweep.SweepConfig):
      raise SystemExit(
        f'sweep: get_config() in {path} returned {type(cfg).__name__}, not a sweep.SweepConfig'
      )
    cfg = overrides.apply(cfg, changes)
    if args.dry_run:
      from sweep import dryrun

      print(dryrun.describe(cfg))
      return 0
    result = sweep.run(
      cfg,
      workdir=args.workdir,
      progress=not args.no_progress,
      fresh=args.fresh,
      checkpoint_every=args.checkpoint_every,
      checkpoint_seconds=args.checkpoint_seconds,
      experiment_file=path,
      keep_checkpoints=args.keep_checkpoints,
      loggers=chosen,
      wait=args.wait,
    )
  except lock.WorkdirBusy as e:
    print(f'sweep: {e}', file=sys.stderr)
    return EXIT_BUSY
  except checkpoints.WorkdirConflict as e:
    print(f'sweep: {e}', file=sys.stderr)
    return 2
  except sweep.ConfigError as e:
    print(f'sweep: bad config in {where}: {e}', file=sys.stderr)
    return 2
  import jax

  if jax.process_index() != 0:
    return 0  # process 0 speaks for the sweep
  print(result.summary(verbose=args.verbose))
  if 'batch_size' in result.table.columns and result.table['batch_size'].nunique() > 1:
    print(_batch_size_line(result))
  if 'batch_schedule' in result.table.columns:
    print(_strategies_line(result))
  if args.workdir:
    print(f'Wrote {os.path.join(args.workdir, "results.csv")}, curves.csv and config.json.')
    if not args.no_report:
      from sweep import report

      html = os.path.join(args.workdir, 'report', 'report.html')
      if files.write_count() == writes and os.path.isfile(html):
        print(f'Report: {html} (unchanged)')  # a finished sweep read again: nothing to rewrite
      else:
        try:
          print(f'Report: {report.write_report(args.workdir, result)}')
          _interactive_hint()
        except OSError as e:
          if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
          print(f'sweep: no report written: {_os_message(e)}', file=sys.stderr)
  return _print_logged(result.logged)


def _print_logged(lines: list[str]) -> int:
  """Each logger's line; a failed one on stderr, and exit status 1."""
  failed = False
  for line in lines:
    if ': not logged: ' in line:
      failed = True
      print(f'sweep: {line}', file=sys.stderr)
    else:
      print(line)
  return 1 if failed else 0


def _export(args) -> int:
  import sweep
  from sweep import loggers

  try:
    result = sweep.Result.load(args.workdir)  # checked; a damaged file rebuilt from its copy
  except FileNotFoundError:  # no results at all (a damaged file is a DamagedFile: exit 1)
    print(f'sweep: {args.workdir!r} holds no finished sweep (no results.csv)', file=sys.stderr)
    return 2
  made = {
    'tensorboard': lambda: loggers.TensorBoard(args.logdir),
    'mlflow': lambda: loggers.MLflow(args.tracking_uri, args.experiment_name),
    'wandb': lambda: loggers.WandB(args.project, args.mode),
  }
  try:
    names = [loggers.tracker_name(n, '--to') for n in args.to.split(',') if n.strip()]
    chosen = loggers.resolve([made[n]() for n in names], '--to')
  except sweep.ConfigError as e:
    print(f'sweep: {e}', file=sys.stderr)
    return 2
  return _print_logged(loggers.send(result, chosen, args.workdir))


def _strategies_line(result) -> str:
  """`analysis.batch_schedule_table` in a few lines of at most 100 columns: each strategy at
  its best learning rate, its metric and its updates, best first."""
  from sweep import analysis

  try:
    table = analysis.batch_schedule_table(result)
  except (ValueError, KeyError) as e:
    return f'Batch-size schedules: no comparison ({e}).'
  metric = table.attrs['metric']
  lines = [f'Batch-size strategies, each at its best learning rate ({metric}):']
  for label, row in table.head(5).iterrows():
    text = (
      f'  {label}, lr {row["learning_rate"]:.3g}: {row[metric]:.4g} in {row["updates"]:.0f} updates'
    )
    lines.append(text if len(text) <= 100 else text[:97] + '...')
  if len(table) > 5:
    lines.append(f'  ... {len(table) - 5} more in the report')
  return '\n'.join(lines)


def _batch_size_line(result) -> str:
  """`analysis.choose_batch_size` in one line: the batch size and, briefly, why."""
  from sweep import analysis

  try:
    choice = analysis.choose_batch_size(result)
  except (ValueError, KeyError) as e:  # a table the analysis cannot read: say so, go on
    return f'Batch size: no recommendation ({e}).'
  return f'Batch size: {choice.short}.'


def _report(args) -> int:
  from sweep import report

  try:
    print(report.write_report(args.workdir))
  except FileNotFoundError:  # no results at all (a damaged file is a DamagedFile: exit 1)
    print(f'sweep: {args.workdir!r} holds no finished sweep (no results.csv)', file=sys.stderr)
    return 2
  _interactive_hint()
  return 0


def _interactive_hint() -> None:
  """Without plotly the report has its PNGs only: say so, and how to get the rest (stderr,
  so that stdout stays the report's path)."""
  from sweep import interactive

  if not interactive.AVAILABLE:
    print(
      'The report has its PNG figures only; for the interactive ones (hover, parallel '
      f"coordinates, every run's curves): {interactive.INSTALL_HINT}",
      file=sys.stderr,
    )


def _lr_find(args) -> int:
  import sweep

  path = args.experiment or DEFAULT_EXPERIMENT
  try:
    cfg = load_experiment(path)
    finder = sweep.lr_find(
      cfg,
      method=args.method,
      start_lr=args.start_lr,
      end_lr=args.end_lr,
      num_it=args.num_it,
      suggest=args.suggest,
    )
  except sweep.ConfigError as e:
    print(f'sweep: bad config in {path}: {e}', file=sys.stderr)
    return 2
  print(
    f'LR range test ({args.method}) of {os.path.basename(path)}: suggestion '
    f'{finder.suggestion:.3g} ({args.suggest})'
  )
  for rule, value in finder.suggestions.items():
    print(f'  {rule:<8} {value:.3g}')
  if args.workdir:
    from sweep import report

    os.makedirs(args.workdir, exist_ok=True)
    paths = report.save_lr_find(args.workdir, finder)
    print('Wrote ' + ', '.join(paths))
  return 0


def _one_line_warnings() -> None:
  """The engine's own warnings as one line each (`sweep: ...`), not Python's two."""
  import warnings

  from sweep import layers

  shown = warnings.showwarning

  def show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, layers.SlowLayerWarning):
      print(str(message), file=file or sys.stderr)
    else:
      shown(message, category, filename, lineno, file, line)

  warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
  _one_line_warnings()
  parser = argparse.ArgumentParser(prog='sweep', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('run', help='run an experiment file (default: the seed MLP grid on digits)')
  p.add_argument('experiment', nargs='?', help='a Python file defining get_config()')
  p.add_argument('--workdir', help='directory for results.csv, curves.csv, config.json')
  p.add_argument('--no-progress', action='store_true', help='hide the progress bar')
  p.add_argument(
    '--fresh', action='store_true', help='discard what the workdir holds and start afresh'
  )
  p.add_argument(
    '--checkpoint-every', type=int, default=1, metavar='N', help='checkpoint every N segments'
  )
  p.add_argument(
    '--checkpoint-seconds',
    type=float,
    default=None,
    metavar='S',
    help='also checkpoint when S seconds passed since the last checkpoint',
  )
  p.add_argument(
    '--keep-checkpoints',
    type=int,
    default=2,
    metavar='K',
    help='keep the latest K checkpoints (a damaged one is skipped for the one before; default 2)',
  )
  p.add_argument('--no-report', action='store_true', help='skip the figures and report.html')
  p.add_argument(
    '--verbose', action='store_true', help="every column of the best runs' table, however wide"
  )
  p.add_argument(
    '--set',
    action='append',
    metavar='FIELD=VALUE',
    help='change a SweepConfig field (a Python literal, e.g. --set epochs=2 '
    "--set learning_rate='[1e-3,1e-2]' --set optimizer=adamw); repeatable",
  )
  p.add_argument(
    '--dry-run',
    action='store_true',
    help='print the runs, compile groups, memory and time estimates; train and write nothing',
  )
  p.add_argument(
    '--log',
    metavar='TRACKERS',
    help='send the finished sweep to tensorboard, mlflow and/or wandb (comma-separated)',
  )
  p.add_argument(
    '--wait',
    action='store_true',
    help='when another sweep run is writing the workdir, wait for it to finish instead of '
    f'refusing at once (exit {EXIT_BUSY})',
  )
  p.add_argument(
    '--distributed',
    action='store_true',
    help='join the other processes first (jax.distributed.initialize; auto-detected on TPU VMs, '
    'else set --coordinator, --num-processes and --process-id)',
  )
  p.add_argument('--coordinator', help='host:port of process 0 (with --distributed)')
  p.add_argument('--num-processes', type=int)
  p.add_argument('--process-id', type=int)
  p.set_defaults(fn=_run)
  p = sub.add_parser('report', help='figures and report.html of a finished sweep')
  p.add_argument('workdir', help='the workdir of a finished sweep')
  p.set_defaults(fn=_report)
  p = sub.add_parser('export', help='send a finished sweep to TensorBoard, MLflow or W&B')
  p.add_argument('workdir', help='the workdir of a finished sweep')
  p.add_argument(
    '--to',
    required=True,
    metavar='TRACKERS',
    help='tensorboard, mlflow and/or wandb (comma-separated)',
  )
  p.add_argument('--logdir', help='TensorBoard: the log directory (default WORKDIR/tensorboard)')
  p.add_argument(
    '--tracking-uri',
    help='MLflow: the tracking store (default $MLFLOW_TRACKING_URI, else WORKDIR/mlflow.db)',
  )
  p.add_argument('--experiment-name', help="MLflow: the experiment (default the sweep's name)")
  p.add_argument(
    '--project', help="W&B: the project (default $WANDB_PROJECT, else the sweep's name)"
  )
  p.add_argument(
    '--mode',
    choices=('offline', 'online'),
    help='W&B: default $WANDB_MODE, else online when WANDB_API_KEY is set, else offline',
  )
  p.set_defaults(fn=_export)
  p = sub.add_parser('lr-find', help="LR range test of an experiment's model, optimizer and data")
  p.add_argument('experiment', nargs='?', help='a Python file defining get_config()')
  p.add_argument('--method', choices=('grid', 'ramp'), default='grid')
  p.add_argument('--start-lr', type=float, default=1e-7)
  p.add_argument('--end-lr', type=float, default=10.0)
  p.add_argument('--num-it', type=int, default=100)
  p.add_argument('--suggest', choices=('valley', 'steep', 'minimum'), default='valley')
  p.add_argument('--workdir', help='save lr_find.csv and lr_find.json here (for the report)')
  p.set_defaults(fn=_lr_find)
  args = parser.parse_args(argv)
  try:
    _start()
    return args.fn(args)
  except _Failure as e:
    print(f'sweep: {e}', file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    kept = (
      f'; the checkpoints in {args.workdir} are kept: run the same command again to resume'
      if getattr(args, 'workdir', None)
      else ''
    )
    print(f'sweep: interrupted (SIGINT){kept}', file=sys.stderr)
    return 130
  except OSError as e:  # a full disk (sweep.files.DiskFull), a read-only workdir, ...
    print(f'sweep: {_os_message(e)}', file=sys.stderr)
    return 1


def _start() -> None:
  from sweep import engine

  # One CPU device per core (before JAX starts), so the run axis spreads over the cores;
  # SWEEP_CPU_DEVICES sets another count.
  count = os.environ.get('SWEEP_CPU_DEVICES')
  if count and not (count.isdigit() and int(count) > 0):
    raise _Failure(f'SWEEP_CPU_DEVICES={count!r} is invalid: expected a positive integer', 2)
  engine.set_cpu_devices(int(count) if count else None)
  if not os.environ.get('SWEEP_NO_CACHE'):
    try:
      engine.enable_compilation_cache()
    except OSError as e:  # a read-only home: compile in every process instead
      print(f'sweep: no compilation cache ({_os_message(e)})', file=sys.stderr)


def _os_message(e: OSError) -> str:
  from sweep import files

  if isinstance(e, files.DiskFull | files.DamagedFile):
    return str(e)
  reason = e.strerror or str(e) or type(e).__name__
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
    return f'cannot write {e.filename}: {reason}'
  return f'{e.filename}: {reason}' if e.filename else reason


if __name__ == '__main__':
  sys.exit(main())
