"""The training loop: check and plan a sweep, claim its workdir, train its units, gather.

    run(cfg, workdir)
      check and plan      config.validate -> preflight.check -> units.plan_units
      claim the workdir   Workdir.claim: refuse another sweep, read back where it stood
      train each unit     train_unit: start (or resume), then segment after segment,
                          checkpointing when due, the final state kept (`_Keeper`)
      gather and write    distributed.gather -> results.Result -> results.csv, runs/

Python runs between segments only (progress, metrics, checkpoints); every update of
every run happens inside the compiled `kernels.train` programs of the unit's structure
(`kernels.train.make_program`). The layout of the runs into units is `sweep.units`;
the devices and placement `sweep.devices`; the files `sweep.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm

from kernels import optimizers, train
from sweep import (
  adapters,
  ahead,
  checkpoints,
  compile_log,
  devices,
  distributed,
  preflight,
  timing,
  units,
)
from sweep.config import SweepConfig, validate
from sweep.data import aligned, rows
from sweep.errors import ConfigError, config_error
from sweep.expansion import Plan, probe_size, val_probe_size
from sweep.units import Unit, UnitResult
from sweep.workdir import Workdir

# Re-exported: `sweep.set_cpu_devices` and `sweep.enable_compilation_cache` are public.
enable_compilation_cache = devices.enable_compilation_cache
set_cpu_devices = devices.set_cpu_devices
model_of = adapters.model_of


def _device_data(plan: Plan, chunk: int, shardings) -> tuple[train.Data, train.Data]:
  """The datasets on the device(s), on every device the run axis is split over: as the
  start and the intermediate evaluation points read them (the validation subset of
  `val_probe_size`), and as the last point reads them (the whole validation set)."""
  cfg = plan.config
  data = cfg.data

  def padded(x, y):
    pad = (-len(y)) % chunk
    if data.ignore_label is not None:
      # Labels to ignore: each example weighs its real labels (tokens), so that evaluation
      # losses and accuracies are per label, and an example with none does not count.
      real = (y != data.ignore_label).reshape(len(y), -1).sum(axis=1).astype(np.float32)
    else:
      real = np.ones(len(y), np.float32)
    w = np.concatenate([real, np.zeros(pad, np.float32)])
    if pad:  # each array of the inputs (one, or a tuple or dict of them)
      x = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], pad, axis=0)]), x)
    y = np.concatenate([y, np.repeat(y[:1], pad, axis=0)]) if pad else y
    return x, y, w

  n = data.n_train
  probe = np.sort(np.random.default_rng(0).permutation(n)[: probe_size(plan)])
  xp, yp, wp = padded(rows(data.x_train, probe), data.y_train[probe])
  val_chunks = 0
  if data.x_val is not None and data.n_val:
    m = data.n_val
    subset = val_probe_size(plan, chunk)
    if subset < m:  # the subset first (its chunks are the ones evaluated), then the rest
      order = np.random.default_rng(1).permutation(m)
      first = np.sort(order[:subset])
      order = np.concatenate([first, np.setdiff1d(np.arange(m), first)])
      xv, yv, wv = padded(rows(data.x_val, order), data.y_val[order])
    else:
      xv, yv, wv = padded(data.x_val, data.y_val)
    val_chunks = subset // chunk if subset < m else len(yv) // chunk
  else:
    xv, yv, wv = rows(data.x_train, slice(0, 0)), data.y_train[:0], np.zeros(0, np.float32)
  # Placed where the programs read it (a copy of the training set per device), rather
  # than on one device and copied again by the first call.
  # Aligned host arrays go in without a copy on CPU (see `sweep.data.aligned`); the
  # datasets of `sweep.data` are aligned when built.
  placement = None if shardings is None else shardings[1]
  arrays = train.Data(data.x_train, data.y_train, xv, yv, wv, xp, yp, wp, np.int32(val_chunks))
  placed = jax.device_put(jax.tree.map(aligned, arrays), placement)
  whole = np.int32(len(yv) // chunk if len(yv) else 0)
  return placed, placed._replace(val_chunks=jax.device_put(whole, placement))


def _per_seed_params(model: adapters.Model, unit: Unit) -> tuple[Any, ...]:
  """Each batch group's initial (parameters, model state), one per seed slot (S, ...).

  Initialised seed by seed with a plain jitted init_fn: XLA compiles a vmapped
  random-number generator several times slower, and seeds are few. A model that holds
  its initial values (`Model.initial`) gives them to every seed, compiling nothing.
  """
  cache = unit.shared.setdefault('params', {})  # every chunk of a family starts from the same seeds
  out = []
  for hp in unit.hparams:
    per_seed = []
    for seed in np.asarray(hp.seeds).tolist():
      if seed not in cache:
        if model.initial is not None:
          cache[seed] = jax.tree.map(lambda a: np.asarray(a)[None], model.initial)
        else:
          # With a leading seed axis: one seed (the common case) needs no stacking op,
          # which would compile a program of its own for every parameter shape. Keyed by
          # the model, which equals any model computing the same thing.
          cache[seed] = train.seeded_init_jit(model.init, np.int32(seed), True)
      per_seed.append(cache[seed])
    if len(per_seed) == 1:
      out.append(per_seed[0])
    else:  # on the host: a device concatenate compiles per parameter shape
      out.append(jax.tree.map(lambda *xs: np.concatenate([np.asarray(a) for a in xs]), *per_seed))
  return tuple(out)


def _start(model: adapters.Model, unit: Unit, hparams, data: train.Data):
  """`train.start` of a unit: its initial state and metrics.

  The chunks of a family share their seed slots, so their initial metrics (each seed's
  initial parameters evaluated) are equal: with three chunks or more, the first chunk
  evaluates and the others only initialise, a program of its own that two evaluations
  saved repay (docs/performance.md, change 15).
  """
  program = train.make_program(unit.structure)
  params = _per_seed_params(model, unit)
  seeds = tuple(tuple(np.asarray(hp.seeds).tolist()) for hp in unit.hparams)
  if _starts_evaluated(unit, seeds):
    return program.init(params, hparams), unit.shared['first'][1]
  state, first = program.start(params, hparams, data)
  unit.shared['first'] = (seeds, first)
  return state, first


def _starts_evaluated(unit: Unit, seeds: tuple) -> bool:
  """Whether an earlier chunk evaluated these seeds' initial parameters (see `_start`)."""
  return unit.shared.get('chunks', 0) >= 3 and unit.shared.get('first', (None,))[0] == seeds


