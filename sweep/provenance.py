"""Provenance: what a reproduction needs to know about a sweep, written to `config.json`.

The config as run (every field of `SweepConfig`, and what the plan derived from them),
the package versions, Python, backend and devices, and the experiment file's hash and
git commit.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

import jax
import numpy as np

from sweep import columns, fingerprint
from sweep.expansion import Plan, probe_size, val_probe_size

PACKAGES = ('lrbs-sweep', 'jax', 'jaxlib', 'optax', 'flax', 'orbax-checkpoint', 'numpy', 'pandas')


@functools.cache
def _package_versions() -> dict[str, str | None]:
  versions = {}
  for p in PACKAGES:
    try:
      versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      versions[p] = None
  return versions


def environment() -> dict[str, Any]:
  """Package versions, Python, backend and devices: what a reproduction needs to know."""
  versions = dict(_package_versions())
  return {
    'python': sys.version.split()[0],
    'platform': platform.platform(),
    'packages': versions,
    'backend': jax.default_backend(),
    'devices': [f'{d.platform}:{d.device_kind}' for d in jax.devices()],
    'process_count': jax.process_count(),
  }


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if callable(v):
    return getattr(v, '__qualname__', repr(v))
  return v


def _git_commit(path: str) -> str | None:
  """The commit of the repository holding `path`, if any (and whether it was dirty)."""
  directory = os.path.dirname(os.path.abspath(path))
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=directory, capture_output=True, text=True, timeout=10
    )
    if commit.returncode != 0:
      return None
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--', os.path.abspath(path)],
      cwd=directory,
      capture_output=True,
      text=True,
      timeout=10,
    )
    return commit.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '')
  except (OSError, subprocess.SubprocessError):
    return None


def experiment_record(path: str) -> dict[str, Any]:
  """The experiment file's name, hash and text, and the git commit it lives at."""
  with open(path, 'rb') as f:
    text = f.read()
  return {
    'file': os.path.basename(path),
    'sha256': hashlib.sha256(text).hexdigest(),
    'git_commit': _git_commit(path),
  }


def resolved_config(
  plan: Plan,
  eval_chunk: int,
  experiment_file: str | None = None,
  fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The config as run: every field of `SweepConfig` (taken from the dataclass, so none is
  missed), what the plan derived from them (axes, runs, step counts), the environment.

  A field is written as `fingerprint.describe` gives it (an array or dataset by shape
  and content hash, code by name and bytecode hash), except where a derived entry of the
  same name says more for a reader: `model` (its repr), `loss` (the loss in use), `data`
  (name, sizes, shapes), `num_evals` (the count in use), `objectives` (those in use: the
  defaults follow the data, said in `objectives_note`) and `name`. `eval_chunk`: the
  examples per evaluation step (the validation subset is in whole chunks). `fields`: the
  config's `fingerprint.config_fields`, if described already.
  """
  cfg = plan.config
  data = cfg.data
  out = {
    'name': cfg.name,
    'axes': _jsonable(plan.axes),
    'num_runs': len(plan.runs),
    'model': repr(cfg.model)
    if not isinstance(cfg.model, tuple)
    else [_jsonable(f) for f in cfg.model],
    'loss': _jsonable(plan.loss),
    'budget': {'epochs': cfg.epochs, 'updates': cfg.updates},
    'updates_per_run': {str(b): t for b, t in plan.total_updates.items()},
    'steps_per_epoch': {str(b): t for b, t in plan.steps_per_epoch.items()},
    'num_evals': plan.num_evals,
    'data': {
      'name': data.name,
      'n_train': data.n_train,
      'n_val': data.n_val,
      'x_shape': jax.tree.map(lambda a: list(a.shape[1:]), data.x_train),
      'y_shape': list(data.y_train.shape[1:]),
      'num_classes': data.num_classes,
    },
  }
  out['train_probe'] = {
    'examples': probe_size(plan),
    'of': data.n_train,
    'subset': 'the first of numpy.random.default_rng(0).permutation(n_train), sorted',
    'chosen_by': 'train_eval_size'
    if cfg.train_eval_size is not None
    else 'sized to the training: a twentieth of a segment (train_eval_size=None)',
  }
  if data.n_val:
    val = val_probe_size(plan, eval_chunk)
    out['val_probe'] = {
      'examples': val,
      'of': data.n_val,
      'at': 'the start and the intermediate evaluation points; the last evaluates all '
      f'{data.n_val}',
      'subset': 'the first of numpy.random.default_rng(1).permutation(n_val), sorted'
      if val < data.n_val
      else 'the whole validation set',
      'chosen_by': 'val_eval_size'
      if cfg.val_eval_size is not None
      else 'sized to the training: a twentieth of a segment, in whole evaluation chunks '
      '(val_eval_size=None)',
    }
  out['objectives'] = columns.objectives(cfg.objectives, validation=bool(data.n_val))
  if out['objectives'] != dict(cfg.objectives):
    out['objectives_note'] = (
      "no validation set: the default objectives rank the runs by the training probe's loss "
      f'final_train_loss (on {probe_size(plan)} training examples) in '
      'place of final_val_loss'
    )
  if plan.search:  # runs that are no grid: how they were chosen (explicit, or sampled)
    out['search'] = _jsonable(plan.search)
  for name, value in (fingerprint.config_fields(cfg) if fields is None else fields).items():
    out.setdefault(name, value)
  out['environment'] = environment()
  if experiment_file is not None:
    out['experiment'] = experiment_record(experiment_file)
  return out
