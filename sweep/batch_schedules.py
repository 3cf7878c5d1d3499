"""Batch-size schedules: runs that grow their batch size during training.

    batch_size=[32, sweep.batch_ramp(32, factor=2, at=(0.5, 0.75))]
    batch_size=[128, sweep.batch_schedule([(0.0, 32), (0.5, 128)])]

A schedule is a list of stages `(fraction, batch size)`: from `fraction` of the examples
the run sees (its epochs), it trains at `batch size`. Fractions are rounded to epoch
boundaries (stage k starts at epoch `floor(fraction * epochs + 1/2)`), so a stage reads whole
epochs, each in the same order as every run of its seed (epoch e of seed s); a batch
size B reads `n // B` batches of an epoch, as a run of constant batch size B does.

The run's `updates` count its parameter updates, whatever the batch size, and its
learning-rate schedule runs on that clock: a cosine decay over a ramp run's budget
spans the ramp's own number of updates. (Smith et al. 2018, "Don't Decay the Learning
Rate, Increase the Batch Size", compare a step decay of the learning rate with a ramp
of the batch size at the same epochs; both are axis values of one sweep here.)

Between stages the run's whole state (parameters, optimizer state, model state, its
counters) moves from one batch group's slots to another's between two segments; the
stages' batch sizes are batch groups like any other, so new learning rates or new ramps
over the same batch sizes compile nothing new. Model randomness (dropout) and
augmentation at a step are drawn as for the step of a constant batch size run at the
same place of the data order (its batch group's step).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

from sweep.errors import config_error


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
  """A batch-size schedule: `stages` are `(fraction of the run's examples, batch size)`,
  the first at fraction 0. Make one with `batch_ramp` or `batch_schedule`."""

  stages: tuple[tuple[float, int], ...]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(b for _, b in self.stages)

  @property
  def first(self) -> int:
    return self.stages[0][1]

  @property
  def label(self) -> str:
    """How the table shows it: `32>64>128 @0.5,0.75`."""
    sizes = '>'.join(str(b) for b in self.sizes)
    at = ','.join(f'{f:.3g}' for f, _ in self.stages[1:])
    return f'{sizes} @{at}'

  def __str__(self) -> str:
    return self.label

  def epochs(self, epochs: int, where: str = 'batch_size') -> tuple[tuple[int, int], ...]:
    """`(first epoch, batch size)` of each stage for a run of `epochs` epochs.

    Raises:
      ConfigError: where two stages would start at the same epoch (or a later stage at 0).
    """
    starts = [math.floor(f * epochs + 0.5) for f, _ in self.stages]  # half up
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)) or (
      len(starts) > 1 and starts[1] == 0
    ):
      raise config_error(
        where,
        self,
        f'its stages start at epochs {starts} of {epochs} (fractions rounded to epoch '
        'boundaries): each stage needs at least one epoch of its own; train more epochs or '
        'move the stages apart',
      )
    return tuple((e, b) for e, (_, b) in zip(starts, self.stages, strict=True))

  def __repr__(self) -> str:
    return f'batch_schedule({[(f, b) for f, b in self.stages]!r})'


def batch_schedule(stages: Sequence[tuple[float, int]]) -> BatchSchedule:
  """A batch-size schedule from its stages `[(fraction, batch size), ...]`.

  Args:
    stages: from `fraction` of the run's examples (0 for the first stage, then increasing,
      below 1) it trains at `batch size` (positive integers). Fractions are rounded to
      epoch boundaries when the sweep is planned.

  Example:
    >>> sweep.batch_schedule([(0.0, 32), (0.5, 128)])
    batch_schedule([(0.0, 32), (0.5, 128)])
  """
  where = 'batch_schedule'
  if isinstance(stages, str | bytes) or not isinstance(stages, Sequence) or not stages:
    raise config_error(where, stages, 'expected a list of (fraction, batch size) stages')
  out = []
  for k, stage in enumerate(stages):
    if not isinstance(stage, Sequence) or isinstance(stage, str) or len(stage) != 2:
      raise config_error(f'{where}[{k}]', stage, 'expected a pair (fraction, batch size)')
    f, b = stage
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 <= f < 1:
      raise config_error(f'{where}[{k}]', stage, 'its fraction must be a number in [0, 1)')
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b <= 0:
      raise config_error(f'{where}[{k}]', stage, 'its batch size must be a positive integer')
    out.append((float(f), int(b)))
  if out[0][0] != 0:
    raise config_error(
      f'{where}[0]', stages[0], 'the first stage starts at fraction 0 (the batch size it starts at)'
    )
  for k in range(1, len(out)):
    if out[k][0] <= out[k - 1][0]:
      raise config_error(f'{where}[{k}]', stages[k], 'fractions must increase from stage to stage')
    if out[k][1] == out[k - 1][1]:
      raise config_error(
        f'{where}[{k}]', stages[k], 'the batch size must change from one stage to the next'
      )
  if len(out) == 1:
    raise config_error(
      where, stages, 'a schedule of one stage is a constant batch size: give the number itself'
    )
  return BatchSchedule(tuple(out))


def batch_ramp(start: int, factor: float = 2, at: Sequence[float] = (0.5, 0.75)) -> BatchSchedule:
  """A batch size that starts at `start` and is multiplied by `factor` at each fraction of
  `at` (of the run's examples, rounded to epoch boundaries).

  Example:
    >>> sweep.batch_ramp(32, factor=2, at=(0.5, 0.75))  # 32, then 64, then 128
    batch_schedule([(0.0, 32), (0.5, 64), (0.75, 128)])
  """
  if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start <= 0:
    raise config_error('batch_ramp(start)', start, 'expected a positive integer')
  if (
    isinstance(factor, bool)
    or not isinstance(factor, numbers.Real)
    or not math.isfinite(factor)
    or factor <= 0
    or factor == 1
  ):
    raise config_error('batch_ramp(factor)', factor, 'expected a positive number other than 1')
  if isinstance(at, numbers.Real):
    at = (at,)
  if isinstance(at, str) or not isinstance(at, Sequence) or not at:
    raise config_error('batch_ramp(at)', at, 'expected fractions in (0, 1), e.g. (0.5, 0.75)')
  stages = [(0.0, int(start))]
  size = float(start)
  for f in at:
    size *= factor
    if abs(size - round(size)) > 1e-9 * size or round(size) < 1:
      raise config_error(
        'batch_ramp(factor)',
        factor,
        f'{start} times {factor} to the power {len(stages)} is {size:g}, not a whole batch size',
      )
    stages.append((f, int(round(size))))
  if any(isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1 for f in at):
    raise config_error('batch_ramp(at)', at, 'expected fractions in (0, 1), e.g. (0.5, 0.75)')
  return batch_schedule(stages)


__all__ = ['BatchSchedule', 'batch_ramp', 'batch_schedule']
