"""Runs that do not fit at once: 2048 runs of a 1M-parameter MLP with Adam.

Held at once these would need about 40 GB (parameters, gradient, update, two Adam
moments and activations); the engine cuts the run axis into chunks that fit its memory
budget and reuses one compiled program for all of them.

  python scripts/memory_check.py            # 2048 runs, default budget, then 32-run chunks
  python scripts/memory_check.py --runs 256 # smaller

Each sweep runs in its own process so that its peak resident memory can be read
(`ru_maxrss`); the two tables must agree (same numbers from different chunkings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def one(runs: int, budget: float | None, out: str) -> None:
  import sweep
  from sweep import config, engine, units

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2048, 784)).astype(np.float32)
  y = rng.integers(0, 10, size=2048).astype(np.int32)
  cfg = sweep.SweepConfig(
    model=sweep.models.MLP(hidden=(1024, 256), outputs=10),  # 1.07M parameters
    data=sweep.data.arrays(x[:1792], y[:1792], x[1792:], y[1792:]),
    optimizer='adam',
    learning_rate=[float(v) for v in np.logspace(-5, -1, runs)],
    batch_size=32,
    seed=0,
    updates=4,
    num_evals=1,
    train_eval_size=256,
    memory_budget=budget,
  )
  plan = config.validate(cfg)
  model = engine.model_of(cfg, plan.output_dim)
  planned = units.plan_units(plan, model, 256)
  t0 = time.perf_counter()
  result = sweep.run(cfg, progress=False)
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  result.table.to_csv(out)
  per_run = units.run_bytes(plan, model, 'adam', 256)
  print(
    json.dumps(
      {
        'runs': runs,
        'chunks': len(planned),
        'chunk_width': planned[0].groups[0].slots.shape[1],
        'estimated_bytes_per_run': per_run,
        'estimated_total_gb': per_run * runs / 1e9,
        'peak_rss_gb': peak / 1e9,
        'seconds': seconds,
      }
    )
  )


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--runs', type=int, default=2048)
  parser.add_argument('--one', nargs=3, metavar=('RUNS', 'BUDGET', 'OUT'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    runs, budget, out = args.one
    one(int(runs), None if budget == 'default' else float(budget), out)
    return
  import pandas as pd

  tables = []
  for budget in ('default', str(32 * 30e6)):
    out = f'memory_check_{budget}.csv'
    proc = subprocess.run(
      [sys.executable, __file__, '--one', str(args.runs), budget, out],
      capture_output=True,
      text=True,
      check=True,
    )
    print(proc.stdout.strip().splitlines()[-1])
    tables.append(pd.read_csv(out))
    os.unlink(out)
  cols = ['final_train_loss', 'final_val_loss']
  diff = np.nanmax(np.abs(tables[0][cols].to_numpy() - tables[1][cols].to_numpy()))
  same = (tables[0]['status'] == tables[1]['status']).all()
  print(f'largest difference between the two chunkings: {diff:.3g}; same statuses: {same}')


if __name__ == '__main__':
  main()
