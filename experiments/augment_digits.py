"""Data augmentation in a sweep: random crops and flips of 8x8 digits, per run and update.

scikit-learn's 8x8 digits (1437 training, 360 validation images), the flax examples' way
of writing a CNN (`nn.Conv`, `nn.Dense`, `nn.Dropout` switched by a `train` argument),
and an `augment(key, x_batch)` that pads each image by one pixel and crops it back at a
random offset (shifts of up to one pixel), then mirrors it with probability
`FLIP_PROBABILITY`. The engine applies it to every training batch with the key
`fold_in(fold_in(key(seed), 3), update)` (the runs of a seed see the same augmented
batches), never at evaluation. 4 learning rates x 2 batch sizes, Adam, 15 epochs.

Command:
  sweep run experiments/augment_digits.py --workdir workdirs/augment_digits

Wall time: 231 s in the sweep on a 2-core CPU shared with other work (load average about
7; 100 s of CPU time), compiles included.

Result: the best run ends at 97.5 % validation accuracy (validation loss 0.089) at
learning rate 1e-2 and batch 32; at batch 128 the best is 1e-2 too (96.7 %, 0.123). The
training loss measured on unaugmented images stays close to the validation loss
(generalization gap 0.02), and only learning rate 3e-2 at batch 128 rises off its best
validation loss before the end.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

import sweep

FLIP_PROBABILITY = 0.1  # digits are not mirror-symmetric: flips are a mild regulariser here


def crop_and_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random one-pixel shifts and occasional horizontal flips of a batch (batch, 8, 8)."""
  k_shift, k_flip = jax.random.split(key)
  n, h, w = images.shape
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1)))
  offsets = jax.random.randint(k_shift, (n, 2), 0, 3)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1]), (h, w)))
  shifted = crop(padded, offsets)
  flip = jax.random.bernoulli(k_flip, FLIP_PROBABILITY, (n, 1, 1))
  return jnp.where(flip, shifted[:, :, ::-1], shifted)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = x[..., None]
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(64)(x)))
    return nn.Dense(10)(x)


def get_config() -> sweep.SweepConfig:
  return sweep.SweepConfig(
    name='augment_digits',
    model=CNN(),
    data=sweep.data.digits(flatten=False),
    augment=crop_and_flip,
    optimizer='adam',
    learning_rate=[1e-3, 3e-3, 1e-2, 3e-2],
    batch_size=[32, 128],
    epochs=15,
    num_evals=15,
  )
