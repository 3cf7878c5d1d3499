"""Checkpoints: the sweep state (to resume, verified, with fallback) and the Pareto runs (orbax).

Layout of a workdir:
  config.json, results.csv, curves.csv   the results (written atomically)
  checksums.json                         their sizes and sha256 (`sweep.results.read_files`)
  .lock, .lock-<p>                       held by the process writing the workdir (`sweep.lock`)
  state/results/                         a whole copy of the results, checksummed
  sweep.json                             the fingerprint of the sweep the workdir holds
  state/<step>/                          a checkpoint of this process's sweep state
  state/process-<p>-of-<n>/<step>/       the same for process p of n
  done/<c>/                              final state and history of finished unit c
  runs/<i>/                              params and optimizer state of run i (orbax; Pareto runs)
  runs/<i>.json                          its hyperparameters and metrics

A checkpoint (and a finished unit) is a directory of `state.npz` (the leaves of the
state tree, whose structure every rerun of the sweep knows), `meta.json` (where the
sweep stands, the curves so far) and `checksums.json` (size and sha256 of each, written
after them, from what is on disk). It is written into a temporary directory, flushed,
and renamed into place, so a process killed at any moment leaves only whole ones. On
resume each is checked before use: one that is missing a file, truncated, fails its
checksum or does not restore is reported in one line and skipped for the newest intact
earlier one; without any, the unit in progress starts from scratch (and says so). A
damaged finished unit is trained again. Nothing damaged is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from sweep import files
from sweep.errors import ConfigError, config_error

STATE, META = 'state.npz', 'meta.json'


def say(message: str) -> None:
  """One line on stderr about the workdir (a damaged checkpoint, a fallback)."""
  print(f'sweep: {message}', file=sys.stderr, flush=True)


class WorkdirConflict(ConfigError):
  """The workdir holds another sweep (or cannot be used); nothing in it was changed."""


def _local() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a checkpoint this process writes or reads alone (in a sweep of
  several processes each trains its own runs; nothing here is a collective)."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _checkpointer() -> ocp.StandardCheckpointer:
  if jax.process_count() == 1:
    return ocp.StandardCheckpointer()
  return ocp.StandardCheckpointer(multiprocessing_options=_local())


def host_copy(tree: Any) -> Any:
  """A host copy of `tree`: the device buffers may be donated to the next segment."""
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


# ------------------------------------------------------------ state files ----


def _npz_writer(tree: Any) -> Callable[[Any], None]:
  """Writes the leaves of `tree` (host arrays) as an .npz to the file object it is given."""
  leaves = [np.asarray(a) for a in jax.tree.leaves(tree)]
  return lambda f: np.savez(f, **{f'{i:06d}': a for i, a in enumerate(leaves)})


def load_leaves(path: str, abstract: Any) -> Any:
  """The tree of an .npz of leaves (`write_dir`), in the structure of `abstract` (shapes
  checked)."""
  leaves, treedef = jax.tree.flatten(abstract)
  with np.load(path, allow_pickle=False) as f:
    if len(f.files) != len(leaves):
      raise ValueError(f'{path} holds {len(f.files)} arrays where the state has {len(leaves)}')
    arrays = [f[f'{i:06d}'] for i in range(len(leaves))]
  for a, want in zip(arrays, leaves, strict=True):
    if a.shape != tuple(want.shape) or a.dtype != want.dtype:
      raise ValueError(
        f'{path} holds an array {a.shape} {a.dtype} where {want.shape} {want.dtype} belongs'
      )
  return jax.tree.unflatten(treedef, arrays)


def write_dir(path: str, state: Any | None, meta: dict[str, Any] | None = None) -> None:
  """Writes `state` (state.npz), `meta` (meta.json) and their checksums as directory
  `path`: into a temporary directory first, renamed when whole."""
  contents = {}
  if state is not None:
    contents[STATE] = _npz_writer(state)
  if meta is not None:
    contents[META] = json.dumps(meta, default=files.json_default).encode()
  files.write_directory(path, contents)


class Damaged(Exception):
  """A checkpoint or finished unit that cannot be used; the message says why."""


def read_meta(path: str, required: tuple[str, ...] = (META,)) -> dict[str, Any]:
  """The meta.json of a checksummed directory, after checking the whole directory."""
  problem = files.verify(path, required)
  if problem is not None:
    raise Damaged(problem)
  try:
    with open(os.path.join(path, META)) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise Damaged(f'{META} does not read ({type(e).__name__})') from e
  if not isinstance(meta, dict):
    raise Damaged(f'{META} holds no record')
  return meta


def read_state(path: str, abstract: Any) -> Any:
  """The state.npz of a verified directory, in the structure of `abstract`."""
  try:
    return load_leaves(os.path.join(path, STATE), abstract)
  except Exception as e:  # a zip error, a missing key, a shape: all mean the same here
    raise Damaged(f'{STATE} does not restore ({e})') from e


# ------------------------------------------------------------ the sweep state ----


class StateStore:
  """Checkpoints of one process's sweep state: `directory/<step>/`, the latest `keep`.

  Saves are asynchronous: the state is copied to the host at once (the device buffers
  are donated to the next segment), then written by a background thread while training
  goes on; a save waits for the one before. An error of the writer (a full disk) is
  raised by the next save, `wait` or `close`.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None

  def steps(self) -> list[int]:
    """The checkpoints on disk (whole or not), oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _write(self, step: int, contents: dict[str, Any]) -> None:
    files.write_directory(self.path(step), contents)
    for old in self.steps()[: -self.keep]:
      shutil.rmtree(self.path(old), ignore_errors=True)

  def _run(self, step: int, contents: dict[str, Any]) -> None:
    try:
      self._write(step, contents)
    except BaseException as e:  # handed to the main thread at its next call
      self._error = e

  def save(self, step: int, state: Any | None, meta: dict[str, Any]) -> None:
    """Saves `meta` and, unless None, the state of the unit in progress."""
    contents = {META: json.dumps(meta, default=files.json_default).encode()}
    if state is not None:
      contents[STATE] = _npz_writer(host_copy(state))
    self.wait()
    self._thread = threading.Thread(target=self._run, args=(step, contents), daemon=True)
    self._thread.start()

  def load(self, step: int, abstract: Callable[[dict], Any]) -> tuple[Any | None, dict[str, Any]]:
    """The state (None if the checkpoint holds none) and meta of checkpoint `step`.

    Args:
      step: the checkpoint.
      abstract: meta -> the abstract state tree the checkpoint must hold.

    Raises:
      Damaged: the checkpoint cannot be used.
    """
    path = self.path(step)
    meta = read_meta(path)
    if meta.get('unit') is None:
      return None, meta
    if STATE not in files.listed(path):
      raise Damaged(f'{STATE} is missing')
    return read_state(path, abstract(meta)), meta

  def remove(self, step: int) -> None:
    shutil.rmtree(self.path(step), ignore_errors=True)

  def wait(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def close(self) -> None:
    self.wait()

  def abandon(self) -> None:
    """Waits for a write in flight and forgets its error (another error is on its way)."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    self._error = None


