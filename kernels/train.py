"""The functional core: one run's training step, lifted over runs and stepped in a scan.

Layout. A compile group (one model, loss and optimizer family) holds one *batch group*
per batch size. A batch group's runs are laid out on two axes, `(S, R)`: `S` distinct
seeds and `R` runs per seed. Runs that share a seed share their data order, so the
batch they read is gathered once per seed and broadcast over `R` by `jax.vmap`
(`in_axes=None`); the first matmul of the model then sees one input and `R` weight
matrices (one dot_general with the run axis as a free dimension, no copies of the
batch; on XLA's CPU backend it runs at about a third of the rate of the same FLOPs laid
out as one folded matmul, see docs/speed.md).

Batch sizes without padding. Each batch group steps through the same per-seed data
order at its own batch size, in its own `lax.scan` inside the one program of a segment:
no run is padded to the largest batch and no update is masked. The group's step
counter is a scalar shared by its runs, so the skip at the end of the budget is a
real `lax.cond`, not a select over every run.

Everything here is pure and shape-static; `Structure` is the only static input.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kernels import losses, optimizers, schedules


@dataclasses.dataclass(frozen=True)
class Structure:
  """Everything about a compile group that changes code or shapes (hashable).

  Attributes:
    model: the model as `sweep.adapters.Model` gives it: `init(key) -> (params, state)`,
      `apply(params, state, x, train, key) -> (predictions, state)`, and `random`
      (whether training draws from the key).
    loss: a name in `losses.LOSSES` or a callable (predictions, targets) returning the
      per-example loss (batch,), or a pair (loss, accuracy) of per-example values.
    family: the optimizer family, a key of `optimizers.FAMILIES`, or an
      `optimizers.Factory`.
    batch_sizes: one per batch group.
    steps_per_segment: scan length of each batch group's segment.
    steps_per_epoch: updates per pass over the data for each batch group.
    eval_batch_size: examples per evaluation chunk.
    ragged: per batch group, whether the segments overrun the budget (the last
      segment then skips its extra ticks).
    keep_best: also keep each run's parameters at its best evaluation (the early
      stopping point), by validation loss (training-probe loss without a val set).
    noise_scale: also measure the squared gradient norms of each half batch and of the
      whole batch, for the gradient noise scale (the batch gradient is then the mean
      of the two half-batch gradients: equal up to float rounding).
    compute_dtype: dtype of the forward and backward pass (parameters stay float32).
    augment: `augment(key, x_batch) -> x_batch`, applied to every training batch, or None.
    ignore_label: an integer target id left out of the loss and the accuracy (padding).
    accuracy: how a callable loss's accuracy is measured when it returns none: 'ids'
      (argmax against integer ids), 'onehot' (argmax against one-hot rows) or None.
    schedules: the schedule callables the runs may select (see `schedules.learning_rate`).
    total_updates: with `schedules`, each batch group's number of updates (a Python int
      for the callables).
    layout: a `sweep.layers.Layout` (dense kernels held in the layout their products
      want while a segment runs, and for evaluation; the model is computed through its
      `rewrite`), or None.
    eval_params: `(optimizer state, params) -> params` of one run, the parameters it is
      evaluated at (see `optimizers.evaluated`), or None.
  """

  model: Any
  loss: str | Callable[[jax.Array, jax.Array], jax.Array]
  family: str
  batch_sizes: tuple[int, ...]
  steps_per_segment: tuple[int, ...]
  steps_per_epoch: tuple[int, ...]
  eval_batch_size: int
  ragged: tuple[bool, ...] = ()
  noise_scale: bool = False
  unroll: int = 1
  keep_best: bool = False
  compute_dtype: str = 'float32'
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  ignore_label: int | None = None
  accuracy: str | None = None
  schedules: tuple[Callable, ...] = ()
  total_updates: tuple[int, ...] = ()
  layout: Any = None
  eval_params: Callable[[Any, Any], Any] | None = None

  def clock(self, batches: jax.Array) -> jax.Array:
    """The parameter updates after `batches` batches (steps of the optimizer): the same
    count, except under `optax.MultiSteps(opt, k)`, which updates once per k batches."""
    k = optimizers.every_k(self.family)
    return batches if k == 1 else batches // k

  def learning_rate_fn(self, index: int) -> Callable[[Any, jax.Array], jax.Array]:
    """`(schedule params, count) -> learning rate` of one run of batch group `index`."""
    if not self.schedules:
      return schedules.learning_rate
    return functools.partial(
      schedules.learning_rate, custom=self.schedules, total_steps=self.total_updates[index]
    )

  def metrics(
    self, predictions: jax.Array, targets: jax.Array
  ) -> tuple[jax.Array, jax.Array | None]:
    """Per-example loss and accuracy (None where accuracy has no meaning), both (batch,)."""
    if isinstance(self.loss, str):
      return (
        losses.per_example(self.loss, predictions, targets, self.ignore_label),
        losses.correct(self.loss, predictions, targets, self.ignore_label),
      )
    out = self.loss(predictions, targets)
    if isinstance(out, tuple | list):
      return out[0], out[1]
    if not isinstance(predictions, jax.Array):
      return out, None  # several outputs (a VAE's): accuracy only where the loss gives one
    if self.accuracy == 'ids':
      return out, losses.correct('softmax_cross_entropy', predictions, targets, self.ignore_label)
    if self.accuracy == 'onehot':
      return out, losses.correct('softmax_cross_entropy', predictions, targets)
    return out, None

  def forward(
    self, params: Any, state: Any, x: jax.Array, train: bool, key: jax.Array | None
  ) -> tuple[Any, Any]:
    """The model on a batch: (predictions in float32, the model state after it). The
    predictions are one array or, for a model with several outputs, the tuple or dict of
    arrays the model returns (a callable loss takes them whole)."""
    if not (self.model.random if train else self.model.eval_key):
      key = None
    apply = self.model.apply if self.layout is None else self.layout.rewrite(self.model.apply)
    if self.compute_dtype == 'float32':
      return apply(params, state, x, train, key)
    dtype = jnp.dtype(self.compute_dtype)
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    out, new = apply(jax.tree.map(cast, params), state, jax.tree.map(cast, x), train, key)
    new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, state)
    return jax.tree.map(lambda a: a.astype(jnp.float32), out), new


class Data(NamedTuple):
  """The datasets, on the device once per sweep."""

  x_train: Any  # one array, or a tuple or dict of arrays (n, ...)
  y_train: jax.Array
  x_val: jax.Array  # padded to a multiple of the eval batch
  y_val: jax.Array
  val_weight: jax.Array  # 1 for real examples, 0 for padding
  x_probe: jax.Array  # a fixed subset of the training set, for train metrics
  y_probe: jax.Array
  probe_weight: jax.Array
  # Evaluation chunks of the validation set evaluated (the first ones: a fixed subset at
  # intermediate points, all of them at the last); a scalar, so one program serves both.
  val_chunks: jax.Array


class RunHparams(NamedTuple):
  """One run's numeric hyperparameters (leaves are scalars per run)."""

  schedule: schedules.ScheduleParams
  opt: dict[str, jax.Array]


