"""What checkpointing costs: one sweep with a checkpoint after every segment, against the
same sweep without a workdir, in one process, warm (compiles done first).

    python scripts/checkpoint_overhead.py

The sweep: 32 learning rates of an MLP 64 -> 1024 -> 10 with Adam on digits, batch 128,
10 epochs in 10 segments (a checkpoint of 32 runs' parameters and Adam moments, about
30 MB, after each). Prints the best of 3 alternating runs of each and their ratio.
"""

import os
import shutil
import tempfile
import time

import sweep


def main() -> None:
  sweep.set_cpu_devices()
  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(1024,)),
    data=sweep.data.digits(),
    optimizer='adam',
    learning_rate=[1e-3 * k for k in range(1, 33)],
    batch_size=128,
    epochs=10,
    num_evals=10,
    name='checkpoint-overhead',
  )
  sweep.run(cfg, progress=False)  # compiles
  bare, kept, size = [], [], 0
  for _ in range(3):
    t = time.perf_counter()
    sweep.run(cfg, progress=False)
    bare.append(time.perf_counter() - t)
    root = tempfile.mkdtemp()
    try:
      t = time.perf_counter()
      sweep.run(cfg, workdir=os.path.join(root, 'w'), progress=False)
      kept.append(time.perf_counter() - t)
      state = os.path.join(root, 'w', 'state')
      size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(state) for f in fs)
    finally:
      shutil.rmtree(root)
  print(
    f'without a workdir: {min(bare):.2f} s; with a checkpoint after each of 10 segments: '
    f'{min(kept):.2f} s '
    f'({min(kept) / min(bare):.2f}x; state/ holds {size / 1e6:.1f} MB at the end)'
  )


if __name__ == '__main__':
  main()
