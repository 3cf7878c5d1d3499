"""Where a sweep's first call goes (`sweep.compile_log`): `Result.compiles` lists the
programs JAX compiled during the call, each once, as JAX's own compile events count them,
and `Result.summary()` says so; a second sweep with other values lists none."""

from __future__ import annotations

import re

import pytest
from compiles import counting_compiles

import sweep
from sweep import compile_log


def _config(**overrides):
  base = dict(
    model=sweep.models.MLP(hidden=(16,)),
    data=sweep.data.digits(),
    loss='softmax_cross_entropy',
    optimizer='adam',
    learning_rate=[1e-3, 1e-2],
    batch_size=[16, 64],
    epochs=1,
    num_evals=2,
  )
  base.update(overrides)
  return sweep.SweepConfig(**base)


@pytest.mark.parametrize('time_runs', [False, True], ids=['untimed', 'timed'])
def test_the_first_call_lists_what_jax_compiled_and_the_second_nothing(time_runs):
  cfg = _config()
  with counting_compiles() as names:
    result = sweep.run(cfg, progress=False, time_runs=time_runs)
  log = result.compiles
  # Every compile JAX reported during the call, in its order, and none read from a cache.
  assert [p['name'] for p in log['programs']] == names
  assert log['compiled'] == len(names) and log['from_cache'] == 0
  assert {'jit(start)', 'jit(segment)'} <= set(names)
  assert ('jit(_timed)' in names) == time_runs
  assert all(p['seconds'] > 0 and not p['cached'] for p in log['programs'])
  segment = next(p for p in log['programs'] if p['name'] == 'jit(segment)')
  assert segment['trace_seconds'] > 0
  assert log['compile_seconds'] == pytest.approx(sum(p['seconds'] for p in log['programs']))
  lines = result.summary().splitlines()
  assert all(len(x) <= 100 and not re.match(r's\b', x) for x in lines)  # a figure keeps its unit
  line = lines[1]
  assert line.startswith(f'Compiled {len(names)} programs in ') and 'segment' in line

  again = sweep.run(cfg.replace(learning_rate=[2e-3, 3e-2]), progress=False, time_runs=time_runs)
  assert again.compiles['programs'] == [] and again.compiles['compile_seconds'] == 0
  assert again.summary().splitlines()[1].startswith('Nothing compiled')


def test_the_summary_names_the_slowest_programs_and_counts_repeats():
  programs = [
    compile_log.Program('jit(segment)', 1.25, 0.5, False),
    compile_log.Program('jit(_timed)', 0.5, 0.25, False),
    compile_log.Program('jit(_timed)', 0.5, 0.0, False),
    compile_log.Program('jit(start)', 0.25, 0.125, True),
  ]
  line = compile_log.summary(compile_log.to_json(programs))
  assert line.startswith(
    'Compiled 3 programs in 2.2 s (segment 1.2 s, run timing x2 1.0 s); '
    '1 read from the compilation cache in 0.2 s; traced in 0.9 s.'
  )
  # The run timing's cost is said with what skips it, from 1 s and a third of the compiles up.
  assert line.endswith('time_runs=False or SWEEP_NO_RUN_TIMING=1 skips it.')
  programs[1] = compile_log.Program('jit(_timed)', 0.25, 0.25, False)
  assert 'time_runs' not in compile_log.summary(compile_log.to_json(programs))
  programs[0] = compile_log.Program('jit(segment)', 9.0, 0.5, False)
  programs[1] = compile_log.Program('jit(_timed)', 1.0, 0.25, False)
  assert 'time_runs' not in compile_log.summary(compile_log.to_json(programs))
  assert compile_log.summary(None) is None
