"""Per-example losses, accuracy and host-side input checks.

Every loss is ``fn(predictions, targets) -> jax.Array`` of shape ``(batch,)``:
the elementwise loss is averaged over every non-batch dimension, so the
trainer only ever reduces over the batch axis (and can weight or mask
examples there). The elementwise formulas come from optax so that the
numbers match what users get from optax directly.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  'CLASSIFICATION',
  'LOSSES',
  'check_labels',
  'check_shapes',
  'correct',
  'hinge',
  'per_example',
  'huber',
  'l1',
  'mse',
  'sigmoid_binary_cross_entropy',
  'softmax_cross_entropy',
]


def _mean_over_non_batch(x: jax.Array) -> jax.Array:
  """Averages over every axis but the leading batch axis.

  For a 1-D input the axis tuple is empty and the values pass through
  unchanged, so scalar-output models need no special casing.
  """
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _is_integer(x: jax.Array) -> bool:
  # The dtype is static under jit, so this picks a branch at trace time.
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)


def _signed_labels(labels: jax.Array) -> jax.Array:
  """Maps {0, 1} or {-1, +1} labels to {-1., +1.}."""
  return jnp.where(labels > 0, 1.0, -1.0)


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Squared error averaged over output dims, without a 1/2 factor.

  Args:
    predictions: model outputs of shape ``(batch, ...)``.
    targets: regression targets of the same shape.

  Returns:
    Per-example loss of shape ``(batch,)``.
  """
  return _mean_over_non_batch(jnp.square(targets - predictions))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross entropy over the last axis of ``logits``.

  Args:
    logits: unnormalised log-probabilities of shape ``(batch, ..., num_classes)``.
    labels: either integer class ids of shape ``(batch, ...)`` or one-hot /
      probability targets of the same shape as ``logits``.

  Returns:
    Per-example loss of shape ``(batch,)``.
  """
  if _is_integer(labels):
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  else:
    per_position = optax.softmax_cross_entropy(logits, labels)
  return _mean_over_non_batch(per_position)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Independent binary cross entropy per output.

  Args:
    logits: log-odds of shape ``(batch, ...)``.
    labels: targets in ``[0, 1]`` of the same shape (integers are accepted).

  Returns:
    Per-example loss of shape ``(batch,)``.
  """
  return _mean_over_non_batch(optax.sigmoid_binary_cross_entropy(logits, labels))


