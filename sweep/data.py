"""Datasets for sweeps: in-memory arrays, small built-in sets and MNIST from IDX files.

Every loader returns a `Dataset` of numpy arrays; nothing here downloads anything.
Integer labels mean classification, float targets mean regression.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import random
import struct
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sweep.errors import config_error

__all__ = [
  'aligned',
  'batch_spec',
  'rows',
  'signature',
  'Dataset',
  'arrays',
  'check',
  'diabetes',
  'digits',
  'lstsq_max_stable_lr',
  'mnist',
  'mnist1d',
  'read_idx',
  'synthetic_regression',
]


_ALIGNMENT = 64  # bytes


def aligned(a: np.ndarray) -> np.ndarray:
  """`a` as a C-contiguous array whose data starts on a 64-byte boundary (copied only if
  it is not one already).

  JAX's CPU backend takes such a host array as it is, without copying it, when the
  engine puts the data on its devices; other arrays are copied at every sweep
  (docs/performance.md, change 8).
  """
  a = np.asarray(a)
  if a.flags.c_contiguous and a.ctypes.data % _ALIGNMENT == 0:
    return a
  buffer = np.empty(a.nbytes + _ALIGNMENT, np.uint8)
  start = (-buffer.ctypes.data) % _ALIGNMENT
  out = buffer[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
  out[...] = a
  return out


# ------------------------------------------------------- inputs of several arrays ----
# Inputs are one array, or a tuple or dict of arrays with a shared leading example axis
# (token ids and lengths; user and item ids; an image and its mask).


def is_tree(x: Any) -> bool:
  """Whether inputs are several arrays (a tuple or dict of them) rather than one."""
  return isinstance(x, tuple | Mapping)


def rows(x: Any, index: Any) -> Any:
  """`x[index]` of every array of the inputs `x` (one array, or a tuple or dict of them)."""
  return jax.tree.map(lambda a: a[index], x)


def n_rows(x: Any) -> int:
  """The number of examples of the inputs `x`."""
  return int(jax.tree.leaves(x)[0].shape[0])


def nbytes(x: Any) -> int:
  return sum(int(a.nbytes) for a in jax.tree.leaves(x))


def signature(x: Any) -> Any:
  """What the programs depend on in inputs `x`, hashable: the structure, and each
  array's shape beyond the example axis and dtype."""
  leaves, treedef = jax.tree.flatten(x)
  return treedef, tuple((tuple(a.shape[1:]), str(a.dtype)) for a in leaves)


def batch_spec(x: Any, n: int) -> Any:
  """`jax.ShapeDtypeStruct`s of a batch of `n` examples of inputs like `x`."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + tuple(a.shape[1:]), a.dtype), x)


def spec_of(sig: Any, n: int) -> Any:
  """`batch_spec` of a batch of `n` from a `signature`."""
  treedef, leaves = sig
  return jax.tree.unflatten(
    treedef, [jax.ShapeDtypeStruct((n,) + shape, np.dtype(dtype)) for shape, dtype in leaves]
  )


def describe_inputs(x: Any) -> str:
  """The inputs' shapes in a message: '(64,)' or '(tokens (64, 20) int32, lengths (64,)
  int32)'."""
  if not is_tree(x):
    return str(tuple(x.shape))
  items = x.items() if isinstance(x, Mapping) else enumerate(x)
  return '(' + ', '.join(f'{k!r}: {tuple(a.shape)} {a.dtype}' for k, a in items) + ')'


def _field(field: str, key: Any) -> str:
  return f'{field}[{key!r}]'


def _items(x: Any) -> list[tuple[Any, Any]]:
  return list(x.items()) if isinstance(x, Mapping) else list(enumerate(x))


def _rebuild(x: Any, values: list) -> Any:
  if isinstance(x, Mapping):
    return dict(zip(x.keys(), values, strict=True))
  return tuple(values)


