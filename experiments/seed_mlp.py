"""The seed's question on real data: which learning rate and batch size for its MLP?

The seed document's example, a Keras MLP 784 -> Dense(10, relu) -> Dense(10, softmax)
trained with Adam and categorical cross-entropy, here on scikit-learn's 8x8 digits
(64 -> 10 -> 10, shipped with the package, nothing to download): 9 learning rates
(1e-4 .. 1, log-spaced) x 4 batch sizes x 2 seeds = 72 runs, 20 epochs each, all in
one compiled program.

Command:
  sweep run experiments/seed_mlp.py --workdir workdirs/seed_mlp

Wall time on a 2-core CPU: about 7 s, compiles included.

Result (seed 0 and 1, validation split of 360 digits): the best runs sit at learning
rates 1e-2 to 3e-2 with batch sizes 16-32, at about 0.13 validation loss and 96-97 %
validation accuracy; learning rate 1 diverges or stalls for some batch sizes, and
1e-4 has barely moved after 20 epochs (validation loss near 2).
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
