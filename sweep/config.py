"""The sweep configuration: `SweepConfig`, and `validate`, which checks it and expands it
into runs (`sweep.checks`, `sweep.expansion`).

Which settings compile and which are data:
- *data* (any values, no new compile): learning_rate, seed, schedule (between the
  built-in names), warmup, decay_rate, momentum, b1, b2, weight_decay, the
  `hyperparameters` of an optimizer factory, divergence_threshold.
- *structure* (a new program per distinct combination): the model, the loss, the
  optimizer family or factory (each is its own compile group), the schedule callables,
  the set of batch sizes, the budget in updates per segment, the dataset's shapes, and
  the run-axis width.

The runs are the product of every field given as a list (a grid); or the explicit list
`runs=[{...}, ...]`; or `samples=N` configurations drawn from the fields given as
`sweep.space` distributions, each trained at every point of the remaining lists.
  The run-axis width is rounded up to a power of two, so most changes in the number
  of values (3 -> 4 learning rates, say) reuse the program too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sweep import checks, columns, expansion
from sweep.columns import AXES
from sweep.data import Dataset
from sweep.errors import ConfigError
from sweep.expansion import Plan

__all__ = ['AXES', 'DEFAULT_OBJECTIVES', 'SweepConfig', 'UnknownFieldError', 'validate']

DEFAULT_OBJECTIVES = columns.DEFAULT_OBJECTIVES


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A sweep of training runs: the product of every axis given as a list, an explicit
  list of runs (`runs=`), or configurations sampled from `sweep.space` distributions.

  Attributes:
    model: `(init_fn, apply_fn)` with `init_fn(key) -> params` and
      `apply_fn(params, x_batch) -> predictions`; or a `flax.linen.Module` (with a
      `train` argument: trained with train=True, batch statistics carried, dropout
      keyed; see `train_argument`); or a `flax.nnx.Module` class (each seed initialises
      it) or instance (its values are every seed's start); or an equinox Module or a
      Keras 3 model (JAX backend); or a haiku `hk.transform` / `hk.transform_with_state`
      (state carried; apply's rng is the update's model key while training, None at
      evaluation; its `is_training` argument switched; also under
      `hk.without_apply_rng`); or a model of `sweep.models` sized to the data.
      See `sweep.adapters`.
    data: a `sweep.data.Dataset`, e.g. `sweep.data.arrays(x, y, x_val, y_val)`.
    loss: a name in `kernels.losses.LOSSES` or `callable(predictions, targets)`
      returning the per-example loss. None picks softmax_cross_entropy for integer
      labels and mse otherwise. A model with several outputs (a tuple or dict of arrays,
      such as a VAE's `(recon, mean, logvar)`) needs a callable loss: it is given them
      whole, and the validation loss is its mean; a named loss is refused.
    optimizer: a name: sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, lion;
      or a factory `callable(learning_rate, **hyperparameters) ->
      optax.GradientTransformation`, e.g. `lambda learning_rate, weight_decay:
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate,
      weight_decay=weight_decay))`; or a list of names and factories. Each is a
      compile group. A factory's keyword arguments are filled from the fields of the
      same name (momentum, b1, b2, weight_decay) and from `hyperparameters`; its
      learning rate (the run's scheduled value at each update) and those arguments
      are injected with `optax.inject_hyperparams`, so they are traced: new values
      compile nothing, and the factory must compute with them in jnp (no Python `if`
      on them). Arguments with defaults that no field fills keep their defaults. With
      several optimizers, a field is crossed only with those that take it (the others'
      runs leave it empty); a field none takes is an error. The
      table names a factory by its `__name__` (a lambda by its body, a partial as
      `name(arguments)`). A ready-made `optax.GradientTransformation` is refused: its
      learning rate is fixed inside it, so the sweep could not set it.
    learning_rate: the initial (or peak) learning rate; a number or a list.
    batch_size: a number or a list.
    seed: fixes a run's init key and its data order; a number or a list. Seed s
      initialises with `jax.random.fold_in(jax.random.key(s), 0)`; with shuffle, its
      epoch e reads the training set in the order
      `jax.random.permutation(jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 1), e), n)`.
      A run with batch size B takes consecutive slices of B of that order and drops
      the last `n % B` examples of each epoch (different ones each epoch when shuffled).
    schedule: constant, exponential, step, cosine, warmup_cosine, linear, onecycle,
      warmup_linear (linear warmup to the learning rate, then linear decay to 0); or
      `callable(learning_rate, total_updates) -> optax schedule` (or a number), e.g.
      `lambda lr, total: optax.warmup_cosine_decay_schedule(0.0, lr, total // 10,
      total)`, called with the run's learning rate traced and the run's number of
      updates as a Python int; a name, a callable or a list. Every schedule counts
      the run's own updates. Each callable is part of the compiled program.
    warmup: warmup_cosine's and warmup_linear's warmup, as a fraction of the run's
      updates.
    decay_rate: exponential decays to `decay_rate * lr` at the end of the run; step
      multiplies the rate by `decay_rate` every `decay_every` of the run's updates.
    decay_every: step's period as a fraction of the run's updates.
    momentum, b1, b2, weight_decay: optimizer hyperparameters; None keeps optax's
      default of each optimizer. Setting one an optimizer does not take is an error.
    hyperparameters: other keyword arguments of optimizer factories, name -> a number,
      a list (an axis) or a space, e.g. `{'clip_norm': [0.5, 1.0]}`. Each name is a
      column of the table.
    epochs: budget in passes over the training set (a run with batch size B makes
      round(epochs * (n // B)) updates). Give either epochs or updates; with
      neither, one epoch.
    updates: budget in updates, the same for every run.
    shuffle: a new per-seed permutation every epoch; False keeps the data order.
    num_evals: evaluation points after the start (segments); None: once per epoch
      for an epoch budget (at most 100), 10 for an updates budget.
    divergence_threshold: a run is frozen and marked diverged when a batch loss is
      NaN/inf or exceeds this multiple of its first batch loss. Under
      `optax.apply_if_finite` a non-finite batch is the optimizer's to skip: the run is
      frozen only when its update is not finite (the batch left out of `batch_loss`).
    eval_batch_size: examples per evaluation chunk.
    train_eval_size: size of the fixed random subset of the training set on which
      train metrics are measured at each evaluation point (the same for every run); None
      sizes it to the training (`probe_size`: its forward passes cost about a twentieth of
      a segment's training); `data.n_train` measures them on the whole training set.
    val_eval_size: size of the fixed random subset of the validation set evaluated at the
      start and at the intermediate evaluation points (the same for every run; the last
      point evaluates the whole validation set); None sizes it to the training as
      `train_eval_size` (rounded up to whole evaluation chunks); `data.n_val` evaluates
      the whole validation set at every point.
    objectives: Pareto objectives, column -> "min" or "max".
    compute_dtype: "float32", or "bfloat16" for the forward and backward pass with
      float32 parameters and optimizer state.
    memory_budget: bytes the runs may occupy on a device; None: 60 % of an
      accelerator's memory, 15 % of host RAM on CPU. Runs that do not fit at once are
      trained in chunks that reuse one compiled program.
    noise_scale: measure the gradient noise scale during training (every batch size
      must be even): each batch's gradient is taken as the mean of its two halves'.
    keep_best: also keep each run's parameters at its best evaluation point (lowest
      validation loss: the early-stopping point); costs one more copy of the parameters.
      `result.params(i, best=True)`; saved beside the final ones for Pareto runs.
    runs: an explicit list of runs, each a dict of fields, e.g.
      `[{'learning_rate': 1e-3, 'batch_size': 32}, ...]`: the table has exactly these
      rows, in this order. A field a run does not name takes the config's value, which
      must then be a single value.
    samples: with fields given as `sweep.space` distributions (`loguniform`,
      `uniform`, `randint`, `choice`), the number of configurations drawn; each is
      trained at every point of the fields given as lists (seeds, say).
    sample_seed: the seed of the draws: the same seed gives the same runs.
    train_argument: the name of the argument of a linen module's `__call__` that switches
      training on (`train`, found by itself, is the flax examples' convention; e.g.
      'training', or 'deterministic', which is passed the opposite). The engine passes it
      True while training (dropout on, batch statistics updated) and False at every
      evaluation. A module whose call takes a switch-like argument other than `train`
      is refused until it is named here.
    rng_argument: the name of an argument of the model's call that takes a JAX key (the
      flax VAE example's `__call__(self, x, z_rng)`), for a linen or nnx module or an
      `(init_fn, apply_fn)` pair (`apply_fn(params, x, z_rng=key)`). While training, a
      seed's update t passes `jax.random.fold_in(k, 1)` with
      `k = fold_in(fold_in(key(seed), 2), t)` the update's model key (dropout draws
      from k itself), so the runs of a seed draw alike; linen's init is passed
      `fold_in(init_key, 1)`. Evaluation is done in whole chunks of
      `min(eval_batch_size, the larger of the probe and validation sets)` examples (a
      set padded by repeating its first example), chunk c passing
      `fold_in(fold_in(key(0), 4), c)` for every run and evaluation point. None: the
      model takes no key (a linen module may still call `self.make_rng('dropout')`).
    augment: `augment(key, x_batch) -> x_batch`, pure and jittable, applied to every
      training batch (never at evaluation), e.g. random crops and flips. Its key for
      a seed's update t (counted from 0) is
      `jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), t)`, so the runs
      of a seed see the same augmented batches. The model's own randomness (dropout)
      uses stream 2 the same way: `fold_in(fold_in(key(seed), 2), t)`.
    eval_params: `eval_params(opt_state, params) -> params`, pure and jittable: the
      parameters at which a run is evaluated (curves, table, best and Pareto runs,
      keep_best, `result.params(i)`, saved runs), from the state of the optimizer the
      factory built and the parameters it trains, e.g. an average of the parameters kept
      in a transformation's state. Its argument order is optax's
      `schedule_free_eval_params(state, params)`; schedule-free optimizers are
      recognised without it. None: the trained parameters (or schedule-free's).
    scheduler: adaptive search (`sweep.schedulers`): `SuccessiveHalving(...)`,
      `MedianStopping(...)`, `Patience(...)` (or a list of these), or `PBT(...)`. Runs are
      then judged at evaluation points and stopped, refilled or copied between segments
      of the same compiled programs; the table shows every configuration tried, its
      status (`stopped` for a run a rule stopped), the rung it reached and its updates.
      None trains every run to its end. With a scheduler and no `num_evals`, the
      evaluation points are chosen to fall on its rungs or intervals.
    name: a label for the sweep.
  """

  model: Any
  data: Dataset
  loss: str | Callable | None = None
  optimizer: str | Callable | Sequence[str | Callable] = 'adam'
  learning_rate: float | Sequence[float] = 1e-3
  batch_size: int | Sequence[int] = 32
  seed: int | Sequence[int] = 0
  schedule: str | Callable | Sequence[str | Callable] = 'constant'
  warmup: float | Sequence[float] = 0.1
  decay_rate: float | Sequence[float] = 0.1
  decay_every: float = 1 / 3
  momentum: float | Sequence[float] | None = None
  b1: float | Sequence[float] | None = None
  b2: float | Sequence[float] | None = None
  weight_decay: float | Sequence[float] | None = None
  hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  epochs: float | None = None
  updates: int | None = None
  shuffle: bool = True
  num_evals: int | None = None
  divergence_threshold: float = 100.0
  eval_batch_size: int = 1024
  train_eval_size: int | None = None
  val_eval_size: int | None = None
  objectives: Mapping[str, str] = dataclasses.field(
    default_factory=lambda: dict(DEFAULT_OBJECTIVES)
  )
  compute_dtype: str = 'float32'
  memory_budget: float | None = None
  noise_scale: bool = False
  keep_best: bool = False
  runs: Sequence[Mapping[str, Any]] | None = None
  samples: int | None = None
  sample_seed: int = 0
  train_argument: str | None = None
  rng_argument: str | None = None
  augment: Callable | None = None
  eval_params: Callable | None = None
  scheduler: Any = None
  name: str = 'sweep'

  def replace(self, **changes) -> SweepConfig:
    return dataclasses.replace(self, **changes)


class UnknownFieldError(ConfigError, TypeError):
  """A `SweepConfig` keyword that is no field (a TypeError too, as Python would raise)."""


def _checked_init(init):
  names = [f.name for f in dataclasses.fields(SweepConfig)]

  @functools.wraps(init)
  def __init__(self, *args, **kwargs):  # noqa: N807
    for key in kwargs:
      if key not in names:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        raise UnknownFieldError(
          f"SweepConfig has no field '{key}'{hint}; its fields are: {', '.join(names)}"
        )
    init(self, *args, **kwargs)

  return __init__


# Unknown keywords get the list of fields and a suggestion, not a bare TypeError.
SweepConfig.__init__ = _checked_init(SweepConfig.__init__)


def validate(cfg: SweepConfig) -> Plan:
  """Checks every field and expands the runs into a `Plan`; raises `ConfigError` on any
  mistake.

  Runs in Python on host values only: nothing is traced or compiled (`sweep.preflight`
  checks the model, the factories and the schedule callables, without compiling, once
  the model is known).
  """
  plan = expansion.expand(cfg, checks.check_fields(cfg))
  checks.check_objectives(plan)
  return plan
