"""`analysis.choose_batch_size`: one answer to "which batch size?", with its evidence.

Tables and curves are built by hand so that the answer is known: each batch size's best
learning rate, its quality, the evaluation point at which it reaches the target and the
seconds a run of it takes alone are chosen, and the expected times are written out as
numbers. One tiny real sweep (digits, 2 batch sizes, 3 learning rates, 2 epochs, the noise
scale measured) checks the evidence against the results table and curves read directly.
"""

import math

import numpy as np
import pandas as pd
import pytest

import sweep
from sweep import analysis
from sweep.errors import ConfigError
from sweep.results import Result

# ------------------------------------------------------------ synthetic results ----

LRS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
BEST_LR = {32: 0.1, 64: 0.2, 128: 0.4, 256: 0.8}  # linear scaling, by construction
QUALITY = {32: 0.200, 64: 0.202, 128: 0.205, 256: 0.300}  # 256 never comes within 5 %
HIT = {32: 6, 64: 7, 128: 8, 256: 9}  # the evaluation at which a curve reaches its final
UPDATES = {b: 6400 // b for b in BEST_LR}  # two epochs of 3,200 examples
ALONE = {32: 2.0, 64: 1.2, 128: 0.8, 256: 0.75}  # seconds a run of each batch size takes
EVALS = 10
START = 2.0


def make_result(
  sizes=(32, 64, 128, 256),
  seconds=ALONE,
  seeds=(0,),
  diverged=(),
  noise=None,
  validation=True,
  accuracy=False,
):
  """A Result whose best learning rate at batch size b is BEST_LR[b] with quality QUALITY[b].

  Every run's curve stays at START until evaluation HIT[b] and sits at its final value from
  there; its final loss is QUALITY[b] + 0.1 log2(lr / BEST_LR[b])^2. With `accuracy`, the
  numbers are 1 - loss in accuracy columns instead. `diverged` holds (batch size, lr) pairs;
  `noise` maps (batch size, seed) to the run's noise_scale.
  """
  rows, curves = [], []
  for b in sizes:
    for lr in LRS:
      for s in seeds:
        i = len(rows)
        loss = QUALITY[b] + 0.1 * math.log2(lr / BEST_LR[b]) ** 2
        ok = (b, lr) not in diverged
        split = 'val' if validation else 'train'
        name = f'{split}_accuracy' if accuracy else f'{split}_loss'
        final = (1 - loss) if accuracy else loss
        row = {
          'run': i,
          'batch_size': b,
          'learning_rate': lr,
          'seed': s,
          'status': 'ok' if ok else 'diverged',
          'updates': UPDATES[b],
          'examples': UPDATES[b] * b,
          f'final_{name}': final if ok else math.nan,
          'seconds': seconds[b],
        }
        if noise is not None:
          row['noise_scale'] = noise[b, s]
        rows.append(row)
        for k in range(EVALS + 1):
          u = k * UPDATES[b] // EVALS
          value = final if k >= HIT[b] else (1 - START if accuracy else START)
          curves.append({'run': i, 'eval': k, 'updates': u, 'examples': u * b, name: value})
  table = pd.DataFrame(rows).set_index('run', drop=False)
  table.index.name = None
  return Result(table, pd.DataFrame(curves), config={}, wall_time=0.0)


def test_the_batch_size_that_reaches_the_target_soonest_is_chosen():
  choice = analysis.choose_batch_size(make_result())
  # Seconds to target = seconds alone x the share of the run before its hit.
  expected = {32: 2.0 * 0.6, 64: 1.2 * 0.7, 128: 0.8 * 0.8}
  assert choice.batch_size == 128
  assert choice.target == pytest.approx(0.200 * 1.05)
  assert (choice.metric, choice.curve, choice.mode) == ('final_val_loss', 'val_loss', 'min')
  ev = choice.evidence
  assert ev.index.tolist() == [32, 64, 128, 256]
  assert ev['learning_rate'].tolist() == [0.1, 0.2, 0.4, 0.8]
  np.testing.assert_allclose(ev['final_val_loss'], [0.200, 0.202, 0.205, 0.300])
  assert ev['reached'].tolist() == [True, True, True, False]
  np.testing.assert_allclose(ev['seconds_to_target'].iloc[:3], list(expected.values()))
  assert math.isnan(ev.loc[256, 'seconds_to_target'])
  assert ev['updates_to_target'].iloc[:3].tolist() == [120, 70, 40]  # HIT/10 of the updates
  # The best learning rates lie exactly on lr = 0.1 (b / 32): the fitted line passes them.
  np.testing.assert_allclose(ev['lr_fit'], [0.1, 0.2, 0.4, 0.8])
  assert 'batch^1.00' in choice.lr_scaling and 'linear scaling rule' in choice.lr_scaling
  assert ev['noise_scale'].isna().all()  # not measured
  assert choice.reason.startswith(
    'Batch size 128 reaches val_loss 0.21 (the best final_val_loss of batch size 32, 0.2, '
    'within 5 %) in the least time'
  )
  assert 'in the least time (0.64 s' in choice.reason
  assert f'{1.2 / 0.64:.2g}x sooner than batch size 32' in choice.reason
  assert choice.reason.endswith('.')
  assert (
    choice.short == '128 recommended, reaching val_loss 0.21 in 0.64 s alone, 1.9x sooner than 32'
  )


def test_a_time_within_five_percent_goes_to_the_smaller_batch_size():
  # 64 alone now takes 0.9 s: 0.63 s to target against 128's 0.64 s, a tie: 64 is taken.
  choice = analysis.choose_batch_size(make_result(seconds={**ALONE, 64: 0.9}))
  assert choice.batch_size == 64
  assert choice.evidence.loc[64, 'seconds_to_target'] == pytest.approx(0.63)
  # 5 % slower than the fastest is still a tie; more is not.
  assert analysis.choose_batch_size(make_result(seconds={**ALONE, 64: 0.96})).batch_size == 64
  assert analysis.choose_batch_size(make_result(seconds={**ALONE, 64: 0.97})).batch_size == 128


def test_the_smallest_batch_size_is_kept_when_larger_ones_are_slower():
  slow = {32: 2.0, 64: 4.0, 128: 8.0, 256: 8.0}  # a machine with no parallelism to spare
  choice = analysis.choose_batch_size(make_result(seconds=slow))
  assert choice.batch_size == 32
  assert 'no larger batch size is more than 5 % sooner' in choice.reason
  assert choice.short.endswith('in 1.2 s alone; no larger one is 5 % sooner')


def test_shared_seconds_race_on_updates_and_say_so():
  # Seconds shared out equally, as a unit trained together charges them: they tell the batch
  # sizes apart by nothing, so the fewest updates to target wins.
  choice = analysis.choose_batch_size(make_result(seconds=dict.fromkeys(ALONE, 1.0)))
  assert choice.batch_size == 128
  assert 'in the fewest updates (40 at learning rate 0.4, 3x fewer than batch size 32)' in (
    choice.reason
  )
  assert 'same seconds' in choice.reason
  assert choice.short == '128 recommended, reaching val_loss 0.21 in 40 updates, 3x fewer than 32'


@pytest.mark.parametrize('accuracy', [False, True], ids=['loss, min', 'accuracy, max'])
def test_a_given_target_and_the_mode(accuracy):
  result = make_result(accuracy=accuracy)
  metric, mode = ('final_val_accuracy', 'max') if accuracy else ('final_val_loss', 'min')
  # Within reach of 32 and 64 only: 64 gets there sooner (0.84 s against 1.2 s).
  target = 1 - 0.203 if accuracy else 0.203
  choice = analysis.choose_batch_size(result, target, metric=metric, mode=mode)
  assert (choice.batch_size, choice.curve, choice.target) == (64, metric[6:], target)
  assert choice.evidence['reached'].tolist() == [True, True, False, False]
  assert f'reaches {metric[6:]} {target:.4g} in the least time' in choice.reason
  # The default target: 32's best made 5 % worse, whichever way worse points.
  default = analysis.choose_batch_size(result, metric=metric, mode=mode)
  assert default.target == pytest.approx(0.8 * 0.95 if accuracy else 0.2 * 1.05)
  assert default.batch_size == 128


def test_a_target_no_batch_size_reaches():
  choice = analysis.choose_batch_size(make_result(), target=0.1)
  assert choice.batch_size == 32  # the best quality
  assert not choice.evidence['reached'].any()
  assert choice.reason.startswith('No batch size reached val_loss 0.1; batch size 32 came closest')
  assert choice.short == '32 recommended, closest to val_loss 0.1, which none reached'


def test_one_batch_size_says_there_is_nothing_to_compare():
  choice = analysis.choose_batch_size(make_result(sizes=(64,)))
  assert choice.batch_size == 64
  assert 'Only batch size 64 was swept' in choice.reason
  assert 'sweep two batch sizes or more' in choice.reason
  assert choice.evidence.index.tolist() == [64]
  assert choice.short == '64 recommended, the only one swept'


def test_every_run_diverged():
  pairs = [(b, lr) for b in BEST_LR for lr in LRS]
  choice = analysis.choose_batch_size(make_result(diverged=pairs))
  assert choice.batch_size is None and choice.target is None
  assert choice.reason.startswith('Every run diverged')
  assert choice.evidence.index.tolist() == [32, 64, 128, 256]
  assert not choice.evidence['reached'].any()
  assert str(choice).startswith('No batch size recommended. Every run diverged')
  assert choice.short == 'none recommended, every run diverged'


def test_only_one_batch_size_reaching_the_target_is_said_plainly():
  choice = analysis.choose_batch_size(make_result(), target=0.201)
  assert choice.batch_size == 32 and choice.evidence['reached'].tolist() == [True] + [False] * 3
  assert choice.reason == (
    'Batch size 32 is the only one to reach val_loss 0.201, at learning rate 0.1 after 120 updates.'
  )
  assert choice.short == '32 recommended, the only one to reach val_loss 0.201'


def test_a_batch_size_whose_every_rate_diverged_stays_in_the_evidence():
  choice = analysis.choose_batch_size(make_result(diverged=[(128, lr) for lr in LRS]))
  assert choice.batch_size == 64  # 128 is out of the race
  ev = choice.evidence
  assert math.isnan(ev.loc[128, 'learning_rate']) and not ev.loc[128, 'reached']


def test_without_a_validation_set_the_training_loss_is_used():
  choice = analysis.choose_batch_size(make_result(validation=False))
  assert (choice.metric, choice.curve) == ('final_train_loss', 'train_loss')
  assert choice.batch_size == 128
  np.testing.assert_allclose(choice.evidence['seconds_to_target'].iloc[:3], [1.2, 0.84, 0.64])


def test_the_noise_scale_of_each_batch_size_is_its_best_runs_mean():
  noise = {(b, s): 300.0 + 100.0 * s + b for b in BEST_LR for s in (0, 1)}
  choice = analysis.choose_batch_size(make_result(seeds=(0, 1), noise=noise))
  np.testing.assert_allclose(choice.evidence['noise_scale'], [b + 350.0 for b in BEST_LR])
  assert choice.batch_size == 128
  assert 'below the gradient noise scale measured at it (about 478)' in choice.reason
  # A batch size past twice the noise scale is said to buy little.
  small = {k: 30.0 for k in noise}
  assert 'past which larger batches buy little time' in (
    analysis.choose_batch_size(make_result(seeds=(0, 1), noise=small)).reason
  )


def test_the_text_shows_the_answer_the_target_and_every_batch_size():
  text = str(analysis.choose_batch_size(make_result()))
  lines = text.splitlines()
  assert lines[0].startswith('Recommended batch size: 128. Batch size 128 reaches')
  assert lines[1] == 'Target: val_loss <= 0.21.'
  assert 'seconds_to_target' in lines[2] and 'noise_scale' in lines[2]
  rows = [line.split() for line in lines[4:8]]
  assert [r[0] for r in rows] == ['32', '64', '128', '256']
  assert rows[3][4] == 'False' and rows[3][6] == '-'  # 256 did not reach the target
  assert lines[-1].startswith('Learning-rate scaling: best lr ~ batch^1.00')


@pytest.mark.parametrize(
  'kwargs, field',
  [
    ({'target': math.nan}, 'target'),
    ({'target': 'low'}, 'target'),
    ({'tolerance': -0.1}, 'tolerance'),
    ({'metric': 'final_val_acc'}, 'metric'),
    ({'mode': 'lowest'}, 'mode'),
  ],
)
def test_bad_arguments_name_the_field(kwargs, field):
  with pytest.raises(ConfigError, match=field):
    analysis.choose_batch_size(make_result(), **kwargs)


# ------------------------------------------------------------------ real sweep ----


@pytest.fixture(scope='module')
def digits_sweep():
  cfg = sweep.SweepConfig(
    model=sweep.models.mlp(hidden=(16,)),
    data=sweep.data.digits(),
    optimizer='sgd',
    learning_rate=[0.03, 0.1, 0.3],
    batch_size=[16, 64],
    epochs=2,
    num_evals=4,
    noise_scale=True,
  )
  return sweep.run(cfg, progress=False)


def test_a_real_sweep(digits_sweep):
  result = digits_sweep
  choice = analysis.choose_batch_size(result)
  table, curves = result.table, result.curves
  ok = table[table.status == 'ok']
  ev = choice.evidence
  assert ev.index.tolist() == [16, 64] and choice.batch_size in (16, 64)
  best = {b: g.loc[g['final_val_loss'].idxmin()] for b, g in ok.groupby('batch_size')}
  target = best[16]['final_val_loss'] * 1.05
  assert choice.target == pytest.approx(target)
  for b, run in best.items():
    assert ev.loc[b, 'learning_rate'] == run['learning_rate']
    c = curves[curves.run == run['run']].sort_values('eval')
    hit = c[c['val_loss'] <= target]
    if hit.empty:
      assert not ev.loc[b, 'reached']
      continue
    at = hit.iloc[0]['updates']
    assert ev.loc[b, 'updates_to_target'] == at
    assert ev.loc[b, 'seconds_to_target'] == pytest.approx(
      run['seconds'] * at / run['updates'], rel=1e-12
    )
    assert ev.loc[b, 'noise_scale'] == pytest.approx(run['noise_scale'])
    assert math.isfinite(run['noise_scale'])
  assert ev.loc[16, 'reached']  # the default target is within its own reach
  updates = ev.loc[ev['reached'], 'updates_to_target']
  assert choice.batch_size == min(updates.index[updates <= 1.05 * updates.min()])
  if len(updates) > 1:
    # One unit trains both batch sizes and shares its seconds out: the race is on updates.
    assert table['seconds'].nunique() == 1 and 'fewest updates' in choice.reason
  else:
    assert f'Batch size {choice.batch_size} is the only one to reach' in choice.reason
