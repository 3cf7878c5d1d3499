"""Checks of a planned sweep that need its runs and its model, made before anything compiles.

`sweep.config.validate` checks each field alone and expands the axes into runs; these
check what only the plan and the model show: the model's output shapes against the loss
and the targets (traced, not compiled), the augmentation, the optimizer factories and
schedule callables, each run's schedule against its own number of updates, and the
objectives against the columns this sweep's table will really have.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kernels import losses, optimizers, schedules
from sweep import adapters, columns
from sweep.config import Plan, check_callables
from sweep.data import batch_spec, describe_inputs, is_tree, n_rows, rows, signature, spec_of
from sweep.errors import config_error


def check(plan: Plan, model: adapters.Model) -> None:
  """Raises `ConfigError` for a model whose outputs do not fit the loss and targets, a
  callable that fails, a schedule a run cannot follow or an objective its table will
  not have."""
  check_model(plan, model)
  check_callables(plan, model)
  check_eval_params(plan, model)
  check_schedules(plan)
  check_objectives(plan)


def check_schedules(plan: Plan) -> None:
  """Every run's built-in schedule is buildable for the run's own updates (a warmup that
  leaves no step to decay is refused here, not in the middle of `sweep.run`)."""
  cfg = plan.config
  seen = set()
  for run in plan.runs:
    v = run.values
    name = v.get('schedule')
    if not isinstance(name, str) or name not in schedules.SCHEDULES:
      continue  # another kind of schedule: checked where it is built
    key = (name, v.get('warmup'), v.get('decay_rate'), run.total_updates)
    if key in seen:
      continue
    seen.add(key)
    try:
      schedules.make_params(
        name,
        v['learning_rate'],
        run.total_updates,
        decay_rate=v['decay_rate'],
        decay_every=cfg.decay_every,
        warmup=v['warmup'],
      )
    except ValueError as e:
      field, value = ('warmup', v['warmup']) if name == 'warmup_cosine' else ('schedule', name)
      raise config_error(
        field,
        value,
        f'{e} (schedule {name!r} at batch size {v["batch_size"]}, whose runs make '
        f'{run.total_updates} updates)',
      ) from None


def table_columns(plan: Plan) -> list[str]:
  """The numeric columns the results table of `plan` will have."""
  cfg = plan.config
  axes = [a for a in plan.swept if a not in ('optimizer', 'schedule')]
  accuracy = isinstance(plan.loss, str) and plan.loss in losses.CLASSIFICATION
  return columns.numeric(axes, accuracy, bool(cfg.noise_scale), validation=bool(cfg.data.n_val))


def check_objectives(plan: Plan) -> None:
  """The objectives name columns this sweep's table will have (without a validation set
  the default objectives fall back to the training loss)."""
  cfg = plan.config
  numeric = table_columns(plan)
  for column in columns.objectives(cfg.objectives, validation=bool(cfg.data.n_val)):
    if column in numeric:
      continue
    if column in columns.VALIDATION and not cfg.data.n_val:
      reason = (
        'this sweep has no validation set (data.x_val is None), so its table has no such column'
      )
    else:
      reason = "this sweep's table will have no such column"
    raise config_error(
      'objectives', column, f'{reason}; its numeric columns are ' + ', '.join(numeric)
    )


@dataclasses.dataclass(frozen=True)
class _Failure:
  message: str
  error: Exception


@functools.lru_cache(maxsize=64)
def _output_shape(model: adapters.Model, sig: Any, n: int) -> Any:
  """The shape of the model's predictions in training and evaluation mode, traced without
  compiling (memoised: flax traces slowly), or the `_Failure` of the user's model."""
  try:
    # The key is made inside eval_shape: made eagerly, it would compile.
    params, state = model.initial_shapes()
  except Exception as e:  # a user's init_fn may fail in any way: report it as theirs.
    return _Failure(f'init_fn(key) failed: {e}', e)
  x = spec_of(sig, n)
  x_shape = describe_inputs(x)
  try:
    pred, new_state = jax.eval_shape(
      lambda p, s, x: model.apply(p, s, x, True, jax.random.key(0)), params, state, x
    )
  except Exception as e:
    return _Failure(
      f'apply_fn(params, x) failed in training mode on input of shape {x_shape}: {e}', e
    )
  same = jax.tree.structure(new_state) == jax.tree.structure(state) and all(
    (a.shape, a.dtype) == (b.shape, b.dtype)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True)
  )
  if not same:
    return _Failure(
      'training changes the structure or shapes of the model state (variables other than params)',
      None,
    )
  try:
    traced = jax.jit(lambda p, s, x: model.apply(p, s, x, False, None)[0]).trace(params, state, x)
  except Exception as e:
    return _Failure(
      f'apply_fn(params, x) failed in evaluation mode on input of shape {x_shape}: {e}', e
    )
  evaluated = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), traced.out_info)
  _PROBABILITIES[(model, sig)] = _ends_in_softmax(traced.jaxpr.jaxpr)
  # One array, or several (a tuple, list or dict of arrays: a VAE's (recon, mean, logvar)),
  # which a callable loss takes whole.
  for out in (pred, evaluated):
    leaves = jax.tree.leaves(out)
    if not leaves or not all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves):
      return _Failure(
        'the model must return an array, or a tuple, list or dict of arrays; it returned '
        f'{jax.tree.structure(out)}',
        None,
      )
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)  # noqa: E731
  if jax.tree.structure(pred) != jax.tree.structure(evaluated) or shapes(pred) != shapes(evaluated):
    return _Failure(
      f'the model returns {shapes(pred)} in training mode but {shapes(evaluated)} in '
      'evaluation mode',
      None,
    )
  return pred