class GroupHparams(NamedTuple):
  """A batch group's hyperparameters: runs (S, R), seeds (S,), its budget."""

  runs: RunHparams
  seeds: jax.Array
  total_updates: jax.Array


class RunState(NamedTuple):
  """One run's state (leaves (S, R, ...) in a `GroupState`), in four parts:

  - training: `params`, `model_state`, `opt_state`, `updates`;
  - divergence: `alive`, `loss0`;
  - this segment's statistics, zeroed at its start: `loss_sum`, `loss_count`, `gsq_half`,
    `gsq_full`;
  - the best so far (with `Structure.keep_best`): `best_params`, `best_loss`,
    `best_model_state`.

  One flat tuple, as checkpoints store its leaves in this order.
  """

  params: Any
  model_state: Any  # the model's variables other than parameters (batch statistics), or {}
  opt_state: optax.OptState
  alive: jax.Array  # False once the run diverged: it is frozen from then on
  updates: jax.Array  # optimizer steps applied (batches; `Structure.clock` gives parameter updates)
  loss0: jax.Array  # first batch loss: the reference of the blow-up test
  loss_sum: jax.Array  # batch losses summed over the current segment
  loss_count: jax.Array
  gsq_half: jax.Array  # summed over the segment: mean |g|^2 of the two half batches
  gsq_full: jax.Array  # summed over the segment: |g|^2 of the whole batch
  best_params: Any = None  # with Structure.keep_best: the parameters at the best evaluation
  best_loss: Any = None  # and their validation loss (training-probe loss without a val set)
  best_model_state: Any = None  # and the model state beside them


