"""The user's own matrix products at the engine's speed under the run axis.

`sweep.layers` holds the kernels of flax's dense layers `(1, *outputs, *inputs)` while a
training segment runs, so that the runs reading the same input make one matrix product
(`(runs, outputs, inputs)` is the matrix `(runs * outputs, inputs)`). A weight that the
user's own code multiplies (an `(init_fn, apply_fn)` pair's `x @ W`, a `jnp.einsum`, a
custom linen or equinox layer) is stored `(inputs, outputs)` just the same, and flax's
interception cannot reach it. Here the model is read as a jaxpr instead:

- `plan` traces the model's apply and finds the parameter leaves whose every use is a
  `dot_general` contracting the leaf's leading axes (through jit calls too), with no
  batch axes, on an input the runs share or a matrix of each run's own (the cases where
  the fast layout serves flax's layers; see `sweep.layers.plan_layout`), also through a
  cast (`x @ W.astype(jnp.bfloat16)`).
- `ProductLayout` holds those leaves in the same fast layout as flax's kernels, and
  `ProductLayout.rewrite` evaluates the model's jaxpr with those products computed from
  the held weight (the weight the left operand, contracted on its trailing axes, as
  `sweep.layers` computes flax's). Gradients and the optimizer then see the held leaf.
  Any other use of a held leaf met at run time (the training-mode trace may differ from
  the planned one) reads the leaf transposed back: slower, never different.

Outside a segment every parameter is in the user's own layout, as for flax's layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend.core import Literal

from sweep import layers

__all__ = ['ProductLayout', 'plan']

_CALLS = ('jit', 'pjit')  # call primitives whose jaxpr the rewrite evaluates inline
# Elementwise operations of one operand that a held weight goes through, still held (they
# commute with the transpose): a cast for mixed precision, a copy.
_ENTRYWISE = ('convert_element_type', 'copy', 'copy_p')


# --------------------------------------------------------------------- plan ----


def _leaf_side(eqn, side: int, per_run: set, held: set) -> int | None:
  """The number of input axes of the weight that `eqn` (a dot_general) reads on operand
  `side`, where the fast layout serves that product; else None."""
  (contract, batch) = eqn.params['dimension_numbers']
  if batch[0] or batch[1]:
    return None
  axes = tuple(contract[side])
  ndim = len(eqn.invars[side].aval.shape)
  n_in = len(axes)
  if n_in == 0 or n_in >= ndim or set(axes) != set(range(n_in)):
    return None
  other = eqn.invars[1 - side]
  if isinstance(other, Literal):
    return n_in
  if other in held:
    return None  # two weights multiplied: left as written
  if other in per_run and len(other.aval.shape) > 2:
    return None  # activations of more dims of each run's own (see layers.plan_layout)
  return n_in


def _uses(jaxpr, tracked: dict, per_run: set, found: dict) -> None:
  """Adds to `found[leaf]` how each use of a tracked variable (`tracked`: variable ->
  leaf index) reads it: its number of input axes, or None where the rewrite cannot
  serve it. `per_run`: the variables that depend on the parameters (grown here)."""
  literal = lambda v: isinstance(v, Literal)  # noqa: E731
  for eqn in jaxpr.eqns:
    reads = [(pos, v) for pos, v in enumerate(eqn.invars) if not literal(v) and v in tracked]
    if reads and eqn.primitive.name == 'dot_general':
      for pos, v in reads:
        found.setdefault(tracked[v], []).append(_leaf_side(eqn, pos, per_run, set(tracked)))
    elif reads and eqn.primitive.name in _ENTRYWISE and len(eqn.invars) == 1:
      tracked[eqn.outvars[0]] = tracked[reads[0][1]]
    elif reads and eqn.primitive.name in _CALLS and 'jaxpr' in eqn.params:
      inner = eqn.params['jaxpr'].jaxpr
      pairs = list(zip(eqn.invars, inner.invars, strict=True))
      _uses(
        inner,
        {b: tracked[a] for a, b in pairs if not literal(a) and a in tracked},
        {b for a, b in pairs if not literal(a) and a in per_run},
        found,
      )
    else:
      for _, v in reads:
        found.setdefault(tracked[v], []).append(None)
    if any(not literal(v) and v in per_run for v in eqn.invars):
      per_run.update(eqn.outvars)
  for v in jaxpr.outvars:
    if not literal(v) and v in tracked:
      found.setdefault(tracked[v], []).append(None)


def plan(
  apply_fn: Callable, params: Any, x: Any, flax_layout: layers.Layout | None = None
) -> layers.Layout | None:
  """The layout of `apply_fn`'s parameters under the run axis: the kernels of flax's
  layers in `flax_layout` (from `sweep.layers.plan_layout`), and the weights of the
  model's own products that `ProductLayout` serves; None where there are neither.

  Args:
    apply_fn: `(params, x) -> predictions` for one run.
    params: one run's parameters (arrays or `jax.ShapeDtypeStruct`s).
    x: a batch of inputs (an array or a `jax.ShapeDtypeStruct`).
    flax_layout: the layout of flax's kernels, or None.
  """
  leaves, treedef = jax.tree.flatten(params)
  taken = {i for i, _, _ in flax_layout.kernels} if flax_layout is not None else set()
  try:
    jaxpr = jax.make_jaxpr(lambda p, x: apply_fn(p, x))(params, x).jaxpr
  except Exception:  # a model the plan cannot trace keeps its layout; the engine reports errors
    return flax_layout
  invars = jaxpr.invars[: len(leaves)]
  tracked = {v: i for i, v in enumerate(invars) if i not in taken and len(leaves[i].shape) >= 2}
  found: dict[int, list] = {}
  _uses(jaxpr, tracked, set(invars), found)
  products = []
  for i, reads in sorted(found.items()):
    if len(set(reads)) == 1 and reads[0] is not None:
      products.append((i, reads[0], len(leaves[i].shape) - reads[0]))
  if not products:
    return flax_layout
  kernels = (flax_layout.kernels if flax_layout is not None else ()) + tuple(products)
  return ProductLayout(treedef, kernels, products=tuple(i for i, _, _ in products))


# ------------------------------------------------------------------ rewrite ----


@dataclasses.dataclass(frozen=True)
class _Held:
  """A weight held `(*outputs, *inputs)` (its leading axis of length 1 removed), which the
  model's code reads as `(*inputs, *outputs)`."""

  weight: jax.Array
  n_in: int

  def module(self) -> jax.Array:
    """The weight in the model's own layout."""
    n_out = self.weight.ndim - self.n_in
    return lax.transpose(self.weight, (*range(n_out, self.weight.ndim), *range(n_out)))

  def product(self, eqn, side: int, other: Any) -> jax.Array | None:
    """`eqn` (a dot_general reading the weight on operand `side`) computed from the held
    weight, or None where it cannot be."""
    (contract, batch) = eqn.params['dimension_numbers']
    axes = tuple(contract[side])
    if batch[0] or batch[1] or set(axes) != set(range(self.n_in)) or len(axes) != self.n_in:
      return None
    n_out = self.weight.ndim - self.n_in
    # Pair each contracted weight axis with its axis of the other operand, in the
    # weight's order: the held weight keeps its input axes in that order, after n_out.
    other_axes = tuple(contract[1 - side][axes.index(k)] for k in range(self.n_in))
    params = dict(eqn.params)
    params['dimension_numbers'] = (
      (tuple(range(n_out, n_out + self.n_in)), other_axes),
      ((), ()),
    )
    y = eqn.primitive.bind(self.weight, other, **params)  # (*outputs, *other's free axes)
    if side == 0:
      return y  # the model's own order: the weight's free axes first
    return lax.transpose(y, (*range(n_out, y.ndim), *range(n_out)))


