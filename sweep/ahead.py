"""Compiling a unit's programs ahead, while the next one is traced.

A unit's first call traces and compiles several programs before it trains: its start, its
segment, the one-run programs that time a batch size (`sweep.timing`), and `note_best`
with `keep_best`. Tracing and lowering are Python, on the calling thread; XLA's compile
does not hold the GIL. So each program is lowered here (from its arguments' shapes where
the values do not exist yet) and handed to a background thread to compile while the next
one is traced; the calls that follow find their programs compiled (jax caches the
executable of a lowering, and a call with arguments of the same shapes and placements
lowers to the same one). On the seed MLP's first call this hides most of the compiles
behind the traces (docs/performance.md, change 20).

Nothing here changes what runs: where a lowering fails or would not be the call's own
(arguments placed on several devices, whose placement after a program is XLA's choice),
the call compiles its program as it would have, and raises its own errors.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import jax

ENABLED = True  # off: every program compiles at its call, on the calling thread
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  global _POOL
  if _POOL is None:
    # One thread: two XLA compiles at once are no faster than one after the other.
    _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='sweep-compile')
  return _POOL


class Ahead:
  """Lowerings handed to the compile thread; `wait` before calling any of them."""

  def __init__(self):
    self._futures: list[concurrent.futures.Future] = []

  def lower(self, lowering: Callable[[], Any]) -> Any:
    """Runs `lowering` (a `jax.stages.Lowered` maker) here and compiles its result in the
    background; None (and nothing compiled ahead) where it raises."""
    try:
      lowered = lowering()
    except Exception:  # the call raises it again, with its own context
      return None
    self.compile(lowered)
    return lowered

  def compile(self, lowered: Any) -> None:
    """Compiles `lowered` (a `jax.stages.Lowered`) in the background."""
    self._futures.append(_pool().submit(lowered.compile))

  def wait(self) -> None:
    """Until every compile handed over has finished (a call made before would compile its
    program a second time). A compile's error is left to the call to raise."""
    for f in self._futures:
      try:
        f.result()
      except Exception:
        pass
    self._futures.clear()


def shapes(tree: Any) -> Any:
  """The shapes and dtypes of `tree`'s leaves (weak types kept), as a lowering takes them."""
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, 'weak_type', False)),
    tree,
  )