class GroupState(NamedTuple):
  runs: RunState  # leaves (S, R, ...)
  step: jax.Array  # ticks taken by the group, a scalar


class Orders(NamedTuple):
  """The data order a batch group reads during one segment.

  Attributes:
    orders: (S, E, n) int32: the permutation of each seed for E consecutive epochs.
    first_epoch: the epoch of `orders[:, 0]`, a scalar.
  """

  orders: jax.Array
  first_epoch: jax.Array


def init_key(seed: jax.Array) -> jax.Array:
  """The key a seed initialises its parameters with."""
  return jax.random.fold_in(jax.random.key(seed), 0)


def seeded_init(init: Callable, seed: jax.Array, lead: bool = False) -> Any:
  """`init(init_key(seed))`: a seed's initial parameters and model state, with a leading
  axis of one on every leaf where `lead` (a seed slot, with no stacking op of its own).
  The key is made inside: a program of its own would be one more compile."""
  out = init(init_key(seed))
  return jax.tree.map(lambda a: a[None], out) if lead else out


# Streams of a seed's key: 0 initialises the parameters, 1 orders the data, 2 is the
# model's randomness while training (dropout), 3 the augmentation of the batches.
# Stream 4 of key 0 keys the evaluation of a model that draws at evaluation too.
MODEL_STREAM, AUGMENT_STREAM, EVAL_STREAM = 2, 3, 4


def eval_key(chunk: jax.Array) -> jax.Array:
  """The key of evaluation chunk `chunk` (counted from 0) of a model given a key at call
  time (`rng_argument`): `fold_in(fold_in(key(0), 4), chunk)`, the same for every run,
  seed and evaluation point, so that evaluations differ only by the parameters."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), EVAL_STREAM), chunk)


def update_key(seed: jax.Array, update: jax.Array, stream: int) -> jax.Array:
  """The key of `stream` for a seed's `update`-th update (counted from 0).

  `fold_in(fold_in(key(seed), stream), update)`: runs that share a seed draw the same
  dropout masks and augmentations (common random numbers), whatever their other
  hyperparameters, and a resumed sweep draws the same keys as an uninterrupted one.
  """
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), update)


def epoch_order(seed: jax.Array, epoch: jax.Array, n: int) -> jax.Array:
  """The order in which a seed reads the n training examples in `epoch` (shuffled)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
  return jax.random.permutation(key, n).astype(jnp.int32)


# ---------------------------------------------------------------- one run ----


def _run_init(structure: Structure, params: Any, model_state: Any, hp: RunHparams) -> RunState:
  opt = optimizers.make(structure.family, hp.opt)
  # What the optimizer trains: the parameters, or a lookahead's pair of them.
  trained = optimizers.trained_params(opt, params)
  zero = jnp.zeros((), jnp.float32)
  return RunState(
    params=trained,
    model_state=model_state,
    opt_state=opt.init(trained),
    alive=jnp.ones((), bool),
    updates=jnp.zeros((), jnp.int32),
    loss0=zero,
    loss_sum=zero,
    loss_count=jnp.zeros((), jnp.int32),
    gsq_half=zero,
    gsq_full=zero,
    best_params=params if structure.keep_best else None,
    best_loss=jnp.full((), jnp.inf, jnp.float32) if structure.keep_best else None,
    best_model_state=model_state if structure.keep_best else None,
  )


