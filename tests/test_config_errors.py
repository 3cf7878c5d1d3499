"""Every config mistake is a `sweep.ConfigError`, raised before anything compiles.

Each case checks that the message names the field, the value given and what is accepted,
that the error is raised directly by the library (not from inside a traced or compiled
function), and that no XLA program was compiled on the way to it. Caches are cleared
before each counted call, so a compile that an earlier test happened to warm up still
counts.
"""

from __future__ import annotations

import os
import traceback

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from compiles import counting_compiles

import sweep
from sweep import data, models, units
from sweep.config import validate
from sweep.errors import ConfigError

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, jaxlib, flax))


class ReachedTraining(AssertionError):
  pass


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
  """A mistake the checks miss fails fast here instead of compiling and training a sweep."""

  def refuse(*args, **kwargs):
    raise ReachedTraining('sweep.run went on to train: no ConfigError was raised')

  # Only a shortcut: without it a missed mistake still fails, after a slow compile.
  monkeypatch.setattr(units, 'plan_units', refuse)


def assert_raised_directly(err: BaseException) -> None:
  """The error comes from the library's own checks, not from inside jax or flax tracing."""
  frames = traceback.extract_tb(err.__traceback__)
  inside = [f'{f.filename}:{f.lineno}' for f in frames if f.filename.startswith(_LIBRARY_DIRS)]
  assert not inside, f'ConfigError raised from inside jax/flax: {inside}'
  assert type(err).__module__.startswith('sweep')
  assert 'Traced<' not in str(err), f'the message shows a tracer: {err}'
  assert 'jit(' not in str(err), f'the message comes from a jitted function: {err}'


def expect_config_error(fn, *args, **kwargs) -> ConfigError:
  """Calls fn, expecting a ConfigError raised directly and no compile before it."""
  with counting_compiles() as compiled:
    with pytest.raises(ConfigError) as info:
      fn(*args, **kwargs)
  err = info.value
  assert_raised_directly(err)
  assert compiled == [], f'{len(compiled)} XLA compiles ({compiled}) before reporting: {err}'
  return err


def assert_message(err: ConfigError, fields, values, accepted=()) -> None:
  """The message names one of `fields`, every one of `values`, and what is accepted."""
  msg = str(err)
  fields = (fields,) if isinstance(fields, str) else tuple(fields)
  assert any(f'{f}=' in msg for f in fields), f'no field of {fields} named in: {msg}'
  for v in (values,) if isinstance(values, str) else values:
    assert v in msg, f'value {v!r} not named in: {msg}'
  for a in (accepted,) if isinstance(accepted, str) else accepted:
    assert a in msg, f'accepted values ({a!r}) not named in: {msg}'


# ---------------------------------------------------------------------------------------------
# A small valid config: 64 examples of 5 features, 10 classes, a tiny MLP.

N_TRAIN = 64


def classification(num_train: int = N_TRAIN, num_val: int = 20, classes: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_train + num_val, 5)).astype(np.float32)
  y = (np.arange(num_train + num_val) % classes).astype(np.int32)
  return data.arrays(x[:num_train], y[:num_train], x[num_train:], y[num_train:])


def regression(targets: int = 2):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N_TRAIN, 5)).astype(np.float32)
  y = rng.normal(size=(N_TRAIN, targets)).astype(np.float32)
  return data.arrays(x[:48], y[:48], x[48:], y[48:])


@pytest.fixture(scope='module')
def base() -> sweep.SweepConfig:
  return sweep.SweepConfig(
    model=models.mlp(hidden=(8,)),
    data=classification(),
    learning_rate=[1e-3, 1e-2],
    batch_size=[8, 16],
    epochs=1,
  )


def run_failing(cfg: sweep.SweepConfig, workdir) -> ConfigError:
  err = expect_config_error(sweep.run, cfg, workdir=str(workdir), progress=False)
  assert not os.path.exists(workdir), 'a failing sweep wrote its workdir'
  return err


def test_base_config_is_valid(base):
  plan = validate(base)
  assert len(plan.runs) == 4


