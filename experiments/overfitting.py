"""Overfitting made visible: a wide MLP on 200 digits, trained far past its best point.

scikit-learn's 8x8 digits, but only 200 of the 1437 training digits (the first 20 of
each class in the training split of `sweep.data.digits()`) and its 360 validation
digits: a wide MLP (64 -> 512 -> 512 -> 10, 300k parameters, 1500 per training digit)
fits the 200 in a few epochs and then keeps pushing its training loss towards zero for
300 epochs, while its validation loss climbs. 4 learning rates (3e-5, 1e-4, 1e-3, 1e-2)
x 2 batch sizes (16, 64) x 2 seeds = 16 runs, Adam, constant rate, 100 evaluations.

The results table (and `sweep.analysis.overfitting(result)`) says per run:
`best_val_epoch` (where the validation loss was lowest), `val_rise` (how far above that
minimum it ended, relative) and `overfit` (it ended more than 5 % above its minimum while
the training loss kept falling).

Command:
  sweep run experiments/overfitting.py --workdir workdirs/overfitting

Wall time on a 2-core CPU: 71 s with the command above (compiles, the report and a
checkpoint at each of the 100 evaluations included), 55-65 s through the API without a
workdir (measured while other jobs shared the two cores).

Result: 10 of the 16 runs are flagged `overfit`: every run at learning rate 1e-3 or
1e-2, and 1e-4 at batch 16. Their validation loss is lowest early and the higher the
rate the earlier: `best_val_epoch` 5.8-8.6 at 1e-2, 11.5-23 at 1e-3, 86-107 at 1e-4 and
batch 16, while the training loss goes on down to 8e-4 .. 2e-8; by the end the
validation loss is 10-125 % above its minimum (`val_rise` 0.10 at 1e-4 and batch 16 up
to 1.25 at 1e-2, seed 1; final validation loss 0.26-0.63 against minima of 0.23-0.33).
Run 6 (batch 16, lr 1e-2, seed 0) shows the shape: validation loss 0.231 at epoch 5.8,
0.436 at the end, training loss 1.3e-6. The 6 runs not flagged are the slow ones: 3e-5
at both batch sizes (best at the last evaluation, or 0.3 % above it) and 1e-4 at batch
64 (0-1.7 % above). Validation accuracy barely moves through all this (92-94 % at the
end, 93-94 % at best): the loss rises because the network grows confident on the digits
it gets wrong. (`epoch` counts examples seen over 200, so the last evaluation is at
epoch 288: a batch of 16 or 64 uses 192 of the 200 digits per pass, drop-last.)
"""

import numpy as np

import sweep

PER_CLASS = 20


def small_digits() -> sweep.data.Dataset:
  """20 training digits of each class and the full validation split of `digits()`."""
  full = sweep.data.digits()
  keep = np.concatenate([np.flatnonzero(full.y_train == c)[:PER_CLASS] for c in range(10)])
  keep.sort()
  return sweep.data.arrays(
    full.x_train[keep],
    full.y_train[keep],
    full.x_val,
    full.y_val,
    name='digits200',
    num_classes=10,
  )


def get_config() -> sweep.SweepConfig:
  return sweep.SweepConfig(
    name='overfitting',
    model=sweep.models.mlp(hidden=(512, 512)),
    data=small_digits(),
    loss='softmax_cross_entropy',
    optimizer='adam',
    learning_rate=[3e-5, 1e-4, 1e-3, 1e-2],
    batch_size=[16, 64],
    seed=[0, 1],
    schedule='constant',
    epochs=300,
    num_evals=100,
  )