def _run_step(
  structure: Structure,
  state: RunState,
  hp: RunHparams,
  xb: jax.Array,
  yb: jax.Array,
  lr: jax.Array,
  key: jax.Array | None,
  threshold: jax.Array,
) -> RunState:
  """One update of one run on one batch: the plain optax step, plus the freeze.

  `lr` is the run's scheduled learning rate for this update (computed for a whole
  segment at once, outside the scan, from the run's update count at the segment's start).
  `key` is the model's randomness for this update (see `update_key`). The model runs
  in training mode; its new state (batch statistics) is kept unless the run froze.
  Under `optax.lookahead` the model runs on the fast half of the parameters.
  """
  params = optimizers.model_params(state.params)

  def batch_loss(params, x, y):
    pred, new_state = structure.forward(params, state.model_state, x, True, key)
    return jnp.mean(structure.metrics(pred, y)[0]), new_state

  gsq_half, gsq_full = state.gsq_half, state.gsq_full
  new_state = state.model_state
  if structure.noise_scale:
    # Two half batches give gradient norms at two batch sizes (McCandlish et al. 2018).
    # (Models with state are refused with noise_scale: their statistics would be per half.)
    halves = lambda t: jax.tree.map(lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:]), t)  # noqa: E731
    half_loss = lambda p, x, y: batch_loss(p, x, y)[0]  # noqa: E731
    losses_h, grads_h = jax.vmap(jax.value_and_grad(half_loss), in_axes=(None, 0, 0))(
      params, halves(xb), halves(yb)
    )
    loss = jnp.mean(losses_h)
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads_h)

    def sq(t):
      return sum(jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim))) for a in jax.tree.leaves(t))

    gsq_half = gsq_half + jnp.mean(sq(grads_h))
    gsq_full = gsq_full + sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(grads))
  else:
    (loss, new_state), grads = jax.value_and_grad(batch_loss, has_aux=True)(params, xb, yb)
  # An optimizer that skips non-finite updates itself (optax.apply_if_finite) is left to
  # do so: a non-finite batch freezes its run only when the optimizer applied it anyway.
  skips = bool(optimizers.find_states(state.opt_state, optax.ApplyIfFiniteState))
  finite = jnp.isfinite(loss)
  if skips:
    first = (state.updates == 0) | ~jnp.isfinite(state.loss0)
    loss0 = jnp.where(first, loss, state.loss0)
    ok = state.alive & (~finite | (loss <= threshold * jnp.abs(loss0) + 1e-6))
  else:
    loss0 = jnp.where(state.updates == 0, loss, state.loss0)
    ok = state.alive & finite & (loss <= threshold * jnp.abs(loss0) + 1e-6)
  # Freeze a diverged run with a zero gradient and a zero learning rate: its update is
  # then exactly 0 (every optax optimizer ends in a scale by the learning rate), and
  # one select over the gradient is far cheaper than one over parameters and state.
  grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
  lr = jnp.where(ok, lr, 0.0)
  opt = optimizers.make(structure.family, hp.opt)
  opt_state = optimizers.with_learning_rate(state.opt_state, lr)
  updates, opt_state = opt.update(grads, opt_state, state.params)
  applied = ok  # the steps whose batch loss counts and whose model state is kept
  if skips:
    # It skipped the batch (a zero update) or applied it: a non-finite update freezes the
    # run, with the parameters of the step before (the factory's updates are masked).
    ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
    applied = ok & finite
  if isinstance(structure.family, optimizers.Factory):
    # A researcher's chain may move parameters without gradient or learning rate
    # (add_decayed_weights after the scale, noise, a lookahead's synchronisation): a frozen
    # run's update is masked.
    updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
  return RunState(
    params=optax.apply_updates(state.params, updates),
    model_state=jax.tree.map(lambda n, o: jnp.where(applied, n, o), new_state, state.model_state),
    opt_state=opt_state,
    alive=ok,
    updates=state.updates + ok.astype(jnp.int32),
    loss0=loss0,
    loss_sum=state.loss_sum + jnp.where(applied, loss, 0.0),
    loss_count=state.loss_count + applied.astype(jnp.int32),
    gsq_half=gsq_half,
    gsq_full=gsq_full,
    best_params=state.best_params,
    best_loss=state.best_loss,
    best_model_state=state.best_model_state,
  )


