"""The traced schedules against optax, which each test builds for itself."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kernels import schedules
from kernels.schedules import SCHEDULES, learning_rate, make_params

# (learning_rate, total_steps, keyword arguments of make_params). Short runs
# exercise the rounding of warmup / decay intervals and the onecycle boundary
# at 0; the default warmup of 0.1 gives 0 warmup steps for totals 1..4.
PARAM_SETS = [
  (0.1, 1, {}),
  (0.1, 2, {}),
  (1.0, 3, {}),
  (0.1, 7, {}),
  (3e-4, 1000, {}),
  (0.5, 7, dict(warmup=0.0, decay_every=0.5, decay_rate=0.5, pct_start=0.0)),
  (0.1, 10, dict(warmup=0.3, decay_every=0.25, decay_rate=0.5, pct_start=0.7, div_factor=10.0)),
  # 0.29 * 100 is 28.999999999999996 in float64 but 29.0 in float32: the
  # onecycle boundary must still follow optax's float64 int().
  (0.1, 100, dict(warmup=0.05, decay_every=0.1, decay_rate=0.9, pct_start=0.29)),
  (2.0, 1000, dict(warmup=0.0, decay_rate=0.01, pct_start=0.5, final_div_factor=100.0)),
  (0.1, 10, dict(decay_rate=0.0)),
]


def optax_reference(name: str, lr: float, total: int, kwargs: dict) -> optax.Schedule:
  """The optax schedule a user would write for these settings."""
  decay_rate = kwargs.get('decay_rate', 0.1)
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'exponential':
    return optax.exponential_decay(lr, transition_steps=total, decay_rate=decay_rate)
  if name == 'step':
    every = max(1, round(kwargs.get('decay_every', 1 / 3) * total))
    return optax.exponential_decay(
      lr, transition_steps=every, decay_rate=decay_rate, staircase=True
    )
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=total)
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=round(kwargs.get('warmup', 0.1) * total),
      decay_steps=total,
      end_value=0.0,
    )
  if name == 'linear':
    return optax.linear_schedule(init_value=lr, end_value=0.0, transition_steps=total)
  if name == 'warmup_linear':
    warmup = round(kwargs.get('warmup', 0.1) * total)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, total - warmup)],
      [warmup],
    )
  assert name == 'onecycle'
  return optax.cosine_onecycle_schedule(
    transition_steps=total,
    peak_value=lr,
    pct_start=kwargs.get('pct_start', 0.3),
    div_factor=kwargs.get('div_factor', 25.0),
    final_div_factor=kwargs.get('final_div_factor', 1e4),
  )


# Every evaluation uses the same padded counts so that jax compiles each
# operation once for the whole module instead of once per run length.
MAX_COUNT = max(total for _, total, _ in PARAM_SETS) + 3
COUNTS = np.arange(MAX_COUNT)


def optax_values(schedule: optax.Schedule, total: int) -> np.ndarray:
  """optax's values at counts 0..total+2."""
  # The onecycle schedule only takes scalar counts, so map over them; the
  # int32 counts are what optax's own optimizers pass.
  values = jax.vmap(lambda c: jnp.asarray(schedule(c)))(jnp.asarray(COUNTS, jnp.int32))
  return np.asarray(values)[: total + 3]


def assert_close(actual, expected, lr: float):
  # Values that decay towards 0 come out of 1 - count / total or 1 + cos(.),
  # whose float32 cancellation error is about an ulp of 1 relative to the
  # peak, so the absolute tolerance scales with the peak value.
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * lr)


_per_count = jax.jit(jax.vmap(learning_rate, in_axes=(None, 0)))


def traced_values(params: schedules.ScheduleParams, total: int) -> np.ndarray:
  """learning_rate's values at counts 0..total+2."""
  return np.asarray(_per_count(params, COUNTS))[: total + 3]


@pytest.mark.parametrize('lr,total,kwargs', PARAM_SETS)
@pytest.mark.parametrize('name', SCHEDULES)
def test_matches_optax_at_every_count(name, lr, total, kwargs):
  params = make_params(name, lr, total, **kwargs)
  actual = traced_values(params, total)
  expected = optax_values(optax_reference(name, lr, total, kwargs), total)
  assert actual.dtype == np.float32
  assert_close(actual, expected, lr)


