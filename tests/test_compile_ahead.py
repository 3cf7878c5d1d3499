"""A unit's programs compiled ahead (`sweep.ahead`): on the compile thread, each once, and
the sweep's numbers those of the same sweep compiled call by call."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

import sweep
from sweep import ahead, timing
from tests.compiles import COMPILE_EVENT


def _config(**overrides):
  data = sweep.data.digits()
  base = dict(
    model=sweep.models.MLP(hidden=(16,)),
    data=data,
    loss='softmax_cross_entropy',
    optimizer='adam',
    learning_rate=[1e-3, 3e-3, 1e-2],
    batch_size=[16, 64],
    epochs=1,
    num_evals=2,
    keep_best=True,
    shuffle=True,
  )
  base.update(overrides)
  return sweep.SweepConfig(**base)


def _sweep(cfg, enabled: bool):
  """(result, [(program, thread name)] of every compile), every cache cleared first."""
  jax.clear_caches()
  timing._MEASURED.clear()
  compiled = []

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
      compiled.append((str(kwargs.get('fun_name', '?')), threading.current_thread().name))

  jax.monitoring.register_event_duration_secs_listener(listener)
  old, ahead.ENABLED = ahead.ENABLED, enabled
  try:
    result = sweep.run(cfg, progress=False, time_runs=True)
  finally:
    ahead.ENABLED = old
    jax.monitoring.unregister_event_duration_listener(listener)
  return result, compiled


def _programs(compiled) -> list[str]:
  return sorted(name for name, _ in compiled)


@pytest.mark.parametrize(
  'memory_budget, seed',
  [(None, 0), (40_000, 0), (None, [0, 1])],
  ids=['one chunk', 'chunks', 'seeds'],
)
def test_programs_compile_once_on_the_compile_thread_with_the_same_numbers(memory_budget, seed):
  cfg = _config(memory_budget=memory_budget, seed=seed)
  before, called = _sweep(cfg, enabled=False)
  after, ahead_of_time = _sweep(cfg, enabled=True)
  if memory_budget is not None:
    assert after.config['run_axis']['adam']['chunks'] > 1
  # The same programs, each compiled once: none compiled again at its call.
  assert _programs(ahead_of_time) == _programs(called)
  names = _programs(ahead_of_time)
  assert names.count('jit(_timed)') == 2  # one per batch size: their updates differ
  # ... and those compiled on the compile thread, not at their calls.
  for program in (
    'jit(seeded_init)',
    'jit(start)',
    'jit(segment)',
    'jit(note_best)',
    'jit(_timed)',
  ):
    threads = [t for name, t in ahead_of_time if name == program]
    assert threads and all(t.startswith('sweep-compile') for t in threads), (program, threads)
  assert all(not t.startswith('sweep-compile') for _, t in called)
  # The numbers do not depend on where the programs were compiled.
  for column in ('final_val_loss', 'final_train_loss', 'best_val_loss', 'updates'):
    np.testing.assert_array_equal(after.table[column], before.table[column])
  # A second sweep with other values compiles nothing, ahead or not.
  compiled = []

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
      compiled.append(kwargs.get('fun_name'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sweep.run(cfg.replace(learning_rate=[2e-3, 5e-3, 2e-2]), progress=False, time_runs=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled == []


def test_timings_from_the_one_program_are_each_parts_own():
  """The run timing's one program times its updates and its evaluation apart: the
  evaluation of a larger validation set costs more, the updates do not."""
  small = _config(batch_size=32, keep_best=False, train_eval_size=256)
  data = small.data
  big = sweep.data.arrays(
    data.x_train,
    data.y_train,
    np.concatenate([data.x_val] * 160),
    np.concatenate([data.y_val] * 160),
  )
  a, _ = _sweep(small.replace(val_eval_size=data.n_val), enabled=True)
  b, _ = _sweep(small.replace(data=big, val_eval_size=big.n_val), enabled=True)
  ta = a.config['run_seconds']['timings'][0]
  tb = b.config['run_seconds']['timings'][0]
  # 616 examples evaluated against 57,856: the evaluation's part grows, the updates' not.
  assert tb['eval_seconds'] > 3 * ta['eval_seconds']
  assert 0.5 < tb['update_seconds'] / ta['update_seconds'] < 2
