"""The layout of a sweep's runs: units of work, their width, and what it costs.

A sweep's runs are grouped by optimizer family (or factory): one compiled program per
family. Within a family, the runs of each batch size form a batch group laid out (S, R):
S seed slots, R runs per seed. The run axis R is cut into chunks of one width; each chunk
is a `Unit`, the unit of work the engine trains, checkpoints and resumes, and every unit
of a family runs the same compiled program. The width is the widest the memory budget
allows and, on a CPU, no wider than a step needs to fill the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import optimizers, schedules, train
from sweep import adapters, layers, products
from sweep.config import SweepConfig
from sweep.data import batch_spec, nbytes, rows, signature, spec_of
from sweep.devices import host_ram
from sweep.expansion import Plan, Run


def _bucket(n: int) -> int:
  """Run-axis widths are powers of two, so most changes in a count reuse the program."""
  return 1 << max(0, math.ceil(math.log2(n)))


@dataclasses.dataclass
class BatchGroup:
  """The runs of one compile group with one batch size, laid out (S, R)."""

  batch_size: int
  seeds: list[int]
  slots: np.ndarray  # (S, R) run index at each slot, -1 for padding
  runs: list[Run]


@dataclasses.dataclass
class Unit:
  """One unit of work: one family's chunk of the run axis, every batch group of it.

  The units of a family share one `structure`, so one compiled program serves them all.
  """

  family: str | optimizers.Factory
  structure: train.Structure
  groups: list[BatchGroup]
  hparams: tuple[train.GroupHparams, ...]
  width_reason: str = 'memory'  # what chose the run-axis width: 'memory' or 'step FLOPs'
  flops_per_run: float = 0.0  # FLOPs of one run's step (`step_flops`)
  # Shared by the chunks of one family: their seeds' initial parameters and metrics.
  shared: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclasses.dataclass
class UnitResult:
  """A trained unit: its final state (on the host, on disk or not kept), its metrics at
  every evaluation (per evaluation, per batch group, a dict of (S, R) arrays) and its
  training seconds."""

  index: int
  unit: Unit
  final: Any  # checkpoints.Final
  history: list
  seconds: float


def _layout(plan: Plan, key) -> list[BatchGroup]:
  """Every batch group of compile group `key`, its runs laid out (S, R) with R unpadded.

  The seeds of a batch group are those its runs use; a seed with fewer runs than another
  (runs that are no product of the axes) leaves padding slots (-1) in its row. Runs drawn
  from a space are laid out by the space: a group for every batch size it can draw (none of
  whose runs may have been drawn), each with every seed of the compile group.
  """
  mine = [r for r in plan.runs if r.group == key]
  space = plan.space or {}
  sizes = space.get('batch_sizes') or sorted({r.values['batch_size'] for r in mine})
  every_seed = list(dict.fromkeys(r.values['seed'] for r in mine))
  out = []
  for b in sizes:
    runs = [r for r in mine if r.values['batch_size'] == b]
    seeds = every_seed if space else list(dict.fromkeys(r.values['seed'] for r in runs))
    per_seed = [[r for r in runs if r.values['seed'] == s] for s in seeds]
    slots = np.full((_bucket(len(seeds)), max(len(rs) for rs in per_seed)), -1, np.int64)
    for si, rs in enumerate(per_seed):
      slots[si, : len(rs)] = [r.index for r in rs]
    out.append(BatchGroup(batch_size=b, seeds=seeds, slots=slots, runs=runs))
  return out


def _binomial_quantile(n: int, p: float, q: float) -> int:
  """The smallest k with P(Binomial(n, p) <= k) >= q."""
  cdf = 0.0
  for k in range(n + 1):
    cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
    if cdf >= q:
      return k
  return n


# A space's batch group is laid out wide enough for this share of the draws (the median,
# rounded up to a power of two); a draw that puts more runs in it trains them in a further
# chunk of the same program. Wider costs padding on every draw: with 16 samples over 2
# optimizers x 3 batch sizes, the 95th percentile made draws 1.4x slower than the median
# (docs/performance.md).
SPACE_QUANTILE = 0.5


def _space_runs(plan: Plan) -> int:
  """Runs per seed a space's batch group is laid out for: a bound that depends on the space
  and the sample count, not on which values were drawn."""
  space = plan.space
  p = space['p_optimizer'] / (len(space['batch_sizes']) if space['batch_sizes'] else 1)
  return max(1, _binomial_quantile(space['samples'], p, SPACE_QUANTILE)) * space['grid']


def _chunk(groups: list[BatchGroup], index: int, widths: list[int]) -> list[BatchGroup]:
  """Chunk `index` of the run axis of every batch group: slots [index * width, (index + 1) *
  width) of each, padded with -1 (`widths` holds each group's width).

  A batch group with fewer runs than its width lies whole in the first chunk and is padding
  in the others.
  """
  out = []
  for g, width in zip(groups, widths, strict=True):
    slots = np.full((g.slots.shape[0], width), -1, np.int64)
    part = g.slots[:, index * width : (index + 1) * width]
    slots[:, : part.shape[1]] = part
    idx = set(int(i) for i in part.ravel() if i >= 0)
    out.append(BatchGroup(g.batch_size, g.seeds, slots, [r for r in g.runs if r.index in idx]))
  return out


def memory_budget(cfg: SweepConfig) -> int:
  """Bytes the run axis may use on a device: the config's, else a safe fraction of the
  device's memory (15 % of host RAM on CPU, where finished results and other processes
  share it)."""
  if cfg.memory_budget is not None:
    return int(cfg.memory_budget)
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # backends without memory stats
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(0.6 * stats['bytes_limit'])
  return int(0.15 * host_ram())


def keep_budget(cfg: SweepConfig) -> int:
  """Host bytes for finished runs' final states (10 % of RAM, or the config's budget)."""
  if cfg.memory_budget is not None:
    return int(cfg.memory_budget)
  return int(0.1 * host_ram())


def run_bytes(plan: Plan, model: adapters.Model, family: str, eval_chunk: int) -> int:
  """Memoised `_run_bytes` (it traces the model twice)."""
  key = (
    model,
    plan.loss,
    family,
    eval_chunk,
    max(plan.total_updates),
    plan.config.keep_best,
    signature(plan.config.data.x_train),
    plan.config.data.y_train.shape[1:],
    str(plan.config.data.y_train.dtype),
  )
  try:
    return _run_bytes_cached(key, plan, model, family, eval_chunk)
  except TypeError:  # an unhashable model or loss
    return _run_bytes(plan, model, family, eval_chunk)


_RUN_BYTES: dict = {}


def _run_bytes_cached(key, plan, model, family, eval_chunk) -> int:
  if key not in _RUN_BYTES:
    _RUN_BYTES[key] = _run_bytes(plan, model, family, eval_chunk)
  return _RUN_BYTES[key]


def _run_bytes(plan: Plan, model: adapters.Model, family: str, eval_chunk: int) -> int:
  """An upper estimate of one run's memory: parameters, optimizer state, gradient and
  update, and every intermediate of a training step at the largest batch (or of an
  evaluation chunk, whichever is larger; XLA reuses buffers, so the truth is lower)."""
  data = plan.config.data
  params, model_state = model.initial_shapes()
  size = lambda tree: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
  hypers = optimizers.example_hypers(family)
  opt = optimizers.make(family, hypers)
  trained = optimizers.trained_params(opt, params)  # a lookahead trains two copies
  opt_state = jax.eval_shape(opt.init, trained)
  structure = train.Structure(
    model=model,
    loss=plan.loss,
    family=family,
    batch_sizes=(),
    steps_per_segment=(),
    steps_per_epoch=(),
    eval_batch_size=eval_chunk,
    ignore_label=data.ignore_label,
  )

  def intermediates(batch: int, grad: bool) -> int:
    x = batch_spec(data.x_train, batch)
    y = jax.ShapeDtypeStruct((batch,) + data.y_train.shape[1:], data.y_train.dtype)

    def f(p, s, x, y):
      pred, new_state = structure.forward(p, s, x, grad, jax.random.key(0) if grad else None)
      return jnp.mean(structure.metrics(pred, y)[0]), new_state

    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, has_aux=True) if grad else f)(
      params, model_state, x, y
    )
    return sum(
      int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
      for eqn in jaxpr.jaxpr.eqns
      for v in eqn.outvars
      if hasattr(v.aval, 'shape')
    )

  # params, gradient, update, new params; optimizer and model state
  state = 4 * size(trained) + size(opt_state) + 2 * size(model_state)
  if plan.config.keep_best:
    state += size(params) + size(model_state)
  return state + max(intermediates(max(plan.total_updates), True), intermediates(eval_chunk, False))


def _hparams(plan: Plan, group: BatchGroup, filler: Run) -> train.GroupHparams:
  """Stacks each slot's hyperparameters into arrays (S, R); padding copies `filler`, a real
  run of the compile group."""
  cfg = plan.config
  custom = {id(fn): j for j, fn in enumerate(plan.custom_schedules)}
  sched, opt = [], []
  for row in group.slots:
    sched_row, opt_row = [], []
    for idx in row:
      run = plan.runs[idx] if idx >= 0 else filler
      v = run.values
      if isinstance(run.schedule, str):
        sched_row.append(
          schedules.make_params(
            run.schedule,
            v['learning_rate'],
            run.total_updates,
            decay_rate=v['decay_rate'],
            decay_every=cfg.decay_every,
            warmup=v['warmup'],
          )
        )
      else:
        sched_row.append(
          schedules.custom_params(custom[id(run.schedule)], v['learning_rate'], run.total_updates)
        )
      opt_row.append({k: np.float32(x) for k, x in run.hypers.items()})
    sched.append(sched_row)
    opt.append(opt_row)

  def stack(rows):
    per_row = [jax.tree.map(lambda *ys: np.stack(ys), *r) for r in rows]
    return jax.tree.map(lambda *xs: np.stack(xs), *per_row)

  seeds = np.array(
    group.seeds + [group.seeds[0]] * (group.slots.shape[0] - len(group.seeds)), np.int32
  )
  # A group of padding alone is given no budget: where its segment skips ticks past the
  # budget (`ragged`), it trains nothing.
  budget = plan.total_updates[group.batch_size] if group.runs else 0
  return train.GroupHparams(
    runs=train.RunHparams(schedule=stack(sched), opt=stack(opt)),
    seeds=seeds,
    total_updates=np.int32(budget),
  )


# Optimizers whose update of each parameter entry depends on that entry alone (or on
# global norms): transposing a weight commutes with them, so their state may be held
# in the fast layout of `sweep.layers`.
_ENTRYWISE = frozenset(
  {'sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop', 'adagrad', 'lion'}
)


def fast_layout(init_fn, apply_fn, family: str, x: np.ndarray) -> layers.Layout | None:
  """The `sweep.layers.Layout` of a model's dense kernels under `family`, or None."""
  if family not in _ENTRYWISE:
    return None
  try:
    return _fast_layout(init_fn, apply_fn, signature(x), len(y := jax.tree.leaves(x)[0]))
  except TypeError:  # unhashable functions
    return _fast_layout.__wrapped__(init_fn, apply_fn, signature(x), len(y))


