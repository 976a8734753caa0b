"""The CPU backend: what exists only for speed on XLA:CPU, behind the registry's seams.

* ``native``: C++ kernels (XLA FFI, built on first use from ``cpu_kernels.cc``,
  ``cpu_attention.cc``, ``cpu_decode.cc``): top-k, row gathers and contractions, lazy Adam,
  attention with rotary positions, and for decoding: the routed experts' FFN of a few
  tokens, the projections of a few tokens, attention over the KV cache.
* the CPU-tuned XLA programs the layers get from the registry instead of their portable
  ones (each module says why it is faster on CPU).
* ``host_memory``: the entry points' malloc setting (:func:`prepare_process`).

:func:`register` hands them to :mod:`moejax.kernels.registry` (``moejax.backends.load``
calls it); :data:`moejax.kernels.registry.OPS` says what each operation must do. Importing
this package imports no JAX (the entry points call :func:`prepare_process` before that).
"""

from __future__ import annotations

import types

CPU = "cpu"


def prepare_process() -> bool:
  """glibc keeps freed blocks mapped (``host_memory``); True if it did."""
  from moejax.backends.cpu import host_memory
  return host_memory.keep_freed_memory()


def _cache_chunk(total: int, item_bytes: int, budget_bytes: int) -> int:
  # On CPU the XLA references are memory-bound: a chunk's temporaries in a core's cache.
  return max(1, min(total, budget_bytes // max(item_bytes, 1)))


def register() -> None:
  from moejax.backends.cpu import argmax, attention, moe_dispatch, native, projection, row_sparse
  from moejax.kernels import registry, row_ops

  registry.register("cache_chunk", _cache_chunk, platform=CPU)
  registry.register("row_ops", types.SimpleNamespace(
      top_k=native.top_k, take_rows=row_ops.take_rows, gather_dot=native.gather_dot,
      gather_weighted_sum=native.gather_weighted_sum,
      scatter_outer_add=native.scatter_outer_add,
      scatter_outer_add_pair=native.scatter_outer_add_pair, fused=native.lookup_fused),
      platform=CPU)
  registry.register("row_plan.sort_free", row_sparse.sort_free, platform=CPU)
  for name in ("sum_squares_rows", "adam_rows"):
    registry.register(f"row_sparse.{name}", getattr(row_sparse, name), platform=CPU)
  registry.register("moe.capacity_moves", moe_dispatch.slot_rows, platform=CPU)
  registry.register("moe.dropless_default", "blocked", platform=CPU)
  # Plain XLA: it runs anywhere (tests compare the other grouped matmuls with it).
  registry.register("moe.grouped_ffn.blocked", types.SimpleNamespace(
      combine=moe_dispatch.blocked_combine, grouped=moe_dispatch.blocked_grouped),
      platform=registry.ANY)
  registry.register("projection", projection, platform=CPU)
  registry.register("ffn.hidden", projection.ffn_hidden, platform=CPU)
  registry.register("attention.rotary", attention.rotary_attention, platform=CPU)
  registry.register("attention.cached", attention.cached_attention, platform=CPU)
  registry.register("argmax", argmax.argmax, platform=CPU)
