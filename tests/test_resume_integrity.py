"""A resume never gives other numbers: the optimizer state comes back, damaged checkpoints
are skipped for intact ones, and a workdir holding another sweep is refused.

One small sweep (`test_equivalence`'s tanh MLP on its regression set, adam and momentum,
2 learning rates x 2 batch sizes, 6 segments, shuffled) is trained once without a
workdir: the reference. Its runs are first checked against plain optax loops written
here (final parameters, and the optimizer state each Pareto run is saved with), so that
"the same numbers as the reference" means the right numbers. Then, in this process (the
programs compile once):
- the sweep is stopped by SIGTERM inside the adam unit and again inside the momentum
  unit, and resumed: bit for bit the reference;
- a copy of a stopped workdir is damaged in each way a disk or a kill can damage it
  (flipped bytes, a truncated file, a missing file, a state that does not restore,
  every checkpoint, a finished unit, sweep.json) and resumed: a one-line report, then
  the reference's numbers;
- the finished workdir is offered configs that differ in one thing each: each is
  refused before training with a message naming the change, and the workdir is left
  as it was; a change that cannot alter a number (the name, the objectives) resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from test_equivalence import (
  MAX_BATCH,
  MODEL,
  REGRESSION,
  data_order,
  excess,
  initial_params,
  lr_table,
  make_optimizer,
  mlp_apply,
  mlp_init,
  reference_step,
)

import sweep
from kernels import train
from sweep import checkpoints, engine, fingerprint, units

FAMILIES = ['adam', 'momentum']
LEARNING_RATES = [0.01, 0.03]
BATCH_SIZES = [16, 48]
EPOCHS, SEGMENTS = 3, 6  # units: adam, momentum; 6 segments each
NUM_RUNS = len(FAMILIES) * len(LEARNING_RATES) * len(BATCH_SIZES)
ALL_ON_THE_FRONT = {'seed': 'min'}  # one seed: every run ties, so every run is saved


def config(**changes) -> sweep.SweepConfig:
  cfg = sweep.SweepConfig(
    model=MODEL,
    data=REGRESSION,
    loss='mse',
    optimizer=FAMILIES,
    learning_rate=LEARNING_RATES,
    batch_size=BATCH_SIZES,
    seed=0,
    epochs=EPOCHS,
    num_evals=SEGMENTS,
    shuffle=True,
    objectives=ALL_ON_THE_FRONT,
    name='integrity',
  )
  return cfg.replace(**changes)


# ------------------------------------------------------------------------ helpers ----


def assert_same_result(actual: sweep.Result, expected: sweep.Result) -> None:
  """Every number of the table (wall times aside) and the curves, bit for bit."""
  a, b = actual.table.drop(columns='seconds'), expected.table.drop(columns='seconds')
  pd.testing.assert_frame_equal(a, b, check_exact=True)
  pd.testing.assert_frame_equal(actual.curves, expected.curves, check_exact=True)
  for i in range(len(expected.table)):
    for x, y in zip(
      jax.tree.leaves(actual.params(i)), jax.tree.leaves(expected.params(i)), strict=True
    ):
      assert np.array_equal(x, y), i


def snapshot(directory: Path) -> dict[str, tuple]:
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory) + '/'] = ()
    for name in files:
      if name.startswith('.lock'):
        continue  # the writer's lock (sweep.lock), not the workdir's content
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (
        st.st_size,
        st.st_mtime_ns,
        hashlib.sha256(Path(path).read_bytes()).hexdigest(),
      )
  return out


def steps(workdir: Path) -> list[int]:
  state = workdir / 'state'
  return sorted(int(p.name) for p in state.iterdir() if p.name.isdigit()) if state.is_dir() else []


def interrupt_at(monkeypatch, calls: int, signum=signal.SIGTERM) -> None:
  """Sends this process `signum` during the `calls`-th segment call from now."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are only installed in the main thread')
  count = []
  original = train.segment_jit

  def segment_jit(*args, **kwargs):
    count.append(1)
    if len(count) == calls:
      os.kill(os.getpid(), signum)
    return original(*args, **kwargs)

  monkeypatch.setattr(train, 'segment_jit', segment_jit)


def stopped(monkeypatch, workdir: Path, calls: int, signum=signal.SIGTERM, cfg=None) -> int:
  """Runs the sweep into `workdir` until a signal in segment call `calls`; returns the exit code."""
  interrupt_at(monkeypatch, calls, signum)
  with pytest.raises(SystemExit) as info:
    sweep.run(cfg or config(), workdir=str(workdir), progress=False)
  monkeypatch.undo()
  return info.value.code


# ------------------------------------------------------------ the plain reference ----