_PROBABILITIES: dict = {}  # (model, x shape, x dtype) -> whether its outputs end in a softmax


def _ends_in_softmax(jaxpr) -> bool:
  """Whether a jaxpr's one output is `exp(z) / sum(exp(z))` (its outputs are probabilities),
  read off the equations that make it: a div of an exp by a broadcast sum of that exp."""
  producer = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  if len(jaxpr.outvars) != 1 or id(jaxpr.outvars[0]) not in producer:
    return False
  last = producer[id(jaxpr.outvars[0])]
  if last.primitive.name != 'div':
    return False
  numerator, denominator = last.invars
  if (
    getattr(producer.get(id(numerator)), 'primitive', None) is None
    or producer[id(numerator)].primitive.name != 'exp'
  ):
    return False
  eqn = producer.get(id(denominator))
  while eqn is not None and eqn.primitive.name in (
    'broadcast_in_dim',
    'reshape',
    'expand_dims',
    'convert_element_type',
  ):
    eqn = producer.get(id(eqn.invars[0]))
  return eqn is not None and eqn.primitive.name == 'reduce_sum' and eqn.invars[0] is numerator


def check_model(plan: Plan, model: adapters.Model) -> None:
  """Traces (without compiling) one init and one forward pass to check shapes."""
  cfg = plan.config
  data = cfg.data
  x, y = rows(data.x_train, slice(0, 2)), data.y_train[:2]
  pred = _output_shape(model, signature(x), n_rows(x))
  if isinstance(pred, _Failure):
    hint = _channel_hint(x) + adapters.inputs_hint(cfg.model, x)
    raise config_error('model', model.name, pred.message + hint) from pred.error
  if cfg.noise_scale and model.stateful:
    raise config_error(
      'noise_scale',
      True,
      'models with state other than parameters (batch statistics) are not supported: the '
      'noise scale splits each batch in two halves, which would each have statistics of their own',
    )
  if cfg.augment is not None:
    check_augment(cfg.augment, min(plan.batch_sizes), x)
  probabilities = adapters.keras_ends_in_softmax(cfg.model) or _PROBABILITIES.get(
    (model, signature(x))
  )
  if isinstance(plan.loss, str) and plan.loss == 'softmax_cross_entropy' and probabilities:
    raise config_error(
      'loss',
      plan.loss,
      "the model's outputs are probabilities (its last operation is a softmax), and "
      'softmax_cross_entropy applies another softmax to them; return logits (drop the last '
      'softmax), or pass a loss on probabilities (for Keras, the Keras loss itself, e.g. '
      'loss=keras.losses.CategoricalCrossentropy())',
    )
  is_int = np.issubdtype(y.dtype, np.integer)
  if isinstance(plan.loss, str) and not isinstance(pred, jax.ShapeDtypeStruct):
    raise config_error(
      'loss',
      plan.loss,
      f'the model returns several outputs ({_outputs(pred)}) and a named loss takes one array '
      'of predictions; pass a callable loss(outputs, targets) -> (batch,) that takes them whole '
      "(it is given the model's output as the model returns it), or return one array",
    )
  if isinstance(plan.loss, str):
    problem = losses.check_shapes(plan.loss, tuple(pred.shape), tuple(y.shape), is_int)
    if (
      problem
      and plan.loss == 'softmax_cross_entropy'
      and not is_int
      and np.all(np.mod(data.y_train, 1) == 0)
    ):
      problem += (
        '; the targets are whole numbers: class ids are given as integers, e.g. '
        'sweep.data.arrays(x, y.astype(np.int32))'
      )
    if problem:
      problem += _channel_hint(x)
      raise config_error('model', f'outputs of shape {tuple(pred.shape)}', problem)
    for field, labels in (('data.y_train', data.y_train), ('data.y_val', data.y_val)):
      if labels is not None and data.ignore_label is not None:
        labels = labels[labels != data.ignore_label]
      if labels is None or not len(labels):
        continue
      problem = losses.check_labels(plan.loss, labels, int(pred.shape[-1]) if pred.ndim else 1)
      if problem:
        raise config_error(
          field, f'labels in [{float(labels.min()):g}, {float(labels.max()):g}]', problem
        )
  else:
    try:
      out = jax.eval_shape(plan.loss, pred, jax.ShapeDtypeStruct(y.shape, y.dtype))
    except Exception as e:
      raise config_error('loss', plan.loss, f'loss(predictions, targets) failed: {e}') from e
    if isinstance(out, tuple | list) and len(out) == 2:
      if getattr(out[1], 'shape', None) != (len(y),):
        raise config_error(
          'loss',
          plan.loss,
          'a callable loss returning (loss, accuracy) must give one accuracy per example, '
          f'shape (batch,); got {getattr(out[1], "shape", out[1])}',
        )
      out = out[0]
    if getattr(out, 'shape', None) != (len(y),):
      raise config_error(
        'loss',
        plan.loss,
        'a callable loss must return one value per example, shape (batch,); got '
        f'{getattr(out, "shape", out)}',
      )


