"""Batch-size schedules: the sweep against the loop a user would write, on the same runs.

    python scripts/ramp_bench.py [--quick]

The runs of experiments/increase_batch_size.py (Smith et al. 2018 on MNIST-1D: a
learning-rate decay at batch 32, a batch-size increase 32 -> 160 -> 800, the hybrid, and
batch 32 at a constant rate), each at several learning rates, trained
- by the sweep: one `sweep.run`, the ramp runs moving between batch groups;
- by a plain loop, one run after the other: each stage one jitted `lax.scan` of optax
  steps over its epochs (the learning rates of the stage computed from the run's optax
  schedule and passed as data, the batches as index arrays), compiled once per stage
  shape and reused by every run with that shape.
Each is timed twice in one process: the first call (compiles included) and a second
call with other learning rates (compiled). Prints seconds and the ratio loop / sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sweep


def _experiment():
  path = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'increase_batch_size.py')
  spec = importlib.util.spec_from_file_location('increase_batch_size', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def configs(exp, learning_rates, seeds, epochs):
  base = exp.get_config()
  runs = [
    dict(strategy, learning_rate=lr, seed=seed)
    for strategy in exp.STRATEGIES.values()
    for lr in learning_rates
    for seed in seeds
  ]
  # The same flax module for the sweep and the loop (its output width given).
  model = sweep.models.mlp(hidden=(100, 100), outputs=10)
  return dataclasses.replace(base, model=model, runs=runs, epochs=epochs)


def stages_of(plan, run):
  stages = run.stages or ((0, run.values['batch_size']),)
  ends = [e for e, _ in stages[1:]] + [int(plan.config.epochs)]
  return [(e, end, b) for (e, b), end in zip(stages, ends, strict=True)]


@functools.cache
def stage_program(apply, opt):
  """One stage: a jitted scan of optax steps over the batches `idx` (steps, B)."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_stage(params, opt_state, lrs, idx, x, y):
    def step(carry, inputs):
      params, state = carry
      lr, rows = inputs
      state = state._replace(hyperparams={**state.hyperparams, 'learning_rate': lr})

      def loss(p):
        logits = apply(p, x[rows])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()

      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (lrs, idx))
    return params, opt_state

  return train_stage


def plain_loop(plan, module):
  """Every run of `plan`, one after the other (see the module's docstring)."""
  data = plan.config.data
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  n = data.n_train
  opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)
  apply = module.apply
  out = []
  for run in plan.runs:
    sched = run.schedule
    lr0 = float(run.values['learning_rate'])
    if isinstance(sched, str):
      total = run.total_updates
      fn = {
        'constant': optax.constant_schedule(lr0),
        'step': optax.exponential_decay(
          lr0, max(1, round(plan.config.decay_every * total)), plan.config.decay_rate, True
        ),
      }[sched]
    else:
      fn = sched(lr0, run.total_updates)
    seed = int(run.values['seed'])
    variables = module.init(jax.random.fold_in(jax.random.key(seed), 0), x[:1])
    state = opt.init(variables)
    count = 0
    for first, end, b in stages_of(plan, run):
      spe = n // b
      idx = []
      for epoch in range(first, end):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
        perm = np.asarray(jax.random.permutation(key, n))
        idx.append(perm[: spe * b].reshape(spe, b))
      idx = np.concatenate(idx)
      lrs = np.asarray([fn(count + k) for k in range(len(idx))], np.float32)
      variables, state = stage_program(apply, opt)(variables, state, lrs, idx, x, y)
      count += len(idx)
    out.append(variables)
  jax.block_until_ready(out)
  return out


def timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='9 epochs, 2 learning rates, 1 seed')
  args = parser.parse_args()
  exp = _experiment()
  epochs = 9 if args.quick else exp.EPOCHS
  seeds = (0,) if args.quick else (0, 1)
  first = configs(exp, (0.03, 0.1), seeds, epochs)
  second = configs(exp, (0.02, 0.05), seeds, epochs)
  plans = [sweep.check(c) for c in (first, second)]
  module = first.model
  runs = len(plans[0].runs)
  print(f'{runs} runs, {epochs} epochs, MNIST-1D MLP 40-100-100-10, {jax.default_backend()}')
  engine = [timed(lambda c=c: sweep.run(c, progress=False)) for c in (first, second)]
  loop = [timed(lambda p=p: plain_loop(p, module)) for p in plans]
  print(f'{"":>24} {"first call":>11} {"second call":>12}')
  print(f'{"sweep (s)":>24} {engine[0]:11.1f} {engine[1]:12.1f}')
  print(f'{"plain loop (s)":>24} {loop[0]:11.1f} {loop[1]:12.1f}')
  print(f'{"loop / sweep":>24} {loop[0] / engine[0]:10.2f}x {loop[1] / engine[1]:11.2f}x')


if __name__ == '__main__':
  main()
