"""optax's wrappers and contrib optimizers as a researcher writes them: each run equals a plain
sequential optax loop written here, evaluated as optax says it should be evaluated, or the
setup is refused before anything compiles with a message that names the real cause.

The reference builds the optimizer with the factory the sweep was given (a concrete learning
rate), steps it over the documented data order (seed s reads permutation
`permutation(fold_in(fold_in(key(s), 1), epoch))`) and measures the validation loss in float64
numpy. It shares no code with the engine.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles

import sweep

N_TRAIN, N_VAL, D_IN, HIDDEN, D_OUT = 200, 60, 8, 16, 3
BATCH = 20
RTOL, ATOL = 1e-4, 1e-5


def mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.uniform(k1, (D_IN, HIDDEN), minval=-1.0, maxval=1.0) / math.sqrt(D_IN),
    'b1': jnp.zeros(HIDDEN),
    'w2': jax.random.uniform(k2, (HIDDEN, D_OUT), minval=-1.0, maxval=1.0) / math.sqrt(HIDDEN),
    'b2': jnp.zeros(D_OUT),
  }


def mlp_apply(params, x):
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


def _arrays():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(N_TRAIN + N_VAL, D_IN)).astype(np.float32)
  y = (
    np.tanh(x @ rng.normal(size=(D_IN, D_OUT))) + 0.1 * rng.normal(size=(N_TRAIN + N_VAL, D_OUT))
  ).astype(np.float32)
  return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


X, Y, X_VAL, Y_VAL = _arrays()
DATA = sweep.data.arrays(X, Y, X_VAL, Y_VAL)
BASE = dict(
  model=(mlp_init, mlp_apply),
  data=DATA,
  loss='mse',
  batch_size=BATCH,
  schedule='constant',
  shuffle=True,
)


# ------------------------------------------------------------------------- the reference ----


def val_loss(params) -> float:
  """The validation mse in float64 numpy."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  pred = np.tanh(X_VAL @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
  return float(np.mean(np.square(pred - Y_VAL)))


def data_order(seed: int, epoch: int) -> np.ndarray:
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
  return np.asarray(jax.random.permutation(key, N_TRAIN))


def reference(opt, seed, total, x=X, y=Y, threshold=None, apply=mlp_apply):
  """A plain optax loop: the params and optimizer state after each update, and the number
  of updates applied before the divergence rule (when `threshold` is given) stopped it."""

  @jax.jit
  def step(params, opt_state, xb, yb):
    def batch_loss(p):
      return jnp.mean(jnp.mean(jnp.square(apply(p, xb) - yb), axis=-1))

    value, grads = jax.value_and_grad(batch_loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params = mlp_init(jax.random.fold_in(jax.random.key(seed), 0))
  opt_state = opt.init(params)
  trail, loss0 = [(params, opt_state)], None
  per_epoch = N_TRAIN // BATCH
  for t in range(total):
    epoch, j = divmod(t, per_epoch)
    idx = data_order(seed, epoch)[j * BATCH : (j + 1) * BATCH]
    new_params, new_state, value = step(params, opt_state, x[idx], y[idx])
    if threshold is not None:
      value = float(value)
      loss0 = value if t == 0 else loss0
      if not (math.isfinite(value) and value <= threshold * abs(loss0) + 1e-6):
        break
    params, opt_state = new_params, new_state
    trail.append((params, opt_state))
  return trail


def excess(got, want, rtol=RTOL):
  worst = -np.inf
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    worst = max(worst, float(np.max(np.abs(g - w) - (ATOL + rtol * np.abs(w)))))
  return worst


# ------------------------------------------------------------ schedule-free evaluation ----


def sf_adamw(learning_rate):
  return optax.contrib.schedule_free_adamw(learning_rate, warmup_steps=5)


def clipped_sf_sgd(learning_rate):
  """Schedule-free inside a chain: it is found there too."""
  return optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_sgd(learning_rate))