def open_state(workdir: str, keep: int = 2) -> StateStore:
  """The checkpoints of this process: `state/` alone, `state/process-<p>-of-<n>/` in a
  sweep of several processes (each trains its own units and checkpoints them at its own
  moments, with no collective)."""
  directory = os.path.join(workdir, 'state')
  if jax.process_count() > 1:
    directory = os.path.join(directory, f'process-{jax.process_index()}-of-{jax.process_count()}')
  return StateStore(directory, keep)


# ------------------------------------------------------------ finished units ----


def done_path(workdir: str, c: int) -> str:
  return os.path.abspath(os.path.join(workdir, 'done', f'{c:04d}'))


def save_done(workdir: str, c: int, state: Any, meta: dict[str, Any] | None = None) -> None:
  """Saves a finished unit's final state (and its history, in `meta`) once; later
  checkpoints only point to it."""
  write_dir(done_path(workdir, c), state, meta)


class Final:
  """A finished unit's final state: in host memory, on disk, or not kept."""

  def __init__(self, state: Any = None, path: str | None = None, abstract: Any = None):
    self._state = state
    self.path = path
    self.abstract = abstract

  @property
  def kept(self) -> bool:
    return self._state is not None or self.path is not None

  def get(self) -> Any:
    if self._state is not None:
      return self._state
    if self.path is None:
      raise ValueError(
        "this run's final state was not kept: the sweep outgrew its memory budget. "
        'Run it with a workdir to keep every final state on disk.'
      )
    problem = files.verify(self.path, (STATE,))
    if problem is not None:
      raise ValueError(
        f'{self.path} is damaged ({problem}): run the same sweep again to train this unit again'
      )
    return load_leaves(os.path.join(self.path, STATE), self.abstract)


