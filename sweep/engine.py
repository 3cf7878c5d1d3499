"""The orchestration shell: validate, lay runs out on the device, step segments, collect.

Python runs between segments only (progress, metrics, curves); every tick of every run
happens inside the one compiled `kernels.train.segment` program of a compile group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm
from flax import nnx

from kernels import losses, optimizers, schedules, train
from sweep import adapters, checkpoints, distributed, layers, models, preflight
from sweep.config import Plan, Run, SweepConfig, check_callables, validate
from sweep.data import aligned
from sweep.errors import ConfigError, config_error


@functools.lru_cache(maxsize=64)
def _cached_model(model, x_shape, x_dtype, output_dim, train_argument):
  return adapters.adapt(model, np.zeros(x_shape, x_dtype), output_dim, train_argument)


def model_of(cfg: SweepConfig, output_dim: int) -> adapters.Model:
  """The `adapters.Model` of `cfg.model`; the same object for an equal model, so that a
  second sweep of the same model finds its programs already compiled."""
  model, example_x = cfg.model, cfg.data.x_train[:1]
  # An nnx instance or a Keras model hashes by identity yet its values can change in
  # place: never cache them.
  if isinstance(model, nnx.Module) or type(model).__module__.startswith('keras'):
    return adapters.adapt(model, example_x, output_dim, cfg.train_argument)
  try:
    hash(model)
  except TypeError:
    return adapters.adapt(model, example_x, output_dim, cfg.train_argument)
  return _cached_model(model, example_x.shape, str(example_x.dtype), output_dim, cfg.train_argument)


def model_functions(model, example_x: np.ndarray, output_dim: int) -> tuple[Callable, Callable]:
  """`(init_fn, apply_fn)` of a model without state other than its parameters."""
  return models.to_functions(model, example_x, output_dim)


@dataclasses.dataclass(frozen=True)
class _Failure:
  message: str
  error: Exception


@functools.lru_cache(maxsize=64)
def _output_shape(model: adapters.Model, x_shape: tuple[int, ...], x_dtype: str) -> Any:
  """The shape of the model's predictions in training and evaluation mode, traced without
  compiling (memoised: flax traces slowly), or the `_Failure` of the user's model."""
  try:
    # The key is made inside eval_shape: made eagerly, it would compile.
    params, state = model.initial_shapes()
  except Exception as e:  # a user's init_fn may fail in any way: report it as theirs.
    return _Failure(f'init_fn(key) failed: {e}', e)
  x = jax.ShapeDtypeStruct(x_shape, x_dtype)
  try:
    pred, new_state = jax.eval_shape(
        lambda p, s, x: model.apply(p, s, x, True, jax.random.key(0)), params, state, x
    )
  except Exception as e:
    return _Failure(f'apply_fn(params, x) failed in training mode on input of shape {x_shape}: {e}', e)
  same = jax.tree.structure(new_state) == jax.tree.structure(state) and all(
      (a.shape, a.dtype) == (b.shape, b.dtype)
      for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True)
  )
  if not same:
    return _Failure('training changes the structure or shapes of the model state (variables other than params)', None)
  try:
    traced = jax.jit(lambda p, s, x: model.apply(p, s, x, False, None)[0]).trace(params, state, x)
  except Exception as e:
    return _Failure(f'apply_fn(params, x) failed in evaluation mode on input of shape {x_shape}: {e}', e)
  evaluated = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), traced.out_info)
  _PROBABILITIES[(model, x_shape, x_dtype)] = _ends_in_softmax(traced.jaxpr.jaxpr)
  if not isinstance(pred, jax.ShapeDtypeStruct) or not isinstance(evaluated, jax.ShapeDtypeStruct):
    return _Failure('the model must return one array', None)
  if pred.shape != evaluated.shape:
    return _Failure(
        f'the model returns {pred.shape} in training mode but {evaluated.shape} in evaluation mode', None
    )
  return pred


_PROBABILITIES: dict = {}  # (model, x shape, x dtype) -> whether its outputs end in a softmax


def _ends_in_softmax(jaxpr) -> bool:
  """Whether a jaxpr's one output is `exp(z) / sum(exp(z))` (its outputs are probabilities),
  read off the equations that make it: a div of an exp by a broadcast sum of that exp."""
  producer = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  if len(jaxpr.outvars) != 1 or id(jaxpr.outvars[0]) not in producer:
    return False
  last = producer[id(jaxpr.outvars[0])]
  if last.primitive.name != 'div':
    return False
  numerator, denominator = last.invars
  if getattr(producer.get(id(numerator)), 'primitive', None) is None or producer[id(numerator)].primitive.name != 'exp':
    return False
  eqn = producer.get(id(denominator))
  while eqn is not None and eqn.primitive.name in ('broadcast_in_dim', 'reshape', 'expand_dims', 'convert_element_type'):
    eqn = producer.get(id(eqn.invars[0]))
  return eqn is not None and eqn.primitive.name == 'reduce_sum' and eqn.invars[0] is numerator


