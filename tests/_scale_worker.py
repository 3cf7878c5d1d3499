"""One sweep of `test_scale.py`, run in a process of its own.

The process's devices are fixed when JAX starts (`XLA_FLAGS`, `JAX_PLATFORMS`), and a
process joins a multi-process sweep before it computes anything, so the device and host
checks train in subprocesses running this script:

    python _scale_worker.py OUT [--workdir DIR] [--process-id I --num-processes N --port P]

With SCALE_WORKER_SIGTERM_AFTER=k in its environment, it sends itself a SIGTERM (a
preemption notice) once it has trained k segments: the engine saves and exits with 143.

It writes OUT/results.csv (with `Result.save`, as `sweep.run` writes a workdir's) and
OUT/params.npz (every run's final parameters, key `<run>/<leaf path>`), and prints one
line `SCALE_WORKER {json}` with what it saw: its process and device counts, the owner
of every unit, how many segments it trained, and over how many devices the parameters
entering each segment were spread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys

import numpy as np

# The grid every scale check trains: 2 optimizers x 3 learning rates x 2 batch sizes x
# 2 seeds = 24 runs. A width of 3 runs per seed pads the run axis (to 4, or to 2 + 2 in
# chunks of 2); every run at the learning rate 1e4 diverges right after its first update.
LEARNING_RATES = [1e-2, 5e-2, 1e4]
DIVERGING_LR = 1e4


@functools.cache
def _digits():
  import sweep

  return sweep.data.digits()


def config(**changes):
  import sweep

  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(8,)),
    data=_digits(),
    optimizer=['adam', 'sgd'],
    learning_rate=LEARNING_RATES,
    batch_size=[32, 64],
    seed=[0, 1],
    epochs=2,
    num_evals=2,
    name='scale-test',
  )
  return cfg.replace(**changes)


def functions(cfg) -> tuple:
  """`(plan, model, eval_chunk)` of `cfg`, as `sweep.run` makes them."""
  from sweep import engine
  from sweep.config import validate

  plan = validate(cfg)
  model = engine.model_of(cfg, plan.output_dim)
  return plan, model, engine._eval_chunk(plan)


def units(cfg) -> list:
  """The units (compile groups and chunks) `sweep.run` trains for `cfg`, as it computes them."""
  from sweep import units as planning

  return planning.plan_units(*functions(cfg))


def flat_params(result, n: int) -> dict[str, np.ndarray]:
  import jax

  out = {}
  for i in range(n):
    for path, leaf in jax.tree_util.tree_leaves_with_path(result.params(i)):
      out[f'{i}/{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--workdir')
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--port', type=int)
  args = parser.parse_args(argv)

  import jax

  if args.num_processes > 1:
    # Before anything touches a backend.
    jax.distributed.initialize(
      coordinator_address=f'localhost:{args.port}',
      num_processes=args.num_processes,
      process_id=args.process_id,
    )

  import sweep
  from kernels import train
  from sweep import distributed

  seen = {'segments': 0, 'param_devices': [], 'run_axis_shards': []}
  segment_jit = train.segment_jit
  sigterm_after = int(os.environ.get('SCALE_WORKER_SIGTERM_AFTER', 0))

  def recording_segment(structure, groups, *rest):
    leaf = jax.tree.leaves(groups[0].runs.params)[0]
    seen['segments'] += 1
    seen['param_devices'].append(len(leaf.sharding.device_set))
    # Slots of the run axis (axis 1) that one device holds, against the whole axis.
    seen['run_axis_shards'].append([leaf.sharding.shard_shape(leaf.shape)[1], leaf.shape[1]])
    out = segment_jit(structure, groups, *rest)
    if seen['segments'] == sigterm_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  train.segment_jit = recording_segment
  cfg = config()
  n_units = len(units(cfg))
  owners = [distributed.owner(c) for c in range(n_units)]
  try:
    result = sweep.run(cfg, workdir=args.workdir, progress=False)
  finally:
    train.segment_jit = segment_jit

  result.save(args.out)
  np.savez(os.path.join(args.out, 'params.npz'), **flat_params(result, len(result.table)))
  report = {
    'process_index': jax.process_index(),
    'process_count': jax.process_count(),
    'local_device_count': jax.local_device_count(),
    'owners': owners,
    **seen,
  }
  print('SCALE_WORKER ' + json.dumps(report), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
