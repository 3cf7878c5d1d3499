"""The devices a sweep runs on: the host CPU split into devices, JAX's persistent
compilation cache, and the placement of the run axis over the local devices.

Process setup (`set_cpu_devices`, `enable_compilation_cache`) must come before JAX runs
anything; `sweep run` calls both first.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from sweep.errors import config_error


def host_ram() -> int:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return 8 << 30


def enable_compilation_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache, so a second process compiles nothing.

  Args:
    directory: where compiled programs are kept; default `$SWEEP_CACHE_DIR`, else
      `~/.cache/sweep/jax`.

  Returns:
    The directory used.
  """
  directory = (
    directory
    or os.environ.get('SWEEP_CACHE_DIR')
    or os.path.join(os.path.expanduser('~'), '.cache', 'sweep', 'jax')
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
  them and the shards run side by side (docs/performance.md, change 4). It changes
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
    count = (
      len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    )
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


def run_sharding() -> tuple[Any, Any] | None:
  """Shardings that split the run axis (axis 1) over the local devices, if several."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  mesh = jax.sharding.Mesh(np.array(devices), ('runs',))
  P = jax.sharding.PartitionSpec  # noqa: N806
  return jax.sharding.NamedSharding(mesh, P(None, 'runs')), jax.sharding.NamedSharding(mesh, P())


def shard(tree: Any, shardings) -> Any:
  """Places leaves with a run axis (ndim >= 2) split over devices, the rest replicated
  (with one device: on it, where host arrays, such as a restored state, would otherwise
  be copied again at every call)."""
  if shardings is None:
    return jax.device_put(tree)
  runs, replicated = shardings
  placements = jax.tree.map(lambda a: runs if np.ndim(a) >= 2 else replicated, tree)
  return jax.device_put(tree, placements)  # one call: far faster than one per leaf
