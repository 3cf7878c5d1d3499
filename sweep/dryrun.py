"""`sweep run --dry-run`: what a sweep would run, in memory and time, before running it.

Everything here is read from the plan the engine would train (`sweep.units.plan_units`,
which traces the model but compiles nothing) and from a cost model of the wall time;
nothing is trained and nothing is written.

The cost model (its constants fitted on a 2-core CPU; its error in docs/performance.md):
  compile  = COMPILE_S + COMPILE_PER_BATCH_S x batch sizes, per compile group
             + TIMING_S x (batch sizes + 1) for timing each batch size alone (sweep.timing;
             not with SWEEP_NO_RUN_TIMING=1, nor for adaptive search or batch-size ramps)
  training = every step of every batch group of every unit: STEP_S + its FLOPs / rate
  evaluation = every evaluation point, every run: forward FLOPs (a third of a step's per
               example) over the evaluated examples / rate
where `rate` is this machine's measured matrix-product speed times EFFICIENCY.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sweep.config import SweepConfig
from sweep.expansion import probe_size, val_probe_size

# Fitted to four experiments on a shared 2-core CPU (docs/performance.md, "The dry run's
# time estimate"): the compiles, each scan step's fixed cost, and the share of the matrix
# product's speed that a sweep's small products reach.
COMPILE_S = 3.0
COMPILE_PER_BATCH_S = 0.6
# One small program per batch size and one for the evaluation, compiled and run a few times
# (measured: 5.1 s for 3 batch sizes of an MLP on the digits set, load average 6, 2 cores).
TIMING_S = 1.0
STEP_S = 4e-4
EFFICIENCY = 0.1


@dataclasses.dataclass
class Estimate:
  """A dry run's figures (what `describe` prints)."""

  runs: int
  compile_groups: int
  units: int
  memory_bytes: int  # the widest unit's run axis on one device, data included
  budget_bytes: int
  compile_s: float
  train_s: float
  eval_s: float
  gflops: float  # the whole sweep's training and evaluation

  @property
  def seconds(self) -> float:
    return self.compile_s + self.train_s + self.eval_s


_RATE: dict = {}


def matmul_rate() -> float:
  """FLOP/s of one device's float32 matrix product (512 x 512, timed; memoised)."""
  if 'rate' not in _RATE:
    n = 512
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: jax.lax.fori_loop(0, 8, lambda i, x: x @ a * 1e-3, a))
    f(a).block_until_ready()
    best = math.inf
    for _ in range(3):
      start = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    _RATE['rate'] = 8 * 2 * n**3 / best
  return _RATE['rate']


def _plan(cfg: SweepConfig):
  from sweep import adapters, preflight, units
  from sweep.config import validate
  from sweep.engine import _eval_chunk

  plan = validate(cfg)
  model = adapters.model_of(cfg, plan.output_dim)
  preflight.check(plan, model)
  eval_chunk = _eval_chunk(plan)
  return plan, model, eval_chunk, units.plan_units(plan, model, eval_chunk, warn=False)


