"""Tests for sweep.data: IDX reading, MNIST layout, validation and the bundled datasets."""

import gzip
import os
import random
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sweep import data
from sweep.errors import ConfigError

# IDX type codes, as the format defines them.
_CODES = {
  np.dtype(np.uint8): 0x08,
  np.dtype(np.int8): 0x09,
  np.dtype(np.int16): 0x0B,
  np.dtype(np.int32): 0x0C,
  np.dtype(np.float32): 0x0D,
  np.dtype(np.float64): 0x0E,
}


def write_idx(path, array, *, gz=None, magic=None):
  """Writes `array` as an IDX file, independently of the reader under test."""
  array = np.asarray(array)
  header = magic if magic is not None else bytes([0, 0, _CODES[array.dtype], array.ndim])
  header += struct.pack(f'>{array.ndim}i', *array.shape)
  body = array.astype(array.dtype.newbyteorder('>')).tobytes()
  gz = str(path).endswith('.gz') if gz is None else gz
  with (gzip.open if gz else open)(path, 'wb') as f:
    f.write(header + body)
  return path


def write_mnist(directory, n_train=None, n_t10k=None, gz=True, seed=0):
  """Writes small MNIST-layout files; returns {prefix: (images, labels)}."""
  rng = np.random.default_rng(seed)
  written = {}
  suffix = '.gz' if gz else ''
  for prefix, n in (('train', n_train), ('t10k', n_t10k)):
    if n is None:
      continue
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(directory / f'{prefix}-images-idx3-ubyte{suffix}', images)
    write_idx(directory / f'{prefix}-labels-idx1-ubyte{suffix}', labels)
    written[prefix] = images, labels
  return written


# ---------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize('gz', [False, True])
@pytest.mark.parametrize(
  'array',
  [
    np.arange(7, dtype=np.uint8),
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-128, -1, 0, 127], dtype=np.int8),
    np.array([[-300, 2], [3, 30000]], dtype=np.int16),
    np.array([-(2**31), 5, 2**31 - 1], dtype=np.int32),
    np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
    np.array([np.pi, -1e300], dtype=np.float64),
  ],
  ids=['u8-1d', 'u8-3d', 'i8', 'i16', 'i32', 'f32-3d', 'f64'],
)
def test_read_idx_round_trip(tmp_path, array, gz):
  path = write_idx(tmp_path / ('a.idx.gz' if gz else 'a.idx'), array)
  got = data.read_idx(path)
  assert got.dtype == array.dtype
  assert got.dtype.isnative
  np.testing.assert_array_equal(got, array)


def test_read_idx_accepts_str_path(tmp_path):
  path = write_idx(tmp_path / 'a.idx', np.arange(3, dtype=np.uint8))
  np.testing.assert_array_equal(data.read_idx(str(path)), [0, 1, 2])


def test_read_idx_missing_file_names_file_and_directory(tmp_path):
  with pytest.raises(ConfigError) as e:
    data.read_idx(tmp_path / 'nothing-here-idx1-ubyte')
  assert 'nothing-here-idx1-ubyte' in str(e.value)
  assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize('magic', [b'\x08\x03\x00\x00', b'\x00\x00\x42\x01', b'\x00\x00'])
def test_read_idx_bad_magic(tmp_path, magic):
  path = tmp_path / 'bad.idx'
  path.write_bytes(magic + struct.pack('>i', 1) + b'\x00')
  with pytest.raises(ConfigError, match='magic'):
    data.read_idx(path)


def test_read_idx_gzip_of_something_else(tmp_path):
  path = tmp_path / 'not-gzip.gz'
  path.write_bytes(b'\x00\x00\x08\x01' + struct.pack('>i', 1) + b'\x07')
  with pytest.raises(ConfigError, match='could not be read'):
    data.read_idx(path)


@pytest.mark.parametrize('extra', [-1, 1])
def test_read_idx_size_mismatch(tmp_path, extra):
  path = tmp_path / 'short.idx'
  body = bytes(12 + extra)
  path.write_bytes(b'\x00\x00\x08\x02' + struct.pack('>2i', 3, 4) + body)
  with pytest.raises(ConfigError, match=r'shape \(3, 4\)'):
    data.read_idx(path)


# ---------------------------------------------------------------------------------------------
# mnist


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_reads_train_and_t10k(tmp_path, gz):
  written = write_mnist(tmp_path, n_train=12, n_t10k=5, gz=gz)
  ds = data.mnist(tmp_path)
  images, labels = written['train']
  assert ds.x_train.shape == (12, 784) and ds.x_train.dtype == np.float32
  np.testing.assert_allclose(ds.x_train, images.reshape(12, -1) / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train, labels)
  assert ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.y_val, written['t10k'][1])
  assert ds.x_val.shape == (5, 784)
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.num_classes == 10 and ds.name == 'mnist'


