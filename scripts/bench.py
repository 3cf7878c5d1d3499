"""The engine against what a researcher would otherwise run, same runs, one process.

  python scripts/bench.py            # full: about 15 minutes on a 2-core CPU
  python scripts/bench.py --quick    # a few minutes
  python scripts/bench.py --only user --mnist DIR   # the user-module rows, on MNIST IDX files
  python scripts/bench.py --only user --match 'char LM'   # one of them

Baselines, each training the same runs (same data, model, optimizer, steps):
  (b) sequential optax, compiled once: one run's whole training is a `lax.scan` inside
      `jit` with the learning rate an argument, called once per run (the strongest
      sequential JAX form), on the engine's own model (`sweep.models`, whose weights are
      stored (outputs, inputs): faster for one run too);
  (b') the same loop on the MLP written with `flax.linen.Dense` ((inputs, outputs)
      kernels), as a researcher would write it; same initial values;
  (c) naive: per config, build the optimizer and jit a step, loop over batches in Python;
  (d) PyTorch eager, one run after another, one thread (skipped where torch is missing);
  (e) the seed's Keras model with `fit` per config (skipped where keras is missing).
Timings are warm (compiles excluded and reported apart). Each line prints run-steps per
second (runs x updates / seconds), the engine's ratio to each baseline, and the
engine's achieved GFLOP/s against a float32 matmul rate measured here.

The user-module rows train one unmodified flax module (the flax examples/mnist CNN, the
seed MLP and the 1M-parameter MLP written with `nn.Dense`) through the engine, through
(b) the sequential optax loop compiled once, and through (f) the hand-written
`jax.jit(jax.vmap(train))(learning_rates)`, PureJaxRL's form, `train` initialising the
module and running a `lax.scan` over one run's optax steps. The three are timed warm,
interleaved and repeated in one process (the machine is shared): medians, and the range
of the ratios over the repetitions. The first calls (compiles included) are reported too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sweep  # noqa: E402


def mnist_shaped(n: int, seed: int = 0):
  """Synthetic MNIST-shaped data: 784 features in [0, 1], 10 classes, learnable."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(784, 10)).astype(np.float32)
  x = rng.uniform(size=(n, 784)).astype(np.float32)
  y = np.argmax(x @ w + rng.normal(scale=2.0, size=(n, 10)), axis=1).astype(np.int32)
  return x, y


def matmul_gflops(seconds: float = 1.0) -> float:
  """float32 matmul rate of this machine, as XLA runs it (1024^3)."""
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    f(a).block_until_ready()
    n += 1
  return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


# ------------------------------------------------------------- baselines ----


class FlaxMLP(nn.Module):
  """The seed's MLP as a researcher writes it, with flax.linen.Dense ((inputs, outputs)
  kernels); it draws the same initial values as sweep.models.MLP, transposed."""

  hidden: tuple[int, ...]
  outputs: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.outputs)(x)


def sequential_optax(init_fn, apply_fn, x, y, lrs, batch, steps):
  """(b): one run = one jitted scan; compiled once, called per run."""

  @jax.jit
  def train_one(lr, key):
    params = init_fn(key)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    state = opt.init(params)

    def step(carry, j):
      params, state = carry
      xb = jax.lax.dynamic_slice_in_dim(x, j * batch, batch)
      yb = jax.lax.dynamic_slice_in_dim(y, j * batch, batch)
      loss, g = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb).mean()
      )(params)
      u, state = opt.update(g, state, params)
      return (optax.apply_updates(params, u), state), loss

    (params, _), _ = jax.lax.scan(step, (params, state), jnp.arange(steps) % (x.shape[0] // batch))
    return params

  key = jax.random.key(0)
  t0 = time.perf_counter()
  jax.block_until_ready(train_one(np.float32(lrs[0]), key))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for lr in lrs:
    jax.block_until_ready(train_one(np.float32(lr), key))
  return time.perf_counter() - t0, compile_s


def naive_loop(init_fn, apply_fn, x, y, lrs, batch, steps):
  """(c): per config, a new optimizer and a new jitted step; batches from Python."""
  t0 = time.perf_counter()
  per_epoch = x.shape[0] // batch
  for lr in lrs:
    opt = optax.adam(float(lr))
    params = init_fn(jax.random.key(0))
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb, opt=opt):
      g = jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb).mean()
      )(params)
      u, state = opt.update(g, state, params)
      return optax.apply_updates(params, u), state

    for j in range(steps):
      k = j % per_epoch
      params, state = step(
        params, state, x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
      )
    jax.block_until_ready(params)
  return time.perf_counter() - t0