def _check_model(plan: Plan, model: adapters.Model) -> None:
  """Traces (without compiling) one init and one forward pass to check shapes."""
  cfg = plan.config
  data = cfg.data
  x, y = data.x_train[:2], data.y_train[:2]
  pred = _output_shape(model, x.shape, str(x.dtype))
  if isinstance(pred, _Failure):
    raise config_error('model', model.name, pred.message) from pred.error
  if cfg.noise_scale and model.stateful:
    raise config_error(
        'noise_scale', True,
        'models with state other than parameters (batch statistics) are not supported: the '
        'noise scale splits each batch in two halves, which would each have statistics of their own',
    )
  if cfg.augment is not None:
    _check_augment(cfg.augment, min(plan.batch_sizes), x)
  probabilities = adapters.keras_ends_in_softmax(cfg.model) or _PROBABILITIES.get((model, x.shape, str(x.dtype)))
  if isinstance(plan.loss, str) and plan.loss == 'softmax_cross_entropy' and probabilities:
    raise config_error(
        'loss', plan.loss,
        "the model's outputs are probabilities (its last operation is a softmax), and "
        'softmax_cross_entropy applies another softmax to them; return logits (drop the last '
        'softmax), or pass a loss on probabilities (for Keras, the Keras loss itself, e.g. '
        'loss=keras.losses.CategoricalCrossentropy())',
    )
  is_int = np.issubdtype(y.dtype, np.integer)
  if isinstance(plan.loss, str):
    problem = losses.check_shapes(plan.loss, tuple(pred.shape), tuple(y.shape), is_int)
    if problem and plan.loss == 'softmax_cross_entropy' and not is_int and np.all(np.mod(data.y_train, 1) == 0):
      problem += ('; the targets are whole numbers: class ids are given as integers, e.g. '
                  'sweep.data.arrays(x, y.astype(np.int32))')
    if problem:
      raise config_error('model', f'outputs of shape {tuple(pred.shape)}', problem)
    for field, labels in (('data.y_train', data.y_train), ('data.y_val', data.y_val)):
      if labels is not None and data.ignore_label is not None:
        labels = labels[labels != data.ignore_label]
      if labels is None or not len(labels):
        continue
      problem = losses.check_labels(plan.loss, labels, int(pred.shape[-1]) if pred.ndim else 1)
      if problem:
        raise config_error(field, f'labels in [{float(labels.min()):g}, {float(labels.max()):g}]', problem)
  else:
    try:
      out = jax.eval_shape(plan.loss, pred, jax.ShapeDtypeStruct(y.shape, y.dtype))
    except Exception as e:
      raise config_error('loss', plan.loss, f'loss(predictions, targets) failed: {e}') from e
    if isinstance(out, tuple | list) and len(out) == 2:
      if getattr(out[1], 'shape', None) != (len(y),):
        raise config_error(
            'loss', plan.loss,
            'a callable loss returning (loss, accuracy) must give one accuracy per example, '
            f'shape (batch,); got {getattr(out[1], "shape", out[1])}',
        )
      out = out[0]
    if getattr(out, 'shape', None) != (len(y),):
      raise config_error(
          'loss', plan.loss,
          f'a callable loss must return one value per example, shape (batch,); got {getattr(out, "shape", out)}',
      )


