"""Counting the XLA programs compiled in a block: the tests' check that values are data."""

from __future__ import annotations

import contextlib

import jax

# jax's monitoring event for one backend compile (public API; the constant's home is private).
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def counting_compiles():
  """Yields the names of the XLA programs compiled inside the block, every cache cleared
  first (an earlier test may have compiled the same programs)."""
  jax.clear_caches()
  names: list[str] = []

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs
    if event == COMPILE_EVENT:
      names.append(str(kwargs.get('fun_name', '?')))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