def torch_eager(x, y, lrs, batch, steps, hidden=(10,)):
  """(d): PyTorch eager, one run after another; None where torch is missing."""
  try:
    import torch
  except ImportError:
    return None
  # One thread: for models this small, more threads only add synchronisation (measured:
  # 0.46 ms a step with 1 thread, 4.2 ms with 2 on a shared 2-core machine).
  torch.set_num_threads(1)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
  per_epoch = x.shape[0] // batch
  t0 = time.perf_counter()
  for lr in lrs:
    torch.manual_seed(0)
    sizes = (x.shape[1],) + tuple(hidden)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
      layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 10))
    opt = torch.optim.Adam(model.parameters(), lr=float(lr))
    for j in range(steps):
      k = j % per_epoch
      loss = torch.nn.functional.cross_entropy(
        model(xt[k * batch : (k + 1) * batch]), yt[k * batch : (k + 1) * batch]
      )
      opt.zero_grad()
      loss.backward()
      opt.step()
  return time.perf_counter() - t0


def keras_fit(x, y, lrs, batch, steps):
  """(e): the seed's Keras model, `fit` per config; None where keras is missing."""
  try:
    import keras
  except ImportError:
    return None
  t0 = time.perf_counter()
  n = steps * batch
  onehot = np.eye(10, dtype=np.float32)[y[:n]]
  for lr in lrs:
    model = keras.Sequential(
      [
        keras.layers.Input((x.shape[1],)),
        keras.layers.Dense(10, activation='relu'),
        keras.layers.Dense(10, activation='softmax'),
      ]
    )
    model.compile(
      optimizer=keras.optimizers.Adam(learning_rate=float(lr)), loss='categorical_crossentropy'
    )
    model.fit(x[:n], onehot, batch_size=batch, epochs=1, shuffle=False, verbose=0)
  return time.perf_counter() - t0


# ---------------------------------------------------------------- engine ----


def engine(model, x, y, lrs, batches, steps_or_epochs, hidden):
  del hidden
  """(a): returns (warm seconds, compile-inclusive first seconds, result)."""
  data = sweep.data.arrays(x, y, x[:1024], y[:1024])
  cfg = sweep.SweepConfig(
    model=model,
    data=data,
    loss='softmax_cross_entropy',
    optimizer='adam',
    learning_rate=list(lrs),
    batch_size=list(batches),
    seed=0,
    shuffle=False,
    epochs=steps_or_epochs,
    num_evals=1,
    train_eval_size=1024,
  )
  t0 = time.perf_counter()
  sweep.run(cfg, progress=False)
  first = time.perf_counter() - t0
  # Other values, same shapes: the second run compiles nothing.
  cfg = cfg.replace(learning_rate=[lr * 1.01 for lr in lrs])
  t0 = time.perf_counter()
  result = sweep.run(cfg, progress=False)
  return time.perf_counter() - t0, first, result


def row(name, runs_steps, seconds, ref=None):
  rate = runs_steps / seconds
  ratio = f'{ref / seconds:6.2f}x' if ref else ''
  return f'  {name:<34} {seconds:8.2f} s {rate:12.0f} run-steps/s {ratio}'


def train_flops_per_example(apply_fn, params, x) -> float:
  """Forward + backward FLOPs of one example, as XLA counts them (3x the forward)."""
  compiled = jax.jit(apply_fn).lower(params, x[:1]).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return 3.0 * float(analysis['flops'])