def reference_run(family: str, learning_rate: float, batch_size: int, seed: int = 0):
  """One run trained plainly with optax: final params, optimizer state, batch losses."""
  x, y = REGRESSION.x_train, REGRESSION.y_train
  n = len(x)
  total = EPOCHS * (n // batch_size)
  hp = {
    k: np.float32(v)
    for k, v in {'adam': {'b1': 0.9, 'b2': 0.999}, 'momentum': {'momentum': 0.9}}[family].items()
  }
  lrs = lr_table('constant', float(learning_rate), total)
  params = initial_params(mlp_init, seed)
  opt_state = make_optimizer(family, lambda count: lrs[count], hp).init(params)
  real = np.arange(MAX_BATCH) < batch_size
  per_epoch = n // batch_size
  values = []
  for t in range(total):
    epoch, j = divmod(t, per_epoch)
    idx = data_order(seed, epoch, n, True)[j * batch_size : (j + 1) * batch_size]
    padded = np.concatenate([idx, np.zeros(MAX_BATCH - batch_size, idx.dtype)])
    params, opt_state, value = reference_step(
      params,
      opt_state,
      x[padded],
      y[padded],
      real,
      lrs,
      hp,
      family=family,
      loss='mse',
      apply_fn=mlp_apply,
    )
    values.append(float(value))
  return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, opt_state), values


def moments(tree) -> dict[str, object]:
  """The optimizer's moment trees in a state (adam's mu and nu, momentum's trace), found
  by name, whether the state is optax's NamedTuples or the dicts orbax gives back."""
  out = {}

  def visit(node):
    if isinstance(node, dict):
      items = node.items()
    elif hasattr(node, '_fields'):
      items = ((f, getattr(node, f)) for f in node._fields)
    elif isinstance(node, (list, tuple)):
      items = enumerate(node)
    else:
      return
    for key, value in items:
      if key in ('mu', 'nu', 'trace'):
        out[key] = value
      else:
        visit(value)

  visit(tree)
  return out


@pytest.fixture(scope='module')
def reference() -> sweep.Result:
  return sweep.run(config(), progress=False)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, reference) -> Path:
  """A workdir the sweep finished in, uninterrupted."""
  workdir = tmp_path_factory.mktemp('finished') / 'w'
  result = sweep.run(config(), workdir=str(workdir), progress=False)
  assert_same_result(result, reference)
  return workdir


def test_the_reference_and_its_saved_optimizer_states_match_plain_optax(reference, finished):
  table = reference.table
  assert len(table) == NUM_RUNS and (table.status == 'ok').all()
  assert table.pareto.all(), 'every run must be saved for this test'
  for i, row in table.iterrows():
    params, opt_state, _ = reference_run(row.optimizer, row.learning_rate, int(row.batch_size))
    assert excess(reference.params(i), params) <= 0, f'run {i} ({row.optimizer})'
    saved = checkpoints.restore_run(str(finished), i)
    assert excess(saved['params'], params) <= 0, i
    got, want = moments(saved['opt_state']), moments(opt_state)
    assert set(want) == ({'mu', 'nu'} if row.optimizer == 'adam' else {'trace'}), want.keys()
    assert set(got) == set(want), (i, got.keys())
    for name in want:
      assert excess(got[name], want[name]) <= 0, f'run {i} ({row.optimizer}): {name}'


# ----------------------------------------------------------------------- resumes ----


def test_resumed_inside_each_optimizer_unit_gives_the_reference(
  tmp_path, monkeypatch, reference, capsys
):
  """SIGTERM at segment 3 of the adam unit, then at segment 3 of the momentum unit (whose
  optimizer states carry the moments that a lost state would zero)."""
  workdir = tmp_path / 'w'
  assert stopped(monkeypatch, workdir, 3) == 143
  assert steps(workdir) == [2, 3]
  assert stopped(monkeypatch, workdir, SEGMENTS) == 143  # segments 4-6 of adam, 1-3 of momentum
  assert steps(workdir) == [8, 9]
  resumed = sweep.run(config(), workdir=str(workdir), progress=False)
  assert_same_result(resumed, reference)
  assert 'damaged' not in capsys.readouterr().err


def test_sigint_saves_like_sigterm_and_exits_130(tmp_path, monkeypatch, reference, capsys):
  workdir = tmp_path / 'w'
  handler = signal.getsignal(signal.SIGINT)
  assert stopped(monkeypatch, workdir, 2, signal.SIGINT) == 130
  err = capsys.readouterr().err
  assert 'SIGINT received' in err and 'state saved at segment 2' in err, err
  assert signal.getsignal(signal.SIGINT) is handler
  assert_same_result(sweep.run(config(), workdir=str(workdir), progress=False), reference)


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory) -> Path:
  """A workdir stopped in the momentum unit: the adam unit in done/, checkpoints 8 and 9."""
  workdir = tmp_path_factory.mktemp('interrupted') / 'w'
  patch = pytest.MonkeyPatch()
  try:
    assert stopped(patch, workdir, SEGMENTS + 3) == 143
  finally:
    patch.undo()
  assert steps(workdir) == [SEGMENTS + 2, SEGMENTS + 3]
  return workdir


