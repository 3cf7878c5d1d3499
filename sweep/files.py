"""Writing a workdir safely: whole files or none, checksums, and a full disk told plainly.

Every file a sweep writes goes to a temporary name in its directory and is renamed into
place once complete and flushed to disk, so that a process killed at any moment, or a
write that fails half-way (a full disk), leaves the previous version whole. Directories
of several files (a checkpoint) are written the same way, with a `checksums.json`
written last, so that a reader can tell a whole directory from a damaged one.

This module imports neither JAX nor numpy: it is the part of the engine that must keep
working when everything else has gone wrong.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

CHECKSUMS = 'checksums.json'
_CHUNK = 1 << 20

# The number of files written (not skipped as unchanged) since the process started; the
# CLI reads it to tell whether a rerun of a finished sweep changed anything.
_writes = 0
# Bytes of partial files removed by writers that failed (added to what `remove_partial`
# frees, for the full-disk message).
_freed = 0


def write_count() -> int:
  """How many files this process has written through this module."""
  return _writes


# ------------------------------------------------------------------- the full disk ----

# Errors that mean "no room left": a full file system, a quota, a file size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(OSError):
  """The workdir's file system is full; partial files were removed, whole ones kept."""

  def __init__(self, directory: str, freed: int):
    super().__init__(
      errno.ENOSPC,
      f'no space left on {directory}: freed {freed} bytes of partial files; rerun to resume',
    )
    self.directory = directory
    self.freed = freed

  def __str__(self) -> str:
    return self.strerror


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or an error it was raised from) means the disk is full.

  Libraries that write for us (orbax, tensorstore) may wrap the OSError in their own
  exceptions, or report only its message.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
      return True
    text = str(error)
    if (
      'No space left on device' in text or 'Disk quota exceeded' in text or 'File too large' in text
    ):
      return True
    error = error.__cause__ or error.__context__
  return False


def _fault_budget() -> int | None:
  """Test hook: `SWEEP_TEST_WRITE_LIMIT=N` makes this module's writers fail with ENOSPC
  once the process has written N bytes through them, as a full disk would (for machines
  where no small file system can be mounted to fill for real)."""
  value = os.environ.get('SWEEP_TEST_WRITE_LIMIT')
  return int(value) if value else None


_written_bytes = 0


def _write(f, data: bytes | memoryview, path: str) -> None:
  """Writes `data` to the open binary file `f` in chunks (so that a failure can leave
  a real partial file, as a full disk does)."""
  global _written_bytes
  view = memoryview(data).cast('B')
  budget = _fault_budget()
  for start in range(0, len(view), _CHUNK):
    chunk = view[start : start + _CHUNK]
    if budget is not None and _written_bytes + len(chunk) > budget:
      room = max(0, budget - _written_bytes)
      f.write(chunk[:room])
      _written_bytes += room
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    f.write(chunk)
    _written_bytes += len(chunk)


def _size(path: str) -> int:
  if os.path.isdir(path) and not os.path.islink(path):
    return sum(_size(os.path.join(path, n)) for n in os.listdir(path))
  try:
    return os.lstat(path).st_size
  except OSError:
    return 0


def _remove(path: str) -> int:
  """Removes a file or directory; returns the bytes it held (0 if it could not)."""
  size = _size(path)
  try:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.unlink(path)
  except FileNotFoundError:
    return 0
  except OSError:
    return 0
  return size


def is_partial(name: str) -> bool:
  """Whether a file or directory name is one of a write in progress (ours or orbax's)."""
  return name.endswith('.tmp') or '.orbax-checkpoint-tmp' in name


def remove_partial(directory: str) -> int:
  """Removes every partial file or directory under `directory`; returns the bytes freed
  (with those the failed writers removed themselves)."""
  global _freed
  freed, _freed = _freed, 0
  for root, dirs, files in os.walk(directory):
    for name in list(dirs):
      if is_partial(name):
        freed += _remove(os.path.join(root, name))
        dirs.remove(name)
    for name in files:
      if is_partial(name):
        freed += _remove(os.path.join(root, name))
  return freed


# ------------------------------------------------------------------------ files ----


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: str, text: str | bytes) -> None:
  """Writes `text` (or bytes) to `path` through a temporary file and a rename: never
  half-written. A write that fails (a full disk) leaves the old file as it was."""
  global _writes, _freed
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  data = text.encode() if isinstance(text, str) else text
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp'
  )
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    with os.fdopen(fd, 'wb') as f:
      _write(f, data, path)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      _freed += _remove(tmp)
    raise
  _writes += 1