def workload(title, hidden, lrs, batches, epochs, n, quick, peak, model=None, data=None):
  print(
    f'\n{title}: {len(lrs)} learning rates x batch sizes {batches}, {epochs} epoch(s) of {n} '
    'examples'
  )
  x, y = data if data is not None else mnist_shaped(n)
  n = len(x)
  model_given = model
  model = model if model is not None else sweep.models.MLP(hidden=hidden, outputs=10)
  init_fn, apply_fn = sweep.models.to_functions(model, x[:1], 10)
  warm, first, result = engine(model, x, y, lrs, batches, epochs, hidden)
  run_steps = sum(len(lrs) * int(epochs * (n // b)) for b in batches)
  examples = sum(len(lrs) * int(epochs * (n // b)) * b for b in batches)
  flops = examples * train_flops_per_example(apply_fn, init_fn(jax.random.key(0)), x)
  print(
    f'  engine: first call {first:.2f} s (compiles included), warm {warm:.2f} s, '
    f'{flops / warm / 1e9:.1f} GFLOP/s = {flops / warm / 1e9 / peak:.0%} of matmul peak {peak:.0f}'
  )
  print(row('(a) engine', run_steps, warm))
  seq_total, seq_compile = 0.0, 0.0
  for b in batches:
    s, c = sequential_optax(
      init_fn, apply_fn, jnp.asarray(x), jnp.asarray(y), lrs, b, int(epochs * (n // b))
    )
    seq_total += s
    seq_compile += c
  print(
    row(f'(b) sequential optax (compile {seq_compile:.1f} s)', run_steps, seq_total)
    + f'  engine {seq_total / warm:.2f}x'
  )
  if model_given is None:
    f_init, f_apply = sweep.models.to_functions(FlaxMLP(tuple(hidden), 10), x[:1], 10)
    flax_total = sum(
      sequential_optax(
        f_init, f_apply, jnp.asarray(x), jnp.asarray(y), lrs, b, int(epochs * (n // b))
      )[0]
      for b in batches
    )
    print(
      row("(b') sequential optax, nn.Dense model", run_steps, flax_total)
      + f'  engine {flax_total / warm:.2f}x'
    )
  if quick:
    return
  sample = lrs[:4]
  naive = sum(
    naive_loop(init_fn, apply_fn, x, y, sample, b, int(epochs * (n // b))) for b in batches
  )
  naive *= len(lrs) / len(sample)
  print(
    row('(c) naive jit per config (4 sampled)', run_steps, naive) + f'  engine {naive / warm:.2f}x'
  )
  t = [torch_eager(x, y, sample, b, int(epochs * (n // b)), hidden) for b in batches]
  if any(v is None for v in t):
    print('  (d) PyTorch eager: skipped, torch is not installed')
  else:
    torch_s = sum(t) * len(lrs) / len(sample)
    print(
      row('(d) PyTorch eager (4 sampled)', run_steps, torch_s) + f'  engine {torch_s / warm:.2f}x'
    )
  if hidden != (10,):
    return
  k = [keras_fit(x, y, sample, b, int(epochs * (n // b))) for b in batches]
  if any(v is None for v in k):
    print('  (e) Keras fit: skipped, keras is not installed')
  else:
    keras_s = sum(k) * len(lrs) / len(sample)
    print(row('(e) Keras fit (4 sampled)', run_steps, keras_s) + f'  engine {keras_s / warm:.2f}x')


# -------------------------------------------------- the user's own module ----


class MnistCNN(nn.Module):
  """A simple CNN model: flax examples/mnist/train.py (its last linen version), as it is."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


class SpeechCNN(nn.Module):
  """A 1-D CNN on raw signals: three `nn.Conv` of kernel 5, stride 2 (16, 32, 32 channels)."""

  @nn.compact
  def __call__(self, x):
    for features in (16, 32, 32):
      x = nn.relu(nn.Conv(features, (5,), strides=2)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class VolumeCNN(nn.Module):
  """A small 3-D CNN: `nn.Conv` 3x3x3 with 8 channels, then strided with 16."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class UpDownCNN(nn.Module):
  """Down by strided `nn.Conv` (16, 32), back up by `nn.ConvTranspose` (16, 8), as a
  decoder or a U-Net's upward path does, then `nn.Dense`: every transposed convolution reads
  each run's own input."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.ConvTranspose(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.ConvTranspose(8, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class LSTMClassifier(nn.Module):
  """`nn.RNN` of an `nn.LSTMCell` (64 units) over the sequence, `nn.Dense` on its last
  output."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.RNN(nn.LSTMCell(64))(x)[:, -1])


def sequences(n: int, length: int = 32, seed: int = 0):
  """(n, length, 8) noisy sinusoids whose frequency gives the class (10 classes)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n).astype(np.int32)
  t = np.arange(length)[None, :, None]
  phase = rng.uniform(0, 2 * np.pi, (n, 1, 8))
  x = np.sin(0.15 * (y[:, None, None] + 1) * t + phase) + rng.normal(0, 0.3, (n, length, 8))
  return x.astype(np.float32), y


def tones(n: int, length: int = 512, seed: int = 0):
  """Speech-like signals (n, length, 1): two harmonics of a pitch that gives the class
  (10 classes), in noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n).astype(np.int32)
  t = np.arange(length) / 8000.0
  f0 = 200 + 60 * y[:, None] + rng.normal(0, 5, (n, 1))
  x = np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(5 * np.pi * f0 * t)
  x = x + rng.normal(0, 0.5, (n, length))
  return x[..., None].astype(np.float32), y


OPTIMIZERS = {
  'adam': optax.adam,
  'momentum': lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),  # the example's
}


def scan_run(forward, init, x, y, batch, steps, optimizer, init_inside=False):
  """`train(lr)`: one run, a `lax.scan` over its optax steps, `forward(params, xb)` the
  model's logits and `init()` its parameters. With `init_inside`, `train` initialises the
  parameters itself, as PureJaxRL's `train(rng)` does (so that its first call compiles the
  init too, as the engine's does); otherwise they are made once, outside."""
  outside = None if init_inside else init()

  def train(lr):
    params0 = init() if init_inside else outside
    opt = optax.inject_hyperparams(OPTIMIZERS[optimizer])(learning_rate=lr)
    state = opt.init(params0)

    def step(carry, j):
      params, state = carry
      xb = jax.lax.dynamic_slice_in_dim(x, j * batch, batch)
      yb = jax.lax.dynamic_slice_in_dim(y, j * batch, batch)
      loss, g = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, xb), yb).mean()
      )(params)
      u, state = opt.update(g, state, params)
      return (optax.apply_updates(params, u), state), loss

    (params, _), losses = jax.lax.scan(
      step, (params0, state), jnp.arange(steps) % (x.shape[0] // batch)
    )
    return params, losses

  return train


def one_run(module, x, y, batch, steps, optimizer, init_inside=False, **apply_kwargs):
  """`scan_run` of the unmodified flax module; `apply_kwargs` go to every `module.init` and
  `module.apply` (`train=True` for a module with a train switch and no dropout)."""
  return scan_run(
    lambda p, xb: module.apply({'params': p}, xb, **apply_kwargs),
    lambda: module.init(jax.random.key(0), x[:1], **apply_kwargs)['params'],
    x,
    y,
    batch,
    steps,
    optimizer,
    init_inside,
  )


def per_batch_run(module, x, y, batch, steps, optimizer):
  """`train(lr)` as the other plain loop: one jitted optax step, called from Python per
  batch (compiled once for every run). XLA's CPU backend runs a convolution's gradient
  inside a `lax.scan` (the loop of `one_run`) far slower than in a step compiled alone
  (docs/performance.md), so for convolutions this loop is the faster of the two."""
  init = module.init(jax.random.key(0), x[:1])['params']

  # The learning rate is in the optimizer's state (`inject_hyperparams`): one program.
  opt = optax.inject_hyperparams(OPTIMIZERS[optimizer])(learning_rate=0.0)

  @jax.jit
  def step(params, state, xb, yb):
    g = jax.grad(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(
        module.apply({'params': p}, xb), yb
      ).mean()
    )(params)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  per_epoch = x.shape[0] // batch
  batches = [
    (x[j * batch : (j + 1) * batch], y[j * batch : (j + 1) * batch]) for j in range(per_epoch)
  ]

  def train(lr):
    params = init
    state = opt.init(params)
    state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
    for j in range(steps):
      params, state = step(params, state, *batches[j % per_epoch])
    return params

  return train


def eqx_one_run(model, x, y, batch, steps, optimizer, init_inside=False):
  """`scan_run` of an equinox module: its own values are every run's start, the module
  called on one example at a time and vmapped over the batch (equinox's convention)."""
  import equinox as eqx

  del init_inside  # the module holds its values
  params0, static = eqx.partition(model, eqx.is_inexact_array)
  forward = lambda p, xb: jax.vmap(eqx.combine(p, static))(xb)  # noqa: E731
  return scan_run(forward, lambda: params0, x, y, batch, steps, optimizer)


def pair_one_run(model, x, y, batch, steps, optimizer, init_inside=False):
  """`scan_run` of an `(init_fn, apply_fn)` pair: `init_fn(key)` is every run's start."""
  init_fn, apply_fn = model
  init = lambda: init_fn(jax.random.key(0))  # noqa: E731
  return scan_run(apply_fn, init, x, y, batch, steps, optimizer, init_inside)


def pair_mlp_init(key):
  """The seed MLP 784-10-10 as plain JAX: weights stored (inputs, outputs), used as `x @ W`."""
  k1, k2 = jax.random.split(key)
  return {
    'w1': jax.random.normal(k1, (784, 10)) / np.sqrt(784),
    'b1': jnp.zeros(10),
    'w2': jax.random.normal(k2, (10, 10)) / np.sqrt(10),
    'b2': jnp.zeros(10),
  }


def pair_mlp_apply(params, x):
  h = jax.nn.relu(x @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


def timed(f, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0


MATCH = None  # --match: only the user-module rows whose title holds this


def user_module(
  title,
  module,
  x,
  y,
  lrs,
  batch,
  optimizer,
  repeats,
  peak,
  probe=None,
  make_run=one_run,
  rebuild=None,
  per_batch=False,
  **apply_kwargs,
):
  """The same unmodified module through the engine, (b) and (f); see the docstring. The
  engine evaluates as configured by default (`train_eval_size=probe`: None sizes the
  training probe to the training) on a 1024-example validation set. `make_run` builds (b)
  and (f)'s `train(lr)`; with `rebuild`, each warm engine call is given `rebuild()`, a model
  built anew the same way (what a notebook or a script run again does). With `per_batch`,
  also (c'): the jitted step called per batch (`per_batch_run`), the faster plain loop for
  convolutions."""
  if MATCH and MATCH not in title:
    return
  n = len(x)
  steps = n // batch
  print(
    f'\n{title}: {len(lrs)} learning rates, batch {batch}, {optimizer}, 1 epoch of {n} examples '
    f'{tuple(x.shape[1:])}'
  )
  data = sweep.data.arrays(x, y, x[:1024], y[:1024])
  cfg = sweep.SweepConfig(
    model=module,
    data=data,
    loss='softmax_cross_entropy',
    optimizer=optimizer,
    learning_rate=list(lrs),
    batch_size=batch,
    seed=0,
    shuffle=False,
    epochs=1,
    num_evals=1,
    train_eval_size=probe,
  )
  t0 = time.perf_counter()
  result = sweep.run(cfg, progress=False)
  engine_first = time.perf_counter() - t0
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  seq = jax.jit(make_run(module, xs, ys, batch, steps, optimizer, **apply_kwargs))
  seq_compile = timed(seq, np.float32(lrs[0]))
  hand = jax.jit(
    jax.vmap(make_run(module, xs, ys, batch, steps, optimizer, init_inside=True, **apply_kwargs))
  )
  hand_first = timed(hand, jnp.asarray(lrs, jnp.float32))
  times = {'engine': [], 'seq': [], 'hand': []}
  if per_batch:
    loop = per_batch_run(module, xs, ys, batch, steps, optimizer)
    loop_compile = timed(loop, np.float32(lrs[0]))
    times['loop'] = []
  for r in range(repeats):
    # Other values each time, same shapes: nothing compiles again.
    scaled = [lr * (1.01 + 0.01 * r) for lr in lrs]
    t0 = time.perf_counter()
    model = module if rebuild is None else rebuild()
    sweep.run(cfg.replace(learning_rate=scaled, model=model), progress=False)
    times['engine'].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for lr in scaled:
      jax.block_until_ready(seq(np.float32(lr)))
    times['seq'].append(time.perf_counter() - t0)
    times['hand'].append(timed(hand, jnp.asarray(scaled, jnp.float32)))
    if per_batch:
      t0 = time.perf_counter()
      for lr in scaled:
        jax.block_until_ready(loop(np.float32(lr)))
      times['loop'].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  vs = {k: np.array(times[k]) / np.array(times['engine']) for k in times if k != 'engine'}
  run_steps = len(lrs) * steps
  init_fn, apply_fn = sweep.engine.model_of(cfg, sweep.check(cfg).output_dim).pure_functions()
  flops = (
    n // batch * batch * len(lrs) * train_flops_per_example(apply_fn, init_fn(jax.random.key(0)), x)
  )
  axis = result.config['run_axis'][optimizer]
  print(
    f'  engine: run axis {axis["width"]} wide x {axis["chunks"]} chunks (by {axis["chosen_by"]}), '
    f'{axis["fast_layout_kernels"]} kernels in the fast layout; '
    f'{flops / med["engine"] / 1e9:.1f} GFLOP/s = {flops / med["engine"] / 1e9 / peak:.0%} of '
    'matmul peak'
  )
  print(row('(a) engine', run_steps, med['engine']))
  print(
    row(f'(b) sequential optax (compile {seq_compile:.1f} s)', run_steps, med['seq'])
    + f'  engine {np.median(vs["seq"]):.2f}x (range {vs["seq"].min():.2f}-{vs["seq"].max():.2f})'
  )
  if per_batch:
    print(
      row(f"(c') jitted step per batch (compile {loop_compile:.1f} s)", run_steps, med['loop'])
      + f'  engine {np.median(vs["loop"]):.2f}x'
      + f' (range {vs["loop"].min():.2f}-{vs["loop"].max():.2f})'
    )
  print(
    row('(f) hand-written jit(vmap(train))', run_steps, med['hand'])
    + f'  engine {np.median(vs["hand"]):.2f}x (range {vs["hand"].min():.2f}-{vs["hand"].max():.2f})'
  )
  print(
    f'  first call, compiles included: engine {engine_first:.2f} s, (f) {hand_first:.2f} s: '
    f'{engine_first / hand_first:.2f}x'
  )


def mnist_images(n: int, mnist_dir: str | None, seed: int = 0):
  """28x28x1 images: MNIST's t10k digits where a directory of its IDX files is given,
  else synthetic MNIST-shaped images (learnable, values in [0, 1])."""
  if mnist_dir:
    d = sweep.data.mnist(mnist_dir, flatten=False, train_fraction=1.0)
    return d.x_train[:n, ..., None], d.y_train[:n]
  x, y = mnist_shaped(n, seed)
  return x.reshape(n, 28, 28, 1), y


def char_windows(stride: int = 16):
  """The char LM experiment's text and model: windows of 64 characters every `stride`."""
  import importlib.util

  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'char_lm.py'
  )
  spec = importlib.util.spec_from_file_location('char_lm', path)
  char_lm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(char_lm)
  chars = char_lm.text()
  vocab = sorted(set(chars))
  ids = np.array([vocab.index(c) for c in chars], np.int32)
  starts = np.arange(0, len(ids) - char_lm.CONTEXT - 1, stride)
  x = np.stack([ids[s : s + char_lm.CONTEXT] for s in starts])
  y = np.stack([ids[s + 1 : s + char_lm.CONTEXT + 1] for s in starts])
  # Without dropout: the baselines' loops then need no keys.
  return char_lm.CharTransformer(vocab=len(vocab), dropout=0.0), x, y


def user_rows(quick: bool, peak: float, mnist_dir: str | None) -> None:
  repeats = 1 if quick else 3
  digits = sweep.data.digits(flatten=False)
  lrs16 = [float(v) for v in np.logspace(-3, -1, 16)]
  user_module(
    'flax MNIST CNN on 8x8 digits',
    MnistCNN(),
    digits.x_train[..., None],
    digits.y_train,
    lrs16[::4] if quick else lrs16,
    32,
    'momentum',
    repeats,
    peak,
    per_batch=True,
  )
  x, y = mnist_images(512 if quick else 1024, mnist_dir)
  lrs8 = [float(v) for v in np.logspace(-3, -1, 8)]
  user_module(
    'flax MNIST CNN on 28x28 images' + (' (MNIST t10k)' if mnist_dir else ' (MNIST-shaped)'),
    MnistCNN(),
    x,
    y,
    lrs8[::2] if quick else lrs8,
    32,
    'momentum',
    repeats,
    peak,
    per_batch=True,
  )
  x, y = tones(512 if quick else 1024)
  user_module(
    '1-D CNN (nn.Conv 16, 32, 32, kernel 5, stride 2) on 512-sample signals',
    SpeechCNN(),
    x,
    y,
    lrs16[::2] if quick else lrs16,
    32,
    'adam',
    repeats,
    peak,
    per_batch=True,
  )
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256 if quick else 512, 8, 8, 8, 1)).astype(np.float32)
  y = (x.mean(axis=(1, 2, 3, 4)) > 0).astype(np.int32) + 2 * (x[:, :4].mean(axis=(1, 2, 3, 4)) > 0)
  user_module(
    '3-D CNN (nn.Conv 8, 16 of 3x3x3) on 8x8x8 volumes',
    VolumeCNN(),
    x,
    y.astype(np.int32),
    lrs16[::4] if quick else lrs16[::2],
    32,
    'adam',
    repeats,
    peak,
    per_batch=True,
  )
  x, y = mnist_images(512 if quick else 1024, mnist_dir)
  user_module(
    'conv down, nn.ConvTranspose up (16, 8, stride 2) on 28x28 images',
    UpDownCNN(),
    x,
    y,
    lrs8[::2] if quick else lrs8,
    32,
    'adam',
    repeats,
    peak,
    per_batch=True,
  )
  x, y = mnist_shaped(4096 if quick else 8192)
  lrs64 = [float(v) for v in np.logspace(-4, -1, 64)]
  user_module(
    'seed MLP 784-10-10 with nn.Dense', FlaxMLP((10,), 10), x, y, lrs64, 32, 'adam', repeats, peak
  )
  user_module(
    'seed MLP 784-10-10 as an (init_fn, apply_fn) pair computing x @ W',
    (pair_mlp_init, pair_mlp_apply),
    x,
    y,
    lrs64,
    32,
    'adam',
    repeats,
    peak,
    make_run=pair_one_run,
  )
  # Unhashable models, built anew for every call: an equinox module, a list attribute.
  user_module(
    'seed MLP 784-10-10 with nn.Dense, hidden=[10] (a list), rebuilt each call',
    FlaxMLP([10], 10),
    x,
    y,
    lrs64,
    32,
    'adam',
    repeats,
    peak,
    rebuild=lambda: FlaxMLP([10], 10),
  )
  try:
    import equinox as eqx
  except ImportError:
    eqx = None
  if eqx is not None:

    def eqx_mlp():
      return eqx.nn.MLP(784, 10, 10, 1, key=jax.random.key(0))

    user_module(
      'seed MLP 784-10-10 as eqx.nn.MLP, rebuilt each call',
      eqx_mlp(),
      x,
      y,
      lrs64,
      32,
      'adam',
      repeats,
      peak,
      make_run=eqx_one_run,
      rebuild=eqx_mlp,
    )
  if not quick:
    lrs16 = [float(v) for v in np.logspace(-5, -2, 16)]
    user_module(
      '1M-parameter MLP 784-1024-256-10 with nn.Dense',
      FlaxMLP((1024, 256), 10),
      x,
      y,
      lrs16,
      128,
      'adam',
      repeats,
      peak,
    )
  x, y = sequences(512 if quick else 1024)
  user_module(
    'LSTM(64) classifier (nn.RNN of nn.LSTMCell) on 32-step sequences',
    LSTMClassifier(),
    x,
    y,
    lrs16[::4] if quick else lrs16[::2],
    32,
    'adam',
    repeats,
    peak,
  )
  model, x, y = char_windows(32 if quick else 16)
  lrs8 = [float(v) for v in np.logspace(-3.5, -1.5, 8)]
  user_module(
    'char LM: 2 transformer blocks (flax attention, width 32) on 64-character windows',
    model,
    x,
    y,
    lrs8[::2] if quick else lrs8,
    32,
    'adam',
    repeats,
    peak,
    train=True,
  )


def sampled_row(n: int, peak: float) -> None:
  """Random search: 16 configurations drawn (log-uniform learning rate, batch size from
  [32, 64, 128]), Adam, one epoch: the engine's first draw, then another `sample_seed` (its
  compiles counted), against (b) the same 16 runs sequentially, compiled once per batch size."""
  from sweep.config import validate

  compiles = []

  def listener(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(kwargs.get('fun_name'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  x, y = mnist_shaped(n)
  model = sweep.models.MLP(hidden=(10,), outputs=10)
  init_fn, apply_fn = sweep.models.to_functions(model, x[:1], 10)

  def cfg(sample_seed):
    return sweep.SweepConfig(
      model=model,
      data=sweep.data.arrays(x, y, x[:1024], y[:1024]),
      loss='softmax_cross_entropy',
      optimizer='adam',
      learning_rate=sweep.space.loguniform(1e-4, 1e-1),
      batch_size=sweep.space.choice([32, 64, 128]),
      samples=16,
      sample_seed=sample_seed,
      seed=0,
      shuffle=False,
      epochs=1,
      num_evals=1,
    )

  print(f'\nRandom search, seed MLP: 16 samples (lr log-uniform, batch in [32, 64, 128]), {n} ex.')
  t0 = time.perf_counter()
  sweep.run(cfg(0), progress=False)
  first, before = time.perf_counter() - t0, len(compiles)
  t0 = time.perf_counter()
  sweep.run(cfg(1), progress=False)
  second = time.perf_counter() - t0
  print(
    f'  engine: first draw {first:.2f} s ({before} compiles), another sample_seed {second:.2f} s '
    f'({len(compiles) - before} compiles)'
  )
  runs = validate(cfg(1)).runs
  seq_total = seq_compile = 0.0
  for b in (32, 64, 128):
    lrs = [r.values['learning_rate'] for r in runs if r.values['batch_size'] == b]
    if lrs:
      s, c = sequential_optax(init_fn, apply_fn, jnp.asarray(x), jnp.asarray(y), lrs, b, n // b)
      seq_total, seq_compile = seq_total + s, seq_compile + c
  steps = sum(n // r.values['batch_size'] for r in runs)
  print(row('(a) engine, another sample_seed', steps, second))
  print(
    row(f'(b) sequential optax (compile {seq_compile:.1f} s)', steps, seq_total)
    + f'  engine {seq_total / second:.2f}x; with its compiles '
    f'{(seq_total + seq_compile) / second:.2f}x'
  )
  del peak


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--quick', action='store_true', help='smaller workloads, engine and (b) only')
  parser.add_argument(
    '--only',
    choices=['engine', 'user'],
    help="only the engine's own models, or the user-module rows",
  )
  parser.add_argument('--match', help='only the user-module rows whose title contains this text')
  parser.add_argument(
    '--mnist', metavar='DIR', help='MNIST IDX files for the 28x28 row (default: synthetic images)'
  )
  args = parser.parse_args()
  global MATCH
  MATCH = args.match
  # As `sweep run` does: one CPU device per core, over which the engine shards its runs.
  # The baselines run on one device as before (their speed does not change).
  sweep.set_cpu_devices()
  print(
    f'jax {jax.__version__} on {len(jax.devices())} x {jax.devices()[0].device_kind} '
    f'({jax.default_backend()}), {os.cpu_count()} CPU cores'
  )
  peak = matmul_gflops()
  print(f'float32 matmul (1024^3, XLA): {peak:.1f} GFLOP/s')
  if args.only != 'engine':
    user_rows(args.quick, peak, args.mnist)
  if args.only == 'user':
    return
  n = 4096 if args.quick else 8192
  lrs64 = [float(v) for v in np.logspace(-4, -1, 64)]
  workload('Seed MLP 784-10-10, Adam, batch 32', (10,), lrs64, [32], 1, n, args.quick, peak)
  lrs16 = [float(v) for v in np.logspace(-4, -1, 16)]
  workload('Seed MLP mixed grid', (10,), lrs16, [32, 64, 128, 256], 1, n, args.quick, peak)
  sampled_row(n, peak)
  lrs8 = [float(v) for v in np.logspace(-4, -1, 8 if args.quick else 32)]
  d = sweep.data.mnist1d()
  workload(
    'MNIST-1D CNN (channels 16, 16; hidden 24)',
    None,
    lrs8,
    [32],
    1,
    d.n_train,
    True,
    peak,
    model=sweep.models.CNN(channels=(16, 16), hidden=24, outputs=10, spatial_dims=1),
    data=(d.x_train, d.y_train),
  )
  if not args.quick:
    lrs256 = [float(v) for v in np.logspace(-4, -1, 256)]
    workload('Seed MLP, 256 runs at batch 128', (10,), lrs256, [128], 1, n, True, peak)
    lrs16 = [float(v) for v in np.logspace(-5, -2, 16)]
    workload(
      '1M-parameter MLP 784-1024-256-10, batch 128', (1024, 256), lrs16, [128], 1, n, True, peak
    )


if __name__ == '__main__':
  main()
