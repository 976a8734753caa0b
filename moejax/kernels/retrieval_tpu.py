"""Product-key top-k retrieval as one fused Pallas TPU (Mosaic TensorCore) kernel.

Same contract as :func:`moejax.kernels.retrieval_xla.product_key_topk`. The grid is
(heads, token blocks) over queries laid out ``[h, T, d_key]``; a step takes one head's block
of query rows with that head's sub-keys (or the shared ones, fetched once) and, in VMEM:

1. half-scores ``s1 = q1·keys1ᵀ``, ``s2 = q2·keys2ᵀ`` ``[rows, n]`` on the MXU (f32, highest
   precision) against the sub-keys held in VMEM; they are never written to HBM;
2. per-half top-k: k rounds of (row max, lowest index attaining it, mask it out), which is
   what ``lax.top_k`` returns (ties go to the lower index); each round's value and index
   are written straight into the candidate lanes that use that rank;
3. the ``k·ln k`` candidate set of :func:`retrieval_xla.candidate_pairs` — pairs of
   ranks (a, b) with (a+1)(b+1) <= k, in the reference's order — as a ``[rows, C]`` matrix
   ``v1[a] + v2[b]`` (C padded to a multiple of 128 lanes with -inf);
4. the final top-k over the candidates (k rounds of max, lowest position, mask), whose
   product index ``i1[a]·n + i2[b]`` is picked with the same one-hot.

Only the scores and indices go back to HBM, stored ``[h, k, T]`` (tokens on lanes,
dense) and transposed outside. Gradients: a custom VJP whose
backward is the VJP of :func:`retrieval_xla.rescore` at the selected indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels import retrieval_xla as ref

NEG_INF = float("-inf")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def candidate_lanes(k: int, pow2: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """:func:`retrieval_xla.candidate_pairs` as two ``[1, C_pad]`` int32 rows (rank a,
  rank b of each candidate lane; -1 on the padding lanes); C_pad a multiple of 128, or
  with ``pow2`` a power of two >= 16 (Triton)."""
  pa, pb = ref.candidate_pairs(k)
  c_pad = max(16, _next_pow2(len(pa))) if pow2 else _round_up(len(pa), 128)
  la = np.full((1, c_pad), -1, np.int32)
  lb = np.full((1, c_pad), -1, np.int32)
  la[0, :len(pa)] = pa
  lb[0, :len(pb)] = pb
  return la, lb


def _retrieval_math(half_scores, lane_a, lane_b, k: int, n: int, width: int | None = None):
  """The whole retrieval for one block of rows (shared by the TPU and GPU kernels).

  ``half_scores(half)`` gives the f32 half-scores ``[rows, n_pad]`` of half 0 or 1 (columns
  >= n are padding and never selected); lane_a, lane_b ``[1, C_pad]`` from
  :func:`candidate_lanes`. Returns scores ``[rows, width]`` f32 and indices
  ``[rows, width]`` int32 (columns >= k are zero; width defaults to k).

  Each top-k is k rounds of (row max, lowest lane attaining it, mask it out): what
  ``lax.top_k`` returns, ties to the lower index. While half 1 yields its rank-a entry it is
  written to every candidate lane with that rank a (likewise half 2 and rank b), so the
  candidate matrix ``v1[a] + v2[b]`` over the down-set (a+1)(b+1) <= k is built without
  gathers and in the reference's candidate order (same tie-breaking).
  """
  s = half_scores(0)
  rows, n_pad = s.shape
  c_pad = lane_a.shape[-1]
  iota_n = jax.lax.broadcasted_iota(jnp.int32, (rows, n_pad), 1)
  lane_a = jnp.broadcast_to(lane_a, (rows, c_pad))
  lane_b = jnp.broadcast_to(lane_b, (rows, c_pad))

  def half(s, lanes, init):
    if n_pad != n:
      s = jnp.where(iota_n < n, s, NEG_INF)

    def body(j, carry):
      s, cv, ci = carry
      v = jnp.max(s, axis=-1, keepdims=True)
      p = jnp.min(jnp.where(s == v, iota_n, n_pad), axis=-1, keepdims=True)
      s = jnp.where(iota_n == p, NEG_INF, s)
      here = lanes == j
      return s, jnp.where(here, v, cv), jnp.where(here, p, ci)

    cv0 = jnp.full((rows, c_pad), init, jnp.float32)
    ci0 = jnp.zeros((rows, c_pad), jnp.int32)
    _, cv, ci = jax.lax.fori_loop(0, k, body, (s, cv0, ci0))
    return cv, ci

  cv1, ci1 = half(s, lane_a, NEG_INF)          # padding lanes stay -inf
  cv2, ci2 = half(half_scores(1), lane_b, 0.0)
  cand = cv1 + cv2                                               # [rows, C_pad]
  cidx = ci1 * n + ci2
  lane = jax.lax.broadcasted_iota(jnp.int32, (rows, c_pad), 1)

  width = width or k
  col = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)

  def body(j, carry):
    cand, out_s, out_i = carry
    v = jnp.max(cand, axis=-1, keepdims=True)
    p = jnp.min(jnp.where(cand == v, lane, c_pad), axis=-1, keepdims=True)
    here = lane == p
    idx = jnp.max(jnp.where(here, cidx, -1), axis=-1, keepdims=True)
    cand = jnp.where(here, NEG_INF, cand)
    out = col == j
    return cand, jnp.where(out, v, out_s), jnp.where(out, idx, out_i)

  out_s = jnp.zeros((rows, width), jnp.float32)
  out_i = jnp.zeros((rows, width), jnp.int32)
  _, out_s, out_i = jax.lax.fori_loop(0, k, body, (cand, out_s, out_i))
  return out_s, out_i


def _dot_nt(a, b):
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)


def _kernel(q_ref, k1_ref, k2_ref, la_ref, lb_ref, s_ref, i_ref, *, k: int, n: int, dh: int):
  """Outputs are stored transposed, ``[k8, rows]`` (rows on lanes): an HBM array
  ``[rows, k]`` would be padded to 128 lanes (8x its size for k = 16)."""
  f32 = jnp.float32
  kp = s_ref.shape[0]

  def half_scores(half):
    q = q_ref[:, :dh] if half == 0 else q_ref[:, dh:]
    keys = k1_ref if half == 0 else k2_ref
    return _dot_nt(q.astype(f32), keys[...].astype(f32))        # [rows, n] on the MXU

  s, i = _retrieval_math(half_scores, la_ref[...], lb_ref[...], k, n, width=_round_up(k, 128))
  s_ref[...] = s.T[:kp]
  i_ref[...] = i.T[:kp]


def _interpret_params(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def block_rows_for(rows: int, n: int, block_rows: int | None = None) -> int:
  """Rows per grid step: 256 (128 for n > 1024), a multiple of 128 (rows sit on lanes in
  the outputs); one block of all rows (rounded up to 8) when that is fewer."""
  if block_rows is None:
    block_rows = 256 if n <= 1024 else 128
  block_rows = _round_up(block_rows, 128)
  return block_rows if rows > block_rows else _round_up(rows, 8)


def _group_layout(queries):
  """queries ``[..., h, d]`` -> ``[h, T, d]`` (T = all leading dims)."""
  h, d = queries.shape[-2:]
  return jnp.swapaxes(queries.reshape(-1, h, d), 0, 1)


def _ungroup(x, queries):
  """``[h, T, k]`` -> ``[..., h, k]``."""
  return jnp.swapaxes(x, 0, 1).reshape(queries.shape[:-1] + x.shape[-1:])


def topk_forward(queries, keys1, keys2, k: int, *, interpret=False,
                 block_rows: int | None = None):
  """The kernel alone (no VJP): ``(scores f32, indices int32)`` ``[..., h, k]``."""
  ref.check_shapes(queries, keys1, keys2, k)
  d = queries.shape[-1]
  dh = d // 2
  hk, n, _ = keys1.shape
  qg = _group_layout(queries)
  g, rows, _ = qg.shape
  tr = block_rows_for(rows, n, block_rows)
  rows_pad = _round_up(rows, tr)
  if rows_pad != rows:
    qg = jnp.pad(qg, ((0, 0), (0, rows_pad - rows), (0, 0)))
  grid = (g, rows_pad // tr)
  q_spec = pl.BlockSpec((None, tr, d), lambda gi, ri: (gi, ri, 0))
  if hk == 1:   # shared sub-keys: the same block every step, fetched once
    k_spec = pl.BlockSpec((None, n, dh), lambda gi, ri: (0, 0, 0))
  else:
    k_spec = pl.BlockSpec((None, n, dh), lambda gi, ri: (gi, 0, 0))
  kp = _round_up(k, 8)
  lane_a, lane_b = candidate_lanes(k)
  c_spec = pl.BlockSpec(lane_a.shape, lambda gi, ri: (0, 0))
  o_spec = pl.BlockSpec((None, kp, tr), lambda gi, ri: (gi, 0, ri))
  itemsize = jnp.dtype(queries.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * g * rows_pad * n * d + 8 * g * rows_pad * n * k,
      transcendentals=0,
      bytes_accessed=g * rows_pad * d * itemsize + 2 * hk * n * dh * keys1.dtype.itemsize
      + g * rows_pad * kp * 8)
  scores, idx = pl.pallas_call(
      functools.partial(_kernel, k=k, n=n, dh=dh),
      grid=grid,
      in_specs=[q_spec, k_spec, k_spec, c_spec, c_spec],
      out_specs=[o_spec, o_spec],
      out_shape=[jax.ShapeDtypeStruct((g, kp, rows_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, kp, rows_pad), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel")),
      cost_estimate=cost,
      interpret=_interpret_params(interpret),
      name="product_key_topk",
  )(qg, keys1, keys2, jnp.asarray(lane_a), jnp.asarray(lane_b))
  scores = jnp.swapaxes(scores[:, :k, :rows], 1, 2)               # [G, R, k]
  idx = jnp.swapaxes(idx[:, :k, :rows], 1, 2)
  return _ungroup(scores, queries), _ungroup(idx, queries)


def with_rescore_vjp(forward):
  """Wrap ``forward(queries, keys1, keys2) -> (scores, indices)`` in a custom VJP whose
  backward is the VJP of :func:`retrieval_xla.rescore` at the returned indices
  (chunked over tokens: :func:`retrieval_xla.rescore_vjp`)."""

  @jax.custom_vjp
  def f(queries, keys1, keys2):
    return forward(queries, keys1, keys2)

  def fwd(queries, keys1, keys2):
    scores, idx = forward(queries, keys1, keys2)
    return (scores, idx), (queries, keys1, keys2, idx)

  def bwd(res, cts):
    queries, keys1, keys2, idx = res
    g_scores, _ = cts
    return ref.rescore_vjp(queries, keys1, keys2, idx, g_scores)

  f.defvjp(fwd, bwd)
  return f


def product_key_topk(queries: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int, *,
                     interpret=False, block_rows: int | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Exact product-key top-k (the reference's contract) as a fused Pallas TPU kernel.

  Args:
    queries: ``[..., h, d_key]`` f32 or bf16.
    keys1, keys2: sub-keys ``[h or 1, n, d_key/2]`` (n <= ~1024, d_key/2 <= 128 keep the
      kernel's VMEM modest).
    k: keys to return, ``1 <= k <= n``.
    interpret: False (compile with Mosaic), True (TPU interpret mode on CPU with default
      :class:`pltpu.InterpretParams`) or a :class:`pltpu.InterpretParams`.
    block_rows: query rows per grid step (default 256; 128 when n > 1024).

  Returns:
    ``(scores float32, indices int32)``, both ``[..., h, k]``, scores descending,
    ``index = i1·n + i2``. Differentiable w.r.t. queries and sub-keys through the scores.
  """
  ref.check_shapes(queries, keys1, keys2, k)
  forward = functools.partial(topk_forward, k=k, interpret=interpret, block_rows=block_rows)
  return with_rescore_vjp(forward)(queries, keys1, keys2)