# ------------------------------------------------------------ the workdir ----


def _read_record(path: str) -> tuple[dict[str, Any] | None, str | None]:
  """(record, None), (None, None) when absent, or (None, what is wrong)."""
  try:
    with open(path, 'rb') as f:
      record = json.loads(f.read())
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError) as e:
    return None, f'unreadable ({type(e).__name__})'
  if not isinstance(record, dict) or 'fingerprint' not in record:
    return None, 'holds no fingerprint'
  if record.get('format') == 2:
    from sweep.fingerprint import Fingerprint

    try:
      digest = Fingerprint(record['strict'], record['soft']).digest
    except (KeyError, TypeError):
      return None, 'incomplete'
    if digest != record['fingerprint']:
      return None, 'fails its checksum'
  return record, None


def _digests_on_disk(workdir: str) -> set[str]:
  """The fingerprints recorded in the intact checkpoints and finished units of a workdir."""
  found = set()
  dirs = [os.path.join(workdir, 'done')]
  state = os.path.join(workdir, 'state')
  dirs.append(state)
  if os.path.isdir(state):
    dirs += [os.path.join(state, n) for n in os.listdir(state) if n.startswith('process-')]
  for d in dirs:
    if not os.path.isdir(d):
      continue
    for name in os.listdir(d):
      if name.isdigit():
        try:
          found.add(read_meta(os.path.join(d, name)).get('fingerprint'))
        except Damaged:
          pass
  return found


def _clear(workdir: str) -> None:
  for sub in ('state', 'runs', 'done'):
    shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
  for name in (
    'results.csv',
    'curves.csv',
    'checksums.json',
    'sweep.json',
    'config.json',
    'experiment.py',
  ):
    if os.path.exists(os.path.join(workdir, name)):
      os.unlink(os.path.join(workdir, name))


def _refuse(workdir: str, what: str) -> WorkdirConflict:
  return WorkdirConflict(
    f'workdir={workdir!r} holds another sweep: {what}. Use another workdir, or start afresh '
    'with fresh=True (CLI: --fresh), which deletes its checkpoints.'
  )


