"""Learning-rate schedules whose every parameter is a traced array.

optax checks some schedule arguments in Python (``if transition_steps <= 0``,
``int(pct_start * transition_steps)``), so its schedules need concrete
arguments: a new value means a new trace, and a vmap over runs cannot give
each run its own schedule. The functions here restate optax's formulas on
``jnp`` so that the schedule family and all its parameters are plain arrays.
For concrete values they agree with the optax schedule ``optax_schedule``
builds, up to float32 rounding; the Python-side branches of optax become
``jnp.where`` selections.

A researcher's own schedule, ``callable(learning_rate, total_updates) ->
optax schedule``, joins the built-in ones as one more branch of the same
``lax.switch`` (``learning_rate(..., custom=...)``): it is called with the
run's learning rate traced and the run's number of updates as a Python int
(see ``custom_value``), so its code is part of the compiled program and its
learning rates are data.
"""

import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
  'SCHEDULES',
  'ScheduleParams',
  'custom_params',
  'custom_value',
  'learning_rate',
  'make_params',
  'optax_schedule',
]

SCHEDULES = (
  'constant',
  'exponential',
  'step',
  'cosine',
  'warmup_cosine',
  'linear',
  'onecycle',
  'warmup_linear',
)


class ScheduleParams(NamedTuple):
  """Every field is a float32 scalar array (int32 for kind); under vmap each run has its own."""

  kind: jax.Array  # int32 index into SCHEDULES, then into the custom schedules
  learning_rate: jax.Array  # initial / peak value
  total_steps: jax.Array  # the run's total number of updates
  decay_rate: jax.Array  # exponential and step
  transition_steps: jax.Array  # exponential and step
  warmup_steps: jax.Array  # warmup_cosine
  pct_start: jax.Array  # onecycle
  div_factor: jax.Array  # onecycle
  final_div_factor: jax.Array  # onecycle


def _onecycle_pct_start(pct_start: float, total_steps: int) -> np.float32:
  """The float32 pct_start whose boundary equals optax's.

  optax places the end of the onecycle warmup at ``int(pct_start * total)``
  computed in float64. The float32 product can land on the other side of an
  integer (``0.29 * 100`` is 28.999999999999996 in float64 but rounds to 29.0
  in float32), which would move the peak by a whole step. So the float32 value
  is nudged by a few ulps until both the float32 product (used on device) and
  the exact product (used by ``optax_schedule``) floor to optax's boundary.

  Args:
    pct_start: the requested fraction.
    total_steps: the run's number of updates.

  Returns:
    A float32 within a few ulps of ``pct_start``.
  """
  target = int(pct_start * total_steps)
  base = np.float32(pct_start)
  total32 = np.float32(total_steps)
  for i in range(64):
    for step in (i, -i) if i else (0,):
      candidate = base
      direction = np.float32(np.inf if step > 0 else -np.inf)
      for _ in range(abs(step)):
        candidate = np.nextafter(candidate, direction)
      on_device = math.floor(float(candidate * total32))
      exact = int(float(candidate) * total_steps)
      if on_device == target and exact == target:
        return candidate
  # Only reachable for totals near 2**24, where float32 step counts are
  # inexact anyway; the plain rounding is then as good as any.
  return base


