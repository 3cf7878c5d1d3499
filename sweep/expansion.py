"""A checked config expanded into its runs: the grid, the explicit `runs=` or the sampled
configurations, each resolved into a `Run` (its optimizer and injected hyperparameters,
its schedule, its budget), and the `Plan` that shapes the programs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kernels import optimizers
from sweep import batch_schedules, checks
from sweep import space as spaces
from sweep.columns import AXES
from sweep.errors import config_error

if TYPE_CHECKING:
  from sweep.config import SweepConfig


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: its index in the table and its resolved hyperparameters.

  Attributes:
    index: its row in the table.
    values: every field as the table shows it (optimizer defaults filled in; factories
      and schedule callables by their labels).
    total_updates: the run's number of updates: its batches, or its parameter updates
      (batches // k) under `optax.MultiSteps(opt, k)`; its schedule is built for these.
    family: what its optimizer is built from: a name of `optimizers.FAMILIES` or an
      `optimizers.Factory`.
    schedule: a name of `schedules.SCHEDULES` or the schedule callable.
    hypers: the optimizer hyperparameters injected (traced), name -> value.
    spec: every field as given (callables themselves, not their labels).
    stages: with a batch-size schedule (`sweep.batch_ramp`), `(first epoch, batch size)`
      of each stage; empty for a constant batch size (`values['batch_size']`, which is
      the first stage's otherwise).
  """

  index: int
  values: dict[str, Any]
  total_updates: int
  family: str | optimizers.Factory = 'adam'
  schedule: str | Callable = 'constant'
  hypers: dict[str, float] = dataclasses.field(default_factory=dict)
  spec: dict[str, Any] = dataclasses.field(default_factory=dict)
  stages: tuple[tuple[int, int], ...] = ()  # a batch-size schedule: (first epoch, batch size)

  @property
  def group(self) -> tuple[str | optimizers.Factory, tuple[str, ...]]:
    """The compile group: the optimizer and the names of its injected hyperparameters."""
    return self.family, tuple(self.hypers)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated config, expanded: the runs and the settings that shape the program."""

  config: SweepConfig
  runs: tuple[Run, ...]
  loss: str | Callable
  axes: dict[str, list]  # each field's distinct values in order (callables by their labels)
  swept: tuple[str, ...]  # axes with more than one value or set by the user
  batch_sizes: tuple[int, ...]
  steps_per_epoch: dict[int, int]
  total_updates: dict[int, int]  # per batch size: the batches of a run (optimizer steps)
  num_evals: int
  output_dim: int
  fields: tuple[str, ...] = AXES  # the axes, the factories' hyperparameters after weight_decay
  groups: tuple = ()  # compile groups: (optimizer, hyperparameter names), in order
  custom_schedules: tuple[Callable, ...] = ()  # schedule callables; kind len(SCHEDULES) + j
  search: dict[str, Any] = dataclasses.field(default_factory=dict)  # how the runs were chosen
  # For runs drawn from a space, what the layout may depend on (not the draw): `samples`,
  # `grid` (runs per configuration and seed from the listed axes, at most), `p_optimizer`
  # and `batch_sizes` (each option's chance, and every batch size the space can draw).
  space: dict[str, Any] | None = None

  @property
  def ramps(self) -> bool:
    """Whether some run changes batch size (`sweep.batch_ramp`)."""
    return any(r.stages for r in self.runs)

  def stage_updates(self, run: Run) -> list[tuple[int, int, int]]:
    """`(updates, examples, batch size)` at the start of each of `run`'s stages (one
    stage for a constant batch size)."""
    stages = run.stages or ((0, run.values['batch_size']),)
    out, updates, examples = [], 0, 0
    for k, (epoch, b) in enumerate(stages):
      out.append((updates, examples, b))
      if k + 1 < len(stages):
        epochs = stages[k + 1][0] - epoch
        updates += epochs * self.steps_per_epoch[b]
        examples += epochs * self.steps_per_epoch[b] * b
    return out

  def examples(self, run: Run, updates: int) -> tuple[int, int]:
    """(examples read, batch size of the last update) after `updates` updates of `run`."""
    for start, examples, b in reversed(self.stage_updates(run)):
      if updates > start or start == 0:
        return examples + (updates - start) * b, b
    raise AssertionError('unreachable')


# The evaluation sets sized to the training (train_eval_size=None, val_eval_size=None):
# the training probe's forward passes, and the validation pass's at an intermediate
# evaluation point, each cost at most PROBE_SHARE of a segment's training, a training step
# counted as three forward passes of its batch (forward and backward), so that the two
# together take at most a tenth; a power of two (the evaluation chunks divide it), at least
# PROBE_MIN examples (a smaller subset's loss is mostly noise).
PROBE_SHARE = 0.05
PROBE_MIN = 256


def _sized(plan: Plan) -> int:
  """Examples whose forward passes cost PROBE_SHARE of the shortest segment's training."""
  per_segment = min(
    math.ceil(plan.total_updates[b] / plan.num_evals) * b for b in plan.total_updates
  )
  fits = 3 * PROBE_SHARE * per_segment
  return max(1 << int(math.floor(math.log2(max(fits, PROBE_MIN)))), PROBE_MIN)