def _check_augment(augment: Callable, batch: int, x: np.ndarray) -> None:
  """Traces `augment(key, x_batch)` (compiling nothing): it must return one array of the
  batch's shape and dtype."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  xb = jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype)
  name = getattr(augment, '__qualname__', type(augment).__name__)
  try:
    out = jax.eval_shape(augment, key, xb)
  except Exception as e:  # the researcher's function: report it as theirs
    raise config_error(
        'augment', name, f'augment(key, x_batch) failed on a key and a batch of shape {xb.shape} ({type(e).__name__}: {e})'
    ) from e
  if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != (xb.shape, xb.dtype):
    got = (out.shape, str(out.dtype)) if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
    raise config_error(
        'augment', name, f'augment(key, x_batch) must return one array of the batch\'s shape and dtype '
        f'{(xb.shape, str(xb.dtype))}; got {got}',
    )


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
class CompileGroup:
  family: str | optimizers.Factory
  structure: train.Structure
  groups: list[BatchGroup]
  hparams: tuple[train.GroupHparams, ...]
  width_reason: str = 'memory'  # what chose the run-axis width: 'memory' or 'step FLOPs'
  flops_per_run: float = 0.0  # FLOPs of one run's step (`step_flops`)
  # Shared by the chunks of one family: their seeds' initial parameters and metrics.
  shared: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def _layout(plan: Plan, key) -> list[BatchGroup]:
  """Every batch group of compile group `key`, its runs laid out (S, R) with R unpadded.

  The seeds of a batch group are those its runs use; a seed with fewer runs than another
  (runs that are no product of the axes) leaves padding slots (-1) in its row.
  """
  mine = [r for r in plan.runs if r.group == key]
  out = []
  for b in sorted({r.values['batch_size'] for r in mine}):
    runs = [r for r in mine if r.values['batch_size'] == b]
    seeds = list(dict.fromkeys(r.values['seed'] for r in runs))
    per_seed = [[r for r in runs if r.values['seed'] == s] for s in seeds]
    slots = np.full((_bucket(len(seeds)), max(len(rs) for rs in per_seed)), -1, np.int64)
    for si, rs in enumerate(per_seed):
      slots[si, : len(rs)] = [r.index for r in rs]
    out.append(BatchGroup(batch_size=b, seeds=seeds, slots=slots, runs=runs))
  return out


def _chunk(groups: list[BatchGroup], start: int, widths: list[int]) -> list[BatchGroup]:
  """Slots [start, start + width) of the run axis of every batch group, padded with -1.

  A batch group narrower than the chunk (`widths` holds each group's width) lies whole in
  the first chunk and is padding in the others.
  """
  out = []
  for g, width in zip(groups, widths, strict=True):
    slots = np.full((g.slots.shape[0], width), -1, np.int64)
    part = g.slots[:, start:start + width]
    slots[:, : part.shape[1]] = part
    idx = set(int(i) for i in part.ravel() if i >= 0)
    out.append(BatchGroup(g.batch_size, g.seeds, slots, [r for r in g.runs if r.index in idx]))
  return out


def host_ram() -> int:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return 8 << 30


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


def enable_compilation_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache, so a second process compiles nothing.

  Args:
    directory: where compiled programs are kept; default `$SWEEP_CACHE_DIR`, else
      `~/.cache/sweep/jax`.

  Returns:
    The directory used.
  """
  directory = directory or os.environ.get('SWEEP_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'sweep', 'jax'
  )
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  # Every program of a sweep is worth keeping: the defaults skip fast compiles.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def set_cpu_devices(count: int | None = None) -> bool:
  """Splits the host CPU into `count` JAX devices (default: one per core).

  XLA's CPU backend runs a program on one device, which spreads a single matrix
  product over the cores but leaves them idle between the small kernels of a step
  like the seed MLP's. With one device per core the engine shards its run axis over
  them and the shards run side by side: the seed MLP, 64 learning rates at batch 32,
  trained 1.35x faster on 2 cores than with one device (scripts/bench.py). It changes
  nothing on GPU or TPU, whose devices the engine uses.

  Like `numpyro.set_host_device_count`, it must be called before JAX runs anything
  (`sweep run` calls it first). A device count the user set already (XLA_FLAGS'
  `--xla_force_host_platform_device_count`, or `jax_num_cpu_devices`) is kept.

  Args:
    count: CPU devices wanted; default, the cores this process may use.

  Returns:
    Whether the count was set: False when JAX had started or the user set one.
  """
  if count is None:
    count = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise config_error('count', count, 'a positive integer')
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return False
  if jax.config.jax_num_cpu_devices != -1:
    return False
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # JAX's backends are up: too late to change the device count
    return False
  return True


def run_bytes(plan: Plan, model: adapters.Model, family: str, eval_chunk: int) -> int:
  """Memoised `_run_bytes` (it traces the model twice)."""
  key = (model, plan.loss, family, eval_chunk, max(plan.batch_sizes), plan.config.keep_best,
         plan.config.data.x_train.shape[1:], str(plan.config.data.x_train.dtype),
         plan.config.data.y_train.shape[1:], str(plan.config.data.y_train.dtype))
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
  opt_state = jax.eval_shape(lambda p: optimizers.make(family, hypers).init(p), params)
  structure = train.Structure(
      model=model, loss=plan.loss, family=family, batch_sizes=(), steps_per_segment=(),
      steps_per_epoch=(), eval_batch_size=eval_chunk, ignore_label=data.ignore_label,
  )

  def intermediates(batch: int, grad: bool) -> int:
    x = jax.ShapeDtypeStruct((batch,) + data.x_train.shape[1:], data.x_train.dtype)
    y = jax.ShapeDtypeStruct((batch,) + data.y_train.shape[1:], data.y_train.dtype)

    def f(p, s, x, y):
      pred, new_state = structure.forward(p, s, x, grad, jax.random.key(0) if grad else None)
      return jnp.mean(structure.metrics(pred, y)[0]), new_state

    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, has_aux=True) if grad else f)(params, model_state, x, y)
    return sum(
        int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
        for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, 'shape')
    )

  # params, gradient, update, new params; optimizer and model state
  state = 4 * size(params) + size(opt_state) + 2 * size(model_state)
  if plan.config.keep_best:
    state += size(params) + size(model_state)
  return state + max(intermediates(max(plan.batch_sizes), True), intermediates(eval_chunk, False))


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
                run.schedule, v['learning_rate'], run.total_updates,
                decay_rate=v['decay_rate'], decay_every=cfg.decay_every, warmup=v['warmup'],
            )
        )
      else:
        sched_row.append(schedules.custom_params(custom[id(run.schedule)], v['learning_rate'], run.total_updates))
      opt_row.append({k: np.float32(x) for k, x in run.hypers.items()})
    sched.append(sched_row)
    opt.append(opt_row)
  stack = lambda rows: jax.tree.map(lambda *xs: np.stack(xs), *[jax.tree.map(lambda *ys: np.stack(ys), *r) for r in rows])  # noqa: E731
  seeds = np.array(group.seeds + [group.seeds[0]] * (group.slots.shape[0] - len(group.seeds)), np.int32)
  return train.GroupHparams(
      runs=train.RunHparams(schedule=stack(sched), opt=stack(opt)),
      seeds=seeds,
      total_updates=np.int32(plan.total_updates[group.batch_size]),
  )


