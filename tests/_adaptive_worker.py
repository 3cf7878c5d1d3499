"""One adaptive search of `test_adaptive.py`, run in a process of its own (with several
processes, joined through `jax.distributed` before anything computes):

    python _adaptive_worker.py OUT SCHEDULER [--process-id I --num-processes N --port P]
                               [--workdir W [--preempt-at K]]

SCHEDULER is `asha`, `pbt` or `ramp` (no scheduler; runs that change batch size). It writes
OUT/results.csv, OUT/curves.csv and OUT/params.npz
(every run's final parameters, key `<run>/<leaf path>`).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('scheduler', choices=('asha', 'pbt', 'ramp'))
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--port', type=int)
  parser.add_argument('--workdir')
  parser.add_argument(
    '--preempt-at', type=int, help='process 0 sends itself SIGTERM at this round (1-based)'
  )
  args = parser.parse_args(argv)

  import jax

  if args.num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=f'localhost:{args.port}',
      num_processes=args.num_processes,
      process_id=args.process_id,
    )

  import sweep

  if args.scheduler == 'asha':
    scheduler = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9, slots=10)
    batch_size = [32, 64]
  elif args.scheduler == 'pbt':
    scheduler = sweep.schedulers.PBT(interval_updates=10, seed=2)
    batch_size = [32]
  else:
    scheduler = None
    batch_size = [32, sweep.batch_ramp(32, factor=4, at=(0.5,))]
  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(8,)),
    data=sweep.data.digits(),
    learning_rate=[float(v) for v in np.geomspace(1e-3, 1.0, 8)],
    batch_size=batch_size,
    seed=[0, 1],
    epochs=2,
    scheduler=scheduler,
  )
  if args.preempt_at:
    import signal

    from sweep import population

    decide, rounds = population.Population.decide, []

    def preempting(self):
      rounds.append(1)
      if len(rounds) == args.preempt_at and jax.process_index() == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # as a cloud machine announces preemption
      return decide(self)

    population.Population.decide = preempting
  result = sweep.run(cfg, args.workdir, progress=False)
  os.makedirs(args.out, exist_ok=True)
  result.table.to_csv(os.path.join(args.out, 'results.csv'), index=False)
  result.curves.to_csv(os.path.join(args.out, 'curves.csv'), index=False)
  params = {}
  for i in range(len(result.table)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(result.params(i)):
      params[f'{i}/{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
  np.savez(os.path.join(args.out, 'params.npz'), **params)
  print('ADAPTIVE_WORKER done', jax.process_index(), jax.process_count(), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
