"""Checks of a planned sweep that need its model, made by tracing before anything compiles.

`sweep.config.validate` checks the fields on the host (`sweep.checks`) and expands them
into runs; these check what only the model and a trace show: the model's output shapes
against the loss and the targets, the augmentation, the evaluated parameters, the
optimizer factories (traced, and probed for whether they learn) and the schedule
callables.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernels import losses, optimizers, schedules
from sweep import adapters
from sweep.checks import Shown
from sweep.data import batch_spec, describe_inputs, is_tree, n_rows, rows, signature, spec_of
from sweep.errors import config_error
from sweep.expansion import Plan, Run


def check(plan: Plan, model: adapters.Model) -> None:
  """Raises `ConfigError` for a model whose outputs do not fit the loss and targets, or an
  optimizer factory, schedule callable or `eval_params` that fails or trains nothing."""
  check_model(plan, model)
  check_callables(plan, model)
  check_eval_params(plan, model)


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


# ------------------------------------------------ optimizer factories and schedules ----


class LearningRateUnusedWarning(UserWarning):
  """An optimizer factory whose updates do not depend on its learning rate."""


def _check_learns(family: optimizers.Factory, run: Run, shapes: Any, swept: bool) -> None:
  """Refuses a factory whose updates never move the parameters at any learning rate (an
  `optax.inject_hyperparams(...)` inside it keeps the learning rate it was built with), or
  that accumulates gradients (`optax.MultiSteps`) anywhere but around its whole optimizer;
  warns, where its runs sweep the learning rate, of one that moves alike at every rate (a
  learning-rate-free optimizer such as optax.contrib.cocob, or a factory that fixes its
  own)."""
  opt = optimizers.make(family, run.hypers)
  opt_state = jax.eval_shape(opt.init, optimizers.trained_params(opt, shapes))
  found = optimizers.find_states(opt_state, optax.MultiStepsState)
  if found and (family.every_k == 1 or len(found) > 1):
    raise config_error(
      'optimizer',
      Shown(family.label),
      'it holds an optax.MultiSteps inside its chain: the sweep counts parameter updates and '
      'runs the schedule per update only for a factory that returns '
      'optax.MultiSteps(opt, every_k_schedule=k) around its whole optimizer',
    )
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  lr = float(run.values['learning_rate'])
  hypers = {k: jnp.float32(v) for k, v in run.hypers.items()}
  moved = optimizers.probe(family, hypers, params, jnp.array([lr, 2 * lr], jnp.float32))
  leaves = [np.asarray(a) for a in jax.tree.leaves(moved)]
  if any(np.any(a != 0) for a in leaves):
    if swept and all(np.array_equal(a[0], a[1]) for a in leaves):
      warnings.warn(
        LearningRateUnusedWarning(
          f'sweep: optimizer {family.label!r} makes the same updates at learning rates {lr:g} '
          f'and {2 * lr:g}: its learning_rate axis changes nothing for its runs (a '
          'learning-rate-free optimizer, or a factory that does not pass learning_rate on)'
        ),
        stacklevel=2,
      )
    return
  # Its own state (inside the sweep's injection) holds a second injection.
  nested = optimizers.find_states(
    opt_state.inner_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
  )
  cause = (
    'it holds an optax.inject_hyperparams(...) of its own, which keeps the learning rate it '
    'was built with (0 at init) whatever the sweep sets: pass the optax factory itself (e.g. '
    'optimizer=optax.adam), the sweep injects the hyperparameters'
    if nested
    else 'check that the factory builds its optimizer from its learning_rate argument'
  )
  raise config_error(
    'optimizer',
    Shown(family.label),
    f'it trains nothing: three updates at learning rates {lr:g} and {2 * lr:g} leave the '
    f'parameters where they were; {cause}',
  )


def check_callables(plan: Plan, model: Any) -> None:
  """Traces every optimizer factory and schedule callable of `plan` (with `jax.eval_shape`,
  compiling nothing) and raises `ConfigError` for one that fails or returns the wrong thing."""
  f32 = jax.ShapeDtypeStruct((), jnp.float32)
  factories = [g for g in plan.groups if isinstance(g[0], optimizers.Factory)]
  params = model.initial_shapes()[0] if factories else None
  for family, names in factories:
    run = next(r for r in plan.runs if r.group == (family, names))
    lr = float(run.values['learning_rate'])
    shown = ', '.join([repr(lr)] + [f'{k}={v!r}' for k, v in run.hypers.items()])
    try:
      made = family.fn(lr, **run.hypers)
    except Exception as e:  # the researcher's code: report it as theirs
      raise config_error(
        'optimizer', Shown(family.label), f'factory({shown}) failed: {type(e).__name__}: {e}'
      ) from e
    if isinstance(made, optax.MultiSteps):
      made = made.gradient_transformation()  # its k is counted (`checks.accumulation`)
    if not isinstance(made, optax.GradientTransformation):
      raise config_error(
        'optimizer',
        Shown(family.label),
        f'a factory must return an optax.GradientTransformation; factory({shown}) returned '
        f'{type(made).__name__}',
      )

    def step(p, hp, lr, family=family):
      opt = optimizers.make(family, hp)
      trained = optimizers.trained_params(opt, p)  # a lookahead's LookaheadParams
      state = optimizers.with_learning_rate(opt.init(trained), lr)
      updates, _ = opt.update(p, state, trained)
      return updates, trained

    try:
      out, trained = jax.eval_shape(step, params, {k: f32 for k in names}, f32)
    except Exception as e:
      raise config_error(
        'optimizer',
        Shown(family.label),
        f'it fails with its learning rate and hyperparameters traced ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}); they are traced arrays so that one program '
        'serves every '
        'value: compute with them in jnp, not in a Python if or float()',
      ) from e
    if jax.tree.structure(out) != jax.tree.structure(trained):
      raise config_error(
        'optimizer', Shown(family.label), 'its updates must have the structure of the parameters'
      )
    rates = {r.values['learning_rate'] for r in plan.runs if r.group == (family, names)}
    _check_learns(family, run, params, len(rates) > 1)

  for fn in plan.custom_schedules:
    users = [r for r in plan.runs if r.schedule is fn]
    label = users[0].values['schedule']
    for total in sorted({r.total_updates for r in users}):
      try:
        out = jax.eval_shape(
          lambda lr, c, fn=fn, total=total: schedules.custom_value(fn, lr, total, c),
          f32,
          jax.ShapeDtypeStruct((), jnp.int32),
        )
      except Exception as e:
        raise config_error(
          'schedule',
          Shown(label),
          f'schedule(learning_rate, total_updates={total}) failed with the learning rate traced '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); expected an optax '
          'schedule '
          '(a function of the update count) or a number, computed with jnp',
        ) from e
      if out.shape != ():
        raise config_error(
          'schedule',
          Shown(label),
          f'schedule(learning_rate, total_updates={total})(count) must be a scalar; it has shape '
          f'{out.shape}',
        )