def make_params(
  name: str,
  learning_rate: float,
  total_steps: int,
  *,
  decay_rate: float = 0.1,
  decay_every: float = 1 / 3,
  warmup: float = 0.1,
  pct_start: float = 0.3,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
) -> ScheduleParams:
  """Builds the schedule parameters of one run, on the host.

  Fields that the schedule ``name`` does not use still get their values, so
  that runs with different schedules stack into one batch.

  Args:
    name: one of ``SCHEDULES``.
    learning_rate: initial value, or peak value for ``warmup_cosine`` and
      ``onecycle``.
    total_steps: the run's number of updates (at least 1).
    decay_rate: factor applied once per ``transition_steps`` by
      ``exponential`` and ``step``.
    decay_every: for ``step``, the fraction of ``total_steps`` between two
      decays; the transition is ``max(1, round(decay_every * total_steps))``
      steps. ``exponential`` always uses ``total_steps``, so that the rate
      decays to ``decay_rate * learning_rate`` at the end.
    warmup: for ``warmup_cosine`` and ``warmup_linear``, the fraction of
      ``total_steps`` spent in linear warmup: ``round(warmup * total_steps)``
      steps.
    pct_start: for ``onecycle``, fraction of the run spent increasing, in
      ``[0, 1)``.
    div_factor: for ``onecycle``, the initial value is
      ``learning_rate / div_factor``.
    final_div_factor: for ``onecycle``, the final value is the initial value
      divided by this.

  Returns:
    numpy float32 / int32 scalars, one per field.

  Raises:
    ValueError: for an unknown name, ``total_steps < 1``, a warmup that leaves
      no decay steps, or ``pct_start`` outside ``[0, 1)``: the cases where the
      optax schedule refuses its arguments or is not a onecycle any more.
  """
  if name not in SCHEDULES:
    raise ValueError(f'unknown schedule {name!r}; known schedules are {", ".join(SCHEDULES)}')
  total_steps = int(total_steps)
  if total_steps < 1:
    raise ValueError(f'a schedule needs total_steps >= 1; got {total_steps}')
  warmup_steps = round(warmup * total_steps)
  if name in ('warmup_cosine', 'warmup_linear') and not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f'{name} needs 0 <= round(warmup * total_steps) < total_steps so that some steps '
      f'are left for the decay; got warmup={warmup} and total_steps={total_steps}, '
      f'which gives {warmup_steps} warmup steps'
    )
  if name == 'onecycle' and not 0 <= pct_start < 1:
    raise ValueError(f'onecycle needs pct_start in [0, 1); got {pct_start}')
  if name == 'step':
    transition_steps = max(1, round(decay_every * total_steps))
  else:
    transition_steps = total_steps
  if name == 'onecycle':
    pct32 = _onecycle_pct_start(pct_start, total_steps)
  else:
    pct32 = np.float32(pct_start)
  f32 = np.float32
  return ScheduleParams(
    kind=np.int32(SCHEDULES.index(name)),
    learning_rate=f32(learning_rate),
    total_steps=f32(total_steps),
    decay_rate=f32(decay_rate),
    transition_steps=f32(transition_steps),
    warmup_steps=f32(warmup_steps),
    pct_start=pct32,
    div_factor=f32(div_factor),
    final_div_factor=f32(final_div_factor),
  )


def custom_params(index: int, learning_rate: float, total_steps: int) -> ScheduleParams:
  """The parameters of a run whose schedule is the ``index``-th custom callable.

  Only ``learning_rate`` (traced, handed to the callable) and ``kind`` matter; the
  other fields hold harmless values so that such runs stack with any other.
  """
  params = make_params('constant', learning_rate, max(1, int(total_steps)))
  return params._replace(kind=np.int32(len(SCHEDULES) + int(index)))


# Each branch below restates one optax schedule with the same operation order,
# so that float32 results agree to the last bit or two. Divisors are guarded
# with jnp.maximum: under vmap lax.switch evaluates every branch for every
# run, and although the select discards the other branches' values, an inf or
# NaN there would still poison gradients and trip jax_debug_nans.


def _constant(p: ScheduleParams, count: jax.Array) -> jax.Array:
  del count
  return p.learning_rate


def _exponential(p: ScheduleParams, count: jax.Array, staircase: bool) -> jax.Array:
  # optax.exponential_decay with transition_begin=0. The count is not clipped:
  # the rate keeps decaying past transition_steps.
  steps = jnp.maximum(p.transition_steps, 1.0)
  rate = p.decay_rate
  exponent = count / steps
  if staircase:
    exponent = jnp.floor(exponent)
  decayed = jnp.where(count <= 0, p.learning_rate, p.learning_rate * jnp.power(rate, exponent))
  # optax returns a constant schedule for these arguments.
  return jnp.where((p.transition_steps <= 0) | (rate == 0), p.learning_rate, decayed)


def _cosine_decay(init_value: jax.Array, count: jax.Array, decay_steps: jax.Array) -> jax.Array:
  # optax.cosine_decay_schedule with alpha=0 and exponent=1, for which its
  # (1 - alpha) * cosine_decay**exponent + alpha is exactly cosine_decay.
  decay_steps = jnp.maximum(decay_steps, 1.0)
  count = jnp.minimum(count, decay_steps)
  cosine_decay = 0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps))
  return init_value * cosine_decay


def _linear(
  init_value: jax.Array, end_value: jax.Array, count: jax.Array, transition_steps: jax.Array
) -> jax.Array:
  # optax.linear_schedule (polynomial_schedule with power 1, transition_begin 0),
  # which is constant at init_value for non-positive transition_steps.
  steps = jnp.maximum(transition_steps, 1.0)
  clipped = jnp.clip(count, 0, steps)
  frac = 1 - clipped / steps
  value = (init_value - end_value) * frac + end_value
  return jnp.where(transition_steps <= 0, init_value, value)


def _step(p: ScheduleParams, count: jax.Array) -> jax.Array:
  return _exponential(p, count, staircase=True)