def _per_seed_shapes(model: adapters.Model, unit: Unit, seeds, compiling: ahead.Ahead):
  """The shapes `_per_seed_params` gives, with the init compiled ahead where a seed is new
  (its lowering is every seed's: the seed is data); None where that lowering fails."""
  cache = unit.shared.get('params', {})
  one = None
  if model.initial is not None:
    one = ahead.shapes(jax.tree.map(lambda a: np.asarray(a)[None], model.initial))
  elif any(s not in cache for group in seeds for s in group):
    lowered = compiling.lower(lambda: train.seeded_init_jit.lower(model.init, np.int32(0), True))
    if lowered is None:
      return None
    one = lowered.out_info
  out = []
  for group in seeds:
    per_seed = [ahead.shapes(cache[s]) if s in cache else one for s in group]
    if len(per_seed) == 1:
      out.append(per_seed[0])
    else:  # concatenated on the host (`_per_seed_params`): numpy arrays, never weakly typed
      n = len(per_seed)
      out.append(
        jax.tree.map(lambda a, n=n: jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype), per_seed[0])
      )
  return tuple(out)


def _compile_ahead(model: adapters.Model, unit: Unit, sweep: _Sweep, hparams, orders) -> None:
  """Compiles the programs a fresh unit calls before and at its first segment (its start,
  `note_best`, the run timing's, the segment) while the next is traced (`sweep.ahead`):
  the calls that follow find them compiled. With the runs split over several devices the
  calls compile their own (their state's placement is XLA's choice)."""
  if sweep.shardings is not None or not ahead.ENABLED:
    return
  program = train.make_program(unit.structure)
  seeds = tuple(tuple(np.asarray(hp.seeds).tolist()) for hp in unit.hparams)
  compiling = ahead.Ahead()
  params = _per_seed_shapes(model, unit, seeds, compiling)
  if params is None:
    return
  if _starts_evaluated(unit, seeds):
    lowered = compiling.lower(lambda: program.lower_init(params, hparams))
    state = None if lowered is None else lowered.out_info
    first = unit.shared['first'][1]
  else:
    lowered = compiling.lower(lambda: program.lower_start(params, hparams, sweep.data))
    state, first = (None, None) if lowered is None else lowered.out_info
  if state is not None:
    state = ahead.shapes(state)
    if unit.structure.keep_best:
      lowered = compiling.lower(lambda: program.lower_note_best(state, ahead.shapes(first)))
      state = None if lowered is None else ahead.shapes(lowered.out_info)
  if state is not None:
    compiling.lower(
      lambda: program.lower_segment(state, hparams, orders, sweep.data, sweep.threshold)
    )
    try:
      timed = sweep.timer.lower(unit, state, hparams, orders, sweep.data, sweep.threshold)
    except Exception:  # measure raises it again, with its own context
      timed = []
    for lowered in timed:
      compiling.compile(lowered)
  compiling.wait()