def test_mnist_unflattened_and_without_validation(tmp_path):
  write_mnist(tmp_path, n_train=4)
  ds = data.mnist(tmp_path, flatten=False, val_split=None)
  assert ds.x_train.shape == (4, 28, 28)
  assert ds.x_val is None and ds.n_val == 0


def test_mnist_only_t10k_suggests_train_fraction(tmp_path):
  write_mnist(tmp_path, n_t10k=10)
  with pytest.raises(ConfigError) as e:
    data.mnist(tmp_path)
  message = str(e.value)
  assert 'train-images-idx3-ubyte' in message and 'train-labels-idx1-ubyte' in message
  assert 'train_fraction' in message


def test_mnist_missing_everything_lists_expected_files(tmp_path):
  with pytest.raises(ConfigError) as e:
    data.mnist(tmp_path)
  for name in ('train-images-idx3-ubyte', 't10k-labels-idx1-ubyte', '.gz'):
    assert name in str(e.value)


def test_mnist_missing_directory(tmp_path):
  with pytest.raises(ConfigError, match='no such directory'):
    data.mnist(tmp_path / 'absent')


def test_mnist_train_fraction_splits_t10k_in_order(tmp_path):
  images, labels = write_mnist(tmp_path, n_t10k=10)['t10k']
  ds = data.mnist(tmp_path, train_fraction=0.75)  # round(7.5) = 8
  assert ds.n_train == 8 and ds.n_val == 2
  np.testing.assert_array_equal(ds.y_train, labels[:8])
  np.testing.assert_array_equal(ds.y_val, labels[8:])
  np.testing.assert_allclose(ds.x_val, images[8:].reshape(2, -1) / 255.0, rtol=1e-6)
  assert ds.num_classes == 10

  everything = data.mnist(tmp_path, train_fraction=1.0)
  assert everything.n_train == 10 and everything.x_val is None


@pytest.mark.parametrize('fraction', [0.0, 0.01, 1.5, -0.2, True])
def test_mnist_bad_train_fraction(tmp_path, fraction):
  write_mnist(tmp_path, n_t10k=10)
  with pytest.raises(ConfigError, match='train_fraction'):
    data.mnist(tmp_path, train_fraction=fraction)


def test_mnist_mismatched_counts(tmp_path):
  write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((3, 28, 28), np.uint8))
  write_idx(tmp_path / 'train-labels-idx1-ubyte', np.zeros(4, np.uint8))
  with pytest.raises(ConfigError, match='4 labels'):
    data.mnist(tmp_path, val_split=None)


@pytest.mark.skipif('SWEEP_MNIST_DIR' not in os.environ, reason='SWEEP_MNIST_DIR is not set')
def test_mnist_real_files():
  path = os.environ['SWEEP_MNIST_DIR']
  try:
    ds = data.mnist(path)
  except ConfigError:
    # Only the 10,000 test digits may be there.
    ds = data.mnist(path, train_fraction=0.8)
  assert ds.x_train.shape[1] == 784 and ds.num_classes == 10
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


# ---------------------------------------------------------------------------------------------
# arrays


def test_arrays_converts_types_and_shapes():
  ds = data.arrays([[1.0, 2], [3, 4], [5, 6]], jnp.array([0, 2, 1]))
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  # Integer inputs (token ids) stay integer; bool inputs become floats.
  assert data.arrays(np.array([[1, 2], [3, 4]], np.int64), [0, 1]).x_train.dtype == np.int32
  assert data.arrays(np.array([[True], [False]]), [0, 1]).x_train.dtype == np.float32
  assert ds.is_classification and ds.num_classes == 3 and ds.output_dim == 3
  assert ds.n_train == 3 and ds.n_val == 0 and ds.x_val is None

  reg = data.arrays(np.zeros((4, 2, 3)), np.arange(4.0), np.ones((2, 2, 3)), [1.0, 2.0])
  assert reg.y_train.shape == (4, 1) and reg.y_train.dtype == np.float32
  assert reg.y_val.shape == (2, 1) and not reg.is_classification
  assert reg.num_classes is None and reg.output_dim == 1 and reg.n_val == 2
  assert 'x_train=(4, 2, 3)' in repr(reg)


def test_arrays_num_classes_covers_validation_labels_and_can_be_given():
  ds = data.arrays(np.zeros((2, 1)), [0, 1], np.zeros((1, 1)), [4])
  assert ds.num_classes == 5
  assert data.arrays(np.zeros((2, 1)), [0, 1], num_classes=10).num_classes == 10
  with pytest.raises(ConfigError, match='data.num_classes'):
    data.arrays(np.zeros((2, 1)), [0, 3], num_classes=3)
  with pytest.raises(ConfigError, match='data.num_classes'):
    data.arrays(np.zeros((2, 1)), [0.5, 3.0], num_classes=3)