# eq=False: the generated __eq__/__hash__ would compare numpy arrays elementwise and fail,
# so datasets compare and hash by identity.
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """Training and optional validation arrays for a sweep.

  Build one with `arrays` (or a loader), which converts and validates the arrays. The
  constructor converts nothing; a dataset built with it directly gets the same checks
  (`check`) when a sweep starts, before anything compiles.

  Attributes:
    x_train: inputs, shape (n, ...features): float32, or int32 for integer inputs (token
      ids, which stay integer so that an embedding can look them up); or a tuple or dict
      of such arrays with the same n (token ids and lengths, an image and its mask),
      each of its own dtype and shape (n, ...).
    y_train: int32 class ids of shape (n,) (or (n, T) for sequences, such as next-token
      targets) for classification, or float32 targets of shape (n, d) for regression.
    x_val: validation inputs shaped like x_train beyond the first axis, or None.
    y_val: validation labels or targets shaped like y_train beyond the first axis, or None.
    name: a short name used in logs and results.
    num_classes: for integer labels, the number of classes (max label + 1 unless given);
      None for regression.
    ignore_label: an integer label left out of the loss and the accuracy (padding
      tokens), or None.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray | None
  y_val: np.ndarray | None
  name: str = 'arrays'
  num_classes: int | None = None
  ignore_label: int | None = None

  @property
  def n_train(self) -> int:
    """Number of training examples."""
    return n_rows(self.x_train)

  @property
  def n_val(self) -> int:
    """Number of validation examples (0 without a validation set)."""
    return 0 if self.x_val is None else n_rows(self.x_val)

  @property
  def is_classification(self) -> bool:
    """Whether the labels are integer class ids."""
    return bool(np.issubdtype(self.y_train.dtype, np.integer))

  @property
  def output_dim(self) -> int:
    """Width a model's output needs: the number of classes, or the number of target columns."""
    if self.is_classification:
      assert self.num_classes is not None
      return self.num_classes
    return int(self.y_train.shape[1])

  def __repr__(self) -> str:
    # The default repr would print the arrays themselves.
    val = 'None' if self.x_val is None else describe_inputs(self.x_val)
    task = (
      f'num_classes={self.num_classes}'
      if self.is_classification
      else f'targets={self.y_train.shape[1]}'
    )
    x = describe_inputs(self.x_train)
    return f'Dataset(name={self.name!r}, x_train={x}, x_val={val}, {task})'


class _Summary:
  """Shows an array in an error message by shape and dtype instead of by value."""

  def __init__(self, a: np.ndarray):
    self._text = f'array(shape={tuple(a.shape)}, dtype={a.dtype})'

  def __repr__(self) -> str:
    return self._text


def _to_x(field: str, x: Any) -> Any:
  """Converts inputs to a float32 (or, for integer inputs, int32) array with a leading
  example axis; a tuple or dict of inputs array by array, each keeping its shape."""
  if is_tree(x):
    if not len(x):
      raise config_error(field, type(x).__name__, 'inputs: an array, or a tuple or dict of arrays')
    values = [_to_one_x(_field(field, k), v, several=True) for k, v in _items(x)]
    return _rebuild(x, values)
  return _to_one_x(field, x, several=False)