def _device_data(cfg: SweepConfig, chunk: int, shardings) -> train.Data:
  """The datasets on the device(s): on every device the run axis is split over."""
  data = cfg.data

  def padded(x, y):
    pad = (-len(x)) % chunk
    if data.ignore_label is not None:
      # Labels to ignore: each example weighs its real labels (tokens), so that evaluation
      # losses and accuracies are per label, and an example with none does not count.
      real = (y != data.ignore_label).reshape(len(y), -1).sum(axis=1).astype(np.float32)
    else:
      real = np.ones(len(x), np.float32)
    w = np.concatenate([real, np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x
    y = np.concatenate([y, np.repeat(y[:1], pad, axis=0)]) if pad else y
    return x, y, w

  n = data.n_train
  probe = np.sort(np.random.default_rng(0).permutation(n)[: min(n, cfg.train_eval_size)])
  xp, yp, wp = padded(data.x_train[probe], data.y_train[probe])
  if data.x_val is not None and len(data.x_val):
    xv, yv, wv = padded(data.x_val, data.y_val)
  else:
    xv, yv, wv = data.x_train[:0], data.y_train[:0], np.zeros(0, np.float32)
  # Placed where the programs read it (a copy of the training set per device), rather
  # than on one device and copied again by the first call.
  # Aligned host arrays go in without a copy on CPU (see `sweep.data.aligned`); the
  # datasets of `sweep.data` are aligned when built.
  placement = None if shardings is None else shardings[1]
  arrays = train.Data(data.x_train, data.y_train, xv, yv, wv, xp, yp, wp)
  return jax.device_put(jax.tree.map(aligned, arrays), placement)


# Optimizers whose update of each parameter entry depends on that entry alone (or on
# global norms): transposing a weight commutes with them, so their state may be held
# in the fast layout of `sweep.layers`.
_ENTRYWISE = frozenset({'sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop', 'adagrad', 'lion'})


def fast_layout(init_fn, apply_fn, family: str, x: np.ndarray) -> layers.Layout | None:
  """The `sweep.layers.Layout` of a model's dense kernels under `family`, or None."""
  if family not in _ENTRYWISE:
    return None
  try:
    return _fast_layout(init_fn, apply_fn, tuple(x.shape), str(x.dtype))
  except TypeError:  # unhashable functions
    return _fast_layout.__wrapped__(init_fn, apply_fn, tuple(x.shape), str(x.dtype))


@functools.lru_cache(maxsize=64)
def _fast_layout(init_fn, apply_fn, x_shape, x_dtype) -> layers.Layout | None:
  params = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
  return layers.plan_layout(apply_fn, params, jax.ShapeDtypeStruct(x_shape, x_dtype))


def step_flops(plan: Plan, model: adapters.Model) -> float:
  """FLOPs of one run's training step at the largest batch size (its matrix products and
  convolutions, forward and backward), counted in its jaxpr; memoised."""
  data = plan.config.data
  key = (model, plan.loss, max(plan.batch_sizes), data.x_train.shape[1:],
         str(data.x_train.dtype), data.y_train.shape[1:], str(data.y_train.dtype))
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
      model=model, loss=plan.loss, family='sgd', batch_sizes=(), steps_per_segment=(), steps_per_epoch=(),
      eval_batch_size=1, ignore_label=data.ignore_label,
  )
  batch = max(plan.batch_sizes)
  x = jax.ShapeDtypeStruct((batch,) + data.x_train.shape[1:], data.x_train.dtype)
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
  key = (init_fn, apply_fn, chunk, data.x_train.shape[1:], str(data.x_train.dtype))
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
  x = jax.ShapeDtypeStruct((chunk,) + data.x_train.shape[1:], data.x_train.dtype)
  jaxpr = jax.make_jaxpr(lambda p, x: apply_fn(p, x))(params, x).jaxpr
  # Only what depends on the parameters is made once per run: the rest (the input, its
  # windows for a first convolution) is shared by the runs reading the same chunk.
  per_run = set(jaxpr.invars[: len(jax.tree.leaves(params))])
  total = 0
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jax.extend.core.Literal) and v in per_run for v in eqn.invars):
      per_run.update(eqn.outvars)
      total += sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in eqn.outvars if hasattr(v.aval, 'shape'))
  return total / chunk