def test_arrays_length_mismatch_names_field_and_lengths():
  with pytest.raises(ConfigError) as e:
    data.arrays(np.zeros((5, 3)), np.zeros(4, np.int64))
  message = str(e.value)
  assert message.startswith('data.y_train=')
  assert '4' in message and '5' in message
  with pytest.raises(ConfigError, match=r'^data\.y_val='):
    data.arrays(np.zeros((5, 3)), np.zeros(5), np.zeros((2, 3)), np.zeros(3))


@pytest.mark.parametrize(
  'args, field',
  [
    ((np.zeros((0, 3)), np.zeros(0)), 'data.x_train'),
    ((np.zeros((2, 3)), [0, 1], np.zeros((1, 3)), None), 'data.y_val'),
    ((np.zeros((2, 3)), [0, 1], None, [1]), 'data.x_val'),
    ((np.array([[0.0], [np.nan]]), [0, 1]), 'data.x_train'),
    ((np.zeros((2, 1)), [0.0, np.inf]), 'data.y_train'),
    ((np.zeros((2, 1)), [0, 1], np.array([[np.inf]]), [0]), 'data.x_val'),
    ((np.zeros((2, 3)), [0, 1], np.zeros((1, 4)), [0]), 'data.x_val'),
    ((np.zeros((2, 3)), [0, -1]), 'data.y_train'),
    ((np.zeros((2, 3)), [0, 1], np.zeros((1, 3)), [-2]), 'data.y_val'),
    ((np.zeros((2, 3)), [0, 1], np.zeros((1, 3)), [0.5]), 'data.y_val'),
    ((np.zeros((2, 3)), ['a', 'b']), 'data.y_train'),
    ((np.zeros((2, 3)), np.zeros((2, 2, 2), np.int32)), 'data.y_train'),
    ((np.zeros((2, 3)), np.zeros((2, 2, 2))), 'data.y_train'),
    ((5.0, [1]), 'data.x_train'),
  ],
)
def test_arrays_validation_errors_name_the_field(args, field):
  with pytest.raises(ConfigError) as e:
    data.arrays(*args)
  assert str(e.value).startswith(field + '='), str(e.value)


def test_arrays_negative_label_message():
  with pytest.raises(ConfigError, match='>= 0'):
    data.arrays(np.zeros((2, 3)), [0, -1])


def test_dataset_compares_by_identity():
  ds = data.arrays(np.zeros((2, 1)), [0, 1])
  assert ds == ds and ds != data.arrays(np.zeros((2, 1)), [0, 1])
  assert isinstance(hash(ds), int)


# ---------------------------------------------------------------------------------------------
# Bundled and generated datasets


@pytest.fixture(scope='module')
def mnist1d_data():
  # Generation takes about a second; do it once.
  return data.mnist1d()


def test_mnist1d_shapes(mnist1d_data):
  ds = mnist1d_data
  assert ds.x_train.shape == (4000, 40) and ds.x_val.shape == (1000, 40)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10 and ds.is_classification and ds.name == 'mnist1d'
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert abs(float(np.concatenate([ds.x_train, ds.x_val]).std()) - 1.0) < 1e-3


def test_mnist1d_is_cached_read_only_and_keeps_global_random_state(mnist1d_data):
  np.random.seed(123)
  random.seed(123)
  expected_np, expected_py = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(123)
  again = data.mnist1d()
  assert np.random.rand() == expected_np and random.random() == expected_py
  assert again.x_train is mnist1d_data.x_train
  with pytest.raises(ValueError):
    again.x_train[0, 0] = 1.0


def test_mnist1d_bad_arguments():
  with pytest.raises(ConfigError, match='data.num_samples'):
    data.mnist1d(num_samples=5)