def _to_one_x(field: str, x: Any, several: bool) -> np.ndarray:
  if is_tree(x):
    raise config_error(
      field, type(x).__name__, 'an array: inputs are a tuple or dict of arrays, not nested'
    )
  try:
    a = np.asarray(x)
    if a.dtype.kind in 'iu':
      if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        raise ValueError('integer inputs outside the int32 range')
      a = a.astype(np.int32)
    else:
      a = np.asarray(x, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise config_error(
      field, type(x).__name__, f'inputs must convert to a float32 array ({e})'
    ) from e
  if a.ndim == 0:
    raise config_error(field, _Summary(a), 'inputs need a leading example axis')
  if a.ndim == 1 and not several:
    # One scalar feature per example; models expect a feature axis.
    a = a.reshape(-1, 1)
  return a


def _to_y(field: str, y: Any, ignore_label: int | None = None) -> np.ndarray:
  """Converts labels to int32 (n,) or (n, T), or targets to float32 (n, d)."""
  try:
    a = np.asarray(y)
  except (TypeError, ValueError) as e:
    raise config_error(field, type(y).__name__, f'labels must convert to an array ({e})') from e
  if a.ndim == 0:
    raise config_error(field, _Summary(a), 'labels need a leading example axis')
  if a.dtype.kind in 'biu':
    if a.ndim == 2 and a.shape[1] == 1:
      # A column of class ids, as pandas or loadmat often give them.
      a = a[:, 0]
    if a.ndim not in (1, 2):
      raise config_error(
        field,
        _Summary(a),
        'integer labels are class ids of shape (n,), or (n, T) for sequences; for '
        'regression targets pass floats',
      )
    if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
      raise config_error(field, _Summary(a), 'class ids must be >= 0 and fit an int32')
    return a.astype(np.int32)
  if a.dtype.kind == 'f':
    a = a.astype(np.float32)
    if a.ndim == 1:
      # Regression targets are always (n, d) so that model outputs (n, d) never broadcast.
      a = a.reshape(-1, 1)
    if a.ndim != 2:
      raise config_error(
        field, _Summary(a), 'float targets must have shape (n,) or (n, d); reshape them first'
      )
    return a
  raise config_error(
    field,
    _Summary(a),
    'labels must be integers (class ids, for classification) or floats (regression '
    'targets); encode other labels as class ids first',
  )


def _check_finite(field: str, a: np.ndarray) -> None:
  # By blocks of rows: a mask of the whole set would be one more byte per value.
  rows = max(1, (1 << 22) // max(1, math.prod(a.shape[1:])))
  bad = sum(
    a[i : i + rows].size - int(np.count_nonzero(np.isfinite(a[i : i + rows])))
    for i in range(0, len(a), rows)
  )
  if bad:
    raise config_error(
      field, _Summary(a), f'it contains {bad} non-finite values (NaN or inf); remove or impute them'
    )


def _check_lengths(x_field: str, x: Any, y_field: str, y: np.ndarray) -> None:
  if n_rows(x) != y.shape[0]:
    raise config_error(
      y_field,
      _Summary(y),
      f'it has {y.shape[0]} examples but {x_field} has {n_rows(x)}; '
      'inputs and labels need one row per example',
    )


def arrays(
  x_train: Any,
  y_train: Any,
  x_val: Any = None,
  y_val: Any = None,
  *,
  name: str = 'arrays',
  num_classes: int | None = None,
  ignore_label: int | None = None,
) -> Dataset:
  """Builds a validated `Dataset` from in-memory arrays.

  Inputs may be numpy arrays, jax arrays or nested lists. Float (and bool) inputs become
  float32, integer inputs int32 (token ids stay integer); a 1-D x becomes (n, 1): one
  feature per example. Integer (or bool) labels mean classification and become int32
  class ids of shape (n,) (an (n, 1) column is accepted), or (n, T) for sequences
  (one id per position, e.g. the next token). Float labels
  mean regression and become float32 (n, d); a float y of shape (n,) becomes (n, 1),
  one column per output: a model with one output returns (batch, 1) or, for the
  regression losses (mse, huber, l1), (batch,); neither is ever broadcast.

  A model with several inputs (token ids and lengths, user and item ids, an image and a
  mask) takes x as a tuple or dict of arrays with one row per example each, every array
  converted alone (its own dtype; a (n,) array keeps its shape). The engine gathers
  batches, pads evaluation chunks and checks each array alike, and calls the model with
  a tuple's arrays as positional arguments (`model(token_ids, lengths)`) and a dict whole
  (`model(batch)`).

  Args:
    x_train: training inputs, shape (n, ...features), or a tuple or dict of such arrays.
    y_train: training labels (n,) or targets (n,) / (n, d).
    x_val: optional validation inputs with the same feature shape as x_train.
    y_val: validation labels or targets; required exactly when x_val is given.
    name: a short name used in logs and results.
    num_classes: for integer labels, the number of classes; defaults to the largest label
      over train and validation plus one. Give it when some class may be absent.
    ignore_label: for integer labels, a value (e.g. -1 or a padding id) whose positions
      are left out of the loss and the accuracy: each example's loss is the mean over
      its other positions.

  Returns:
    The dataset.

  Raises:
    ConfigError: for mismatched lengths, an empty training set, a missing half of the
      validation pair, non-finite inputs or targets, a validation feature shape that differs
      from training's, negative class ids, or an invalid num_classes.
  """
  if ignore_label is not None and (
    isinstance(ignore_label, bool) or not isinstance(ignore_label, int | np.integer)
  ):
    raise config_error('data.ignore_label', ignore_label, 'an integer label, or None')
  xt = _to_x('data.x_train', x_train)
  yt = _to_y('data.y_train', y_train, ignore_label)
  if (x_val is None) != (y_val is None):
    given, missing = ('data.x_val', 'data.y_val') if y_val is None else ('data.y_val', 'data.x_val')
    raise config_error(missing, None, f'{given} was given without it; give both or neither')
  xv = yv = None
  if x_val is not None:
    xv = _to_x('data.x_val', x_val)
    yv = _to_y('data.y_val', y_val, ignore_label)
  if num_classes is None and np.issubdtype(yt.dtype, np.integer):
    num_classes = max(_largest_label(y, ignore_label) for y in (yt, yv) if y is not None) + 1
  if isinstance(num_classes, np.integer):
    num_classes = int(num_classes)
  ignore = int(ignore_label) if isinstance(ignore_label, np.integer) else ignore_label
  # The checks every Dataset gets (`check`), whichever way it was built.
  check(Dataset(xt, yt, xv, yv, name=name, num_classes=num_classes, ignore_label=ignore))
  if xv is not None and n_rows(xv) == 0:
    xv = yv = None  # an empty validation set is no validation set
  xv, yv = (None, None) if xv is None else (jax.tree.map(aligned, xv), aligned(yv))
  xt = jax.tree.map(aligned, xt)
  return Dataset(xt, aligned(yt), xv, yv, name=name, num_classes=num_classes, ignore_label=ignore)


def _largest_label(y: np.ndarray, ignore_label: int | None) -> int:
  real = y if ignore_label is None else y[y != ignore_label]
  return int(real.max(initial=-1))


def check(data: Dataset) -> None:
  """Checks a `Dataset` however it was built (`arrays`, a loader of this module, the
  constructor, the researcher's own loader): arrays of the dtypes and shapes the engine
  takes, one label per input row, finite inputs and float targets, class ids in
  [0, num_classes) (but `ignore_label`), a validation pair shaped like the training pair.
  `sweep.run` calls it before anything compiles.

  Raises:
    ConfigError: naming the field (`data.x_train`, ...), what it holds, and what would be
      accepted.
  """
  if not isinstance(data.name, str) or not data.name:
    raise config_error('data.name', data.name, 'a non-empty string')
  ignore = data.ignore_label
  if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int | np.integer)):
    raise config_error('data.ignore_label', ignore, 'an integer label, or None')
  _check_x('data.x_train', data.x_train)
  _check_y('data.y_train', data.y_train, ignore)
  _check_lengths('data.x_train', data.x_train, 'data.y_train', data.y_train)
  if data.n_train == 0:
    raise config_error(
      'data.x_train',
      describe_inputs(data.x_train),
      'the training set needs at least one example',
    )
  if (data.x_val is None) != (data.y_val is None):
    given, missing = (
      ('data.x_val', 'data.y_val') if data.y_val is None else ('data.y_val', 'data.x_val')
    )
    raise config_error(missing, None, f'{given} was given without it; give both or neither')
  if data.x_val is not None:
    xt, yt, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    _check_x('data.x_val', xv)
    _check_y('data.y_val', yv, ignore)
    _check_lengths('data.x_val', xv, 'data.y_val', yv)
    if is_tree(xt) or is_tree(xv):
      if jax.tree.structure(xv) != jax.tree.structure(xt):
        raise config_error(
          'data.x_val',
          describe_inputs(xv),
          f'validation inputs must have the structure of data.x_train, {describe_inputs(xt)}',
        )
      pairs = [(_field('data.x_val', k), v, xt[k]) for k, v in _items(xv)]
    else:
      pairs = [('data.x_val', xv, xt)]
    for field, v, t in pairs:
      if v.shape[1:] != t.shape[1:]:
        raise config_error(
          field,
          _Summary(v),
          f'its feature shape {v.shape[1:]} differs from data.x_train feature shape {t.shape[1:]}',
        )
      if v.dtype != t.dtype:
        raise config_error(
          field, _Summary(v), f'validation inputs must be {t.dtype}, as data.x_train'
        )
    if yv.dtype != yt.dtype:
      raise config_error(
        'data.y_val',
        _Summary(yv),
        f'validation labels must be of the same kind as data.y_train ({yt.dtype})',
      )
    if yv.shape[1:] != yt.shape[1:]:
      raise config_error(
        'data.y_val',
        _Summary(yv),
        f'its target shape {yv.shape[1:]} differs from data.y_train target shape {yt.shape[1:]}',
      )
  labels = [
    (f, y) for f, y in (('data.y_train', data.y_train), ('data.y_val', data.y_val)) if y is not None
  ]
  if data.is_classification:
    seen = max(_largest_label(y, ignore) for _, y in labels) + 1
    k = data.num_classes
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < max(seen, 1):
      raise config_error(
        'data.num_classes', k, f'an integer >= the largest label + 1 ({max(seen, 1)})'
      )
  elif data.num_classes is not None:
    raise config_error('data.num_classes', data.num_classes, 'None for float (regression) targets')
  elif ignore is not None:
    raise config_error('data.ignore_label', ignore, 'None for float (regression) targets')