@pytest.mark.parametrize('name', SCHEDULES)
def test_optax_schedule_matches_learning_rate(name):
  lr, total, kwargs = PARAM_SETS[7]
  params = make_params(name, lr, total, **kwargs)
  assert_close(
    traced_values(params, total), optax_values(schedules.optax_schedule(params), total), lr
  )


def _runs():
  """One batch of runs mixing every schedule with different parameters."""
  runs = []
  for i, name in enumerate(SCHEDULES):
    for lr, total, kwargs in (PARAM_SETS[i % 4], PARAM_SETS[5 + i % 5]):
      runs.append((name, lr, total, kwargs))
  return runs


def _stack(params_list):
  return jax.tree.map(lambda *xs: np.stack(xs), *params_list)


def test_vmapped_batch_of_runs_matches_optax():
  runs = _runs()
  batch = _stack([make_params(name, lr, total, **kw) for name, lr, total, kw in runs])
  per_run = jax.vmap(learning_rate, in_axes=(0, None))
  values = np.asarray(jax.jit(jax.vmap(per_run, in_axes=(None, 0)))(batch, COUNTS))
  assert values.shape == (MAX_COUNT, len(runs))
  # Every branch is evaluated for every run under vmap; none may leak a NaN.
  assert np.isfinite(values).all()
  for j, (name, lr, total, kwargs) in enumerate(runs):
    expected = optax_values(optax_reference(name, lr, total, kwargs), total)
    assert_close(values[: total + 3, j], expected, lr)


def test_gradient_through_batched_switch_is_finite():
  # The unselected branches see warmup_steps == 0, total_steps == 1 and a
  # decay rate of 0; a division by zero there would turn gradients into NaN.
  runs = _runs()
  batch = _stack([make_params(name, lr, total, **kw) for name, lr, total, kw in runs])

  def total_lr(lrs, count):
    return jnp.sum(
      jax.vmap(learning_rate, in_axes=(0, None))(batch._replace(learning_rate=lrs), count)
    )

  grad = jax.jit(jax.grad(total_lr))
  for count in (0, 1, 2, 5):
    assert np.isfinite(np.asarray(grad(jnp.asarray(batch.learning_rate), count))).all()


def test_new_values_do_not_retrace():
  traces = 0

  def counted(params, count):
    nonlocal traces
    traces += 1
    return learning_rate(params, count)

  f = jax.jit(jax.vmap(counted, in_axes=(0, None)))
  names = list(SCHEDULES)
  first = _stack([make_params(name, 0.1, 10) for name in names])
  second = _stack(
    [
      make_params(name, 0.5, 1000, decay_rate=0.3, warmup=0.2, pct_start=0.4)
      for name in reversed(names)
    ]
  )
  a = f(first, jnp.int32(3))
  b = f(second, jnp.int32(700))
  assert traces == 1
  assert f._cache_size() == 1
  assert not np.allclose(a, b)


def test_onecycle_pct_start_stays_close_to_request():
  # The float32 pct_start is nudged only far enough to reproduce optax's
  # boundary, never by a visible amount.
  for pct, total in ((0.29, 100), (0.7, 10), (0.3, 1000), (0.57, 100)):
    stored = make_params('onecycle', 0.1, total, pct_start=pct).pct_start
    assert stored.dtype == np.float32
    assert abs(float(stored) - pct) < 1e-6
    assert np.floor(stored * np.float32(total)) == int(pct * total)


@pytest.mark.parametrize(
  'name,total,kwargs,fragment',
  [
    ('sgdr', 10, {}, 'unknown schedule'),
    ('cosine', 0, {}, 'total_steps >= 1'),
    ('warmup_cosine', 10, dict(warmup=1.0), 'warmup'),
    ('warmup_cosine', 2, dict(warmup=0.8), 'warmup'),
    ('onecycle', 10, dict(pct_start=1.0), 'pct_start'),
  ],
)
def test_make_params_rejects(name, total, kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    make_params(name, 0.1, total, **kwargs)


def test_make_params_conversions():
  p = make_params('step', 0.1, 10, decay_every=0.25)
  assert (p.kind, p.transition_steps, p.warmup_steps) == (SCHEDULES.index('step'), 2.0, 1.0)
  assert make_params('step', 0.1, 1, decay_every=0.25).transition_steps == 1.0
  assert make_params('exponential', 0.1, 37, decay_every=0.25).transition_steps == 37.0
  assert all(np.asarray(x).shape == () for x in p)
  assert p.kind.dtype == np.int32
  assert all(np.asarray(x).dtype == np.float32 for x in p[1:])
