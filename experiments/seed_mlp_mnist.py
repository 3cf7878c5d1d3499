"""The seed's MLP on MNIST itself, from IDX files you have (scikit-learn's digits if not).

The seed document's Keras model, 784 -> Dense(10, relu) -> Dense(10, softmax), Adam,
categorical cross-entropy, on MNIST read from IDX files (nothing is downloaded):
8 learning rates (1e-4 .. 0.3, half a decade apart) x 4 batch sizes (16 .. 128) x 2
seeds = 64 runs.

Where the data comes from:
- `SWEEP_MNIST_DIR` names a directory with the four MNIST files (each optionally
  gzipped): 60000 training digits, validation on the 10000 t10k digits, 3 epochs;
- the directory holds only the t10k files: they are split in order, the first 8000
  train (`train_fraction=0.8`) and the last 2000 validate, 20 epochs;
- the variable is unset or the files are missing: scikit-learn's 8x8 digits (64 -> 10
  -> 10, 1437 train / 360 validation), 20 epochs, and a note says so.
The epochs are chosen so that a run sees about as many examples (160k-180k) in the two
MNIST cases.

Command:
  SWEEP_MNIST_DIR=path/to/mnist \
    sweep run experiments/seed_mlp_mnist.py --workdir workdirs/seed_mlp_mnist

Wall time on a 2-core CPU, compiles included (measured while other jobs shared the two
cores):
- t10k files only: 36 s with the command above (compiles, checkpoints and the report
  included), 19-37 s through the API;
- full MNIST: not measured on the real training files; the same code path on a stand-in
  directory of 60000 training images (the t10k images repeated six times) took 33 s;
- digits fallback: about 12 s.

Result with the t10k files only (8000 train / 2000 validation, the last 2000 of t10k):
no run diverges. The best learning rate grows with the batch size: by seed-averaged
final validation loss it is 3.2e-4 at batch 16 (0.228), 1e-3 at 32 (0.231) and 64
(0.221, the best) and 3.2e-3 at 128 (0.228), with 93.0-93.8 % validation accuracy; the
best single run is batch 128 at 3.2e-3, seed 0: 94.35 % (0.213). Learning rate 0.32
fails at every batch size (11-13 %), 0.1 at batch 16 and 32 (23-25 %), and 1e-4 is
still behind after 20 epochs (81 % at batch 128, 92 % at 16). No run ends above
94.4 % (94.6 % at its best evaluation): 10 hidden units are few for MNIST. On the stand-in 60000
(which repeats the validation digits, so its validation numbers mean nothing) the same
grid ran to 96.8 %. With the digits fallback, as in experiments/seed_mlp.py, the best
rates are 3e-3 .. 3e-2 (seed-averaged final validation loss 0.163-0.176 at each batch
size's best; seed-averaged final accuracy up to 94.9-95.7 %; 97 % at the best evaluation
of the best runs).
"""

import os

import numpy as np

import sweep

TRAIN_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte')
T10K_FILES = ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def _have(directory: str, names: tuple[str, ...]) -> bool:
  return all(
    any(os.path.isfile(os.path.join(directory, n + suffix)) for suffix in ('', '.gz'))
    for n in names
  )


def load_data() -> tuple[sweep.data.Dataset, float]:
  """The dataset and its epoch budget, from `SWEEP_MNIST_DIR` when it holds MNIST."""
  directory = os.environ.get('SWEEP_MNIST_DIR')
  if directory and os.path.isdir(directory):
    if _have(directory, TRAIN_FILES + T10K_FILES):
      return sweep.data.mnist(directory), 3
    if _have(directory, T10K_FILES):
      print(f'note: only the t10k files are in {directory}; training on the first 80 % of them')
      return sweep.data.mnist(directory, train_fraction=0.8), 20
  reason = 'SWEEP_MNIST_DIR is not set' if not directory else f'no MNIST IDX files in {directory!r}'
  print(
    f"note: {reason}; using scikit-learn's 8x8 digits instead of MNIST "
    '(set SWEEP_MNIST_DIR to a directory with the IDX files)'
  )
  return sweep.data.digits(), 20


def get_config() -> sweep.SweepConfig:
  data, epochs = load_data()
  return sweep.SweepConfig(
    name=f'seed_mlp_{data.name}',
    model=sweep.models.mlp(hidden=(10,)),
    data=data,
    loss='softmax_cross_entropy',
    optimizer='adam',
    # Eight values fill a run axis of eight (widths are powers of two).
    learning_rate=[float(v) for v in np.logspace(-4, -0.5, 8)],
    batch_size=[16, 32, 64, 128],
    seed=[0, 1],
    schedule='constant',
    epochs=epochs,
    num_evals=10,
    train_eval_size=2048,
  )