def _check_x(field: str, x: Any) -> None:
  if is_tree(x):
    items = _items(x)
    if not items:
      raise config_error(field, type(x).__name__, 'inputs: an array, or a tuple or dict of arrays')
    for k, a in items:
      _check_one_x(_field(field, k), a, several=True)
    lengths = {k: np.shape(a)[0] for k, a in items}
    if len(set(lengths.values())) > 1:
      raise config_error(
        field,
        describe_inputs(x),
        f'its arrays need one row per example each; they have {lengths} rows',
      )
    return
  _check_one_x(field, x, several=False)


def _check_one_x(field: str, x: Any, several: bool) -> None:
  if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.int32):
    shown = _Summary(x) if isinstance(x, np.ndarray) else type(x).__name__
    raise config_error(
      field,
      shown,
      'inputs are a float32 (or int32, token ids) numpy array; sweep.data.arrays(...) '
      'converts other arrays and lists',
    )
  if x.ndim < (1 if several else 2):
    raise config_error(
      field,
      _Summary(x),
      'inputs need an example axis and a feature axis, (n, ...features); '
      'sweep.data.arrays(...) makes a 1-D x one feature per example',
    )
  if x.dtype == np.float32:
    _check_finite(field, x)


def _check_y(field: str, y: Any, ignore_label: int | None) -> None:
  if not isinstance(y, np.ndarray) or y.dtype not in (np.int32, np.float32):
    shown = _Summary(y) if isinstance(y, np.ndarray) else type(y).__name__
    raise config_error(
      field,
      shown,
      'labels are an int32 numpy array of class ids, or float32 regression targets; '
      'sweep.data.arrays(...) converts other arrays and lists',
    )
  if y.dtype == np.int32:
    if y.ndim not in (1, 2):
      raise config_error(
        field,
        _Summary(y),
        'integer labels are class ids of shape (n,), or (n, T) for sequences; for '
        'regression targets pass floats',
      )
    real = y if ignore_label is None else y[y != ignore_label]
    if real.size and real.min() < 0:
      raise config_error(
        field,
        _Summary(y),
        f'class ids must be >= 0 (found {int(real.min())}); mark padding with ignore_label',
      )
    return
  if y.ndim != 2:
    raise config_error(
      field,
      _Summary(y),
      'float targets have shape (n, d); sweep.data.arrays(...) makes (n,) (n, 1)',
    )
  _check_finite(field, y)