class _OrderBook:
  """The data orders each batch group reads in each segment, made between segments.

  The permutations are drawn by a small jitted function, seed by seed and epoch by
  epoch, and handed to the segment as data: the segment program holds no random
  number generator, which keeps its compile short.
  """

  def __init__(self, plan: Plan, unit: Unit, cache: dict | None = None):
    self.n = plan.config.data.n_train
    self.shuffle = plan.config.shuffle
    self.plan = plan
    self.unit = unit
    # A cache given by the caller is shared (the cohorts of an adaptive search) and kept whole.
    self._shared = cache is not None
    self._cache: dict[tuple[int, int], jax.Array] = {} if cache is None else cache
    self.spans = []  # per batch group: per segment (first epoch, epochs spanned)
    for b, length in zip(unit.structure.batch_sizes, unit.structure.steps_per_segment, strict=True):
      total, spe = plan.total_updates[b], plan.steps_per_epoch[b]
      spans = []
      for k in range(plan.num_evals):
        lo, hi = min(k * length, total - 1), min((k + 1) * length, total) - 1
        spans.append((lo // spe, max(hi, lo) // spe - lo // spe + 1))
      self.spans.append(spans)
    self.width = [max(e for _, e in spans) for spans in self.spans]

  def _order(self, seed: int, epoch: int) -> np.ndarray:
    # Orders are stacked on the host: stacking on the device compiles a program per shape.
    if (seed, epoch) not in self._cache:
      if self.shuffle:
        self._cache[seed, epoch] = np.asarray(
          train.epoch_order_jit(np.int32(seed), np.int32(epoch), self.n)
        )
      else:
        self._cache[seed, epoch] = np.arange(self.n, dtype=np.int32)
    return self._cache[seed, epoch]

  def segment(self, k: int) -> tuple[train.Orders, ...]:
    out = []
    for g, hp in enumerate(self.unit.hparams):
      first, _ = self.spans[g][k]
      seeds = np.asarray(hp.seeds).tolist()
      orders = np.stack(
        [np.stack([self._order(sd, first + e) for e in range(self.width[g])]) for sd in seeds]
      )
      out.append(train.Orders(orders=orders, first_epoch=np.int32(first)))
    if not self._shared:
      # Orders of epochs already passed are no longer needed.
      low = min(self.spans[g][k][0] for g in range(len(self.spans)))
      self._cache = {key: v for key, v in self._cache.items() if key[1] >= low}
    return tuple(out)


class _Preempted(Exception):
  pass


class _SigtermFlag:
  """Turns SIGTERM (how cloud machines announce preemption) and a first SIGINT (Ctrl-C)
  into a flag read between segments, where the state is saved; a second SIGINT stops at
  once. Installed only in the main thread, and removed afterwards."""

  def __init__(self, active: bool):
    self.raised = False
    self.name = 'SIGTERM'
    self.active = (
      active  # without a workdir there is nowhere to save: the signals stay as they were
    )
    self._previous = {}

  def __enter__(self):
    if self.active and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.raised:
        raise KeyboardInterrupt
      print(
        'sweep: SIGINT received; saving at the end of this segment (Ctrl-C again stops at once)',
        file=sys.stderr,
        flush=True,
      )
    self.raised = True
    self.name = signal.Signals(signum).name

  @property
  def exit_code(self) -> int:
    return 130 if self.name == 'SIGINT' else 143

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class _Keeper:
  """Keeps each finished unit's final state: on the host while it fits the memory
  budget; beyond that on disk (with a workdir) or not at all (then `params(i)` says so)."""

  def __init__(self, budget: int, workdir: str | None, keep_opt_state: bool):
    self.budget = budget
    self.workdir = workdir
    self.keep_opt_state = keep_opt_state
    self.kept = 0

  def __call__(self, c: int, state: Any, meta: dict | None = None) -> checkpoints.Final:
    if not self.keep_opt_state and not optimizers.has_eval_params(state[0].runs.opt_state):
      # Without a workdir only the parameters are ever read again: the optimizer state
      # (two thirds of Adam's bytes) is not even copied (unless the parameters the run is
      # evaluated at are computed from it: a schedule-free optimizer's, or a config's
      # eval_params, which sets keep_opt_state).
      state = tuple(g._replace(runs=g.runs._replace(opt_state=None)) for g in state)
    host = checkpoints.host_copy(state)
    if self.workdir is not None:
      # On disk first: a resumed sweep finds every finished unit there.
      checkpoints.save_done(self.workdir, c, host, meta)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(host))
    if self.kept + nbytes <= self.budget:
      self.kept += nbytes
      return checkpoints.Final(state=host)
    if self.workdir is not None:
      return checkpoints.Final(
        path=checkpoints.done_path(self.workdir, c), abstract=jax.eval_shape(lambda: host)
      )
    return checkpoints.Final()


def _history_to_json(history: list) -> list:
  return [[{k: np.asarray(v).tolist() for k, v in m.items()} for m in point] for point in history]


def _history_from_json(history: list) -> list:
  return [tuple({k: np.asarray(v) for k, v in m.items()} for m in point) for point in history]


def _abstract_state(unit: Unit, model: adapters.Model) -> Any:
  per_seed = tuple(
    jax.tree.map(
      lambda a, n=hp.seeds.shape[0]: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype),
      model.initial_shapes(),
    )
    for hp in unit.hparams
  )
  return train.make_program(unit.structure).abstract_state(per_seed, unit.hparams)


