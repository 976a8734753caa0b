"""The PEER / PKM expert lookup in plain JAX: the reference the Pallas kernels must equal.

PEER: ``y = Σ_{h,k} score · σ(x · down[i]) · up[i]``; PKM: ``y = Σ_{h,k} score · up[i]``
(the same lookup without ``down``), with ``i = indices[..., h, k]``.

Shapes: x ``[..., d]`` (any leading token dims), indices / scores ``[..., h, k]``, tables
``[N, d]`` -> y ``[..., d]`` in ``scores.dtype``.

Two gradient forms of the tables:

* :func:`lookup` — dense ``[N, d]`` table gradients (what optax over a dense table wants).
  Its custom VJPs regather the rows instead of saving them: the forward keeps no
  ``[..., h, k, d]`` residual; the backward builds one ``[..., h, k, d]`` row-gradient per
  table and scatter-adds it into the dense gradient.
* :func:`lookup_sparse` — row-sparse: the tables get no gradient; each table has a *tap*
  ``[U, d]`` (zeros) added to its rows ``unique_rows(indices, N)``, and the tap's gradient
  is the table gradient of exactly those rows, summed over repeats. Lazy Adam
  (``moejax.training.row_sparse``) consumes (unique rows, tap gradients) as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels import activations
from moejax.kernels.row_plan import unique_rows


# ------------------------------------------------------------- gathered-row contractions
#
# ``_after`` (an optimization barrier) orders each gather after the value it needs, so the
# program holds one [..., h, k, d] tensor at a time and the backward regather is not CSE'd
# with the forward gather.


def _after(indices, *deps):
  """``indices``, but only available once ``deps`` are computed."""
  return jax.lax.optimization_barrier((indices, *deps))[0]


def _gather(table, indices, dtype):
  # Gather first, then cast: casting the whole [N, d] table would cost O(N·d) per step.
  return jnp.take(table, indices, axis=0, mode="clip").astype(dtype)


def match_vma(ct, like):
  """Inside ``shard_map``: a cotangent with the device-variance type of its primal.

  A table replicated over (say) 'data' gets row-gradients that differ per data shard: its
  cotangent is their sum (psum). Outside shard_map this is the identity.
  """
  def varying(a):   # jax 0.10: aval.mat.varying (older: aval.vma)
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))
  have, want = varying(ct), varying(like)
  if have - want:
    ct = jax.lax.psum(ct, tuple(sorted(have - want)))
  if want - have:
    ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to="varying")
  return ct


def _scatter_rows(table, indices, rows):
  d = table.shape[-1]
  return jnp.zeros_like(table).at[indices.reshape(-1)].add(
      rows.reshape(-1, d).astype(table.dtype), mode="drop")


@jax.custom_vjp
def gather_dot(table: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """``einsum('...d,...hkd->...hk', x, table[indices])`` (PEER down-projection)."""
  return jnp.einsum("...d,...hkd->...hk", x, _gather(table, indices, x.dtype))


def _gather_dot_fwd(table, indices, x):
  return gather_dot(table, indices, x), (table, indices, x)


def _gather_dot_bwd(res, da):
  table, indices, x = res
  da = da.astype(x.dtype)
  drows = jnp.einsum("...hk,...d->...hkd", da, x)
  dtable = _scatter_rows(table, _after(indices, da), drows)
  rows = _gather(table, _after(indices, dtable), x.dtype)
  dx = jnp.einsum("...hk,...hkd->...d", da, rows)
  return match_vma(dtable, table), None, match_vma(dx, x)


gather_dot.defvjp(_gather_dot_fwd, _gather_dot_bwd)


@jax.custom_vjp
def gather_weighted_sum(table: jax.Array, indices: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum('...hk,...hkd->...d', w, table[indices])`` (PEER up-projection, PKM read)."""
  return jnp.einsum("...hk,...hkd->...d", w, _gather(table, _after(indices, w), w.dtype))


def _gather_weighted_sum_fwd(table, indices, w):
  return gather_weighted_sum(table, indices, w), (table, indices, w)


def _gather_weighted_sum_bwd(res, dy):
  table, indices, w = res
  dy = dy.astype(w.dtype)
  drows = jnp.einsum("...hk,...d->...hkd", w, dy)
  dtable = _scatter_rows(table, _after(indices, dy), drows)
  rows = _gather(table, _after(indices, dtable), w.dtype)
  dw = jnp.einsum("...d,...hkd->...hk", dy, rows)
  return match_vma(dtable, table), None, match_vma(dw, w)


gather_weighted_sum.defvjp(_gather_weighted_sum_fwd, _gather_weighted_sum_bwd)


# ---------------------------------------------------------------------------- the lookup


def lookup(x: jax.Array | None, indices: jax.Array, scores: jax.Array, up: jax.Array,
           down: jax.Array | None = None, *, activation: str = "gelu_tanh") -> jax.Array:
  """PEER (``down`` given) or PKM (``down=None``, ``x`` unused) lookup; dense table grads.

  Returns ``y [..., d]`` in ``scores.dtype``; differentiable w.r.t. x, scores and tables.
  """
  if down is None:
    w = scores
  else:
    act, _ = activations.get(activation)
    w = act(gather_dot(down, indices, x.astype(scores.dtype))) * scores
  return gather_weighted_sum(up, indices, w)


def lookup_sparse(x: jax.Array | None, indices: jax.Array, scores: jax.Array, up: jax.Array,
                  down: jax.Array | None, taps: tuple[jax.Array | None, jax.Array], *,
                  activation: str = "gelu_tanh", rows: jax.Array | None = None) -> jax.Array:
  """:func:`lookup` with row taps instead of table gradients (row-sparse training).

  ``taps = (tap_down or None, tap_up)``, each ``[U, d]`` with ``U = num_unique_slots``: rows
  ``table[rows[s]] + tap[s]`` are used, tables are not differentiated. ``rows [U]``: the
  distinct rows ascending, padded with N, a superset of ``indices`` (default
  ``unique_rows(indices, N)``; a batch shard passes the rows of the whole batch).
  The gradient of a tap is the table gradient of its row (summed over every retrieval).
  Taps are zeros (row-sparse training attaches fresh ones each step); this reference adds
  them, the Pallas kernels do not read their values (only their gradients are defined).
  Plain autodiff: the gathered ``[..., h, k, d]`` rows are kept for the backward pass.
  """
  tap_down, tap_up = taps
  unique = unique_rows(indices, up.shape[0]) if rows is None else rows
  slots = jnp.searchsorted(unique, indices).astype(jnp.int32)        # [..., h, k]
  dt = scores.dtype

  def rows(table, tap):
    return (_gather(jax.lax.stop_gradient(table), indices, dt)
            + jnp.take(tap, slots, axis=0).astype(dt))

  if down is None:
    w = scores
  else:
    act, _ = activations.get(activation)
    w = act(jnp.einsum("...d,...hkd->...hk", x.astype(dt), rows(down, tap_down))) * scores
  return jnp.einsum("...hk,...hkd->...d", w, rows(up, tap_up))