# ------------------------------------------------------------ run axes ----


def _over_runs(fn, shared_in_r: tuple[bool, ...]):
  """Lifts `fn` over (S, R): arguments marked True are per seed, shared over R."""
  inner = jax.vmap(fn, in_axes=tuple(None if s else 0 for s in shared_in_r))
  return jax.vmap(inner, in_axes=0)


def init(
  structure: Structure, per_seed_params: tuple[Any, ...], hparams: tuple[GroupHparams, ...]
) -> tuple[GroupState, ...]:
  """Initial state of every batch group from each seed's (parameters, model state) (S, ...).

  Runs that share a seed start from the same parameters (common random numbers).
  """
  groups = []
  for variables, ghp in zip(per_seed_params, hparams, strict=True):
    s, r = jax.tree.leaves(ghp.runs)[0].shape[:2]
    params, model_state = jax.tree.map(
      lambda p, s=s, r=r: jnp.broadcast_to(p[:, None], (s, r) + p.shape[1:]), variables
    )
    runs = jax.vmap(jax.vmap(lambda p, m, h: _run_init(structure, p, m, h)))(
      params, model_state, ghp.runs
    )
    groups.append(GroupState(runs=runs, step=jnp.zeros((), jnp.int32)))
  return tuple(groups)


def _group_segment(
  structure: Structure,
  index: int,
  state: GroupState,
  ghp: GroupHparams,
  order: Orders,
  data: Data,
  threshold: jax.Array,
) -> GroupState:
  batch = structure.batch_sizes[index]
  per_epoch = structure.steps_per_epoch[index]
  length = structure.steps_per_segment[index]
  step_runs = _over_runs(
    lambda st, h, xb, yb, lr, key: _run_step_jit(structure, st, h, xb, yb, lr, key, threshold),
    (False, False, True, True, False, True),
  )
  per_seed_keys = lambda seeds, step, stream: jax.vmap(lambda s: update_key(s, step, stream))(seeds)  # noqa: E731
  # Every learning rate of the segment in one vectorised pass, rather than a switch
  # over the schedule families inside every tick: (length, S, R). A schedule runs on its
  # run's own update clock: a live run's count is its group's tick, except for a run that
  # changed batch size (`sweep.batch_ramp`), whose updates began in another group.
  # Under optax.MultiSteps(opt, k) the clock is the parameter update: batch t of a run
  # updates with the schedule's value at t // k, as opt's own count would give it.
  per_run = jax.vmap(jax.vmap(structure.learning_rate_fn(index)))
  lrs = jax.vmap(lambda i: per_run(ghp.runs.schedule, structure.clock(state.runs.updates + i)))(
    jnp.arange(length, dtype=jnp.int32)
  )

  def tick(state: GroupState, lr: jax.Array) -> GroupState:
    epoch, j = state.step // per_epoch, state.step % per_epoch
    perm = jax.lax.dynamic_index_in_dim(
      order.orders, epoch - order.first_epoch, axis=1, keepdims=False
    )
    idx = jax.lax.dynamic_slice_in_dim(perm, j * batch, batch, axis=1)  # (S, B)
    xb = jax.tree.map(lambda a: a[idx], data.x_train)  # one array, or a tuple or dict
    if structure.augment is not None:
      # One augmentation per seed and update, shared by the seed's runs.
      xb = jax.vmap(structure.augment)(per_seed_keys(ghp.seeds, state.step, AUGMENT_STREAM), xb)
    keys = per_seed_keys(ghp.seeds, state.step, MODEL_STREAM) if structure.model.random else None
    runs = step_runs(state.runs, ghp.runs, xb, data.y_train[idx], lr, keys)
    return GroupState(runs=runs, step=state.step + 1)

  def body(state, lr):
    if not structure.ragged[index]:
      return tick(state, lr), None
    # The predicate is one scalar for the group, so the skipped ticks cost nothing;
    # a cond still keeps a second copy of the carry, so it is used only where needed.
    return jax.lax.cond(state.step < ghp.total_updates, tick, lambda s, _: s, state, lr), None

  state = state._replace(
    runs=state.runs._replace(
      loss_sum=jnp.zeros_like(state.runs.loss_sum),
      loss_count=jnp.zeros_like(state.runs.loss_count),
      gsq_half=jnp.zeros_like(state.runs.gsq_half),
      gsq_full=jnp.zeros_like(state.runs.gsq_full),
    )
  )
  if structure.layout is not None:
    opt = optimizers.make(structure.family, ghp.runs.opt)  # for the state's structure only
    state = state._replace(runs=structure.layout.enter(state.runs, opt))
  state, _ = jax.lax.scan(body, state, lrs, unroll=structure.unroll)
  if structure.layout is not None:
    state = state._replace(runs=structure.layout.leave(state.runs, opt))
  return state


