"""Ragged segments, the schedule parameters and the per-segment batch loss, against plain optax.

`test_equivalence`'s sweeps all have segments that divide each run's budget and the
default warmup, decay rate and decay period. Here the budget of every batch size
overruns its segments (the last segment is shorter), and warmup_cosine, exponential and
step take other parameters than their defaults, set through `sweep.run`; each run is
compared with a plain optax loop (the optax schedule built with those parameters, the
documented data order), on its final parameters, its update count and its
`final_batch_loss` (the mean batch loss of the last segment). A second sweep with
other parameter values must compile nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_equivalence import (
  MAX_BATCH,
  MAX_UPDATES,
  MODEL,
  N_TRAIN,
  REGRESSION,
  CompileCounter,
  data_order,
  excess,
  hyperparameters,
  initial_params,
  make_optimizer,
  mlp_apply,
  reference_step,
)

import sweep

# 200 examples: batch 16 makes 12 updates an epoch, batch 28 makes 7. Over 2 epochs and
# 5 segments they run 5 and 3 updates a segment: 25 > 24 and 15 > 14 ticks, so the last
# segment of each is short (4 and 2 updates).
BATCH_SIZES = [16, 28]
EPOCHS, SEGMENTS = 2, 5


def total(batch: int) -> int:
  return EPOCHS * (N_TRAIN // batch)


def per_segment(batch: int) -> int:
  return math.ceil(total(batch) / SEGMENTS)


def test_the_budgets_are_ragged():
  for b in BATCH_SIZES:
    assert per_segment(b) * SEGMENTS > total(b) > per_segment(b) * (SEGMENTS - 1), b


def make_schedule(
  name: str, lr: float, steps: int, warmup: float, decay_rate: float, decay_every: float
):
  """The optax schedule of a run, as `SweepConfig` documents its parameters."""
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=round(warmup * steps), decay_steps=steps, end_value=0.0
    )
  if name == 'exponential':
    return optax.exponential_decay(lr, transition_steps=steps, decay_rate=decay_rate)
  assert name == 'step'
  every = max(1, round(decay_every * steps))
  return optax.exponential_decay(lr, transition_steps=every, decay_rate=decay_rate, staircase=True)


def reference(row, decay_every: float):
  """One run trained plainly: final params, updates, and each update's batch loss."""
  batch, steps = int(row.batch_size), total(int(row.batch_size))
  schedule = make_schedule(
    row.schedule,
    float(row.learning_rate),
    steps,
    float(row.warmup),
    float(row.decay_rate),
    decay_every,
  )
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(MAX_UPDATES)), np.float32)
  hp = {k: np.float32(v) for k, v in {'b1': 0.9, 'b2': 0.999, **hyperparameters(row)}.items()}
  params = initial_params(MODEL[0], int(row.seed))
  opt_state = make_optimizer('adam', lambda count: lrs[count], hp).init(params)
  x, y = REGRESSION.x_train, REGRESSION.y_train
  real = np.arange(MAX_BATCH) < batch
  losses = []
  for t in range(steps):
    epoch, j = divmod(t, N_TRAIN // batch)
    idx = data_order(int(row.seed), epoch, N_TRAIN, False)[j * batch : (j + 1) * batch]
    padded = np.concatenate([idx, np.zeros(MAX_BATCH - batch, idx.dtype)])
    params, opt_state, value = reference_step(
      params,
      opt_state,
      x[padded],
      y[padded],
      real,
      lrs,
      hp,
      family='adam',
      loss='mse',
      apply_fn=mlp_apply,
    )
    losses.append(float(value))
  return jax.tree.map(np.asarray, params), steps, losses


def sweep_config(warmup, decay_rate, decay_every, learning_rate):
  return sweep.SweepConfig(
    model=MODEL,
    data=REGRESSION,
    loss='mse',
    optimizer='adam',
    schedule=['warmup_cosine', 'exponential', 'step'],
    warmup=warmup,
    decay_rate=decay_rate,
    decay_every=decay_every,
    learning_rate=learning_rate,
    batch_size=BATCH_SIZES,
    seed=0,
    epochs=EPOCHS,
    num_evals=SEGMENTS,
    shuffle=False,
  )


SWEEPS = [
  # warmup, decay_rate, decay_every, learning rates: none of them the defaults
  ([0.25, 0.5], [0.5, 0.8], 0.25, [0.01, 0.03]),
  ([0.35, 0.6], [0.2, 0.3], 0.5, [0.02, 0.04]),
]


@pytest.mark.parametrize('k', range(len(SWEEPS)))
def test_ragged_sweep_with_schedule_parameters_matches_optax(k):
  warmup, decay_rate, decay_every, learning_rate = SWEEPS[k]
  with CompileCounter() as compiles:
    result = sweep.run(sweep_config(warmup, decay_rate, decay_every, learning_rate), progress=False)
  if k:
    # Warmup, decay rate and decay period are data: other values compile nothing.
    assert compiles.count == 0, compiles.names
  table = result.table
  assert len(table) == 3 * len(warmup) * len(decay_rate) * len(learning_rate) * len(BATCH_SIZES)
  assert set(table.warmup) == set(warmup) and set(table.decay_rate) == set(decay_rate)
  failures = []
  for i, row in table.iterrows():
    params, steps, losses = reference(row, decay_every)
    where = (
      f'run {i} ({row.schedule}, warmup {row.warmup}, decay_rate {row.decay_rate}, '
      f'batch {row.batch_size})'
    )
    assert row.status == 'ok' and row.updates == steps, where
    if excess(result.params(i), params) > 0:
      failures.append(f'{where}: params off by {excess(result.params(i), params):.3g}')
    last = losses[(SEGMENTS - 1) * per_segment(int(row.batch_size)) :]
    assert 0 < len(last) < per_segment(int(row.batch_size)), where
    assert row.final_batch_loss == pytest.approx(np.mean(last), rel=1e-4, abs=1e-6), where
  assert not failures, '\n'.join(failures)