# ---------------------------------------------------------------------------------------------
# MNIST-1D


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int) -> tuple[np.ndarray, ...]:
  # Imported here so that the rest of the module works without the package.
  import mnist1d.data

  args = mnist1d.data.get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  # make_dataset reseeds the global numpy and python generators; put them back so that
  # loading data does not change the randomness of the caller's code.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    raw = mnist1d.data.make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  out = (
    aligned(raw['x'].astype(np.float32)),
    aligned(raw['y'].astype(np.int32)),
    aligned(raw['x_test'].astype(np.float32)),
    aligned(raw['y_test'].astype(np.int32)),
  )
  for a in out:
    # The arrays are shared by every caller through the cache.
    a.setflags(write=False)
  return out


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
  """MNIST-1D (Greydanus, 2020), generated locally from the package's templates.

  With the defaults this is the standard dataset: 4000 training and 1000 validation
  signals of length 40 (float32, standardized over the whole set), 10 classes. The data is
  generated, never downloaded, and the arrays are cached in memory per
  (num_samples, seed) and shared read-only.

  Args:
    num_samples: total examples; rounded down to a multiple of 10 (one tenth per class),
      80% of them train.
    seed: the generator seed (42 is the published dataset's).

  Returns:
    The dataset, named "mnist1d".
  """
  if (
    isinstance(num_samples, bool)
    or not isinstance(num_samples, int | np.integer)
    or num_samples < 20
  ):
    raise config_error(
      'data.num_samples', num_samples, 'an integer >= 20 (ten classes, two splits)'
    )
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
    raise config_error('data.seed', seed, 'an integer')
  xt, yt, xv, yv = _mnist1d_arrays(int(num_samples), int(seed))
  return arrays(xt, yt, xv, yv, name='mnist1d', num_classes=10)