def test_compile_counter_sees_compiles():
  """The zero-compile assertions below mean something: a real compile is counted."""
  with counting_compiles() as compiled:
    jax.jit(lambda v: v * 2 + 1)(np.float32(3)).block_until_ready()
  assert len(compiled) >= 1


# ---------------------------------------------------------------------------------------------
# Mistakes in the sweep's fields, caught when the config is validated.

NAN, INF = float('nan'), float('inf')

FIELD_CASES = [
  # id, changes, field(s), value(s) shown, what is accepted
  ('loss-unknown', dict(loss='cross_entropy'), 'loss', "'cross_entropy'", 'softmax_cross_entropy'),
  ('loss-not-callable', dict(loss=3), 'loss', '3', 'callable'),
  ('optimizer-unknown', dict(optimizer='adamm'), 'optimizer', "'adamm'", ('adam', 'sgd')),
  ('optimizer-unknown-in-list', dict(optimizer=['sgd', 'adamm']), 'optimizer', "'adamm'", 'adamw'),
  ('schedule-unknown', dict(schedule='cosin'), 'schedule', "'cosin'", 'warmup_cosine'),
  ('lr-zero', dict(learning_rate=0), 'learning_rate', 'learning_rate=0 ', '> 0'),
  ('lr-zero-float', dict(learning_rate=0.0), 'learning_rate', '0.0', '> 0'),
  ('lr-negative', dict(learning_rate=-0.1), 'learning_rate', '-0.1', '> 0'),
  ('lr-negative-in-list', dict(learning_rate=[0.1, -1.0]), 'learning_rate', '-1.0', '> 0'),
  ('lr-nan', dict(learning_rate=NAN), 'learning_rate', 'nan', 'finite'),
  ('lr-inf', dict(learning_rate=INF), 'learning_rate', 'inf', 'finite'),
  ('lr-string', dict(learning_rate='0.1'), 'learning_rate', "'0.1'", 'number'),
  ('lr-bool', dict(learning_rate=True), 'learning_rate', 'True', 'number'),
  (
    'batch-larger-than-train-set',
    dict(batch_size=N_TRAIN + 1),
    'batch_size',
    str(N_TRAIN + 1),
    str(N_TRAIN),
  ),
  ('batch-zero', dict(batch_size=0), 'batch_size', 'batch_size=0 ', 'positive integer'),
  ('batch-fraction', dict(batch_size=2.5), 'batch_size', '2.5', 'positive integer'),
  ('batch-string', dict(batch_size='8'), 'batch_size', "'8'", 'positive integer'),
  ('lr-axis-empty', dict(learning_rate=[]), 'learning_rate', '[]', 'at least one value'),
  ('batch-axis-empty', dict(batch_size=[]), 'batch_size', '[]', 'at least one value'),
  ('seed-axis-empty', dict(seed=()), 'seed', '()', 'at least one value'),
  ('lr-duplicate', dict(learning_rate=[0.1, 0.1]), 'learning_rate', '[0.1, 0.1]', 'distinct'),
  ('batch-duplicate', dict(batch_size=[8, 16, 8]), 'batch_size', '[8, 16, 8]', 'distinct'),
  ('seed-duplicate', dict(seed=[0, 0]), 'seed', '[0, 0]', 'distinct'),
  ('optimizer-duplicate', dict(optimizer=['sgd', 'sgd']), 'optimizer', "'sgd'", 'distinct'),
  ('schedule-duplicate', dict(schedule=['cosine', 'cosine']), 'schedule', "'cosine'", 'distinct'),
  # The same number written two ways is the same run twice.
  ('lr-duplicate-int-float', dict(learning_rate=[1, 1.0]), 'learning_rate', '1.0', 'distinct'),
  (
    'lr-duplicate-numpy',
    dict(learning_rate=[0.1, np.float64(0.1)]),
    'learning_rate',
    '0.1',
    'distinct',
  ),
  # Every axis is a grid axis: duplicates in any of them repeat runs.
  (
    'momentum-duplicate',
    dict(optimizer='momentum', momentum=[0.9, 0.9]),
    'momentum',
    '0.9',
    'distinct',
  ),
  ('b1-duplicate', dict(optimizer='adam', b1=[0.8, 0.8]), 'b1', '0.8', 'distinct'),
  (
    'weight-decay-duplicate',
    dict(optimizer='adamw', weight_decay=[0.01, 0.01]),
    'weight_decay',
    '0.01',
    'distinct',
  ),
  (
    'warmup-duplicate',
    dict(schedule='warmup_cosine', warmup=[0.2, 0.2]),
    'warmup',
    '0.2',
    'distinct',
  ),
  (
    'decay-rate-duplicate',
    dict(schedule='exponential', decay_rate=[0.5, 0.5]),
    'decay_rate',
    '0.5',
    'distinct',
  ),
  ('b1-with-sgd', dict(optimizer='sgd', b1=0.9), 'b1', '0.9', ("'sgd'", 'adam')),
  (
    'momentum-with-adam',
    dict(optimizer='adam', momentum=0.5),
    'momentum',
    '0.5',
    ("'adam'", 'nesterov'),
  ),
  ('momentum-out-of-range', dict(optimizer='momentum', momentum=1.5), 'momentum', '1.5', '1.0'),
  (
    'epochs-and-updates',
    dict(epochs=3, updates=17),
    ('epochs', 'updates'),
    ('epochs', 'updates'),
    'not both',
  ),
  ('epochs-zero', dict(epochs=0), 'epochs', 'epochs=0 ', '> 0'),
  ('epochs-string', dict(epochs='1'), 'epochs', "'1'", 'number'),
  ('updates-zero', dict(epochs=None, updates=0), 'updates', 'updates=0 ', 'positive integer'),
  ('updates-fraction', dict(epochs=None, updates=2.5), 'updates', '2.5', 'positive integer'),
  ('updates-bool', dict(epochs=None, updates=True), 'updates', 'True', 'positive integer'),
  ('num-evals-zero', dict(num_evals=0), 'num_evals', 'num_evals=0 ', 'positive integer'),
  (
    'divergence-threshold-one',
    dict(divergence_threshold=1.0),
    'divergence_threshold',
    '1.0',
    '> 1',
  ),
  ('seed-negative', dict(seed=-1), 'seed', '-1', '2**31'),
  ('shuffle-string', dict(shuffle='yes'), 'shuffle', "'yes'", 'True or False'),
  ('compute-dtype-unknown', dict(compute_dtype='fp8'), 'compute_dtype', "'fp8'", 'bfloat16'),
  (
    'objective-sense',
    dict(objectives={'final_val_loss': 'minimize'}),
    "objectives['final_val_loss']",
    "'minimize'",
    ('"min"', '"max"'),
  ),
  ('objectives-empty', dict(objectives={}), 'objectives', '{}', 'dict'),
  (
    'objectives-list',
    dict(objectives=['final_val_loss']),
    'objectives',
    "['final_val_loss']",
    'dict',
  ),
  # An objective must be a column of the results table, or the Pareto front fails after training.
  (
    'objective-unknown-column',
    dict(objectives={'final_val_los': 'min'}),
    'objectives',
    'final_val_los',
    (),
  ),
  ('data-not-a-dataset', dict(data=(np.zeros((4, 2)), np.zeros(4))), 'data', 'tuple', 'Dataset'),
]