def _evaluate(jaxpr, consts: list, args: list) -> list:
  """`jax.core.eval_jaxpr`, with the products of held weights (`_Held` arguments)
  computed from them; any other use of a held weight reads it transposed back."""
  from jax._src import source_info_util  # as jax.core.eval_jaxpr binds each equation

  env: dict = {}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  def plain(a):
    return a.module() if isinstance(a, _Held) else a

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    held = [isinstance(a, _Held) for a in invals]
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack):
      ans = None
      if any(held) and eqn.primitive.name == 'dot_general' and not all(held):
        side = held.index(True)
        ans = invals[side].product(eqn, side, invals[1 - side])
      elif any(held) and eqn.primitive.name in _ENTRYWISE and len(invals) == 1:
        weight = eqn.primitive.bind(invals[0].weight, **eqn.primitive.get_bind_params(eqn.params))
        ans = _Held(weight, invals[0].n_in)
      elif any(held) and eqn.primitive.name in _CALLS and 'jaxpr' in eqn.params:
        inner = eqn.params['jaxpr']
        ans = _evaluate(inner.jaxpr, list(inner.consts), invals)
      if ans is None:
        with eqn.ctx.manager:
          ans = eqn.primitive.bind(*map(plain, invals), **eqn.primitive.get_bind_params(eqn.params))
    if eqn.primitive.multiple_results:
      env.update(zip(eqn.outvars, ans, strict=True))
    else:
      env[eqn.outvars[0]] = ans
  return [plain(read(v)) for v in jaxpr.outvars]