def same_content(path: str, data: bytes) -> bool:
  """Whether the file at `path` holds exactly `data`."""
  try:
    if os.path.getsize(path) != len(data):
      return False
    with open(path, 'rb') as f:
      return f.read() == data
  except OSError:
    return False


def write_if_changed(path: str, text: str | bytes) -> bool:
  """`atomic_write`, skipped when the file already holds `text` (a rerun of a finished
  sweep then writes nothing, and works on a read-only workdir). Returns whether it wrote."""
  data = text.encode() if isinstance(text, str) else text
  if same_content(path, data):
    return False
  atomic_write(path, data)
  return True


def json_default(v: Any) -> Any:
  """JSON for numpy scalars (without importing numpy) and anything else as text."""
  item = getattr(v, 'item', None)
  if callable(item):
    try:
      return item()
    except (TypeError, ValueError):
      pass
  return str(v)


def dumps(obj: Any, indent: int | None = None) -> str:
  return json.dumps(obj, indent=indent, sort_keys=indent is None, default=json_default)


# ----------------------------------------------------------- checksummed directories ----


def digest_file(path: str) -> tuple[int, str]:
  """(size, sha256) of the file at `path`, read in chunks."""
  h = hashlib.sha256()
  size = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def _relative_files(directory: str) -> list[str]:
  out = []
  for root, _, files in os.walk(directory):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def write_checksums(directory: str, files: Iterable[str] | None = None) -> None:
  """Writes `directory/checksums.json`: the size and sha256 of each file in it (all of
  them by default), read back from disk. Written last, it marks the directory whole."""
  names = sorted(files) if files is not None else _relative_files(directory)
  table = {}
  for name in names:
    size, digest = digest_file(os.path.join(directory, name))
    table[name] = {'size': size, 'sha256': digest}
  atomic_write(
    os.path.join(directory, CHECKSUMS), json.dumps({'files': table}, indent=1, sort_keys=True)
  )


def listed(directory: str) -> set[str]:
  """The files `directory/checksums.json` lists (none if it does not read)."""
  try:
    with open(os.path.join(directory, CHECKSUMS), 'rb') as f:
      return set(json.loads(f.read())['files'])
  except (OSError, ValueError, KeyError, TypeError):
    return set()


def verify(directory: str, required: Iterable[str] = ()) -> str | None:
  """Checks a directory written with its checksums; returns None when it is whole, else
  what is wrong with it (a few words: the file and how it fails)."""
  if not os.path.isdir(directory):
    return 'missing'
  path = os.path.join(directory, CHECKSUMS)
  try:
    with open(path, 'rb') as f:
      table = json.loads(f.read())['files']
    if not isinstance(table, dict):
      raise ValueError('not a table')
  except FileNotFoundError:
    return f'{CHECKSUMS} is missing'
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{CHECKSUMS} is unreadable ({type(e).__name__})'
  for name in required:
    if name not in table:
      return f'{name} is not listed in {CHECKSUMS}'
  for name, want in sorted(table.items()):
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      return f'{name} is missing'
    try:
      size = os.path.getsize(file)
      if size != want.get('size'):
        return (
          f'{name} is truncated ({size} of {want.get("size")} bytes)'
          if size < want.get('size', 0)
          else (f'{name} has {size} bytes, {want.get("size")} were written')
        )
      if digest_file(file)[1] != want.get('sha256'):
        return f'{name} fails its checksum'
    except OSError as e:
      return f'{name} is unreadable ({e.strerror or type(e).__name__})'
  return None


class _Chunked(io.RawIOBase):
  """A binary file whose writes go through `_write` (for writers such as np.savez)."""

  def __init__(self, f, path: str):
    self._f, self._path = f, path

  def writable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def write(self, data) -> int:
    _write(self._f, data, self._path)
    return memoryview(data).nbytes

  def seek(self, offset: int, whence: int = 0) -> int:
    return self._f.seek(offset, whence)

  def tell(self) -> int:
    return self._f.tell()

  def flush(self) -> None:
    self._f.flush()


Contents = bytes | Callable[[Any], None]


def write_directory(path: str, files: dict[str, Contents]) -> None:
  """Writes `files` and their checksums as directory `path`: into a temporary
  directory, flushed, then renamed into place (replacing an older `path`).

  Args:
    path: the directory.
    files: name -> bytes, or a function that writes the file's bytes to the binary
      file object it is given (so that a large state is streamed, not held twice).
  """
  global _writes, _freed
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = path + '.tmp'
  _remove(tmp)
  try:
    os.makedirs(tmp)
    for name, data in files.items():
      file = os.path.join(tmp, name)
      with open(file, 'wb') as f:
        if callable(data):
          data(_Chunked(f, file))
        else:
          _write(f, data, file)
        f.flush()
        os.fsync(f.fileno())
    write_checksums(tmp, files)
    _fsync_directory(tmp)
    if os.path.exists(path):
      _remove(path)
    os.replace(tmp, path)
    _fsync_directory(parent)
  except BaseException:
    _freed += _remove(tmp)
    raise
  _writes += 1