def _eval_chunk(structure: Structure, p, st, xc, yc, wc, key) -> dict[str, jax.Array]:
  """One run's summed loss (and accuracy) on an evaluation chunk, weighted."""
  pred, _ = structure.forward(p, st, xc, False, key)
  loss, correct = structure.metrics(pred, yc)
  out = {'loss': jnp.sum(loss * wc)}
  if correct is not None:
    out['accuracy'] = jnp.sum(correct * wc)
  return out


# One run's step and evaluation, each traced once per structure and per-run shapes: the
# programs that call them (start, segment, the run timing's, lr_find's) reuse the trace,
# where tracing the model again would take as long as the first time (a call inside a
# program, inlined by XLA: the compiled programs are the same).
_run_step_jit = jax.jit(_run_step, static_argnums=(0,))
_eval_chunk_jit = jax.jit(_eval_chunk, static_argnums=(0,))


def _evaluate_runs(
  structure: Structure,
  params: Any,
  model_state: Any,
  x: jax.Array,
  y: jax.Array,
  weight: jax.Array,
  chunks: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Weighted mean loss (and accuracy) of every run in `params` (S, R, ...) on (x, y),
  the model in evaluation mode: on the first `chunks` evaluation chunks (a traced count),
  or on all of them."""
  chunk = structure.eval_batch_size
  if structure.layout is not None:
    params = structure.layout.to_fast(params)
  xs = jax.tree.map(lambda a: a.reshape((-1, chunk) + a.shape[1:]), x)
  ys = y.reshape((-1, chunk) + y.shape[1:])
  ws = weight.reshape(-1, chunk)

  one_run = functools.partial(_eval_chunk_jit, structure)
  # Every run of every seed reads the same evaluation chunk (and draws with the same key).
  shared = (0, 0, None, None, None, None)
  lifted = jax.vmap(jax.vmap(one_run, in_axes=shared), in_axes=shared)
  # Only a model that draws at evaluation is given keys: the others' programs are unchanged.
  keyed = structure.model.eval_key

  def body(c, total):
    xc, yc, wc = jax.tree.map(lambda a: a[c], (xs, ys, ws))
    key = eval_key(c) if keyed else None
    return jax.tree.map(jnp.add, total, lifted(params, model_state, xc, yc, wc, key))

  first = jax.tree.map(lambda a: a[0], xs)
  shapes = jax.eval_shape(
    lifted, params, model_state, first, ys[0], ws[0], eval_key(0) if keyed else None
  )
  total = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  if chunks is None:
    total = jax.lax.fori_loop(0, ws.shape[0], body, total)  # a scan: the count is static
    count = jnp.sum(weight)
  else:
    total = jax.lax.fori_loop(0, jnp.minimum(chunks, ws.shape[0]), body, total)
    count = jnp.sum(jnp.where(jnp.arange(ws.shape[0]) < chunks, ws.sum(axis=1), 0.0))
  return jax.tree.map(lambda t: t / count, total)


def _eval_params(structure: Structure, runs: RunState) -> Any:
  """The parameters every run (S, R) is evaluated at: its own, or those its optimizer
  means (see `optimizers.evaluated`; the same arrays for ordinary optimizers)."""
  if not optimizers.evaluates_elsewhere(runs.opt_state, structure.eval_params):
    return runs.params
  fn = functools.partial(optimizers.evaluated, fn=structure.eval_params)
  return jax.vmap(jax.vmap(fn))(runs.opt_state, runs.params)


def evaluate(structure: Structure, groups: tuple[GroupState, ...], data: Data) -> tuple[dict, ...]:
  """Validation and training-probe metrics of every run of every batch group, at the
  parameters its optimizer means to be evaluated (`optimizers.evaluated`)."""
  out = []
  for state in groups:
    params, model_state = _eval_params(structure, state.runs), state.runs.model_state
    metrics = {}
    if data.y_val.shape[0]:
      for k, v in _evaluate_runs(
        structure, params, model_state, data.x_val, data.y_val, data.val_weight, data.val_chunks
      ).items():
        metrics['val_' + k] = v
    probe = (data.x_probe, data.y_probe, data.probe_weight)
    for k, v in _evaluate_runs(structure, params, model_state, *probe).items():
      metrics['train_' + k] = v
    metrics['alive'] = state.runs.alive
    metrics['updates'] = structure.clock(state.runs.updates)
    if optimizers.every_k(structure.family) > 1:
      metrics['batches'] = state.runs.updates  # for the examples read
    out.append(metrics)
  return tuple(out)


def evaluate_initial(
  structure: Structure, groups: tuple[GroupState, ...], data: Data
) -> tuple[dict, ...]:
  """`evaluate` before any update: the runs of a seed start from the same parameters,
  so each seed's first run is evaluated and its metrics stand for all its runs."""
  firsts = tuple(g._replace(runs=jax.tree.map(lambda a: a[:, :1], g.runs)) for g in groups)
  out = []
  for metrics, g in zip(evaluate(structure, firsts, data), groups, strict=True):
    shape = g.runs.alive.shape
    out.append({k: jnp.broadcast_to(v, shape) for k, v in metrics.items()})
  return tuple(out)


def start(
  structure: Structure,
  per_seed_params: tuple[Any, ...],
  hparams: tuple[GroupHparams, ...],
  data: Data,
) -> tuple[tuple[GroupState, ...], tuple[dict, ...]]:
  """`init`, then `evaluate_initial`: one program, so one compile."""
  groups = init(structure, per_seed_params, hparams)
  return groups, evaluate_initial(structure, groups, data)


def segment(
  structure: Structure,
  groups: tuple[GroupState, ...],
  hparams: tuple[GroupHparams, ...],
  orders: tuple[Orders, ...],
  data: Data,
  threshold: jax.Array,
) -> tuple[tuple[GroupState, ...], tuple[dict, ...]]:
  """Advances every batch group by one segment, then evaluates every run."""
  new = tuple(
    _group_segment(structure, i, g, h, o, data, threshold)
    for i, (g, h, o) in enumerate(zip(groups, hparams, orders, strict=True))
  )
  metrics = evaluate(structure, new, data)
  new = note_best(structure, new, metrics)
  for i, (m, g, h) in enumerate(zip(metrics, new, hparams, strict=True)):
    count = jnp.maximum(g.runs.loss_count, 1)
    m['batch_loss'] = jnp.where(g.runs.loss_count > 0, g.runs.loss_sum / count, jnp.nan)
    if structure.noise_scale:
      m['grad_sq_half'] = g.runs.gsq_half / count
      m['grad_sq_full'] = g.runs.gsq_full / count
    m['learning_rate'] = jax.vmap(jax.vmap(structure.learning_rate_fn(i)))(
      h.runs.schedule, structure.clock(jnp.maximum(g.runs.updates - 1, 0))
    )
  return new, metrics


def note_best(structure: Structure, groups: tuple[GroupState, ...], metrics: tuple[dict, ...]):
  """Keeps each run's parameters at its lowest evaluation loss so far (with keep_best):
  the parameters it was evaluated at (`optimizers.evaluated`)."""
  if not structure.keep_best:
    return groups
  out = []
  for g, m in zip(groups, metrics, strict=True):
    loss = m['val_loss'] if 'val_loss' in m else m['train_loss']
    better = jnp.isfinite(loss) & (loss < g.runs.best_loss)  # (S, R)

    def pick(new, old, better=better):
      return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - 2)), new, old)

    runs = g.runs._replace(
      best_params=jax.tree.map(pick, _eval_params(structure, g.runs), g.runs.best_params),
      best_loss=jnp.where(better, loss, g.runs.best_loss),
      best_model_state=jax.tree.map(pick, g.runs.model_state, g.runs.best_model_state),
    )
    out.append(g._replace(runs=runs))
  return tuple(out)


