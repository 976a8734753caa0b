"""How many items a plain-JAX loop handles per chunk: the target platform's backend decides."""

from __future__ import annotations

from moejax.kernels import registry


def cache_chunk(total: int, item_bytes: int, budget_bytes: int) -> int:
  """Items (tokens, rows) per chunk of a plain-JAX loop over ``total`` items of
  ``item_bytes`` each, ``budget_bytes`` the caller's chunk budget. ``total`` (one chunk: the
  callers then run the unchunked code) unless the platform's backend chunks (on CPU, where
  the XLA references are memory-bound, chunking to a core's cache is what makes them
  fast; TPU / GPU programs the chunking would only serialise)."""
  chunk = registry.call("cache_chunk", total, item_bytes, budget_bytes)
  return total if chunk is None else chunk
