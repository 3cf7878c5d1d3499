"""Per-example losses, accuracy and input checks against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import losses
from kernels.losses import CLASSIFICATION, LOSSES, check_labels, check_shapes, correct

BATCH = 6


def _mean_rest(x: np.ndarray) -> np.ndarray:
  return x.reshape(x.shape[0], -1).mean(axis=1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
  shifted = z - z.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _signed(y: np.ndarray) -> np.ndarray:
  return np.where(y > 0, 1.0, -1.0)


def ref_mse(f, y):
  return _mean_rest((y - f) ** 2)


def ref_l1(f, y):
  return _mean_rest(np.abs(y - f))


def ref_huber(f, y):
  e = np.abs(f - y)
  return _mean_rest(np.where(e <= 1.0, 0.5 * e**2, e - 0.5))


def ref_sigmoid_bce(z, y):
  # -log(sigmoid(z)) = log(1 + exp(-z)), -log(1 - sigmoid(z)) = log(1 + exp(z)).
  return _mean_rest(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z))


def ref_hinge(s, y):
  return _mean_rest(np.maximum(0.0, 1.0 - s * _signed(y)))


def ref_softmax_ce(z, y):
  log_p = _log_softmax(z)
  if np.issubdtype(y.dtype, np.integer):
    per_position = -np.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
  else:
    per_position = -(y * log_p).sum(axis=-1)
  return _mean_rest(per_position)


def _data(kind: str, shape: tuple, seed: int):
  """Predictions (float32, scaled so both huber regimes occur) and targets."""
  rng = np.random.default_rng(seed)
  pred = (2.0 * rng.normal(size=shape)).astype(np.float32)
  if kind == 'real':
    y = (2.0 * rng.normal(size=shape)).astype(np.float32)
  elif kind == 'binary_float':
    y = rng.integers(0, 2, size=shape).astype(np.float32)
  elif kind == 'binary_int':
    y = rng.integers(0, 2, size=shape).astype(np.int32)
  elif kind == 'prob':
    y = rng.uniform(size=shape).astype(np.float32)
  elif kind == 'pm1':
    y = rng.choice(np.array([-1, 1], np.int32), size=shape)
  elif kind == 'class_ids':
    y = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
  elif kind == 'one_hot':
    y = np.eye(shape[-1], dtype=np.float32)[rng.integers(0, shape[-1], size=shape[:-1])]
  elif kind == 'soft':
    y = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
  else:
    raise AssertionError(kind)
  return pred, y


LOSS_CASES = [
  ('mse', ref_mse, 'real', (BATCH,)),
  ('mse', ref_mse, 'real', (BATCH, 3)),
  ('mse', ref_mse, 'real', (BATCH, 2, 4)),
  ('l1', ref_l1, 'real', (BATCH,)),
  ('l1', ref_l1, 'real', (BATCH, 3)),
  ('huber', ref_huber, 'real', (BATCH,)),
  ('huber', ref_huber, 'real', (BATCH, 2, 4)),
  ('sigmoid_binary_cross_entropy', ref_sigmoid_bce, 'binary_float', (BATCH,)),
  ('sigmoid_binary_cross_entropy', ref_sigmoid_bce, 'binary_int', (BATCH, 5)),
  ('sigmoid_binary_cross_entropy', ref_sigmoid_bce, 'prob', (BATCH, 2, 3)),
  ('hinge', ref_hinge, 'pm1', (BATCH,)),
  ('hinge', ref_hinge, 'binary_int', (BATCH, 4)),
  ('hinge', ref_hinge, 'binary_float', (BATCH, 4)),
  ('softmax_cross_entropy', ref_softmax_ce, 'class_ids', (BATCH, 10)),
  ('softmax_cross_entropy', ref_softmax_ce, 'one_hot', (BATCH, 10)),
  ('softmax_cross_entropy', ref_softmax_ce, 'soft', (BATCH, 4)),
  ('softmax_cross_entropy', ref_softmax_ce, 'one_hot', (BATCH, 3, 5)),
]


@pytest.mark.parametrize('name,reference,kind,shape', LOSS_CASES)
def test_loss_matches_float64_reference(name, reference, kind, shape):
  pred, y = _data(kind, shape, seed=len(name) + len(shape))
  expected = reference(pred.astype(np.float64), y if y.dtype.kind == 'i' else y.astype(np.float64))
  # Under jit, as the trainer calls it: the label dtype must pick the branch
  # at trace time.
  actual = np.asarray(jax.jit(LOSSES[name])(pred, y))
  assert actual.shape == (BATCH,)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_loss_table_and_names():
  assert set(LOSSES) == {
    'mse',
    'softmax_cross_entropy',
    'sigmoid_binary_cross_entropy',
    'huber',
    'l1',
    'hinge',
  }
  assert CLASSIFICATION == {'softmax_cross_entropy', 'sigmoid_binary_cross_entropy', 'hinge'}
  assert LOSSES['mse'] is losses.mse


def test_mse_has_no_half_factor():
  assert float(losses.mse(jnp.zeros((1, 1)), jnp.full((1, 1), 2.0))[0]) == 4.0


def ref_correct_softmax(z, y):
  wanted = y if np.issubdtype(y.dtype, np.integer) else y.argmax(-1)
  return _mean_rest((z.argmax(-1) == wanted).astype(np.float64))


def ref_correct_sigmoid(z, y):
  return _mean_rest(((z > 0) == (y > 0.5)).astype(np.float64))


def ref_correct_hinge(s, y):
  return _mean_rest((np.sign(s) == _signed(y)).astype(np.float64))


CORRECT_CASES = [
  ('softmax_cross_entropy', ref_correct_softmax, 'class_ids', (BATCH, 3)),
  ('softmax_cross_entropy', ref_correct_softmax, 'one_hot', (BATCH, 3)),
  ('sigmoid_binary_cross_entropy', ref_correct_sigmoid, 'binary_float', (BATCH,)),
  ('sigmoid_binary_cross_entropy', ref_correct_sigmoid, 'binary_int', (BATCH, 4)),
  ('hinge', ref_correct_hinge, 'pm1', (BATCH,)),
  ('hinge', ref_correct_hinge, 'binary_int', (BATCH, 4)),
]


@pytest.mark.parametrize('name,reference,kind,shape', CORRECT_CASES)
def test_correct_matches_reference(name, reference, kind, shape):
  # Several seeds so that both hits and misses occur for every case.
  jitted = jax.jit(correct, static_argnums=0)
  for seed in range(3):
    pred, y = _data(kind, shape, seed)
    actual = np.asarray(jitted(name, pred, y))
    assert actual.shape == (BATCH,)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, reference(pred, y), rtol=0, atol=1e-7)


def test_correct_edge_values():
  # A zero score has sign 0 and so is wrong for either hinge label.
  scores = jnp.array([0.0, 0.5, -0.5, 2.0])
  labels = jnp.array([1, 0, 0, -1])
  np.testing.assert_array_equal(correct('hinge', scores, labels), [0.0, 0.0, 1.0, 0.0])
  # A zero logit predicts class 0, and label 0.5 counts as class 0.
  logits = jnp.array([0.0, 0.0, 0.1])
  targets = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_array_equal(
    correct('sigmoid_binary_cross_entropy', logits, targets), [1.0, 1.0, 1.0]
  )


@pytest.mark.parametrize('name', ['mse', 'huber', 'l1'])
def test_correct_is_none_for_regression(name):
  assert correct(name, jnp.zeros((2, 1)), jnp.zeros((2, 1))) is None


def test_correct_rejects_unknown_loss():
  with pytest.raises(ValueError, match='unknown loss'):
    correct('focal', jnp.zeros((2, 1)), jnp.zeros((2, 1)))


def test_check_shapes_message_for_integer_labels():
  assert check_shapes('softmax_cross_entropy', (32, 10, 1), (32,), True) == (
    'softmax_cross_entropy with integer labels needs predictions of shape (batch, num_classes) '
    'for labels (batch,), or (batch, T, num_classes) for sequences of ids (batch, T); '
    'got predictions (32, 10, 1) and labels (32,)'
  )
  # Sequences of ids: one class axis more than the labels.
  assert check_shapes('softmax_cross_entropy', (32, 7, 10), (32, 7), True) is None


@pytest.mark.parametrize(
  'name,pred_shape,target_shape,is_integer,fragments',
  [
    # Fitting shapes.
    ('softmax_cross_entropy', (32, 10), (32,), True, None),
    ('softmax_cross_entropy', (32, 10), (32, 10), False, None),
    ('softmax_cross_entropy', (32, 4, 10), (32, 4, 10), False, None),
    ('mse', (32,), (32,), False, None),
    ('mse', (32, 3), (32, 3), False, None),
    ('sigmoid_binary_cross_entropy', (32, 1), (32, 1), True, None),
    ('hinge', (32,), (32,), True, None),
    ('l1', (32, 2, 2), (32, 2, 2), False, None),
    # One output per example against a y of shape (n,), held as (n, 1).
    ('mse', (32,), (32, 1), False, None),
    ('huber', (32,), (32, 1), False, None),
    ('sigmoid_binary_cross_entropy', (32,), (32, 1), False, ['held as (32, 1)', '(batch, 1)']),
    # Mismatches.
    ('softmax_cross_entropy', (32, 10), (32, 1), True, ['integer labels', '(32, 10)', '(32, 1)']),
    ('softmax_cross_entropy', (32, 10), (16,), True, ['(batch,)', '(16,)']),
    ('softmax_cross_entropy', (32,), (32,), True, ['(batch, num_classes)', '(32,)']),
    ('softmax_cross_entropy', (32, 10), (32, 9), False, ['same shape', '(32, 9)']),
    ('softmax_cross_entropy', (32,), (32,), False, ['num_classes', '(32,)']),
    ('mse', (32, 1), (32,), False, ['mse', 'same shape', '(32, 1)', '(32,)']),
    ('huber', (32,), (16,), False, ['huber', '(16,)']),
    ('sigmoid_binary_cross_entropy', (32, 1), (32,), True, ['sigmoid_binary_cross_entropy']),
    ('hinge', (32, 2), (32, 1), False, ['hinge', '(32, 2)', '(32, 1)']),
    ('focal', (32,), (32,), False, ['unknown loss', 'mse']),
  ],
)
def test_check_shapes(name, pred_shape, target_shape, is_integer, fragments):
  message = check_shapes(name, pred_shape, target_shape, is_integer)
  if fragments is None:
    assert message is None
  else:
    assert isinstance(message, str)
    for fragment in fragments:
      assert fragment in message


@pytest.mark.parametrize(
  'name,y,num_outputs,fragments',
  [
    ('softmax_cross_entropy', np.array([0, 3, 9]), 10, None),
    ('softmax_cross_entropy', np.array([0, 3, 10]), 10, ['0..9', '1 labels', '0 to 10']),
    ('softmax_cross_entropy', np.array([-1, 2]), 3, ['0..2', '-1 to 2']),
    # Probability targets have no class-id range to check.
    ('softmax_cross_entropy', np.eye(3, dtype=np.float32), 3, None),
    ('sigmoid_binary_cross_entropy', np.array([0.0, 0.3, 1.0]), 1, None),
    ('sigmoid_binary_cross_entropy', np.array([0, 1]), 1, None),
    ('sigmoid_binary_cross_entropy', np.array([0.0, 2.0, -1.0]), 1, ['[0, 1]', '2 labels']),
    ('sigmoid_binary_cross_entropy', np.array([0.0, np.nan]), 1, ['[0, 1]']),
    ('hinge', np.array([-1, 1, 0, 1]), 1, None),
    ('hinge', np.array([-1.0, 1.0]), 1, None),
    ('hinge', np.array([-1, 2, 3, 2]), 1, ['{-1, 0, 1}', '3 labels', '[2, 3]']),
    ('hinge', np.array([0.5, 1.0]), 1, ['{-1, 0, 1}', '[0.5]']),
    ('mse', np.array([-100.0, 1e6]), 1, None),
    ('softmax_cross_entropy', np.zeros((0,), np.int32), 3, None),
    ('focal', np.array([0]), 1, ['unknown loss']),
  ],
)
def test_check_labels(name, y, num_outputs, fragments):
  message = check_labels(name, y, num_outputs)
  if fragments is None:
    assert message is None
  else:
    assert isinstance(message, str)
    for fragment in fragments:
      assert fragment in message


@pytest.mark.parametrize('name', ['mse', 'huber', 'l1'])
def test_one_output_per_example_is_compared_with_targets_held_as_a_column(name):
  """(batch,) predictions against (batch, 1) targets: per example, never broadcast to
  (batch, batch)."""
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(6,)).astype(np.float32)
  y = rng.normal(size=(6, 1)).astype(np.float32)
  diff = pred.astype(np.float64) - y[:, 0].astype(np.float64)
  want = {
    'mse': diff**2,
    'huber': np.where(np.abs(diff) <= 1, 0.5 * diff**2, np.abs(diff) - 0.5),
    'l1': np.abs(diff),
  }[name]
  got = np.asarray(losses.per_example(name, jnp.asarray(pred), jnp.asarray(y)))
  assert got.shape == (6,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_with_one_output_trains_on_a_float_y_of_shape_n_as_an_optax_loop():
  import optax

  import sweep

  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 4)).astype(np.float32)
  y = (x @ rng.normal(size=4) + 0.1 * rng.normal(size=40)).astype(np.float32)  # (n,)

  def init(key):
    return {'w': jax.random.normal(key, (4,)) * 0.1, 'b': jnp.zeros(())}

  def apply(params, x):
    return x @ params['w'] + params['b']  # (batch,)

  cfg = sweep.SweepConfig(
    model=(init, apply),
    data=sweep.data.arrays(x, y),
    loss='mse',
    optimizer='sgd',
    learning_rate=0.05,
    batch_size=10,
    epochs=2,
    schedule='constant',
  )
  result = sweep.run(cfg, progress=False)
  params = init(jax.random.fold_in(jax.random.key(0), 0))
  opt = optax.sgd(0.05)
  state = opt.init(params)
  for t in range(8):
    epoch, j = divmod(t, 4)
    order = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), epoch), 40
    )
    idx = np.asarray(order)[j * 10 : (j + 1) * 10]
    grads = jax.grad(lambda p, xb, yb: jnp.mean(jnp.square(apply(p, xb) - yb)))(
      params, x[idx], y[idx]
    )
    updates, state = opt.update(grads, state)
    params = optax.apply_updates(params, updates)
  for k in params:
    np.testing.assert_allclose(result.params(0)[k], params[k], rtol=1e-5, atol=1e-6)
