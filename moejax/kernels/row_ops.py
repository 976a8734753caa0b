"""Row gathers and contractions of the XLA lookup and retrieval, as XLA ops.

The functions here are the portable forms; a backend may register its own under
``row_ops`` (the CPU's native kernels read each random row once and contract it in
place): :func:`implementation` gives the target platform's. Each keeps the signature and
values of the function here, and ``fused(*operands)`` says whether its contractions hold
no gathered rows for these operands (then the callers run one chunk: nothing to keep in
cache). None is differentiable (the callers have custom VJPs).
"""

from __future__ import annotations

import sys
from types import ModuleType

import jax
import jax.numpy as jnp

from moejax.kernels import registry

def implementation() -> ModuleType:
  """The target platform's row ops: its backend's, else this module."""
  return registry.find("row_ops") or sys.modules[__name__]


def fused(*operands) -> bool:
  """Whether the contractions run without gathered rows: never in XLA."""
  del operands
  return False


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(x, k)``: values ``[..., k]`` (descending), int32 indices ``[..., k]``."""
  return tuple(jax.lax.top_k(x, k))


def take_rows(table: jax.Array, indices: jax.Array) -> jax.Array:
  """``jnp.take(table, indices, axis=0, mode="clip")``: ``table [N, d]``, int ``indices
  [...]`` -> ``[..., d]``."""
  return jnp.take(table, indices, axis=0, mode="clip")


def gather_dot(table: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """``out[t, j] = x[t] · table[indices[t, j]]``: ``table [N, d]``, ``indices [T, H]``,
  ``x [T, d]`` -> ``[T, H]`` in ``x.dtype``."""
  return jnp.einsum("td,tjd->tj", x, take_rows(table, indices).astype(x.dtype))


def gather_weighted_sum(table: jax.Array, indices: jax.Array, w: jax.Array) -> jax.Array:
  """``out[t] = Σ_j w[t, j] · table[indices[t, j]]``: ``table [N, d]``, ``indices, w
  [T, H]`` -> ``[T, d]`` in ``w.dtype``."""
  return jnp.einsum("tj,tjd->td", w, take_rows(table, indices).astype(w.dtype))


def scatter_outer_add(acc: jax.Array | jax.ShapeDtypeStruct, targets: jax.Array, coef: jax.Array,
                      vec: jax.Array) -> jax.Array:
  """``acc.at[targets[t, j]].add(coef[t, j] · vec[t], mode="drop")`` in ``(t, j)`` order:
  ``acc [R, d]`` (a ``ShapeDtypeStruct``: zeros), ``targets, coef [T, H]``, ``vec [T, d]``
  -> ``[R, d]``."""
  if isinstance(acc, jax.ShapeDtypeStruct):
    acc = jnp.zeros(acc.shape, acc.dtype)
  rows = (coef[..., None] * vec[:, None, :]).reshape(-1, acc.shape[-1]).astype(acc.dtype)
  return acc.at[targets.reshape(-1)].add(rows, mode="drop")


def scatter_outer_add_pair(acc1, acc2, targets: jax.Array, coef1: jax.Array, vec1: jax.Array,
                           coef2: jax.Array, vec2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(scatter_outer_add(acc1, targets, coef1, vec1), scatter_outer_add(acc2, targets,
  coef2, vec2))``."""
  return (scatter_outer_add(acc1, targets, coef1, vec1),
          scatter_outer_add(acc2, targets, coef2, vec2))
