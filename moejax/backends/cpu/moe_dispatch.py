"""The MoE dispatch's CPU paths, registered as ``moe.capacity_moves`` and
``moe.grouped_ffn.blocked`` (``moe.dropless_default`` on CPU names it).

* :func:`slot_rows` -- the capacity paths' dispatch and combine as row gathers and a
  weighted scatter-add instead of the mask einsums, where no mesh axis is left to XLA's
  partitioner (the einsums' sharding is what GSPMD partitions): the same values without
  their ``O(S · E · C · D)`` multiply-adds per group, a fifth of the expert FLOPs at
  S = 128, E = 8, C = 40.
* :data:`BLOCKED` -- dropless grouped FFN: each expert's rows padded to blocks of a few
  power-of-two sizes, one fused FFN per block in ``fori_loop`` s (:mod:`.grouped_mlp`).
  XLA:CPU's ``ragged_dot`` is a masked dense dot over all experts, about E times the
  FLOPs. The rows move with XLA's gather into the buffer and the CPU row kernels back
  (``native.gather_weighted_sum``, ``gather_dot``; XLA's ops where they do not run),
  gradients included: XLA:CPU's gather back and weighted sum over the ``k`` choices are
  element-wise loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax.backends.cpu import grouped_mlp as gml
from moejax.backends.cpu import native
from moejax.kernels import row_ops


# ----------------------------------------------------------------------- capacity paths


def slot_rows(x, plan):
  """``(gather, scatter)``: the dispatch and combine mask einsums as row moves, or None
  (the einsums) under a mesh with an axis left to XLA's partitioner.

  ``gather(x [G, S, D]) -> [E, G, C, D]`` copies each slot's token (0 in empty slots);
  ``scatter(ye [E, G, C, D]) -> [G, S, D]`` adds each slot's row times its combine weight
  into its token. The same values as the einsums (a one-hot product is a copy; a token's
  sum over its slots adds the same products)."""
  if not sharding.mesh_is_local():
    return None
  token, weight, valid = plan.slots()                                # [G, E, C]
  g, s, d = x.shape
  rows = jnp.arange(g, dtype=jnp.int32)[:, None, None] * s + token
  rows = jnp.transpose(jnp.where(valid, rows, g * s), (1, 0, 2))     # [E, G, C]; empty: g·s
  weight = jnp.transpose(weight, (1, 0, 2))[..., None]

  def gather(x):
    return jnp.take(x.reshape(g * s, d), rows, axis=0, mode="fill", fill_value=0)

  def scatter(ye):
    out = jnp.zeros((g * s, ye.shape[-1]), ye.dtype)
    return out.at[rows].add(weight.astype(ye.dtype) * ye, mode="drop").reshape(g, s, -1)
  return gather, scatter


# ----------------------------------------------------------------------------- dropless


BLOCK_LEVELS = 5   # block sizes of the blocked path: the largest and 4 halvings


def default_block(rows: int, num_experts: int) -> int:
  """Largest block of the blocked path: a power of two in [8, 1024], the rows per expert
  rounded up (1024 from 8192 rows on 8 experts). Smaller sizes halve down from it
  (:func:`grouped_mlp.block_sizes`, :data:`BLOCK_LEVELS` = 5 levels: 1024 ... 64).

  A balanced expert then runs one or two big blocks and a short tail; of the ladders
  tried side by side (``benchmarks/RESULTS.md``), this rule's (1024 ... 64 there) was the
  fastest."""
  b = max(rows // num_experts, 1)
  return int(min(max(1 << (b - 1).bit_length(), 8), 1024))


def _counting_sort(expert, num_experts):
  """``counts [E]`` of ``expert [n]`` (``num_experts`` for none: not counted) and each
  row's rank among its expert's rows ``[n]``, rows in their order (a cumsum of a one-hot:
  no argsort)."""
  hot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)        # [n, E]; none: all 0
  return hot.sum(0), jnp.sum(jnp.cumsum(hot, 0) * hot, 1) - 1


def _slots(expert, rank, offset, m):
  """``dest [n]``: row ``offset[expert] + rank`` of a buffer of ``m`` rows (``m`` for rows
  of no expert); ``back [m]``: its inverse (``n`` in rows no grouped row fills)."""
  e, n = offset.shape[0], expert.shape[0]
  dest = jnp.where(expert < e, offset[jnp.minimum(expert, e - 1)] + rank, m)
  back = jnp.full((m,), n, jnp.int32).at[dest].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  return dest, back


def _blocked_buffer(expert, num_experts, block):
  """Where the grouped rows of ``expert [n]`` (``num_experts`` for none) go in the blocked
  buffer (:mod:`grouped_mlp`): ``dest [n]``, ``back [m]`` (:func:`_slots`), the
  :class:`Blocks`, their sizes, and ``m``."""
  sizes = gml.block_sizes(block or default_block(expert.shape[0], num_experts), BLOCK_LEVELS)
  m = gml.buffer_rows(expert.shape[0], num_experts, sizes)
  counts, rank = _counting_sort(expert, num_experts)
  offset, blocks = gml.block_layout(counts, sizes, m)
  return (*_slots(expert, rank, offset, m), blocks, sizes, m)


def blocked_grouped_mlp(x, source, expert, weights, activation, block=0):
  """Grouped FFN of rows ``x[source[r]]`` by ``expert[r]`` (:mod:`grouped_mlp`).

  Args:
    x: ``[t, embed]`` source rows.
    source: int ``[n]``, the source row of each grouped row.
    expert: int ``[n]``, its expert; ``experts`` (= ``wi.shape[0]``) for none.
    block: largest block, a power of two (0: :func:`default_block`).

  Returns:
    ``[n, embed]``; 0 for rows of no expert.
  """
  wi, wg, wo = weights
  dest, back, blocks, sizes, m = _blocked_buffer(expert, wi.shape[0], block)
  src = jnp.full((m,), x.shape[0], jnp.int32).at[dest].set(source, mode="drop")
  xb = x.at[src].get(mode="fill", fill_value=0)                     # [m, D], padding rows 0
  yb = gml.grouped_mlp(xb, wi, wg, wo, blocks, sizes, activation)   # [m, D]
  routed = (expert < wi.shape[0]).astype(yb.dtype)[:, None]         # each row: 1 choice
  return _rows_out(yb, dest[:, None], back, routed)


def _int_zeros(a):
  """The cotangent of an integer operand."""
  return np.zeros(a.shape, jax.dtypes.float0)


# The most (token, choice) pairs that take the native routed FFN (``native.routed_ffn``):
# it reads each chosen expert's weights once and adds every weight vector into each of the
# expert's rows' sums, a stream for a few rows per expert; with many, those sums' loads and
# stores outweigh the reading, and the blocked path's matmuls win.
ROUTED_FFN_MAX_PAIRS = 32


def blocked_combine(xt, expert, weight, weights, activation, options):
  """Dropless top-k FFN of tokens ``xt [t, embed]`` on the blocked path, combined (a few
  tokens: :func:`_routed_ffn`, the same values).

  Args:
    expert: int ``[t, k]``, each choice's expert (``experts`` for none).
    weight: ``[t, k]`` combine weights (0 for choices of no expert).
    options: the layer's ``DispatchOptions`` (``block``: the largest block, 0: default).

  Returns:
    ``[t, embed]``: ``sum_j weight[t, j] * FFN_{expert[t, j]}(xt[t])``.
  """
  wi, wg, wo = weights
  t, k = expert.shape
  if t * k <= ROUTED_FFN_MAX_PAIRS and native.routed_ffn_usable(xt, wi, wg, wo, activation):
    return _routed_ffn(xt, expert, weight, wi, wg, wo, activation, options.block)
  return _blocked_combine(xt, expert, weight, weights, activation, options.block)


def _blocked_combine(xt, expert, weight, weights, activation, block):
  wi, wg, wo = weights
  t, k = expert.shape
  dest, back, blocks, sizes, m = _blocked_buffer(expert.reshape(t * k), wi.shape[0], block)
  dest = dest.reshape(t, k)
  xb = _rows_in(xt, back // k, dest)                                # [m, D]
  yb = gml.grouped_mlp(xb, wi, wg, wo, blocks, sizes, activation)   # [m, D]
  return _rows_out(yb, dest, back, weight.astype(yb.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _routed_ffn(xt, expert, weight, wi, wg, wo, activation, block):
  """:func:`_blocked_combine`'s values from the native kernel (a few tokens); its gradient
  is the blocked path's (recomputed: a few tokens)."""
  return native.routed_ffn(xt, expert, weight, wi, wg, wo, activation).astype(xt.dtype)


