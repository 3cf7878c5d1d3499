"""Adaptive search against the grid and against Optuna, on the same work.

    python scripts/search_bench.py --quick [--figure docs/search_bench.png]  # digits, an MLP
    python scripts/search_bench.py [--model digits-mlp|mnist1d-mlp|digits-cnn ...] [--figure F]

For each method: the best validation loss reached, the compute spent (run-updates: the
updates of every run summed) and the wall seconds, warm (programs compiled by a first
call) and first call. Methods:
- grid: every configuration trained to its end (one sweep);
- halving: successive halving in the program over the same configurations;
- asha: successive halving with `--slots` runs at once (the grid's size by default), over
  three times as many sampled configurations (stopped runs' slots refilled);
- pbt: population-based training of constant-learning-rate members;
- optuna-tpe: Optuna's TPE with its SuccessiveHalvingPruner, one trial at a time, each
  trained by a plain optax loop compiled once (the loop a user writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sweep


def init(key):
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.normal(k1, (64, 64)) / 8.0,
    'b1': jnp.zeros(64),
    'w2': jax.random.normal(k2, (64, 10)) / 8.0,
    'b2': jnp.zeros(10),
  }


def apply(params, x):
  return jax.nn.relu(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


MODEL = (init, apply)


class CNN(nn.Module):
  """The flax examples' MNIST CNN (examples/mnist/train.py), unchanged."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


def workload(name):
  """(data, engine model, (init, apply) of the plain loop, learning rates, batch sizes, epochs)."""
  if name == 'digits-mlp':
    lrs = [float(v) for v in np.geomspace(1e-4, 1.0, 27)]
    return sweep.data.digits(), MODEL, MODEL, lrs, (32, 128), 9
  if name == 'mnist1d-mlp':
    data = sweep.data.mnist1d()
    lrs = [float(v) for v in np.geomspace(1e-4, 1.0, 27)]
    pair = (_mlp_init(data.x_train.shape[1], 100), apply)
    return data, pair, pair, lrs, (32, 128), 9
  assert name == 'digits-cnn'
  data = sweep.data.digits(flatten=False)
  data = dataclasses.replace(data, x_train=data.x_train[..., None], x_val=data.x_val[..., None])
  module = CNN()
  x0 = data.x_train[:1]
  pair = (
    lambda key: module.init(key, x0)['params'],
    lambda params, x: module.apply({'params': params}, x),
  )
  lrs = [float(v) for v in np.geomspace(1e-4, 1e-1, 9)]
  return data, module, pair, lrs, (32, 128), 9


def _mlp_init(d_in, hidden):
  def init_fn(key):
    k1, k2 = jax.random.split(key)
    return {
      'w1': jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
      'b1': jnp.zeros(hidden),
      'w2': jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
      'b2': jnp.zeros(10),
    }

  return init_fn


MODELS = ('digits-mlp', 'mnist1d-mlp', 'digits-cnn')


def base(data, epochs, model=MODEL, **changes):
  # The rules judge by validation loss: the training probe is kept small (256 examples), so
  # that evaluation costs about what the plain loop's does (it measures validation only).
  return sweep.SweepConfig(
    model=model,
    data=data,
    optimizer='adam',
    epochs=epochs,
    num_evals=9,
    train_eval_size=256,
    **changes,
  )


def _timeline(result, seconds):
  """(seconds, best validation loss so far) through a warm sweep: the scheduler's rounds,
  or, for a plain grid, its evaluation points spread evenly over its time."""
  sched = result.config.get('scheduler')
  if sched is not None:
    line = sched['timeline']['seconds_best']
    shift = seconds - line[-1][0]  # planning and placing the data, before the first round
    return [(t + shift, b) for t, b in line]
  curves = result.curves
  points = int(curves['eval'].max())
  out = []
  for k in range(1, points + 1):
    best = float(np.nanmin(curves[(curves['eval'] >= 1) & (curves['eval'] <= k)]['val_loss']))
    out.append((seconds * k / points, best))
  return out


