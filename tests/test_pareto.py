"""Pareto ranks checked against a brute-force non-dominated filter written out in plain Python.

Tables are drawn with small integer values (so many rows tie, fully or in some objectives),
NaNs, invalid rows, one to three objectives and mixed senses. The rank-r front must equal the
brute-force front of the rows left once fronts 0..r-1 are removed.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweep import pareto
from sweep.errors import ConfigError

SETTINGS = settings(max_examples=150, deadline=None)


def dominates(a, b, senses) -> bool:
  """Whether row a is at least as good as row b everywhere and strictly better somewhere."""
  better = False
  for x, y, s in zip(a, b, senses, strict=True):
    if s == 'max':
      x, y = -x, -y
    if x > y:
      return False
    if x < y:
      better = True
  return better


def brute_front(rows, candidates, senses) -> set[int]:
  """The candidates that no other candidate dominates: O(n^2) loops."""
  return {i for i in candidates if not any(dominates(rows[j], rows[i], senses) for j in candidates)}


def brute_ranks(rows, valid, senses) -> list[int]:
  """Fronts peeled one at a time with the brute-force filter; -1 for excluded rows."""
  ranks = [-1] * len(rows)
  left = {i for i in range(len(rows)) if valid[i] and not any(math.isnan(v) for v in rows[i])}
  r = 0
  while left:
    front = brute_front(rows, left, senses)
    for i in front:
      ranks[i] = r
    left -= front
    r += 1
  return ranks


@st.composite
def problems(draw, max_rows=30, max_objectives=3):
  """Rows of small integers (many ties), some NaNs and infinities, a validity mask, senses."""
  n = draw(st.integers(0, max_rows))
  k = draw(st.integers(1, max_objectives))
  high = draw(st.sampled_from([1, 2, 4, 10, 1000]))
  cell = (
    st.one_of(
      st.integers(-high, high).map(float),
      st.sampled_from([math.nan, math.inf, -math.inf, -0.0]),
    )
    if draw(st.booleans())
    else st.integers(-high, high).map(float)
  )
  rows = [tuple(draw(cell) for _ in range(k)) for _ in range(n)]
  valid = (
    draw(st.lists(st.booleans(), min_size=n, max_size=n)) if draw(st.booleans()) else [True] * n
  )
  senses = draw(st.lists(st.sampled_from(['min', 'max']), min_size=k, max_size=k))
  return rows, valid, senses


def as_array(rows, k) -> np.ndarray:
  return np.array(rows, dtype=np.float64).reshape(len(rows), k)


@SETTINGS
@given(problems(), st.sampled_from([1, 2, 3, 7, 256]))
def test_fronts_match_brute_force(problem, block):
  rows, valid, senses = problem
  with mock.patch.object(pareto, '_BLOCK', block):
    ranks = pareto.pareto_ranks(as_array(rows, len(senses)), senses, np.array(valid, dtype=bool))
  assert ranks.dtype == np.int64
  assert ranks.tolist() == brute_ranks(rows, valid, senses)


@SETTINGS
@given(problems(max_objectives=4), st.sampled_from([1, 3, 256]))
def test_blocked_and_sweep_agree_with_brute_force_for_every_k(problem, block):
  """The general blocked ranking, called directly, on any number of objectives (k >= 2)."""
  rows, valid, senses = problem
  k = len(senses)
  if k < 2:
    senses = senses + ['min']
    rows = [r + (0.0,) for r in rows]
    k = 2
  keep = [i for i, r in enumerate(rows) if valid[i] and not any(math.isnan(v) for v in r)]
  points = sorted(
    {tuple(-v if s == 'max' else v for v, s in zip(rows[i], senses, strict=True)) for i in keep}
  )
  expected = brute_ranks(points, [True] * len(points), ['min'] * k)
  array = np.array(points, dtype=np.float64).reshape(len(points), k)
  assert pareto._ranks_blocked(array, block).tolist() == expected
  if k == 2:
    assert pareto._ranks_2d(array).tolist() == expected


@SETTINGS
@given(problems())
def test_annotate_matches_pareto_ranks(problem):
  rows, valid, senses = problem
  k = len(senses)
  columns = [f'm{j}' for j in range(k)]
  table = pd.DataFrame(
    as_array(rows, k), columns=columns, index=[10 * i + 3 for i in range(len(rows))]
  )
  table['status'] = ['ok' if v else 'diverged' for v in valid]
  table['name'] = [f'run{i}' for i in range(len(rows))]
  out = pareto.annotate(table, dict(zip(columns, senses, strict=True)))
  expected = brute_ranks(rows, valid, senses)
  assert out['pareto_rank'].tolist() == expected
  assert out['pareto'].tolist() == [r == 0 for r in expected]
  assert out['pareto_rank'].dtype == np.int64
  assert out['pareto'].dtype == bool
  assert list(out.index) == list(table.index)
  assert 'pareto_rank' not in table.columns  # the input is left alone
  pd.testing.assert_frame_equal(out.drop(columns=['pareto_rank', 'pareto']), table)


@SETTINGS
@given(problems())
def test_max_is_min_of_the_negated_column(problem):
  rows, valid, senses = problem
  k = len(senses)
  values = as_array(rows, k)
  flip = np.array([-1.0 if s == 'max' else 1.0 for s in senses])
  mask = np.array(valid, dtype=bool)
  assert (
    pareto.pareto_ranks(values, senses, mask).tolist()
    == pareto.pareto_ranks(values * flip, ['min'] * k, mask).tolist()
  )
  flipped = ['min' if s == 'max' else 'max' for s in senses]
  assert (
    pareto.pareto_ranks(values, senses, mask).tolist()
    == pareto.pareto_ranks(-values, flipped, mask).tolist()
  )


@SETTINGS
@given(problems(max_objectives=1), st.sampled_from(['min', 'max']))
def test_single_objective_front_is_every_row_tied_at_the_best(problem, sense):
  rows, valid, _ = problem
  table = pd.DataFrame(
    {'loss': [r[0] for r in rows], 'status': ['ok' if v else 'diverged' for v in valid]}
  )
  out = pareto.annotate(table, {'loss': sense})
  usable = table[(table.status == 'ok') & table.loss.notna()]
  if usable.empty:
    assert not out.pareto.any()
    assert (out.pareto_rank == -1).all()
    return
  best = usable.loss.min() if sense == 'min' else usable.loss.max()
  assert out.index[out.pareto].tolist() == usable.index[usable.loss == best].tolist()
  # Further fronts are the distinct values in order.
  distinct = sorted(set(usable.loss), reverse=sense == 'max')
  assert out.loc[usable.index, 'pareto_rank'].tolist() == [distinct.index(v) for v in usable.loss]


def test_rank_characterisation_on_a_larger_table():
  """On thousands of rows, checked with vectorised comparisons: a dominator always has a
  lower rank, and every row of rank r > 0 is dominated by some row of rank r - 1."""
  rng = np.random.default_rng(0)
  n = 1500
  for k, senses in [(2, ['min', 'max']), (3, ['min', 'max', 'min'])]:
    values = np.round(rng.normal(size=(n, k)), 1)
    values[rng.random(n) < 0.02, rng.integers(0, k)] = np.nan
    valid = rng.random(n) > 0.1
    ranks = pareto.pareto_ranks(values, senses, valid)
    keep = valid & ~np.isnan(values).any(axis=1)
    assert (ranks[~keep] == -1).all()
    assert (ranks[keep] >= 0).all()
    x = values[keep] * np.array([-1.0 if s == 'max' else 1.0 for s in senses])
    r = ranks[keep]
    le = np.all(x[:, None, :] <= x[None, :, :], axis=2)
    lt = np.any(x[:, None, :] < x[None, :, :], axis=2)
    dom = le & lt  # dom[a, b]: a dominates b
    assert not (dom & (r[:, None] >= r[None, :])).any()
    has_parent = (dom & (r[:, None] == r[None, :] - 1)).any(axis=0)
    assert has_parent[r > 0].all()
    assert r.max() > 3  # several fronts were exercised


def test_identical_rows_share_a_rank_and_all_invalid_gives_minus_one():
  values = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 3.0], [2.0, 2.0]])
  assert pareto.pareto_ranks(values, ['min', 'min']).tolist() == [0, 0, 0, 1]
  assert pareto.pareto_ranks(values, ['min', 'min'], np.zeros(4, dtype=bool)).tolist() == [-1] * 4
  assert pareto.pareto_ranks(np.zeros((0, 2)), ['min', 'max']).tolist() == []


def test_valid_column_none_uses_every_row_and_valid_value_is_configurable():
  table = pd.DataFrame({'a': [1.0, 2.0, 0.5], 'keep': [1, 1, 0]})
  assert pareto.annotate(table, {'a': 'min'}, valid_column=None).pareto_rank.tolist() == [1, 2, 0]
  assert pareto.annotate(
    table, {'a': 'min'}, valid_column='keep', valid_value=1
  ).pareto_rank.tolist() == [0, 1, -1]


def test_nullable_and_bool_columns_are_numeric():
  table = pd.DataFrame(
    {
      'loss': pd.array([0.5, None, 0.1], dtype='Float64'),
      'converged': [True, True, False],
      'status': ['ok', 'ok', 'ok'],
    }
  )
  out = pareto.annotate(table, {'loss': 'min', 'converged': 'max'})
  assert out.pareto_rank.tolist() == [0, -1, 0]


def test_missing_column_is_a_config_error_naming_it_and_the_numeric_columns():
  table = pd.DataFrame({'lr': [0.1, 0.2], 'final_val_loss': [1.0, 2.0], 'status': ['ok', 'ok']})
  with pytest.raises(ConfigError) as info:
    pareto.annotate(table, {'final_val_loss': 'min', 'val_acc': 'max'})
  message = str(info.value)
  assert "'val_acc'" in message
  assert 'missing' in message
  assert "['lr', 'final_val_loss']" in message


def test_non_numeric_column_is_a_config_error_naming_it_and_the_numeric_columns():
  table = pd.DataFrame({'lr': [0.1, 0.2], 'optimizer': ['adam', 'sgd'], 'status': ['ok', 'ok']})
  with pytest.raises(ConfigError) as info:
    pareto.annotate(table, {'lr': 'min', 'optimizer': 'min'})
  message = str(info.value)
  assert "'optimizer'" in message
  assert 'not numeric' in message
  assert "['lr']" in message
  with pytest.raises(ConfigError, match='status'):
    pareto.annotate(table, {'status': 'max'})


def test_other_config_errors():
  table = pd.DataFrame({'a': [1.0], 'status': ['ok']})
  with pytest.raises(ConfigError, match='objectives'):
    pareto.annotate(table, {})
  with pytest.raises(ConfigError, match="'min' or 'max'"):
    pareto.annotate(table, {'a': 'minimize'})
  with pytest.raises(ConfigError, match='valid_column'):
    pareto.annotate(table.drop(columns='status'), {'a': 'min'})
  with pytest.raises(ConfigError, match='senses'):
    pareto.pareto_ranks(np.zeros((3, 2)), ['min'])
  with pytest.raises(ConfigError, match='values.shape'):
    pareto.pareto_ranks(np.zeros(3), ['min'])
  with pytest.raises(ConfigError, match='valid.shape'):
    pareto.pareto_ranks(np.zeros((3, 1)), ['min'], np.ones(2, dtype=bool))