def _routed_ffn_fwd(xt, expert, weight, wi, wg, wo, activation, block):
  return (_routed_ffn(xt, expert, weight, wi, wg, wo, activation, block),
          (xt, expert, weight, wi, wg, wo))


def _routed_ffn_bwd(activation, block, res, dy):
  xt, expert, weight, wi, wg, wo = res
  blocked = lambda xt, weight, wi, wg, wo: _blocked_combine(xt, expert, weight, (wi, wg, wo),
                                                            activation, block)
  dxt, dweight, dwi, dwg, dwo = jax.vjp(blocked, xt, weight, wi, wg, wo)[1](dy)
  return dxt, _int_zeros(expert), dweight, dwi, dwg, dwo


_routed_ffn.defvjp(_routed_ffn_fwd, _routed_ffn_bwd)


def blocked_grouped(xs, group_sizes, weights, activation, options):
  """Grouped FFN of rows ``xs [m, embed]`` already grouped by expert (``group_sizes [E]``,
  rows past their sum belong to none): the expert-parallel dropless path's local FFN."""
  row = jnp.arange(xs.shape[0], dtype=jnp.int32)
  row_expert = jnp.searchsorted(jnp.cumsum(group_sizes), row, side="right")   # E: none
  return blocked_grouped_mlp(xs, row, row_expert, weights, activation, options.block)


