"""`sweep run EXPERIMENT.py [--workdir DIR]`: a thin shell over `sweep.run`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

DEFAULT_EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'experiments', 'seed_mlp.py')


def load_experiment(path: str):
  """Imports the experiment file at `path` and returns its `get_config()`."""
  if not os.path.isfile(path):
    raise SystemExit(f'sweep: experiment file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_config = getattr(module, 'get_config', None)
  if get_config is None:
    raise SystemExit(f'sweep: {path} defines no get_config() -> sweep.SweepConfig')
  return get_config()


def _run(args) -> int:
  import sweep

  path = args.experiment or DEFAULT_EXPERIMENT
  try:
    cfg = load_experiment(path)
    if not isinstance(cfg, sweep.SweepConfig):
      raise SystemExit(f'sweep: get_config() in {path} returned {type(cfg).__name__}, not a sweep.SweepConfig')
    result = sweep.run(
        cfg, workdir=args.workdir, progress=not args.no_progress, fresh=args.fresh,
        checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
        experiment_file=path,
    )
  except sweep.ConfigError as e:
    print(f'sweep: bad config in {path}: {e}', file=sys.stderr)
    return 2
  print(result.summary())
  if args.workdir:
    print(f'Wrote {os.path.join(args.workdir, "results.csv")}, curves.csv and config.json.')
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='sweep', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('run', help='run an experiment file (default: the seed MLP grid on digits)')
  p.add_argument('experiment', nargs='?', help='a Python file defining get_config()')
  p.add_argument('--workdir', help='directory for results.csv, curves.csv, config.json')
  p.add_argument('--no-progress', action='store_true', help='hide the progress bar')
  p.add_argument('--fresh', action='store_true', help='discard what the workdir holds and start afresh')
  p.add_argument('--checkpoint-every', type=int, default=1, metavar='N', help='checkpoint every N segments')
  p.add_argument('--checkpoint-seconds', type=float, default=None, metavar='S',
                 help='also checkpoint when S seconds passed since the last checkpoint')
  p.set_defaults(fn=_run)
  args = parser.parse_args(argv)
  if not os.environ.get('SWEEP_NO_CACHE'):
    from sweep import engine

    engine.enable_compilation_cache()
  return args.fn(args)


if __name__ == '__main__':
  sys.exit(main())