def _outputs(pred: Any) -> str:
  """The model's several outputs in a message: 'a tuple of 3: (32, 64), (32, 4), (32, 4)'."""
  leaves = jax.tree.leaves(pred)
  kind = type(pred).__name__ if isinstance(pred, tuple | list | dict) else 'pytree'
  return f'a {kind} of {len(leaves)}: ' + ', '.join(str(tuple(a.shape)) for a in leaves)


def _channel_hint(x: np.ndarray) -> str:
  """A likely cause to add to a model's shape error: float inputs (n, H, W) are images
  without a channel axis, which a convolution reads as one unbatched image (its batch
  axis taken for a spatial one)."""
  if is_tree(x):  # several inputs: the first array that looks like such images
    items = x.items() if isinstance(x, dict) else enumerate(x)
    for k, a in items:
      hint = _channel_hint(a)
      if hint:
        return hint.replace('the inputs', f'the inputs[{k!r}]').replace(
          'x[..., None]', 'a[..., None]'
        )
    return ''
  if x.ndim != 3 or not np.issubdtype(x.dtype, np.floating):
    return ''
  shape = '(n, ' + ', '.join(str(d) for d in x.shape[1:]) + ')'
  return (
    f'; if the inputs {shape} are images, they have no channel axis, and a convolution '
    'takes (batch, H, W, channels): give x[..., None] (one channel)'
  )


def check_eval_params(plan: Plan, model: adapters.Model) -> None:
  """Traces the config's `eval_params(opt_state, params)` (compiling nothing) on the state
  of every optimizer of the sweep: it must return arrays of the parameters' structure,
  shapes and dtypes."""
  fn = plan.config.eval_params
  if fn is None:
    return
  name = getattr(fn, '__qualname__', type(fn).__name__)
  params = model.initial_shapes()[0]
  want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
  for family, names in plan.groups:
    run = next(r for r in plan.runs if r.group == (family, names))
    opt = optimizers.make(family, run.hypers)
    try:
      out = jax.eval_shape(lambda p, opt=opt: fn(opt.init(p).inner_state, p), params)
    except Exception as e:  # the researcher's function: report it as theirs
      raise config_error(
        'eval_params',
        name,
        f'eval_params(opt_state, params) failed on the state of optimizer '
        f'{run.values["optimizer"]!r} ({type(e).__name__}: {e}); it is given the state of the '
        'optimizer the factory builds',
      ) from e
    got = jax.tree.map(lambda a: (getattr(a, 'shape', None), str(getattr(a, 'dtype', a))), out)
    if got != want:
      raise config_error(
        'eval_params',
        name,
        f'eval_params(opt_state, params) must return parameters of the structure, shapes and '
        f"dtypes of the model's; under optimizer {run.values['optimizer']!r} it returned "
        f'{jax.tree.structure(out)} (shapes {jax.tree.leaves(got)[:4]}...)',
      )


def check_augment(augment: Callable, batch: int, x: np.ndarray) -> None:
  """Traces `augment(key, x_batch)` (compiling nothing): it must return one array of the
  batch's shape and dtype."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  xb = batch_spec(x, batch)
  name = getattr(augment, '__qualname__', type(augment).__name__)
  try:
    out = jax.eval_shape(augment, key, xb)
  except Exception as e:  # the researcher's function: report it as theirs
    raise config_error(
      'augment',
      name,
      f'augment(key, x_batch) failed on a key and a batch of shape {describe_inputs(xb)} '
      f'({type(e).__name__}: {e})',
    ) from e
  if is_tree(x):  # several inputs: the same structure, shapes and dtypes
    spec = lambda t: jax.tree.map(lambda a: (getattr(a, 'shape', a), getattr(a, 'dtype', a)), t)  # noqa: E731
    if jax.tree.structure(out) != jax.tree.structure(xb) or spec(out) != spec(xb):
      raise config_error(
        'augment',
        name,
        "augment(key, x_batch) must return inputs of the batch's structure, shapes and dtypes "
        f'{describe_inputs(xb)}; got {jax.tree.structure(out)} {jax.tree.leaves(spec(out))}',
      )
    return
  if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != (xb.shape, xb.dtype):
    got = (
      (out.shape, str(out.dtype)) if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
    )
    raise config_error(
      'augment',
      name,
      f"augment(key, x_batch) must return one array of the batch's shape and dtype "
      f'{(xb.shape, str(xb.dtype))}; got {got}',
    )