# ---------------------------------------------------------------------------------------------
# scikit-learn's bundled datasets


def _check_val_fraction(val_fraction: float) -> None:
  if (
    isinstance(val_fraction, bool)
    or not isinstance(val_fraction, int | float)
    or not (0 <= val_fraction < 1)
  ):
    raise config_error('data.val_fraction', val_fraction, 'a number in [0, 1)')


def digits(val_fraction: float = 0.2, seed: int = 0, *, flatten: bool = True) -> Dataset:
  """scikit-learn's handwritten digits: 1797 8x8 images, 10 classes.

  Pixels (0..16) are scaled to [0, 1]. The split is stratified by class with a fixed seed.

  Args:
    val_fraction: fraction of examples held out for validation; 0 for none.
    seed: seed of the split.
    flatten: give inputs as (n, 64) vectors; False gives (n, 8, 8) images for a CNN.

  Returns:
    The dataset, named "digits".
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  _check_val_fraction(val_fraction)
  bunch = load_digits()
  x = (bunch.images / 16.0).astype(np.float32)
  if flatten:
    x = x.reshape(len(x), -1)
  y = bunch.target.astype(np.int32)
  if val_fraction == 0:
    return arrays(x, y, name='digits', num_classes=10)
  xt, xv, yt, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
  return arrays(xt, yt, xv, yv, name='digits', num_classes=10)


def diabetes(val_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's diabetes regression: 442 patients, 10 features, one target.

  Features and target are standardized with the training split's mean and standard
  deviation (so validation statistics do not leak into training). Targets are float32
  (n, 1) in standard units: an MSE of 1 is what predicting the training mean scores.

  Args:
    val_fraction: fraction of examples held out for validation; 0 for none.
    seed: seed of the random split.

  Returns:
    The dataset, named "diabetes".
  """
  from sklearn.datasets import load_diabetes
  from sklearn.model_selection import train_test_split

  _check_val_fraction(val_fraction)
  # scaled=False: the bundled scaled copy uses statistics of the whole set.
  x, y = load_diabetes(return_X_y=True, scaled=False)
  y = y.reshape(-1, 1)
  if val_fraction == 0:
    xt, yt, xv, yv = x, y, None, None
  else:
    xt, xv, yt, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed)
  x_mean, x_std = xt.mean(0), xt.std(0)
  y_mean, y_std = yt.mean(0), yt.std(0)

  def standardize(x, y):
    return (x - x_mean) / x_std, (y - y_mean) / y_std

  xt, yt = standardize(xt, yt)
  if xv is not None:
    xv, yv = standardize(xv, yv)
  return arrays(
    xt.astype(np.float32),
    yt.astype(np.float32),
    None if xv is None else xv.astype(np.float32),
    None if yv is None else yv.astype(np.float32),
    name='diabetes',
  )


# ---------------------------------------------------------------------------------------------
# MNIST from IDX files

# IDX type codes (the third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES = {
  0x08: np.dtype('>u1'),
  0x09: np.dtype('>i1'),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}

