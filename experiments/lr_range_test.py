"""The learning-rate range test's suggestion against the learning rate a sweep finds best.

The LR range test (Smith 2015; fastai's `lr_find`) guesses a good learning rate from one
short run whose rate ramps up (`method='ramp'`), or here also from a grid of short runs
at fixed rates (`method='grid'`, 100 rates x 50 updates, trained at once). Both study
the first run of the sweep below (batch size 128, seed 0) and suggest by fastai's rules
(`valley`, `steep`, `minimum`). The sweep itself, `get_config()`, trains the MNIST-1D
MLP (40 -> 100 -> 100 -> 10, Adam, constant rate) at 16 learning rates (1e-4.5 ..
1e-0.5, a quarter-decade apart) x 2 seeds for 20 epochs, and its best learning rate
(lowest seed-averaged final validation loss, or final training loss) is what the
suggestions are compared with.

Command:
  python experiments/lr_range_test.py --workdir workdirs/lr_range_test
  sweep run experiments/lr_range_test.py --workdir workdirs/lr_range_test   # the sweep alone

The first runs both tests and the sweep and prints the comparison; with --workdir it
also saves the sweep and the ramp test there, so `sweep report` draws both.

Wall time on a 2-core CPU: 18 s for `python experiments/lr_range_test.py`, compiles
included (measured while other jobs shared the two cores): the ramp 4.4 s, the grid
6.5 s, the sweep 11 s.

Result:
                                  valley     steep   minimum
  lr_find ramp                    0.0148    0.0148    0.0201
  lr_find grid                   0.00473  0.000756   0.00148
  sweep best, final_val_loss     0.00233   (val loss 1.080, 61.0 % accuracy)
  sweep best, final_train_loss   0.00794   (train loss 0.085)
  sweep best, final_val_accuracy  0.0147   (64.2 %)
The ramp's valley (1.5e-2) is 0.81 decades above the learning rate with the lowest
validation loss and 0.27 decades above the one with the lowest training loss; it falls
on the rate with the best validation accuracy (the MLP overfits in loss long before it
does in accuracy, see experiments/mnist1d_mlp.py). The grid's valley (4.7e-3) lies
between the two loss optima (0.31 decades above the validation one, 0.23 below the
training one). Neither test is off by more than a decade from either loss optimum, and
which optimum a test lands near depends on the method, not on the question asked. In
the sweep, rates from 0.17 up fail (10 % accuracy) and 1e-4.5 has barely moved (train
loss 2.03 after 20 epochs).
"""

import argparse
import time

import numpy as np

import sweep


def get_config() -> sweep.SweepConfig:
  return sweep.SweepConfig(
    name='lr_range_test',
    model=sweep.models.mlp(hidden=(100, 100)),
    data=sweep.data.mnist1d(),
    loss='softmax_cross_entropy',
    optimizer='adam',
    learning_rate=[float(v) for v in np.logspace(-4.5, -0.5, 16)],
    batch_size=128,
    seed=[0, 1],
    schedule='constant',
    epochs=20,
    num_evals=10,
    train_eval_size=1000,
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description='LR range tests against the sweep.')
  parser.add_argument(
    '--workdir', help='also save the sweep and the ramp test here (for `sweep report`)'
  )
  args = parser.parse_args(argv)
  cfg = get_config()
  found = {}
  for method in ('ramp', 'grid'):
    start = time.perf_counter()
    found[method] = sweep.lr_find(cfg, method=method)
    print(f'lr_find {method}: {time.perf_counter() - start:.1f} s')
  start = time.perf_counter()
  result = sweep.run(cfg, workdir=args.workdir, progress=False)
  print(f'sweep: {time.perf_counter() - start:.1f} s')
  if args.workdir:
    from sweep import report

    report.save_lr_find(args.workdir, found['ramp'])
  rankings = (('final_val_loss', 'min'), ('final_train_loss', 'min'), ('final_val_accuracy', 'max'))
  best = {
    metric: sweep.analysis.batch_size_table(result, metric, mode)['learning_rate'].iloc[0]
    for metric, mode in rankings
  }
  columns = ['final_train_loss', 'final_val_loss', 'final_val_accuracy']
  per_lr = result.table.groupby('learning_rate')[columns].mean()
  print('The sweep (mean of 2 seeds):')
  print(per_lr.to_string(float_format=lambda v: f'{v:.4g}'))
  print()
  print(f'{"":30}{"valley":>10}{"steep":>10}{"minimum":>10}')
  for method, f in found.items():
    s = f.suggestions
    print(f'{"lr_find " + method:30}{s["valley"]:>10.3g}{s["steep"]:>10.3g}{s["minimum"]:>10.3g}')
  for metric, lr in best.items():
    print(f'{"sweep best, " + metric:30}{lr:>10.3g}')
  print()
  for method, f in found.items():
    for metric, lr in best.items():
      ratio = f.suggestion / lr
      decades = np.log10(ratio)
      print(f'{method} valley / sweep best ({metric}): {ratio:.2g} ({decades:+.2f} decades)')


if __name__ == '__main__':
  main()