@pytest.mark.parametrize(
  'changes, fields, values, accepted', [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_field_mistake_is_reported_before_compiling(
  base, tmp_path, changes, fields, values, accepted
):
  err = run_failing(base.replace(**changes), tmp_path / 'out')
  assert_message(err, fields, values, accepted)
  assert 'is invalid' in str(err)


# ---------------------------------------------------------------------------------------------
# Mistakes in the model, caught by tracing shapes (eval_shape), still before any compile.


def _init_raises(key):
  raise RuntimeError('boom: my init_fn is broken')


def _init_ok(key):
  return {'w': jnp.zeros((5, 10))}


def _apply_ok(params, x):
  return x @ params['w']


def _apply_raises(params, x):
  raise ValueError('boom: my apply_fn is broken')


MODEL_CASES = [
  # id, model, dataset builder, loss, field(s), value(s), accepted
  ('not-a-model-int', 42, classification, None, 'model', "'int'", 'init_fn, apply_fn'),
  ('not-a-model-string', 'mlp', classification, None, 'model', "'str'", 'SizedToData'),
  ('linen-class-not-instance', models.MLP, classification, None, 'model', 'MLP', 'MLP()'),
  ('pair-as-list', [_init_ok, _apply_ok], classification, None, 'model', "'list'", 'tuple'),
  ('tuple-of-one', (_init_ok,), classification, None, 'model', 'tuple of 1', 'two callables'),
  (
    'init-fn-raises',
    (_init_raises, _apply_ok),
    classification,
    None,
    'model',
    'boom: my init_fn is broken',
    'init_fn',
  ),
  (
    'apply-fn-raises',
    (_init_ok, _apply_raises),
    classification,
    None,
    'model',
    'boom: my apply_fn is broken',
    'apply_fn',
  ),
  (
    'linen-module-fails-on-input',
    models.cnn(spatial_dims=2),
    classification,
    None,
    'model',
    'CNN',
    '(1, 5)',
  ),
  # 3 outputs for labels 0..9: the error may name either side of the mismatch.
  (
    'mlp-3-outputs-for-10-classes',
    models.mlp(hidden=(8,), outputs=3),
    classification,
    None,
    ('model', 'data.y_train'),
    ('3 outputs', '9'),
    '0..2',
  ),
  (
    'labels-out-of-range',
    models.mlp(hidden=(8,), outputs=7),
    classification,
    None,
    ('model', 'data.y_train'),
    ('7 outputs', '9'),
    '0..6',
  ),
  (
    'mse-wrong-output-width',
    models.mlp(hidden=(8,), outputs=3),
    regression,
    None,
    'model',
    '(2, 3)',
    'same shape',
  ),
  (
    'mse-on-class-ids',
    models.mlp(hidden=(8,)),
    classification,
    'mse',
    'model',
    '(2, 10)',
    'same shape',
  ),
  (
    'callable-loss-not-per-example',
    models.mlp(hidden=(8,)),
    classification,
    lambda p, y: jnp.mean((p - y[:, None]) ** 2),
    'loss',
    'lambda',
    '(batch,)',
  ),
]


@pytest.mark.parametrize(
  'model, make_data, loss, fields, values, accepted',
  [c[1:] for c in MODEL_CASES],
  ids=[c[0] for c in MODEL_CASES],
)
def test_model_mistake_is_reported_before_compiling(
  base, tmp_path, model, make_data, loss, fields, values, accepted
):
  cfg = base.replace(model=model, data=make_data(), loss=loss)
  err = run_failing(cfg, tmp_path / 'out')
  assert_message(err, fields, values, accepted)


def test_validation_labels_out_of_range_are_reported(base, tmp_path):
  """Validation labels beyond the model's outputs give a NaN val loss on device: catch them."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(N_TRAIN + 16, 5)).astype(np.float32)
  y = (np.arange(N_TRAIN + 16) % 5).astype(np.int32)
  y[N_TRAIN] = 7  # one validation label beyond the 5 outputs
  ds = data.arrays(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])
  cfg = base.replace(model=models.mlp(hidden=(8,), outputs=5), data=ds)
  err = run_failing(cfg, tmp_path / 'out')
  assert_message(err, ('model', 'data.y_val'), ('7',), '0..4')


def test_sigmoid_labels_outside_unit_interval(base, tmp_path):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(N_TRAIN, 5)).astype(np.float32)
  y = rng.uniform(0, 3, size=(N_TRAIN, 1)).astype(np.float32)
  cfg = base.replace(
    model=models.mlp(hidden=(8,)), data=data.arrays(x, y), loss='sigmoid_binary_cross_entropy'
  )
  err = run_failing(cfg, tmp_path / 'out')
  assert_message(err, 'data.y_train', (), '[0, 1]')


# ---------------------------------------------------------------------------------------------
# Mistakes in the data, caught when the dataset is built.


@pytest.mark.parametrize(
  'split, n_x, n_y, field',
  [('train', 64, 63, 'data.y_train'), ('val', 16, 15, 'data.y_val')],
)
def test_x_and_y_of_different_lengths(split, n_x, n_y, field):
  rng = np.random.default_rng(4)
  xt, yt = rng.normal(size=(64, 5)), np.arange(64) % 10
  xv, yv = rng.normal(size=(16, 5)), np.arange(16) % 10
  if split == 'train':
    xt, yt = xt[:n_x], yt[:n_y]
  else:
    xv, yv = xv[:n_x], yv[:n_y]
  err = expect_config_error(data.arrays, xt, yt, xv, yv)
  assert_message(err, field, (f'shape=({n_y},)', str(n_x), str(n_y)), 'one row per example')


# ---------------------------------------------------------------------------------------------
# The same data checks at every door: `Dataset(...)` built directly, `arrays`, a loader of
# the researcher's own (a built-in dataset with its arrays replaced), the built-ins.


def _good_arrays():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 5)).astype(np.float32)
  y = (np.arange(40) % 4).astype(np.int32)
  return {'x_train': x[:32], 'y_train': y[:32], 'x_val': x[32:], 'y_val': y[32:]}


def _with(field: str, change) -> dict:
  arrays = _good_arrays()
  arrays[field] = change(arrays[field].copy())
  return arrays


def _nan(a):
  a[1, 2] = np.nan
  return a


# id -> (the arrays, num_classes given, the field named, a fragment of what is accepted)
BAD_DATA = {
  'nan-in-x-val': (_with('x_val', _nan), 4, 'data.x_val', 'non-finite'),
  'nan-in-x-train': (_with('x_train', _nan), 4, 'data.x_train', 'non-finite'),
  'inf-in-targets': (
    dict(_good_arrays(), y_train=np.full((32, 1), np.inf, np.float32), y_val=None, x_val=None),
    None,
    'data.y_train',
    'non-finite',
  ),
  'label-beyond-num-classes': (_good_arrays(), 3, 'data.num_classes', 'largest label + 1 (4)'),
  'negative-label': (_with('y_train', lambda y: y - 1), 4, 'data.y_train', '>= 0'),
  'val-features-differ': (
    _with('x_val', lambda x: np.zeros((8, 6), np.float32)),
    4,
    'data.x_val',
    'feature shape',
  ),
  'labels-of-another-length': (_with('y_train', lambda y: y[:-1]), 4, 'data.y_train', 'one row'),
}


@pytest.mark.parametrize('case', BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_refused_alike_through_dataset_and_arrays(base, tmp_path, case):
  arrays, num_classes, field, accepted = BAD_DATA[case]
  direct = data.Dataset(**arrays, num_classes=num_classes)
  err = run_failing(base.replace(data=direct), tmp_path / 'w')
  assert str(err).startswith(f'{field}='), str(err)
  assert accepted in str(err), str(err)
  built = expect_config_error(data.arrays, **arrays, num_classes=num_classes)
  assert str(built).startswith(f'{field}=') and accepted in str(built), str(built)


def test_a_loader_of_ones_own_is_checked_as_arrays_is(base, tmp_path):
  import dataclasses

  def load():  # a researcher's loader: a built-in dataset, one array swapped for a broken one
    digits = data.digits()
    x_val = digits.x_val.copy()
    x_val[0, 0] = np.nan
    return dataclasses.replace(digits, x_val=x_val)

  err = run_failing(base.replace(data=load(), model=models.mlp(hidden=(8,))), tmp_path / 'w')
  assert_message(err, 'data.x_val', 'dtype=float32', '1 non-finite values')


@pytest.mark.parametrize(
  'dataset, field',
  [
    (
      lambda a: data.Dataset(
        a['x_train'].astype(np.float64), a['y_train'], None, None, num_classes=4
      ),
      'data.x_train',
    ),
    (
      lambda a: data.Dataset(a['x_train'][:, 0], a['y_train'], None, None, num_classes=4),
      'data.x_train',
    ),
    (lambda a: data.Dataset(a['x_train'], a['y_train'], None, None), 'data.num_classes'),
    (
      lambda a: data.Dataset(a['x_train'], a['y_train'].tolist(), None, None, num_classes=4),
      'data.y_train',
    ),
    (
      lambda a: data.Dataset(a['x_train'], a['y_train'], a['x_val'], None, num_classes=4),
      'data.y_val',
    ),
  ],
  ids=['float64-inputs', 'no-feature-axis', 'no-num-classes', 'labels-as-a-list', 'half-a-pair'],
)
def test_a_dataset_built_directly_gets_the_shapes_the_engine_takes(base, tmp_path, dataset, field):
  err = run_failing(base.replace(data=dataset(_good_arrays())), tmp_path / 'w')
  assert str(err).startswith(f'{field}='), str(err)
  assert 'sweep.data.arrays' in str(err) or field in ('data.num_classes', 'data.y_val'), str(err)


def test_the_built_in_datasets_pass_the_checks():
  for dataset in (
    data.digits(),
    data.digits(val_fraction=0),
    data.diabetes(),
    data.synthetic_regression(n_val=0),
    data.mnist1d(num_samples=100),
  ):
    data.check(dataset)


@pytest.mark.parametrize('x_val', [None, 'empty'])
def test_without_validation_the_default_objective_is_the_training_probe_loss(base, x_val):
  from sweep import provenance

  arrays = _good_arrays()
  if x_val is None:
    direct = data.Dataset(arrays['x_train'], arrays['y_train'], None, None, num_classes=4)
  else:  # an empty validation set, built directly: no validation set
    direct = data.Dataset(
      arrays['x_train'], arrays['y_train'], arrays['x_val'][:0], arrays['y_val'][:0], num_classes=4
    )
  resolved = provenance.resolved_config(validate(base.replace(data=direct)), eval_chunk=64)
  assert resolved['objectives'] == {'final_train_loss': 'min', 'updates': 'min'}
  assert 'final_train_loss' in resolved['objectives_note'], resolved['objectives_note']
  resolved = provenance.resolved_config(validate(base), eval_chunk=64)
  assert resolved['objectives'] == {'final_val_loss': 'min', 'updates': 'min'}
  assert 'objectives_note' not in resolved


# ---------------------------------------------------------------------------------------------
# sweep.check


def test_check_returns_the_plan_without_compiling(base):
  cfg = base.replace(learning_rate=[1e-3, 1e-2, 1e-1], batch_size=[8, 16], seed=[0, 1], epochs=2)
  with counting_compiles() as compiled:
    plan = sweep.check(cfg)
  assert compiled == [], f'sweep.check compiled {compiled}'
  assert len(plan.runs) == 3 * 2 * 2
  assert plan.batch_sizes == (8, 16)
  assert plan.total_updates == {8: 2 * (N_TRAIN // 8), 16: 2 * (N_TRAIN // 16)}
  assert plan.output_dim == 10
  assert plan.loss == 'softmax_cross_entropy'
  assert sorted({r.values['learning_rate'] for r in plan.runs}) == [1e-3, 1e-2, 1e-1]
  assert [r.index for r in plan.runs] == list(range(len(plan.runs)))


def test_check_reports_the_same_errors_as_run(base):
  err = expect_config_error(sweep.check, base.replace(learning_rate=-1.0))
  assert_message(err, 'learning_rate', '-1.0', '> 0')
  err = expect_config_error(sweep.check, base.replace(model=models.mlp(hidden=(8,), outputs=3)))
  assert_message(err, ('model', 'data.y_train'), '3 outputs')


def test_an_unknown_keyword_names_the_fields_and_a_close_match():
  with pytest.raises(
    ConfigError, match=r"no field 'lerning_rate' \(did you mean 'learning_rate'\?\)"
  ) as info:
    sweep.SweepConfig(model=sweep.models.mlp(), data=sweep.data.digits(), lerning_rate=1e-3)
  assert isinstance(info.value, TypeError)  # what Python itself would raise, still
  assert 'batch_size' in str(info.value)
  cfg = sweep.SweepConfig(model=sweep.models.mlp(), data=sweep.data.digits())
  with pytest.raises(ConfigError, match="no field 'batchsize'"):
    cfg.replace(batchsize=64)