_MNIST_TRAIN = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte')
_MNIST_T10K = ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def read_idx(file: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzip-compressed when its name ends in ".gz".

  The header is a magic number (two zero bytes, a type code, the number of dimensions)
  followed by one big-endian int32 per dimension; the data follows in big-endian order.

  Args:
    file: the file's path.

  Returns:
    The array in native byte order: uint8, int8, int16, int32, float32 or float64 for
    type codes 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E.

  Raises:
    ConfigError: the file is missing, its magic number is not IDX, or its size does not
      match the dimensions in its header.
  """
  path = os.fspath(file)
  if not os.path.isfile(path):
    raise config_error('file', path, f'no such file in {os.path.dirname(os.path.abspath(path))}')
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    # A truncated or non-gzip ".gz" file.
    raise config_error('file', path, f'could not be read ({e})') from e

  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise config_error(
      'file',
      path,
      f'not an IDX file: magic bytes {raw[:4].hex()} should be 0000 then a type code '
      f'({", ".join(f"{c:02x}" for c in _IDX_DTYPES)}) then the number of dimensions',
    )
  dtype = _IDX_DTYPES[raw[2]]
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise config_error(
      'file', path, f'the header declares {ndim} dimensions but the file has only {len(raw)} bytes'
    )
  shape = struct.unpack(f'>{ndim}i', raw[4:header])
  if any(d < 0 for d in shape):
    raise config_error('file', path, f'the header declares negative dimensions {shape}')
  expected = math.prod(shape) * dtype.itemsize
  if len(raw) - header != expected:
    raise config_error(
      'file',
      path,
      f'the header declares shape {shape} of {dtype.name} ({expected} data bytes) but the '
      f'file holds {len(raw) - header} data bytes',
    )
  data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
  return data.reshape(shape).astype(dtype.newbyteorder('='))


def _find(path: str, name: str) -> str | None:
  """The path of `name` or `name.gz` in the directory, or None."""
  for candidate in (name, name + '.gz'):
    full = os.path.join(path, candidate)
    if os.path.isfile(full):
      return full
  return None


def _read_pair(path: str, names: tuple[str, str], flatten: bool) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one images/labels pair of files."""
  image_file, label_file = (_find(path, n) for n in names)
  assert image_file is not None and label_file is not None
  images = read_idx(image_file)
  labels = read_idx(label_file)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise config_error(
      'file',
      image_file,
      f'expected uint8 images of shape (n, rows, cols), got {images.dtype} {images.shape}',
    )
  if labels.ndim != 1 or labels.dtype.kind not in 'iu':
    raise config_error(
      'file',
      label_file,
      f'expected integer labels of shape (n,), got {labels.dtype} {labels.shape}',
    )
  if len(images) != len(labels):
    raise config_error(
      'file',
      label_file,
      f'it holds {len(labels)} labels but {image_file} holds {len(images)} images',
    )
  x = images.astype(np.float32) / 255.0
  if flatten:
    x = x.reshape(len(x), -1)
  return x, labels.astype(np.int32)


def _missing(path: str, names: tuple[str, ...]) -> list[str]:
  return [n for n in names if _find(path, n) is None]


def mnist(
  path: str | os.PathLike,
  *,
  flatten: bool = True,
  val_split: str | None = 't10k',
  train_fraction: float | None = None,
) -> Dataset:
  """MNIST (or a dataset in the same layout, like Fashion-MNIST) from IDX files in a directory.

  Expects `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
  and `t10k-labels-idx1-ubyte`, each possibly gzip-compressed with a ".gz" suffix. Pixels
  are scaled to [0, 1] float32.

  Args:
    path: the directory holding the files.
    flatten: give inputs as (n, 784) vectors; False gives (n, 28, 28) images, which is
      what `models.cnn` needs for 2-D convolutions.
    val_split: "t10k" to validate on the t10k files, or None for no validation set (then
      only the train files are read).
    train_fraction: when given, only the t10k files are read and split in order: the first
      round(train_fraction * n) examples train, the rest validate. (In MNIST's t10k file
      the first 5000 digits are known to be cleaner than the last 5000.)

  Returns:
    The dataset, named "mnist", with 10 classes.

  Raises:
    ConfigError: the directory or files are missing (the message names the missing files
      and what would work instead), a file is not valid IDX, or the arguments are invalid.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise config_error('data.path', path, 'no such directory')
  if val_split not in ('t10k', None):
    raise config_error('data.val_split', val_split, '"t10k" or None')
  expected = ', '.join(_MNIST_TRAIN + _MNIST_T10K)
  gz_note = f'expected files (each optionally with .gz): {expected}'

  if train_fraction is not None:
    if (
      isinstance(train_fraction, bool)
      or not isinstance(train_fraction, int | float)
      or not 0 < train_fraction <= 1
    ):
      raise config_error('data.train_fraction', train_fraction, 'a number in (0, 1], or None')
    if val_split != 't10k':
      raise config_error(
        'data.val_split',
        val_split,
        'leave it at "t10k" with train_fraction, which splits the t10k files',
      )
    missing = _missing(path, _MNIST_T10K)
    if missing:
      raise config_error(
        'data.path', path, f'missing {", ".join(missing)}; train_fraction reads only the t10k files'
      )
    x, y = _read_pair(path, _MNIST_T10K, flatten)
    n_train = round(train_fraction * len(x))
    if n_train == 0:
      raise config_error(
        'data.train_fraction',
        train_fraction,
        f'too small: it leaves no training example of {len(x)}',
      )
    if n_train == len(x):
      return arrays(x, y, name='mnist', num_classes=10)
    return arrays(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name='mnist', num_classes=10)

  needed = _MNIST_TRAIN + (_MNIST_T10K if val_split == 't10k' else ())
  missing = _missing(path, needed)
  if missing:
    if set(missing) <= set(_MNIST_TRAIN) and not _missing(path, _MNIST_T10K):
      hint = (
        'only the t10k files are there; split them into train and validation with '
        'mnist(path, train_fraction=0.8)'
      )
    elif set(missing) <= set(_MNIST_T10K):
      hint = 'the t10k files are not there; pass val_split=None to train without validation'
    else:
      hint = gz_note
    raise config_error('data.path', path, f'missing {", ".join(missing)}: {hint}')

  xt, yt = _read_pair(path, _MNIST_TRAIN, flatten)
  xv = yv = None
  if val_split == 't10k':
    xv, yv = _read_pair(path, _MNIST_T10K, flatten)
  return arrays(xt, yt, xv, yv, name='mnist', num_classes=10)


# ---------------------------------------------------------------------------------------------
# Linear regression


def synthetic_regression(
  n_train: int = 1024,
  n_val: int = 256,
  dim: int = 16,
  outputs: int = 1,
  noise: float = 0.1,
  seed: int = 0,
) -> Dataset:
  """A linear regression problem with known weights: y = x @ w + noise.

  x ~ N(0, 1) of shape (n, dim), w ~ N(0, 1/dim) of shape (dim, outputs) so that targets
  have about unit variance before noise, and the noise is N(0, noise^2). All draws come
  from one numpy Generator seeded with `seed`, so the data is reproducible.

  Args:
    n_train: training examples.
    n_val: validation examples; 0 for none.
    dim: input features.
    outputs: target columns.
    noise: standard deviation of the additive noise.
    seed: generator seed.

  Returns:
    The dataset, named "synthetic_regression", with float32 targets (n, outputs).
  """
  for field, value, low in (
    ('n_train', n_train, 1),
    ('n_val', n_val, 0),
    ('dim', dim, 1),
    ('outputs', outputs, 1),
  ):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
      raise config_error(f'data.{field}', value, f'an integer >= {low}')
  if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0 <= noise < math.inf:
    raise config_error('data.noise', noise, 'a finite number >= 0')
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, outputs)) / math.sqrt(dim)
  x = rng.normal(size=(n_train + n_val, dim))
  y = x @ w + noise * rng.normal(size=(n_train + n_val, outputs))
  x, y = x.astype(np.float32), y.astype(np.float32)
  if n_val == 0:
    return arrays(x, y, name='synthetic_regression')
  return arrays(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name='synthetic_regression')


def lstsq_max_stable_lr(x: Any) -> float:
  """The largest stable full-batch gradient-descent learning rate for least squares.

  For J = (1/m) * sum_i (y_i - x_i W - b)^2 with a linear model with bias, the Hessian is
  H = (2/m) A^T A with A = [x, 1]; gradient descent converges for learning rates below
  2 / lambda_max(H) and diverges above it. This is that bound, in float64. It does not
  depend on y, and holds for each output column separately; if the loss also averages over
  k output columns, multiply it by k.

  Args:
    x: inputs of shape (m, ...features); features are flattened.

  Returns:
    2 / lambda_max(H).
  """
  a = np.asarray(x, dtype=np.float64)
  if a.ndim == 0 or a.shape[0] == 0:
    raise config_error('x', _Summary(a), 'inputs of shape (m, ...features) with m >= 1')
  m = a.shape[0]
  a = np.concatenate([a.reshape(m, -1), np.ones((m, 1))], axis=1)
  # A^T A and A A^T share their nonzero eigenvalues; use the smaller Gram matrix.
  gram = a.T @ a if a.shape[1] <= m else a @ a.T
  lam_max = 2.0 / m * float(np.linalg.eigvalsh(gram)[-1])
  return 2.0 / lam_max
