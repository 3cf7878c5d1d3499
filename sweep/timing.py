"""The wall time a run would take alone, per batch size: measured, not shared out.

A unit trains all its batch groups, and many runs of each, in one program, so its seconds
say nothing about one batch size (a run of batch 16 with 1,780 updates and one of batch
128 with 220 would be charged the same). Before a unit trains, each of its batch groups
not timed yet is compiled for one run (its first slot): a program of a segment's updates
(at most `STEPS`) and, in one batch group's program per compile group (the evaluation
does not depend on the batch size), an evaluation (validation set and training probe),
each part done where a traced flag says, so that one compile times both. Each part runs
up to `REPEATS` times from the same state and the fastest call counts (the evaluation
once per compile group). A run's `seconds` in results.csv is then

    update_seconds[its batch size] * its updates + eval_seconds * (num_evals + 1)

on the device kind that measured it (config.json's `run_seconds` records the figures).
The timing is per compile group (optimizer family) and batch size, once per sweep (and
once per process for the same programs and shapes: a later sweep reuses the figures); its
compiles and calls are left out of the unit's own seconds and of the progress bar's ETA.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

from kernels import train

# Updates per timed call: a segment's own length up to this many, so that the cost of a
# call (dispatch, the segment's learning rates) is spread as in training.
STEPS = 64
REPEATS = 3  # timed calls after the compile at most; the fastest counts
ENOUGH = 0.5  # seconds of timed calls after which no more are made


def _first_slot(tree: Any) -> Any:
  """The first slot (seed 0, run 0) of every (S, R, ...) leaf."""
  return jax.tree.map(lambda a: a[:1, :1], tree)


def _timed(structure, with_eval, state, ghp, order, data, threshold, updates, evaluates):
  """A segment of one run's updates where `updates`, then (`with_eval`, static) its
  evaluation where `evaluates`: both timings from one program (one trace, one compile),
  each call doing the part it times. The evaluation is one batch group's per compile
  group (it does not depend on the batch size); the others' programs are the updates
  alone. The run is the first slot of the batch group's `state`, sliced inside (eager
  slices would compile a program per leaf shape)."""
  state = train.GroupState(runs=_first_slot(state.runs), step=state.step)
  ghp = train.GroupHparams(_first_slot(ghp.runs), ghp.seeds[:1], ghp.total_updates)
  order = train.Orders(order.orders[:1], order.first_epoch)

  def segment(state):
    return train._group_segment(structure, 0, state, ghp, order, data, threshold)

  def evaluate(state):
    return train.evaluate(structure, (state,), data)[0]

  state = jax.lax.cond(updates, segment, lambda s: s, state)
  if not with_eval:
    return state, {}
  # The evaluation traced once: its jaxpr is the taken branch, its shapes the other's zeros.
  closed, shapes = jax.make_jaxpr(evaluate, return_shape=True)(state)
  run = jax.extend.core.jaxpr_as_fun(closed)
  metrics = jax.lax.cond(
    evaluates,
    lambda s: run(*jax.tree.leaves(s)),
    lambda s: [jnp.zeros(a.shape, a.dtype) for a in jax.tree.leaves(shapes)],
    state,
  )
  return state, jax.tree.unflatten(jax.tree.structure(shapes), metrics)


_timed_jit = train.jit(_timed, static_argnums=(0, 1))
# (one run's structure, the shapes it ran on) -> the fastest call's seconds: a later sweep
# in this process with the same programs measures (and compiles) nothing again.
_MEASURED: dict[tuple, float] = {}


def _shapes(*trees: Any) -> tuple:
  return tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(trees))


def _fastest(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # the compile, and a first run
  best, spent = float('inf'), 0.0
  for _ in range(REPEATS):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    took = time.perf_counter() - t
    best, spent = min(best, took), spent + took
    if spent > ENOUGH:
      break
  return best


@dataclasses.dataclass
class Timing:
  """One batch group's measured costs for a run alone."""

  group: int  # the compile group's index in plan.groups
  optimizer: str
  batch_size: int
  update_seconds: float
  eval_seconds: float
  steps: int  # updates per timed call

  def run_seconds(self, updates: int, evaluations: int) -> float:
    return self.update_seconds * updates + self.eval_seconds * evaluations