# Each factory with where its schedule-free state sits in its optimizer state.
@pytest.mark.parametrize(
  'factory, sf_state', [(sf_adamw, lambda s: s), (clipped_sf_sgd, lambda s: s[1])]
)
def test_schedule_free_runs_are_evaluated_at_schedule_free_eval_params(factory, sf_state, tmp_path):
  """Curves, table, keep_best, result.params and the saved runs all read the parameters
  `schedule_free_eval_params` gives; `raw=True` gives the trained interpolation point."""
  lrs = [0.01, 0.1]
  cfg = sweep.SweepConfig(
    **BASE, optimizer=factory, learning_rate=lrs, epochs=3, num_evals=6, keep_best=True
  )
  result = sweep.run(cfg, workdir=str(tmp_path), progress=False)
  table, curves = result.table, result.curves
  assert (table.status == 'ok').all()
  apart = 0.0
  for i, row in table.iterrows():
    trail = reference(factory(float(row.learning_rate)), 0, int(row.updates))
    evaluated = [optax.contrib.schedule_free_eval_params(sf_state(s), p) for p, s in trail]
    raw_final, eval_final = trail[-1][0], evaluated[-1]
    assert excess(result.params(i), eval_final) <= 0
    assert excess(result.params(i, raw=True), raw_final) <= 0
    # Every evaluation point of the curve, at the reference's evaluated parameters.
    mine = curves[curves.run == i]
    want = np.array([val_loss(evaluated[int(u)]) for u in mine.updates])
    np.testing.assert_allclose(mine.val_loss.to_numpy(), want, rtol=1e-4)
    assert row.final_val_loss == pytest.approx(want[-1], rel=1e-4)
    # keep_best keeps the evaluated parameters of the lowest point.
    best = int(mine.updates.to_numpy()[np.argmin(want)])
    assert excess(result.params(i, best=True), evaluated[best]) <= 0
    apart = max(apart, abs(val_loss(raw_final) - want[-1]) / want[-1])
  # The test tells the two apart: at the raw parameters the losses differ.
  assert apart > 1e-3
  # Saved (Pareto) runs give the evaluated parameters back, the raw ones one call away.
  loaded = sweep.load(str(tmp_path))
  for i in table.index[table.pareto]:
    assert excess(loaded.params(int(i)), result.params(int(i))) <= 0
    assert (
      excess(sweep.restore_params(str(tmp_path), int(i), raw=True), result.params(int(i), raw=True))
      <= 0
    )


def test_an_ordinary_optimizer_is_evaluated_at_its_parameters():
  cfg = sweep.SweepConfig(**BASE, optimizer='adam', learning_rate=0.01, epochs=1)
  result = sweep.run(cfg, progress=False)
  trail = reference(optax.adam(0.01), 0, N_TRAIN // BATCH)
  assert excess(result.params(0), trail[-1][0]) <= 0
  assert result.table.final_val_loss[0] == pytest.approx(val_loss(trail[-1][0]), rel=1e-4)


# ------------------------------------------- a parameter average kept in the state ----


class ParamAverageState(NamedTuple):
  average: Any


def param_average(decay):
  """An exponential moving average of the parameters after each update (optax keeps none
  of its own: `optax.ema` averages the updates)."""

  def init(params):
    return ParamAverageState(jax.tree.map(jnp.asarray, params))

  def update(updates, state, params):
    new = optax.apply_updates(params, updates)
    average = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, state.average, new)
    return updates, ParamAverageState(average)

  return optax.GradientTransformation(init, update)


def averaged_adam(learning_rate):
  return optax.chain(optax.adam(learning_rate), param_average(0.9))


def the_average(opt_state, params):
  del params
  return opt_state[1].average


def test_eval_params_evaluates_a_parameter_average_kept_in_the_optimizer_state():
  cfg = sweep.SweepConfig(
    **BASE,
    optimizer=averaged_adam,
    learning_rate=[0.01, 0.05],
    epochs=2,
    num_evals=4,
    keep_best=True,
    eval_params=the_average,
  )
  result = sweep.run(cfg, progress=False)
  curves = result.curves
  for i, row in result.table.iterrows():
    trail = reference(averaged_adam(float(row.learning_rate)), 0, int(row.updates))
    averages = [s[1].average for _, s in trail]
    assert excess(result.params(i), averages[-1]) <= 0
    assert excess(result.params(i, raw=True), trail[-1][0]) <= 0
    mine = curves[curves.run == i]
    want = np.array([val_loss(averages[int(u)]) for u in mine.updates])
    np.testing.assert_allclose(mine.val_loss.to_numpy(), want, rtol=1e-4)
    best = int(mine.updates.to_numpy()[np.argmin(want)])
    assert excess(result.params(i, best=True), averages[best]) <= 0
    assert abs(val_loss(trail[-1][0]) - want[-1]) > 1e-4 * want[-1]