@jax.custom_vjp
def _rows_in(x, src, dest):
  """The expert-ordered buffer ``x[src]`` ``[m, embed]`` (blocked or sorted) of token rows
  ``x [t, embed]``.

  ``src [m]`` is each buffer row's token, clipped into range: padding rows copy a real
  row, which is harmless (a padding row's output is never read, so its cotangent is 0 and
  it adds 0 to every weight gradient). ``dest [t, k]``, where each token's choices went
  (``m`` for none), makes the cotangent a sum of ``k`` rows per token, not a scatter-add.
  """
  return row_ops.take_rows(x, src)


def _rows_in_fwd(x, src, dest):
  return _rows_in(x, src, dest), (src, dest)


def _rows_in_bwd(res, dxb):
  src, dest = res
  m = dxb.shape[0]
  dx = native.gather_weighted_sum(dxb, dest, (dest < m).astype(dxb.dtype))
  return dx, _int_zeros(src), _int_zeros(dest)


_rows_in.defvjp(_rows_in_fwd, _rows_in_bwd)


@jax.custom_vjp
def _rows_out(yb, dest, back, weight):
  """``y[t] = sum_j weight[t, j] * yb[dest[t, j]]`` ``[t, embed]`` from the expert-ordered
  buffer ``yb [m, embed]``; ``back [m]`` is ``dest``'s inverse (``t * k`` in padding).
  Choices of no expert (``dest = m``, clipped) must have weight 0."""
  return native.gather_weighted_sum(yb, dest, weight)


def _rows_out_fwd(yb, dest, back, weight):
  return _rows_out(yb, dest, back, weight), (yb, dest, back, weight)


def _rows_out_bwd(res, dy):
  yb, dest, back, weight = res
  t, k = dest.shape
  m = yb.shape[0]
  real = back < t * k
  w_back = jnp.where(real, weight.reshape(t * k)[jnp.minimum(back, t * k - 1)], 0)   # [m]
  dyb = native.gather_weighted_sum(dy, (back // k)[:, None], w_back[:, None])  # [m, D]
  dw = jnp.where(dest < m, native.gather_dot(yb, dest, dy), 0)                # [t, k]
  return dyb, _int_zeros(dest), _int_zeros(back), dw.astype(weight.dtype)


_rows_out.defvjp(_rows_out_fwd, _rows_out_bwd)
