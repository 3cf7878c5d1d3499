"""Targets that contradict the loss, objectives the table will not have and schedules a run
cannot follow are refused by `sweep.check` (and so by `sweep.run`) before anything compiles.

Each of these trained without complaint before (float class ids under a softmax give a
loss of exactly 0; one-hot rows summing to 2, all zeros or negative give 2.69, 0, -1.76),
or failed only after training. Nothing here compiles: the checks trace shapes only.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import COMPILE_EVENT

import sweep
from kernels.losses import check_labels

RNG = np.random.default_rng(0)
X = RNG.normal(size=(60, 5)).astype(np.float32)
CLASSES = RNG.integers(0, 3, size=60)
ONE_HOT = np.eye(3, dtype=np.float32)[CLASSES]


@contextlib.contextmanager
def no_compiles():
  """Fails if XLA compiles anything inside the block (without clearing the caches)."""
  names = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if event == COMPILE_EVENT:
      names.append(kwargs.get('fun_name', '?'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not names, f'compiled {names}'


def linear3(key):
  del key
  return {'w': np.zeros((5, 3), np.float32)}


def apply3(params, x):
  return x @ params['w']


def cfg(y, **changes) -> sweep.SweepConfig:
  data = sweep.data.arrays(X[:50], y[:50], X[50:], y[50:])
  out = sweep.SweepConfig(
    model=sweep.models.linear(), data=data, loss='softmax_cross_entropy', epochs=1
  )
  return out.replace(**changes)


BAD_TARGETS = [
  # id, targets, loss, fragments of the message
  (
    'float-class-ids',
    CLASSES.astype(np.float32),
    'softmax_cross_entropy',
    ['whole numbers', 'integers', 'astype'],
  ),
  (
    'one-hot-summing-to-2',
    np.concatenate([ONE_HOT, ONE_HOT[:, ::-1]], 1)[:, 1:4],
    'softmax_cross_entropy',
    ['whole numbers', 'summing to 1'],
  ),
  (
    'all-zeros',
    np.zeros((60, 3), np.float32),
    'softmax_cross_entropy',
    ['whole numbers', 'one-hot'],
  ),
  (
    'negative',
    ONE_HOT - 0.25 * np.eye(3, dtype=np.float32)[(CLASSES + 1) % 3] + 0.125,
    'softmax_cross_entropy',
    ['non-negative', 'rows have negative'],
  ),
  (
    'soft-not-normalised',
    0.4 * np.ones((60, 3), np.float32),
    'softmax_cross_entropy',
    ['summing to 1', 'sums from 1.2 to 1.2', 'normalise'],
  ),
  (
    'bce-labels-outside',
    np.where(ONE_HOT > 0, 2.0, 0.0).astype(np.float32),
    'sigmoid_binary_cross_entropy',
    ['[0, 1]'],
  ),
  (
    'hinge-labels-outside',
    np.where(ONE_HOT > 0, 2.0, -1.0).astype(np.float32),
    'hinge',
    ['{-1, 0, 1}'],
  ),
]


@pytest.mark.parametrize(
  'y, loss, fragments', [c[1:] for c in BAD_TARGETS], ids=[c[0] for c in BAD_TARGETS]
)
def test_targets_that_contradict_the_loss_are_refused(y, loss, fragments):
  with no_compiles(), pytest.raises(sweep.ConfigError) as info:
    sweep.check(cfg(y, loss=loss))
  message = str(info.value)
  assert 'data.y_train' in message, message
  for fragment in fragments:
    assert fragment in message, message


def test_targets_that_fit_the_loss_are_accepted():
  soft = np.full((60, 3), 1 / 3, np.float32)
  smoothed = 0.9 * ONE_HOT + 0.1 / 3
  with no_compiles():
    for y in (ONE_HOT, soft, smoothed):
      sweep.check(cfg(y))
    sweep.check(cfg(CLASSES.astype(np.int32)))
    sweep.check(cfg(ONE_HOT, loss='sigmoid_binary_cross_entropy'))
    sweep.check(cfg(2 * ONE_HOT - 1, loss='hinge'))


def test_class_ids_beyond_the_models_outputs_are_refused():
  labels = CLASSES.copy()
  labels[7] = 4  # the model has 3 outputs
  data = sweep.data.arrays(X, labels)
  with pytest.raises(sweep.ConfigError, match=r'class ids in 0\.\.2.*1 labels are outside'):
    sweep.check(sweep.SweepConfig(model=(linear3, apply3), data=data, loss='softmax_cross_entropy'))


def test_images_without_a_channel_axis_are_refused_naming_the_missing_axis():
  """A convolution reads (n, 8, 8) as one unbatched image, its batch axis a spatial one."""
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(jnp.mean(nn.Conv(4, (3, 3))(x), axis=(1, 2)))

  images = np.random.default_rng(0).normal(size=(60, 8, 8)).astype(np.float32)
  config = sweep.SweepConfig(model=CNN(), data=sweep.data.arrays(images, CLASSES), epochs=1)
  with no_compiles(), pytest.raises(sweep.ConfigError) as raised:
    sweep.check(config)
  assert 'inputs (n, 8, 8) are images, they have no channel axis' in str(raised.value)
  assert 'x[..., None]' in str(raised.value)
  sweep.check(config.replace(data=sweep.data.arrays(images[..., None], CLASSES)))


def test_a_softmax_over_one_output_is_refused():
  assert 'at least 2 outputs' in check_labels(
    'softmax_cross_entropy', np.ones((4, 1), np.float32), 1
  )


def test_an_objective_on_a_column_the_table_will_not_have_is_refused():
  no_val = sweep.data.arrays(X, CLASSES.astype(np.int32))
  base = sweep.SweepConfig(model=sweep.models.linear(), data=no_val, learning_rate=[0.1, 0.2])
  with no_compiles():
    sweep.check(base)  # the default objectives fall back to the training loss
    with pytest.raises(sweep.ConfigError, match='no validation set') as info:
      sweep.check(base.replace(objectives={'final_val_accuracy': 'max'}))
    assert 'final_train_loss' in str(info.value)
    with pytest.raises(sweep.ConfigError, match="objectives='warmup'"):
      sweep.check(base.replace(objectives={'warmup': 'min'}))  # not swept: no column
    sweep.check(base.replace(objectives={'final_train_accuracy': 'max', 'learning_rate': 'min'}))


def test_a_warmup_that_leaves_no_decay_is_refused_by_check():
  data = sweep.data.arrays(X, CLASSES.astype(np.int32))
  bad = sweep.SweepConfig(
    model=sweep.models.linear(), data=data, schedule='warmup_cosine', warmup=1.0
  )
  with pytest.raises(sweep.ConfigError) as info:
    sweep.check(bad)
  message = str(info.value)
  assert message.startswith('warmup=1.0 is invalid') and 'batch size 32' in message, message
  sweep.check(bad.replace(warmup=0.5))


def test_a_callable_loss_checks_on_a_training_set_of_one_example():
  def squared(predictions, targets):
    return ((predictions - targets) ** 2).mean(axis=-1)

  data = sweep.data.arrays(X[:1], X[:1, :1])
  sweep.check(sweep.SweepConfig(model=sweep.models.linear(), data=data, loss=squared, batch_size=1))
