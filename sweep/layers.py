"""Flax's own layers at the engine's speed under the run axis.

The engine trains the runs of a compile group at once: one run's step, vmapped over
runs. Flax's standard layers are written for one run, and two of them map badly onto
the products a vmapped step makes (measurements in docs/performance.md):

- **Convolutions.** Under vmap a convolution whose kernel differs per run becomes a
  grouped convolution, one group per run, which XLA's CPU backend runs at a few GFLOP/s
  (and XLA's CPU convolution is slow at these sizes even for one run). Inside
  `fast_layers()`, `nn.Conv` and `nnx.Conv` are computed as the input windows, cut
  with strided slices, times the kernel as a matrix: one matrix product, shared by
  every run that reads the same input. `nn.ConvTranspose`, `nnx.ConvTranspose` and a
  `Conv` with input dilation convolve an input dilated by zeros: they are computed
  phase by phase of the strides, each output phase a convolution of the undilated input
  by the kernel taps that land on it (no zero multiplied), the phases interleaved.
- **Dense layers.** `nn.Dense`, `nn.DenseGeneral`, `nnx.Linear` and `nnx.LinearGeneral`
  store their kernel `(inputs, outputs)`. The runs that read the same input (every run
  of a seed reads the same batch) would make one matrix product if their kernels were
  stored `(outputs, inputs)`: `(runs, outputs, inputs)` is then the matrix
  `(runs * outputs, inputs)`, forward and for the weight gradient, with no copy. Under
  vmap, an `(inputs, outputs)` kernel's gradient also comes out transposed, and the
  optimizer then reads it with strides. A `Layout` holds the kernels `(1, *outputs,
  *inputs)` while a training segment runs (the leading axis of length 1 marks the
  layout) and `fast_layers()` computes the layers from it. Outside a segment every
  parameter is in the module's own layout.

Every other layer, option or input (custom `dot_general`, input dilation with strides,
`batch_dims`, boxed parameters, subclasses of these layers, ...) runs flax's own code,
unchanged.
`slow_layers` names what remains slow under the run axis, for the engine's warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.linen.linear import canonicalize_padding
from jax import lax

__all__ = ['Layout', 'SlowLayer', 'SlowLayerWarning', 'fast_layers', 'plan_layout', 'slow_layers']

# A sentinel returned by the implementations below where flax's own code must run.
_FALLBACK = object()

# Set while `plan_layout` traces a model: dense products are then tagged in the jaxpr.
_RECORDING = contextvars.ContextVar('sweep_layers_recording', default=False)
# Set inside `fast_layers()`: the patched nnx methods read it (linen uses its own stack).
_ACTIVE = contextvars.ContextVar('sweep_layers_active', default=False)

_TAG = '_sweep_dense_product_'
# Set while `slow_layers` traces a model: the fast convolutions' products are then tagged.
_NAMING = contextvars.ContextVar('sweep_layers_naming', default=False)
_CONV_TAG = '_sweep_conv_windows_'


# ---------------------------------------------------------------- products ----


def _tuple(x: Any, n: int) -> tuple[int, ...]:
  if x is None:
    x = 1
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(sorted(a if a >= 0 else ndim + a for a in axes))


@functools.cache
def _tagged(n_in: int) -> Callable:
  """flax's own dense product, as a jitted call whose name carries `n_in` in the jaxpr."""

  def product(inputs, kernel, bias, axis, n_features, promote, precision, kwargs):
    inputs, kernel, bias = promote(inputs, kernel, bias)
    y = lax.dot_general(
      inputs, kernel, ((axis, tuple(range(n_in))), ((), ())), precision=precision, **dict(kwargs)
    )
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - n_features) + bias.shape)
    return y

  product.__name__ = f'{_TAG}{n_in}'
  return jax.jit(product, static_argnums=(3, 4, 5, 6, 7))


def _dense(inputs, kernel, bias, *, axis, n_features, promote, precision, kwargs=()):
  """What flax's Dense and DenseGeneral (without batch dims) compute.

  From a kernel in the fast layout `(1, *features, *inputs)`; in the module's layout,
  `_FALLBACK` (flax's code is the reference), except while `plan_layout` traces, where
  the product is tagged so that the plan can see which inputs and kernels it reads.

  Args:
    axis: the contracted axes of `inputs`.
    n_features: the number of output feature axes.
    promote: `(inputs, kernel, bias) -> (inputs, kernel, bias)`, the module's dtype rule.
    kwargs: extra dot_general keyword arguments, as a tuple of pairs.
  """
  if not isinstance(kernel, jax.Array | np.ndarray):
    return _FALLBACK
  axis = _normalize_axes(axis, inputs.ndim)
  n_in = len(axis)
  in_shape = tuple(inputs.shape[a] for a in axis)
  if kernel.ndim == n_in + n_features and kernel.shape[:n_in] == in_shape:
    if _RECORDING.get():
      return _tagged(n_in)(inputs, kernel, bias, axis, n_features, promote, precision, kwargs)
    return _FALLBACK
  if (
    kernel.ndim != 1 + n_features + n_in
    or kernel.shape[0] != 1
    or kernel.shape[1 + n_features :] != in_shape
  ):
    return _FALLBACK  # neither layout: flax's own code raises its error
  inputs, kernel, bias = promote(inputs, kernel, bias)
  weight = kernel.reshape(kernel.shape[1:])
  # (*features, *other input axes): the weight is the left operand, contracted on its
  # trailing axes, so the runs of a seed fold into one matrix (see the module docstring).
  y = lax.dot_general(
    weight,
    inputs,
    ((tuple(range(n_features, n_features + n_in)), axis), ((), ())),
    precision=precision,
    **dict(kwargs),
  )
  y = jnp.transpose(y, tuple(range(n_features, y.ndim)) + tuple(range(n_features)))
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - n_features) + bias.shape)
  return y


