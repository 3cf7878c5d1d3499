"""The sweep state of an adaptive search, advanced segment by segment.

    state = Population(...)          # every configuration queued, none started
    while state.active():
      state.refill()                 # free slots take the next configurations (clock 0)
      state.advance()                # every cohort one segment on: one call of its program
      state.decide()                 # the scheduler's rules: stop, exploit, compact
      checkpoint when due            # the whole population, hyperparameters included

A *cohort* is a set of runs of one compile group and one batch size that started
together: one batch group laid out `(S, R)`, so one clock, trained by the same compiled
programs as a plain sweep's units (`kernels.train`). A *trial* is one configuration (a
row of the table). The rules of `sweep.schedulers` read every trial's metrics at each
evaluation point (`schedulers.Board`) and decide; their decisions are edits of the
cohorts between segments:

- stop: the trial's state at that point is kept (its curves end there) and its slot is
  freed. A cohort whose live runs fit a narrower layout is compacted into it (a gather
  on the run axis, widths powers of two: one compile per width);
- refill: free slots (with `SuccessiveHalving(slots=...)`) take the next configurations
  of the sweep, as a new cohort with its own clock;
- exploit (PBT): a gather on the run axis copies parameters, optimizer state and model
  state from one slot to another on the device, and new hyperparameters are written into
  the slot's data (`GroupHparams`, the injected optimizer hyperparameters).

A run that goes on is computed exactly as it would be alone: its slot's computation never
reads another slot, and a compaction moves its state whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import train
from sweep import devices, distributed, schedulers, timing, units
from sweep.errors import config_error
from sweep.expansion import Plan
from sweep.units import BatchGroup, Unit

# ------------------------------------------------------------------ records ----


@dataclasses.dataclass
class Trial:
  """One configuration: where it stands and what it reported.

  Attributes:
    status: 'queued', 'running', then 'ok' (trained to its end), 'stopped' (a rule stopped
      it) or 'diverged'.
    points: its metrics at each evaluation point it reached (host scalars).
    stopped_at: the evaluation point it stopped at (or diverged at), else None.
    lineage: PBT: (evaluation point, the trial whose state it copied) at each exploit.
    hypers: PBT: its current values of the explored hyperparameters.
    seconds: its share of the training time of the cohorts it was in.
  """

  status: str = 'queued'
  points: list = dataclasses.field(default_factory=list)
  stopped_at: int | None = None
  lineage: list = dataclasses.field(default_factory=list)
  hypers: dict = dataclasses.field(default_factory=dict)
  seconds: float = 0.0

  def to_json(self) -> dict:
    return {
      'status': self.status,
      'points': [{k: np.asarray(v).item() for k, v in p.items()} for p in self.points],
      'stopped_at': self.stopped_at,
      'lineage': [list(x) for x in self.lineage],
      'hypers': self.hypers,
      'seconds': self.seconds,
    }

  @classmethod
  def from_json(cls, d: dict) -> Trial:
    return cls(
      status=d['status'],
      points=[{k: _scalar(v) for k, v in p.items()} for p in d['points']],
      stopped_at=d['stopped_at'],
      lineage=[tuple(x) for x in d['lineage']],
      hypers=dict(d['hypers']),
      seconds=float(d['seconds']),
    )


def _scalar(v: Any) -> np.generic:
  """A metric read back from JSON as the program returned it (bool, int32 or float32)."""
  if isinstance(v, bool):
    return np.bool_(v)
  if isinstance(v, int):
    return np.int32(v)
  return np.float32(v)


@dataclasses.dataclass
class Cohort:
  """Runs of one compile group and batch size that started together (one clock).

  Attributes:
    kind: index of its (compile group, batch size) in `Population.kinds`.
    slots: (S, R) trial at each slot, -1 for a free or padding slot.
    seeds: (S,) the seed of each row.
    point: evaluation points reached (0 once started).
    state: its `(GroupState,)` on the device(s).
    hparams: its `(GroupHparams,)` on the host (edited by PBT).
  """

  kind: int
  slots: np.ndarray
  seeds: np.ndarray
  point: int = 0
  owner: int = 0  # the process that trains it
  state: Any = None
  hparams: Any = None
  book: Any = None  # its data orders (`engine._OrderBook`), made when first needed
  placed: Any = None  # `hparams` on the device(s), placed when first needed

  def live(self) -> list[tuple[int, int, int]]:
    return [
      (int(s), int(r), int(self.slots[s, r]))
      for s, r in zip(*np.nonzero(self.slots >= 0), strict=True)
    ]


# ------------------------------------------------------------------ device edits ----


def _gather(tree: Any, rows: jax.Array, cols: jax.Array) -> Any:
  """The runs at (rows, cols) of every leaf with a run axis (S, R, ...)."""
  return jax.tree.map(lambda a: a[rows, cols] if a.ndim >= 2 else a, tree)


def _runs_on_host(cohort: Cohort, where: list[tuple[int, int, int]]) -> dict[int, Any]:
  """trial -> its RunState (host arrays) for each `(s, r, trial)` of `where`; None on a
  process that does not train `cohort`."""
  if cohort.state is None:
    return {t: None for _, _, t in where}
  host = jax.device_get(cohort.state)[0].runs
  return {t: jax.tree.map(lambda a, s=s, r=r: np.array(a[s, r]), host) for s, r, t in where}


@functools.partial(jax.jit, donate_argnums=(0,))
def _exploit(groups: Any, rows: jax.Array, cols: jax.Array, hypers: dict) -> Any:
  """Slot (s, r) takes the state of slot (rows[s, r], cols[s, r]) (itself where it is not
  a target), and the injected hyperparameters `hypers` (name -> (S, R) values)."""
  (g,) = groups
  runs = _gather(g.runs, rows, cols)
  if hypers:
    hp = dict(runs.opt_state.hyperparams)
    for name, v in hypers.items():
      hp[name] = v.astype(hp[name].dtype)
    runs = runs._replace(opt_state=runs.opt_state._replace(hyperparams=hp))
  return (g._replace(runs=runs),)


# ------------------------------------------------------------------ the population ----


class Population:
  """The sweep state of an adaptive search: every trial, every cohort, the rules.

  Args:
    plan: the sweep (its runs are the trials, in table order).
    model: the `sweep.adapters.Model`.
    all_units: the plain sweep's units (`units.plan_units`): their structures and widths.
    data: the datasets on the device(s).
    shardings: `devices.run_sharding()`.
    threshold: the divergence threshold, on the device.
  """

  def __init__(
    self, plan: Plan, model, all_units: list[Unit], data, whole, shardings, threshold, timer=None
  ):
    self.plan = plan
    self.model = model
    # The datasets as the start and the intermediate points read them, and as the last does
    # (the whole validation set; `engine._device_data`).
    self.data, self.whole = data, whole
    self.shardings = shardings
    self.threshold = threshold
    # The wall time a run of each batch size takes alone (`sweep.timing`), measured as each
    # kind first trains; off the cohorts' clocks.
    self.timer = timer if timer is not None else timing.Timer(plan, enabled=False)
    scheduler = plan.config.scheduler
    self.rules = () if scheduler is None else schedulers.rules(scheduler)
    self.stopping = [r for r in self.rules if isinstance(r, schedulers.STOPPING)]
    self.pbt = next((r for r in self.rules if isinstance(r, schedulers.PBT)), None)
    self.halving = next(
      (r for r in self.rules if isinstance(r, schedulers.SuccessiveHalving)), None
    )
    self.boards = {(r.metric, r.mode): schedulers.Board(len(plan.runs), r.mode) for r in self.rules}
    self.reset()
    self.slots = schedulers.slots(plan.config.scheduler) or len(plan.runs)
    self.shared: dict = {'chunks': 0}  # the seeds' initial parameters, for every cohort
    self._orders: dict = {}  # every cohort's data orders, by (seed, epoch)
    self._kinds(all_units)
    self._stage_kinds()
    self._check_hyperparameters()

  def reset(self) -> None:
    """Every configuration queued, none started."""
    self.queue = list(range(len(self.plan.runs)))  # trials not started, in table order
    self.cohorts: list[Cohort] = []
    self.finals: dict[int, Any] = {}  # trial -> its final RunState (host)
    self._made = 0  # cohorts made so far: the next one's owner is this modulo the processes
    self.trials = [Trial() for _ in self.plan.runs]
    if self.pbt is not None:
      for i, run in enumerate(self.plan.runs):
        self.trials[i].hypers = {
          h: float(run.values[h] if h == 'learning_rate' else run.hypers[h])
          for h in self.pbt.hyperparameters
        }
    for key in self.boards:
      self.boards[key] = schedulers.Board(len(self.plan.runs), key[1])

  # -------------------------------------------------------------- structures

  def _kinds(self, all_units: list[Unit]) -> None:
    """One structure per (compile group, batch size): the family's, for one batch group;
    and the widest run axis its family's units use."""
    self.kinds: list[tuple[Any, int]] = []  # (compile group, batch size)
    self.structures: list[train.Structure] = []
    self.families: list[Any] = []
    self.widths: list[int] = []
    for unit in all_units:
      st = unit.structure
      for j, g in enumerate(unit.groups):
        if not g.runs:
          continue
        key = (g.runs[0].group, g.batch_size)
        if key in self.kinds:
          continue
        self.kinds.append(key)
        self.families.append(unit.family)
        self.structures.append(
          dataclasses.replace(
            st,
            batch_sizes=(st.batch_sizes[j],),
            steps_per_segment=(st.steps_per_segment[j],),
            steps_per_epoch=(st.steps_per_epoch[j],),
            ragged=(st.ragged[j],),
            total_updates=(st.total_updates[j],) if st.total_updates else (),
          )
        )
        self.widths.append(int(unit.groups[0].slots.shape[1]))

  def _stage_kinds(self) -> None:
    """A kind for each batch size a batch-size schedule moves its runs to, and where each
    such run moves: `moves[trial][point]` is its next kind, from evaluation `point` on."""
    plan = self.plan
    self.moves: dict[int, dict[int, int]] = {}
    for run in plan.runs:
      if not run.stages:
        continue
      moves = {}
      for stage, (epoch, b) in enumerate(run.stages):
        key = self._key(run, b)
        if key not in self.kinds:
          base = self.kinds.index(next(k for k in self.kinds if k[0] == run.group))
          st = self.structures[base]
          self.kinds.append(key)
          self.families.append(self.families[base])
          self.structures.append(
            dataclasses.replace(
              st,
              batch_sizes=(b,),
              steps_per_segment=(math.ceil(plan.total_updates[b] / plan.num_evals),),
              steps_per_epoch=(plan.steps_per_epoch[b],),
              ragged=(
                math.ceil(plan.total_updates[b] / plan.num_evals) * plan.num_evals
                != plan.total_updates[b],
              ),
              # A schedule callable is built for the run's own number of updates.
              total_updates=(key[2] if len(key) > 2 else plan.total_updates[b],)
              if st.total_updates
              else (),
            )
          )
          self.widths.append(self.widths[base])
        if stage == 0:
          continue
        kind = self.kinds.index(key)
        # The stage's first step in its batch group's clock is an evaluation point
        # (`checks.check_stage_points`).
        point = epoch * plan.steps_per_epoch[b] // self.structures[kind].steps_per_segment[0]
        moves[point] = kind
      self.moves[run.index] = moves

  @staticmethod
  def _key(run, batch_size: int) -> tuple:
    """The kind of `run` at `batch_size`: its compile group and the batch size, and for a
    run with a batch-size schedule and a schedule callable, its own number of updates (the
    callable is built with it, inside the program)."""
    if run.stages and not isinstance(run.schedule, str):
      return (run.group, batch_size, run.total_updates)
    return (run.group, batch_size)

  def _kind(self, trial: int) -> int:
    """The kind a trial starts in."""
    run = self.plan.runs[trial]
    return self.kinds.index(self._key(run, run.values['batch_size']))

  def _check_hyperparameters(self) -> None:
    if self.pbt is None:
      return
    for h in self.pbt.hyperparameters:
      for run in self.plan.runs:
        if h != 'learning_rate' and h not in run.hypers:
          raise config_error(
            'PBT.hyperparameters',
            h,
            'a numeric hyperparameter every run injects into its optimizer: learning_rate'
            + (', ' + ', '.join(run.hypers) if run.hypers else '')
            + ' (set the field, e.g. momentum=0.9, to explore it)',
          )

  def _unit(self, cohort: Cohort) -> Unit:
    """The cohort as a `units.Unit` of one batch group (for its programs and data order)."""
    structure = self.structures[cohort.kind]
    runs = [self.plan.runs[t] for t in cohort.slots.ravel() if t >= 0]
    seeds = [int(s) for s in cohort.seeds]
    group = BatchGroup(structure.batch_sizes[0], seeds, cohort.slots, runs)
    if cohort.hparams is None:
      filler = runs[0]
      cohort.hparams = (units._hparams(self.plan, group, filler),)
    return Unit(self.families[cohort.kind], structure, [group], cohort.hparams, shared=self.shared)

  def _layout(self, kind: int, trials: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(slots, seeds) of cohorts holding `trials`: one row per seed, rows and widths
    rounded up to powers of two (and whole runs per device), at most the family's width."""
    by_seed: dict[int, list[int]] = {}
    for t in trials:
      by_seed.setdefault(int(self.plan.runs[t].values['seed']), []).append(t)
    n_dev = jax.local_device_count()
    cap = self.widths[kind] if self.pbt is None else max(len(v) for v in by_seed.values())
    out = []
    per_seed = list(by_seed.items())
    while any(ts for _, ts in per_seed):
      rows = [(s, ts[:cap]) for s, ts in per_seed if ts]
      widest = max(len(ts) for _, ts in rows)
      width = n_dev * math.ceil(units._bucket(widest) / n_dev)
      slots = np.full((units._bucket(len(rows)), width), -1, np.int64)
      for r, (_, ts) in enumerate(rows):
        slots[r, : len(ts)] = ts
      seeds = [s for s, _ in rows]
      seeds = np.array(seeds + [seeds[0]] * (slots.shape[0] - len(seeds)), np.int32)
      out.append((slots, seeds))
      per_seed = [(s, ts[cap:]) for s, ts in per_seed]
    return out

  # -------------------------------------------------------------- the loop

  def running(self) -> int:
    return sum(len(c.live()) for c in self.cohorts)

  def active(self) -> bool:
    return bool(self.cohorts) or bool(self.queue)

  def refill(self) -> list[Cohort]:
    """Starts the next configurations in the free slots, as new cohorts (clock 0)."""
    free = self.slots - self.running()
    if free <= 0 or not self.queue:
      return []
    take, self.queue = self.queue[:free], self.queue[free:]
    by_kind: dict[int, list[int]] = {}
    for t in take:
      by_kind.setdefault(self._kind(t), []).append(t)
    new, reports = [], {}
    for kind, trials in by_kind.items():
      for slots, seeds in self._layout(kind, trials):
        # Cohorts go round the processes in the order every process makes them alike.
        cohort = Cohort(kind, slots, seeds, owner=self._made % jax.process_count())
        self._made += 1
        self._unit(cohort)  # its hyperparameters, on every process (decisions edit them)
        for _, _, t in cohort.live():
          self.trials[t].status = 'running'
        if cohort.owner == jax.process_index():
          reports.update(self._start(cohort))
        new.append(cohort)
    self.cohorts.extend(new)
    self._record(self._share(reports))
    return new

  def _start(self, cohort: Cohort) -> dict[int, tuple[dict, float]]:
    """Initialises an owned cohort; its runs' metrics at point 0."""
    from sweep import engine  # the plain loop's start: shared initial parameters per seed

    unit = self._unit(cohort)
    cohort.placed = hparams = devices.shard(cohort.hparams, self.shardings)
    state, first = engine._start(self.model, unit, hparams, self.data)
    state = devices.shard(state, self.shardings)
    program = train.make_program(unit.structure)
    if unit.structure.keep_best:
      state = program.note_best(state, first)
    cohort.state = state
    return self._points(cohort, jax.device_get(first), 0.0)

  def advance(self) -> float:
    """Every cohort one segment on (each process its own); returns the seconds it took."""
    from sweep import engine  # the plain loop's data orders

    t0 = time.perf_counter()
    reports = {}
    for cohort in self.cohorts:
      cohort.point += 1
      if cohort.owner != jax.process_index():
        continue
      unit = self._unit(cohort)
      if cohort.book is None:
        cohort.book = engine._OrderBook(self.plan, unit, cache=self._orders)
      if cohort.placed is None:
        cohort.placed = devices.shard(cohort.hparams, self.shardings)
      program = train.make_program(unit.structure)
      orders = cohort.book.segment(cohort.point - 1)
      if not self.timer.covers(unit):
        self.timer.measure(unit, cohort.state, cohort.placed, orders, self.data, self.threshold)
      c0 = time.perf_counter()
      last = cohort.point == self.plan.num_evals
      cohort.state, metrics = program.segment(
        cohort.state,
        cohort.placed,
        orders,
        self.whole if last else self.data,
        self.threshold,
      )
      reports.update(self._points(cohort, jax.device_get(metrics), time.perf_counter() - c0))
    self._record(self._share(reports))
    return time.perf_counter() - t0

  def _points(self, cohort: Cohort, metrics: tuple[dict, ...], seconds: float) -> dict:
    """trial -> (its metrics at the cohort's point, its share of `seconds`)."""
    (m,) = metrics
    live = cohort.live()
    return {t: ({k: v[s, r] for k, v in m.items()}, seconds / len(live)) for s, r, t in live}

  @staticmethod
  def _share(reports: dict) -> dict:
    """Every process's reports, on every process (each trains only its own cohorts)."""
    if jax.process_count() == 1:
      return reports
    out = {}
    for part in distributed.allgather_objects(reports):
      out.update(part)
    return out

  def _record(self, reports: dict) -> None:
    for t in sorted(reports):
      point, seconds = reports[t]
      trial = self.trials[t]
      trial.seconds += seconds
      k = len(trial.points)
      trial.points.append(point)
      for (metric, _), board in self.boards.items():
        value = point.get(metric, np.nan) if point['alive'] else np.nan
        board.record(t, k, value)

  # -------------------------------------------------------------- decisions

  def decide(self) -> dict[str, int]:
    """The rules' decisions at the points the cohorts have just reached, carried out."""
    num_evals = self.plan.num_evals
    counts = {'stopped': 0, 'diverged': 0, 'finished': 0, 'exploited': 0}
    by_point: dict[int, list[int]] = {}
    for cohort in self.cohorts:
      for _, _, t in cohort.live():
        by_point.setdefault(cohort.point, []).append(t)
    ending: dict[int, str] = {}  # trial -> its final status
    for point, now in sorted(by_point.items()):
      alive = [t for t in now if self.trials[t].points[-1]['alive']]
      if self.pbt is None or point >= num_evals:
        # With PBT a diverged member stays: it ranks last and copies a good one.
        ending.update({t: 'diverged' for t in now if t not in alive})
      if point >= num_evals:
        ending.update({t: 'ok' for t in alive})
        continue
      if point == 0:
        continue
      stop = set()
      for rule in self.stopping:
        stop |= rule.stop(point, alive, self.boards[rule.metric, rule.mode], num_evals)
      ending.update({t: 'stopped' for t in stop})
      if self.pbt is not None:
        counts['exploited'] += self._exploit(point, now)
    # Runs that go on at another batch size from here (a diverged one stays where it is).
    moving = {
      t: self.moves[t][c.point]
      for c in self.cohorts
      for _, _, t in c.live()
      if t not in ending and c.point in self.moves.get(t, {}) and self.trials[t].points[-1]['alive']
    }
    for status in ending.values():
      counts['finished' if status == 'ok' else status] += 1
    counts['moved'] = len(moving)
    if ending or moving:
      self._end(ending, moving)
    return counts

  def _end(self, ending: dict[int, str], moving: dict[int, int] | None = None) -> None:
    """Keeps the final state of each ending trial, frees its slot, compacts cohorts; the
    trials `moving` to another kind (trial -> kind) go on in new cohorts of that kind."""
    moving = moving or {}
    kept, carried = [], {}  # carried: (kind, point, owner) -> {trial: its RunState (host)}
    for cohort in self.cohorts:
      leaving = [(s, r, t) for s, r, t in cohort.live() if t in ending or t in moving]
      if leaving:
        held = _runs_on_host(cohort, leaving)
        for s, r, t in leaving:
          one = held[t]
          if t in moving:
            carried.setdefault((moving[t], cohort.point, cohort.owner), {})[t] = one
          else:
            if one is not None:  # `gather_finals` shares it at the end
              self.finals[t] = one
            trial = self.trials[t]
            trial.status = ending[t]
            if ending[t] != 'ok':
              trial.stopped_at = cohort.point
          cohort.slots[s, r] = -1
      if not cohort.live():
        continue
      kept.append(self._compact(cohort) if leaving else cohort)
    for (kind, point, owner), states in carried.items():
      # Runs already at this batch size and clock (of a constant batch size, or ramps that
      # arrived earlier) train with the arrivals: one program call a segment, not two.
      for cohort in [c for c in kept if (c.kind, c.point, c.owner) == (kind, point, owner)]:
        states.update(_runs_on_host(cohort, cohort.live()))
        kept.remove(cohort)
      kept.extend(self._arrive(kind, point, owner, states))
    self.cohorts = kept

  def _arrive(self, kind: int, point: int, owner: int, states: dict[int, Any]) -> list[Cohort]:
    """New cohorts of `kind` at evaluation `point` holding the runs `states` (trial -> its
    RunState on the host, None on a process that does not train them)."""
    out = []
    step = point * self.structures[kind].steps_per_segment[0]
    for slots, seeds in self._layout(kind, sorted(states)):
      cohort = Cohort(kind, slots, seeds, point=point, owner=owner)
      self._unit(cohort)  # its hyperparameters, on every process
      if owner == jax.process_index():
        first = int(slots[slots >= 0][0])
        rows = [[states[int(t) if t >= 0 else first] for t in row] for row in slots]
        runs = jax.tree.map(
          lambda *a, shape=slots.shape: np.stack(a).reshape(shape + np.shape(a[0])),
          *[one for row in rows for one in row],
        )
        group = train.GroupState(runs=runs, step=np.int32(step))
        cohort.state = devices.shard((group,), self.shardings)
      out.append(cohort)
    return out

  def _compact(self, cohort: Cohort) -> Cohort:
    """The cohort in the narrowest layout its live runs fit, if narrower than its own."""
    live = cohort.live()
    layouts = self._layout(cohort.kind, [t for _, _, t in live])
    if len(layouts) > 1 or layouts[0][0].size >= cohort.slots.size:
      return cohort  # no narrower: freed slots stay as padding, computed and never read
    slots, seeds = layouts[0]
    where = {t: (s, r) for s, r, t in live}
    first = live[0][:2]
    rows = np.zeros(slots.shape, np.int32)
    cols = np.zeros(slots.shape, np.int32)
    for s in range(slots.shape[0]):
      for r in range(slots.shape[1]):
        t = slots[s, r]
        # Padding slots copy a live run: they compute, and nothing reads them.
        rows[s, r], cols[s, r] = where[t] if t >= 0 else first
    state = None
    if cohort.state is not None:
      host = jax.device_get(cohort.state)
      state = jax.tree.map(lambda a: np.asarray(a)[rows, cols] if np.ndim(a) >= 2 else a, host)
      state = devices.shard(state, self.shardings)
    (ghp,) = cohort.hparams
    ghp = ghp._replace(
      runs=jax.tree.map(lambda a: np.asarray(a)[rows, cols], ghp.runs), seeds=seeds
    )
    return Cohort(
      cohort.kind,
      slots,
      seeds,
      point=cohort.point,
      owner=cohort.owner,
      state=state,
      hparams=(ghp,),
    )

  def _exploit(self, point: int, now: list[int]) -> int:
    """PBT at `point`: within each population (cohort), the bottom quantile copies the top."""
    board = self.boards[self.pbt.metric, self.pbt.mode]
    n = 0
    for cohort in self.cohorts:
      members = [t for _, _, t in cohort.live() if t in now]
      if cohort.point != point or len(members) < 2:
        continue
      rng = self.pbt.rng(point, members)
      pairs = self.pbt.exploit(point, members, board, rng)
      if not pairs:
        continue
      where = {t: (s, r) for s, r, t in cohort.live()}
      shape = cohort.slots.shape
      rows = np.broadcast_to(np.arange(shape[0])[:, None], shape).astype(np.int32).copy()
      cols = np.broadcast_to(np.arange(shape[1])[None, :], shape).astype(np.int32).copy()
      (ghp,) = cohort.hparams
      sched = ghp.runs.schedule._replace(
        learning_rate=np.array(ghp.runs.schedule.learning_rate, copy=True)
      )
      opt = {k: np.array(v, copy=True) for k, v in ghp.runs.opt.items()}
      for target, source in pairs:
        (ts, tr), (ss, sr) = where[target], where[source]
        rows[ts, tr], cols[ts, tr] = ss, sr
        values = self._explore(rng, self.trials[source].hypers)
        self.trials[target].hypers = values
        self.trials[target].lineage.append((point, source))
        for h, v in values.items():
          if h == 'learning_rate':
            sched.learning_rate[ts, tr] = v
          else:
            opt[h][ts, tr] = v
      cohort.hparams = (ghp._replace(runs=ghp.runs._replace(schedule=sched, opt=opt)),)
      cohort.placed = None
      injected = {h: jnp.asarray(opt[h]) for h in self.pbt.hyperparameters if h != 'learning_rate'}
      if cohort.state is not None:  # on the process that trains it
        cohort.state = _exploit(cohort.state, jnp.asarray(rows), jnp.asarray(cols), injected)
      n += len(pairs)
    return n

  def _explore(self, rng: np.random.Generator, source: dict[str, float]) -> dict[str, float]:
    out = {}
    for h, v in source.items():
      space = self._space(h)
      if space is not None and rng.random() < self.pbt.resample_probability:
        out[h] = float(space.draw(rng, 1)[0])
        continue
      v = v * float(self.pbt.perturb[int(rng.integers(len(self.pbt.perturb)))])
      if h in ('momentum', 'b1', 'b2'):
        v = min(v, 0.9999)  # a decay rate stays below 1
      out[h] = v
    return out

  def _space(self, field: str):
    from sweep import space as spaces

    cfg = self.plan.config
    value = getattr(cfg, field, None) if field in cfg.__dataclass_fields__ else None
    if value is None:
      value = cfg.hyperparameters.get(field)
    return value if isinstance(value, spaces.Space) else None

  def best_so_far(self) -> float:
    """The best value of the first rule's metric any run has reached (NaN before any)."""
    if not self.rules:
      return math.nan
    rule = self.rules[0]
    values = [v for row in self.boards[rule.metric, rule.mode].values for v in row[1:]]
    best = min(values, default=math.inf)
    if not math.isfinite(best):
      return math.nan
    return -best if rule.mode == 'max' else best

  # -------------------------------------------------------------- checkpoints

  def checkpoint(self) -> tuple[dict, dict]:
    """(state, meta): the whole population, for `checkpoints.StateStore.save`. The state
    holds every cohort's runs and hyperparameters and every ended trial's final state;
    the meta every trial's record, the cohorts' layouts and clocks, the queue."""
    state = {
      'cohorts': [(c.state, c.hparams) for c in self.cohorts],
      'finals': [self.finals[t] for t in sorted(self.finals)],
    }
    meta = {
      'unit': 'population',
      'queue': list(self.queue),
      'trials': [t.to_json() for t in self.trials],
      'cohorts': [
        {
          'kind': c.kind,
          'slots': c.slots.tolist(),
          'seeds': c.seeds.tolist(),
          'point': c.point,
          'owner': c.owner,
        }
        for c in self.cohorts
      ],
      'finals': sorted(self.finals),
      'made': self._made,
    }
    return state, meta

  def _abstract_cohort(self, kind: int, slots: np.ndarray, seeds: np.ndarray) -> tuple:
    from sweep import engine

    cohort = Cohort(kind, np.asarray(slots, np.int64), np.asarray(seeds, np.int32))
    unit = self._unit(cohort)
    shapes = jax.eval_shape(lambda: cohort.hparams)
    return engine._abstract_state(unit, self.model), shapes

  def abstract(self, meta: dict) -> dict:
    """The abstract state tree of the checkpoint whose meta is `meta`."""
    cohorts = []
    for c in meta['cohorts']:
      state, hparams = self._abstract_cohort(c['kind'], c['slots'], c['seeds'])
      cohorts.append((state if c.get('owner', 0) == jax.process_index() else None, hparams))
    finals = []
    for t in meta['finals']:
      (group,), _ = self._abstract_cohort(self._kind(t), [[t]], [self.plan.runs[t].values['seed']])
      finals.append(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[2:], a.dtype), group.runs))
    return {'cohorts': cohorts, 'finals': finals}

  def restore(self, state: dict, meta: dict) -> None:
    """The population as checkpoint (`state`, `meta`) left it."""
    trials = [Trial.from_json(d) for d in meta['trials']]
    boards = {key: schedulers.Board(len(trials), key[1]) for key in self.boards}
    for t, trial in enumerate(trials):
      for k, point in enumerate(trial.points):
        for (metric, _), board in boards.items():
          board.record(t, k, point.get(metric, np.nan) if point['alive'] else np.nan)
    cohorts = [
      Cohort(
        c['kind'],
        np.asarray(c['slots'], np.int64),
        np.asarray(c['seeds'], np.int32),
        point=int(c['point']),
        owner=int(c.get('owner', 0)),
        state=None if st is None else devices.shard(st, self.shardings),
        hparams=hp,
      )
      for c, (st, hp) in zip(meta['cohorts'], state['cohorts'], strict=True)
    ]
    # Assigned once everything read: a checkpoint that fails halfway changes nothing.
    self.queue = [int(t) for t in meta['queue']]
    self.trials, self.boards, self.cohorts = trials, boards, cohorts
    self.finals = dict(zip(meta['finals'], state['finals'], strict=True))
    self._made = int(meta.get('made', len(cohorts)))

  # -------------------------------------------------------------- what it leaves

  def extra_columns(self) -> list[dict]:
    """The scheduler's columns of each trial's row."""
    out = []
    points = self.halving.points(self.plan.num_evals) if self.halving is not None else []
    for trial in self.trials:
      row: dict[str, Any] = {'status': trial.status}
      last = trial.points[-1]
      row['stopped_at_updates'] = int(last['updates']) if trial.status == 'stopped' else None
      if self.halving is not None:
        reached = len(trial.points) - 1
        row['rung'] = sum(p <= reached for p in points) + (reached >= self.plan.num_evals) - 1
      if self.pbt is not None:
        row['lineage'] = ' '.join(f'{p}:{s}' for p, s in trial.lineage)
        for h, v in trial.hypers.items():
          row[f'final_{h}'] = v
      out.append(row)
    return out

  def seconds_alone(self) -> list[float | None]:
    """Each trial's wall time had it trained alone: the measured seconds of an update at
    each batch size it trained at, times its updates there, and of an evaluation, times its
    evaluations (None where one of its batch sizes was not timed)."""
    if not self.timer.enabled:
      return [None] * len(self.trials)
    if jax.process_count() > 1:  # each process timed the kinds it trained
      for part in distributed.allgather_objects(self.timer.timings):
        for key, t in part.items():
          self.timer.timings.setdefault(key, t)
    self._time_untimed()
    out = []
    for trial, run in zip(self.trials, self.plan.runs, strict=True):
      g = self.plan.groups.index(run.group)
      # The timed step is one batch: under optax.MultiSteps, k of them make an update.
      last = trial.points[-1]
      updates = int(last['batches'] if 'batches' in last else last['updates'])
      stages = self.plan.stage_updates(run)
      total, known = 0.0, True
      for k, (start, _, b) in enumerate(stages):
        end = stages[k + 1][0] if k + 1 < len(stages) else updates
        t = self.timer.timings.get((g, b))
        if t is None:
          known = False
          break
        total += t.update_seconds * max(0, min(updates, end) - start)
      if not known:
        out.append(None)
        continue
      out.append(total + t.eval_seconds * len(trial.points))
    return out

  def _time_untimed(self) -> None:
    """Times the kinds a trial trained in that this process has no timing of (a sweep
    resumed after they ended), from a fresh cohort of one of their trials."""
    from sweep import engine

    for kind, (group, b, *_) in enumerate(self.kinds):
      g = self.plan.groups.index(group)
      if (g, b) in self.timer.timings:
        continue
      trials = [t for t in range(len(self.trials)) if self._kind(t) == kind]
      if not trials:
        continue  # a kind only ramps move into: timed when they trained there
      slots, seeds = self._layout(kind, trials[:1])[0]
      cohort = Cohort(kind, slots, seeds)
      unit = self._unit(cohort)
      placed = devices.shard(cohort.hparams, self.shardings)
      state = devices.shard(engine._start(self.model, unit, placed, self.data)[0], self.shardings)
      orders = engine._OrderBook(self.plan, unit, cache=self._orders).segment(0)
      self.timer.measure(unit, state, placed, orders, self.data, self.threshold)

  def gather_finals(self) -> None:
    """Every ended run's final state on every process (each kept those it trained)."""
    if jax.process_count() > 1:
      self.finals = dict(distributed.gather(sorted(self.finals.items())))

  def run_state(self, t: int) -> Any:
    return self.finals[t]


__all__ = ['Population', 'Trial', 'Cohort']