def estimate(cfg: SweepConfig) -> tuple[Estimate, Any, list]:
  """The estimate of `cfg`, its plan and its units (validating `cfg` first)."""
  from sweep import units as units_

  plan, model, eval_chunk, all_units = _plan(cfg)
  devices = jax.local_device_count()
  rate = matmul_rate() * devices * EFFICIENCY
  data = cfg.data
  # Examples evaluated over the sweep: the probe at every point, the validation subset at
  # the start and the intermediate points, the whole validation set at the last.
  val = val_probe_size(plan, eval_chunk)
  evaluated = (plan.num_evals + 1) * probe_size(plan) + plan.num_evals * val + (data.n_val or 0)
  compile_s = train_s = eval_s = flops_total = 0.0
  timed = os.environ.get('SWEEP_NO_RUN_TIMING') != '1' and cfg.scheduler is None and not plan.ramps
  memory = 0
  seen = set()
  for unit in all_units:
    key = str(unit.family)
    if key not in seen:
      seen.add(key)
      compile_s += COMPILE_S + COMPILE_PER_BATCH_S * len(unit.groups)
      if timed:
        compile_s += TIMING_S * (len(unit.groups) + 1)
    per_example = unit.flops_per_run / max(plan.total_updates)
    slots_total = 0
    for g in unit.groups:
      slots = g.slots.size
      slots_total += slots
      flops = per_example * g.batch_size * slots
      steps = plan.total_updates[g.batch_size]
      train_s += steps * (STEP_S + flops / rate)
      flops_total += steps * flops
    flops = evaluated * slots_total * per_example / 3
    eval_s += flops / rate
    flops_total += flops
    run_bytes = units_.run_bytes(plan, model, unit.family, eval_chunk)
    memory = max(memory, run_bytes * slots_total // devices)
  memory += sum(a.nbytes for a in jax.tree.leaves((data.x_train, data.y_train)))
  if data.x_val is not None:
    memory += sum(a.nbytes for a in jax.tree.leaves((data.x_val, data.y_val)))
  result = Estimate(
    runs=len(plan.runs),
    compile_groups=len(seen),
    units=len(all_units),
    memory_bytes=int(memory),
    budget_bytes=int(units_.memory_budget(cfg)),
    compile_s=compile_s,
    train_s=train_s,
    eval_s=eval_s,
    gflops=flops_total / 1e9,
  )
  return result, plan, all_units


def _size(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'


def describe(cfg: SweepConfig, top: int = 12) -> str:
  """What `sweep run --dry-run` prints: the runs, the compile groups and their units (run
  axis widths, batch groups), the memory and the time it would take; nothing runs."""
  est, plan, all_units = estimate(cfg)
  lines = [f'Dry run of {cfg.name!r}: {est.runs} runs; nothing is trained or written.']
  varying = [a for a, values in plan.axes.items() if len(values) > 1]
  for axis in varying:
    values = plan.axes[axis]
    shown = ', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values[:10])
    lines.append(f'  {axis}: {shown}{", ..." if len(values) > 10 else ""} ({len(values)})')
  lines.append('Runs:')
  columns = varying or ['batch_size']
  for run in plan.runs[:top]:
    values = ', '.join(f'{a}={_show(run.values.get(a))}' for a in columns)
    updates = run.total_updates
    lines.append(f'  {run.index:>4}  {values}  ({updates} updates)')
  if len(plan.runs) > top:
    lines.append(f'  ... {len(plan.runs) - top} more')
  lines.append(f'Compile groups: {est.compile_groups}; units of work: {est.units}')
  for family in dict.fromkeys(str(u.family) for u in all_units):
    mine = [u for u in all_units if str(u.family) == family]
    u = mine[0]
    groups = ', '.join(
      f'batch {g.batch_size}: {plan.total_updates[g.batch_size]} updates, '
      f'{g.slots.shape[0]}x{g.slots.shape[1]} slots'
      for g in u.groups
    )
    lines.append(
      f'  {family}: {len(mine)} unit(s), run axis {u.groups[0].slots.shape[1]} wide '
      f'(chosen by {u.width_reason}), {u.flops_per_run / 1e6:.3g} MFLOP per run-step; {groups}'
    )
  if plan.ramps:
    ramps = _distinct_ramps(plan)
    lines.append(
      f'Batch-size schedules: {", ".join(ramps)}; their runs move, state whole, to the batch '
      'group of each stage between segments (the estimates below count them at their first '
      'batch size throughout: the same examples in more, smaller updates)'
    )
  lines.append(
    f'Memory: about {_size(est.memory_bytes)} per device for the widest unit and the data '
    f'(an upper estimate; budget {_size(est.budget_bytes)})'
  )
  lines.append(
    f'Time: about {est.seconds:.0f} s ({est.compile_s:.0f} s compiling, '
    f'{est.train_s:.0f} s training, {est.eval_s:.0f} s evaluating; '
    f'{est.gflops:.3g} GFLOP on {jax.local_device_count()} {jax.default_backend()} device(s)); '
    'a cost model, within 2x of the runs measured on a 2-core CPU'
    + ('' if jax.default_backend() == 'cpu' else '; fitted on CPU only, so a rough guess here')
  )
  if cfg.scheduler is not None:
    lines.append(
      'Adaptive search: the figures are those of every run trained to its end, an upper '
      'bound; the scheduler stops runs early and trains them in its own slots.'
    )
  return '\n'.join(lines)


def _show(v: Any) -> str:
  if isinstance(v, float | np.floating):
    return f'{float(v):g}'
  return str(v)


def _distinct_ramps(plan) -> list[str]:
  out = {}
  for run in plan.runs:
    if run.stages:
      sizes = ' -> '.join(f'batch {b} from epoch {e}' for e, b in run.stages)
      out[run.values['batch_schedule']] = f'{run.values["batch_schedule"]} ({sizes})'
  return list(out.values())