def run(
  cfg: SweepConfig,
  workdir: str | None = None,
  *,
  progress: bool = True,
  fresh: bool = False,
  checkpoint_every: int = 1,
  checkpoint_seconds: float | None = None,
  experiment_file: str | None = None,
  keep_checkpoints: int = 2,
  loggers: Sequence[Any] | str = (),
  wait: bool | float = False,
  time_runs: bool | None = None,
) -> Any:
  """Trains every run of `cfg` and returns a `sweep.Result`.

  With a workdir, the whole sweep state is checkpointed at segment boundaries;
  running the same sweep on the same workdir again resumes from the latest intact
  checkpoint and ends with the same numbers as a run never interrupted. A SIGTERM, or
  a first SIGINT, saves and exits. The Pareto-best runs are saved under `workdir/runs/`.

  Args:
    cfg: the sweep.
    workdir: where results, checkpoints and saved runs go; None writes nothing.
    progress: show a progress bar.
    fresh: discard what the workdir holds (even another sweep) and start afresh.
    checkpoint_every: checkpoint every this many segments.
    checkpoint_seconds: also checkpoint when this many seconds passed since the last.
    experiment_file: the experiment file this config came from, copied to the workdir.
    keep_checkpoints: how many checkpoints to keep (the latest); a damaged one is
      skipped for the one before, so keep at least 2.
    loggers: trackers to send the finished sweep to: names ('tensorboard', 'mlflow',
      'wandb') or `sweep.loggers` objects. They run once training is done (process 0
      only); each one's line (where it wrote, or why it failed) is in `result.logged`.
    wait: when another live process is writing `workdir` (it holds the lock
      `sweep.lock` takes on claiming it): False refuses at once, True waits for it to
      finish, a number of seconds waits that long at most.
    time_runs: measure the wall time a run of each batch size would take alone
      (`sweep.timing`: a small compile per batch size, before its first unit trains),
      the results' `seconds`; False shares each unit's time out over its runs. None: on,
      unless the environment sets SWEEP_NO_RUN_TIMING=1 (the test suite does). Adaptive
      search and batch-size ramps are not timed.

  Raises:
    ConfigError: a mistake in `cfg`, or a workdir holding another sweep (the message
      names what differs).
    sweep.lock.WorkdirBusy: another live process is writing `workdir` (the message names
      its host, pid and start), and `wait` ran out or was False.
    sweep.files.DiskFull: the workdir's disk is full (partial files removed; a rerun
      resumes).
    SystemExit: on SIGTERM or SIGINT, after the state is saved (exit status 143 or 130).
  """
  from sweep import loggers as trackers

  chosen = trackers.resolve(loggers)  # a wrong name or a missing package, before training
  if not isinstance(wait, bool) and not (isinstance(wait, int | float) and 0 <= wait < math.inf):
    raise config_error('wait', wait, 'expected True, False or a number of seconds >= 0')
  wd = Workdir(
    workdir, every=checkpoint_every, seconds=checkpoint_seconds, keep=keep_checkpoints, wait=wait
  )
  with wd:  # the workdir's lock is let go on leaving
    with checkpoints.disk_full_guard(workdir):
      if time_runs is None:
        time_runs = os.environ.get('SWEEP_NO_RUN_TIMING') != '1'
      with compile_log.CompileLog() as log:  # where the first call's time goes
        result = _run(
          cfg, wd, progress, fresh, checkpoint_every, experiment_file, keep_checkpoints, time_runs
        )
      result.compiles = compile_log.to_json(log.programs)
    if chosen and jax.process_index() == 0:
      result.logged = trackers.send(result, chosen, workdir)
  return result


def _say_resumed(workdir: str, resume: checkpoints.Resume, units: int, segments: int) -> None:
  """One line (on stdout: news, not trouble) when a rerun picks up this sweep: what was
  finished, where it goes on."""
  done, point = len(resume.finished), resume.point
  if not done and point.unit is None:
    return
  if done == units:
    print(f'{workdir} holds this sweep finished: nothing to train, results read back.')
    return
  parts = [f'{done} of {units} units finished'] if done else []
  if point.unit is not None:
    parts.append(f'unit {point.unit} goes on after evaluation {point.segment} of {segments}')
  print(f'Resuming {workdir}: ' + '; '.join(parts) + '.', flush=True)


