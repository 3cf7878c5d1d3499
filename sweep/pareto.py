"""Pareto fronts over a results table: which runs are not beaten on every objective at once.

    from sweep import pareto
    table = pareto.annotate(result.table, {'final_val_loss': 'min', 'seconds': 'min'})
    table[table.pareto]

Row a dominates row b when a is at least as good as b in every objective and strictly better
in at least one. Rank 0 is the non-dominated front; rank r is the front of what is left once
fronts 0..r-1 are removed. Identical rows never dominate each other, so ties share a rank.
Rows that are excluded (a diverged run, or NaN in any objective) get rank -1 and dominate
nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sweep.errors import config_error

SENSES = ('min', 'max')

# Rows handled together when ranking three or more objectives; bounds the temporary
# (block x rows) arrays to a few tens of megabytes for tables of ten thousand rows.
_BLOCK = 256


def pareto_ranks(
  values: np.ndarray, senses: Sequence[str], valid: np.ndarray | None = None
) -> np.ndarray:
  """Non-dominated sorting: the Pareto front index of every row.

  Args:
    values: (n, k) objective values, one row per candidate and one column per objective.
    senses: k entries, each 'min' or 'max': which way each objective is better.
    valid: optional (n,) bool; rows where it is False (e.g. diverged runs) are excluded.
      Rows with NaN in any objective are excluded too.

  Returns:
    (n,) int64 ranks: 0 for the non-dominated front of the included rows, 1 for the front
    of the rest once front 0 is removed, and so on; -1 for excluded rows, which never
    dominate anything. Identical rows share a rank.

  Raises:
    ConfigError: `values` is not two-dimensional, `senses` does not have one 'min' or 'max'
      per column, or `valid` is not one bool per row.
  """
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 2:
    raise config_error('values.shape', values.shape, 'a two-dimensional (rows, objectives) array')
  n, k = values.shape
  senses = list(senses)
  if len(senses) != k:
    raise config_error('senses', senses, f'one sense per objective column ({k})')
  for i, s in enumerate(senses):
    if s not in SENSES:
      raise config_error(f'senses[{i}]', s, "'min' or 'max'")
  if valid is None:
    keep = np.ones(n, dtype=bool)
  else:
    keep = np.asarray(valid)
    if keep.shape != (n,):
      raise config_error('valid.shape', keep.shape, f'one bool per row: ({n},)')
    keep = keep.astype(bool)
  keep = keep & ~np.isnan(values).any(axis=1)

  ranks = np.full(n, -1, dtype=np.int64)
  rows = np.flatnonzero(keep)
  if rows.size == 0:
    return ranks
  if k == 0:
    ranks[rows] = 0
    return ranks

  # Everything as minimisation.
  flip = np.array([-1.0 if s == 'max' else 1.0 for s in senses])
  points = values[rows] * flip

  # Sort lexicographically (first objective first) and merge identical rows: they share a
  # rank, and among distinct rows "at least as good everywhere" already means dominating.
  order = np.lexsort(points.T[::-1])
  ordered = points[order]
  first = np.ones(len(ordered), dtype=bool)
  first[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
  group = np.cumsum(first) - 1
  unique = ordered[first]

  if k == 1:
    unique_ranks = np.arange(len(unique), dtype=np.int64)
  elif k == 2:
    unique_ranks = _ranks_2d(unique)
  else:
    unique_ranks = _ranks_blocked(unique, _BLOCK)

  ranks[rows[order]] = unique_ranks[group]
  return ranks


def _ranks_2d(points: np.ndarray) -> np.ndarray:
  """Front indices of distinct 2-objective points sorted lexicographically (minimisation).

  A point can only be dominated by points before it in that order, and of those exactly the
  ones whose second value is no larger. Fronts are filled in order; the smallest second value
  seen so far in each front is non-decreasing across fronts, so a binary search over those
  minima gives the first front with no dominating point: O(n log n) in all.
  """
  minima: list[float] = []
  ranks = np.empty(len(points), dtype=np.int64)
  for i, y in enumerate(points[:, 1].tolist()):
    f = bisect.bisect_right(minima, y)
    if f == len(minima):
      minima.append(y)
    else:
      minima[f] = y
    ranks[i] = f
  return ranks


def _ranks_blocked(points: np.ndarray, block: int) -> np.ndarray:
  """Front indices of distinct points sorted lexicographically (minimisation), any k >= 2.

  A point's front index is the length of the longest chain of dominations ending at it, and
  only earlier points (in that order) can dominate it: exactly those no larger in every
  objective after the first. Points are taken a block at a time; the dominators in earlier
  blocks are found with one vectorised comparison, those inside the block row by row.
  """
  m = len(points)
  tail = points[:, 1:]
  columns = [np.ascontiguousarray(tail[:, j]) for j in range(tail.shape[1])]
  ranks = np.zeros(m, dtype=np.int64)
  for start in range(0, m, block):
    stop = min(start + block, m)
    here = tail[start:stop]
    floor = np.zeros(stop - start, dtype=np.int64)
    if start:
      # Earlier points by decreasing rank: the first dominator found has the highest rank.
      by_rank = np.argsort(-ranks[:start], kind='stable')
      dominated_by = columns[0][by_rank][None, :] <= here[:, :1]
      for j in range(1, len(columns)):
        dominated_by &= columns[j][by_rank][None, :] <= here[:, j : j + 1]
      hit = dominated_by.any(axis=1)
      floor[hit] = ranks[by_rank[dominated_by[hit].argmax(axis=1)]] + 1
    inside = np.all(here[None, :, :] <= here[:, None, :], axis=2)
    for i in range(stop - start):
      earlier = inside[i, :i]
      if earlier.any():
        ranks[start + i] = max(floor[i], ranks[start : start + i][earlier].max() + 1)
      else:
        ranks[start + i] = floor[i]
  return ranks


def _is_numeric(series: pd.Series) -> bool:
  return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_complex_dtype(series)


def annotate(
  table: pd.DataFrame,
  objectives: Mapping[str, str],
  *,
  valid_column: str | None = 'status',
  valid_value='ok',
) -> pd.DataFrame:
  """Marks the Pareto front of a results table.

  Args:
    table: one row per run, e.g. `Result.table`.
    objectives: numeric column name -> 'min' or 'max'. A single objective gives the best
      row(s), ties included, as the front.
    valid_column: the column that says whether a row takes part; None to use every row.
    valid_value: the value of `valid_column` for rows that take part (other rows, e.g.
      diverged runs, get rank -1). Rows with NaN in any objective get rank -1 as well.

  Returns:
    A copy of `table` with two more columns: `pareto_rank` (int: 0 for the front, 1 for the
    front once that is removed, ...; -1 for excluded rows) and `pareto` (bool, rank == 0).

  Raises:
    ConfigError: no objectives, an objective that is not a numeric column of the table, a
      sense other than 'min' or 'max', or a `valid_column` the table does not have.
  """
  numeric = [c for c in table.columns if _is_numeric(table[c])]
  if not objectives:
    raise config_error(
      'objectives',
      dict(objectives),
      f'at least one numeric column -> "min" or "max"; numeric columns: {numeric}',
    )
  for column, sense in objectives.items():
    if column not in table.columns or not _is_numeric(table[column]):
      what = (
        'missing from the table'
        if column not in table.columns
        else f'not numeric ({table[column].dtype})'
      )
      raise config_error(
        'objective',
        column,
        f'a numeric column of the table; this one is {what}; numeric columns: {numeric}',
      )
    if sense not in SENSES:
      raise config_error(f'objectives[{column!r}]', sense, "'min' or 'max'")
  if valid_column is None:
    valid = np.ones(len(table), dtype=bool)
  elif valid_column not in table.columns:
    raise config_error(
      'valid_column',
      valid_column,
      f'a column of the table, or None to use every row; columns: {list(table.columns)}',
    )
  else:
    valid = (table[valid_column] == valid_value).to_numpy(dtype=bool, na_value=False)

  columns = list(objectives)
  values = np.column_stack([table[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in columns])
  ranks = pareto_ranks(
    values.reshape(len(table), len(columns)), [objectives[c] for c in columns], valid
  )
  out = table.copy()
  out['pareto_rank'] = ranks
  out['pareto'] = ranks == 0
  return out
