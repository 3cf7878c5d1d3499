"""How the best learning rate of plain SGD scales with the batch size.

The linear scaling rule (Goyal et al. 2017: multiply the learning rate by k when the
batch grows k-fold) is expected for plain SGD while the batch is small compared with
the critical batch size, where the gradient noise, which scales as lr / B, is what
limits the loss; adaptive optimizers like Adam often show square-root scaling instead.
This grid measures the exponent on MNIST-1D with an MLP 40 -> 64 -> 10 and plain SGD
(no momentum), a constant learning rate and a fixed budget of 20 epochs (so a larger
batch makes fewer updates): 16 learning rates log-spaced from 1e-3 to 10**0.5 (a
quarter-decade apart) x 5 batch sizes (8 .. 128) x 2 seeds = 160 runs.
`sweep.analysis.lr_batch_slope(result)` takes each batch size's best learning rate
(lowest seed-averaged final validation loss) and fits log(best lr) on log(batch size).

Command:
  sweep run experiments/lr_batch_coupling.py --workdir workdirs/lr_batch_coupling
  python experiments/lr_batch_coupling.py workdirs/lr_batch_coupling   # the fit

`python experiments/lr_batch_coupling.py` without a workdir runs the sweep itself and
prints the fit; with the workdir of a finished sweep it reads results.csv instead.

Wall time on a 2-core CPU: 24 s for `sweep run`, compiles, checkpoints and the report
included (measured while other jobs shared the two cores); the fit from the workdir
takes 5 s.

Result (SGD): the best learning rates are 0.025, 0.043, 0.126, 0.215 and 0.369 for
batch sizes 8, 16, 32, 64 and 128, none at the edge of the grid, at final validation
losses 1.09-1.10 for every batch size: slope 1.01, 95 % interval 0.76 to 1.25 (seed
bootstrap 1.01 to 1.63), consistent with the linear scaling rule and not with
square-root scaling. Ranked by final training loss instead the best rates are higher
(0.22 to 1.85) and the slope is 0.78. 14 of the 160 runs diverge: batch 8 from lr 1.08
on, batch 16 from 1.85, batches 32 and 64 at 3.16 (the top of the grid); batch 128
trains at every rate.
The same grid with optimizer='adam' and learning rates logspace(-4.5, -0.5, 16) gives
a slope of 0.44 (interval 0.16 to 0.72; best rates 1.3e-3 .. 4.3e-3), near square-root
scaling.
"""

import os
import sys

import numpy as np

import sweep


def get_config() -> sweep.SweepConfig:
  return sweep.SweepConfig(
    name='lr_batch_coupling',
    model=sweep.models.mlp(hidden=(64,)),
    data=sweep.data.mnist1d(),
    loss='softmax_cross_entropy',
    optimizer='sgd',
    learning_rate=[float(v) for v in np.logspace(-3, 0.5, 16)],
    batch_size=[8, 16, 32, 64, 128],
    seed=[0, 1],
    schedule='constant',
    epochs=20,
    num_evals=10,
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1 and os.path.isfile(os.path.join(argv[1], 'results.csv')):
    result = sweep.load(argv[1])
  else:
    result = sweep.run(get_config(), progress=False)
  table = sweep.analysis.batch_size_table(result)
  print(table[['learning_rate', 'final_val_loss', 'updates', 'lr_at_edge']])
  fit = sweep.analysis.lr_batch_slope(result, bootstrap=200)
  print(
    f'slope {fit["slope"]:.2f}, 95% interval {fit["ci_low"]:.2f} to {fit["ci_high"]:.2f}, '
    f'seed bootstrap {fit["boot_low"]:.2f} to {fit["boot_high"]:.2f}'
  )
  print(fit['interpretation'])


if __name__ == '__main__':
  main(sys.argv)
