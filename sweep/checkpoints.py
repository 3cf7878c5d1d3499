"""Orbax checkpoints: the whole sweep state (to resume) and the Pareto-best runs (to keep).

Layout of a workdir:
  config.json, results.csv, curves.csv   the results (written atomically)
  sweep.json                             the fingerprint of the sweep the workdir holds
  state/<step>/                          CheckpointManager of the whole sweep state
  state/process-<p>-of-<n>/<step>/       the same for process p of n (state.npz, meta.json)
  done/<c>/                              final state of finished unit c
  runs/<i>/                              params and optimizer state of run i (Pareto runs)
  runs/<i>.json                          its hyperparameters and metrics
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sweep.errors import ConfigError


def _local() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a checkpoint this process writes or reads alone (in a sweep of
  several processes each trains its own runs; nothing here is a collective)."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _checkpointer() -> ocp.StandardCheckpointer:
  if jax.process_count() == 1:
    return ocp.StandardCheckpointer()
  return ocp.StandardCheckpointer(multiprocessing_options=_local())


def fingerprint(resolved: dict[str, Any]) -> str:
  """A hash of what defines the numbers of a sweep (not where or when it ran)."""
  keep = {k: v for k, v in resolved.items() if k not in ('environment', 'experiment')}
  text = json.dumps(keep, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_copy(tree: Any) -> Any:
  """A host copy of `tree`: the device buffers may be donated to the next segment."""
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


class SweepState:
  """The whole sweep state at segment boundaries, with an orbax CheckpointManager.

  Saves are asynchronous (training goes on while files are written) and keep the
  latest `keep`. Orbax writes each step to a temporary directory and renames it when
  complete, so a process killed at any moment leaves only whole checkpoints.

  One process only; `ProcessState` is the same for each process of a multi-process sweep.
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'state'))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        item_names=('state', 'meta'),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any | None, meta: dict[str, Any]) -> None:
    """Saves `meta` and, unless None, the state of the unit in progress."""
    items = {'meta': ocp.args.JsonSave(meta)}
    if state is not None:
      items['state'] = ocp.args.StandardSave(host_copy(state))
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return out.state, out.meta

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class ProcessState:
  """`SweepState` for one process of a multi-process sweep, in a directory of its own.

  The processes of a sweep train their own units and checkpoint them at their own
  moments, with no collective. orbax cannot write such a process-local state: it takes
  numpy arrays for replicated values (written by process 0 alone) and refuses jax
  arrays that are not global. So each process writes its state as one `.npz` of the
  tree's leaves (their structure is the sweep's, known to every process) and its meta
  as JSON, into a temporary directory renamed when complete, keeping the latest `keep`.
  A rerun with another process count assigns the units differently and starts afresh.
  """

  def __init__(self, workdir: str, keep: int = 2):
    name = f'process-{jax.process_index()}-of-{jax.process_count()}'
    self.directory = os.path.abspath(os.path.join(workdir, 'state', name))
    self.keep = keep
    os.makedirs(self.directory, exist_ok=True)

  def _steps(self) -> list[int]:
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def latest_step(self) -> int | None:
    steps = self._steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any | None, meta: dict[str, Any]) -> None:
    write_dir(os.path.join(self.directory, str(step)), state, meta)
    for old in self._steps()[: -self.keep]:
      shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    path = os.path.join(self.directory, str(step))
    return load_leaves(os.path.join(path, 'state.npz'), abstract_state), self.restore_meta(step)

  def restore_meta(self, step: int) -> dict[str, Any]:
    with open(os.path.join(self.directory, str(step), 'meta.json')) as f:
      return json.load(f)

  def wait(self) -> None:
    pass

  def close(self) -> None:
    pass


def write_dir(path: str, state: Any | None, meta: dict[str, Any] | None = None) -> None:
  """Writes `state` (state.npz) and `meta` (meta.json) as directory `path`: into a
  temporary directory first, renamed when whole, so a killed process leaves no half."""
  tmp = path + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  if state is not None:
    save_leaves(os.path.join(tmp, 'state.npz'), state)
  if meta is not None:
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)


def save_leaves(path: str, tree: Any) -> None:
  """Writes the leaves of `tree` (host arrays) to the .npz file `path`."""
  leaves = [np.asarray(a) for a in jax.tree.leaves(tree)]
  with open(path, 'wb') as f:
    np.savez(f, **{f'{i:06d}': a for i, a in enumerate(leaves)})


def load_leaves(path: str, abstract: Any) -> Any:
  """The tree `save_leaves` wrote, in the structure of `abstract` (shapes checked)."""
  leaves, treedef = jax.tree.flatten(abstract)
  with np.load(path) as f:
    arrays = [f[f'{i:06d}'] for i in range(len(leaves))]
  for a, want in zip(arrays, leaves, strict=True):
    if a.shape != tuple(want.shape) or a.dtype != want.dtype:
      raise ValueError(f'{path} holds an array {a.shape} {a.dtype} where {want.shape} {want.dtype} belongs')
  return jax.tree.unflatten(treedef, arrays)


def open_state(workdir: str) -> SweepState | ProcessState:
  """The whole-state checkpoints of this process."""
  return SweepState(workdir) if jax.process_count() == 1 else ProcessState(workdir)