def check_workdir(workdir: str) -> None:
  """Refuses a workdir path that is not a directory (before anything is computed)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_error('workdir', workdir, 'a directory; this path is a file')


def claim(workdir: str, fp: Any, fresh: bool, write: bool = True) -> None:
  """Checks that `workdir` holds this sweep (or nothing), and records it there.

  Args:
    workdir: the workdir.
    fp: the sweep's `fingerprint.Fingerprint`.
    fresh: discard what the workdir holds, even another sweep.
    write: False on the processes other than 0 of a multi-process sweep: they only check.

  Raises:
    WorkdirConflict: the workdir holds another sweep and `fresh` is False; the message
      names each difference (old -> new). Nothing in the workdir is changed.
  """
  from sweep import fingerprint

  check_workdir(workdir)
  path = os.path.join(workdir, 'sweep.json')
  held, problem = _read_record(path)
  if held is None and not fresh and os.path.isdir(workdir):
    # No record to compare with: the checkpoints and finished units say whose they are.
    others = _digests_on_disk(workdir) - {fp.digest}
    if others:
      what = f'its sweep.json is damaged ({problem})' if problem else 'it has no sweep.json'
      raise _refuse(workdir, f'{what} and its checkpoints are of another sweep')
    if problem is not None and write:
      say(
        f"{path} is damaged ({problem}); the checkpoints there are this sweep's: writing it again"
      )
  elif held is not None and not fresh:
    if held.get('format') != fingerprint.FORMAT:
      raise _refuse(
        workdir, 'it was written by an earlier version of sweep, whose fingerprint lists no fields'
      )
    changed = fingerprint.differences(held['strict'], fp.strict)
    if changed:
      shown = '; '.join(changed[:6]) + (
        f'; and {len(changed) - 6} more' if len(changed) > 6 else ''
      )
      raise _refuse(workdir, shown)
    notes = fingerprint.differences(held.get('soft', {}), fp.soft)
    if notes and write:
      fields = [n for n in notes if not n.startswith('environment.')]
      versions = [n for n in notes if n.startswith('environment.')]
      if fields:
        say('; '.join(fields) + ' (this changes no number: resuming)')
      if versions:
        shown = '; '.join(versions[:4]) + (
          f'; and {len(versions) - 4} more' if len(versions) > 4 else ''
        )
        say(f'{shown} since the last run (float rounding may differ in the last bits: resuming)')
  if not write:
    return
  if fresh and os.path.isdir(workdir):
    _clear(workdir)
  os.makedirs(workdir, exist_ok=True)
  files.remove_partial(workdir)  # what a killed process was writing
  files.write_if_changed(path, json.dumps(fp.record(), indent=1, sort_keys=True))


@dataclasses.dataclass
class ResumePoint:
  """Where a checkpoint says this process stood (its `meta.json`): the unit in progress,
  its next segment and its curves so far; `unit` None when no unit was in progress."""

  fingerprint: str | None
  unit: int | None = None
  segment: int = 0
  history: list | None = None  # per evaluation so far: per batch group, metrics as lists
  seconds: float = 0.0  # the unit's training time so far

  def to_json(self) -> dict[str, Any]:
    return {
      'fingerprint': self.fingerprint,
      'unit': self.unit,
      'segment': self.segment,
      'history': self.history,
      'unit_seconds': self.seconds,
    }

  @classmethod
  def from_json(cls, meta: dict[str, Any]) -> ResumePoint:
    unit = meta.get('unit')
    return cls(
      meta.get('fingerprint'),
      None if unit is None else int(unit),
      int(meta.get('segment', 0)),
      meta.get('history'),
      float(meta.get('unit_seconds', 0.0)),
    )


@dataclasses.dataclass
class FinishedUnit:
  """What a finished unit's `done/<c>/meta.json` says: its curves and training time."""

  fingerprint: str | None
  unit: int
  step: int  # the sweep's segments trained when it finished
  history: list  # per evaluation: per batch group, metrics as lists
  seconds: float

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, meta: dict[str, Any]) -> FinishedUnit:
    return cls(
      meta.get('fingerprint'),
      int(meta['unit']),
      int(meta.get('step', 0)),
      meta['history'],
      float(meta['seconds']),
    )


def _parse(record: type, meta: dict[str, Any]) -> Any:
  """`record.from_json(meta)`; a meta.json of this sweep that lacks a field is damaged."""
  try:
    return record.from_json(meta)
  except (KeyError, TypeError, ValueError) as e:
    raise Damaged(f'{META} does not hold a {record.__name__} ({type(e).__name__}: {e})') from e


@dataclasses.dataclass
class Resume:
  """Where this process's part of a sweep stands on disk."""

  step: int = 0  # segments trained (the number of the next checkpoint minus one)
  finished: dict[int, FinishedUnit] = dataclasses.field(default_factory=dict)
  point: ResumePoint = dataclasses.field(
    default_factory=lambda: ResumePoint(None)
  )  # the unit in progress
  state: Any = None  # its state