def test_digits():
  ds = data.digits()
  assert ds.n_train + ds.n_val == 1797
  assert ds.n_val == 360 and ds.x_train.shape[1:] == (64,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
  assert ds.num_classes == 10
  # Stratified: every class is in the validation set in proportion.
  assert np.bincount(ds.y_val).min() >= 30
  np.testing.assert_array_equal(data.digits().y_val, ds.y_val)
  assert data.digits(flatten=False).x_train.shape[1:] == (8, 8)
  assert data.digits(val_fraction=0).x_val is None
  with pytest.raises(ConfigError, match='data.val_fraction'):
    data.digits(val_fraction=1.0)


def test_diabetes():
  ds = data.diabetes()
  assert ds.n_train + ds.n_val == 442 and ds.x_train.shape[1] == 10
  assert ds.y_train.shape == (ds.n_train, 1) and ds.y_val.shape == (ds.n_val, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.float32
  assert not ds.is_classification and ds.num_classes is None
  np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-4)
  np.testing.assert_allclose(ds.y_train.std(), 1, atol=1e-4)


def test_synthetic_regression():
  ds = data.synthetic_regression(n_train=100, n_val=20, dim=5, outputs=3, noise=0.0, seed=1)
  assert ds.x_train.shape == (100, 5) and ds.y_train.shape == (100, 3)
  assert ds.x_val.shape == (20, 5) and ds.y_val.shape == (20, 3)
  assert ds.y_train.dtype == np.float32
  # Without noise the targets are exactly linear in the inputs.
  w, *_ = np.linalg.lstsq(ds.x_train, ds.y_train, rcond=None)
  np.testing.assert_allclose(ds.x_val @ w, ds.y_val, atol=1e-4)
  again = data.synthetic_regression(n_train=100, n_val=20, dim=5, outputs=3, noise=0.0, seed=1)
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  default = data.synthetic_regression()
  assert default.x_train.shape == (1024, 16) and default.y_val.shape == (256, 1)
  assert data.synthetic_regression(n_val=0).x_val is None
  with pytest.raises(ConfigError, match='data.dim'):
    data.synthetic_regression(dim=0)


# ---------------------------------------------------------------------------------------------
# lstsq_max_stable_lr


def _tiny_problem():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 2)) * np.array([3.0, 0.5]) + 1.0
  y = rng.normal(size=(6, 1))
  return x, y


def test_lstsq_max_stable_lr_matches_direct_eigenvalue():
  x, _ = _tiny_problem()
  m = len(x)
  a = np.hstack([x, np.ones((m, 1))])
  hessian = 2.0 / m * a.T @ a
  expected = 2.0 / np.linalg.eigvals(hessian).real.max()
  assert data.lstsq_max_stable_lr(x) == pytest.approx(expected, rel=1e-10)
  # More features than examples takes the other Gram matrix; the answer is the same.
  wide = np.random.default_rng(0).normal(size=(3, 7))
  aw = np.hstack([wide, np.ones((3, 1))])
  expected_wide = 2.0 / np.linalg.eigvalsh(2.0 / 3 * aw.T @ aw).max()
  assert data.lstsq_max_stable_lr(wide) == pytest.approx(expected_wide, rel=1e-10)


def _final_loss(x, y, lr, steps=500):
  m = len(x)
  a = np.hstack([x, np.ones((m, 1))])
  theta = np.zeros((a.shape[1], 1))
  for _ in range(steps):
    theta -= lr * (2.0 / m) * a.T @ (a @ theta - y)
  return float(np.mean((a @ theta - y) ** 2))


def test_lstsq_max_stable_lr_separates_convergence_from_divergence():
  x, y = _tiny_problem()
  lr = data.lstsq_max_stable_lr(x)
  a = np.hstack([x, np.ones((len(x), 1))])
  theta, *_ = np.linalg.lstsq(a, y, rcond=None)
  optimum = float(np.mean((a @ theta - y) ** 2))
  assert _final_loss(x, y, 0.9 * lr, steps=2000) == pytest.approx(optimum, rel=1e-6)
  assert _final_loss(x, y, 1.1 * lr) > 1e6


def test_datasets_are_aligned_so_the_cpu_takes_them_without_a_copy():
  x = np.arange(3 * 7, dtype=np.float32).reshape(3, 7)[:, 1:]  # not contiguous
  d = data.arrays(x, np.array([0, 1, 2]), x[:2], np.array([0, 1]))
  for a in (d.x_train, d.y_train, d.x_val, d.y_val):
    assert a.flags.c_contiguous and a.ctypes.data % 64 == 0
  np.testing.assert_array_equal(d.x_train, x)
  already = data.aligned(d.x_train)
  assert already is d.x_train  # no second copy
  empty = data.aligned(np.zeros((0, 5), np.float32))
  assert empty.shape == (0, 5)
  if jax.default_backend() == 'cpu':
    on_device = jax.device_put(d.x_train)
    assert on_device.unsafe_buffer_pointer() == d.x_train.ctypes.data


def test_sequence_labels_and_ignore_label():
  x = np.arange(12, dtype=np.int64).reshape(3, 4)
  y = np.array([[1, 2, -1, -1], [3, 4, 5, -1], [0, 1, 2, 3]])
  ds = data.arrays(x, y, ignore_label=-1)
  assert ds.x_train.dtype == np.int32 and ds.y_train.shape == (3, 4)
  assert ds.num_classes == 6 and ds.ignore_label == -1
  with pytest.raises(ConfigError, match='ignore_label'):
    data.arrays(x, y)  # -1 is no class id without ignore_label
  with pytest.raises(ConfigError, match='data.ignore_label'):
    data.arrays(x, y, ignore_label='pad')
  with pytest.raises(ConfigError, match='data.ignore_label'):
    data.arrays(np.zeros((2, 1)), [0.5, 1.5], ignore_label=-1)