# ----------------------------------------------------- verified files of a directory ----


class DamagedFile(OSError):
  """A file that fails its checksum (or is missing, truncated, unreadable) and has no
  intact copy to be read from; the message names it and the way out."""

  def __init__(self, message: str):
    super().__init__(errno.EIO, message)

  def __str__(self) -> str:
    return self.strerror


def checksum_table(contents: dict[str, bytes]) -> str:
  """The text of a `checksums.json` for files of these contents."""
  table = {
    name: {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
    for name, data in contents.items()
  }
  return json.dumps({'files': table}, indent=1, sort_keys=True)


def read_checked(directory: str, names: Iterable[str]) -> tuple[dict[str, bytes], str | None]:
  """The bytes of the files `names` of `directory`, each checked against the
  `checksums.json` there: (contents, None) when all are whole, else ({}, what is wrong:
  the file and how it fails). The bytes returned are those checked."""
  try:
    with open(os.path.join(directory, CHECKSUMS), 'rb') as f:
      table = json.loads(f.read())['files']
    if not isinstance(table, dict):
      raise ValueError('not a table')
  except FileNotFoundError:
    return {}, f'{CHECKSUMS} is missing'
  except (OSError, ValueError, KeyError, TypeError) as e:
    return {}, f'{CHECKSUMS} is unreadable ({type(e).__name__})'
  out = {}
  for name in names:
    want = table.get(name)
    if not isinstance(want, dict):
      return {}, f'{name} is not listed in {CHECKSUMS}'
    try:
      with open(os.path.join(directory, name), 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      return {}, f'{name} is missing'
    except OSError as e:
      return {}, f'{name} is unreadable ({e.strerror or type(e).__name__})'
    size = want.get('size')
    if len(data) != size:
      if isinstance(size, int) and len(data) < size:
        return {}, f'{name} is truncated ({len(data)} of {size} bytes)'
      return {}, f'{name} has {len(data)} bytes, {size} were written'
    if hashlib.sha256(data).hexdigest() != want.get('sha256'):
      return {}, f'{name} fails its checksum'
    out[name] = data
  return out, None


def write_verified(directory: str, contents: dict[str, bytes], copy: str) -> None:
  """Writes files into `directory` with their checksums, and a whole copy of them (a
  checksummed directory, `write_directory`) at `copy`, written first: at every moment
  one of the two is whole, so a reader (`read_verified`) never needs a lock. A file
  that already holds its content is not rewritten (nor a copy that is whole and equal).
  """
  held, problem = read_checked(copy, contents)
  if problem is not None or held != contents:
    write_directory(copy, contents)
  restore_verified(directory, contents)


def read_verified(
  directory: str, names: Iterable[str], copy: str, *, retries: int = 3
) -> tuple[dict[str, bytes], str | None]:
  """The files `names` of `directory` (written by `write_verified`), checked against their
  checksums: (contents, None) when whole; else the copy's, checked the same way, with
  what is wrong with the directory's own (a few words naming the file).

  A writer replaces the files one after the other: a reader that finds neither whole
  tries again a few times before it calls them damaged.

  Raises:
    FileNotFoundError: neither holds any of the files (nothing was written).
    DamagedFile: neither is whole; the message is what is wrong with the directory's.
  """
  names = list(names)
  for attempt in range(retries + 1):
    contents, problem = read_checked(directory, names)
    if problem is None:
      return contents, None
    backup, _ = read_checked(copy, names)
    if backup:
      return backup, problem
    if not os.path.isdir(copy) and not any(
      os.path.exists(os.path.join(directory, n)) for n in names
    ):
      raise FileNotFoundError(errno.ENOENT, f'{names[0]} is missing', directory)
    if attempt < retries:
      time.sleep(0.05 * (attempt + 1))
  raise DamagedFile(problem)


def restore_verified(directory: str, contents: dict[str, bytes]) -> None:
  """Writes the files of a verified copy back into `directory`, with their checksums."""
  for name, data in contents.items():
    write_if_changed(os.path.join(directory, name), data)
  write_if_changed(os.path.join(directory, CHECKSUMS), checksum_table(contents))