def test_eval_params_that_returns_the_wrong_shapes_is_refused_before_training():
  cfg = sweep.SweepConfig(
    **BASE,
    optimizer='adam',
    learning_rate=0.01,
    epochs=1,
    eval_params=lambda opt_state, params: params['w1'],
  )
  with pytest.raises(sweep.ConfigError, match=r'^eval_params=.*structure, shapes and dtypes'):
    sweep.check(cfg)


# ------------------------------------------------------- factories that train nothing ----


def inside_injected_sgd(learning_rate):
  """An inject_hyperparams of its own inside the factory: it keeps its learning rate at init."""
  return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)


@pytest.mark.parametrize(
  'factory', [optax.inject_hyperparams(optax.adam), inside_injected_sgd], ids=['uncalled', 'inside']
)
def test_a_factory_whose_updates_ignore_the_learning_rate_is_refused_naming_inject_hyperparams(
  factory,
):
  cfg = sweep.SweepConfig(**BASE, optimizer=factory, learning_rate=[0.01, 0.1], epochs=1)
  with pytest.raises(sweep.ConfigError) as raised:
    sweep.check(cfg)
  message = str(raised.value)
  assert message.startswith('optimizer=')
  assert 'trains nothing' in message and 'inject_hyperparams' in message
  assert 'optimizer=optax.adam' in message


def test_a_factory_that_drops_its_learning_rate_is_refused():
  cfg = sweep.SweepConfig(
    **BASE, optimizer=lambda learning_rate: optax.sgd(0.0), learning_rate=0.01, epochs=1
  )
  with pytest.raises(sweep.ConfigError, match='trains nothing.*from its learning_rate argument'):
    sweep.check(cfg)


# ------------------------------------------------------ gradient accumulation ----


def accumulating_adam(k):
  def factory(learning_rate):
    return optax.MultiSteps(optax.adam(learning_rate), every_k_schedule=k)

  return factory


def accumulating_adam_transformation(learning_rate):
  """The other form: MultiSteps(...).gradient_transformation()."""
  return optax.MultiSteps(optax.adam(learning_rate), 4).gradient_transformation()


def warmup_3_cosine(learning_rate, total_updates):
  """A warmup given as a number of updates (3), which counts parameter updates."""
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, 3, total_updates)


# (factory, k, the sweep's schedule, the user's optax schedule from (lr, parameter updates),
# and whether the user's loop wraps an inject_hyperparams'd adam).
MULTISTEPS = {
  'k2-cosine': (
    accumulating_adam(2),
    2,
    'cosine',
    lambda lr, total: optax.cosine_decay_schedule(lr, total),
    False,
  ),
  'k4-warmup_cosine-injected': (
    accumulating_adam_transformation,
    4,
    'warmup_cosine',
    # warmup=0.2 of the run's parameter updates, rounded
    lambda lr, total: optax.warmup_cosine_decay_schedule(0.0, lr, round(0.2 * total), total),
    True,
  ),
  'k2-callable-warmup': (accumulating_adam(2), 2, warmup_3_cosine, warmup_3_cosine, False),
}