def probe_size(plan: Plan) -> int:
  """Training examples the train metrics are measured on at each evaluation point."""
  cfg = plan.config
  n = cfg.data.n_train
  if cfg.train_eval_size is not None:
    return min(n, int(cfg.train_eval_size))
  return min(n, _sized(plan))


def val_probe_size(plan: Plan, chunk: int) -> int:
  """Validation examples evaluated at the start and at the intermediate evaluation points
  (the last evaluates the whole validation set): `val_eval_size`, or sized to the training,
  in whole evaluation chunks of `chunk` examples, at most the validation set."""
  cfg = plan.config
  n = cfg.data.n_val or 0
  size = _sized(plan) if cfg.val_eval_size is None else int(cfg.val_eval_size)
  return min(n, math.ceil(size / chunk) * chunk)


def expand(cfg: SweepConfig, loss: Any) -> Plan:
  """The runs of `cfg` (checked by `check_fields`), its axes and budgets, as a `Plan`."""
  data = cfg.data
  epochs = 1 if cfg.epochs is None and cfg.updates is None else cfg.epochs

  # ---- the fields, each a list of values or a space
  hyper_names = checks.hyperparameter_names(cfg)
  entries = checks.runs_entries(cfg) if cfg.runs is not None else None
  if entries is not None:
    hyper_names += checks.entries_hyperparameters(cfg, entries, hyper_names)
  position = AXES.index('weight_decay') + 1
  fields = AXES[:position] + tuple(hyper_names) + AXES[position:]
  raw_field = {f: getattr(cfg, f) if f in AXES else cfg.hyperparameters.get(f) for f in fields}
  norm = {f: checks.normalise(cfg, f, raw_field[f]) for f in fields}
  sampled = [f for f in fields if isinstance(norm[f], spaces.Space)]

  # ---- the runs, as given (callables themselves)
  space = None
  if entries is not None:
    raw_runs, search = _listed(cfg, entries, fields, raw_field, norm, sampled)
  elif sampled:
    raw_runs, search, space = _sampled(cfg, fields, norm, sampled)
  else:
    raw_runs, search = _grid(cfg, fields, norm), {}
  if entries is None:  # explicit runs name their fields on purpose
    raw_runs = _conditional(raw_runs, fields, hyper_names)

  # ---- budgets and evaluation points
  ramps = {
    id(r['batch_size']): r['batch_size'].epochs(int(epochs))
    for r in raw_runs
    if isinstance(r['batch_size'], batch_schedules.BatchSchedule)
  }
  batch_sizes, steps_per_epoch, total, num_evals = _budgets(cfg, raw_runs, ramps, space, epochs)

  runs = _resolve(
    cfg, fields, hyper_names, raw_runs, total, explicit=entries is not None, ramps=ramps
  )
  axes, swept = _shown(fields, hyper_names, runs, ramps)
  if entries is not None:
    search['runs'] = [
      {k: (r.values[k] if k in ('optimizer', 'schedule') else v) for k, v in entry.items()}
      for r, entry in zip(runs, entries, strict=True)
    ]
  if data.is_classification:
    output_dim = int(data.num_classes)
  else:
    output_dim = int(np.prod(data.y_train.shape[1:]))

  return Plan(
    config=cfg,
    runs=tuple(runs),
    loss=loss,
    axes=axes,
    swept=swept,
    batch_sizes=batch_sizes,
    steps_per_epoch=steps_per_epoch,
    total_updates=total,
    num_evals=num_evals,
    output_dim=output_dim,
    fields=fields,
    groups=tuple(_distinct(r.group for r in runs)),
    custom_schedules=tuple(_distinct(r.schedule for r in runs if not isinstance(r.schedule, str))),
    search=search,
    space=space,
  )