class _Jit:
  """`jax.jit(fun, **kwargs)`, built at its first call, once the backend is known.

  On CPU it compiles with XLA's backend optimization level 1 rather than the default:
  programs such as the init (threefry and truncated normals) compile several times
  faster and none measurably runs slower, since the matrix products are library calls,
  not generated code (docs/performance.md, change 7).
  """

  def __init__(self, fun: Callable, **kwargs):
    self._fun, self._kwargs, self._jitted = fun, kwargs, None
    functools.update_wrapper(self, fun)

  def _get(self):
    if self._jitted is None:
      options = {'xla_backend_optimization_level': 1} if jax.default_backend() == 'cpu' else None
      self._jitted = jax.jit(self._fun, compiler_options=options, **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """`jax.jit(...).lower`: arguments may be `jax.ShapeDtypeStruct`s. Compiling what it
    returns compiles the program a call with such arguments runs."""
    return self._get().lower(*args, **kwargs)


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit` as the engine compiles its programs (see `_Jit`)."""
  return _Jit(fun, **kwargs)


# Jitted entry points; `structure` is static, the carried state is donated.
start_jit = jit(start, static_argnums=(0,))
init_jit = jit(init, static_argnums=(0,))
seeded_init_jit = jit(seeded_init, static_argnums=(0, 2))
epoch_order_jit = jit(epoch_order, static_argnums=(2,))
note_best_jit = jit(note_best, static_argnums=(0,), donate_argnums=(1,))
segment_jit = jit(segment, static_argnums=(0,), donate_argnums=(1,))


@dataclasses.dataclass(frozen=True)
class Program:
  """The programs of one `Structure`, with the structure bound: what the engine calls.

  Every unit of a compile group has the same structure, so the same programs (compiled
  once, at their first call). The state is donated to `segment` and `note_best`.
  """

  structure: Structure

  def start(self, per_seed_params, hparams, data: Data):
    """(initial state, initial metrics): see `start`."""
    return start_jit(self.structure, per_seed_params, hparams, data)

  def init(self, per_seed_params, hparams):
    """The initial state alone: see `init`."""
    return init_jit(self.structure, per_seed_params, hparams)

  def segment(self, groups, hparams, orders, data: Data, threshold):
    """(state, metrics) one segment later: see `segment`."""
    return segment_jit(self.structure, groups, hparams, orders, data, threshold)

  def note_best(self, groups, metrics):
    """The state with each run's best-so-far updated: see `note_best`."""
    return note_best_jit(self.structure, groups, metrics)

  def lower_start(self, per_seed_params, hparams, data: Data):
    return start_jit.lower(self.structure, per_seed_params, hparams, data)

  def lower_init(self, per_seed_params, hparams):
    return init_jit.lower(self.structure, per_seed_params, hparams)

  def lower_segment(self, groups, hparams, orders, data: Data, threshold):
    return segment_jit.lower(self.structure, groups, hparams, orders, data, threshold)

  def lower_note_best(self, groups, metrics):
    return note_best_jit.lower(self.structure, groups, metrics)

  def abstract_state(self, per_seed_shapes, hparams):
    """The state's shapes and dtypes, from each seed's (parameters, model state) shapes."""
    return jax.eval_shape(functools.partial(init, self.structure), per_seed_shapes, hparams)


def make_program(structure: Structure) -> Program:
  """The programs of `structure` (cheap: they compile at their first call, once per
  structure, in the jitted entry points above)."""
  return Program(structure)