def _positive(field: str, value: Any, accepted: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise config_error(field, value, accepted)


def updates_in_segment(unit: Unit, plan: Plan, k: int) -> int:
  """Updates segment `k` of `unit` applies, summed over its runs (padding slots left out)."""
  total = 0
  for g, b in enumerate(unit.structure.batch_sizes):
    length, budget = unit.structure.steps_per_segment[g], plan.total_updates[b]
    steps = min((k + 1) * length, budget) - min(k * length, budget)
    total += steps * int(np.sum(unit.groups[g].slots >= 0))
  return total


class _Progress:
  """The progress bar, in updates of every run. Its ETA is the updates left at the rate
  of training alone (tqdm's average rate, smoothing 0): the time a program's first
  segment takes beyond its second (the compile), the units' starts and the run timing
  are taken off its clock."""

  def __init__(self, bar: Any):
    self.bar = bar
    self._first: dict[Any, float | None] = {}  # structure -> its first segment's seconds

  def leave_out(self, seconds: float) -> None:
    if not self.bar.disable:  # a disabled bar has no clock
      self.bar.start_t += seconds

  def segment(self, structure: Any, seconds: float, updates: int) -> None:
    if structure not in self._first:
      self._first[structure] = seconds
    elif self._first[structure] is not None:
      # The first segment's excess over the second: the compile, as well as it can be told.
      self.leave_out(max(0.0, self._first[structure] - seconds))
      self._first[structure] = None
    self.bar.update(updates)


@dataclasses.dataclass
class _Sweep:
  """What every unit of one sweep trains with."""

  plan: Plan
  model: adapters.Model
  data: train.Data  # on the devices, as the start and the intermediate points read them
  whole: train.Data  # as the last evaluation point reads them (the whole validation set)
  shardings: Any
  threshold: jax.Array
  keep: _Keeper
  bar: Any
  progress: _Progress
  timer: timing.Timer


def train_unit(c: int, unit: Unit, sweep: _Sweep, wd: Workdir, sigterm: _SigtermFlag) -> UnitResult:
  """Trains unit `c` to its end, from where `wd` says it stood (or from its start),
  checkpointing into `wd` when due; raises `_Preempted` after saving on SIGTERM."""
  plan = sweep.plan
  program = train.make_program(unit.structure)
  t0 = started = time.perf_counter()
  orders = _OrderBook(plan, unit)
  hparams = devices.shard(unit.hparams, sweep.shardings)
  point = wd.resume.point
  if point.unit == c and point.segment > 0:
    k0 = point.segment
    state = devices.shard(wd.resume.state, sweep.shardings)
    history = _history_from_json(point.history)
    t0 -= point.seconds
  else:
    k0 = 0
    _compile_ahead(sweep.model, unit, sweep, hparams, orders.segment(0))
    state, first = _start(sweep.model, unit, hparams, sweep.data)
    state = devices.shard(state, sweep.shardings)
    if unit.structure.keep_best:
      state = program.note_best(state, first)
    history = [jax.device_get(first)]
  # A run's seconds alone, per batch size (sweep.timing): off the unit's clock and the ETA's.
  spent = sweep.timer.spent
  sweep.timer.measure(unit, state, hparams, orders.segment(k0), sweep.data, sweep.threshold)
  t0 += sweep.timer.spent - spent
  sweep.progress.leave_out(time.perf_counter() - started)
  for k in range(k0, plan.num_evals):
    tick = time.perf_counter()
    data = sweep.whole if k == plan.num_evals - 1 else sweep.data
    state, metrics = program.segment(state, hparams, orders.segment(k), data, sweep.threshold)
    history.append(jax.device_get(metrics))
    wd.step += 1
    sweep.progress.segment(
      unit.structure, time.perf_counter() - tick, updates_in_segment(unit, plan, k)
    )
    sweep.bar.set_postfix(diverged=units.diverged(unit, history[-1]), refresh=False)
    finished = k == plan.num_evals - 1
    if finished:
      seconds = time.perf_counter() - t0
      done = checkpoints.FinishedUnit(wd.digest, c, wd.step, _history_to_json(history), seconds)
      final = sweep.keep(c, state, done.to_json())
    if wd.due(finished, sigterm.raised):
      if finished:  # finished units are in done/: the checkpoint only says none is in progress
        wd.save(checkpoints.ResumePoint(wd.digest, seconds=seconds), None)
      else:
        point = checkpoints.ResumePoint(
          wd.digest, c, k + 1, _history_to_json(history), time.perf_counter() - t0
        )
        wd.save(point, state)
    if sigterm.raised:
      raise _Preempted
  return UnitResult(c, unit, final, history, seconds)


def _gather(trained: list[UnitResult], all_units: list[Unit]) -> list[UnitResult]:
  """Every unit's result on every process, in unit order (with several processes each
  trained its own units; only their arrays and curves travel)."""
  if jax.process_count() > 1:
    payload = [(t.index, t.final.get(), t.history, t.seconds) for t in trained]
    trained = [
      UnitResult(c, all_units[c], checkpoints.Final(state=state), history, seconds)
      for c, state, history, seconds in distributed.gather(payload)
    ]
  return sorted(trained, key=lambda t: t.index)


def _run(
  cfg, wd, progress, fresh, checkpoint_every, experiment_file, keep_checkpoints, time_runs=True
):
  from sweep import fingerprint, provenance, results  # results formats what this module produces

  # ------------------------------------------------ check and plan, compiling nothing
  workdir = wd.path
  if workdir is not None:
    checkpoints.check_workdir(workdir)
  plan = validate(cfg)
  model = adapters.model_of(cfg, plan.output_dim)
  preflight.check(plan, model)
  _positive('checkpoint_every', checkpoint_every, 'expected a positive integer')
  _positive(
    'keep_checkpoints', keep_checkpoints, 'expected a positive integer (2 or more to fall back)'
  )
  eval_chunk = _eval_chunk(plan)
  # Slow-layer warnings come after the workdir check: a refused rerun says one thing.
  all_units = units.plan_units(plan, model, eval_chunk, warn=False)
  # Every field; with a workdir the data's content is hashed too (once), for the fingerprint.
  fields = fingerprint.config_fields(cfg, content=workdir is not None)
  resolved = provenance.resolved_config(plan, eval_chunk, experiment_file, fields)
  resolved['run_axis'] = units.run_axis_report(all_units)

  # ------------------------------------------------ claim the workdir, read back where it stood
  me = jax.process_index()
  mine = [c for c in range(len(all_units)) if distributed.owner(c) == me]
  if workdir is not None:
    fp = fingerprint.of_sweep(
      plan, all_units, lambda key: model.init(key)[0], resolved['environment'], fields
    )
    resolved['fingerprint'] = fp.digest
    wd.claim(fp, fresh, mine, lambda c: _abstract_state(all_units[c], model))
    if cfg.scheduler is None and not plan.ramps:
      _say_resumed(workdir, wd.resume, len(mine), plan.num_evals)
  finished = wd.resume.finished
  # The unit in progress first, then the others in order (a damaged finished unit among them).
  todo = [c for c in mine if c not in finished and c != wd.resume.point.unit]
  if wd.resume.point.unit is not None:
    todo.insert(0, wd.resume.point.unit)

  # ------------------------------------------------ train this process's units
  init_fn, apply_fn = model.pure_functions()
  for family, layout in dict.fromkeys(
    (all_units[c].family, all_units[c].structure.layout) for c in todo
  ):
    units.warn_slow_layers(init_fn, apply_fn, family, layout, rows(cfg.data.x_train, slice(0, 2)))
  shardings = devices.run_sharding()
  if cfg.scheduler is not None or plan.ramps:
    # Runs that change batch size move between batch groups: the sweep state of an
    # adaptive search, advanced segment by segment (with no rules, none is stopped).
    return _run_population(
      plan,
      model,
      all_units,
      wd,
      resolved,
      shardings,
      eval_chunk,
      progress,
      experiment_file,
      time_runs,
    )
  ticks = lambda unit: sum(updates_in_segment(unit, plan, k) for k in range(plan.num_evals))  # noqa: E731
  bar = tqdm.tqdm(
    total=sum(ticks(u) for u in all_units),
    desc=f'{len(plan.runs)} runs',
    unit=' updates',
    unit_scale=True,
    smoothing=0,  # the average rate since the start, compiles taken off (_Progress)
    disable=not progress,
    leave=False,
  )
  timer = timing.Timer(plan, enabled=time_runs)
  if not todo:  # nothing to train: the timings the sweep was trained with
    timer.load(_saved_run_seconds(workdir))
  data, whole = _device_data(plan, eval_chunk, shardings)
  sweep = _Sweep(
    plan=plan,
    model=model,
    data=data,
    whole=whole,
    shardings=shardings,
    threshold=jnp.float32(cfg.divergence_threshold),
    keep=_Keeper(
      units.keep_budget(cfg),
      workdir,
      keep_opt_state=workdir is not None or cfg.eval_params is not None,
    ),
    bar=bar,
    progress=_Progress(bar),
    timer=timer,
  )
  trained = []
  for c, done in sorted(finished.items()):
    final = checkpoints.Final(
      path=checkpoints.done_path(workdir, c), abstract=_abstract_state(all_units[c], model)
    )
    trained.append(
      UnitResult(c, all_units[c], final, _history_from_json(done.history), done.seconds)
    )
    bar.update(ticks(all_units[c]))
  if wd.resume.point.unit is not None:
    resumed = all_units[wd.resume.point.unit]
    bar.update(sum(updates_in_segment(resumed, plan, k) for k in range(wd.resume.point.segment)))
  start = (
    time.perf_counter() - wd.resume.point.seconds - sum(done.seconds for done in finished.values())
  )
  wd.start_clock()
  try:
    with _SigtermFlag(active=wd.active) as sigterm:
      for c in todo:
        trained.append(train_unit(c, all_units[c], sweep, wd, sigterm))
  except _Preempted:
    bar.close()
    wd.close()
    _exit_preempted(sigterm, wd.step, workdir)
  except BaseException:
    wd.abandon()  # a write in flight ends (or fails) before the error is handled
    raise
  finally:
    bar.close()
  wd.close()
  for c in sorted(finished):  # finished by an earlier process, and not timed yet
    if not timer.covers(all_units[c]):
      unit = all_units[c]
      hparams = devices.shard(unit.hparams, shardings)
      state = devices.shard(_start(model, unit, hparams, sweep.data)[0], shardings)
      orders = _OrderBook(plan, unit).segment(0)
      timer.measure(unit, state, hparams, orders, sweep.data, sweep.threshold)

  # ------------------------------------------------ gather; process 0 writes the results
  trained = _gather(trained, all_units)
  if timer.timings:
    resolved['run_seconds'] = timer.to_json()
  result = results.Result.from_training(
    plan, trained, time.perf_counter() - start, resolved, model, timer
  )
  if workdir is not None and me == 0:
    _write_results(result, workdir, experiment_file)
  return result


def _run_population(
  plan, model, all_units, wd, resolved, shardings, eval_chunk, progress, experiment_file, time_runs
):
  """Adaptive search (`cfg.scheduler`): the population advanced segment by segment, the
  scheduler deciding between segments (`sweep.population`)."""
  from sweep import population, results

  cfg = plan.config
  workdir = wd.path
  pop = population.Population(
    plan,
    model,
    all_units,
    *_device_data(plan, eval_chunk, shardings),
    shardings,
    jnp.float32(cfg.divergence_threshold),
    timer=timing.Timer(plan, enabled=time_runs),
  )
  start = time.perf_counter()
  store = None
  if wd.active:
    # Beside the plain sweep's checkpoints (state/<step>/), which its resume reads.
    directory = os.path.join(workdir, 'state', 'population')
    if jax.process_count() > 1:
      # Each process checkpoints the cohorts it trains; the trials' record is in each.
      directory = os.path.join(directory, f'process-{jax.process_index()}-of-{jax.process_count()}')
    store = checkpoints.StateStore(directory, wd.keep)
    start -= _resume_population(store, pop, wd)
  bar = tqdm.tqdm(
    desc=f'{len(plan.runs)} configurations', unit='segment', disable=not progress, leave=False
  )
  wd.start_clock()
  timeline = []  # (seconds since the start, best value so far) after each round
  try:
    with _SigtermFlag(active=wd.active) as sigterm:
      while pop.active():
        pop.refill()
        pop.advance()
        pop.decide()
        timeline.append((round(time.perf_counter() - start, 4), pop.best_so_far()))
        wd.step += 1
        bar.update(1)
        bar.set_postfix(running=pop.running(), queued=len(pop.queue), refresh=False)
        if store is not None and _agree(wd.due(not pop.active(), sigterm.raised)):
          state, meta = pop.checkpoint()
          meta.update(fingerprint=wd.digest, seconds=time.perf_counter() - start)
          store.save(wd.step, state, meta)
          wd.start_clock()
        if _agree(sigterm.raised):
          raise _Preempted
  except _Preempted:
    bar.close()
    store.close()
    _exit_preempted(sigterm, wd.step, workdir)
  except BaseException:
    if store is not None:
      store.abandon()
    raise
  finally:
    bar.close()
  if store is not None:
    store.close()
  wd.close()
  pop.gather_finals()
  ended = {}
  for t in pop.trials:
    ended[t.status] = ended.get(t.status, 0) + 1
  alone = pop.seconds_alone()  # None where a batch size went untimed: the shared seconds
  if pop.timer.timings:
    resolved['run_seconds'] = pop.timer.to_json()
  table, curves = results.tables(
    plan,
    [t.points for t in pop.trials],
    [t.seconds if a is None else a for t, a in zip(pop.trials, alone, strict=True)],
    pop.extra_columns() if pop.rules else None,
  )
  if pop.rules:
    resolved['scheduler'] = {
      'rules': [repr(r) for r in pop.rules],
      'slots': pop.slots,
      'statuses': ended,
      'run_updates': int(sum(int(t.points[-1]['updates']) for t in pop.trials)),
      # This process's rounds (after a resume, those since it), for best-so-far against time.
      'timeline': {'metric': pop.rules[0].metric, 'seconds_best': timeline},
    }
  result = results.Result(
    table,
    curves,
    resolved,
    time.perf_counter() - start,
    model=model,
    run_state=pop.run_state,
    eval_fn=cfg.eval_params,
  )
  if workdir is not None and jax.process_index() == 0:
    _write_results(result, workdir, experiment_file)
  return result


def _exit_preempted(sigterm: _SigtermFlag, step: int, workdir: str) -> None:
  """After a SIGTERM or SIGINT, the state saved: one line, and the signal's exit status."""
  print(
    f'sweep: {sigterm.name} received; state saved at segment {step} in {workdir}. '
    'Run the same command again to resume.',
    file=sys.stderr,
  )
  raise SystemExit(sigterm.exit_code) from None


def _saved_run_seconds(workdir: str | None) -> dict | None:
  """config.json's `run_seconds` of a finished sweep in `workdir` (None if absent)."""
  path = os.path.join(workdir, 'config.json') if workdir else None
  try:
    with open(path) as f:
      return json.load(f).get('run_seconds')
  except (TypeError, OSError, ValueError, AttributeError):
    return None


def _write_results(result, workdir: str, experiment_file: str | None) -> None:
  """The result files, the Pareto runs and the experiment file, into `workdir`."""
  from sweep import results

  result.save(workdir)
  result.save_front(workdir)
  if experiment_file is not None:
    with open(experiment_file, 'rb') as f:
      results.write_if_changed(os.path.join(workdir, 'experiment.py'), f.read())


def _agree(flag: bool) -> bool:
  """True on every process when it is on any (a checkpoint, a preemption: all act alike)."""
  if jax.process_count() == 1:
    return flag
  return any(distributed.allgather_objects(bool(flag)))


def _load_population(store, pop, wd, step: int) -> float | None:
  """Restores `pop` from checkpoint `step`; its training seconds, or None if unusable."""
  try:
    state, meta = store.load(step, pop.abstract)
    if meta.get('fingerprint') != wd.digest:
      raise checkpoints.Damaged('it is of another sweep')
    pop.restore(state, meta)
  except (checkpoints.Damaged, KeyError, TypeError, ValueError) as e:
    checkpoints.say(f'checkpoint {store.path(step)} is damaged ({e}): skipped')
    store.remove(step)
    return None
  return float(meta.get('seconds', 0.0))


def _resume_population(store, pop, wd) -> float:
  """Restores `pop` from the latest intact checkpoint of this sweep in `store` (with several
  processes, the latest every process holds intact); returns the training seconds it had
  taken (0 with none: the sweep starts afresh)."""
  seconds, step = None, None
  for candidate in reversed(store.steps()):
    seconds = _load_population(store, pop, wd, candidate)
    if seconds is not None:
      step = candidate
      break
  if jax.process_count() > 1:
    steps = distributed.allgather_objects(step)
    target = None if None in steps else min(steps)
    if target is not None and target != step:
      seconds = _load_population(store, pop, wd, target) if target in store.steps() else None
      step = target if seconds is not None else None
    if None in distributed.allgather_objects(step):
      checkpoints.say('the processes hold no common intact checkpoint: the search starts afresh')
      step, seconds = None, None
      pop.reset()
  if step is None:
    return 0.0
  wd.step = step
  if jax.process_index() == 0:
    ended = sum(t.status in ('ok', 'stopped', 'diverged') for t in pop.trials)
    what = (
      'finished: nothing to train, results read back'
      if not pop.active()
      else f'the search goes on after segment {step} ({ended} of {len(pop.trials)} '
      'configurations ended)'
    )
    print(f'Resuming {wd.path}: {what}.', flush=True)
  return seconds


def _eval_chunk(plan: Plan) -> int:
  """Examples per evaluation step: the config's, no more than the largest evaluated set; a
  probe sized to the training (a power of two) is not padded to a larger chunk."""
  cfg = plan.config
  probe = probe_size(plan)
  sizes = [probe] + ([cfg.data.n_val] if cfg.data.n_val else [])
  chunk = min(cfg.eval_batch_size, max(sizes))
  if cfg.train_eval_size is None and probe < chunk and probe < cfg.data.n_train:
    return probe
  return chunk


def check(cfg: SweepConfig) -> Plan:
  """Validates `cfg` completely (shapes included) without compiling a training program (a
  factory is probed with one small program of three optimizer updates); returns the plan."""
  plan = validate(cfg)
  preflight.check(plan, adapters.model_of(cfg, plan.output_dim))
  return plan


__all__ = [
  'run',
  'check',
  'train_unit',
  'set_cpu_devices',
  'enable_compilation_cache',
  'ConfigError',
]
