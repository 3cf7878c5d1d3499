"""The seed's question on real data: which learning rate and batch size for its MLP?

The seed document's example, a Keras MLP 784 -> Dense(10, relu) -> Dense(10, softmax)
trained with Adam and categorical cross-entropy, here on scikit-learn's 8x8 digits
(64 -> 10 -> 10, shipped with the package, nothing to download): 9 learning rates
(1e-4 .. 1, log-spaced) x 4 batch sizes x 2 seeds = 72 runs, 20 epochs each, all in
one compiled program.

Command:
  sweep run experiments/seed_mlp.py --workdir workdirs/seed_mlp

Wall time on a 2-core CPU: about 11 s for `sweep run` without a workdir (7.5 s in the
sweep, compiles included; the compile cache saves about 0.5 s).

Result (validation split of 360 digits): the best runs sit at learning rate 1e-2 with
batch sizes 16-64, at 0.125-0.14 validation loss and 96-97 % validation accuracy (then
3e-3 at batch 16 and 3e-2 at batch 128). Learning rate 1 does not blow up but stalls at
chance (10 % accuracy, validation loss 2.3-2.6: dead ReLUs); 1e-4 has barely moved after
20 epochs (validation loss 1.7-2.3).
"""

import numpy as np

import sweep


def get_config() -> sweep.SweepConfig:
  return sweep.SweepConfig(
    name='seed_mlp_digits',
    model=sweep.models.mlp(hidden=(10,)),
    data=sweep.data.digits(),
    loss='softmax_cross_entropy',
    optimizer='adam',
    learning_rate=[float(v) for v in np.logspace(-4, 0, 9)],
    batch_size=[16, 32, 64, 128],
    seed=[0, 1],
    schedule='constant',
    epochs=20,
    num_evals=20,
  )
