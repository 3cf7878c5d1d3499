"""Transposed convolutions under the run axis: phase by phase against XLA's.

A decoder (`nn.Dense`, then two `nn.ConvTranspose` of stride 2, in 2-D on 28x28 outputs and
in 1-D on 256-sample outputs), trained to reconstruct its input with Adam: one step of R
runs vmapped, as the engine's segment runs it, with the transposed convolutions computed

  phase   by `sweep.layers` (each phase of the strides a convolution of the undilated input
          by the kernel taps that land on it), what the engine does now;
  xla     by flax's own code (`lax.conv_transpose`), which vmap makes a grouped
          convolution (one group per run), what the engine did before;
  per-run by flax's own code, one run's jitted step called R times (what a plain loop of
          the runs does, XLA's convolution one run at a time).

The dense layer is computed by `sweep.layers` in the first two. Milliseconds for R run-steps
(the fastest of a few blocks of 10 steps), in one process, the arms interleaved.

  python scripts/conv_transpose_bench.py [--runs 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from sweep import layers


class Decoder(nn.Module):
  dims: int

  @nn.compact
  def __call__(self, x):
    if self.dims == 2:
      h = nn.Dense(7 * 7 * 32)(x.reshape((x.shape[0], -1))).reshape((-1, 7, 7, 32))
      kernel = (3, 3)
    else:
      h = nn.Dense(64 * 32)(x.reshape((x.shape[0], -1))).reshape((-1, 64, 32))
      kernel = (5,)
    h = nn.relu(nn.ConvTranspose(16, kernel, strides=2)(nn.relu(h)))
    return nn.ConvTranspose(1, kernel, strides=2)(h)


@contextlib.contextmanager
def xla_transposed():
  """flax's own ConvTranspose inside `fast_layers` (the engine before)."""
  key = (nn.ConvTranspose, '__call__')
  impl = layers._LINEN.pop(key)
  try:
    yield
  finally:
    layers._LINEN[key] = impl


def fastest(f, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


def arms(dims: int, runs: int, batch: int = 32):
  module = Decoder(dims)
  shape = (batch, 28, 28, 1) if dims == 2 else (batch, 256, 1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  params = module.init(jax.random.key(0), x)['params']
  opt = optax.adam(1e-3)

  def step(p, s, fast):
    def loss(p):
      if not fast:
        return jnp.mean((module.apply({'params': p}, x) - x) ** 2)
      with layers.fast_layers():
        return jnp.mean((module.apply({'params': p}, x) - x) ** 2)

    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  stacked = jax.tree.map(lambda a: jnp.stack([a * (1 + 0.01 * i) for i in range(runs)]), params)
  states = jax.vmap(opt.init)(stacked)

  def vmapped():
    def ten(p, s):
      def body(c, _):
        return jax.vmap(lambda p, s: step(p, s, True))(*c), None

      return jax.lax.scan(body, (p, s), None, length=10)[0]

    return jax.jit(ten)

  phase = vmapped()
  with xla_transposed():
    xla = vmapped()
    jax.block_until_ready(xla(stacked, states))  # traced (and compiled) without the phases
  one = jax.jit(lambda p, s: step(p, s, False))
  state = opt.init(params)

  def per_run(p, s):
    for _ in range(10 * runs):
      p, s = one(p, s)
    return p

  return {
    'phase': lambda: phase(stacked, states),
    'xla': lambda: xla(stacked, states),
    'per-run': lambda: per_run(params, state),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.runs} runs, batch 32')
  for dims in (2, 1):
    fns = arms(dims, args.runs)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):  # interleaved
      for name, f in fns.items():
        times[name].append(fastest(f, repeats=2) / 10 * 1e3)
    best = {name: min(t) for name, t in times.items()}
    print(f'{dims}-D decoder, ms per step of {args.runs} runs:')
    for name, ms in best.items():
      than = '' if name == 'phase' else f'   phase by phase {ms / best["phase"]:.2f}x faster'
      print(f'  {name:8s} {ms:7.1f} ms{than}')


if __name__ == '__main__':
  main()