@pytest.mark.parametrize('name', list(MULTISTEPS))
def test_multisteps_counts_parameter_updates_and_schedules_on_their_clock(name):
  """Each run equals a plain loop with MultiSteps around adam and the schedule built for the
  run's parameter updates, at every evaluation point (most of them in the middle of an
  accumulation); `updates` counts parameter updates, `examples` the batches read, and the
  learning rate is the schedule's at the last batch's update."""
  factory, k, schedule, optax_schedule, injected = MULTISTEPS[name]
  lrs = [0.01, 0.05]
  batches = 3 * (N_TRAIN // BATCH)  # 30: for k=4 a last partial accumulation
  cfg = sweep.SweepConfig(
    **{**BASE, 'schedule': schedule},
    optimizer=factory,
    learning_rate=lrs,
    warmup=0.2,
    epochs=3,
    num_evals=6,  # every 5 batches
    keep_best=True,
  )
  result = sweep.run(cfg, progress=False)
  table, curves = result.table, result.curves
  assert (table.status == 'ok').all()
  assert (table.updates == batches // k).all()
  for i, row in table.iterrows():
    sched = optax_schedule(float(row.learning_rate), batches // k)
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=sched) if injected else None
    inner = inner or optax.adam(sched)
    trail = reference(optax.MultiSteps(inner, every_k_schedule=k), 0, batches)
    mine = curves[curves.run == i]
    read = (mine.examples.to_numpy() // BATCH).astype(int)
    np.testing.assert_array_equal(read, np.arange(0, batches + 1, 5))
    np.testing.assert_array_equal(mine.updates.to_numpy(), read // k)
    want = np.array([val_loss(trail[b][0]) for b in read])
    np.testing.assert_allclose(mine.val_loss.to_numpy(), want, rtol=1e-4)
    lr_want = [float(sched(max(b - 1, 0) // k)) for b in read[1:]]
    np.testing.assert_allclose(mine.learning_rate.to_numpy()[1:], lr_want, rtol=1e-5, atol=1e-9)
    assert row.final_val_loss == pytest.approx(want[-1], rel=1e-4)
    assert excess(result.params(i), trail[-1][0]) <= 0
    best = int(read[np.argmin(want)])
    assert excess(result.params(i, best=True), trail[best][0]) <= 0


def test_multisteps_with_other_learning_rates_compiles_nothing():
  factory = accumulating_adam(2)
  cfg = sweep.SweepConfig(
    **{**BASE, 'schedule': 'cosine'}, optimizer=factory, learning_rate=[0.01, 0.02], epochs=2
  )
  with counting_compiles() as names:
    sweep.run(cfg, progress=False)
    first = len(names)
    result = sweep.run(cfg.replace(learning_rate=[0.03, 0.05]), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  assert (result.table.updates == 2 * (N_TRAIN // BATCH) // 2).all()


def growing_every_k(learning_rate):
  return optax.MultiSteps(optax.adam(learning_rate), lambda step: jnp.where(step < 3, 2, 4))


def skipping_multisteps(learning_rate):
  return optax.MultiSteps(optax.adam(learning_rate), 2, should_skip_update_fn=optax.skip_not_finite)


def multisteps_inside_a_chain(learning_rate):
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.MultiSteps(optax.adam(learning_rate), 2).gradient_transformation(),
  )


@pytest.mark.parametrize(
  'fields, message',
  [
    (
      dict(optimizer=growing_every_k, epochs=1),
      r'optimizer=growing_every_k is invalid: .*every_k_schedule as a function of the '
      r'update count.*a constant int',
    ),
    (
      dict(optimizer=skipping_multisteps, epochs=1),
      r'optimizer=skipping_multisteps is invalid: .*should_skip_update_fn.*leave it out',
    ),
    (
      dict(optimizer=multisteps_inside_a_chain, epochs=1),
      r'optimizer=multisteps_inside_a_chain is invalid: .*MultiSteps inside its chain'
      r'.*around its whole',
    ),
    (
      dict(optimizer=accumulating_adam(4), updates=20),
      r'updates=20 is invalid: .*accumulates k=4 batches per parameter update'
      r'.*give the budget in epochs=',
    ),
    (
      dict(optimizer=accumulating_adam(4), epochs=0.2),
      r'optimizer=factory is invalid: .*k=4 .*reads only 2 batches: give more epochs',
    ),
  ],
  ids=['every_k-function', 'should_skip', 'inside-chain', 'updates-budget', 'too-short'],
)
def test_multisteps_the_sweep_cannot_follow_is_refused_with_its_reason(fields, message):
  cfg = sweep.SweepConfig(**BASE, learning_rate=0.01, **fields)
  with counting_compiles() as names, pytest.raises(sweep.ConfigError, match=message):
    sweep.check(cfg)
  assert names == []


# ------------------------------------------------------------------ lookahead ----


def lookahead_adam(learning_rate):
  return optax.lookahead(optax.adam(learning_rate), sync_period=4, slow_step_size=0.5)


def lookahead_reference(opt, seed, total):
  """A plain optax loop over LookaheadParams: gradients at the fast parameters, as optax's
  documentation writes it."""

  @jax.jit
  def step(params, opt_state, xb, yb):
    def batch_loss(p):
      return jnp.mean(jnp.mean(jnp.square(mlp_apply(p, xb) - yb), axis=-1))

    grads = jax.grad(batch_loss)(params.fast)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = optax.LookaheadParams.init_synced(mlp_init(jax.random.fold_in(jax.random.key(seed), 0)))
  opt_state = opt.init(params)
  trail = [params]
  per_epoch = N_TRAIN // BATCH
  for t in range(total):
    epoch, j = divmod(t, per_epoch)
    idx = data_order(seed, epoch)[j * BATCH : (j + 1) * BATCH]
    params, opt_state = step(params, opt_state, X[idx], Y[idx])
    trail.append(params)
  return trail


def test_lookahead_trains_fast_parameters_and_is_evaluated_at_the_slow_ones(tmp_path):
  lrs = [0.01, 0.05]
  cfg = sweep.SweepConfig(
    **BASE, optimizer=lookahead_adam, learning_rate=lrs, epochs=3, num_evals=6, keep_best=True
  )
  result = sweep.run(cfg, workdir=str(tmp_path), progress=False)
  table, curves = result.table, result.curves
  assert (table.status == 'ok').all()
  assert (table.updates == 3 * (N_TRAIN // BATCH)).all()
  apart = 0.0
  for i, row in table.iterrows():
    trail = lookahead_reference(lookahead_adam(float(row.learning_rate)), 0, int(row.updates))
    mine = curves[curves.run == i]
    want = np.array([val_loss(trail[int(u)].slow) for u in mine.updates])
    np.testing.assert_allclose(mine.val_loss.to_numpy(), want, rtol=1e-4)
    assert row.final_val_loss == pytest.approx(want[-1], rel=1e-4)
    assert excess(result.params(i), trail[-1].slow) <= 0
    raw = result.params(i, raw=True)
    assert isinstance(raw, optax.LookaheadParams)
    assert excess(raw, trail[-1]) <= 0
    best = int(mine.updates.to_numpy()[np.argmin(want)])
    assert excess(result.params(i, best=True), trail[best].slow) <= 0
    # The last point falls between synchronisations (30 updates, sync_period 4).
    apart = max(apart, abs(val_loss(trail[-1].fast) - want[-1]) / want[-1])
  assert apart > 1e-3  # the fast parameters would give other numbers
  loaded = sweep.load(str(tmp_path))
  for i in table.index[table.pareto]:
    assert excess(loaded.params(int(i)), result.params(int(i))) <= 0


def test_lr_find_ramp_with_lookahead_takes_batch_losses_at_the_fast_parameters():
  """The ramp's batch losses equal an optax loop over LookaheadParams whose adam reads the
  ramp's learning rates by its own count (stop_factor high, so the ramp runs to its end)."""
  num_it, start, end = 20, 1e-4, 1e-1
  cfg = sweep.SweepConfig(**BASE, optimizer=lookahead_adam, learning_rate=0.01, epochs=1)
  found = sweep.lr_find(
    cfg, method='ramp', start_lr=start, end_lr=end, num_it=num_it, stop_factor=1e9
  )
  lrs = start * (end / start) ** (np.arange(num_it) / (num_it - 1))
  opt = optax.lookahead(optax.adam(lambda count: jnp.asarray(lrs)[count]), 4, 0.5)
  params = optax.LookaheadParams.init_synced(mlp_init(jax.random.fold_in(jax.random.key(0), 0)))
  state, want = opt.init(params), []
  per_epoch = N_TRAIN // BATCH
  for t in range(num_it):
    epoch, j = divmod(t, per_epoch)
    idx = data_order(0, epoch)[j * BATCH : (j + 1) * BATCH]

    def batch_loss(p, idx=idx):
      return jnp.mean(jnp.mean(jnp.square(mlp_apply(p, X[idx]) - Y[idx]), axis=-1))

    loss, grads = jax.value_and_grad(batch_loss)(params.fast)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want.append(float(loss))
  np.testing.assert_allclose(found.raw_losses, want, rtol=1e-4)


def test_lr_find_ramp_with_multisteps_is_refused_for_the_grid():
  cfg = sweep.SweepConfig(**BASE, optimizer=accumulating_adam(2), learning_rate=0.01, epochs=1)
  with pytest.raises(sweep.ConfigError, match=r"method='ramp' is invalid: .*k=2.*method='grid'"):
    sweep.lr_find(cfg, method='ramp', num_it=20)


# ------------------------------------------------- learning-rate-free contrib optimizers ----


def prodigy(learning_rate):
  return optax.contrib.prodigy(learning_rate)


def dadapt_adamw(learning_rate):
  return optax.contrib.dadapt_adamw(learning_rate)


def mechanic_adam(learning_rate):
  return optax.contrib.mechanize(optax.adam(learning_rate))


def cocob(learning_rate):
  return optax.contrib.cocob(learning_rate)


LR_FREE = {f.__name__: f for f in (prodigy, dadapt_adamw, mechanic_adam, cocob)}


def test_learning_rate_free_contrib_optimizers_equal_an_optax_loop():
  cfg = sweep.SweepConfig(
    **BASE, optimizer=list(LR_FREE.values()), learning_rate=[1.0, 0.5], epochs=2
  )
  result = sweep.run(cfg, progress=False)
  table = result.table
  assert (table.status == 'ok').all() and set(table.optimizer) == set(LR_FREE)
  for i, row in table.iterrows():
    trail = reference(LR_FREE[row.optimizer](float(row.learning_rate)), 0, int(row.updates))
    assert excess(result.params(i), trail[-1][0], rtol=1e-3) <= 0, row.optimizer


def test_a_factory_whose_updates_ignore_the_learning_rate_is_warned_where_it_is_swept():
  """cocob (optax 0.2's scales its gradient first: no learning rate reaches its updates) and a
  factory that fixes its own rate are warned before training; adam is not, nor a sweep of
  one learning rate, where there is nothing to say."""
  import warnings

  from sweep.preflight import LearningRateUnusedWarning

  def fixed(learning_rate):
    del learning_rate
    return optax.adam(1e-3)

  for factory in (cocob, fixed):
    with pytest.warns(LearningRateUnusedWarning, match=factory.__name__ + '.*changes nothing'):
      sweep.check(sweep.SweepConfig(**BASE, optimizer=factory, learning_rate=[1.0, 0.5]))
  with warnings.catch_warnings():
    warnings.simplefilter('error', LearningRateUnusedWarning)
    sweep.check(sweep.SweepConfig(**BASE, optimizer=optax.adam, learning_rate=[1e-3, 1e-2]))
    sweep.check(sweep.SweepConfig(**BASE, optimizer=fixed, learning_rate=1e-2))


# ------------------------------------------------------------------- apply_if_finite ----

POISON = 37  # the training example whose prediction is infinite


def poisoned_apply(params, x):
  """The MLP, divided by the last input column: 1 everywhere but at the poisoned example."""
  return mlp_apply(params, x[:, :D_IN]) / x[:, D_IN:]


def _poisoned():
  ones = np.ones((N_TRAIN, 1), np.float32)
  ones[POISON] = 0.0
  x = np.concatenate([X, ones], axis=1)
  x_val = np.concatenate([X_VAL, np.ones((N_VAL, 1), np.float32)], axis=1)
  return x, sweep.data.arrays(x, Y, x_val, Y_VAL)


def skip_nonfinite_adam(learning_rate, max_errors):
  return optax.apply_if_finite(optax.adam(learning_rate), max_consecutive_errors=max_errors)


def reference_poisoned(opt, x, total, threshold=None):
  return reference(opt, 0, total, x=x, threshold=threshold, apply=poisoned_apply)


def test_a_batch_apply_if_finite_skips_does_not_freeze_its_run():
  """Each epoch has one batch with an infinite loss. apply_if_finite skips it, as in the
  plain optax loop; adam alone is frozen there; apply_if_finite that gives up after 0
  errors applies it, and the run is frozen with the parameters of the step before."""
  x, data = _poisoned()
  total = 2 * N_TRAIN // BATCH
  factories = {
    'skips': lambda learning_rate: skip_nonfinite_adam(learning_rate, 3),
    'gives_up': lambda learning_rate: skip_nonfinite_adam(learning_rate, 0),
  }
  cfg = sweep.SweepConfig(
    **{**BASE, 'data': data, 'model': (mlp_init, poisoned_apply)},
    optimizer=[factories['skips'], factories['gives_up'], 'adam'],
    learning_rate=0.01,
    epochs=2,
  )
  result = sweep.run(cfg, progress=False)
  table = result.table
  skips, gives_up, adam = (table.iloc[k] for k in range(3))
  assert skips.status == 'ok' and skips.updates == total
  trail = reference_poisoned(factories['skips'](0.01), x, total)
  assert excess(result.params(0), trail[-1][0]) <= 0
  assert np.isfinite(skips.final_batch_loss)  # the skipped batches are left out of it
  # The plain rule: a non-finite batch loss freezes adam, and apply_if_finite that applies it.
  stop = reference_poisoned(optax.adam(0.01), x, total, threshold=100.0)
  assert adam.status == 'diverged' and adam.updates == len(stop) - 1 < total
  assert gives_up.status == 'diverged' and gives_up.updates == adam.updates
  trail = reference_poisoned(factories['gives_up'](0.01), x, total, threshold=100.0)
  assert excess(result.params(1), trail[-1][0]) <= 0


# ------------------------------------------------------------------- conditional axes ----


def my_adamw(learning_rate, weight_decay, clip_norm):
  return optax.chain(
    optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, weight_decay=weight_decay)
  )


def test_an_axis_applies_only_to_the_optimizers_that_take_it():
  """weight_decay and clip_norm are crossed with my_adamw only; adam and lion (which takes
  weight_decay but no clip_norm) run once per value of what they take."""
  cfg = sweep.SweepConfig(
    **BASE,
    optimizer=[my_adamw, 'adam', 'lion'],
    weight_decay=[1e-4, 0.1],
    hyperparameters={'clip_norm': [0.05, 10.0]},
    learning_rate=[0.003, 0.01],
    epochs=1,
  )
  result = sweep.run(cfg, progress=False)
  table = result.table
  counts = table.optimizer.value_counts().to_dict()
  assert counts == {'my_adamw': 8, 'lion': 4, 'adam': 2}
  assert table.weight_decay[table.optimizer == 'adam'].isna().all()
  assert table.clip_norm[table.optimizer != 'my_adamw'].isna().all()
  for i, row in table.iterrows():
    lr = float(row.learning_rate)
    if row.optimizer == 'my_adamw':
      opt = my_adamw(lr, np.float32(row.weight_decay), np.float32(row.clip_norm))
    elif row.optimizer == 'lion':
      opt = optax.lion(lr, weight_decay=np.float32(row.weight_decay))
    else:
      opt = optax.adam(lr)
    trail = reference(opt, 0, int(row.updates))
    assert excess(result.params(i), trail[-1][0]) <= 0, (i, row.optimizer)


def test_explicit_runs_still_refuse_a_field_their_optimizer_does_not_take():
  cfg = sweep.SweepConfig(
    **BASE, runs=[{'optimizer': 'adam', 'weight_decay': 0.1, 'learning_rate': 0.01}]
  )
  with pytest.raises(sweep.ConfigError, match="optimizer 'adam' takes no weight_decay"):
    sweep.check(cfg)


def test_a_sampled_axis_applies_only_to_the_optimizers_that_take_it():
  cfg = sweep.SweepConfig(
    **BASE,
    optimizer=['adamw', 'adam'],
    weight_decay=sweep.space.loguniform(1e-4, 1e-1),
    learning_rate=sweep.space.loguniform(1e-3, 1e-1),
    samples=3,
    epochs=1,
  )
  runs = sweep.check(cfg).runs
  adamw = [r.values for r in runs if r.values['optimizer'] == 'adamw']
  adam = [r.values for r in runs if r.values['optimizer'] == 'adam']
  assert len(adamw) == len(adam) == 3
  assert all(v['weight_decay'] is not None for v in adamw)
  assert all(v['weight_decay'] is None for v in adam)
  assert [v['learning_rate'] for v in adam] == [v['learning_rate'] for v in adamw]