def _windows(x, window, strides, padding, dilation):
  """(batch, *positions, prod(window), channels): each output position's input window,
  as XLA's convolution reads it (padding as `lax.conv_general_dilated` takes it)."""
  spatial = x.shape[1:-1]
  dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation, strict=True)]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(spatial, dilated, strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  x = lax.pad(
    x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
  )
  out = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], dilated, strides, strict=True)]
  if any(o < 1 for o in out):
    return None
  # Strided slices, one per window offset: plain copies, where
  # `lax.conv_general_dilated_patches` is itself a grouped convolution.
  slices = []
  for offset in np.ndindex(*window):
    begin = tuple(o * d for o, d in zip(offset, dilation, strict=True))
    end = tuple(b + (m - 1) * s + 1 for b, m, s in zip(begin, out, strides, strict=True))
    start, limit = (0, *begin, 0), (x.shape[0], *end, x.shape[-1])
    slices.append(lax.slice(x, start, limit, (1,) + tuple(strides) + (1,)))
  return jnp.stack(slices, axis=-2)


def _conv_product(patches, kernel, groups, precision, kwargs=()):
  """The windows (batch, *positions, window, channels) times the kernel: (batch, *positions,
  features)."""
  window, channels = patches.shape[-2:]
  features = kernel.shape[-1]
  kwargs = dict(kwargs)
  if groups == 1:
    weight = kernel.reshape(window * channels, features)
    p = patches.reshape(patches.shape[:-2] + (window * channels,))
    # The windows as the left operand: the output comes channels last, as flax's, with no
    # transpose, and under vmap XLA reads the windows as they lie (docs/performance.md).
    y = lax.dot_general(p, weight, (((p.ndim - 1,), (0,)), ((), ())), precision=precision, **kwargs)
  else:
    c, f = channels // groups, features // groups
    p = patches.reshape(patches.shape[:-1] + (groups, c))  # (batch, *positions, window, groups, c)
    weight = kernel.reshape(window, c, groups, f)
    k = p.ndim - 3  # the window axis of p
    y = lax.dot_general(
      weight, p, (((0, 1), (k, k + 2)), ((2,), (k + 1,))), precision=precision, **kwargs
    )
    # (groups, f, batch, *positions) -> (batch, *positions, groups * f)
    y = jnp.moveaxis(y, (0, 1), (-2, -1))
    y = y.reshape(y.shape[:-2] + (features,))
  return y


@functools.cache
def _named_conv(nd: int) -> Callable:
  """`_conv_product` as a jitted call whose name carries `nd` in the jaxpr."""

  def product(patches, kernel, groups, precision, kwargs):
    return _conv_product(patches, kernel, groups, precision, kwargs)

  product.__name__ = f'{_CONV_TAG}{nd}'
  return jax.jit(product, static_argnums=(2, 3, 4))


def _conv_args(inputs, kernel, kernel_size, strides, padding, kernel_dilation):
  """The options flax's Conv and ConvTranspose read, as they read them: (the inputs with
  one batch axis, the batch axes they had, kernel size, strides, padding (canonical),
  kernel dilation), or None where flax's own code must run."""
  if not isinstance(kernel, jax.Array | np.ndarray):
    return None
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  nd = len(kernel_size)
  strides, kernel_dilation = _tuple(strides, nd), _tuple(kernel_dilation, nd)
  batch_axes = inputs.ndim - (nd + 1)
  if batch_axes < 0 or min(strides + kernel_dilation, default=1) < 1:
    return None
  batch_shape = inputs.shape[:batch_axes]
  inputs = jnp.reshape(inputs, (-1,) + inputs.shape[batch_axes:])
  try:
    padding = canonicalize_padding(padding, nd)
  except ValueError:
    return None
  return inputs, batch_shape, kernel_size, strides, padding, kernel_dilation