def _summary(name, result, seconds, first):
  t = result.table
  best = float(np.nanmin(t['best_val_loss']))
  return {
    'method': name,
    'configurations': len(t),
    'best_val_loss': best,
    'run_updates': int(t['updates'].sum()),
    'warm_s': seconds,
    'first_s': first,
    'timeline': _timeline(result, seconds),
  }


def reached(row, target):
  """Seconds until the best-so-far came within `target`, or None."""
  return next((t for t, b in row['timeline'] if b <= target), None)


def timed(fn):
  t0 = time.perf_counter()
  first = fn()
  t1 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t1, t1 - t0, first


def engine_methods(data, model, lrs, batches, epochs, slots):
  rows = []
  grid = base(data, epochs, model, learning_rate=lrs, batch_size=batches)
  res, warm, first, _ = timed(lambda: sweep.run(grid, progress=False))
  rows.append(_summary('grid', res, warm, first))
  halving = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9)
  cfg = grid.replace(scheduler=halving, num_evals=None)
  res, warm, first, _ = timed(lambda: sweep.run(cfg, progress=False))
  rows.append(_summary('halving', res, warm, first))
  n = len(lrs) * len(batches)
  refill = sweep.schedulers.SuccessiveHalving(eta=3, min_fraction=1 / 9, slots=slots)
  cfg = base(
    data,
    epochs,
    model,
    learning_rate=sweep.space.loguniform(min(lrs), max(lrs)),
    batch_size=sweep.space.choice(list(batches)),
    samples=3 * n,
    scheduler=refill,
  ).replace(num_evals=None)
  res, warm, first, _ = timed(lambda: sweep.run(cfg, progress=False))
  rows.append(_summary(f'asha, {slots} slots refilled, 3x configurations', res, warm, first))
  pbt = sweep.schedulers.PBT(interval_updates=max(1, _updates(data, min(batches), epochs) // 9))
  cfg = base(data, epochs, model, learning_rate=lrs, batch_size=min(batches), scheduler=pbt)
  cfg = cfg.replace(num_evals=None)
  res, warm, first, _ = timed(lambda: sweep.run(cfg, progress=False))
  rows.append(_summary('pbt (constant-lr members)', res, warm, first))
  const = base(data, epochs, model, learning_rate=lrs, batch_size=min(batches))
  res, warm, first, _ = timed(lambda: sweep.run(const, progress=False))
  rows.append(_summary('same population, constant lr', res, warm, first))
  return rows


def _updates(data, batch, epochs):
  return round(epochs * (data.n_train // batch))


# ------------------------------------------------------------------ Optuna, one trial at a time


def optuna_method(data, pair, lrs, batches, epochs, n_trials):
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  x, y, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
  init, apply = pair

  @jax.jit
  def step(params, state, xb, yb, lr):
    def loss(p):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb))

    grads = jax.grad(loss)(params)
    direction, state = optax.scale_by_adam().update(grads, state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, direction)), state

  @jax.jit
  def val_loss(params):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, xv), yv))

  def objective(trial):
    lr = trial.suggest_float('learning_rate', min(lrs), max(lrs), log=True)
    b = trial.suggest_categorical('batch_size', list(batches))
    params = jax.jit(init)(jax.random.fold_in(jax.random.key(0), 0))
    state = optax.scale_by_adam().init(params)
    per_epoch = data.n_train // b
    total = round(epochs * per_epoch)
    every = max(1, total // 9)
    rng = np.random.default_rng(0)
    order = rng.permutation(data.n_train)
    best = math.inf
    for t in range(total):
      j = t % per_epoch
      if j == 0:
        order = rng.permutation(data.n_train)
      idx = order[j * b : (j + 1) * b]
      params, state = step(params, state, x[idx], y[idx], np.float32(lr))
      if (t + 1) % every == 0 or t + 1 == total:
        v = float(val_loss(params))
        best = min(best, v) if math.isfinite(v) else best
        trial.report(v, t + 1)
        trial.set_user_attr('updates', t + 1)
        if trial.should_prune():
          raise optuna.TrialPruned()
    return best

  def run():
    start = time.perf_counter()
    line = []

    def note(study, trial):
      values = [v for t in study.trials for v in t.intermediate_values.values()]
      line.append((time.perf_counter() - start, float(np.nanmin(values)) if values else math.nan))

    study = optuna.create_study(
      sampler=optuna.samplers.TPESampler(seed=0),
      pruner=optuna.pruners.SuccessiveHalvingPruner(reduction_factor=3),
    )
    study.optimize(objective, n_trials=n_trials, callbacks=[note])
    study.set_user_attr('timeline', line)
    return study

  t0 = time.perf_counter()
  run()
  t1 = time.perf_counter()
  study = run()
  warm = time.perf_counter() - t1
  values = [t.value for t in study.trials if t.value is not None]
  inter = [min(t.intermediate_values.values()) for t in study.trials if t.intermediate_values]
  return {
    'method': 'optuna-tpe + pruner, plain loop',
    'configurations': len(study.trials),
    'best_val_loss': float(min(values + inter)),
    'run_updates': int(sum(t.user_attrs.get('updates', 0) for t in study.trials)),
    'warm_s': warm,
    'first_s': t1 - t0,
    'timeline': study.user_attrs['timeline'],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='the digits MLP alone')
  parser.add_argument('--model', choices=MODELS, action='append', help='workloads (default all)')
  parser.add_argument('--trials', type=int, help='Optuna trials (default: the grid size)')
  parser.add_argument('--figure', help='write best-so-far against wall time to this PNG')
  parser.add_argument('--slots', type=int, help='ASHA slots (default: the grid size)')
  args = parser.parse_args()
  sweep.set_cpu_devices()
  names = ['digits-mlp'] if args.quick else (args.model or list(MODELS))
  for name in names:
    data, model, pair, lrs, batches, epochs = workload(name)
    print(f'\n{name}: {len(lrs)} learning rates x batch sizes {batches}, {epochs} epochs')
    rows = engine_methods(data, model, lrs, batches, epochs, args.slots or len(lrs) * 2)
    try:
      rows.append(optuna_method(data, pair, lrs, batches, epochs, args.trials or len(lrs) * 2))
    except ImportError:
      print('optuna is not installed: pip install optuna')
    _table(rows, args.figure if len(names) == 1 else _named(args.figure, name))


def _named(path, name):
  if not path:
    return None
  stem, dot, ext = path.rpartition('.')
  return f'{stem}_{name}.{ext}' if dot else f'{path}_{name}'


def _table(rows, figure):
  grid = rows[0]
  target = 1.02 * grid['best_val_loss']
  print(
    '| method | configurations | best val loss | run-updates (x grid) | warm s (x grid) '
    f'| s to within 2 % of the grid best ({target:.4f}) | first s |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    t = reached(r, target)
    print(
      f'| {r["method"]} | {r["configurations"]} | {r["best_val_loss"]:.4f} | '
      f'{r["run_updates"]} ({r["run_updates"] / grid["run_updates"]:.2f}) | '
      f'{r["warm_s"]:.2f} ({r["warm_s"] / grid["warm_s"]:.2f}) | '
      f'{"never" if t is None else f"{t:.2f}"} | {r["first_s"]:.2f} |'
    )
  if figure:
    _figure(rows, target, figure)


def _figure(rows, target, path):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for r in rows:
    t, b = zip(*r['timeline'], strict=True)
    ax.step(t, b, where='post', label=r['method'])
  ax.axhline(target, color='grey', ls=':', lw=1, label='grid best + 2 %')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('wall seconds (warm)')
  ax.set_ylabel('best validation loss so far')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'figure: {path}')


if __name__ == '__main__':
  main()
