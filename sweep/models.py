"""Models for sweeps: layers laid out for the run axis, and small networks built from them.

Any other model (flax linen or nnx, equinox, Keras, plain functions) is turned into the
functions the engine trains by `sweep.adapters`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sweep.errors import config_error

__all__ = [
  'ACTIVATIONS',
  'CNN',
  'Conv',
  'Dense',
  'Linear',
  'MLP',
  'SizedToData',
  'cnn',
  'linear',
  'mlp',
  'to_functions',
]

InitFn = Callable[[jax.Array], Any]
ApplyFn = Callable[[Any, jax.Array], jax.Array]

# Activation names accepted by `MLP`; names rather than functions keep modules hashable and
# their configs printable.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'relu': nn.relu,
  'gelu': nn.gelu,
  'silu': nn.silu,
  'swish': nn.swish,
  'tanh': jnp.tanh,
  'sigmoid': nn.sigmoid,
  'elu': nn.elu,
  'leaky_relu': nn.leaky_relu,
  'softplus': nn.softplus,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise config_error('model.activation', name, f'one of {", ".join(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def _lecun_normal_transposed(
  key: jax.Array, shape: tuple[int, int], dtype=jnp.float32
) -> jax.Array:
  """nn.Dense's kernel initializer drawn for the (inputs, outputs) shape, then transposed."""
  return nn.initializers.lecun_normal()(key, shape[::-1], dtype).T