def _listed(cfg, entries, fields, raw_field, norm, sampled) -> tuple[list[dict], dict]:
  """The runs of `runs=`: each entry over the fields' single values."""
  if sampled:
    raise config_error(
      sampled[0],
      checks.Shown(checks.space_repr(norm[sampled[0]])),
      'runs= lists every run: give each run its own value instead of a space',
    )
  if cfg.samples is not None:
    raise config_error(
      'samples', cfg.samples, 'runs= lists every run: samples= draws runs from spaces instead'
    )
  for f in fields:
    if len(norm[f]) > 1:
      raise config_error(
        f,
        raw_field[f],
        'with runs=, a field a run does not name takes one value: name it in each run instead',
      )
  raw_runs = []
  for i, entry in enumerate(entries):
    raw = {f: norm[f][0] for f in fields}
    for key, v in entry.items():
      where = f'runs[{i}][{key!r}]'
      if key == 'optimizer':
        checks.refuse_transformation(where, v)
      if isinstance(v, spaces.Space) or isinstance(v, (list, tuple, np.ndarray)):
        raise config_error(
          where, v, 'a run takes one value per field (a list of values is a list of runs)'
        )
      checks.check_value(cfg, key, v, where)
      raw[key] = v
    raw_runs.append(raw)
  seen: dict[tuple, int] = {}
  for i, raw in enumerate(raw_runs):
    key = tuple((f, id(v) if callable(v) else v) for f, v in raw.items())
    if key in seen:
      raise config_error(
        f'runs[{i}]', entries[i], f'it repeats runs[{seen[key]}]: the same configuration twice'
      )
    seen[key] = i
  return raw_runs, {'mode': 'runs'}


def _sampled(cfg, fields, norm, sampled) -> tuple[list[dict], dict, dict | None]:
  """`samples` configurations drawn from the sampled fields, each at every point of the
  listed ones; with what the layout may depend on (not the draw: `Plan.space`)."""
  if cfg.samples is None:
    raise config_error(
      sampled[0],
      checks.Shown(checks.space_repr(norm[sampled[0]])),
      'a sampled field needs samples=N: how many configurations to draw',
    )
  count = int(cfg.samples)
  draws = {f: _draw(f, norm[f], int(cfg.sample_seed), count) for f in sampled}
  # The sampled configurations form one axis, at the place of the first sampled field.
  listed = [f for f in fields if f not in sampled]
  k = sum(1 for f in fields[: fields.index(sampled[0])] if f not in sampled)
  raw_runs = []
  for combo in itertools.product(
    *(norm[f] for f in listed[:k]), range(count), *(norm[f] for f in listed[k:])
  ):
    j = combo[k]
    raw = dict(zip(listed[:k], combo[:k], strict=True))
    raw.update({f: draws[f][j] for f in sampled})
    raw.update(zip(listed[k:], combo[k + 1 :], strict=True))
    raw_runs.append({f: raw[f] for f in fields})
  grid = math.prod(len(norm[f]) for f in listed if f not in ('seed', 'batch_size', 'optimizer'))
  batch_space, opt_space = norm['batch_size'], norm['optimizer']
  space = {
    'samples': count,
    'grid': grid,
    'p_optimizer': 1 / len(opt_space.options) if isinstance(opt_space, spaces.Choice) else 1.0,
    'batch_sizes': tuple(sorted(int(b) for b in batch_space.options))
    if isinstance(batch_space, spaces.Choice) and batch_space.integer
    else None,
  }
  if 'seed' in sampled:  # the seed rows follow the draw: laid out by it, as a grid is
    space = None
  search = {
    'mode': 'sampled',
    'samples': count,
    'sample_seed': int(cfg.sample_seed),
    'spaces': {f: checks.space_repr(norm[f]) for f in sampled},
  }
  return raw_runs, search, space