def resume(
  store: StateStore, workdir: str, mine: list[int], digest: str, abstract: Callable[[int], Any]
) -> Resume:
  """Reads back where this process stands, using only intact checkpoints.

  Args:
    store: this process's checkpoints.
    workdir: the workdir.
    mine: the units this process trains.
    digest: the sweep's fingerprint digest (a checkpoint of another is not used).
    abstract: unit -> the abstract state tree of that unit.
  """
  out = Resume()
  for c in mine:
    path = done_path(workdir, c)
    if not os.path.isdir(path):
      continue
    try:
      meta = read_meta(path, (META, STATE))
      if meta.get('fingerprint') != digest:
        raise Damaged('it is of another sweep')
      done = _parse(FinishedUnit, meta)
    except Damaged as e:
      say(f'finished unit {path} is damaged ({e}): training unit {c} again')
      continue
    out.finished[c] = done
    out.step = max(out.step, done.step)

  steps = store.steps()
  skipped = []
  for step in reversed(steps):
    try:
      state, meta = store.load(step, lambda m: abstract(int(m['unit'])))
      if meta.get('fingerprint') != digest:
        raise Damaged('it is of another sweep')
      point = _parse(ResumePoint, meta)
    except Damaged as e:
      later = [s for s in steps if s < step]
      where = f'trying checkpoint {later[-1]}' if later else 'no earlier checkpoint'
      say(f'checkpoint {store.path(step)} is damaged ({e}): skipped; {where}')
      skipped.append(step)
      continue
    out.step = max(out.step, step)
    if point.unit is not None and point.unit not in out.finished and point.unit in mine:
      out.point, out.state = point, state
    break
  else:
    if steps:
      say(f'no intact checkpoint in {store.directory}: the unit in progress starts from scratch')
  for step in skipped:
    store.remove(step)  # unusable; and not to be kept in place of whole ones
  return out


@contextlib.contextmanager
def disk_full_guard(workdir: str | None) -> Iterator[None]:
  """Turns a full disk while writing `workdir` into `files.DiskFull`, after removing the
  partial files (the whole checkpoints stay: a rerun resumes from them)."""
  try:
    yield
  except files.DiskFull:
    raise
  except Exception as e:
    if workdir is None or not files.is_disk_full(e):
      raise
    freed = files.remove_partial(workdir)
    raise files.DiskFull(os.path.abspath(workdir), freed) from e


# ------------------------------------------------------------ saved runs ----


def run_path(workdir: str, i: int) -> str:
  return os.path.abspath(os.path.join(workdir, 'runs', f'{i:06d}'))


def _run_meta_text(meta: dict[str, Any]) -> str:
  return json.dumps(meta, indent=2, default=files.json_default)


def run_is_saved(workdir: str, i: int, meta: dict[str, Any]) -> bool:
  """Whether run i is on disk, whole, with this metadata (a rerun then leaves it)."""
  path = run_path(workdir, i)
  return files.verify(path) is None and files.same_content(
    path + '.json', _run_meta_text(meta).encode()
  )


def save_run(
  workdir: str,
  i: int,
  params: Any,
  opt_state: Any,
  meta: dict[str, Any],
  best_params: Any = None,
  model_state: Any = None,
  best_model_state: Any = None,
  state_layout: str = 'collections',
  eval_params: Any = None,
) -> None:
  """Saves run i's parameters, model state (batch statistics) and optimizer state (and
  its best-evaluation parameters and model state, when kept; and the parameters it was
  evaluated at, when its optimizer evaluates elsewhere than it trains) with orbax, their
  checksums, and its metadata beside them."""
  path = run_path(workdir, i)
  if os.path.exists(path):
    shutil.rmtree(path)
  with _checkpointer() as ckpt:
    tree = {'params': host_copy(params), 'opt_state': host_copy(opt_state)}
    if best_params is not None:
      tree['best_params'] = host_copy(best_params)
    if eval_params is not None:
      tree['eval_params'] = host_copy(eval_params)
    # Flax linen keeps its collections beside 'params' ({'params', 'batch_stats'}); other
    # models' state is nested under 'state' (see `restore_variables`).
    kind = 'collections' if state_layout == 'collections' else 'state'
    if jax.tree.leaves(model_state):
      tree[f'model_{kind}'] = host_copy(model_state)
    if jax.tree.leaves(best_model_state):
      tree[f'best_model_{kind}'] = host_copy(best_model_state)
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
  files.write_checksums(path)
  files.atomic_write(path + '.json', _run_meta_text(meta))