class Timer:
  """The timings of one sweep, measured unit by unit as they start (each batch group of
  each compile group once); `spent` is the wall time the measuring took."""

  def __init__(self, plan: Any, enabled: bool = True):
    self.plan = plan
    self.enabled = enabled
    self.timings: dict[tuple[int, int], Timing] = {}
    self.spent = 0.0

  def group_of(self, unit: Any) -> int | None:
    """The index of `unit`'s compile group in plan.groups (None for a unit of no runs)."""
    for bg in unit.groups:
      if bg.runs:
        return self.plan.groups.index(bg.runs[0].group)
    return None

  def _pending(self, unit: Any, state: tuple, hparams: tuple, orders: tuple, data):
    """(batch group, batch size, steps, the updates' key, the evaluation's key, whether
    this batch group's program times the evaluation, the timing program's arguments) for
    every batch group of `unit` not timed yet: the first of them times the evaluation
    where the compile group's is not timed yet. `state` may hold `jax.ShapeDtypeStruct`s
    (what `lower` compiles from)."""
    g = self.group_of(unit)
    if g is None:
      return
    structure = unit.structure
    eval_taken = False
    for i, b in enumerate(structure.batch_sizes):
      # Every batch group the program holds, those without runs in this draw too (a random
      # search's next draw may fill them): their padding slots cost what a run costs.
      if (g, b) in self.timings or unit.groups[i].slots.size == 0:
        continue
      steps = max(1, min(STEPS, structure.steps_per_segment[i]))
      one = dataclasses.replace(
        structure,
        batch_sizes=(b,),
        steps_per_segment=(steps,),
        steps_per_epoch=(structure.steps_per_epoch[i],),
        ragged=(False,),
        total_updates=(structure.total_updates[i],) if structure.total_updates else (),
      )
      o = orders[i]
      # The key from shapes alone: a program measured once is not called again.
      sliced = jax.ShapeDtypeStruct((1,) + o.orders.shape[1:], o.orders.dtype)
      shapes = _shapes(data, train.Orders(sliced, o.first_epoch))
      # Evaluation does not depend on the batch size: timed once per compile group.
      plain = dataclasses.replace(
        one, batch_sizes=(), steps_per_segment=(), steps_per_epoch=(), ragged=(), total_updates=()
      )
      plain_key = (plain, _shapes(data))
      with_eval = plain_key not in _MEASURED and not eval_taken
      eval_taken |= with_eval
      key = (one, shapes)  # the updates' time, whichever program measured it
      yield g, b, steps, key, plain_key, with_eval, (one, with_eval, state[i], hparams[i], o, data)

  def lower(self, unit: Any, state: tuple, hparams: tuple, orders: tuple, data, threshold):
    """The programs `measure` would compile for `unit`, lowered from the state's shapes
    (`jax.ShapeDtypeStruct`s), for `sweep.ahead` to compile in the background."""
    if not self.enabled:
      return []
    out = {}
    for *_, key, _, with_eval, args in self._pending(unit, state, hparams, orders, data):
      if (key not in _MEASURED or with_eval) and key not in out:
        out[key] = _timed_jit.lower(*args, threshold, True, True)
    return list(out.values())

  def measure(self, unit: Any, state: tuple, hparams: tuple, orders: tuple, data, threshold):
    """Times every batch group of `unit` not timed yet, from its state `state` (the
    segment `orders` belongs to)."""
    if not self.enabled:
      return
    start = time.perf_counter()
    pending = self._pending(unit, state, hparams, orders, data)
    for g, b, steps, key, plain_key, with_eval, args in pending:
      if key not in _MEASURED:
        _MEASURED[key] = _fastest(_timed_jit, *args, threshold, True, False)
      if with_eval:
        _MEASURED[plain_key] = _fastest(_timed_jit, *args, threshold, False, True)
      self.timings[(g, b)] = Timing(
        g,
        str(unit.structure.family),
        int(b),
        _MEASURED[key] / steps,
        _MEASURED[plain_key],
        steps,
      )
    self.spent += time.perf_counter() - start

  def to_json(self) -> dict[str, Any]:
    return {
      'device_kind': jax.devices()[0].device_kind,
      'timings': [dataclasses.asdict(t) for t in self.timings.values()],
    }

  def load(self, saved: dict[str, Any] | None) -> bool:
    """Takes the timings of an earlier process (config.json's `run_seconds`); whether they
    cover every batch group of every compile group."""
    if not self.enabled or not saved or saved.get('device_kind') != jax.devices()[0].device_kind:
      return False
    try:
      timings = [Timing(**t) for t in saved['timings']]
    except (KeyError, TypeError):
      return False
    self.timings = {(t.group, t.batch_size): t for t in timings}
    return self.covers()

  def covers(self, unit: Any = None) -> bool:
    """Whether every batch group (of `unit`, or of the whole sweep) is timed (or timing
    is off)."""
    if not self.enabled:
      return True
    if unit is not None:
      g = self.group_of(unit)
      if g is None:
        return True
      sizes = [
        b for b, bg in zip(unit.structure.batch_sizes, unit.groups, strict=True) if bg.slots.size
      ]
      return all((g, b) in self.timings for b in sizes)
    wanted = {(self.plan.groups.index(r.group), r.values['batch_size']) for r in self.plan.runs}
    return wanted <= set(self.timings)

  def seconds(self, group: int, batch_size: int, updates: int) -> float | None:
    """A run's seconds alone, or None when its batch group was not timed."""
    t = self.timings.get((group, batch_size))
    if t is None:
      return None
    return t.run_seconds(updates, self.plan.num_evals + 1)
