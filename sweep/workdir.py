"""A sweep's workdir as the training loop sees it: claimed, read back, checkpointed into.

    with Workdir(path, every=1, seconds=None, keep=2) as wd:  # the lock is let go on exit
      wd.claim(fingerprint, fresh, mine, abstract)  # locks; refuses another sweep; reads back
      ...
      wd.step += 1                                  # after each segment
      if wd.due(finished, preempted):
        wd.save(point, state)

`Workdir(None)` is no workdir: nothing is read or written and nothing is ever due. The
files themselves (checkpoints with checksums, finished units, the claim) are
`sweep.checkpoints`'s; the lock (one writer per workdir and process) `sweep.lock`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

from sweep import checkpoints, distributed, lock


class Workdir:
  """Where one process of a sweep checkpoints, and where it stood when it last stopped.

  Attributes:
    path: the workdir, or None.
    digest: the sweep's fingerprint digest, once claimed.
    resume: where this process stood (`checkpoints.Resume`; empty for a fresh sweep).
    step: the sweep's segments trained so far by this process; a checkpoint is numbered
      by it.
  """

  def __init__(
    self,
    path: str | None,
    *,
    every: int = 1,
    seconds: float | None = None,
    keep: int = 2,
    wait: bool | float = False,
  ):
    self.path = path
    self.wait = wait  # for another process's lock: False refuses at once
    self.every = every  # checkpoint every this many segments
    self.seconds = seconds  # and when this many seconds passed since the last
    self.keep = keep
    self.digest: str | None = None
    self.resume = checkpoints.Resume()
    self.step = 0
    self._store: checkpoints.StateStore | None = None
    self._last_save = time.perf_counter()
    self._lock: lock.WorkdirLock | None = None

  @property
  def active(self) -> bool:
    """Whether there is a workdir to save into (and so a reason to catch SIGTERM)."""
    return self._store is not None

  def claim(
    self, fp: Any, fresh: bool, mine: list[int], abstract: Callable[[int], Any]
  ) -> checkpoints.Resume:
    """Claims the workdir for the sweep of fingerprint `fp` and reads back where this
    process stood, using only intact checkpoints.

    Each process first takes its own lock on the workdir (`sweep.lock`), held until the
    `with` block of this Workdir ends: another live process refuses it, or waits for it
    (`wait`). Every process checks the workdir (so all refuse another sweep alike);
    process 0 clears it (`fresh`) and claims it, before any process writes there. Each
    process then reads its own checkpoints.

    Args:
      fp: the sweep's `fingerprint.Fingerprint`.
      fresh: discard what the workdir holds.
      mine: the units this process trains.
      abstract: unit -> the abstract state tree of that unit.

    Raises:
      lock.WorkdirBusy: another live process holds this process's lock on the workdir.
      checkpoints.WorkdirConflict: the workdir holds another sweep.
    """
    if self._lock is None:
      self._lock = lock.WorkdirLock(self.path, jax.process_index(), self.wait)
    self._lock.acquire(say=checkpoints.say)
    checkpoints.claim(self.path, fp, fresh, write=jax.process_index() == 0)
    distributed.barrier('sweep-claim')
    self.digest = fp.digest
    self._store = checkpoints.open_state(self.path, self.keep)
    self.resume = checkpoints.resume(self._store, self.path, mine, self.digest, abstract)
    self.step = self.resume.step
    return self.resume

  def start_clock(self) -> None:
    """Training starts: `seconds` (checkpoint_seconds) count from now."""
    self._last_save = time.perf_counter()

  def due(self, finished: bool, preempted: bool) -> bool:
    """Whether to checkpoint after the segment just trained (step `self.step`)."""
    if self._store is None:
      return False
    late = self.seconds is not None and time.perf_counter() - self._last_save >= self.seconds
    return self.step % self.every == 0 or late or preempted or finished

  def save(self, point: checkpoints.ResumePoint, state: Any | None) -> None:
    """Checkpoint `self.step`: where the process stands, and the unit in progress's
    state (None when `point.unit` is None: finished units are in done/)."""
    self._store.save(self.step, state, point.to_json())
    self._last_save = time.perf_counter()

  def close(self) -> None:
    """Waits for the last write (raising its error, such as a full disk)."""
    if self._store is not None:
      self._store.close()

  def abandon(self) -> None:
    """Waits for a write in flight and forgets its error (another error is on its way)."""
    if self._store is not None:
      self._store.abandon()

  def __enter__(self) -> Workdir:
    return self

  def __exit__(self, *exc) -> None:
    """Lets go of the lock (after any write in flight): the results are written, or the
    run is over."""
    self.abandon()
    if self._lock is not None:
      self._lock.release()