def _conv(
  inputs,
  kernel,
  bias,
  *,
  kernel_size,
  strides,
  padding,
  input_dilation,
  kernel_dilation,
  groups,
  mask,
  promote,
  precision,
  kwargs=(),
):
  """What flax's Conv (linen and nnx) computes, as input windows times a matrix."""
  args = _conv_args(inputs, kernel, kernel_size, strides, padding, kernel_dilation)
  if args is None:
    return _FALLBACK
  inputs, batch_shape, kernel_size, strides, padding, kernel_dilation = args
  nd = len(kernel_size)
  input_dilation = _tuple(input_dilation, nd)
  dilated_input = any(d != 1 for d in input_dilation)
  if dilated_input and (any(s != 1 for s in strides) or groups != 1):
    return _FALLBACK  # strides or groups on a dilated input: flax's own
  if dilated_input and isinstance(padding, str):
    return _FALLBACK  # lax refuses a string padding with input dilation: flax's own error
  if padding in ('CIRCULAR', 'REFLECT'):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    inputs = jnp.pad(inputs, pads, mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding])
    padding = 'VALID'
  elif padding == 'CAUSAL':
    if nd != 1:
      return _FALLBACK
    inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = 'VALID'
  elif isinstance(padding, str) and padding not in ('SAME', 'SAME_LOWER', 'VALID'):
    return _FALLBACK
  channels = inputs.shape[-1]
  if channels % groups or kernel.shape != kernel_size + (channels // groups, kernel.shape[-1]):
    return _FALLBACK
  if kernel.shape[-1] % groups:
    return _FALLBACK
  if mask is not None:
    if mask.shape != kernel.shape:
      return _FALLBACK
    kernel = kernel * mask
  inputs, kernel, bias = promote(inputs, kernel, bias)
  if dilated_input:  # the input dilated: phase by phase, as a transposed convolution
    y = _transposed(inputs, kernel, input_dilation, padding, kernel_dilation, precision, kwargs)
    if y is None:
      return _FALLBACK
  else:
    patches = _windows(inputs, kernel_size, strides, padding, kernel_dilation)
    if patches is None:
      return _FALLBACK
    if _NAMING.get():  # the product, tagged for `slow_layers` with the spatial dims
      y = _named_conv(nd)(patches, kernel, groups, precision, tuple(kwargs))
    else:
      y = _conv_product(patches, kernel, groups, precision, kwargs)
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return jnp.reshape(y, batch_shape + y.shape[1:])


def _transpose_pads(window, strides, padding) -> list[tuple[int, int]] | None:
  """The padding of the dilated input `lax.conv_transpose` convolves (its
  `_conv_transpose_padding` for 'SAME' and 'VALID'; pairs as given), or None."""
  if not isinstance(padding, str):
    return [tuple(p) for p in padding]
  if padding not in ('SAME', 'VALID'):
    return None
  pads = []
  for k, s in zip(window, strides, strict=True):
    if padding == 'SAME':
      total, lo = k + s - 2, (k - 1 if s > k - 1 else -(-(k + s - 2) // 2))
    else:
      total, lo = k + s - 2 + max(k - s, 0), k - 1
    pads.append((lo, total - lo))
  return pads


def _phase(k: int, s: int, d: int, lo: int, r: int) -> tuple[int, int, int, int, int] | None:
  """Which taps of a kernel axis (size `k`, dilation `d`) output phase `r` of stride `s`
  reads, for an input dilated by `s` and padded by `lo` in front: (first tap, taps, step
  between taps, their dilation on the undilated input, the first tap's input offset), or
  None where no tap lands on an input position."""
  taps = [t for t in range(k) if (r + t * d - lo) % s == 0]
  if not taps:
    return None
  g = np.gcd(s, d)
  return taps[0], len(taps), s // g, d // g, (r + taps[0] * d - lo) // s


def _transposed(x, kernel, strides, pads, dilation, precision, kwargs=()):
  """`lax.conv_general_dilated(x, kernel, (1, ...), pads, lhs_dilation=strides,
  rhs_dilation=dilation)` (channels last, kernel `(*window, inputs, features)`), as
  `lax.conv_transpose` computes it, without the zeros of the dilated input: output
  position `q * s + r` reads only the taps landing on input positions, the same taps for
  every `q` of phase `r`, so each phase is a convolution of `x` itself by those taps
  (windows times one product), and the phases are interleaved. None where the output is
  empty or no phase reads the input."""
  nd = len(strides)
  window = kernel.shape[:nd]
  sizes = x.shape[1:-1]
  out = [
    (n - 1) * s + 1 + lo + hi - (k - 1) * d
    for n, s, (lo, hi), k, d in zip(sizes, strides, pads, window, dilation, strict=True)
  ]
  if any(o < 1 for o in out):
    return None
  q = [-(-o // s) for o, s in zip(out, strides, strict=True)]  # positions per phase, at most
  phases: dict[tuple[int, ...], Any] = {}
  for r in np.ndindex(*strides):
    axes = [
      _phase(k, s, d, lo, ri)
      for k, s, d, (lo, _), ri in zip(window, strides, dilation, pads, r, strict=True)
    ]
    if any(a is None for a in axes) or any(ri >= o for ri, o in zip(r, out, strict=True)):
      continue  # reads no input (zeros), or lies past the output
    taps = tuple(slice(t, t + (m - 1) * step + 1, step) for t, m, step, _, _ in axes)
    sub = kernel[taps]
    # q windows from the first tap's offset; past the input they read the padding's zeros,
    # past the phase's own outputs they are cut off below.
    padding = [
      (-c, qi - 1 + (m - 1) * dd + 1 - n + c)
      for (_, m, _, dd, c), qi, n in zip(axes, q, sizes, strict=True)
    ]
    patches = _windows(x, sub.shape[:nd], (1,) * nd, padding, [a[3] for a in axes])
    if patches is None:
      return None
    # Untagged for `slow_layers`: on an input of each run's own too, faster than XLA's
    # transposed convolution one run at a time (docs/performance.md).
    phases[r] = _conv_product(patches, sub, 1, precision, kwargs)
  if not phases:
    return None
  some = next(iter(phases.values()))
  ys = [phases.get(r, jnp.zeros_like(some)) for r in np.ndindex(*strides)]
  if len(ys) == 1:
    y = ys[0]
  else:
    # (*strides, batch, *q, features) -> (batch, q1, s1, q2, s2, ..., features): interleaved.
    y = jnp.stack(ys).reshape(tuple(strides) + some.shape)
    perm = (nd,) + tuple(a for i in range(nd) for a in (nd + 1 + i, i)) + (2 * nd + 1,)
    y = jnp.transpose(y, perm).reshape(
      (some.shape[0],) + tuple(qi * s for qi, s in zip(q, strides, strict=True)) + some.shape[-1:]
    )
  return y[(slice(None),) + tuple(slice(0, o) for o in out)]


def _circular(y, sizes, strides, transpose_kernel):
  """flax's ConvTranspose with CIRCULAR padding, after its VALID convolution: the output
  padded to whole periods (the input's size times the stride) and wrapped around them."""
  periods = [n * s for n, s in zip(sizes, strides, strict=True)]
  diffs = [-(o - p) % (2 * p) for o, p in zip(y.shape[1:-1], periods, strict=True)]
  if transpose_kernel:
    pads = [(d // 2, (d + 1) // 2) for d in diffs]
  else:
    pads = [((d + 1) // 2, d // 2) for d in diffs]
  y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
  for i in range(1, y.ndim - 1):
    y = y.reshape(y.shape[:i] + (-1, periods[i - 1]) + y.shape[i + 1 :]).sum(axis=i)
  return y


def _conv_transpose(
  inputs,
  kernel,
  bias,
  *,
  kernel_size,
  strides,
  padding,
  kernel_dilation,
  transpose_kernel,
  mask,
  promote,
  precision,
  kwargs=(),
):
  """What flax's ConvTranspose (linen and nnx) computes, phase by phase (`_transposed`)."""
  args = _conv_args(inputs, kernel, kernel_size, strides, padding, kernel_dilation)
  if args is None:
    return _FALLBACK
  inputs, batch_shape, kernel_size, strides, padding, kernel_dilation = args
  nd = len(kernel_size)
  circular = padding == 'CIRCULAR'
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
  pads = _transpose_pads(dilated, strides, 'VALID' if circular else padding)
  if pads is None or len(pads) != nd:
    return _FALLBACK
  # (*window, inputs, features), or (*window, features, inputs) with transpose_kernel.
  reads = kernel.shape[-1] if transpose_kernel else kernel.shape[-2]
  if kernel.ndim != nd + 2 or kernel.shape[:nd] != kernel_size or reads != inputs.shape[-1]:
    return _FALLBACK
  if mask is not None:
    if mask.shape != kernel.shape:
      return _FALLBACK
    kernel = kernel * mask
  inputs, kernel, bias = promote(inputs, kernel, bias)
  if transpose_kernel:  # as lax.conv_transpose: spatial axes flipped, inputs and outputs swapped
    kernel = jnp.swapaxes(jnp.flip(kernel, tuple(range(nd))), -1, -2)
  y = _transposed(inputs, kernel, strides, pads, kernel_dilation, precision, kwargs)
  if y is None:
    return _FALLBACK
  if circular:
    y = _circular(y, inputs.shape[1:-1], strides, transpose_kernel)
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return jnp.reshape(y, batch_shape + y.shape[1:])


# ------------------------------------------------------------------ linen ----


def _linen_params(module: nn.Module, *names: str) -> tuple[Any, ...] | None:
  """The module's parameters, or None where they cannot be read as plain arrays
  (initialising, a mutable params collection)."""
  if module.scope is None or module.is_initializing() or module.is_mutable_collection('params'):
    return None
  if not module.has_variable('params', names[0]):
    return None
  return tuple(
    module.get_variable('params', n) if module.has_variable('params', n) else None for n in names
  )


def _element_type(module) -> tuple:
  """The product's keyword arguments from a layer's `preferred_element_type` (nnx's layers
  and linen's ConvTranspose have one)."""
  preferred = getattr(module, 'preferred_element_type', None)
  return () if preferred is None else (('preferred_element_type', preferred),)


def _linen_promote(module):
  return lambda *a: tuple(module.promote_dtype(*a, dtype=module.dtype))


def _linen_dense(module: nn.Dense, inputs):
  return _linen_product(module, inputs, axis=(-1,), n_features=1)


def _linen_dense_general(module: nn.DenseGeneral, inputs):
  if tuple(_tuple_of(module.batch_dims)):
    return _FALLBACK
  n_features = len(_tuple_of(module.features))
  return _linen_product(module, inputs, axis=_tuple_of(module.axis), n_features=n_features)


def _linen_product(module, inputs, axis, n_features):
  """A linen Dense or DenseGeneral's product by `_dense`, or `_FALLBACK` to flax's code."""
  if module.dot_general is not None or module.dot_general_cls is not None:
    return _FALLBACK
  got = _linen_params(module, 'kernel', 'bias')
  if got is None:
    return _FALLBACK
  kernel, bias = got
  bias = bias if module.use_bias else None
  promote, precision = _linen_promote(module), module.precision
  return _dense(
    inputs, kernel, bias, axis=axis, n_features=n_features, promote=promote, precision=precision
  )


def _tuple_of(x) -> tuple:
  return tuple(x) if isinstance(x, tuple | list) else (x,)


def _linen_conv(module: nn.Conv, inputs):
  if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
    return _FALLBACK
  got = _linen_params(module, 'kernel', 'bias')
  if got is None:
    return _FALLBACK
  kernel, bias = got
  if not module.use_bias:
    bias = None
  return _conv(inputs, kernel, bias, promote=_linen_promote(module), **_conv_options(module))


def _transpose_options(module) -> dict:
  """The options of a linen or nnx ConvTranspose that `_conv_transpose` reproduces."""
  return {
    'kernel_size': module.kernel_size,
    'strides': module.strides,
    'padding': module.padding,
    'kernel_dilation': module.kernel_dilation,
    'transpose_kernel': module.transpose_kernel,
    'mask': module.mask,
    'precision': module.precision,
  }


def _linen_conv_transpose(module: nn.ConvTranspose, inputs):
  got = _linen_params(module, 'kernel', 'bias')
  if got is None:
    return _FALLBACK
  kernel, bias = got
  if not module.use_bias:
    bias = None
  return _conv_transpose(
    inputs,
    kernel,
    bias,
    promote=_linen_promote(module),
    kwargs=_element_type(module),
    **_transpose_options(module),
  )


# Exactly these classes (not subclasses, which may change what a method does).
_LINEN = {
  (nn.Dense, '__call__'): _linen_dense,
  (nn.DenseGeneral, '__call__'): _linen_dense_general,
  (nn.Conv, '__call__'): _linen_conv,
  (nn.ConvTranspose, '__call__'): _linen_conv_transpose,
}


def _linen_interceptor(next_fun, args, kwargs, context):
  impl = _LINEN.get((type(context.module), context.method_name))
  if impl is None or len(args) != 1 or kwargs:
    return next_fun(*args, **kwargs)
  out = impl(context.module, *args)
  return next_fun(*args, **kwargs) if out is _FALLBACK else out


# -------------------------------------------------------------------- nnx ----


def _nnx_promote(module):
  return lambda *a: tuple(module.promote_dtype(a, dtype=module.dtype))


def _nnx_value(variable) -> Any:
  return None if variable is None else variable[...]


def _nnx_linear(module: nnx.Linear, inputs, out_sharding=None):
  if out_sharding is not None or module.dot_general is not lax.dot_general:
    return _FALLBACK
  return _dense(
    inputs,
    _nnx_value(module.kernel),
    _nnx_value(module.bias),
    axis=(-1,),
    n_features=1,
    promote=_nnx_promote(module),
    precision=module.precision,
    kwargs=_element_type(module),
  )


def _nnx_linear_general(module: nnx.LinearGeneral, inputs, out_sharding=None):
  if (
    out_sharding is not None
    or module.batch_axis
    or module.dot_general is not None
    or module.dot_general_cls is not None
  ):
    return _FALLBACK
  return _dense(
    inputs,
    _nnx_value(module.kernel),
    _nnx_value(module.bias),
    axis=module.axis,
    n_features=len(module.out_features),
    promote=_nnx_promote(module),
    precision=module.precision,
    kwargs=_element_type(module),
  )


def _conv_options(module) -> dict:
  """The options of a linen or nnx convolution that `_conv` reproduces."""
  return {
    'kernel_size': module.kernel_size,
    'strides': module.strides,
    'padding': module.padding,
    'input_dilation': module.input_dilation,
    'kernel_dilation': module.kernel_dilation,
    'groups': module.feature_group_count,
    'mask': module.mask,
    'precision': module.precision,
  }


def _nnx_conv(module: nnx.Conv, inputs, out_sharding=None):
  if out_sharding is not None or module.conv_general_dilated is not lax.conv_general_dilated:
    return _FALLBACK
  kernel, bias = _nnx_value(module.kernel), _nnx_value(module.bias)
  options = _conv_options(module)
  return _conv(
    inputs, kernel, bias, promote=_nnx_promote(module), kwargs=_element_type(module), **options
  )


def _nnx_conv_transpose(module: nnx.ConvTranspose, inputs, out_sharding=None):
  if out_sharding is not None:
    return _FALLBACK
  kernel = _nnx_value(module.kernel)
  bias = _nnx_value(module.bias) if module.use_bias else None
  return _conv_transpose(
    inputs,
    kernel,
    bias,
    promote=_nnx_promote(module),
    kwargs=_element_type(module),
    **_transpose_options(module),
  )


_NNX = (
  (nnx.Linear, _nnx_linear),
  (nnx.LinearGeneral, _nnx_linear_general),
  (nnx.Conv, _nnx_conv),
  (nnx.ConvTranspose, _nnx_conv_transpose),
)

_patch_lock = threading.Lock()
_patch_depth = 0
_originals: dict[type, Any] = {}


def _patched(cls: type, orig: Callable, impl: Callable) -> Callable:
  @functools.wraps(orig)
  def __call__(self, *args, **kwargs):  # noqa: N807
    if _ACTIVE.get() and type(self) is cls:
      out = impl(self, *args, **kwargs)
      if out is not _FALLBACK:
        return out
    return orig(self, *args, **kwargs)

  return __call__


@contextlib.contextmanager
def _nnx_patch() -> Iterator[None]:
  """nnx has no method interceptors: the classes' `__call__` is replaced while any
  thread is inside `fast_layers()`; the replacement does anything only in a context
  where `fast_layers()` is active and for exactly these classes."""
  global _patch_depth
  with _patch_lock:
    if _patch_depth == 0:
      for cls, impl in _NNX:
        _originals[cls] = cls.__dict__['__call__']
        cls.__call__ = _patched(cls, _originals[cls], impl)
    _patch_depth += 1
  try:
    yield
  finally:
    with _patch_lock:
      _patch_depth -= 1
      if _patch_depth == 0:
        for cls, _ in _NNX:
          cls.__call__ = _originals.pop(cls)


@contextlib.contextmanager
def fast_layers() -> Iterator[None]:
  """Within this context, flax's standard layers compute as described in the module
  docstring: convolutions by windows and one product, dense layers from the fast
  layout where their kernel is held so. Results equal flax's own code to float
  rounding; whatever is not handled runs flax's code.

  The model adapters of `sweep.models` trace a model's apply inside it.
  """
  token = _ACTIVE.set(True)
  try:
    with _nnx_patch(), nn.intercept_methods(_linen_interceptor):
      yield
  finally:
    _ACTIVE.reset(token)


# ----------------------------------------------------------------- layout ----


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A kernel held in the fast layout: `n_in` input axes, then `n_out` output axes."""

  n_in: int
  n_out: int

  def fast(self, a: jax.Array) -> jax.Array:
    lead = a.ndim - self.n_in - self.n_out  # run axes, if any
    perm = (*range(lead), *range(lead + self.n_in, a.ndim), *range(lead, lead + self.n_in))
    return jnp.expand_dims(jnp.transpose(a, perm), lead)

  def module(self, a: jax.Array) -> jax.Array:
    lead = a.ndim - 1 - self.n_in - self.n_out
    a = jnp.squeeze(a, lead)
    perm = (*range(lead), *range(a.ndim - self.n_in, a.ndim), *range(lead, lead + self.n_out))
    return jnp.transpose(a, perm)


class _Keep:
  """A leaf the layout leaves as it is."""

  def fast(self, a):
    return a

  module = fast


_KEEP = _Keep()


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which dense kernels the engine holds `(1, *outputs, *inputs)` during a segment.

  Made by `plan_layout`. Transposing a weight commutes with an optimizer whose update
  of each entry depends on that entry alone (sgd, momentum, adam, ...), so the engine
  uses a layout only with such optimizers.

  Attributes:
    treedef: the structure of one run's parameters.
    kernels: (leaf index, input axes, output axes) of each kernel held transposed.
  """

  treedef: Any
  kernels: tuple[tuple[int, int, int], ...]

  def _specs(self) -> Any:
    leaves: list[Any] = [_KEEP] * self.treedef.num_leaves
    for i, n_in, n_out in self.kernels:
      leaves[i] = _Spec(n_in, n_out)
    return jax.tree.unflatten(self.treedef, leaves)

  def to_fast(self, params: Any) -> Any:
    """Parameters (any leading run axes) with the planned kernels in the fast layout."""
    return jax.tree.map(lambda s, a: s.fast(a), self._specs(), params)

  def to_module(self, params: Any) -> Any:
    """The inverse of `to_fast`."""
    return jax.tree.map(lambda s, a: s.module(a), self._specs(), params)

  def _state(self, opt: optax.GradientTransformation, opt_state: Any, fast: bool) -> Any:
    specs = self._specs()
    return optax.tree_utils.tree_map_params(
      opt,
      lambda a, s: s.fast(a) if fast else s.module(a),
      opt_state,
      specs,
    )

  def rewrite(self, fn: Callable) -> Callable:
    """`fn(params, *args)` (a model function of one run) computed from parameters in this
    layout: flax's layers read it themselves inside `fast_layers()`, so `fn` itself
    (`sweep.products.ProductLayout` rewrites the model's own products)."""
    return fn

  def enter(self, runs: Any, opt: optax.GradientTransformation) -> Any:
    """`runs` (a NamedTuple with `params` and `opt_state`) in the fast layout; `opt` is
    the optimizer whose state `opt_state` is (its hyperparameter values do not matter)."""
    return runs._replace(
      params=self.to_fast(runs.params), opt_state=self._state(opt, runs.opt_state, True)
    )

  def leave(self, runs: Any, opt: optax.GradientTransformation) -> Any:
    """The inverse of `enter`."""
    return runs._replace(
      params=self.to_module(runs.params), opt_state=self._state(opt, runs.opt_state, False)
    )


def _eqn_tag(eqn) -> int | None:
  name = eqn.params.get('name') if 'jaxpr' in eqn.params else None
  if isinstance(name, str) and name.startswith(_TAG):
    return int(name[len(_TAG) :])
  return None


def plan_layout(apply_fn: Callable, params: Any, x: Any) -> Layout | None:
  """The dense kernels of `apply_fn`'s model that the fast layout serves, or None.

  A kernel qualifies when every use of it in one forward pass is the product of a
  dense layer that `fast_layers` handles (the model's apply must trace inside it, as
  the `sweep.models` adapters do), on an input the runs share (one that does not
  depend on the parameters: the runs' products are then one) or on a matrix
  (batch, features) of each run's own. Kernels read otherwise keep the module's layout:
  tied weights, a layer inside `nn.scan`, a custom `dot_general`, and layers on
  activations of more dims of each run's own (a transformer's (batch, tokens, width)),
  where the held layout made the step slower (docs/performance.md, change 17).

  Args:
    apply_fn: `(params, x) -> predictions` for one run.
    params: one run's parameters (arrays or `jax.ShapeDtypeStruct`s).
    x: a batch of inputs (an array or a `jax.ShapeDtypeStruct`).
  """
  leaves, treedef = jax.tree.flatten(params)
  token = _RECORDING.set(True)
  try:
    # A new function: JAX caches traces by function and shapes, and a trace made outside
    # the recording (the engine's shape check) would come back without the tags.
    closed = jax.make_jaxpr(lambda p, x: apply_fn(p, x))(params, x)
  except Exception:  # a model the plan cannot trace keeps its layout; the engine reports errors
    return None
  finally:
    _RECORDING.reset(token)
  jaxpr = closed.jaxpr
  uses: dict[Any, list[tuple[Any, int]]] = {}
  for eqn in jaxpr.eqns:
    for pos, v in enumerate(eqn.invars):
      if not isinstance(v, jax.extend.core.Literal):
        uses.setdefault(v, []).append((eqn, pos))
  outputs = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
  per_run = set(jaxpr.invars[: len(leaves)])  # what depends on the parameters
  for eqn in jaxpr.eqns:
    if any(not isinstance(u, jax.extend.core.Literal) and u in per_run for u in eqn.invars):
      per_run.update(eqn.outvars)

  def served(eqn, pos) -> int | None:
    if pos != 1:
      return None
    inputs = eqn.invars[0]
    if inputs in per_run and len(inputs.aval.shape) > 2:
      return None
    return _eqn_tag(eqn)

  kernels = []
  for i, v in enumerate(jaxpr.invars[: len(leaves)]):
    tags = {served(eqn, pos) for eqn, pos in uses.get(v, ())}
    if len(tags) == 1 and None not in tags and v not in outputs:
      (n_in,) = tags
      kernels.append((i, n_in, len(leaves[i].shape) - n_in))
  return Layout(treedef, tuple(kernels)) if kernels else None


# ------------------------------------------------------------- slow layers ----


class SlowLayerWarning(UserWarning):
  """A layer of the model stays slow under the engine's run axis (see `slow_layers`)."""


@dataclasses.dataclass(frozen=True)
class SlowLayer:
  """A product in a model that stays slow under the run axis.

  Attributes:
    where: the operation's flax scope and source line.
    what: what the operation becomes under the run axis.
    slowdown: the estimated factor on that operation's time under the run axis,
      against `against`.
    advice: what to do.
    against: what the factor compares with.
  """

  where: str
  what: str
  slowdown: float
  advice: str
  against: str = "the engine's own layers"

  def message(self) -> str:
    return (
      f'{self.where}: {self.what}, about {self.slowdown:g}x slower than {self.against}. '
      f'{self.advice}.'
    )


def _where(eqn) -> str:
  from jax._src import source_info_util  # the one way to a jaxpr equation's user frame

  scope = str(eqn.source_info.name_stack)
  line = source_info_util.summarize(eqn.source_info)
  return f'{scope} ({line})' if scope else line


def subjaxprs(params: dict) -> Iterator[Any]:
  """The jaxprs nested in an equation's parameters (jit, scan, cond, custom_vjp ...)."""
  for value in params.values():
    for v in value if isinstance(value, tuple | list) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


# Estimates measured on a 2-core CPU (docs/performance.md), the step of a whole model:
# the flax MNIST CNN vmapped over 16 runs (its second convolution grouped) and alone
# (XLA's convolution) against the same convolutions as windows and one product; the
# seed MLP with an (inputs, outputs) weight in the user's own code against the same
# weight held (outputs, inputs). The engine reports these on a CPU only.
_GROUPED_CONV_SLOWDOWN = 15.0
_CONV_SLOWDOWN = 8.0
_DENSE_SLOWDOWN = 1.75
# A convolution computed by `fast_layers` on an input of each run's own, per spatial dims:
# the engine's step of the 1-D CNN and of the flax MNIST CNN on 8x8 digits, per run,
# against one run's jitted step with XLA's convolution called per batch (CPU time, 8
# runs). In 3-D XLA's convolution is many times slower than the windows: not reported.
_PER_RUN_CONV_SLOWDOWN = {1: 1.7, 2: 1.4}


def _per_run_convs(jaxpr, per_run: set) -> Iterator[tuple[Any, int]]:
  """The convolutions `fast_layers` computed (tagged while `_NAMING` is set) whose
  input depends on the parameters, with their spatial dims; through jit calls too."""
  literal = lambda v: isinstance(v, jax.extend.core.Literal)  # noqa: E731
  per_run = set(per_run)
  for eqn in jaxpr.eqns:
    name = eqn.params.get('name') if 'jaxpr' in eqn.params else None
    if isinstance(name, str) and name.startswith(_CONV_TAG):
      if eqn.invars[0] in per_run:
        yield eqn, int(name[len(_CONV_TAG) :])
    elif 'jaxpr' in eqn.params and eqn.primitive.name in ('jit', 'pjit'):
      inner = eqn.params['jaxpr'].jaxpr
      pairs = zip(eqn.invars, inner.invars, strict=False)
      yield from _per_run_convs(inner, {b for a, b in pairs if not literal(a) and a in per_run})
    if any(not literal(v) and v in per_run for v in eqn.invars):
      per_run.update(eqn.outvars)


def _raw_products(jaxpr, params: set, per_run: set | None = None) -> Iterator[Any]:
  """dot_generals reading a parameter as it is passed in, contracted on a leading axis
  (an `x @ W` with W stored (inputs, outputs)), on an input the runs share or a matrix of
  each run's own (where the fast layout serves flax's layers: see `plan_layout`); through
  jit calls too. `per_run`: the variables that depend on the parameters."""
  literal = lambda v: isinstance(v, jax.extend.core.Literal)  # noqa: E731
  params = {v for v in params if not literal(v)}
  per_run = set(params) if per_run is None else set(per_run)
  is_param = lambda v: not literal(v) and v in params  # noqa: E731
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract_l, contract_r), _ = eqn.params['dimension_numbers']
      for side, (operand, contract) in enumerate(
        zip(eqn.invars, (contract_l, contract_r), strict=True)
      ):
        ndim = len(operand.aval.shape)
        other = eqn.invars[1 - side]
        shared_or_matrix = literal(other) or other not in per_run or len(other.aval.shape) <= 2
        if (
          is_param(operand)
          and ndim >= 2
          and tuple(contract) != tuple(range(ndim - len(contract), ndim))
          and shared_or_matrix
        ):
          yield eqn
          break
    elif eqn.primitive.name in ('jit', 'pjit') and 'jaxpr' in eqn.params:
      inner = eqn.params['jaxpr'].jaxpr
      pairs = list(zip(eqn.invars, inner.invars, strict=False))
      yield from _raw_products(
        inner,
        {b for a, b in pairs if is_param(a)},
        {b for a, b in pairs if not literal(a) and a in per_run},
      )
    if any(not literal(v) and v in per_run for v in eqn.invars):
      per_run.update(eqn.outvars)


def slow_layers(
  apply_fn: Callable, params: Any, x: Any, *, dense: bool = True, backend: str | None = None
) -> list[SlowLayer]:
  """The products of `apply_fn` that remain slow when the engine runs it over runs.

  Found: a convolution left to XLA (a raw `lax.conv` or `lax.conv_transpose`, input dilation
  with strides or groups: whatever `fast_layers` does not compute), which vmap makes a
  grouped convolution where its input differs per run (on every backend), and which XLA's
  CPU backend runs slowly in any case (on a CPU); a convolution in 1 or 2 spatial dims that
  `fast_layers` computes on an input of each run's own, whose runs cannot share one product
  (on a CPU, where it measured slower than XLA's convolution run one run at a time); and a
  matrix product reading a weight stored `(inputs, outputs)` in the user's own code (`x @
  W`), whose runs cannot share one product (on a CPU). The factors were measured on a CPU.

  Args:
    apply_fn: `(params, x) -> predictions` for one run, as the engine calls it.
    params: one run's parameters as the engine holds them in a segment (its `Layout`
      applied), arrays or `jax.ShapeDtypeStruct`s.
    x: a batch of inputs.
    dense: also report matrix products (False where no layout could be used, as with
      an optimizer that the fast layout does not commute with).
    backend: the backend the engine runs on (`jax.default_backend()` by default).
  """
  cpu = (backend or jax.default_backend()) == 'cpu'
  token = _NAMING.set(True)
  try:
    one = jax.make_jaxpr(lambda p, x: apply_fn(p, x))(params, x).jaxpr
  except Exception:  # the engine reports a model that does not trace
    return []
  finally:
    _NAMING.reset(token)
  found = []
  weights = set(one.invars[: len(jax.tree.leaves(params))])
  for eqn, nd in _per_run_convs(one, weights) if cpu else ():
    if nd in _PER_RUN_CONV_SLOWDOWN:
      found.append(
        SlowLayer(
          # Its scope alone: the line is the engine's, inside `fast_layers`.
          where=str(eqn.source_info.name_stack) or 'a convolution',
          what=f"a {nd}-D convolution on an input of each run's own, whose runs cannot share "
          'one product: computed run by run as input windows times its kernel',
          slowdown=_PER_RUN_CONV_SLOWDOWN[nd],
          against="XLA's convolution in a loop of jitted steps, one run at a time",
          advice='Nothing in the model makes it faster: the sweep gains from its other layers '
          '(dense layers, convolutions on the data, 3-D convolutions) and from compiling once',
        )
      )
  for eqn in _raw_products(one, weights if dense and cpu else set()):
    found.append(
      SlowLayer(
        where=_where(eqn),
        what='a matrix product with a weight stored (inputs, outputs), whose runs cannot share one '
        'product',
        slowdown=_DENSE_SLOWDOWN,
        advice='Use flax.linen.Dense / flax.nnx.Linear (the engine holds their kernels transposed) '
        'or sweep.models.Dense, or store the weight (outputs, inputs) and write x @ W.T',
      )
    )

  def convs(jaxpr) -> list:
    out = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        out.append(eqn)
      for sub in subjaxprs(eqn.params):
        out.extend(convs(sub))
    return out

  if not convs(one):
    return found
  pair = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2,) + tuple(a.shape), a.dtype), params)
  try:
    two = jax.make_jaxpr(jax.vmap(lambda p, x: apply_fn(p, x), in_axes=(0, None)))(pair, x).jaxpr
  except Exception:
    return found
  groups = lambda e: e.params['feature_group_count'] * e.params['batch_group_count']  # noqa: E731
  for a, b in zip(convs(one), convs(two), strict=False):
    grouped = groups(b) != groups(a)  # its kernel and its input differ per run
    if not grouped and not cpu:
      continue
    found.append(
      SlowLayer(
        where=_where(a),
        what=(
          'a convolution with a kernel per run on an input per run, which vmap makes a grouped '
          'convolution'
          if grouped
          else 'an XLA convolution, slow on a CPU at these sizes'
        ),
        slowdown=_GROUPED_CONV_SLOWDOWN if grouped else _CONV_SLOWDOWN,
        advice='Use flax.linen.Conv / flax.nnx.Conv (computed by windows and one product under the '
        'run axis, and flax.linen.ConvTranspose phase by phase) or sweep.models.Conv',
      )
    )
  return found