def flip(path: Path, count: int = 8) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for k in range(count):
    data[middle + k] ^= 0xFF
  path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def not_restoring(path: Path) -> None:
  """A state.npz that is whole (its checksum rewritten to match) but of another shape."""
  with open(path, 'wb') as f:
    np.savez(f, **{'000000': np.zeros(3, np.float32)})
  table = json.loads((path.parent / 'checksums.json').read_text())
  table['files'][path.name] = {
    'size': path.stat().st_size,
    'sha256': hashlib.sha256(path.read_bytes()).hexdigest(),
  }
  (path.parent / 'checksums.json').write_text(json.dumps(table))


LATEST, EARLIER = SEGMENTS + 3, SEGMENTS + 2
DAMAGE = [
  # id, what is done to the workdir, what the one-line report says
  ('flipped-bytes', lambda w: flip(w / f'state/{LATEST}/state.npz'), 'fails its checksum'),
  ('truncated', lambda w: truncate(w / f'state/{LATEST}/state.npz'), 'truncated'),
  (
    'no-checksums',
    lambda w: (w / f'state/{LATEST}/checksums.json').unlink(),
    'checksums.json is missing',
  ),
  ('no-meta', lambda w: (w / f'state/{LATEST}/meta.json').unlink(), 'meta.json is missing'),
  ('flipped-meta', lambda w: flip(w / f'state/{LATEST}/meta.json', 2), 'fails its checksum'),
  (
    'does-not-restore',
    lambda w: not_restoring(w / f'state/{LATEST}/state.npz'),
    'does not restore',
  ),
]