def saved_runs(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'runs')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def restore_run(workdir: str, i: int, optimizer: Any = None) -> dict[str, Any]:
  """Everything saved of run i: `params`, `opt_state` (the optimizer state after its last
  update) and, with keep_best, `best_params`; under a schedule-free optimizer
  `eval_params`, the parameters its metrics were measured at; the model state under
  `model_collections` (flax linen) or `model_state`, when the model has one.

  The optimizer state comes back in optax's own types, so that optax's helpers
  (`optax.tree_utils.tree_get`, `optax.contrib.schedule_free_eval_params`, ...) and
  `update` work on it:

  - `optimizer=None`: for the sweep's named optimizers ('adam', 'sgd', ...), the state
    the sweep trained with: optax's injected-hyperparameters state (`hyperparams`,
    `inner_state`) whose `inner_state` is the optimizer's own. For an optimizer factory,
    nested dicts and lists of arrays (pass the factory to get its types).
  - `optimizer=` the factory the sweep was given (a callable returning an optax
    transformation): the sweep's state, as above, in that factory's types.
  - `optimizer=` an optax transformation to go on training with (`optax.adam(1e-3)`):
    the state that transformation keeps, its `init(params)`'s types, filled from the
    sweep's (the inner state of the injected one); refused if they do not match.

  Raises:
    KeyError: run i was not saved (the message names the runs that were).
    ValueError: its files are damaged (a rerun of the sweep saves them again), or
      `optimizer` keeps a state of another structure.
  """
  path = run_path(workdir, i)
  if not os.path.isdir(path):
    saved = saved_runs(workdir)
    raise KeyError(
      f'run {i} was not saved in {workdir!r}; saved runs (the Pareto front): {saved or "none"}'
    )
  problem = files.verify(path)
  if problem is not None:
    raise ValueError(
      f'run {i} in {workdir!r} is damaged ({problem}): run the same sweep again to save it again'
    )
  with _checkpointer() as ckpt:
    tree = ckpt.restore(path)
  tree = jax.tree.map(np.asarray, tree)
  target = _optimizer_target(path, tree, optimizer)
  if target is not None:
    saved = tree['opt_state']
    injected = hasattr(target, 'hyperparams') and hasattr(target, 'inner_state')
    if not injected and isinstance(saved, dict) and 'inner_state' in saved:
      saved = saved['inner_state']  # the state of a transformation of the user's own
    try:
      tree['opt_state'] = _typed(target, saved)
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise ValueError(
        f'run {i} in {workdir!r}: the optimizer given keeps a state of another structure '
        f'than the one the sweep saved ({e}); pass the optimizer the run was trained with'
      ) from None
  return tree


