"""Several hosts, one sweep, through JAX's own distributed runtime.

Each process trains its own share of the sweep's units (chunks of the run axis, see
`sweep.units`) on its local devices: runs are independent, so no
collective runs during training. At the end the processes exchange what they found
(metrics, and the parameters of the runs process 0 must save) with
`jax.experimental.multihost_utils.process_allgather`, and process 0 writes the results.

    import sweep
    sweep.distributed.initialize()   # auto-detected on cloud TPU VMs
    result = sweep.run(cfg, workdir)  # the same call on every process
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  **kwargs,
) -> None:
  """Joins this process to the others (`jax.distributed.initialize`).

  On cloud TPU VMs (and SLURM, and other clusters JAX detects) every argument may be
  left out. Elsewhere give the coordinator's `host:port`, the number of processes and
  this process's id.
  """
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    **kwargs,
  )


def owner(unit: int) -> int:
  """The process that trains unit `unit` (round robin)."""
  return unit % jax.process_count()


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_objects(obj: Any) -> list[Any]:
  """Every process's `obj` (picklable), in process order, on every process."""
  payload = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[: payload.size] = payload
  gathered = multihost_utils.process_allgather(padded)
  return [
    pickle.loads(gathered[p, : int(sizes[p][0])].tobytes()) for p in range(jax.process_count())
  ]


def gather(items: list[Any]) -> list[Any]:
  """The items of every process's list (picklable), in process order, on every process;
  with one process, `items` itself."""
  if jax.process_count() == 1:
    return list(items)
  return [item for part in allgather_objects(list(items)) for item in part]
