"""Sampled search spaces: a field of `SweepConfig` drawn at random rather than listed.

    import sweep
    cfg = sweep.SweepConfig(
        model=..., data=...,
        learning_rate=sweep.space.loguniform(1e-4, 1e-1),
        batch_size=sweep.space.choice([32, 64, 128]),
        samples=16, sample_seed=0,
    )

`samples=N` configurations are drawn: configuration k takes the k-th draw of every
sampled field. Fields given as lists stay grid axes: every sampled configuration is
trained at every point of their product (`seed=[0, 1]` trains each configuration with
two seeds). Random search beats a grid for the same budget when few hyperparameters
matter (Bergstra & Bengio 2012).

Each field draws from its own stream, `numpy.random.default_rng([sample_seed,
crc32(field)])`: the same seed gives the same runs, a change to one field's space leaves
the other fields' draws as they were, and the first N draws of a larger `samples` are
the N draws of a smaller one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from sweep.errors import config_error

__all__ = [
  'Choice',
  'LogUniform',
  'RandInt',
  'Space',
  'Uniform',
  'choice',
  'loguniform',
  'randint',
  'uniform',
]


class Space:
  """A distribution over the values of one field."""

  def draw(self, rng: np.random.Generator, n: int) -> list:
    """`n` values drawn with `rng`."""
    raise NotImplementedError

  def check(self, field: str) -> None:
    """Raises `ConfigError` when the space itself is malformed (bounds, options)."""
    raise NotImplementedError

  def candidates(self) -> list:
    """Values whose validity stands for the whole space: the bounds or the options."""
    raise NotImplementedError

  integer = False  # whether every value drawn is an integer


def _number(field: str, space: Space, v: Any) -> None:
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
    raise config_error(field, space, f'bounds must be finite numbers; got {v!r}')


@dataclasses.dataclass(frozen=True)
class Uniform(Space):
  """Uniform on [low, high)."""

  low: float
  high: float

  def check(self, field: str) -> None:
    _number(field, self, self.low)
    _number(field, self, self.high)
    if not self.low < self.high:
      raise config_error(field, self, 'a space needs low < high')

  def draw(self, rng, n):
    return [float(v) for v in rng.uniform(self.low, self.high, size=n)]

  def candidates(self):
    return [self.low, self.high]

  def __repr__(self):
    return f'uniform({self.low!r}, {self.high!r})'


@dataclasses.dataclass(frozen=True)
class LogUniform(Space):
  """Log-uniform on [low, high): log(value) is uniform; the usual space for learning rates."""

  low: float
  high: float

  def check(self, field: str) -> None:
    _number(field, self, self.low)
    _number(field, self, self.high)
    if not self.low > 0:
      raise config_error(field, self, 'a log-uniform space needs 0 < low')
    if not self.low < self.high:
      raise config_error(field, self, 'a space needs low < high')

  def draw(self, rng, n):
    return [float(v) for v in np.exp(rng.uniform(math.log(self.low), math.log(self.high), size=n))]

  def candidates(self):
    return [self.low, self.high]

  def __repr__(self):
    return f'loguniform({self.low!r}, {self.high!r})'


@dataclasses.dataclass(frozen=True)
class RandInt(Space):
  """An integer in [low, high], both included (Optuna's `suggest_int`); with `log`, drawn
  log-uniformly (small values as likely per factor as large ones)."""

  low: int
  high: int
  log: bool = False
  integer = True

  def check(self, field: str) -> None:
    for v in (self.low, self.high):
      if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise config_error(field, self, f'randint bounds must be integers; got {v!r}')
    if not self.low < self.high:
      raise config_error(field, self, 'a space needs low < high')
    if self.log and not self.low > 0:
      raise config_error(field, self, 'a log randint needs 0 < low')

  def draw(self, rng, n):
    if not self.log:
      return [int(v) for v in rng.integers(self.low, self.high + 1, size=n)]
    u = rng.uniform(math.log(self.low), math.log(self.high + 1), size=n)
    return [int(min(self.high, max(self.low, math.floor(math.exp(v))))) for v in u]

  def candidates(self):
    return [int(self.low), int(self.high)]

  def __repr__(self):
    return f'randint({self.low!r}, {self.high!r}{", log=True" if self.log else ""})'


@dataclasses.dataclass(frozen=True)
class Choice(Space):
  """One of `options`, each equally likely: numbers, names, or callables (optimizers and
  schedules)."""

  options: tuple

  def check(self, field: str) -> None:
    if not self.options:
      raise config_error(field, self, 'choice needs at least one option')
    try:
      distinct = len(set(self.options)) == len(self.options)
    except TypeError:
      raise config_error(
        field, self, 'choice options must be numbers, names or callables'
      ) from None
    if not distinct:
      raise config_error(field, self, 'choice options must be distinct')

  def draw(self, rng, n):
    return [self.options[int(i)] for i in rng.integers(len(self.options), size=n)]

  def candidates(self):
    return list(self.options)

  @property
  def integer(self):  # noqa: D102
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in self.options)

  def __repr__(self):
    return f'choice({list(self.options)!r})'


def uniform(low: float, high: float) -> Uniform:
  """A float drawn uniformly from [low, high)."""
  return Uniform(low, high)


def loguniform(low: float, high: float) -> LogUniform:
  """A float whose logarithm is uniform on [log low, log high): for learning rates and
  weight decays, which matter by factors."""
  return LogUniform(low, high)


def randint(low: int, high: int, *, log: bool = False) -> RandInt:
  """An integer in [low, high] (both included); `log=True` draws it log-uniformly."""
  return RandInt(low, high, log)


def choice(options: Sequence) -> Choice:
  """One of `options` (numbers, optimizer or schedule names, factories), each equally likely."""
  if isinstance(options, (str, bytes)) or not isinstance(options, Sequence | np.ndarray):
    raise config_error('choice', options, 'expected a list of options, e.g. choice([32, 64, 128])')
  values = np.asarray(options).tolist() if isinstance(options, np.ndarray) else list(options)
  return Choice(tuple(values))


def stream(sample_seed: int, field: str) -> np.random.Generator:
  """The generator a field's draws come from (see the module docstring)."""
  return np.random.default_rng([int(sample_seed), zlib.crc32(field.encode())])