def _cosine(p: ScheduleParams, count: jax.Array) -> jax.Array:
  return _cosine_decay(p.learning_rate, count, p.total_steps)


def _warmup_cosine(p: ScheduleParams, count: jax.Array) -> jax.Array:
  # optax.warmup_cosine_decay_schedule(0, lr, W, total, end_value=0): a join
  # of a linear warmup and a cosine decay over the remaining total - W steps.
  # With W = 0 the warmup branch is never selected.
  warm = _linear(0.0, p.learning_rate, count, p.warmup_steps)
  decay = _cosine_decay(p.learning_rate, count - p.warmup_steps, p.total_steps - p.warmup_steps)
  return jnp.where(count < p.warmup_steps, warm, decay)


def _onecycle(p: ScheduleParams, count: jax.Array) -> jax.Array:
  # optax.cosine_onecycle_schedule, i.e. piecewise_interpolate_schedule('cosine')
  # with boundaries (0, floor(pct_start * T), T) and cumulative values
  # (lr / div, lr / div * div, lr / div * div / (div * final_div)).
  total = p.total_steps
  boundary = jnp.floor(p.pct_start * total)
  v0 = p.learning_rate / p.div_factor
  v1 = v0 * p.div_factor
  v2 = v1 * (1.0 / (p.div_factor * p.final_div_factor))

  def interpolate(start, end, lo, hi):
    size = jnp.maximum(hi - lo, 1.0)
    pct = (count - lo) / size
    value = end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1)
    inside = (lo <= count) & (count < hi)
    return inside * value

  rising = interpolate(v0, v1, 0.0, boundary)
  falling = interpolate(v1, v2, boundary, total)
  return rising + falling + (total <= count) * v2


def _exponential_smooth(p: ScheduleParams, count: jax.Array) -> jax.Array:
  return _exponential(p, count, staircase=False)


def _linear_decay(p: ScheduleParams, count: jax.Array) -> jax.Array:
  return _linear(p.learning_rate, 0.0, count, p.total_steps)


def _warmup_linear(p: ScheduleParams, count: jax.Array) -> jax.Array:
  # optax.join_schedules([linear_schedule(0, lr, W), linear_schedule(lr, 0, total - W)], [W]).
  warm = _linear(0.0, p.learning_rate, count, p.warmup_steps)
  decay = _linear(p.learning_rate, 0.0, count - p.warmup_steps, p.total_steps - p.warmup_steps)
  return jnp.where(count < p.warmup_steps, warm, decay)


# In the order of SCHEDULES.
_BRANCHES = (
  _constant,
  _exponential_smooth,
  _step,
  _cosine,
  _warmup_cosine,
  _linear_decay,
  _onecycle,
  _warmup_linear,
)


class _PositiveLearningRate:
  """A traced learning rate that answers Python comparisons with numbers <= 0.

  optax's schedule constructors check some arguments in Python:
  ``warmup_cosine_decay_schedule`` computes ``0.0 if peak_value == 0.0 else ...``,
  which a traced value cannot answer. Every learning rate of a sweep is > 0
  (validated), so a comparison with a number <= 0 has the same answer for every
  run, and the trace holds for all of them. Any other comparison depends on the
  value and raises. Arithmetic returns plain traced arrays.
  """

  def __init__(self, value: jax.Array):
    self._value = value

  def _decide(self, other: Any, op: Callable[[float, float], bool]) -> bool:
    if (
      isinstance(other, (int, float, np.integer, np.floating))
      and not isinstance(other, bool)
      and other <= 0
    ):
      return op(1.0, float(other))  # any positive value answers alike
    raise TypeError(
      f'the schedule compares the traced learning rate with {other!r} in Python; one program '
      'serves '
      'every learning rate, so write the comparison with jnp.where'
    )

  def __eq__(self, other):
    return self._decide(other, operator.eq)

  def __ne__(self, other):
    return self._decide(other, operator.ne)

  def __lt__(self, other):
    return self._decide(other, operator.lt)

  def __le__(self, other):
    return self._decide(other, operator.le)

  def __gt__(self, other):
    return self._decide(other, operator.gt)

  def __ge__(self, other):
    return self._decide(other, operator.ge)

  __hash__ = None

  def __bool__(self):
    raise TypeError('the schedule uses the traced learning rate as a Python bool')

  def __float__(self):
    raise TypeError('the schedule converts the traced learning rate to a Python float')

  def __neg__(self):
    return -self._value

  def __pos__(self):
    return self._value

  def __abs__(self):
    return jnp.abs(self._value)


def _unwrap(x: Any) -> Any:
  return x._value if isinstance(x, _PositiveLearningRate) else x


