"""Runs that are no grid: an explicit `runs=` list and configurations sampled from spaces.

`runs=` rows are checked against plain optax loops (the reference of test_factories.py) and
against the same configurations run alone; sampled sweeps are checked for reproducibility
from `sample_seed` (without training: the plan is enough), for an exact resume after a
SIGTERM, and for the analyses and the report they feed. Mistakes are reported before
anything compiles.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from test_config_errors import assert_message, expect_config_error
from test_factories import (
  DATA,
  MODEL,
  N_TRAIN,
  clipped_adamw,
  excess,
  reference,
  warmup_cosine,
  warmup_linear,
)

import sweep
from kernels import train
from sweep import analysis, engine, report, units
from sweep.config import AXES, validate

REPO = Path(__file__).resolve().parents[1]
BASE = dict(model=MODEL, data=DATA, loss='mse', epochs=2, shuffle=True)


# --------------------------------------------------------------------------- runs= lists ----

RUNS = [
  {'learning_rate': 0.01, 'batch_size': 16, 'seed': 0},
  {'learning_rate': 0.03, 'batch_size': 48, 'seed': 1, 'schedule': 'cosine'},
  {'learning_rate': 0.003, 'batch_size': 16, 'seed': 1, 'schedule': warmup_cosine},
  {
    'learning_rate': 0.02,
    'batch_size': 16,
    'seed': 0,
    'optimizer': clipped_adamw,
    'weight_decay': 0.01,
    'clip_norm': 0.1,
  },
  {
    'learning_rate': 0.01,
    'batch_size': 48,
    'seed': 0,
    'optimizer': 'sgd',
    'schedule': 'warmup_linear',
  },
  {'learning_rate': 0.001, 'batch_size': 16, 'seed': 0, 'b1': 0.8},
]


@pytest.fixture(scope='module')
def listed():
  cfg = sweep.SweepConfig(**BASE, runs=RUNS)
  return cfg, sweep.run(cfg, progress=False)


def test_runs_are_the_rows_of_the_table_in_order(listed):
  _, result = listed
  table = result.table
  assert table.run.tolist() == list(range(len(RUNS)))
  for i, entry in enumerate(RUNS):
    for key in ('learning_rate', 'batch_size', 'seed'):
      assert table.loc[i, key] == entry[key]
  assert table.optimizer.tolist() == ['adam', 'adam', 'adam', 'clipped_adamw', 'sgd', 'adam']
  assert table.schedule.tolist() == [
    'constant',
    'cosine',
    'warmup_cosine_decay_schedule(0.0, lr, total // 10, total)',
    'constant',
    'warmup_linear',
    'constant',
  ]
  # Fields a run does not name take the config's value (adam's b1 default where unset).
  assert table.b1.tolist()[:3] == [0.9, 0.9, 0.9] and table.b1[5] == 0.8
  assert math.isnan(table.b1[3]) and math.isnan(table.b1[4])
  assert table.clip_norm[3] == 0.1 and table.clip_norm.drop(3).isna().all()
  assert (table.status == 'ok').all()


def _schedule_of(entry):
  s = entry.get('schedule', 'constant')
  if callable(s):
    return s
  return {
    'constant': lambda lr, total: lr,
    'cosine': lambda lr, total: optax.cosine_decay_schedule(lr, total),
    'warmup_linear': warmup_linear,
  }[s]


def _maker_and_hp(entry):
  opt = entry.get('optimizer', 'adam')
  if opt == 'adam':
    return optax.adam, {'b1': entry.get('b1', 0.9), 'b2': 0.999}
  if opt == 'sgd':
    return optax.sgd, {}
  return opt, {'weight_decay': entry['weight_decay'], 'clip_norm': entry['clip_norm']}


def test_runs_equal_their_optax_loops(listed):
  _, result = listed
  for i, entry in enumerate(RUNS):
    make, hp = _maker_and_hp(entry)
    total = 2 * (N_TRAIN // entry['batch_size'])
    want, done = reference(
      make,
      hp,
      _schedule_of(entry),
      entry['learning_rate'],
      entry['batch_size'],
      entry['seed'],
      total,
    )
    assert result.table.updates[i] == done
    assert excess(result.params(i), want) <= 0, f'run {i} differs from its optax loop'


def test_runs_equal_the_same_configurations_run_alone(listed):
  cfg, result = listed
  for i, entry in enumerate(RUNS):
    fields = {k: v for k, v in entry.items() if k in AXES}
    extra = {k: v for k, v in entry.items() if k not in AXES}
    alone = sweep.run(cfg.replace(runs=None, hyperparameters=extra, **fields), progress=False)
    assert len(alone.table) == 1
    row, other = result.table.loc[i], alone.table.loc[0]
    for column in (
      'optimizer',
      'schedule',
      'learning_rate',
      'batch_size',
      'seed',
      'updates',
      'status',
    ):
      assert row[column] == other[column], (i, column)
    assert row.final_train_loss == pytest.approx(other.final_train_loss, rel=1e-5)
    assert excess(result.params(i), alone.params(0)) <= 0, (
      f'run {i} differs from the same run alone'
    )


def test_unequal_runs_per_seed_leave_padding_slots(listed):
  cfg, _ = listed
  plan = validate(cfg)
  planned = units.plan_units(plan, engine.model_of(cfg, plan.output_dim), 64)
  adam = [u for u in planned if u.family == 'adam']
  assert len(adam) == 1
  by_batch = {g.batch_size: g for g in adam[0].groups}
  # Batch 16: seed 0 has runs 0 and 5, seed 1 has run 2 alone: its second slot is padding.
  assert by_batch[16].seeds == [0, 1]
  assert by_batch[16].slots[:2, :2].tolist() == [[0, 5], [2, -1]]
  assert sorted(int(i) for i in by_batch[48].slots.ravel() if i >= 0) == [1]
  # Each optimizer is a compile group with only the batch sizes its runs use.
  assert {
    u.family if isinstance(u.family, str) else u.family.label: u.structure.batch_sizes
    for u in planned
  } == {
    'adam': (16, 48),
    'clipped_adamw': (16,),
    'sgd': (48,),
  }


# ---------------------------------------------------------------------- sampled spaces ----


def sampled_config(**changes) -> sweep.SweepConfig:
  cfg = sweep.SweepConfig(
    **BASE,
    optimizer=clipped_adamw,
    learning_rate=sweep.space.loguniform(1e-3, 1e-1),
    batch_size=sweep.space.choice([16, 32, 48]),
    weight_decay=sweep.space.loguniform(1e-4, 1e-1),
    hyperparameters={'clip_norm': sweep.space.uniform(0.1, 2.0)},
    schedule=warmup_cosine,
    samples=12,
    sample_seed=3,
    seed=[0, 1],
  )
  return cfg.replace(**changes)


def _values(cfg, fields=('learning_rate', 'batch_size', 'weight_decay', 'clip_norm', 'seed')):
  return [tuple(r.values[f] for f in fields) for r in validate(cfg).runs]


def test_the_same_sample_seed_gives_the_same_runs():
  cfg = sampled_config()
  assert _values(cfg) == _values(sampled_config())
  assert _values(cfg.replace(sample_seed=4)) != _values(cfg)
  runs = validate(cfg).runs
  assert len(runs) == 24
  # Each sampled configuration is trained with every seed of the list, seeds varying fastest.
  assert [r.values['seed'] for r in runs] == [0, 1] * 12
  for a, b in zip(runs[::2], runs[1::2], strict=True):
    assert {k: v for k, v in a.values.items() if k != 'seed'} == {
      k: v for k, v in b.values.items() if k != 'seed'
    }


def test_more_samples_extend_the_same_draws_and_fields_draw_independently():
  small = _values(sampled_config(samples=5, seed=0))
  large = _values(sampled_config(samples=12, seed=0))
  assert large[:5] == small
  other = _values(
    sampled_config(seed=0, batch_size=sweep.space.choice([16, 24])), ('learning_rate', 'clip_norm')
  )
  assert other == [v[::3] for v in large]


def test_draws_follow_their_spaces():
  cfg = sampled_config(samples=2000, seed=0, batch_size=sweep.space.randint(8, 64, log=True))
  runs = validate(cfg).runs
  lr = np.array([r.values['learning_rate'] for r in runs])
  b = np.array([r.values['batch_size'] for r in runs])
  clip = np.array([r.values['clip_norm'] for r in runs])
  assert ((1e-3 <= lr) & (lr < 1e-1)).all() and ((0.1 <= clip) & (clip < 2.0)).all()
  # Log-uniform: as many draws below the geometric midpoint (1e-2) as above it.
  assert abs(np.mean(lr < 1e-2) - 0.5) < 0.05
  assert abs(np.mean(clip < 1.05) - 0.5) < 0.05
  assert (
    b.dtype.kind == 'i'
    and b.min() >= 8
    and b.max() <= 64
    and abs(np.mean(b < math.sqrt(8 * 65)) - 0.5) < 0.06
  )
  choices = validate(sampled_config(samples=300)).runs
  assert {r.values['batch_size'] for r in choices} == {16, 32, 48}


def _space_config(sample_seed: int) -> sweep.SweepConfig:
  return sweep.SweepConfig(
    **BASE,
    optimizer=sweep.space.choice(['sgd', 'adam']),
    learning_rate=sweep.space.loguniform(1e-3, 1e-1),
    batch_size=sweep.space.choice([16, 32, 48]),
    samples=8,
    sample_seed=sample_seed,
    seed=[0, 1],
    num_evals=2,
  )


def test_a_new_sample_seed_compiles_nothing_and_every_run_equals_its_loop(monkeypatch):
  from compiles import counting_compiles

  # Groups laid out for the median draw: most draws overflow one into further chunks of
  # the same program, and leave some (optimizer, batch size) groups empty.
  monkeypatch.setattr(units, 'SPACE_QUANTILE', 0.5)
  with counting_compiles() as names:
    sweep.run(_space_config(0), progress=False)
    first = len(names)
    # Another draw: other values, other numbers of runs in each (optimizer, batch size).
    result = sweep.run(_space_config(1), progress=False)
  assert first > 0 and names[first:] == [], f'compiled again: {names[first:]}'
  table = result.table
  groups = {(r.optimizer, r.batch_size) for r in table.itertuples()}
  assert len(table) == 16 and len(groups) >= 3
  makers = {'sgd': optax.sgd, 'adam': optax.adam}
  constant = lambda lr, total: lr  # noqa: E731
  for i in range(len(table)):
    row = table.loc[i]
    total = validate(_space_config(1)).total_updates[int(row.batch_size)]
    want, done = reference(
      makers[row.optimizer], {}, constant, row.learning_rate, row.batch_size, row.seed, total
    )
    assert done == row.updates == total
    assert excess(result.params(i), want) <= 0, f'run {i}: {dict(row)}'


def test_a_space_lays_out_its_groups_whatever_the_draw():
  """The layout (the compiled structures and widths) is the space's; a draw with more runs in
  a group than it was laid out for trains them in one more chunk of the same program."""
  layouts, chunks = set(), set()
  for sample_seed in range(6):
    cfg = _space_config(sample_seed)
    plan = validate(cfg)
    laid = units.plan_units(plan, engine.model_of(cfg, plan.output_dim), 64, warn=False)
    layouts.add(frozenset((u.structure, tuple(g.slots.shape for g in u.groups)) for u in laid))
    chunks.add(len(laid))
    placed = sorted(int(i) for u in laid for g in u.groups for i in g.slots.ravel() if i >= 0)
    assert placed == list(range(len(plan.runs)))  # every run once
  assert len(layouts) == 1, layouts
  # Sampled seeds: each group keeps the rows of the seeds its runs use (no space layout).
  cfg = _space_config(0).replace(seed=sweep.space.randint(0, 1000))
  plan = validate(cfg)
  laid = units.plan_units(plan, engine.model_of(cfg, plan.output_dim), 64, warn=False)
  assert sum(g.slots.size for u in laid for g in u.groups) < 4 * len(plan.runs)


def _sigterm_at(monkeypatch, segment: int) -> None:
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are only installed in the main thread')
  calls = []
  original = train.segment_jit

  def segment_jit(*args, **kwargs):
    calls.append(1)
    if len(calls) == segment:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(train, 'segment_jit', segment_jit)


def assert_frames_equal(a: pd.DataFrame, b: pd.DataFrame, ignore=()) -> None:
  assert list(a.columns) == list(b.columns) and list(a.index) == list(b.index)
  for column in b.columns:
    if column in ignore:
      continue
    if pd.api.types.is_numeric_dtype(b[column]) and not pd.api.types.is_bool_dtype(b[column]):
      assert np.array_equal(
        a[column].to_numpy(np.float64), b[column].to_numpy(np.float64), equal_nan=True
      ), column
    else:
      assert a[column].tolist() == b[column].tolist(), column


# One run per unit (memory_budget=1): a resume crosses units of several batch sizes.
RESUME = dict(memory_budget=1, epochs=4, num_evals=4, samples=6)


@pytest.fixture(scope='module')
def sampled(tmp_path_factory):
  # With a workdir: under memory_budget=1 the finished runs are kept on disk only.
  return sweep.run(
    sampled_config(**RESUME), workdir=str(tmp_path_factory.mktemp('sampled')), progress=False
  )


def test_a_sampled_sweep_resumes_exactly(sampled, tmp_path, monkeypatch):
  workdir = tmp_path / 'out'
  _sigterm_at(monkeypatch, 7)  # the third segment of the second unit
  with pytest.raises(SystemExit) as info:
    sweep.run(sampled_config(**RESUME), workdir=str(workdir), progress=False, checkpoint_every=100)
  assert info.value.code == 143
  monkeypatch.undo()
  resumed = sweep.run(sampled_config(**RESUME), workdir=str(workdir), progress=False)
  assert_frames_equal(resumed.table, sampled.table, ignore=('seconds',))
  assert_frames_equal(resumed.curves, sampled.curves)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['search'] == {
    'mode': 'sampled',
    'samples': 6,
    'sample_seed': 3,
    'spaces': {
      'batch_size': 'choice([16, 32, 48])',
      'learning_rate': 'loguniform(0.001, 0.1)',
      'weight_decay': 'loguniform(0.0001, 0.1)',
      'clip_norm': 'uniform(0.1, 2.0)',
    },
  }
  # Another sample seed is another sweep: the workdir refuses it.
  with pytest.raises(sweep.ConfigError):
    sweep.run(sampled_config(**RESUME, sample_seed=5), workdir=str(workdir), progress=False)


def test_sampled_runs_equal_their_optax_loops(sampled):
  table = sampled.table
  assert len(table) == 12 and (table.status == 'ok').all()
  for i in table.index[:6]:
    row = table.loc[i]
    hp = {'weight_decay': row.weight_decay, 'clip_norm': row.clip_norm}
    want, done = reference(
      clipped_adamw,
      hp,
      warmup_cosine,
      row.learning_rate,
      int(row.batch_size),
      int(row.seed),
      4 * (N_TRAIN // int(row.batch_size)),
    )
    assert row.updates == done and excess(sampled.params(int(i)), want) <= 0


def test_analyses_and_report_of_a_sampled_sweep(sampled, tmp_path):
  best = analysis.batch_size_table(sampled, 'final_train_loss')
  sizes = sorted(set(sampled.table.batch_size))
  assert best.index.tolist() == sizes
  # A configuration is a sampled point; its two seeds are averaged.
  assert (best.seeds == 2).all()
  slope = analysis.lr_batch_slope(sampled, 'final_train_loss')
  assert slope['n'] == len(sizes)
  assert len(analysis.overfitting(sampled)) == 12
  sampled.save(str(tmp_path))
  page = Path(
    report.write_report(str(tmp_path))
  ).read_text()  # from the files, as `sweep report` does
  assert 'cut into bins' in page
  assert 'loguniform(0.001, 0.1)' in page
  loaded = analysis.batch_size_table(sweep.load(str(tmp_path)), 'final_train_loss')
  assert loaded.learning_rate.tolist() == best.learning_rate.tolist()


def test_factory_hyperparameters_tell_configurations_apart():
  """Two clip norms at one learning rate are two configurations, not two seeds of one."""
  table = pd.DataFrame(
    {
      'run': [0, 1, 2, 3],
      'optimizer': ['f'] * 4,
      'schedule': ['constant'] * 4,
      'batch_size': [32] * 4,
      'learning_rate': [0.1] * 4,
      'clip_norm': [0.5, 0.5, 2.0, 2.0],
      'seed': [0, 1, 0, 1],
      'status': ['ok'] * 4,
      'final_val_loss': [1.0, 1.2, 0.5, 0.7],
    }
  )
  config = {'axes': {'optimizer': ['f'], 'clip_norm': [0.5, 2.0], 'seed': [0, 1]}}
  best = analysis.batch_size_table(SimpleNamespace(table=table, curves=None, config=config))
  assert best.loc[32, 'final_val_loss'] == pytest.approx(0.6)
  assert best.loc[32, 'clip_norm'] == 2.0 and best.loc[32, 'runs'] == (2, 3)


# ----------------------------------------------------------------------------- the CLI ----

EXPERIMENT = '''
"""16 log-uniform learning rates with batch sizes 32, 64 or 128: clipped AdamW, warmup-cosine."""
import optax
import sweep


def get_config():
  return sweep.SweepConfig(
      model=sweep.models.mlp(hidden=(16,)),
      data=sweep.data.digits(),
      optimizer=lambda learning_rate: optax.chain(
          optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=1e-4)),
      schedule=lambda lr, total: optax.warmup_cosine_decay_schedule(0.0, lr, total // 10, total),
      learning_rate=sweep.space.loguniform(1e-4, 1e-1),
      batch_size=sweep.space.choice([32, 64, 128]),
      samples=16,
      name='random-search',
  )
'''


def test_a_sampled_experiment_through_the_cli(tmp_path):
  experiment = tmp_path / 'random_search.py'
  experiment.write_text(textwrap.dedent(EXPERIMENT))
  env = dict(os.environ, SWEEP_NO_CACHE='1')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
  workdir = tmp_path / 'out'
  run = subprocess.run(
    [sys.executable, '-m', 'sweep', 'run', str(experiment), '--workdir', str(workdir)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr
  table = pd.read_csv(workdir / 'results.csv')
  assert len(table) == 16 and table.learning_rate.nunique() == 16
  assert set(table.batch_size) <= {32, 64, 128}
  label = 'chain(clip_by_global_norm(1.0), adamw(learning_rate, weight_decay=1e-4))'
  assert set(table.optimizer) == {label}
  assert f'Every run: optimizer {label}; schedule warmup_cosine_decay_schedule(' in run.stdout
  # `sweep run` writes the report too.
  assert 'cut into bins' in (workdir / 'report' / 'report.html').read_text()
  again = sweep.load(str(workdir))
  assert again.config['search']['spaces']['learning_rate'] == 'loguniform(0.0001, 0.1)'


# ------------------------------------------------------------------------ bad input ----


@pytest.fixture(autouse=False)
def no_training(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('sweep.run went on to train: no ConfigError was raised')

  monkeypatch.setattr(units, 'plan_units', refuse)


def _needs_clip(learning_rate, clip_norm):
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))


def _branches(learning_rate, clip_norm):
  return optax.adam(learning_rate) if clip_norm > 1 else optax.sgd(learning_rate)


def _plain(learning_rate):
  return optax.adam(learning_rate)


ERRORS = [
  # id, changes, field(s), value(s) shown, what is accepted
  (
    'factory-argument-unfilled',
    dict(optimizer=_needs_clip),
    'optimizer',
    ('_needs_clip', 'clip_norm'),
    "hyperparameters={'clip_norm'",
  ),
  (
    'hyperparameter-no-factory-takes',
    dict(optimizer=_plain, hyperparameters={'clip_norm': [0.5, 1.0]}),
    "hyperparameters['clip_norm']",
    '[0.5, 1.0]',
    "'_plain' takes no clip_norm",
  ),
  (
    'axis-no-factory-takes',
    dict(optimizer=_plain, weight_decay=0.1),
    'weight_decay',
    '0.1',
    'takes no weight_decay',
  ),
  (
    'hyperparameter-of-a-name',
    dict(optimizer='adam', hyperparameters={'clip_norm': 1.0}),
    "hyperparameters['clip_norm']",
    '1.0',
    "'adam' takes no clip_norm",
  ),
  (
    'factory-returns-no-transformation',
    dict(optimizer=lambda learning_rate: 3),
    'optimizer',
    'returned int',
    'optax.GradientTransformation',
  ),
  (
    'factory-branches-on-a-hyperparameter',
    dict(optimizer=_branches, hyperparameters={'clip_norm': [0.5, 2.0]}),
    'optimizer',
    '_branches',
    'traced',
  ),
  (
    'factory-without-learning-rate',
    dict(optimizer=lambda: optax.adam(1e-3)),
    'optimizer',
    'adam(1e-3)',
    'learning rate as its first',
  ),
  (
    'transformation',
    dict(optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))),
    'optimizer',
    'GradientTransformation',
    'lambda learning_rate',
  ),
  (
    'schedule-fails',
    dict(schedule=lambda lr, total: 1 / 0),
    'schedule',
    ('ZeroDivisionError', 'total_updates'),
    'optax schedule',
  ),
  (
    'schedule-wrong-shape',
    dict(schedule=lambda lr, total: lambda count: jnp.ones(3) * lr),
    'schedule',
    '(3,)',
    'scalar',
  ),
  (
    'schedule-of-the-count-alone',
    dict(schedule=optax.cosine_decay_schedule(0.1, 100)),
    'schedule',
    'schedule',
    'callable(learning_rate, total_updates)',
  ),
  (
    'schedule-compares-lr',
    dict(schedule=lambda lr, total: optax.constant_schedule(lr if lr < 0.01 else 0.01)),
    'schedule',
    'constant_schedule',
    'jnp.where',
  ),
  (
    'schedule-as-learning-rate',
    dict(learning_rate=optax.cosine_decay_schedule(0.1, 100)),
    'learning_rate',
    'schedule',
    'schedule=',
  ),
  (
    'runs-unknown-field',
    dict(runs=[{'learning_rat': 0.1}]),
    'runs[0]',
    "'learning_rat'",
    'learning_rate',
  ),
  (
    'runs-list-value',
    dict(runs=[{'learning_rate': [0.1, 0.2]}]),
    "runs[0]['learning_rate']",
    '[0.1, 0.2]',
    'one value',
  ),
  (
    'runs-with-a-list-field',
    dict(runs=[{'learning_rate': 0.1}], batch_size=[8, 16]),
    'batch_size',
    '[8, 16]',
    'one value',
  ),
  (
    'runs-bad-value',
    dict(runs=[{'learning_rate': 0.1}, {'learning_rate': -1.0}]),
    "runs[1]['learning_rate']",
    '-1.0',
    '> 0',
  ),
  (
    'runs-repeated',
    dict(runs=[{'learning_rate': 0.1}, {'learning_rate': 0.1}]),
    'runs[1]',
    '0.1',
    'repeats runs[0]',
  ),
  ('runs-not-dicts', dict(runs=[0.1, 0.2]), 'runs[0]', '0.1', 'dict'),
  ('runs-empty', dict(runs=[]), 'runs', '[]', 'at least one'),
  ('runs-and-samples', dict(runs=[{'learning_rate': 0.1}], samples=4), 'samples', '4', 'runs='),
  (
    'space-low-above-high',
    dict(learning_rate=sweep.space.loguniform(0.1, 1e-4), samples=4),
    'learning_rate',
    'loguniform(0.1, 0.0001)',
    'low < high',
  ),
  (
    'space-equal-bounds',
    dict(warmup=sweep.space.uniform(0.2, 0.2), samples=4),
    'warmup',
    'uniform(0.2, 0.2)',
    'low < high',
  ),
  (
    'loguniform-from-zero',
    dict(learning_rate=sweep.space.loguniform(0.0, 1e-1), samples=4),
    'learning_rate',
    'loguniform(0.0, 0.1)',
    '0 < low',
  ),
  (
    'space-outside-the-field',
    dict(learning_rate=sweep.space.uniform(0.0, 0.1), samples=4),
    'learning_rate',
    'uniform(0.0, 0.1)',
    '> 0',
  ),
  (
    'float-space-for-batch-size',
    dict(batch_size=sweep.space.uniform(8, 32), samples=4),
    'batch_size',
    'uniform(8, 32)',
    'randint',
  ),
  (
    'batch-choice-too-large',
    dict(batch_size=sweep.space.choice([8, 1000]), samples=4),
    'batch_size',
    'choice([8, 1000])',
    'training set',
  ),
  ('samples-without-a-space', dict(samples=8), 'samples', '8', 'sweep.space.loguniform'),
  (
    'space-without-samples',
    dict(learning_rate=sweep.space.loguniform(1e-4, 1e-1)),
    'learning_rate',
    'loguniform(0.0001, 0.1)',
    'samples=N',
  ),
  (
    'samples-zero',
    dict(learning_rate=sweep.space.loguniform(1e-4, 1e-1), samples=0),
    'samples',
    '0',
    'positive integer',
  ),
  ('sample-seed-negative', dict(sample_seed=-1), 'sample_seed', '-1', '>= 0'),
  (
    'space-inside-a-list',
    dict(learning_rate=[sweep.space.loguniform(1e-4, 1e-1)], samples=2),
    'learning_rate',
    'loguniform',
    'whole field',
  ),
  (
    'hyperparameter-named-like-a-field',
    dict(optimizer=_needs_clip, hyperparameters={'weight_decay': 0.1}),
    'hyperparameters',
    "'weight_decay'",
    'weight_decay=...',
  ),
  (
    'hyperparameter-named-like-a-column',
    dict(hyperparameters={'updates': 1.0}),
    'hyperparameters',
    "'updates'",
    'column',
  ),
  (
    'hyperparameter-bool',
    dict(optimizer=_needs_clip, hyperparameters={'clip_norm': True}),
    'clip_norm',
    'True',
    'finite number',
  ),
]


@pytest.mark.parametrize(
  'changes, fields, values, accepted', [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS]
)
def test_mistakes_are_reported_before_compiling(no_training, changes, fields, values, accepted):
  base = sweep.SweepConfig(model=MODEL, data=DATA, loss='mse', batch_size=16, epochs=1)
  err = expect_config_error(sweep.run, base.replace(**changes), progress=False)
  assert_message(err, fields, values, accepted)
  assert 'is invalid' in str(err)
