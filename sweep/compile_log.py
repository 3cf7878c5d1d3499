"""Where a sweep's first call goes: the programs it compiled, and how long each took.

JAX reports every trace, lowering and XLA compile as a monitoring event
(`jax.monitoring`), with the program's name. `CompileLog` listens while a sweep runs, on
every thread (the programs `sweep.ahead` compiles in the background too), and keeps one
entry per compiled program: its compile seconds, its trace and lowering seconds, and
whether it was read from JAX's persistent compilation cache rather than compiled
(`sweep.enable_compilation_cache`; the CLI turns it on). `Result.compiles` holds the
entries and `Result.summary()` says where the time went:

    Compiled 5 programs in 3.5 s (segment 1.3 s, run timing 0.9 s, start 0.7 s, ...);
    traced in 1.3 s.

A second sweep with other values of the same shapes compiles nothing, and says so. The
listener is process-wide: a program another thread of the same process compiles while
the sweep runs is counted too.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import jax

# jax's monitoring events (public API; the constants' home is private).
TRACE = '/jax/core/compile/jaxpr_trace_duration'
LOWER = '/jax/core/compile/jaxpr_to_mlir_module_duration'
COMPILE = '/jax/core/compile/backend_compile_duration'
CACHE_HIT = '/jax/compilation_cache/cache_hits'

# The engine's programs by what they do (kernels.train, sweep.timing, sweep.population).
_NAMES = {
  'segment': 'segment',
  'start': 'start',
  'init': 'init',
  'seeded_init': 'initial parameters',
  'note_best': 'best so far',
  '_timed': 'run timing',
  'epoch_order': 'data order',
}


def _bare(name: str) -> str:
  """'jit(segment)' -> 'segment'."""
  return name[4:-1] if name.startswith('jit(') and name.endswith(')') else name


def label(name: str) -> str:
  """A program's name as the summary says it."""
  bare = _bare(name)
  return _NAMES.get(bare, bare)


@dataclasses.dataclass
class Program:
  """One program compiled (or read from the persistent cache) during a sweep."""

  name: str  # jax's name for it, 'jit(segment)'
  seconds: float  # the compile (or the read from the cache)
  trace_seconds: float  # its trace and lowering to MLIR
  cached: bool  # read from the persistent compilation cache, not compiled

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class CompileLog:
  """A context in which every compile is logged (see the module docstring)."""

  def __init__(self):
    self.programs: list[Program] = []
    self._compiled: list[tuple[str, float, bool]] = []
    self._traced: dict[str, float] = collections.defaultdict(float)
    self._local = threading.local()

  def _on_duration(self, event: str, secs: float, **kwargs: Any) -> None:
    name = str(kwargs.get('fun_name', '?'))
    if event == COMPILE:
      hit, self._local.hit = getattr(self._local, 'hit', False), False
      self._compiled.append((name, float(secs), hit))
    elif event in (TRACE, LOWER):
      self._traced[_bare(name)] += float(secs)

  def _on_event(self, event: str, **kwargs: Any) -> None:
    if event == CACHE_HIT:  # recorded on the compiling thread just before its COMPILE
      self._local.hit = True

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc: Any) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)
    # A trace is a program's where a program of that name was compiled; the others are
    # functions traced inside one (counted in its trace already) or found in jax's cache.
    seen: set[str] = set()
    for name, secs, hit in self._compiled:
      bare = _bare(name)
      traced = self._traced.get(bare, 0.0) if bare not in seen else 0.0
      seen.add(bare)
      self.programs.append(Program(name, secs, traced, hit))


def to_json(programs: list[Program]) -> dict[str, Any]:
  """`Result.compiles`: the programs, and their sums."""
  return {
    'programs': [p.to_json() for p in programs],
    'compiled': sum(not p.cached for p in programs),
    'from_cache': sum(p.cached for p in programs),
    'compile_seconds': sum(p.seconds for p in programs if not p.cached),
    'cache_seconds': sum(p.seconds for p in programs if p.cached),
    'trace_seconds': sum(p.trace_seconds for p in programs),
  }


def summary(compiles: dict[str, Any] | None, shown: int = 4) -> str | None:
  """One line: what compiled and how long it took, the slowest programs named (the
  programs of one name summed); None where nothing was logged."""
  if compiles is None:
    return None
  programs = [Program(**p) for p in compiles['programs']]
  if not programs:
    return 'Nothing compiled: every program was compiled by an earlier sweep of this process.'
  parts = []
  compiled = [p for p in programs if not p.cached]
  if compiled:
    by_name: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    for p in compiled:
      by_name[label(p.name)] += p.seconds
      count[label(p.name)] += 1
    slowest = sorted(by_name.items(), key=lambda kv: -kv[1])
    named = ', '.join(
      f'{n}{f" x{count[n]}" if count[n] > 1 else ""} {s:.1f} s' for n, s in slowest[:shown]
    )
    more = f', {len(slowest) - shown} more' if len(slowest) > shown else ''
    n = len(compiled)
    parts.append(
      f'Compiled {n} program{"s" if n > 1 else ""} in {compiles["compile_seconds"]:.1f} s '
      f'({named}{more})'
    )
  cached = len(programs) - len(compiled)
  if cached:
    parts.append(f'{cached} read from the compilation cache in {compiles["cache_seconds"]:.1f} s')
  parts.append(f'traced in {compiles["trace_seconds"]:.1f} s')
  line = '; '.join(parts) + '.'
  if compiled and compiles['compile_seconds'] >= 1.0 and not _persistent_cache():
    line += ' sweep.enable_compilation_cache() keeps them for the next process.'
  timing = by_name.get('run timing', 0.0) if compiled else 0.0
  if timing >= 1.0 and timing >= compiles['compile_seconds'] / 3:
    # The largest part of a short sweep's first call on a CPU: say what it buys, and how to skip it.
    line += (
      ' The run timing measures the seconds of a run alone per batch size (results.csv);'
      ' time_runs=False or SWEEP_NO_RUN_TIMING=1 skips it.'
    )
  return line[0].upper() + line[1:]


def _persistent_cache() -> bool:
  """Whether JAX's persistent compilation cache is on in this process."""
  return bool(jax.config.jax_compilation_cache_dir) and jax.config.jax_enable_compilation_cache
