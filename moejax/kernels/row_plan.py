"""The row-major view of a batch of retrievals, shared by every backward pass.

A lookup's table gradient is a sum over retrievals per table row. Sorting the M = T·h·k
retrieved row ids once gives, for each distinct row, the contiguous run of retrievals
that touched it; a backward kernel then sums each run into one row without atomics
(deterministic on every backend), writing either a dense ``[N, d]`` gradient or the
compact ``[U, d]`` rows that lazy Adam consumes. The plan is integers only: O(M log M),
no ``d``; :func:`run_sums` is those sums in XLA ops.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.kernels import registry



def num_unique_slots(num_entries: int, num_rows: int) -> int:
  """Static size U of the distinct rows: no more than the retrievals or the table rows."""
  return min(num_entries, num_rows)


def unique_rows(indices: jax.Array, num_rows: int) -> jax.Array:
  """The distinct rows of ``indices`` ascending, padded with ``num_rows``: ``[U]`` int32.

  Sort-free when the table is not much larger than the batch of retrievals (marks in an
  ``[N]`` array, a cumsum gives each marked row its rank: O(N + M) in sequential passes,
  against ``jnp.unique``'s O(M log M) sort); a sort otherwise.
  """
  flat = indices.reshape(-1).astype(jnp.int32)
  u = num_unique_slots(flat.shape[0], num_rows)
  if not _sort_free(num_rows, flat.shape[0]):
    return jnp.unique(flat, size=u, fill_value=num_rows).astype(jnp.int32)
  marks = jnp.zeros((num_rows,), jnp.int32).at[flat].set(1, mode="drop")
  rank = jnp.cumsum(marks) - 1                              # [N] slot of each marked row
  dest = jnp.where(marks > 0, rank, u)                      # unmarked rows: dropped
  return jnp.full((u,), num_rows, jnp.int32).at[dest].set(
      jnp.arange(num_rows, dtype=jnp.int32), mode="drop")


def _sort_free(num_rows: int, num_entries: int) -> bool:
  """Whether O(N) mark-and-cumsum passes replace the sort: where the platform's backend
  says so (``row_plan.sort_free``; the sort elsewhere)."""
  sort_free = registry.find("row_plan.sort_free")
  return sort_free is not None and sort_free(num_rows, num_entries)


def row_slots(indices: jax.Array, rows: jax.Array, num_rows: int) -> jax.Array:
  """Slot of each index in ``rows``: ``rows[slots] == indices``, same shape, int32.

  ``rows [U]``: distinct rows ascending, padded with ``num_rows``, containing every index
  (e.g. ``unique_rows(indices, N)``, or the rows of a larger batch). An inverse map
  ``[N]`` instead of a binary search: O(N + U + M) gathers and scatters, no sort.
  """
  flat = indices.reshape(-1).astype(jnp.int32)
  if not _sort_free(num_rows, max(flat.shape[0], rows.shape[0])):
    return jnp.searchsorted(rows, indices).astype(jnp.int32)
  inverse = jnp.zeros((num_rows,), jnp.int32).at[rows].set(
      jnp.arange(rows.shape[0], dtype=jnp.int32), mode="drop")
  return jnp.take(inverse, indices, mode="clip")


class RowPlan(NamedTuple):
  """Retrievals sorted by row. M = number of retrievals, U = ``num_unique_slots(M, N)``.

  order:  ``[M]`` int32, flat retrieval ids (``t·hk + j`` of ``indices [T, hk]``) sorted by row
          (stable: ties keep token order, so sums are taken in a fixed order).
  rows:   ``[M]`` int32, ``indices.reshape(-1)[order]`` (ascending).
  unique: ``[U]`` int32, the distinct rows ascending, padded with N (= ``unique_rows``).
  starts: ``[U + 1]`` int32, run of ``unique[u]`` is ``order[starts[u]:starts[u+1]]``;
          padding slots have empty runs (start = end = M).
  """

  order: jax.Array
  rows: jax.Array
  unique: jax.Array
  starts: jax.Array


def row_plan(indices: jax.Array, num_rows: int) -> RowPlan:
  """``indices [..., h, k]`` (or any shape) of rows in ``[0, num_rows)`` -> :class:`RowPlan`."""
  flat = indices.reshape(-1).astype(jnp.int32)
  m = flat.shape[0]
  u = num_unique_slots(m, num_rows)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  rows = flat[order]
  is_new = jnp.concatenate([jnp.ones((1,), bool), rows[1:] != rows[:-1]])
  seg = jnp.cumsum(is_new.astype(jnp.int32)) - 1
  unique = jnp.full((u,), num_rows, jnp.int32).at[seg].set(rows, mode="drop")
  starts = jnp.searchsorted(rows, unique, side="left").astype(jnp.int32)
  starts = jnp.concatenate([starts, jnp.full((1,), m, jnp.int32)])
  return RowPlan(order, rows, unique, starts)


def run_sums(order: jax.Array, starts: jax.Array, coefs: jax.Array,
             vectors: jax.Array) -> jax.Array:
  """Each run's sum, in float32 (XLA ops): ``out[u] = Σ coefs[e] · vectors[e // H]`` over
  the retrievals ``e = order[q]``, ``q`` in ``[starts[u], starts[u+1])``. ``coefs [M]`` (or
  ``[T, H]``, M = T·H) in retrieval order, ``vectors [T, d]`` -> ``[U, d]`` with ``U =
  starts.shape[0] - 1``: a table's compact row gradients from the lookup's factors."""
  m = order.shape[0]
  h = m // vectors.shape[0]
  contrib = coefs.reshape(-1)[order][:, None] * vectors[order // h].astype(jnp.float32)
  run = jnp.searchsorted(starts[1:], jnp.arange(m), side="right")   # run of order[q]
  return jax.ops.segment_sum(contrib, run, num_segments=starts.shape[0] - 1,
                             indices_are_sorted=True)