for _name in ('add', 'sub', 'mul', 'truediv', 'floordiv', 'mod', 'pow'):
  _op = getattr(operator, _name)
  setattr(
    _PositiveLearningRate,
    f'__{_name}__',
    lambda self, other, op=_op: op(self._value, _unwrap(other)),
  )
  setattr(
    _PositiveLearningRate,
    f'__r{_name}__',
    lambda self, other, op=_op: op(_unwrap(other), self._value),
  )


def custom_value(
  fn: Callable, learning_rate: jax.Array, total_steps: int, count: jax.Array
) -> jax.Array:
  """The value at ``count`` of the schedule ``fn(learning_rate, total_steps)``.

  ``fn`` may return an optax schedule (a callable of the count) or a number.
  It is called with the learning rate as a traced array; when that trips a
  Python check of optax's (``peak_value == 0.0``), it is called again with the
  learning rate wrapped so that comparisons with numbers <= 0 are answered
  (every learning rate of a sweep is positive).

  Args:
    fn: ``callable(learning_rate, total_updates) -> schedule``.
    learning_rate: the run's learning rate, a float32 scalar (traced).
    total_steps: the run's number of updates, a Python int.
    count: the 0-based update index (int32), as optax counts.

  Returns:
    A float32 scalar.
  """

  def value(lr):
    schedule = fn(lr, int(total_steps))
    return schedule(count) if callable(schedule) else schedule

  try:
    out = value(learning_rate)
  except jax.errors.ConcretizationTypeError:
    out = value(_PositiveLearningRate(learning_rate))
  return jnp.asarray(out, jnp.float32)


def learning_rate(
  params: ScheduleParams,
  count: jax.Array,
  custom: tuple[Callable, ...] = (),
  total_steps: int | None = None,
) -> jax.Array:
  """The learning rate of update ``count``.

  Args:
    params: one run's parameters (vmap over it for a batch of runs).
    count: 0-based update index, as optax counts: 0 is the first update.
    custom: the researcher's own schedules, ``callable(learning_rate,
      total_updates)``; kind ``len(SCHEDULES) + j`` selects ``custom[j]``.
    total_steps: the runs' number of updates, a Python int (needed with
      ``custom``: every run of a batch group has the same).

  Returns:
    A float32 scalar.
  """
  kind = jnp.asarray(params.kind, jnp.int32)
  floats = params._replace(
    **{field: jnp.asarray(getattr(params, field), jnp.float32) for field in params._fields[1:]}
  )
  counts = jnp.asarray(count, jnp.int32)
  # Step counts are exact in float32 up to 2**24 updates.
  count = jnp.asarray(count, jnp.float32)
  # lax.switch needs every branch to return the same dtype, and a branch that
  # only combines Python floats would return a weakly typed value.
  branches = [lambda p, c, ci, f=f: jnp.asarray(f(p, c), jnp.float32) for f in _BRANCHES]
  if custom and total_steps is None:
    raise ValueError("custom schedules need the runs' total_steps")
  branches += [
    lambda p, c, ci, fn=fn: custom_value(fn, p.learning_rate, total_steps, ci) for fn in custom
  ]
  return lax.switch(kind, branches, floats, count, counts)


def optax_schedule(params_for_one_run: ScheduleParams) -> optax.Schedule:
  """The optax schedule equal to ``learning_rate`` for one run's concrete params.

  Args:
    params_for_one_run: concrete (not traced) parameters of a single run.

  Returns:
    The optax schedule, mapping a step count to a learning rate.
  """
  p = params_for_one_run
  if int(p.kind) >= len(SCHEDULES):
    raise ValueError("a custom schedule is its own optax schedule: call it with the run's values")
  name = SCHEDULES[int(p.kind)]
  lr = float(p.learning_rate)
  total = int(p.total_steps)
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name in ('exponential', 'step'):
    return optax.exponential_decay(
      lr,
      transition_steps=int(p.transition_steps),
      decay_rate=float(p.decay_rate),
      staircase=name == 'step',
    )
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=total)
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=int(p.warmup_steps),
      decay_steps=total,
      end_value=0.0,
    )
  if name == 'linear':
    return optax.linear_schedule(init_value=lr, end_value=0.0, transition_steps=total)
  if name == 'warmup_linear':
    warmup = int(p.warmup_steps)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, total - warmup)],
      [warmup],
    )
  return optax.cosine_onecycle_schedule(
    transition_steps=total,
    peak_value=lr,
    pct_start=float(p.pct_start),
    div_factor=float(p.div_factor),
    final_div_factor=float(p.final_div_factor),
  )