def _grid(cfg, fields, norm) -> list[dict]:
  """The product of the fields' values."""
  if cfg.samples is not None:
    raise config_error(
      'samples',
      cfg.samples,
      'samples=N draws from sampled fields, and none is given: '
      'e.g. learning_rate=sweep.space.loguniform(1e-4, 1e-1)',
    )
  return [
    dict(zip(fields, combo, strict=True)) for combo in itertools.product(*(norm[f] for f in fields))
  ]


def _budgets(cfg, raw_runs, ramps, space, epochs) -> tuple:
  """The batch sizes, their steps per epoch and updates, and the evaluation points."""
  n = cfg.data.n_train
  batch_sizes = tuple(
    sorted(
      {int(r['batch_size']) for r in raw_runs if id(r['batch_size']) not in ramps}
      | {b for stages in ramps.values() for _, b in stages}
    )
  )
  # A space's batch sizes all have a budget, drawn or not: the layout holds them all, and
  # the number of evaluations does not depend on the draw.
  budgeted = sorted(set(batch_sizes) | set((space or {}).get('batch_sizes') or ()))
  steps_per_epoch = {b: n // b for b in budgeted}
  if cfg.updates is not None:
    total = {b: int(cfg.updates) for b in budgeted}
  else:
    total = {b: max(1, round(epochs * steps_per_epoch[b])) for b in budgeted}
  if cfg.num_evals is None:
    num_evals = min(100, max(1, math.ceil(epochs))) if cfg.updates is None else min(10, cfg.updates)
    if ramps:
      num_evals = int(epochs)  # every stage starts at an evaluation point
  else:
    num_evals = cfg.num_evals
  num_evals = min(num_evals, min(total.values()))
  if cfg.scheduler is not None:
    num_evals = checks.scheduler_evals(cfg, num_evals, total)
  if ramps:
    checks.check_stage_points(cfg, ramps, num_evals, total, steps_per_epoch)
  return batch_sizes, steps_per_epoch, total, num_evals


def _shown(fields, hyper_names, runs, ramps) -> tuple[dict[str, list], tuple[str, ...]]:
  """What the table and config.json show: each field's distinct values, the swept ones."""
  axes = {f: _distinct(_display(r.spec[f], r.values, f) for r in runs) for f in fields}
  always = ('learning_rate', 'batch_size', 'seed', 'optimizer', 'schedule')
  swept = tuple(
    f
    for f in fields
    if f in always
    or f in hyper_names
    or len(axes[f]) > 1
    or (f in optimizers.HYPERPARAMETERS and axes[f] != [None])
  )
  if ramps:
    # The schedule beside the batch size it starts at: 'constant' or its stages.
    axes['batch_schedule'] = _distinct(r.values['batch_schedule'] for r in runs)
    at = swept.index('batch_size') + 1
    swept = swept[:at] + ('batch_schedule',) + swept[at:]
  return axes, swept


def _draw(field: str, sp: spaces.Space, seed: int, n: int) -> list:
  return sp.draw(spaces.stream(seed, field), n)


def _conditional(raw_runs: list[dict], fields, hyper_names: list[str]) -> list[dict]:
  """A grid's or a space's hyperparameter applies to the optimizers that take it: the
  runs of the others take None for it (the table leaves it empty) and are not repeated
  for its values. A field that no optimizer of the sweep takes is left as it is (an error
  in `_resolve`); so are explicit runs, which name their fields on purpose."""
  takers: dict[Any, Callable[[str], bool]] = {}
  for opt in _distinct(r['optimizer'] for r in raw_runs):
    if isinstance(opt, str):
      family = optimizers.FAMILIES.get(opt)
      takers[_identity(opt)] = lambda f, family=family: family is None or f in family.hypers
    else:
      try:
        takers[_identity(opt)] = optimizers.signature(opt).accepts
      except ValueError:
        takers[_identity(opt)] = lambda f: True  # refused with its reason in `_resolve`
  conditional = [
    f
    for f in fields
    if _fills(f, hyper_names)
    and any(r[f] is not None for r in raw_runs)
    and 0 < sum(t(f) for t in takers.values()) < len(takers)
  ]
  if not conditional:
    return raw_runs
  out, seen = [], set()
  for raw in raw_runs:
    takes = takers[_identity(raw['optimizer'])]
    raw = {f: (None if f in conditional and not takes(f) else v) for f, v in raw.items()}
    key = tuple((f, _identity(v)) for f, v in raw.items())
    if key not in seen:
      seen.add(key)
      out.append(raw)
  return out


def _distinct(items) -> list:
  """The distinct items in order of first appearance (callables by identity)."""
  out, seen = [], set()
  for x in items:
    key = _identity(x)
    if key not in seen:
      seen.add(key)
      out.append(x)
  return out


def _identity(x):
  if isinstance(x, tuple):
    return tuple(_identity(v) for v in x)
  if isinstance(x, optimizers.Factory):
    return ('factory', id(x.fn), x.names)
  if callable(x) and not isinstance(x, str):
    return ('callable', id(x))
  return x


def _display(spec_value, values: dict, field: str):
  return values[field] if field in ('optimizer', 'schedule', 'batch_size') else spec_value


def _labels(callables: list, taken: set[str]) -> dict[int, str]:
  """A distinct readable label for each callable (by id), none equal to a name in `taken`."""
  out, used = {}, set(taken)
  for fn in callables:
    base = optimizers.label(fn)
    name, k = base, 2
    while name in used:
      name, k = f'{base} #{k}', k + 1
    used.add(name)
    out[id(fn)] = name
  return out


def _resolve(
  cfg, fields, hyper_names, raw_runs, total, *, explicit: bool, ramps: dict | None = None
) -> list[Run]:
  """Each raw run as a `Run`: the optimizer and its injected hyperparameters, the schedule,
  the values the table shows."""
  factories = _distinct(r['optimizer'] for r in raw_runs if not isinstance(r['optimizer'], str))
  scheds = _distinct(r['schedule'] for r in raw_runs if not isinstance(r['schedule'], str))
  opt_labels = _labels(
    factories, {r['optimizer'] for r in raw_runs if isinstance(r['optimizer'], str)}
  )
  sched_labels = _labels(
    scheds, {r['schedule'] for r in raw_runs if isinstance(r['schedule'], str)}
  )
  signatures = {id(fn): optimizers.signature(fn) for fn in factories}
  accumulations: dict[int, int] = {}  # per factory: batches per parameter update
  names_of = {id(fn): [] for fn in factories}  # per factory: every name any of its runs fills
  for r in raw_runs:
    if not isinstance(r['optimizer'], str):
      names = names_of[id(r['optimizer'])]
      names.extend(
        h for h in fields if _fills(h, hyper_names) and r[h] is not None and h not in names
      )
  ordered = {k: [h for h in fields if h in v] for k, v in names_of.items()}

  # Per named optimizer, the hyperparameters some run sets: those are injected (in every
  # run of that optimizer, so that its runs share one program); the others stay fixed.
  injected: dict[str, set[str]] = {}
  for raw in raw_runs:
    if isinstance(raw['optimizer'], str):
      injected.setdefault(raw['optimizer'], set()).update(
        k for k in optimizers.HYPERPARAMETERS if raw[k] is not None
      )
  runs = []
  for i, raw in enumerate(raw_runs):
    field = (lambda f, i=i: f'runs[{i}][{f!r}]') if explicit else (lambda f: f)
    opt = raw['optimizer']
    values = dict(raw)
    if isinstance(opt, str):
      fam = optimizers.FAMILIES[opt]
      for name in optimizers.HYPERPARAMETERS:
        if raw[name] is not None and name not in fam.hypers:
          takers = optimizers.families_accepting(name)
          shown = raw[name] if explicit else getattr(cfg, name)
          raise config_error(
            field(name),
            shown,
            f'optimizer {opt!r} takes no {name}; it applies to '
            + ', '.join(takers)
            + ', and to optimizer factories that take it',
          )
      for name in hyper_names:
        if raw[name] is not None:
          shown = raw[name] if explicit else cfg.hyperparameters.get(name)
          raise config_error(
            field(name) if explicit else f'hyperparameters[{name!r}]',
            shown,
            f'optimizer {opt!r} takes no {name}: hyperparameters= fills keyword arguments '
            'of optimizer factories',
          )
      for name in optimizers.HYPERPARAMETERS:
        if name not in fam.hypers:
          values[name] = None
        elif values[name] is None:
          values[name] = fam.hypers[name]
      # Only what the sweep sets is injected (traced, float32); the defaults stay Python
      # floats inside optax, so that `adam` is exactly `optax.adam(lr)` (1 - float32(0.999)
      # is 0.99998713e-3: a learning rate 6.4e-6 larger in effect).
      hypers = {
        k: float(values[k])
        for k in optimizers.HYPERPARAMETERS
        if k in injected[opt] and values[k] is not None
      }
      family = opt
    else:
      sig = signatures[id(opt)]
      label = opt_labels[id(opt)]
      for name in fields:
        if _fills(name, hyper_names) and raw[name] is not None and not sig.accepts(name):
          shown = (
            raw[name]
            if explicit
            else (getattr(cfg, name) if name in AXES else cfg.hyperparameters.get(name))
          )
          where = field(name) if explicit or name in AXES else f'hyperparameters[{name!r}]'
          raise config_error(
            where,
            shown,
            f'the optimizer factory {label!r} takes no {name}; its keyword arguments are '
            + (', '.join(sig.keywords) or 'none'),
          )
      hypers = {}
      for name in ordered[id(opt)]:
        v = raw[name]
        if v is None:
          default = sig.keywords.get(name, optimizers.REQUIRED)
          if isinstance(default, numbers.Real) and not isinstance(default, bool):
            v = values[name] = float(default)
          else:
            continue  # a default that is no number (None) stays the factory's own
        hypers[name] = float(v)
      for name in sig.required():
        if name not in hypers:
          how = f'set {name}=...' if name in AXES else f'give hyperparameters={{{name!r}: [...]}}'
          raise config_error(
            field('optimizer'),
            checks.Shown(label),
            f'the factory takes {name} and nothing fills it: {how}',
          )
      for name in optimizers.HYPERPARAMETERS:
        if name not in hypers:
          values[name] = None
      if id(opt) not in accumulations:
        lr = float(raw['learning_rate'])
        accumulations[id(opt)] = checks.accumulation(opt, lr, hypers, label, field)
      family = optimizers.Factory(opt, tuple(hypers), label, accumulations[id(opt)])
      values['optimizer'] = label
    sched = raw['schedule']
    stages = (ramps or {}).get(id(raw['batch_size']), ())
    if stages:
      values['batch_size'] = b = stages[0][1]
      values['batch_schedule'] = raw['batch_size'].label
      ends = [e for e, _ in stages[1:]] + [int(cfg.epochs or 1)]
      run_total = sum(
        (end - epoch) * (cfg.data.n_train // size)
        for (epoch, size), end in zip(stages, ends, strict=True)
      )
    else:
      b = int(raw['batch_size'])
      if ramps:
        values['batch_schedule'] = 'constant'
      run_total = total[b]
    if optimizers.every_k(family) > 1:
      run_total = checks.parameter_updates(cfg, family, stages, run_total, field)
    if isinstance(sched, str):
      checks.check_schedule(cfg, raw, sched, run_total, b, field)
    else:
      values['schedule'] = sched_labels[id(sched)]
    for h in hyper_names:
      values.setdefault(h, None)
    runs.append(
      Run(
        index=i,
        values=values,
        total_updates=run_total,
        family=family,
        schedule=sched,
        hypers=hypers,
        spec=dict(raw),
        stages=stages,
      )
    )
  return runs


def _fills(name: str, hyper_names: list[str]) -> bool:
  """Whether field `name` fills a keyword argument of an optimizer."""
  return name in optimizers.HYPERPARAMETERS or name in hyper_names


def run_fields(plan: Plan, run: Run) -> dict[str, Any]:
  """The fields that make `run` a sweep of its own:
  `plan.config.replace(**run_fields(plan, run))`."""
  out = {f: run.spec[f] for f in AXES}
  out['hyperparameters'] = {
    h: run.spec[h] for h in plan.fields if h not in AXES and run.spec[h] is not None
  }
  out.update(runs=None, samples=None)
  return out


def axis_columns(table_columns_: Sequence[str], config: Mapping | None = None) -> list[str]:
  """The columns of a results table that hold hyperparameters: the axes, and the factories'
  hyperparameters recorded in `config['axes']` (config.json), in the sweep's order."""
  recorded = list((config or {}).get('axes') or {})
  extra = [a for a in recorded if a not in AXES and a != 'batch_schedule']
  position = AXES.index('weight_decay') + 1
  order = list(AXES[:position]) + extra + list(AXES[position:])
  # A sweep with batch-size schedules (`sweep.batch_ramp`): beside the size each run starts at.
  order.insert(order.index('batch_size') + 1, 'batch_schedule')
  return [a for a in order if a in table_columns_]