class Dense(nn.Module):
  """A dense layer whose weight is stored (outputs, inputs), like `torch.nn.Linear`.

  The engine holds every run's weights on a leading run axis, `(runs, outputs, inputs)`,
  and the runs of a seed read the same batch. With this layout all their outputs are
  one matrix product, `(runs * outputs, inputs) @ (inputs, batch)`, on the weights as
  they lie in memory, and so is the weight gradient. Flax's `nn.Dense` stores
  `(inputs, outputs)`: `(runs, inputs, outputs)` is not a matrix of either shape, so
  XLA copies (transposes) every run's weights at every step, or loops over runs
  (docs/performance.md, change 3).

  Initialized as `nn.Dense` (LeCun normal over the inputs, zero bias): the weight is
  the transpose of the kernel `nn.Dense` draws from the same key.

  Attributes:
    features: the output width.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param('weight', _lecun_normal_transposed, (self.features, x.shape[-1]))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    # (features, *batch): the weight is the left operand, contracted on its last axis.
    y = jax.lax.dot_general(weight, x, (((1,), (x.ndim - 1,)), ((), ())))
    return jnp.moveaxis(y, 0, -1) + bias


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """nn.Conv's kernel initializer drawn for its (*window, in, out) shape, moved to
  (out, *window, in)."""
  out, *window, cin = shape
  kernel = nn.initializers.lecun_normal()(key, (*window, cin, out), dtype)
  return jnp.moveaxis(kernel, -1, 0)


def _patches(x: jax.Array, window: tuple[int, ...], stride: int, padding: str) -> jax.Array:
  """(batch, *positions, *window, channels): each output position's input window.

  Strided slices of the padded input, one per window offset: plain copies, where
  `lax.conv_general_dilated_patches` is a grouped convolution (slow on XLA's CPU).
  """
  spatial = x.shape[1:-1]
  if padding == 'SAME':
    out = [-(-n // stride) for n in spatial]
    total = [max((o - 1) * stride + k - n, 0) for o, k, n in zip(out, window, spatial, strict=True)]
    x = jnp.pad(x, [(0, 0)] + [(t // 2, t - t // 2) for t in total] + [(0, 0)])
  else:
    out = [(n - k) // stride + 1 for n, k in zip(spatial, window, strict=True)]
  slices = []
  for offset in np.ndindex(*window):
    index = tuple(
      slice(o, o + (m - 1) * stride + 1, stride) for o, m in zip(offset, out, strict=True)
    )
    slices.append(x[(slice(None),) + index])
  stacked = jnp.stack(slices, axis=-2)  # (batch, *positions, prod(window), channels)
  return stacked.reshape(stacked.shape[:-2] + tuple(window) + stacked.shape[-1:])


class Conv(nn.Module):
  """A convolution computed as input windows times a weight matrix, like `Dense`.

  The weight is stored `(features, *kernel_size, in_channels)`. Under the engine's run
  axis, a convolution with a weight per run becomes a grouped convolution (one group
  per run), which XLA's CPU backend runs slowly. Here the windows are cut from the
  input once (shared by the runs that read the same input) and every run's weight
  multiplies them in one matrix product (shared input) or one batched product (inputs
  of their own). Initialized as `nn.Conv`: the weight is the kernel `nn.Conv` draws from
  the same key, its output axis moved first.

  Attributes:
    features: output channels.
    kernel_size: the window, one entry per spatial dimension.
    strides: the stride in every spatial dimension.
    padding: 'SAME' (as XLA pads) or 'VALID'.
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: int = 1
  padding: str = 'SAME'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding not in ('SAME', 'VALID'):
      raise config_error('model.padding', self.padding, "'SAME' or 'VALID'")
    weight = self.param('weight', _conv_init, (self.features, *self.kernel_size, x.shape[-1]))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    patches = _patches(x, tuple(self.kernel_size), self.strides, self.padding)
    k = weight.ndim - 1  # the window and channel axes, contracted
    y = jax.lax.dot_general(
      weight,
      patches,
      ((tuple(range(1, k + 1)), tuple(range(patches.ndim - k, patches.ndim))), ((), ())),
    )  # (features, batch, *positions)
    return jnp.moveaxis(y, 0, -1) + bias


class MLP(nn.Module):
  """A multilayer perceptron on flattened inputs.

  Dense layers of widths `hidden` with `activation` between them, then a linear Dense
  layer of width `outputs`. The outputs are logits (no softmax: the loss applies it) or
  regression predictions. The default on MNIST is 784 -> 10 (relu) -> 10, 7960 parameters.
  The layers are `Dense` (weights stored (outputs, inputs)).

  Attributes:
    hidden: widths of the hidden layers; () gives a linear model.
    outputs: width of the output layer.
    activation: a name in `ACTIVATIONS`.
  """

  hidden: Sequence[int] = (10,)
  outputs: int = 10
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation(self.activation)
    x = _flatten(x)
    for width in self.hidden:
      x = act(Dense(width)(x))
    return Dense(self.outputs)(x)


class CNN(nn.Module):
  """A small convolutional network for 1-D signals or 2-D images.

  Each entry of `channels` is a stride-2 convolution with SAME padding and relu (kernel 5
  for signals, 3x3 for images), then the feature map is flattened into a relu Dense layer
  of width `hidden` and a linear Dense layer of width `outputs` (logits).

  Inputs are read by their rank:
  - (batch, length): a one-channel signal, like MNIST-1D's 40 samples;
  - (batch, H, W): a one-channel image, like 8x8 digits or 28x28 MNIST;
  - (batch, H, W, C): an image with C channels.
  (batch, length, channels) signals need `spatial_dims=1`, since by default a rank-3 input
  is an image. A flat vector is never reshaped into an image: a (batch, 784) MNIST input is
  convolved as a signal of length 784, so load images unflattened
  (`data.mnist(path, flatten=False)`, `data.digits(flatten=False)`).

  With the defaults on MNIST-1D this has about 26.5k parameters; the MNIST-1D paper's CNN
  has about 5k, close to `channels=(16, 16), hidden=24` (about 5.5k).

  Attributes:
    channels: output channels of each convolution.
    outputs: width of the output layer.
    hidden: width of the hidden Dense layer; None to go straight to the output layer.
    spatial_dims: 1 or 2 to fix how inputs are read, None to infer it from their rank.
  """

  channels: Sequence[int] = (32, 32)
  outputs: int = 10
  hidden: int | None = 64
  spatial_dims: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dims = self.spatial_dims
    if dims is None:
      dims = 1 if x.ndim == 2 else 2
    if dims not in (1, 2):
      raise config_error('model.spatial_dims', self.spatial_dims, '1, 2 or None')
    if x.ndim == dims + 1:
      # Add the channel axis convolutions expect.
      x = x[..., None]
    if x.ndim != dims + 2:
      raise config_error(
        'model',
        f'CNN(spatial_dims={self.spatial_dims}) on inputs of shape {tuple(x.shape)}',
        'inputs of shape (batch, length[, channels]) for signals or (batch, H, W[, C]) for images',
      )
    kernel = (5,) if dims == 1 else (3, 3)
    for c in self.channels:
      x = nn.relu(Conv(c, kernel, strides=2, padding='SAME')(x))
    x = _flatten(x)
    if self.hidden:
      x = nn.relu(Dense(self.hidden)(x))
    return Dense(self.outputs)(x)


class Linear(nn.Module):
  """One `Dense` layer (weights and bias) on the flattened input.

  Attributes:
    outputs: width of the output.
  """

  outputs: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Dense(self.outputs)(_flatten(x))


@dataclasses.dataclass(frozen=True)
class SizedToData:
  """A model whose output width is chosen from the data when the sweep starts.

  Attributes:
    make: builds the model (anything `to_functions` accepts) for an output width: the
      number of classes, or the number of regression target columns.
  """

  make: Callable[[int], Any]


@dataclasses.dataclass(frozen=True)
class _WithOutputs:
  """`make` for the built-in models; compares by value, so equal configs share compiles."""

  cls: type[nn.Module]
  fields: tuple[tuple[str, Any], ...]

  def __call__(self, outputs: int) -> nn.Module:
    return self.cls(outputs=outputs, **dict(self.fields))

  def __repr__(self) -> str:
    args = ', '.join(f'{k}={v!r}' for k, v in self.fields)
    return f'{self.cls.__name__}({args}, outputs=<from data>)'


def _check_width(field: str, value: Any, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise config_error(field, value, 'a positive integer' + (' or None' if allow_none else ''))


def _check_widths(field: str, values: Any) -> tuple[int, ...]:
  if isinstance(values, int | np.integer) and not isinstance(values, bool):
    values = (values,)
  if not isinstance(values, Sequence) or isinstance(values, str):
    raise config_error(field, values, 'a sequence of positive integers')
  for v in values:
    _check_width(field, v)
  # Tuples keep the module hashable.
  return tuple(int(v) for v in values)


def _sized(cls: type[nn.Module], outputs: int | None, **fields: Any) -> nn.Module | SizedToData:
  if outputs is None:
    return SizedToData(_WithOutputs(cls, tuple(fields.items())))
  _check_width('model.outputs', outputs)
  return cls(outputs=int(outputs), **fields)


def mlp(
  hidden: Sequence[int] = (10,),
  outputs: int | None = None,
  activation: str = 'relu',
) -> MLP | SizedToData:
  """An `MLP`, its output width taken from the data unless `outputs` is given.

  Args:
    hidden: widths of the hidden layers.
    outputs: output width; None to use the number of classes or target columns.
    activation: a name in `ACTIVATIONS`.

  Returns:
    An `MLP` when outputs is given, else a `SizedToData` that builds one.
  """
  hidden = _check_widths('model.hidden', hidden)
  _activation(activation)
  return _sized(MLP, outputs, hidden=hidden, activation=activation)


def cnn(
  channels: Sequence[int] = (32, 32),
  hidden: int | None = 64,
  outputs: int | None = None,
  spatial_dims: int | None = None,
) -> CNN | SizedToData:
  """A `CNN`, its output width taken from the data unless `outputs` is given.

  Args:
    channels: output channels of each stride-2 convolution.
    hidden: width of the hidden Dense layer; None for none.
    outputs: output width; None to use the number of classes or target columns.
    spatial_dims: 1 (signals) or 2 (images), or None to infer it from the input rank.

  Returns:
    A `CNN` when outputs is given, else a `SizedToData` that builds one.
  """
  channels = _check_widths('model.channels', channels)
  _check_width('model.hidden', hidden, allow_none=True)
  if spatial_dims not in (None, 1, 2):
    raise config_error('model.spatial_dims', spatial_dims, '1, 2 or None')
  return _sized(CNN, outputs, channels=channels, hidden=hidden, spatial_dims=spatial_dims)


def linear(outputs: int | None = None) -> Linear | SizedToData:
  """A `Linear` model, its output width taken from the data unless `outputs` is given.

  Args:
    outputs: output width; None to use the number of classes or target columns.

  Returns:
    A `Linear` when outputs is given, else a `SizedToData` that builds one.
  """
  return _sized(Linear, outputs)


# ---------------------------------------------------------------------------------------------
# The adapter (sweep.adapters) for stateless models, as pure functions


def to_functions(
  model: Any, example_x: np.ndarray, output_dim: int | None
) -> tuple[InitFn, ApplyFn]:
  """`(init_fn(key) -> params, apply_fn(params, x) -> predictions)` for a model without
  state other than its parameters (see `sweep.adapters.adapt` for every model).

  Raises:
    ConfigError: the model is of no accepted form, or carries state (batch statistics).
  """
  from sweep import adapters

  if isinstance(model, tuple) and len(model) == 2 and all(callable(f) for f in model):
    return model
  adapted = adapters.adapt(model, example_x, output_dim)
  if adapted.stateful:
    state = adapted.initial_shapes()[1]
    kinds = sorted({type(v).__name__ for v in _nnx_variables(model)} or set(state))
    raise config_error(
      'model',
      adapters.describe(model),
      f'pure functions of a model without state other than its parameters (found {kinds}); '
      'the engine trains such models through sweep.adapters.adapt',
    )

  def init_fn(key: jax.Array) -> Any:
    return adapted.init(key)[0]

  def apply_fn(params: Any, x: jax.Array) -> jax.Array:
    return adapted.apply(params, {}, x, False, None)[0]

  return init_fn, apply_fn


check_width = _check_width


def _nnx_variables(model: Any) -> list:
  """The non-parameter variables of an nnx model (class or instance), for messages."""
  from flax import nnx

  from sweep import adapters

  if not (adapters._is_nnx_factory(model) or isinstance(model, nnx.Module)):
    return []
  module = (
    model if isinstance(model, nnx.Module) else nnx.eval_shape(lambda: model(rngs=nnx.Rngs(0)))
  )
  rest = nnx.split(module, nnx.Param, nnx.RngState, ...)[3]
  return [v for _, v in nnx.to_flat_state(rest)]