@functools.lru_cache(maxsize=64)
def _fast_layout(init_fn, apply_fn, sig, n) -> layers.Layout | None:
  params = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
  x = spec_of(sig, n)
  return products.plan(apply_fn, params, x, layers.plan_layout(apply_fn, params, x))


def step_flops(plan: Plan, model: adapters.Model) -> float:
  """FLOPs of one run's training step at the largest batch size (its matrix products and
  convolutions, forward and backward), counted in its jaxpr; memoised."""
  data = plan.config.data
  key = (
    model,
    plan.loss,
    max(plan.total_updates),
    signature(data.x_train),
    data.y_train.shape[1:],
    str(data.y_train.dtype),
  )
  try:
    if key not in _STEP_FLOPS:
      _STEP_FLOPS[key] = _step_flops(plan, model)
    return _STEP_FLOPS[key]
  except TypeError:  # an unhashable loss
    return _step_flops(plan, model)


_STEP_FLOPS: dict = {}


def _step_flops(plan: Plan, model: adapters.Model) -> float:
  data = plan.config.data
  params, model_state = model.initial_shapes()
  structure = train.Structure(
    model=model,
    loss=plan.loss,
    family='sgd',
    batch_sizes=(),
    steps_per_segment=(),
    steps_per_epoch=(),
    eval_batch_size=1,
    ignore_label=data.ignore_label,
  )
  batch = max(plan.total_updates)
  x = batch_spec(data.x_train, batch)
  y = jax.ShapeDtypeStruct((batch,) + data.y_train.shape[1:], data.y_train.dtype)

  def f(p, s, x, y):
    pred, _ = structure.forward(p, s, x, True, jax.random.key(0))
    return jnp.mean(structure.metrics(pred, y)[0])

  return _jaxpr_flops(jax.make_jaxpr(jax.grad(f))(params, model_state, x, y).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
  """Multiply-adds x 2 of the dot_generals and convolutions in `jaxpr`, nested ones
  included (a scan's body counted `length` times, a loop's body once)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features
    repeat = eqn.params.get('length', 1) if name == 'scan' else 1
    for sub in layers.subjaxprs(eqn.params):
      total += repeat * _jaxpr_flops(sub)
  return total


def eval_bytes_per_example(plan: Plan, init_fn, apply_fn, chunk: int) -> float:
  """Bytes of every intermediate of one run's forward pass, per example (an upper
  estimate, as in `run_bytes`); memoised."""
  data = plan.config.data
  key = (init_fn, apply_fn, chunk, signature(data.x_train))
  try:
    if key not in _EVAL_BYTES:
      _EVAL_BYTES[key] = _eval_bytes_per_example(plan, init_fn, apply_fn, chunk)
    return _EVAL_BYTES[key]
  except TypeError:
    return _eval_bytes_per_example(plan, init_fn, apply_fn, chunk)


_EVAL_BYTES: dict = {}


def _eval_bytes_per_example(plan: Plan, init_fn, apply_fn, chunk: int) -> float:
  data = plan.config.data
  params = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
  x = batch_spec(data.x_train, chunk)
  jaxpr = jax.make_jaxpr(lambda p, x: apply_fn(p, x))(params, x).jaxpr
  # Only what depends on the parameters is made once per run: the rest (the input, its
  # windows for a first convolution) is shared by the runs reading the same chunk.
  per_run = set(jaxpr.invars[: len(jax.tree.leaves(params))])
  total = 0
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jax.extend.core.Literal) and v in per_run for v in eqn.invars):
      per_run.update(eqn.outvars)
      total += sum(
        int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
        for v in eqn.outvars
        if hasattr(v.aval, 'shape')
      )
  return total / chunk


# On a CPU, an evaluation chunk is cut so that its intermediates, over the runs of a
# device, stay about this size, near the cache (docs/performance.md, change 14).
EVAL_CHUNK_BYTES = 16 << 20


def eval_chunk_width(
  chunk: int, bytes_per_example: float, runs_per_device: int, backend: str
) -> int:
  """Examples per evaluation step: the largest divisor of `chunk` (the data are padded
  to multiples of it) whose intermediates over `runs_per_device` runs fit
  `EVAL_CHUNK_BYTES`, at least 32 examples; on accelerators `chunk` itself."""
  if backend != 'cpu':
    return chunk
  fits = EVAL_CHUNK_BYTES / max(1.0, bytes_per_example * runs_per_device)
  divisors = [d for d in range(1, chunk + 1) if chunk % d == 0]
  small = [d for d in divisors if d <= fits and d >= min(32, chunk)]
  return max(small) if small else min(d for d in divisors if d >= min(32, chunk))


# On a CPU, runs are batched into one step until the step holds about this many FLOPs per
# device. Below it, a step is a chain of small kernels whose fixed costs batching shares;
# beyond it the products fill the device and each further run only adds cache misses
# (docs/performance.md: the seed MLP, 1 MFLOP a run-step, gains up to 64 runs; the flax
# MNIST CNN on 8x8 digits, 73 MFLOP, up to 16; the 1M-parameter MLP, 615 MFLOP, none).
FILL_FLOPS = 1e9


def run_axis_width(
  flops_per_run: float, widest: int, devices: int, backend: str
) -> tuple[int, str]:
  """The run-axis width of a compile group, and why.

  Args:
    flops_per_run: FLOPs of one run's training step (`step_flops`).
    widest: the widest the memory budget allows (a power of two, a multiple of `devices`).
    devices: local devices the run axis is split over.
    backend: `jax.default_backend()`; the FLOPs rule applies on CPU only (an accelerator
      is filled by the widest run axis that fits its memory).

  Returns:
    `(width, reason)`: reason 'memory' (the widest that fits) or 'step FLOPs'.
  """
  if backend != 'cpu':
    return widest, 'memory'
  enough = max(1.0, devices * FILL_FLOPS / max(flops_per_run, 1.0))
  fills = devices * math.ceil((1 << int(math.floor(math.log2(enough)))) / devices)
  if fills >= widest:
    return widest, 'memory'
  return fills, 'step FLOPs'


_WARNED: set = set()


def warn_slow_layers(
  init_fn, apply_fn, family: str, layout: layers.Layout | None, x: np.ndarray
) -> list[layers.SlowLayer]:
  """Warns (once per model, layout and backend) about the layers that stay slow under the
  run axis: on every backend those slow on any (`layers.slow_layers` says which)."""
  backend = jax.default_backend()
  key = (init_fn, apply_fn, family in _ENTRYWISE, layout, signature(x), backend)
  try:
    if key in _WARNED:
      return []
    _WARNED.add(key)
  except TypeError:  # unhashable functions: warn every time
    pass
  params = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
  if layout is not None:
    params = jax.eval_shape(layout.to_fast, params)
    apply_fn = layout.rewrite(apply_fn)
  # Matrix products only where the fast layout could serve them: with another optimizer
  # flax's own dense layers would be reported too.
  found = layers.slow_layers(
    apply_fn,
    params,
    batch_spec(x, len(jax.tree.leaves(x)[0])),
    dense=family in _ENTRYWISE,
    backend=backend,
  )
  for slow in found:
    warnings.warn(
      layers.SlowLayerWarning(f'sweep: under the run axis, {slow.message()}'), stacklevel=3
    )
  return found


def plan_units(plan: Plan, model: adapters.Model, eval_chunk: int, warn: bool = True) -> list[Unit]:
  """The units of work: one per optimizer family and chunk of its run axis.

  The run axis of a family is cut into chunks (units) of one width (a power of two, a multiple
  of the local device count) that fits the memory budget and, on a CPU, no wider than
  a step needs to fill the devices (`run_axis_width`); every chunk of a family reuses
  one compiled program, the last one padded.
  """
  cfg = plan.config
  devices = jax.local_device_count()
  budget = memory_budget(cfg) - nbytes((cfg.data.x_train, cfg.data.y_train))
  out = []
  for key in plan.groups:
    family = key[0]
    groups = _layout(plan, key)
    batch_sizes = tuple(g.batch_size for g in groups)
    # Runs drawn from a space: each group as wide as the space needs, whatever the draw.
    needed = [_space_runs(plan) if plan.space else g.slots.shape[1] for g in groups]
    total = max(needed)
    slots_per_column = sum(g.slots.shape[0] for g in groups)
    fits = max(1, budget // max(1, run_bytes(plan, model, family, eval_chunk) * slots_per_column))
    width = min(_bucket(total), 1 << int(math.floor(math.log2(fits))))
    width = devices * math.ceil(width / devices)  # every device gets whole runs
    init_fn, apply_fn = model.pure_functions()
    flops = step_flops(plan, model)
    width, reason = run_axis_width(flops, width, devices, jax.default_backend())
    # A batch group with fewer runs than the widest is laid out no wider than it needs.
    widths = [min(width, devices * math.ceil(_bucket(r) / devices)) for r in needed]
    two = rows(cfg.data.x_train, slice(0, 2))
    layout = fast_layout(init_fn, apply_fn, family, two)
    if warn:
      warn_slow_layers(init_fn, apply_fn, family, layout, two)
    per_device = max(1, width // devices) * max(g.slots.shape[0] for g in groups)
    # A model that draws at evaluation is evaluated in whole chunks (its documented keys).
    eval_width = (
      eval_chunk
      if model.eval_key
      else eval_chunk_width(
        eval_chunk,
        eval_bytes_per_example(plan, init_fn, apply_fn, eval_chunk),
        per_device,
        jax.default_backend(),
      )
    )
    structure = train.Structure(
      model=model,
      loss=plan.loss,
      family=family,
      batch_sizes=batch_sizes,
      steps_per_segment=tuple(
        math.ceil(plan.total_updates[b] / plan.num_evals) for b in batch_sizes
      ),
      steps_per_epoch=tuple(plan.steps_per_epoch[b] for b in batch_sizes),
      eval_batch_size=eval_width,
      ragged=tuple(
        plan.space is not None  # a group of padding alone skips its ticks
        or math.ceil(plan.total_updates[b] / plan.num_evals) * plan.num_evals
        != plan.total_updates[b]
        for b in batch_sizes
      ),
      compute_dtype=cfg.compute_dtype,
      noise_scale=cfg.noise_scale,
      keep_best=cfg.keep_best,
      augment=cfg.augment,
      eval_params=cfg.eval_params,
      ignore_label=cfg.data.ignore_label,
      accuracy=_callable_accuracy(plan),
      schedules=plan.custom_schedules,
      # A schedule callable is built with the runs' parameter updates (see Run.total_updates).
      total_updates=tuple(plan.total_updates[b] // optimizers.every_k(family) for b in batch_sizes)
      if plan.custom_schedules
      else (),
      layout=layout,
    )
    filler = next(r for g in groups for r in g.runs)
    chunks = max(math.ceil(g.slots.shape[1] / w) for g, w in zip(groups, widths, strict=True))
    shared = {'chunks': chunks}
    for index in range(chunks):
      chunk = _chunk(groups, index, widths)
      out.append(
        Unit(
          family,
          structure,
          chunk,
          tuple(_hparams(plan, g, filler) for g in chunk),
          width_reason=reason,
          flops_per_run=flops,
          shared=shared,
        )
      )
  return out


def run_axis_report(units: list[Unit]) -> dict[str, Any]:
  """Per optimizer family: the run-axis width, the chunks, why, and the cost estimate."""
  out = {}
  for unit in units:
    name = str(unit.family)
    if name not in out:
      out[name] = {
        'width': int(unit.groups[0].slots.shape[1]),
        'chunks': 0,
        'chosen_by': unit.width_reason,
        'step_gflop_per_run': float(round(unit.flops_per_run / 1e9, 6)),
        'fast_layout_kernels': len(unit.structure.layout.kernels) if unit.structure.layout else 0,
      }
    out[name]['chunks'] += 1
  return out


def _callable_accuracy(plan: Plan) -> str | None:
  """How to measure the accuracy of a callable loss's runs, from the targets: against
  integer class ids, against one-hot (or probability) rows, or not at all."""
  if isinstance(plan.loss, str):
    return None
  y = plan.config.data.y_train
  if np.issubdtype(y.dtype, np.integer):
    return 'ids'
  if (
    y.ndim == 2 and y.shape[1] > 1 and np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-4)
  ):
    return 'onehot'
  return None


def diverged(unit: Unit, metrics: tuple[dict, ...]) -> int:
  return sum(
    int(np.sum(~m['alive'][g.slots >= 0])) for g, m in zip(unit.groups, metrics, strict=True)
  )
