"""What evaluating costs a sweep that evaluates often: the validation subset at intermediate
points (the default) against the whole validation set at every point.

    python scripts/eval_bench.py [--quick]

The seed MLP written with `flax.linen.Dense` (784-10-10), Adam, 16 learning rates, batch
32, one epoch of 8192 MNIST-shaped examples with 8192 validation examples, evaluated 16
times (a learning curve of 16 points: each segment trains 512 examples). Each setting's
warm sweep (compiled by a first call) is timed alternately, `--repeats` times, in one
process; prints the medians, their ratio, and the share of forward passes spent on
evaluation as the arithmetic predicts it (a training example counted as three forward
passes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sweep  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(10)(x)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  sweep.set_cpu_devices()
  n = 4096 if args.quick else 8192
  rng = np.random.default_rng(0)
  w = rng.normal(size=(784, 10)).astype(np.float32)
  x = rng.uniform(size=(2 * n, 784)).astype(np.float32)
  y = np.argmax(x @ w + rng.normal(scale=2.0, size=(2 * n, 10)), axis=1).astype(np.int32)
  data = sweep.data.arrays(x[:n], y[:n], x[n:], y[n:])
  num_evals = 16

  def config(val_eval_size):
    return sweep.SweepConfig(
      model=MLP(),
      data=data,
      learning_rate=[float(v) for v in np.logspace(-4, -1, 16)],
      batch_size=32,
      epochs=1,
      num_evals=num_evals,
      val_eval_size=val_eval_size,
    )

  settings = {'validation subset (default)': None, 'whole validation set': n}
  first = {}
  for name, size in settings.items():
    t = time.perf_counter()
    result = sweep.run(config(size), progress=False)
    first[name] = time.perf_counter() - t
    examples = result.config.get('val_probe', {}).get('examples', n)
    probe = result.config['train_probe']['examples']
    training = 3 * n
    evaluation = (num_evals + 1) * probe + num_evals * examples + n
    print(
      f'{name}: {examples} validation examples at intermediate points; predicted evaluation '
      f'{evaluation / (evaluation + training):.0%} of the forward passes; first call '
      f'{first[name]:.2f} s'
    )
  warm = {name: [] for name in settings}
  for _ in range(args.repeats):
    for name, size in settings.items():
      t = time.perf_counter()
      sweep.run(config(size), progress=False)
      warm[name].append(time.perf_counter() - t)
  medians = {name: statistics.median(v) for name, v in warm.items()}
  for name, v in warm.items():
    print(f'{name}: warm {medians[name]:.2f} s (of {", ".join(f"{s:.2f}" for s in v)})')
  a, b = medians.values()
  print(f'whole set / subset: {b / a:.2f}x')


if __name__ == '__main__':
  main()
