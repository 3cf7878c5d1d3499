"""The `seconds` column: the wall time a run of each batch size would take alone, measured.

One sweep (an MLP on the digits set, batch sizes 16 and 256 trained in one unit) is timed;
each batch size's figure is then checked against a sweep of that batch size alone, timed
by its wall clock once its programs are compiled (the same sweep run a second time in the
process compiles nothing). The progress bar's count and its clock are checked on a real
tqdm bar.
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pandas as pd
import pytest
import tqdm

import sweep
from sweep import adapters, analysis, engine, units
from sweep.config import validate

BATCH_SIZES = [16, 256]
LEARNING_RATES = [3e-3, 3e-2]


def config(**changes):
  base = dict(
    name='run_seconds',
    model=sweep.models.mlp(hidden=(32,)),
    data=sweep.data.digits(),
    optimizer='adam',
    learning_rate=LEARNING_RATES,
    batch_size=BATCH_SIZES,
    epochs=4,
    num_evals=4,
  )
  return sweep.SweepConfig(**{**base, **changes})


@pytest.fixture(scope='module')
def timed(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('timed'))
  return sweep.run(config(), workdir, progress=False, time_runs=True), workdir


def test_each_batch_size_is_charged_its_own_measured_seconds(timed):
  result, _ = timed
  table = result.table
  saved = result.config['run_seconds']
  assert saved['device_kind'] == jax.devices()[0].device_kind
  timing = {t['batch_size']: t for t in saved['timings']}
  assert sorted(timing) == BATCH_SIZES
  for _, row in table.iterrows():
    t = timing[row['batch_size']]
    expected = t['update_seconds'] * row['updates'] + t['eval_seconds'] * (4 + 1)
    assert row['seconds'] == pytest.approx(expected, rel=1e-9)
  # One unit trained both batch sizes; their seconds differ now (they were shared out).
  per_batch = table.groupby('batch_size')['seconds'].mean()
  assert per_batch.nunique() == 2
  assert table.groupby('batch_size')['seconds'].nunique().eq(1).all()  # learning rate: no cost


@pytest.mark.parametrize('scheduler', [None, 'halving'])
def test_under_gradient_accumulation_a_run_is_charged_its_batches(scheduler):
  """The timed step reads one batch: a run of optax.MultiSteps(adam, 2) makes half as many
  parameter updates as batches, and is charged for its batches."""
  import optax

  def accumulated(learning_rate):
    return optax.MultiSteps(optax.adam(learning_rate), every_k_schedule=2)

  halving = sweep.schedulers.SuccessiveHalving(eta=2, min_fraction=1 / 2) if scheduler else None
  result = sweep.run(
    config(optimizer=accumulated, batch_size=64, scheduler=halving),
    progress=False,
    time_runs=True,
  )
  (t,) = result.config['run_seconds']['timings']
  for _, row in result.table.iterrows():
    batches = row['examples'] // 64
    assert batches == 2 * row['updates'] or batches == 2 * row['updates'] + 1
    evaluations = 4 + 1 if row['status'] == 'ok' else 2 + 1
    expected = t['update_seconds'] * batches + t['eval_seconds'] * evaluations
    assert row['seconds'] == pytest.approx(expected, rel=1e-9), row['status']


@pytest.mark.parametrize('batch_size', BATCH_SIZES)
def test_the_seconds_agree_with_a_run_of_that_batch_size_trained_alone(timed, batch_size):
  result, _ = timed
  alone = config(learning_rate=[3e-3], batch_size=[batch_size])
  sweep.run(alone, progress=False)  # compiles its programs
  walls = [sweep.run(alone, progress=False).wall_time for _ in range(2)]  # compiles nothing
  measured = result.table.loc[result.table.batch_size == batch_size, 'seconds'].iloc[0]
  # The wall clock also holds the host's work between segments and the initial
  # evaluation's program, so it is the larger; a loaded 2-core machine spreads both.
  assert min(walls) / 6 < measured < min(walls) * 1.5, (measured, walls)


def test_a_finished_rerun_reads_the_timings_back(timed):
  result, workdir = timed
  with open(f'{workdir}/results.csv', 'rb') as f:
    before = f.read()
  again = sweep.run(config(), workdir, progress=False, time_runs=True)
  pd.testing.assert_series_equal(again.table['seconds'], result.table['seconds'])
  with open(f'{workdir}/results.csv', 'rb') as f:
    assert f.read() == before
  with open(f'{workdir}/config.json') as f:
    assert json.load(f)['run_seconds'] == result.config['run_seconds']


def test_the_batch_size_choice_races_on_the_measured_seconds(timed):
  result, _ = timed
  # A target every batch size reaches: each one's best final validation loss, the worst.
  target = 1.001 * analysis.batch_size_table(result)['final_val_loss'].max()
  choice = analysis.choose_batch_size(result, target=target)
  ev = choice.evidence
  assert ev['reached'].all()
  np.testing.assert_allclose(
    ev['seconds_to_target'], ev['seconds'] * ev['updates_to_target'] / ev['updates']
  )
  assert 'in the least time' in choice.reason
  assert choice.batch_size == ev['seconds_to_target'].idxmin() or (
    ev['seconds_to_target'].min() * 1.05 >= ev.loc[choice.batch_size, 'seconds_to_target']
  )


def test_without_timing_the_seconds_are_shared_and_the_race_is_on_updates():
  result = sweep.run(config(epochs=2, num_evals=2), progress=False, time_runs=False)
  assert 'run_seconds' not in result.config
  assert result.table['seconds'].nunique() == 1
  target = 1.001 * analysis.batch_size_table(result)['final_val_loss'].max()
  choice = analysis.choose_batch_size(result, target=target)
  assert 'fewest updates' in choice.reason


# ------------------------------------------------------------------ progress bar ----


@pytest.mark.parametrize('epochs, num_evals', [(4, 4), (3, 5)])  # the second is ragged
def test_the_progress_bar_counts_every_runs_updates(epochs, num_evals):
  cfg = config(epochs=epochs, num_evals=num_evals, seed=[0, 1])
  plan = validate(cfg)
  model = adapters.model_of(cfg, plan.output_dim)
  planned = units.plan_units(plan, model, engine._eval_chunk(plan), warn=False)
  counted = sum(
    engine.updates_in_segment(u, plan, k) for u in planned for k in range(plan.num_evals)
  )
  assert counted == sum(r.total_updates for r in plan.runs)


def test_the_eta_leaves_out_the_compile():
  out = io.StringIO()
  bar = tqdm.tqdm(total=1000, file=out, smoothing=0, mininterval=0)
  progress = engine._Progress(bar)
  start = bar.start_t
  progress.leave_out(2.0)  # a unit's start
  progress.segment('program', 5.0, 100)  # compile + segment
  progress.segment('program', 1.0, 100)  # a segment alone: 4 s of compile taken off
  progress.segment('program', 1.0, 100)
  assert bar.start_t == pytest.approx(start + 2.0 + 4.0)
  progress.segment('another program', 3.0, 100)
  progress.segment('another program', 1.5, 100)
  assert bar.start_t == pytest.approx(start + 2.0 + 4.0 + 1.5)
  bar.close()