def _optimizer_target(path: str, tree: dict, optimizer: Any) -> Any:
  """The abstract optimizer state whose types run `path`'s state comes back in, or None."""
  from kernels import optimizers

  params = tree['params']
  if optimizer is None:
    with open(path + '.json') as f:
      name = json.load(f).get('optimizer')
    if name not in optimizers.FAMILIES:
      return None  # a factory's label: its types need the factory
    hyper = tree['opt_state'].get('hyperparams', {}) if isinstance(tree['opt_state'], dict) else {}
    # The hyperparameters the sweep injected are those a plain `make` does not hold.
    plain = jax.eval_shape(optimizers.make(name, {}).init, params).hyperparams
    made = optimizers.make(name, {k: np.float32(0) for k in hyper if k not in plain})
  elif isinstance(optimizer, optax.GradientTransformation):
    made = optimizer
  elif callable(optimizer):
    hyper = tree['opt_state'].get('hyperparams', {})
    names = tuple(k for k in hyper if k != 'learning_rate')
    made = optimizers.make(
      optimizers.Factory(optimizer, names, optimizers.label(optimizer)),
      {k: np.float32(0) for k in names},
    )
  else:
    raise TypeError(
      f'optimizer={optimizer!r}: expected an optax transformation or the optimizer factory '
      'the sweep was given'
    )
  return jax.eval_shape(made.init, params)


def _typed(target: Any, saved: Any) -> Any:
  """`saved` (orbax's nested dicts and lists) in the types of `target` (an optax state)."""
  if target is None or (isinstance(target, tuple) and not target and not saved):
    return target
  if hasattr(target, '_fields'):  # a NamedTuple: saved by field name
    if not target._fields:
      return type(target)()
    return type(target)(**{f: _typed(getattr(target, f), saved[f]) for f in target._fields})
  if isinstance(target, tuple | list):
    if len(saved) != len(target):
      raise ValueError(f'{len(target)} parts where the sweep saved {len(saved)}')
    return type(target)(_typed(t, s) for t, s in zip(target, saved, strict=True))
  if isinstance(target, dict):
    if set(target) != set(saved):
      raise KeyError(f'keys {sorted(target)} where the sweep saved {sorted(saved)}')
    return {k: _typed(target[k], saved[k]) for k in target}
  if isinstance(target, jax.ShapeDtypeStruct):
    value = np.asarray(saved)
    if value.shape != target.shape:
      raise ValueError(f'shape {target.shape} where the sweep saved {value.shape}')
    return value.astype(target.dtype)
  return saved


def restore_variables(workdir: str, i: int, best: bool = False) -> dict[str, Any]:
  """Run i's final variables, read back from `workdir`, as `Result.variables` gives them:
  for flax linen the dict `module.apply` takes (`{'params', 'batch_stats', ...}`), for other
  models `{'params': ..., 'state': ...}` (the state only when there is one).

  Args:
    workdir: the sweep's workdir.
    i: the run.
    best: its variables at its best evaluation instead (saved with keep_best=True).
  """
  tree = restore_run(workdir, i)
  prefix = 'best_' if best else ''
  if prefix + 'params' not in tree:
    raise KeyError(
      f'run {i} in {workdir!r} has no best parameters: the sweep ran without keep_best=True'
    )
  # The evaluated parameters (a schedule-free optimizer's average), as `restore_params`.
  params = tree['eval_params'] if not best and 'eval_params' in tree else tree[prefix + 'params']
  variables = {'params': params}
  variables.update(tree.get(prefix + 'model_collections') or {})
  if tree.get(prefix + 'model_state'):
    variables['state'] = tree[prefix + 'model_state']
  return variables


def restore_params(workdir: str, i: int, best: bool = False, raw: bool = False) -> Any:
  """Run i's final parameters, read back from its orbax checkpoint in `workdir`: those it
  was evaluated at (see `sweep.Result.params`).

  Args:
    workdir: the sweep's workdir.
    i: the run.
    best: its parameters at its best evaluation instead (saved with keep_best=True).
    raw: the parameters its optimizer trained, when they differ from the evaluated ones
      (a schedule-free optimizer).

  Raises:
    KeyError: run i was not saved (the message names the runs that were), or its best
      parameters were not kept.
    ValueError: its files are damaged.
  """
  tree = restore_run(workdir, i)
  key = 'best_params' if best else 'params'
  if not best and not raw and 'eval_params' in tree:
    key = 'eval_params'
  if key not in tree:
    raise KeyError(
      f'run {i} in {workdir!r} has no best parameters: the sweep ran without keep_best=True'
    )
  return tree[key]