@pytest.mark.parametrize('damage, report', [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_latest_checkpoint_is_skipped_for_the_one_before(
  interrupted, tmp_path, reference, capsys, monkeypatch, damage, report
):
  workdir = tmp_path / 'w'
  shutil.copytree(interrupted, workdir)
  damage(workdir)
  calls = []
  original = train.segment_jit
  monkeypatch.setattr(train, 'segment_jit', lambda *a, **k: calls.append(1) or original(*a, **k))
  resumed = sweep.run(config(), workdir=str(workdir), progress=False)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if 'damaged' in line]
  assert len(lines) == 1 and report in lines[0] and f'trying checkpoint {EARLIER}' in lines[0], err
  assert len(calls) == 2 * SEGMENTS - EARLIER  # from checkpoint 8, not 9, nor from scratch
  assert_same_result(resumed, reference)


def test_with_no_intact_checkpoint_the_unit_starts_from_scratch(
  interrupted, tmp_path, reference, capsys
):
  workdir = tmp_path / 'w'
  shutil.copytree(interrupted, workdir)
  flip(workdir / f'state/{LATEST}/state.npz')
  truncate(workdir / f'state/{EARLIER}/state.npz')
  resumed = sweep.run(config(), workdir=str(workdir), progress=False)
  err = capsys.readouterr().err
  assert err.count('damaged') == 2 and 'starts from scratch' in err, err
  assert_same_result(resumed, reference)


def test_a_damaged_finished_unit_is_trained_again(finished, tmp_path, reference, capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(finished, workdir)
  flip(workdir / 'done' / '0000' / 'state.npz')
  resumed = sweep.run(config(), workdir=str(workdir), progress=False)
  err = capsys.readouterr().err
  assert 'done/0000 is damaged' in err and 'training unit 0 again' in err, err
  assert_same_result(resumed, reference)
  assert checkpoints.files.verify(str(workdir / 'done' / '0000')) is None


@pytest.mark.parametrize('damage', ['truncated', 'deleted'])
def test_a_lost_sweep_json_is_written_again_from_the_checkpoints(
  interrupted, tmp_path, reference, capsys, damage
):
  workdir = tmp_path / 'w'
  shutil.copytree(interrupted, workdir)
  if damage == 'truncated':
    truncate(workdir / 'sweep.json')
  else:
    (workdir / 'sweep.json').unlink()
  # Another sweep cannot take the workdir over for want of its record.
  before = snapshot(workdir)
  with pytest.raises(sweep.ConfigError, match='checkpoints are of another sweep'):
    sweep.run(config(learning_rate=[0.01, 0.02]), workdir=str(workdir), progress=False)
  assert snapshot(workdir) == before
  resumed = sweep.run(config(), workdir=str(workdir), progress=False)
  assert ('sweep.json is damaged' in capsys.readouterr().err) == (damage == 'truncated')
  assert_same_result(resumed, reference)
  assert (
    json.loads((workdir / 'sweep.json').read_text())['fingerprint'] == resumed.config['fingerprint']
  )


def test_keep_checkpoints_is_a_setting(tmp_path):
  workdir = tmp_path / 'w'
  sweep.run(config(), workdir=str(workdir), progress=False, keep_checkpoints=3)
  assert steps(workdir) == [2 * SEGMENTS - 2, 2 * SEGMENTS - 1, 2 * SEGMENTS]
  with pytest.raises(sweep.ConfigError, match='keep_checkpoints'):
    sweep.run(config(), workdir=str(tmp_path / 'x'), progress=False, keep_checkpoints=0)


# ------------------------------------------------------------------- refusals ----


def relu_apply(params, x):
  return jax.nn.relu(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


def half_mse(predictions, targets):
  return 0.5 * jnp.mean(jnp.square(predictions - targets), axis=-1)


def other_targets() -> sweep.data.Dataset:
  y = REGRESSION.y_train.copy()
  y[17, 0] += 0.25  # one number of 600
  return sweep.data.arrays(REGRESSION.x_train, y)


def tight_budget() -> float:
  """A memory budget that fits one run per slot: chunk width 1 instead of 2."""
  cfg = config()
  plan, model = engine.check(cfg), engine.model_of(cfg, 3)
  per_run = max(units.run_bytes(plan, model, f, cfg.data.n_train) for f in FAMILIES)
  slots = len(BATCH_SIZES)
  return REGRESSION.x_train.nbytes + REGRESSION.y_train.nbytes + 1.5 * slots * per_run


CHANGES = [
  # id, the changed config, fragments of the refusal
  ('data', lambda: config(data=other_targets()), ['data.y_train: float32[200,3] sha256:']),
  ('apply_fn', lambda: config(model=(mlp_init, relu_apply)), ['model[1]: function', 'relu_apply']),
  ('loss', lambda: config(loss=half_mse), ['loss: mse -> function', 'half_mse']),
  ('noise_scale', lambda: config(noise_scale=True), ['noise_scale: false -> true']),
  ('keep_best', lambda: config(keep_best=True), ['keep_best: false -> true']),
  (
    'learning_rate',
    lambda: config(learning_rate=[0.01, 0.02]),
    ['learning_rate: [0.01, 0.03] -> [0.01, 0.02]'],
  ),
  ('memory_budget', lambda: config(memory_budget=tight_budget()), ['chunk_width.adam: 2 -> 1']),
]


@pytest.mark.parametrize('make, fragments', [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_a_changed_sweep_is_refused_naming_the_change(finished, make, fragments):
  before = snapshot(finished)
  with pytest.raises(sweep.ConfigError) as info:
    sweep.run(make(), workdir=str(finished), progress=False)
  message = str(info.value)
  assert 'holds another sweep' in message and '--fresh' in message, message
  for fragment in fragments:
    assert fragment in message, message
  assert '\n' not in message
  assert snapshot(finished) == before


def test_every_config_field_is_in_the_fingerprint_or_documented_as_harmless(finished):
  record = json.loads((finished / 'sweep.json').read_text())
  names = {f.name for f in dataclasses.fields(sweep.SweepConfig)}
  assert set(record['strict']['config']) == names - set(fingerprint.SOFT_FIELDS)
  assert set(fingerprint.SOFT_FIELDS) <= names
  assert set(record['soft']) == set(fingerprint.SOFT_FIELDS) | {'environment'}
  assert record['strict']['devices']['local_device_count'] == jax.local_device_count()
  assert record['strict']['model']['parameters']["['w1']"] == 'float32[8,16]'


def test_a_finished_workdir_is_read_again_without_writing(finished, reference, capsys):
  before = snapshot(finished)
  again = sweep.run(config(), workdir=str(finished), progress=False)
  assert_same_result(again, reference)
  assert snapshot(finished) == before
  assert 'sweep:' not in capsys.readouterr().err


def test_a_new_name_or_new_objectives_resume_and_only_the_front_changes(
  finished, tmp_path, reference, capsys
):
  workdir = tmp_path / 'w'
  shutil.copytree(finished, workdir)
  renamed = sweep.run(config(name='renamed'), workdir=str(workdir), progress=False)
  assert 'name: integrity -> renamed' in capsys.readouterr().err
  assert_same_result(renamed, reference)
  objectives = {'final_train_loss': 'min', 'updates': 'min'}
  other = sweep.run(config(objectives=objectives), workdir=str(workdir), progress=False)
  front = sorted(int(i) for i in other.table.index[other.table.pareto])
  assert 0 < len(front) < NUM_RUNS
  assert checkpoints.saved_runs(str(workdir)) == front
  for column in ('final_train_loss', 'updates', 'final_batch_loss'):
    assert other.table[column].equals(reference.table[column])