# On a CPU, an evaluation chunk is cut so that its intermediates, over the runs of a
# device, stay about this size: the flax MNIST CNN evaluated 1024 examples at a time for
# 8 runs a device made 300 MB of input windows, and ran at a third of its training rate.
EVAL_CHUNK_BYTES = 16 << 20


def eval_chunk_width(chunk: int, bytes_per_example: float, runs_per_device: int, backend: str) -> int:
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


def run_axis_width(flops_per_run: float, widest: int, devices: int, backend: str) -> tuple[int, str]:
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


def warn_slow_layers(init_fn, apply_fn, family: str, layout: layers.Layout | None,
                     x: np.ndarray) -> list[layers.SlowLayer]:
  """Warns (once per model and layout) about the layers that stay slow under the run axis.

  The estimates were measured on a CPU, so only a CPU backend warns.
  """
  if jax.default_backend() != 'cpu':
    return []
  key = (init_fn, apply_fn, family in _ENTRYWISE, layout, x.shape[1:], str(x.dtype))
  try:
    if key in _WARNED:
      return []
    _WARNED.add(key)
  except TypeError:  # unhashable functions: warn every time
    pass
  params = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
  if layout is not None:
    params = jax.eval_shape(layout.to_fast, params)
  # Matrix products only where the fast layout could serve them: with another optimizer
  # flax's own dense layers would be reported too.
  found = layers.slow_layers(apply_fn, params, jax.ShapeDtypeStruct(x.shape, x.dtype), dense=family in _ENTRYWISE)
  for slow in found:
    warnings.warn(layers.SlowLayerWarning(f'sweep: under the run axis, {slow.message()}'), stacklevel=3)
  return found


