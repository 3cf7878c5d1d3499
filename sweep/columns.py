"""The columns of a sweep's results, in one place: the table (`results.csv`, one row per
run) and the curves (`curves.csv`, one row per run and evaluation).

Besides these, the table has `run`, `status` (ok or diverged), one column per swept
axis, `pareto` and `pareto_rank`; the curves have `run`, `eval`, `examples`, `epoch` and,
with `noise_scale=True`, `noise_scale`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# The axes of a sweep, in the order runs are enumerated (the last varies fastest).
AXES = (
  'optimizer',
  'schedule',
  'batch_size',
  'learning_rate',
  'momentum',
  'b1',
  'b2',
  'weight_decay',
  'warmup',
  'decay_rate',
  'seed',
)

# Every table has these (the validation ones where there is a validation set).
NUMERIC = (
  'updates',
  'examples',
  'final_batch_loss',
  'final_train_loss',
  'final_val_loss',
  'best_val_loss',
  'best_eval',
  'seconds',
  'generalization_gap',
  'best_val_epoch',
  'best_val_eval',
  'val_rise',
)
# Those of classification losses (and callable losses that report an accuracy).
ACCURACY = ('final_train_accuracy', 'final_val_accuracy', 'best_val_accuracy')
# Those that need a validation set (`data.x_val`).
VALIDATION = (
  'final_val_loss',
  'best_val_loss',
  'best_eval',
  'final_val_accuracy',
  'best_val_accuracy',
  'generalization_gap',
  'best_val_eval',
  'best_val_epoch',
  'val_rise',
)
# Added by `analysis.annotate_overfitting`, from the curves.
OVERFITTING = ('generalization_gap', 'best_val_eval', 'best_val_epoch', 'val_rise', 'overfit')
# With `noise_scale=True`: the median estimate over the second half of training.
NOISE_SCALE = 'noise_scale'
# What the table always has besides the numbers and the axes.
OTHER = ('run', 'status', 'overfit', 'pareto', 'pareto_rank')

# The metrics of each evaluation, as the training programs return them (the curves).
CURVES = (
  'batch_loss',
  'train_loss',
  'train_accuracy',
  'val_loss',
  'val_accuracy',
  'learning_rate',
  'updates',
  'alive',
  'grad_sq_half',
  'grad_sq_full',
)

DEFAULT_OBJECTIVES = {'final_val_loss': 'min', 'updates': 'min'}
# The defaults follow the data: without a validation set, the training probe's loss (the
# loss on `train_eval_size` training examples, `final_train_loss`).
NO_VALIDATION_OBJECTIVES = {'final_train_loss': 'min', 'updates': 'min'}


def objectives(given: Mapping[str, str], validation: bool) -> dict[str, str]:
  """The objectives the runs are ranked by: `given`, except the defaults without a
  validation set, which rank by the training probe's loss."""
  if dict(given) == DEFAULT_OBJECTIVES and not validation:
    return dict(NO_VALIDATION_OBJECTIVES)
  return dict(given)


def numeric(axes: Iterable[str], accuracy: bool, noise_scale: bool, validation: bool) -> list[str]:
  """The numeric columns of a table (those objectives may name).

  Args:
    axes: the swept numeric axes (learning_rate, batch_size, ...), in the table's order.
    accuracy: whether the loss reports an accuracy.
    noise_scale: whether the sweep estimates the noise scale.
    validation: whether there is a validation set.
  """
  out = list(axes) + list(NUMERIC)
  if accuracy:
    out += list(ACCURACY)
  if noise_scale:
    out.append(NOISE_SCALE)
  if not validation:
    out = [c for c in out if c not in VALIDATION]
  return out
