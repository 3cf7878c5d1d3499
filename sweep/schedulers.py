"""Adaptive search: rules that stop bad runs and give their compute to good ones.

A scheduler turns a sweep into a population advanced segment by segment (`sweep.population`):
at each evaluation point the rule reads every run's metric so far and decides. Its
decisions are array edits between segments of the same compiled programs:

- `SuccessiveHalving` (Jamieson & Talwalkar 2016; asynchronous: Li et al. 2018, ASHA):
  runs are judged at rungs (fractions of the budget); the best `1/eta` go on, the others
  stop. With `slots=`, only that many runs train at once and each stopped run's place goes
  to the next configuration (fresh from its seed, its own clock from 0).
- `MedianStopping` (Golovin et al. 2017, Google Vizier; Optuna's MedianPruner): a run
  stops when its best value so far is worse than the median of the other runs' running
  averages at the same point.
- `Patience`: a run stops when its metric has not improved for `patience` evaluations.
- `PBT` (Jaderberg et al. 2017): at every interval the bottom quantile copies the
  parameters, optimizer state and model state of a top-quantile run and perturbs its
  hyperparameters (or resamples them from the space).

Stopping rules only mark and stop runs: a run that goes on computes exactly what it would
have computed alone. Budgets are examples seen: the evaluation points are fractions of
every run's budget, so runs of different batch sizes are judged after the same number of
examples (each batch size keeps its own compiled program).

The decisions are pure functions of the recorded metrics (`Board`), so that they can be
checked against a brute-force reference and replayed exactly on resume.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from sweep.errors import config_error

# The metrics a rule may judge by: those every evaluation point records.
METRICS = ('val_loss', 'val_accuracy', 'train_loss', 'train_accuracy', 'batch_loss')


class Board:
  """Every run's metric at every evaluation point it reached, as a rule reads it.

  `values[i]` is run i's list of values at points 0, 1, ... (point 0 is before training);
  a value that is not finite (a diverged run) counts as the worst. Values are stored in
  the 'min' sense (a 'max' metric negated), so that lower is always better.
  """

  def __init__(self, n: int, mode: str):
    self.mode = mode
    self.values: list[list[float]] = [[] for _ in range(n)]

  def record(self, i: int, point: int, value: float) -> None:
    v = float(value)
    v = -v if self.mode == 'max' else v
    v = v if math.isfinite(v) else math.inf
    row = self.values[i]
    if len(row) != point:
      raise ValueError(f'run {i} reports point {point} after {len(row)} points')
    row.append(v)

  def at(self, point: int) -> dict[int, float]:
    """Every run that reached `point`: its value there."""
    return {i: row[point] for i, row in enumerate(self.values) if len(row) > point}


def _check_metric(name: str, metric: Any, mode: Any) -> None:
  if metric not in METRICS:
    raise config_error(f'{name}.metric', metric, 'one of ' + ', '.join(METRICS))
  if mode not in ('min', 'max'):
    raise config_error(f'{name}.mode', mode, 'expected "min" or "max"')


def _positive_int(field: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise config_error(field, value, f'expected an integer >= {minimum}')


# ------------------------------------------------------------ stopping rules ----


@dataclasses.dataclass(frozen=True)
class SuccessiveHalving:
  """Successive halving at rungs of the budget; asynchronous with `slots`.

  Rungs are at `min_fraction * eta**k` of every run's budget (examples seen) for k = 0,
  1, ... below 1, and the end. At a rung, a run goes on if it ranks among the best
  `max(1, floor(n / eta))` of the `n` runs that have reached that rung so far (all of them
  at once without `slots`: synchronous successive halving; with `slots`, those of earlier
  cohorts too: ASHA's rule). The others stop with status `stopped` at that rung.

  Attributes:
    eta: the reduction factor (3 keeps a third at each rung).
    metric: what runs are ranked by at a rung: val_loss, val_accuracy, train_loss,
      train_accuracy or batch_loss (at the rung's evaluation point).
    mode: 'min' or 'max'.
    min_fraction: the first rung, as a fraction of the budget (1/9 with eta=3 gives
      rungs at 1/9, 1/3 and 1).
    slots: how many runs train at once; None starts every configuration together. With
      fewer slots than configurations, a stopped run's place goes to the next configuration
      of the sweep (in table order), which starts from its seed with its own clock.
  """

  eta: float = 3
  metric: str = 'val_loss'
  mode: str = 'min'
  min_fraction: float = 1 / 9
  slots: int | None = None

  def check(self) -> None:
    _check_metric('SuccessiveHalving', self.metric, self.mode)
    if (
      isinstance(self.eta, bool)
      or not isinstance(self.eta, numbers.Real)
      or not math.isfinite(self.eta)
      or self.eta <= 1
    ):
      raise config_error('SuccessiveHalving.eta', self.eta, 'expected a number > 1')
    f = self.min_fraction
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1:
      raise config_error('SuccessiveHalving.min_fraction', f, 'expected a fraction in (0, 1)')
    if self.slots is not None:
      _positive_int('SuccessiveHalving.slots', self.slots)

  def fractions(self) -> list[float]:
    """The rungs below the end, as fractions of the budget."""
    out, f = [], float(self.min_fraction)
    while f < 1 - 1e-9:
      out.append(f)
      f *= self.eta
    return out

  def num_evals(self, default: int) -> int:
    """Evaluation points that put every rung on one: a multiple of 1/min_fraction's
    rounding, at least `default`."""
    base = max(1, round(1 / self.min_fraction))
    return base * max(1, math.ceil(default / base))

  def points(self, num_evals: int) -> list[int]:
    """The rungs below the end as evaluation points (every one distinct and >= 1)."""
    pts = [round(f * num_evals) for f in self.fractions()]
    if any(p < 1 for p in pts) or len(set(pts)) != len(pts):
      raise config_error(
        'num_evals',
        num_evals,
        f'SuccessiveHalving needs an evaluation point at every rung '
        f'({", ".join(f"{f:.4g}" for f in self.fractions())} of the budget): '
        f'a multiple of {round(1 / self.min_fraction)}, or None to choose one',
      )
    return pts

  def stop(self, point: int, now: Sequence[int], board: Board, num_evals: int) -> set[int]:
    """The runs among `now` (live runs that have just reached `point`) that stop there."""
    if point not in self.points(num_evals):
      return set()
    reached = board.at(point)
    keep = max(1, math.floor(len(reached) / self.eta))
    # Ties are broken by the run's index, so that decisions are reproducible.
    best = sorted(reached, key=lambda i: (reached[i], i))[:keep]
    return {i for i in now if i not in best}


@dataclasses.dataclass(frozen=True)
class MedianStopping:
  """The median stopping rule (Google Vizier; Optuna's MedianPruner).

  At each evaluation point after `grace` points, a run stops if its best value so far is
  worse than the median of the running averages (the mean of every value so far) of the
  other runs that reached the same point, once at least `min_runs` of them did.

  Attributes:
    metric, mode: what is judged, as in `SuccessiveHalving`.
    grace: evaluation points before the rule acts (Optuna's n_warmup_steps).
    min_runs: other runs needed at a point before the rule acts (n_startup_trials).
  """

  metric: str = 'val_loss'
  mode: str = 'min'
  grace: int = 1
  min_runs: int = 5

  def check(self) -> None:
    _check_metric('MedianStopping', self.metric, self.mode)
    _positive_int('MedianStopping.grace', self.grace, 0)
    _positive_int('MedianStopping.min_runs', self.min_runs, 1)

  def stop(self, point: int, now: Sequence[int], board: Board, num_evals: int) -> set[int]:
    del num_evals
    if point <= self.grace or point < 1:
      return set()
    reached = board.at(point)
    averages = {i: float(np.mean(board.values[i][1 : point + 1])) for i in reached}
    out = set()
    for i in now:
      others = [averages[j] for j in reached if j != i]
      if len(others) < self.min_runs:
        continue
      best = min(board.values[i][1 : point + 1])
      if best > float(np.median(others)):
        out.add(i)
    return out


@dataclasses.dataclass(frozen=True)
class Patience:
  """Per-run early stopping: a run stops when its metric has not improved by more than
  `min_delta` for `patience` evaluation points.

  Attributes:
    patience: evaluation points without improvement before the run stops.
    metric, mode: what is judged, as in `SuccessiveHalving`.
    min_delta: the least change that counts as an improvement.
  """

  patience: int = 3
  metric: str = 'val_loss'
  mode: str = 'min'
  min_delta: float = 0.0

  def check(self) -> None:
    _check_metric('Patience', self.metric, self.mode)
    _positive_int('Patience.patience', self.patience)
    d = self.min_delta
    if isinstance(d, bool) or not isinstance(d, numbers.Real) or not d >= 0:
      raise config_error('Patience.min_delta', d, 'expected a number >= 0')

  def stop(self, point: int, now: Sequence[int], board: Board, num_evals: int) -> set[int]:
    del num_evals
    out = set()
    for i in now:
      values = board.values[i][: point + 1]
      if len(values) <= self.patience + 1:  # point 0 and `patience` points at least
        continue
      before = min(values[: -self.patience])
      if not min(values[-self.patience :]) < before - self.min_delta:
        out.add(i)
    return out


# ------------------------------------------------------------ population-based training ----


@dataclasses.dataclass(frozen=True)
class PBT:
  """Population-based training (Jaderberg et al. 2017), inside the compiled program.

  Every `interval_updates` updates, the runs of each population (the runs of one optimizer
  and batch size) are ranked by `metric`; each run in the bottom `quantile` copies the
  parameters, optimizer state and model state of a run drawn from the top `quantile`
  (exploit), then multiplies each of `hyperparameters` by a factor drawn from `perturb`,
  or, with probability `resample_probability`, draws it again from the field's
  `sweep.space` distribution (explore). The copy is a gather on the run axis of the device
  state; the new values are data: nothing compiles again.

  Attributes:
    interval_updates: updates between two exploit steps, counted at the sweep's smallest
      batch size (larger ones exploit after the same number of examples).
    quantile: the fraction of a population that copies, and the one copied from.
    perturb: the factors a perturbed hyperparameter is multiplied by.
    hyperparameters: the fields explored: learning_rate, momentum, b1, b2, weight_decay,
      or names of the optimizer factory's `hyperparameters`.
    metric, mode: what runs are ranked by.
    resample_probability: the chance a hyperparameter is drawn from its space instead
      (for fields given as a `sweep.space` distribution).
    seed: the seed of the draws (which top run is copied, which factor), so that a sweep
      and its resume decide alike.
  """

  interval_updates: int = 100
  quantile: float = 0.25
  perturb: tuple[float, ...] = (0.8, 1.25)
  hyperparameters: tuple[str, ...] = ('learning_rate',)
  metric: str = 'val_loss'
  mode: str = 'min'
  resample_probability: float = 0.0
  seed: int = 0

  def check(self) -> None:
    _check_metric('PBT', self.metric, self.mode)
    _positive_int('PBT.interval_updates', self.interval_updates)
    q = self.quantile
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q <= 0.5:
      raise config_error('PBT.quantile', q, 'expected a fraction in (0, 0.5]')
    if (
      not isinstance(self.perturb, Sequence)
      or not self.perturb
      or any(
        isinstance(f, bool) or not isinstance(f, numbers.Real) or not f > 0 for f in self.perturb
      )
    ):
      raise config_error('PBT.perturb', self.perturb, 'expected a tuple of positive factors')
    if isinstance(self.hyperparameters, str) or not isinstance(self.hyperparameters, Sequence):
      raise config_error(
        'PBT.hyperparameters',
        self.hyperparameters,
        "a tuple of field names, e.g. ('learning_rate',)",
      )
    p = self.resample_probability
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
      raise config_error('PBT.resample_probability', p, 'expected a probability in [0, 1]')
    _positive_int('PBT.seed', self.seed, 0)

  def num_evals(self, smallest_batch_updates: int) -> int:
    return max(1, math.ceil(smallest_batch_updates / self.interval_updates))

  def exploit(
    self, point: int, members: Sequence[int], board: Board, rng: np.random.Generator
  ) -> list[tuple[int, int]]:
    """(target, source) pairs at `point`: each bottom-quantile member of `members` (one
    population) copies a top-quantile member drawn with `rng` (`self.rng`)."""
    values = board.at(point)
    ranked = sorted(members, key=lambda i: (values[i], i))
    k = max(1, math.floor(len(ranked) * self.quantile)) if len(ranked) >= 2 else 0
    if k == 0:
      return []
    top, bottom = ranked[:k], ranked[-k:]
    return [(t, top[int(rng.integers(len(top)))]) for t in bottom]

  def rng(self, point: int, members: Sequence[int]) -> np.random.Generator:
    """The draws of one population at one point: fixed by the seed, the point and the
    population, so a resumed sweep draws the same."""
    return np.random.default_rng([self.seed, point, min(members), len(members)])


Scheduler = SuccessiveHalving | MedianStopping | Patience | PBT
STOPPING = (SuccessiveHalving, MedianStopping, Patience)


def rules(scheduler: Any) -> tuple[Any, ...]:
  """The scheduler as a tuple of rules (a list of stopping rules acts as one: a run stops
  when any of them says so)."""
  if isinstance(scheduler, Sequence) and not isinstance(scheduler, str):
    return tuple(scheduler)
  return (scheduler,)


def check(scheduler: Any) -> tuple[Any, ...]:
  """The scheduler's rules, checked before anything compiles."""
  accepted = (
    'sweep.schedulers.SuccessiveHalving(...), MedianStopping(...), Patience(...), '
    'PBT(...), or a list of the stopping rules'
  )
  out = rules(scheduler)
  if not out:
    raise config_error('scheduler', scheduler, accepted)
  for rule in out:
    if not isinstance(rule, (*STOPPING, PBT)):
      raise config_error('scheduler', rule, accepted)
    rule.check()
  if any(isinstance(r, PBT) for r in out) and len(out) > 1:
    raise config_error('scheduler', scheduler, 'PBT acts alone: give it without stopping rules')
  if sum(isinstance(r, SuccessiveHalving) for r in out) > 1:
    raise config_error('scheduler', scheduler, 'at most one SuccessiveHalving')
  return out


def slots(scheduler: Any) -> int | None:
  for rule in rules(scheduler):
    if isinstance(rule, SuccessiveHalving):
      return rule.slots
  return None


__all__ = ['SuccessiveHalving', 'MedianStopping', 'Patience', 'PBT', 'Board']