def huber(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Huber loss with ``delta=1``, averaged over output dims.

  Args:
    predictions: model outputs of shape ``(batch, ...)``.
    targets: regression targets of the same shape.

  Returns:
    Per-example loss of shape ``(batch,)``.
  """
  return _mean_over_non_batch(optax.huber_loss(predictions, targets, delta=1.0))


def l1(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Absolute error averaged over output dims.

  Args:
    predictions: model outputs of shape ``(batch, ...)``.
    targets: regression targets of the same shape.

  Returns:
    Per-example loss of shape ``(batch,)``.
  """
  return _mean_over_non_batch(jnp.abs(predictions - targets))


def hinge(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary hinge loss ``max(0, 1 - y * s)``, averaged over output dims.

  Args:
    scores: decision values of shape ``(batch, ...)``.
    labels: labels in ``{-1, +1}`` of the same shape; ``{0, 1}`` labels are
      accepted too, with 0 standing for the negative class, so the same data
      can be used with ``sigmoid_binary_cross_entropy``.

  Returns:
    Per-example loss of shape ``(batch,)``.
  """
  signed = _signed_labels(labels).astype(scores.dtype)
  return _mean_over_non_batch(optax.hinge_loss(scores, signed))


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  'mse': mse,
  'softmax_cross_entropy': softmax_cross_entropy,
  'sigmoid_binary_cross_entropy': sigmoid_binary_cross_entropy,
  'huber': huber,
  'l1': l1,
  'hinge': hinge,
}

CLASSIFICATION = frozenset({'softmax_cross_entropy', 'sigmoid_binary_cross_entropy', 'hinge'})


def _one_output(name: str, predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """The targets as a regression loss compares them: a model with one output may return
  (batch,) for targets held as (batch, 1) (how `sweep.data.arrays` holds a float y of
  shape (n,)), compared per example as (batch,) with (batch,)."""
  if name in CLASSIFICATION or predictions.ndim != targets.ndim - 1 or targets.shape[-1] != 1:
    return targets
  return targets[..., 0]


def _unknown(name: str) -> str:
  return f'unknown loss {name!r}; known losses are {", ".join(sorted(LOSSES))}'


def _token_mask(targets: jax.Array, ignore_label: int | None) -> jax.Array | None:
  """1.0 where an integer target counts, 0.0 where it is ``ignore_label`` (padding)."""
  if ignore_label is None or not _is_integer(targets):
    return None
  return (targets != ignore_label).astype(jnp.float32)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of ``values`` over the non-batch axes where ``mask`` is 1 (0 where none is)."""
  axes = tuple(range(1, values.ndim))
  return jnp.sum(values * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def per_example(
  name: str, predictions: jax.Array, targets: jax.Array, ignore_label: int | None = None
) -> jax.Array:
  """The loss ``name`` per example, (batch,); with integer targets, positions whose
  target is ``ignore_label`` are left out of each example's mean (an example with none
  left has loss 0).
  """
  mask = _token_mask(targets, ignore_label)
  if mask is None or name != 'softmax_cross_entropy':
    return LOSSES[name](predictions, _one_output(name, predictions, targets))
  safe = jnp.where(mask > 0, targets, 0)
  per_position = optax.softmax_cross_entropy_with_integer_labels(predictions, safe)
  return _masked_mean(per_position, mask)


def correct(
  name: str, predictions: jax.Array, targets: jax.Array, ignore_label: int | None = None
) -> jax.Array | None:
  """Per-example accuracy for classification losses.

  Args:
    name: a key of ``LOSSES``.
    predictions: the model outputs the loss ``name`` takes.
    targets: the targets the loss ``name`` takes.
    ignore_label: an integer target left out (padding tokens); with sequences of ids,
      the accuracy of an example is the fraction of its other positions predicted right.

  Returns:
    Float 0/1 (or the fraction of correct outputs, for multi-output binary
    tasks) of shape ``(batch,)``, or ``None`` for regression losses, where
    accuracy has no meaning.

  Raises:
    ValueError: if ``name`` is not a known loss.
  """
  if name not in LOSSES:
    raise ValueError(_unknown(name))
  if name not in CLASSIFICATION:
    return None
  if name == 'softmax_cross_entropy':
    predicted = jnp.argmax(predictions, axis=-1)
    wanted = targets if _is_integer(targets) else jnp.argmax(targets, axis=-1)
    hits = predicted == wanted
    mask = _token_mask(targets, ignore_label)
    if mask is not None:
      return _masked_mean(hits.astype(jnp.float32), mask)
  elif name == 'sigmoid_binary_cross_entropy':
    hits = (predictions > 0) == (targets > 0.5)
  else:
    hits = jnp.sign(predictions) == jnp.sign(_signed_labels(targets))
  return _mean_over_non_batch(hits.astype(jnp.float32))


def _shape(shape: tuple) -> str:
  return str(tuple(shape))


def check_shapes(
  name: str, pred_shape: tuple, target_shape: tuple, target_is_integer: bool
) -> str | None:
  """Checks that model outputs and targets fit the loss, before compiling.

  Args:
    name: a key of ``LOSSES``.
    pred_shape: shape of the model outputs, batch dim included.
    target_shape: shape of the targets, batch dim included.
    target_is_integer: whether the targets have an integer dtype.

  Returns:
    ``None`` when the shapes fit, else a sentence saying which shapes the loss
    accepts and which it got.
  """
  if name not in LOSSES:
    return _unknown(name)
  pred_shape, target_shape = tuple(pred_shape), tuple(target_shape)
  got = f'got predictions {_shape(pred_shape)} and labels {_shape(target_shape)}'
  if name == 'softmax_cross_entropy' and target_is_integer:
    if len(pred_shape) < 2 or target_shape != pred_shape[:-1]:
      return (
        'softmax_cross_entropy with integer labels needs predictions of shape '
        '(batch, num_classes) for labels (batch,), or (batch, T, num_classes) for '
        f'sequences of ids (batch, T); {got}'
      )
    return None
  if name == 'softmax_cross_entropy' and len(pred_shape) < 2:
    # A 1-D logit vector would make the softmax run across the batch.
    return (
      'softmax_cross_entropy with one-hot or probability targets needs predictions '
      f'and targets of the same shape (batch, ..., num_classes); {got}'
    )
  one_output = len(target_shape) == 2 and target_shape[1] == 1 and pred_shape == target_shape[:1]
  if one_output and name not in CLASSIFICATION:
    return None  # one output per example, (batch,) against (batch, 1): see `_one_output`
  if one_output:
    return (
      f'{name} needs predictions and targets of the same shape (batch, ...); the targets are '
      f'held as {_shape(target_shape)}, one column per output (a y of shape (n,) is held as '
      '(n, 1)): return predictions of shape (batch, 1), e.g. logits[:, None]'
    )
  if len(pred_shape) < 1 or pred_shape != target_shape:
    return (
      f'{name} needs predictions and targets of the same shape (batch, ...); '
      f'got predictions {_shape(pred_shape)} and targets {_shape(target_shape)}'
    )
  return None


def _value_range(y: np.ndarray) -> str:
  return f'got values from {np.min(y)} to {np.max(y)}'


def check_labels(name: str, y: np.ndarray, num_outputs: int) -> str | None:
  """Checks label values on the host, where an error can still be explained.

  On device an out-of-range class id is silently clipped or gives a NaN loss,
  and targets that contradict the loss train without complaint (float class ids
  under a softmax give a loss of exactly 0), so it is cheaper to catch them here
  once per data set. Softmax cross entropy takes integer class ids in range, or
  one-hot / probability rows (non-negative, summing to 1 within
  ``SOFT_TARGET_TOLERANCE``); float targets that are all whole numbers but not
  one-hot get a message suggesting integer labels. Sigmoid cross entropy takes
  labels in [0, 1]; hinge takes labels in {-1, 0, 1}.

  Args:
    name: a key of ``LOSSES``.
    y: all targets of the data set.
    num_outputs: the model's output width (the number of classes for softmax
      cross entropy).

  Returns:
    ``None`` when the labels fit the loss, else a sentence saying what is
    accepted and what was found.
  """
  if name not in LOSSES:
    return _unknown(name)
  y = np.asarray(y)
  if y.size == 0:
    return None
  if name == 'softmax_cross_entropy' and not np.issubdtype(y.dtype, np.integer):
    problem = _check_soft_targets(y)
    if problem:
      return problem
  if name == 'softmax_cross_entropy' and num_outputs < 2:
    return (
      f'softmax_cross_entropy needs at least 2 outputs (classes); the model has {num_outputs}, '
      'and a softmax over one output is always 1 (the loss is always 0)'
    )
  if name == 'softmax_cross_entropy' and np.issubdtype(y.dtype, np.integer):
    bad = (y < 0) | (y >= num_outputs)
    if bad.any():
      return (
        f'softmax_cross_entropy with integer labels needs class ids in 0..{num_outputs - 1} '
        f'(the model has {num_outputs} outputs); {int(bad.sum())} labels are outside, '
        f'{_value_range(y)}'
      )
  elif name == 'sigmoid_binary_cross_entropy':
    # Written as a negated range test so that NaN labels are caught too.
    bad = ~((y >= 0) & (y <= 1))
    if bad.any():
      return (
        f'sigmoid_binary_cross_entropy needs labels in [0, 1]; {int(bad.sum())} labels are '
        f'outside, {_value_range(y)}'
      )
  elif name == 'hinge':
    bad = ~np.isin(y, (-1, 0, 1))
    if bad.any():
      examples = np.unique(y[bad])[:5].tolist()
      return (
        f'hinge needs labels in {{-1, 0, 1}} (0 is read as -1); {int(bad.sum())} labels are '
        f'not, for example {examples}'
      )
  return None


SOFT_TARGET_TOLERANCE = 1e-3  # how far from 1 a row of soft targets may sum


def _check_soft_targets(y: np.ndarray) -> str | None:
  """One-hot or probability targets for softmax cross entropy: rows (the last axis) of
  non-negative values summing to 1. Float class ids (every value a whole number, rows
  not one-hot) are the likeliest mistake, and get their own message."""
  y = np.asarray(y, np.float64)
  if y.ndim < 2:
    return None  # check_shapes refuses these
  bad = ~np.isfinite(y)
  if bad.any():
    return f'softmax_cross_entropy needs finite targets; {int(bad.sum())} are NaN or inf'
  rows = y.reshape(-1, y.shape[-1])
  sums = rows.sum(axis=1)
  negative = (rows < 0).any(axis=1)
  off = np.abs(sums - 1) > SOFT_TARGET_TOLERANCE
  if not (negative.any() or off.any()):
    return None
  if np.all(rows == np.round(rows)):
    examples = np.unique(rows)[:5].tolist()
    return (
      f'softmax_cross_entropy got float targets whose values are all whole numbers '
      f'(for example {examples}) but whose rows are not one-hot: class ids must be integers '
      '(e.g. y.astype(np.int32), shape (n,)); one-hot or probability targets need '
      'non-negative rows summing to 1'
    )
  if negative.any():
    return (
      f'softmax_cross_entropy with probability targets needs non-negative values; '
      f'{int(negative.sum())} rows have negative ones (the smallest is {rows.min():.4g})'
    )
  return (
    f'softmax_cross_entropy with probability targets needs rows summing to 1 (within '
    f'{SOFT_TARGET_TOLERANCE}); {int(off.sum())} rows do not (sums from {sums.min():.4g} to '
    f'{sums.max():.4g}): normalise them, y / y.sum(-1, keepdims=True)'
  )
