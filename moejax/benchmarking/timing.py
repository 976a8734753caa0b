"""Timing side by side: one warm-up call, then median seconds per call.

On a shared host the machine's speed drifts during a run; fns timed round-robin (one call of
each per round) see the same drift, so their ratios are meaningful where separate timings
are not.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def ready(out):
  """``out`` once every array in it is computed."""
  import jax
  return jax.block_until_ready(out)


def median_seconds(fn: Callable, *args, iters: int) -> float:
  """Median seconds of ``fn(*args)`` over ``iters`` calls, after one warm-up (compile) call."""
  ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def round_robin(fns: list[Callable[[], Any]], iters: int) -> list[float]:
  """Median seconds per call of each zero-argument fn: one warm-up (compile) call each,
  then ``iters`` rounds of one call of each, in turns."""
  for f in fns:
    ready(f())
  times = [[] for _ in fns]
  for _ in range(iters):
    for i, f in enumerate(fns):
      t = time.perf_counter()
      ready(f())
      times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]