def compile_groups(plan: Plan, model: adapters.Model, eval_chunk: int, warn: bool = True) -> list[CompileGroup]:
  """The units of work: one per optimizer family and chunk of its run axis.

  The run axis of a family is cut into chunks of one width (a power of two, a multiple
  of the local device count) that fits the memory budget and, on a CPU, no wider than
  a step needs to fill the devices (`run_axis_width`); every chunk of a family reuses
  one compiled program, the last one padded.
  """
  cfg = plan.config
  devices = jax.local_device_count()
  budget = memory_budget(cfg) - sum(a.nbytes for a in (cfg.data.x_train, cfg.data.y_train))
  out = []
  for key in plan.groups:
    family = key[0]
    groups = _layout(plan, key)
    batch_sizes = tuple(g.batch_size for g in groups)
    total = max(g.slots.shape[1] for g in groups)
    slots_per_column = sum(g.slots.shape[0] for g in groups)
    fits = max(1, budget // max(1, run_bytes(plan, model, family, eval_chunk) * slots_per_column))
    width = min(_bucket(total), 1 << int(math.floor(math.log2(fits))))
    width = devices * math.ceil(width / devices)  # every device gets whole runs
    init_fn, apply_fn = model.pure_functions()
    flops = step_flops(plan, model)
    width, reason = run_axis_width(flops, width, devices, jax.default_backend())
    # A batch group with fewer runs than the widest is laid out no wider than it needs.
    widths = [min(width, devices * math.ceil(_bucket(g.slots.shape[1]) / devices)) for g in groups]
    layout = fast_layout(init_fn, apply_fn, family, cfg.data.x_train[:2])
    if warn:
      warn_slow_layers(init_fn, apply_fn, family, layout, cfg.data.x_train[:2])
    per_device = max(1, width // devices) * max(g.slots.shape[0] for g in groups)
    eval_width = eval_chunk_width(
        eval_chunk, eval_bytes_per_example(plan, init_fn, apply_fn, eval_chunk), per_device, jax.default_backend()
    )
    structure = train.Structure(
        model=model,
        loss=plan.loss,
        family=family,
        batch_sizes=batch_sizes,
        steps_per_segment=tuple(math.ceil(plan.total_updates[b] / plan.num_evals) for b in batch_sizes),
        steps_per_epoch=tuple(plan.steps_per_epoch[b] for b in batch_sizes),
        eval_batch_size=eval_width,
        ragged=tuple(
            math.ceil(plan.total_updates[b] / plan.num_evals) * plan.num_evals != plan.total_updates[b]
            for b in batch_sizes
        ),
        compute_dtype=cfg.compute_dtype,
        noise_scale=cfg.noise_scale,
        keep_best=cfg.keep_best,
        augment=cfg.augment,
        ignore_label=cfg.data.ignore_label,
        accuracy=_callable_accuracy(plan),
        schedules=plan.custom_schedules,
        total_updates=tuple(plan.total_updates[b] for b in batch_sizes) if plan.custom_schedules else (),
        layout=layout,
    )
    filler = groups[0].runs[0]
    shared = {'chunks': math.ceil(total / width)}
    for start in range(0, total, width):
      chunk = _chunk(groups, start, widths)
      out.append(CompileGroup(family, structure, chunk, tuple(_hparams(plan, g, filler) for g in chunk),
                              width_reason=reason, flops_per_run=flops, shared=shared))
  return out


def run_axis_report(cgroups: list[CompileGroup]) -> dict[str, Any]:
  """Per optimizer family: the run-axis width, the chunks, why, and the cost estimate."""
  out = {}
  for cg in cgroups:
    name = str(cg.family)
    if name not in out:
      out[name] = {
          'width': int(cg.groups[0].slots.shape[1]),
          'chunks': 0,
          'chosen_by': cg.width_reason,
          'step_gflop_per_run': float(round(cg.flops_per_run / 1e9, 6)),
          'fast_layout_kernels': len(cg.structure.layout.kernels) if cg.structure.layout else 0,
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
  if y.ndim == 2 and y.shape[1] > 1 and np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-4):
    return 'onehot'
  return None


def _run_sharding() -> tuple[Any, Any] | None:
  """Shardings that split the run axis (axis 1) over the local devices, if several."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  mesh = jax.sharding.Mesh(np.array(devices), ('runs',))
  P = jax.sharding.PartitionSpec  # noqa: N806
  return jax.sharding.NamedSharding(mesh, P(None, 'runs')), jax.sharding.NamedSharding(mesh, P())


def _shard(tree: Any, shardings) -> Any:
  """Places leaves with a run axis (ndim >= 2) split over devices, the rest replicated
  (with one device: on it, where host arrays, such as a restored state, would otherwise
  be copied again at every call)."""
  if shardings is None:
    return jax.device_put(tree)
  runs, replicated = shardings
  placements = jax.tree.map(lambda a: runs if np.ndim(a) >= 2 else replicated, tree)
  return jax.device_put(tree, placements)  # one call: far faster than one per leaf


def _diverged(cg: CompileGroup, metrics: tuple[dict, ...]) -> int:
  return sum(int(np.sum(~m['alive'][g.slots >= 0])) for g, m in zip(cg.groups, metrics, strict=True))


@functools.lru_cache(maxsize=64)
def _jitted_init(init_fn):
  # With a leading seed axis: one seed (the common case) needs no stacking op, which
  # would compile a program of its own for every parameter shape.
  return train.jit(lambda key: jax.tree.map(lambda a: a[None], init_fn(key)))


def _per_seed_params(model: adapters.Model, cg: CompileGroup) -> tuple[Any, ...]:
  """Each batch group's initial (parameters, model state), one per seed slot (S, ...).

  Initialised seed by seed with a plain jitted init_fn: XLA compiles a vmapped
  random-number generator several times slower, and seeds are few.
  """
  init = _jitted_init(model.init)
  cache = cg.shared.setdefault('params', {})  # every chunk of a family starts from the same seeds
  out = []
  for hp in cg.hparams:
    per_seed = []
    for seed in np.asarray(hp.seeds).tolist():
      if seed not in cache:
        cache[seed] = init(train.init_key_jit(np.int32(seed)))
      per_seed.append(cache[seed])
    if len(per_seed) == 1:
      out.append(per_seed[0])
    else:  # on the host: a device concatenate compiles per parameter shape
      out.append(jax.tree.map(lambda *xs: np.concatenate([np.asarray(a) for a in xs]), *per_seed))
  return tuple(out)


def _start(model: adapters.Model, cg: CompileGroup, hparams, data: train.Data):
  """`train.start` of a unit: its initial state and metrics.

  The chunks of a family share their seed slots, so their initial metrics (each seed's
  initial parameters evaluated) are equal: with three chunks or more, the first chunk
  evaluates and the others only initialise, a program of its own that two evaluations
  saved repay (for the 1M-parameter MLP in 8 chunks, the initial evaluations were 10 %
  of the sweep).
  """
  params = _per_seed_params(model, cg)
  seeds = tuple(tuple(np.asarray(hp.seeds).tolist()) for hp in cg.hparams)
  if cg.shared.get('chunks', 0) >= 3 and cg.shared.get('first', (None,))[0] == seeds:
    return train.init_jit(cg.structure, params, hparams), cg.shared['first'][1]
  state, first = train.start_jit(cg.structure, params, hparams, data)
  cg.shared['first'] = (seeds, first)
  return state, first


class _OrderBook:
  """The data orders each batch group reads in each segment, made between segments.

  The permutations are drawn by a small jitted function, seed by seed and epoch by
  epoch, and handed to the segment as data: the segment program holds no random
  number generator, which keeps its compile short.
  """

  def __init__(self, plan: Plan, cg: CompileGroup):
    self.n = plan.config.data.n_train
    self.shuffle = plan.config.shuffle
    self.plan = plan
    self.cg = cg
    self._cache: dict[tuple[int, int], jax.Array] = {}
    self.spans = []  # per batch group: per segment (first epoch, epochs spanned)
    for b, length in zip(cg.structure.batch_sizes, cg.structure.steps_per_segment, strict=True):
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
        self._cache[seed, epoch] = np.asarray(train.epoch_order_jit(np.int32(seed), np.int32(epoch), self.n))
      else:
        self._cache[seed, epoch] = np.arange(self.n, dtype=np.int32)
    return self._cache[seed, epoch]

  def segment(self, k: int) -> tuple[train.Orders, ...]:
    out = []
    for g, hp in enumerate(self.cg.hparams):
      first, _ = self.spans[g][k]
      seeds = np.asarray(hp.seeds).tolist()
      orders = np.stack([
          np.stack([self._order(sd, first + e) for e in range(self.width[g])]) for sd in seeds
      ])
      out.append(train.Orders(orders=orders, first_epoch=np.int32(first)))
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
    self.active = active  # without a workdir there is nowhere to save: the signals stay as they were
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
      print('sweep: SIGINT received; saving at the end of this segment (Ctrl-C again stops at once)',
            file=sys.stderr, flush=True)
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
    if not self.keep_opt_state:
      # Without a workdir only the parameters are ever read again: the optimizer state
      # (two thirds of Adam's bytes) is not even copied.
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
      return checkpoints.Final(path=checkpoints.done_path(self.workdir, c), abstract=jax.eval_shape(lambda: host))
    return checkpoints.Final()


def _history_to_json(history: list) -> list:
  return [[{k: np.asarray(v).tolist() for k, v in m.items()} for m in point] for point in history]


def _history_from_json(history: list) -> list:
  return [tuple({k: np.asarray(v) for k, v in m.items()} for m in point) for point in history]


def _abstract_state(cg: CompileGroup, model: adapters.Model) -> Any:
  per_seed = tuple(
      jax.tree.map(
          lambda a, n=hp.seeds.shape[0]: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype),
          model.initial_shapes(),
      )
      for hp in cg.hparams
  )
  return jax.eval_shape(functools.partial(train.init, cg.structure), per_seed, cg.hparams)


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

  Raises:
    ConfigError: a mistake in `cfg`, or a workdir holding another sweep (the message
      names what differs).
    sweep.files.DiskFull: the workdir's disk is full (partial files removed; a rerun
      resumes).
    SystemExit: on SIGTERM or SIGINT, after the state is saved (exit status 143 or 130).
  """
  with checkpoints.disk_full_guard(workdir):
    return _run(cfg, workdir, progress, fresh, checkpoint_every, checkpoint_seconds, experiment_file,
                keep_checkpoints)


def _run(cfg, workdir, progress, fresh, checkpoint_every, checkpoint_seconds, experiment_file, keep_checkpoints):
  from sweep import fingerprint, results  # a cycle: results formats what this module produces

  if workdir is not None:
    checkpoints.check_workdir(workdir)
  plan = validate(cfg)
  data = cfg.data
  model = model_of(cfg, plan.output_dim)
  _check_model(plan, model)
  check_callables(plan, model)
  preflight.check(plan)
  if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
    raise config_error('checkpoint_every', checkpoint_every, 'expected a positive integer')
  if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
    raise config_error('keep_checkpoints', keep_checkpoints, 'expected a positive integer (2 or more to fall back)')

  sizes = [min(cfg.train_eval_size, data.n_train)] + ([data.n_val] if data.n_val else [])
  eval_chunk = min(cfg.eval_batch_size, max(sizes))
  # Slow-layer warnings come after the workdir check: a refused rerun says one thing.
  cgroups = compile_groups(plan, model, eval_chunk, warn=False)
  # Every field; with a workdir the data's content is hashed too (once), for the fingerprint.
  fields = fingerprint.config_fields(cfg, content=workdir is not None)
  resolved = results.resolved_config(plan, experiment_file, fields)
  resolved['run_axis'] = run_axis_report(cgroups)

  processes, me = jax.process_count(), jax.process_index()
  store, point, digest = None, checkpoints.Resume(), None
  if workdir is not None:
    # Every process checks the workdir (so all refuse another sweep alike); process 0
    # clears it (fresh) and claims it, before any process writes there.
    fp = fingerprint.of_sweep(plan, cgroups, lambda key: model.init(key)[0], resolved['environment'], fields)
    digest = resolved['fingerprint'] = fp.digest
    checkpoints.claim(workdir, fp, fresh, write=me == 0)
    distributed.barrier('sweep-claim')
    # Several processes: each trains its own units and checkpoints them in a directory of
    # its own; process 0 writes the results. Only intact checkpoints are used.
    store = checkpoints.open_state(workdir, keep_checkpoints)
    mine = [c for c in range(len(cgroups)) if distributed.owner(c) == me]
    point = checkpoints.resume(store, workdir, mine, digest, lambda c: _abstract_state(cgroups[c], model))

  init_fn, apply_fn = model.pure_functions()
  # The layers that stay slow, for the units left to train (a finished sweep read again says nothing).
  left = [cg for c, cg in enumerate(cgroups) if c not in point.finished and distributed.owner(c) == me]
  for family, layout in dict.fromkeys((cg.family, cg.structure.layout) for cg in left):
    warn_slow_layers(init_fn, apply_fn, family, layout, data.x_train[:2])
  shardings = _run_sharding()
  device_data = _device_data(cfg, eval_chunk, shardings)
  threshold = jnp.float32(cfg.divergence_threshold)
  ticks = sum(sum(cg.structure.steps_per_segment) * plan.num_evals for cg in cgroups)
  bar = tqdm.tqdm(total=ticks, desc=f'{len(plan.runs)} runs', unit='tick', disable=not progress, leave=False)
  keep = _Keeper(keep_budget(cfg), workdir, keep_opt_state=workdir is not None)

  collected = []  # (unit, final state, history, seconds, unit index): this process's units
  for c, meta in sorted(point.finished.items()):
    final = checkpoints.Final(path=checkpoints.done_path(workdir, c), abstract=_abstract_state(cgroups[c], model))
    collected.append((cgroups[c], final, _history_from_json(meta['history']), meta['seconds'], c))
    bar.update(sum(cgroups[c].structure.steps_per_segment) * plan.num_evals)
  # The unit in progress first, then the others in order (a damaged finished unit among them).
  todo = [c for c in range(len(cgroups)) if c not in point.finished and c != point.unit]
  if point.unit is not None:
    todo.insert(0, point.unit)
    bar.update(sum(cgroups[point.unit].structure.steps_per_segment) * point.segment)

  step = point.step
  start = time.perf_counter() - point.seconds - sum(m['seconds'] for m in point.finished.values())
  last_save = time.perf_counter()
  try:
    with _SigtermFlag(active=store is not None) as sigterm:
      for c in todo:
        if distributed.owner(c) != me:
          continue
        cg = cgroups[c]
        t0 = time.perf_counter()
        orders = _OrderBook(plan, cg)
        hparams = _shard(cg.hparams, shardings)
        k0 = point.segment if c == point.unit else 0
        if c == point.unit and k0 > 0:
          state = _shard(point.state, shardings)
          history = _history_from_json(point.history)
          t0 -= point.seconds
        else:
          k0 = 0
          state, first = _start(model, cg, hparams, device_data)
          state = _shard(state, shardings)
          if cg.structure.keep_best:
            state = train.note_best_jit(cg.structure, state, first)
          history = [jax.device_get(first)]
        for k in range(k0, plan.num_evals):
          state, metrics = train.segment_jit(cg.structure, state, hparams, orders.segment(k), device_data, threshold)
          history.append(jax.device_get(metrics))
          step += 1
          bar.update(sum(cg.structure.steps_per_segment))
          bar.set_postfix(diverged=_diverged(cg, history[-1]), refresh=False)
          finished = k == plan.num_evals - 1
          if finished:
            done = {'fingerprint': digest, 'unit': c, 'step': step, 'history': _history_to_json(history),
                    'seconds': time.perf_counter() - t0}
            final = keep(c, state, done)
          due = (
              step % checkpoint_every == 0
              or (checkpoint_seconds is not None and time.perf_counter() - last_save >= checkpoint_seconds)
              or sigterm.raised
              or finished
          )
          if store is not None and due:
            # The unit in progress and where it stands; finished units are in done/.
            meta = {
                'fingerprint': digest,
                'unit': None if finished else c,
                'segment': 0 if finished else k + 1,
                'history': None if finished else _history_to_json(history),
                'unit_seconds': time.perf_counter() - t0,
            }
            store.save(step, None if finished else state, meta)
            last_save = time.perf_counter()
          if sigterm.raised:
            raise _Preempted
        collected.append((cg, final, history, done['seconds'], c))
  except _Preempted:
    bar.close()
    store.close()
    print(f'sweep: {sigterm.name} received; state saved at segment {step} in {workdir}. '
          'Run the same command again to resume.', file=sys.stderr)
    raise SystemExit(sigterm.exit_code) from None
  except BaseException:
    if store is not None:
      store.abandon()  # a write in flight ends (or fails) before the error is handled
    raise
  finally:
    bar.close()
  if store is not None:
    store.close()

  if processes > 1:
    # Every process gets every unit's history and final state, in unit order.
    mine = [(c, f.get(), h, sec) for _, f, h, sec, c in collected]
    everything = sorted((x for part in distributed.allgather_objects(mine) for x in part), key=lambda x: x[0])
    collected = [(cgroups[c], checkpoints.Final(state=st), h, sec, c) for c, st, h, sec in everything]
  collected = [entry[:4] for entry in sorted(collected, key=lambda entry: entry[4])]
  result = results.Result.from_training(plan, collected, time.perf_counter() - start, resolved, model)
  if workdir is not None and me == 0:
    result.save(workdir)
    result.save_front(workdir, collected)
    if experiment_file is not None:
      with open(experiment_file, 'rb') as f:
        results.write_if_changed(os.path.join(workdir, 'experiment.py'), f.read())
  return result


def check(cfg: SweepConfig) -> Plan:
  """Validates `cfg` completely (shapes included) without compiling; returns the plan."""
  plan = validate(cfg)
  model = model_of(cfg, plan.output_dim)
  _check_model(plan, model)
  check_callables(plan, model)
  preflight.check(plan)
  return plan


__all__ = ['run', 'check', 'set_cpu_devices', 'ConfigError']