def claim(workdir: str, fp: str, fresh: bool, write: bool = True) -> bool:
  """Checks that `workdir` holds this sweep (or nothing); returns True if it holds state.

  With `write` False (processes other than 0 of a multi-process sweep) it only checks.

  Raises:
    ConfigError: the workdir holds another sweep and `fresh` is False. Nothing in the
      workdir is changed.
  """
  path = os.path.join(workdir, 'sweep.json')
  if os.path.exists(path):
    with open(path) as f:
      held = json.load(f).get('fingerprint')
    if held != fp and not fresh:
      raise ConfigError(
          f'workdir={workdir!r} holds another sweep (fingerprint {held}, this config is {fp}): '
          'use another workdir, or start afresh with fresh=True (CLI: --fresh), which deletes its checkpoints.'
      )
    if not write:
      return False
    if held != fp or fresh:
      for sub in ('state', 'runs', 'done'):
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
      for name in ('results.csv', 'curves.csv', 'sweep.json', 'config.json', 'experiment.py'):
        if os.path.exists(os.path.join(workdir, name)):
          os.unlink(os.path.join(workdir, name))
  if not write:
    return False
  from sweep.results import atomic_write  # a cycle: results imports nothing from here

  os.makedirs(workdir, exist_ok=True)
  atomic_write(path, json.dumps({'fingerprint': fp}))
  return os.path.isdir(os.path.join(workdir, 'state'))


# -------------------------------------------------------- finished units ----


def done_path(workdir: str, c: int) -> str:
  return os.path.abspath(os.path.join(workdir, 'done', f'{c:04d}'))


def save_done(workdir: str, c: int, state: Any) -> None:
  """Saves a finished unit's final state once; later checkpoints only point to it."""
  path = done_path(workdir, c)
  if os.path.exists(path):
    shutil.rmtree(path)
  if jax.process_count() > 1:
    # A process's own unit: orbax would leave it to process 0 (see `ProcessState`).
    write_dir(path, state)
    return
  with _checkpointer() as ckpt:
    ckpt.save(path, state)
    ckpt.wait_until_finished()


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
          'this run\'s final state was not kept: the sweep outgrew its memory budget. '
          'Run it with a workdir to keep every final state on disk.'
      )
    if os.path.exists(os.path.join(self.path, 'state.npz')):
      return load_leaves(os.path.join(self.path, 'state.npz'), self.abstract)
    with _checkpointer() as ckpt:
      return jax.tree.map(np.asarray, ckpt.restore(self.path, self.abstract))


# ------------------------------------------------------------ saved runs ----


def run_path(workdir: str, i: int) -> str:
  return os.path.abspath(os.path.join(workdir, 'runs', f'{i:06d}'))


def save_run(
    workdir: str, i: int, params: Any, opt_state: Any, meta: dict[str, Any], best_params: Any = None,
    model_state: Any = None, best_model_state: Any = None, state_layout: str = 'collections',
) -> None:
  """Saves run i's parameters, model state (batch statistics) and optimizer state (and
  its best-evaluation parameters and model state, when kept), with its metadata beside
  them."""
  from sweep.results import atomic_write

  path = run_path(workdir, i)
  if os.path.exists(path):
    shutil.rmtree(path)
  with _checkpointer() as ckpt:
    tree = {'params': host_copy(params), 'opt_state': host_copy(opt_state)}
    if best_params is not None:
      tree['best_params'] = host_copy(best_params)
    # Flax linen keeps its collections beside 'params' ({'params', 'batch_stats'}); other
    # models' state is nested under 'state' (see `restore_variables`).
    kind = 'collections' if state_layout == 'collections' else 'state'
    if jax.tree.leaves(model_state):
      tree[f'model_{kind}'] = host_copy(model_state)
    if jax.tree.leaves(best_model_state):
      tree[f'best_model_{kind}'] = host_copy(best_model_state)
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
  atomic_write(path + '.json', json.dumps(meta, indent=2, default=_json_default))


def saved_runs(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'runs')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _restore_run(workdir: str, i: int) -> dict[str, Any]:
  path = run_path(workdir, i)
  if not os.path.isdir(path):
    saved = saved_runs(workdir)
    raise KeyError(
        f'run {i} was not saved in {workdir!r}; saved runs (the Pareto front): {saved or "none"}'
    )
  with _checkpointer() as ckpt:
    return ckpt.restore(path)


def restore_variables(workdir: str, i: int, best: bool = False) -> dict[str, Any]:
  """Run i's final variables, read back from `workdir`, as `Result.variables` gives them:
  for flax linen the dict `module.apply` takes (`{'params', 'batch_stats', ...}`), for other
  models `{'params': ..., 'state': ...}` (the state only when there is one).

  Args:
    workdir: the sweep's workdir.
    i: the run.
    best: its variables at its best evaluation instead (saved with keep_best=True).
  """
  tree = _restore_run(workdir, i)
  prefix = 'best_' if best else ''
  if prefix + 'params' not in tree:
    raise KeyError(f'run {i} in {workdir!r} has no best parameters: the sweep ran without keep_best=True')
  variables = {'params': tree[prefix + 'params']}
  variables.update(tree.get(prefix + 'model_collections') or {})
  if tree.get(prefix + 'model_state'):
    variables['state'] = tree[prefix + 'model_state']
  return jax.tree.map(np.asarray, variables)


def restore_params(workdir: str, i: int, best: bool = False) -> Any:
  """Run i's final parameters, read back from its orbax checkpoint in `workdir`.

  Args:
    workdir: the sweep's workdir.
    i: the run.
    best: its parameters at its best evaluation instead (saved with keep_best=True).

  Raises:
    KeyError: run i was not saved (the message names the runs that were), or its best
      parameters were not kept.
  """
  tree = _restore_run(workdir, i)
  key = 'best_params' if best else 'params'
  if key not in tree:
    raise KeyError(f'run {i} in {workdir!r} has no best parameters: the sweep ran without keep_best=True')
  return jax.tree.map(np.asarray, tree[key])


def _json_default(v):
  if isinstance(v, (np.floating, np.integer, np.bool_)):
    return v.item()
  return str(v)