def _is_array(a: Any) -> bool:
  return isinstance(a, jax.Array | np.ndarray)


@dataclasses.dataclass(frozen=True)
class ProductLayout(layers.Layout):
  """A `sweep.layers.Layout` that also holds the weights of the model's own products.

  Attributes:
    products: the leaf indices (among `kernels`) whose products `rewrite` computes.
  """

  products: tuple[int, ...] = ()

  def rewrite(self, fn: Callable) -> Callable:
    """`fn(params, *args)`, one run's model function (`Model.apply`, or a pure
    `apply_fn(params, x)`), computed from `params` in this layout: the model's jaxpr,
    traced at the shapes of the call with the held weights in the model's own layout,
    evaluated with their products taken from the held weights."""
    n_in = {i: n for i, n, _ in self.kernels if i in self.products}

    def rewritten(params, *args):
      leaves = self.treedef.flatten_up_to(params)
      module = [
        jax.ShapeDtypeStruct(_module_shape(a.shape, n_in[i]), a.dtype) if i in n_in else a
        for i, a in enumerate(leaves)
      ]
      rest, rest_def = jax.tree.flatten(args)
      arrays = [i for i, a in enumerate(rest) if _is_array(a)]

      def call(leaves, values):
        filled = list(rest)
        for i, v in zip(arrays, values, strict=True):
          filled[i] = v
        return fn(self.treedef.unflatten(leaves), *rest_def.unflatten(filled))

      spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
      closed, out_shape = jax.make_jaxpr(call, return_shape=True)(
        [spec(a) for a in module], [spec(rest[i]) for i in arrays]
      )
      inputs = [
        _Held(lax.squeeze(a, (0,)), n_in[i]) if i in n_in else a for i, a in enumerate(leaves)
      ]
      inputs += [rest[i] for i in arrays]
      flat = _evaluate(closed.jaxpr, list(closed.consts), jax.tree.leaves(inputs))
      return jax.tree.unflatten(jax.tree.structure(out_shape), flat)

    return rewritten


def _module_shape(fast: tuple[int, ...], n_in: int) -> tuple[int, ...]:
  """The shape of a held weight `(1, *outputs, *inputs)` in the model's own layout."""
  held = fast[1:]
  n_out = len(held) - n_in
  return held[n_out:] + held[:n_out]
