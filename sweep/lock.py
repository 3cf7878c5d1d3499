"""One writer per workdir: a lock the operating system drops when its process ends.

`sweep.run` (and `sweep run`) takes the lock of its process when it claims a workdir and
holds it until it returns: `W/.lock` for a sweep of one process, `W/.lock-<p>` for
process p of several (each process of a multi-host sweep holds its own, so a second
sweep started with the same process ids is refused on each host). The lock is `flock`
on that file: the kernel drops it when the file is closed, however the process ends (a
SIGKILL leaves no stale lock), and NFS carries it between hosts. While it is held the
file names the holder (host, pid, since when), for the one line a second writer is
refused with. Readers (`sweep report`, `sweep.load`) take no lock.

Where the file system has no locks at all (flock fails: some FUSE and Lustre mounts), a
lease takes its place: the holder rewrites the file every `LEASE_SECONDS / 6` seconds,
and a lease not renewed for `LEASE_SECONDS` (or whose holder on this host is gone) is
taken over. Two processes that take a free lease in the same instant settle it by
reading it back after `SETTLE_SECONDS`.

This module imports neither JAX nor numpy.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from typing import Any

from sweep import files

LEASE_SECONDS = 30.0
SETTLE_SECONDS = 0.5
POLL_SECONDS = 0.2

# flock errors that mean "this file system has no locks", not "someone holds it".
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirBusy(Exception):
  """Another live process holds the workdir; the message names it (host, pid, since)."""

  def __init__(self, workdir: str, holder: dict[str, Any] | None, path: str):
    self.workdir = workdir
    self.holder = holder
    super().__init__(
      f'workdir {workdir!r} is in use by {describe(holder)} (lock {path}): wait for it with '
      'wait=True (CLI: --wait), or use another workdir'
    )


def describe(holder: dict[str, Any] | None) -> str:
  """'pid 123 on host h since 2026-12-03 09:40:12' (or what is known of the holder)."""
  if not holder:
    return 'another process (it has not written its name yet)'
  return f'pid {holder.get("pid")} on host {holder.get("host")} since {holder.get("since")}'


def lock_path(workdir: str, process: int = 0) -> str:
  """The lock file of process `process` of a sweep in `workdir`."""
  return os.path.join(workdir, '.lock' if process == 0 else f'.lock-{process}')


def _me() -> dict[str, Any]:
  return {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'since': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
  }


def _read_holder(path: str) -> dict[str, Any] | None:
  try:
    with open(path, 'rb') as f:
      holder = json.loads(f.read() or b'null')
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _no_flock() -> bool:
  """Test hook: `SWEEP_TEST_NO_FLOCK=1` behaves as a file system without locks."""
  return bool(os.environ.get('SWEEP_TEST_NO_FLOCK'))


class WorkdirLock:
  """The lock of one process on one workdir (None: no workdir, nothing is locked).

      with WorkdirLock(path) as held:   # raises WorkdirBusy, or waits with wait=True
        ...                            # write the workdir

  Args:
    workdir: the workdir (created if missing).
    process: the process's index in a sweep of several.
    wait: False refuses at once when another process holds the lock; True waits for it;
      a number of seconds waits that long at most.
  """

  def __init__(self, workdir: str | None, process: int = 0, wait: bool | float = False):
    self.workdir = workdir
    self.process = process
    self.wait = wait
    self.path = None if workdir is None else lock_path(workdir, process)
    self._fd: int | None = None
    self._lease: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None or self._lease is not None

  def acquire(self, say=None) -> None:
    """Takes the lock (once; again is a no-op). `say(line)` is told once when it waits."""
    if self.path is None or self.held:
      return
    os.makedirs(self.workdir, exist_ok=True)
    deadline = None
    if self.wait is not True and self.wait:
      deadline = time.monotonic() + float(self.wait)
    told = False
    while True:
      holder = self._try()
      if holder is False:
        return
      if not self.wait or (deadline is not None and time.monotonic() >= deadline):
        raise WorkdirBusy(self.workdir, holder, self.path)
      if not told and say is not None:
        say(f'workdir {self.workdir!r} is in use by {describe(holder)}: waiting for it')
        told = True
      time.sleep(POLL_SECONDS)

  def _try(self) -> dict[str, Any] | None | bool:
    """False when taken; else who holds it (None when it does not say yet)."""
    if not _no_flock():
      fd = _open(self.path)
      if fd is None:
        return False  # a read-only workdir: nothing can be written there, by anyone here
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LOCKS:
          return self._holder_of_flock()
      else:
        self._fd = fd
        try:
          os.ftruncate(fd, 0)
          os.pwrite(fd, json.dumps(_me()).encode(), 0)
        except OSError:
          pass  # opened read-only: the lock holds, unnamed
        return False
    return self._try_lease()

  def _holder_of_flock(self) -> dict[str, Any] | None:
    # The holder writes its name just after taking the lock: give it a moment.
    for _ in range(10):
      holder = _read_holder(self.path)
      if holder:
        return holder
      time.sleep(0.05)
    return None

  # ---- the lease, where the file system has no locks

  def _try_lease(self) -> dict[str, Any] | None | bool:
    holder = _read_holder(self.path)
    if holder and 'token' in holder and _alive(holder):
      return holder
    mine = dict(_me(), token=secrets.token_hex(8), renewed=time.time())
    files.atomic_write(self.path, json.dumps(mine))
    time.sleep(SETTLE_SECONDS)  # another taker's write lands before this read
    holder = _read_holder(self.path)
    if not holder or holder.get('token') != mine['token']:
      return holder
    self._lease = mine
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._renew, daemon=True)
    self._heartbeat.start()
    return False

  def _renew(self) -> None:
    while not self._stop.wait(LEASE_SECONDS / 6):
      lease = dict(self._lease, renewed=time.time())
      try:
        files.atomic_write(self.path, json.dumps(lease))
      except OSError:
        pass  # tried again at the next beat; the lease lasts six beats

  # ---- release

  def release(self) -> None:
    """Drops the lock (the file stays, emptied: it names no holder)."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        os.ftruncate(fd, 0)
      except OSError:
        pass
      os.close(fd)  # drops the flock
    if self._lease is not None:
      self._stop.set()
      if self._heartbeat is not None:
        self._heartbeat.join()
      if (_read_holder(self.path) or {}).get('token') == self._lease['token']:
        try:
          os.unlink(self.path)
        except OSError:
          pass
      self._lease = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _open(path: str) -> int | None:
  """The lock file opened for writing (created if missing), or read-only where it cannot
  be written (a flock needs no write access); None where it does not exist and cannot be
  made."""
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as e:
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
      raise
  try:
    return os.open(path, os.O_RDONLY)
  except OSError:
    return None


def _alive(lease: dict[str, Any]) -> bool:
  """Whether a lease is live: renewed lately, and its holder running if on this host."""
  if time.time() - float(lease.get('renewed', 0)) > LEASE_SECONDS:
    return False
  if lease.get('host') == socket.gethostname():
    try:
      os.kill(int(lease['pid']), 0)
    except ProcessLookupError:
      return False
    except (OSError, ValueError, KeyError, TypeError):
      pass
  return True
