"""Product-key top-k retrieval as one fused Pallas GPU kernel (Triton backend).

The algorithm of :mod:`moejax.kernels.retrieval_tpu` (the same kernel body,
``retrieval_tpu._retrieval_math``): one program takes a block of query rows of one head,
computes both half-score blocks ``[rows, n]`` in registers (f32 FMAs over d_key/2),
per-half top-k by k rounds of (max, lowest index, mask), the ``k·ln k`` candidate matrix
``v1[a] + v2[b]`` over the down-set (a+1)(b+1) <= k and the final top-k; only
``[rows, k]`` scores and indices reach global memory. Same custom VJP (backward = VJP of
:func:`retrieval_xla.rescore`).

Triton blocks need power-of-two dims: rows, n, d_key/2 and k are padded (padded keys are
masked to -inf, padded query rows and outputs are sliced off). The Triton backend is chosen
by passing ``pallas.triton.CompilerParams`` (a plain ``pallas_call`` goes to Mosaic GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from moejax.kernels import retrieval_xla as ref
from moejax.kernels.retrieval_tpu import (_next_pow2, _retrieval_math, candidate_lanes,
                                          with_rescore_vjp)

# Sub-keys are passed transposed, [hk, d_key/2, n]: row j of a block is feature j of all keys.


def _kernel(q1_ref, q2_ref, k1_ref, k2_ref, la_ref, lb_ref, s_ref, i_ref, *, k: int, n: int,
            dh: int):
  f32 = jnp.float32

  def half_scores(half):
    # s = q·kᵀ as dh rank-1 updates on [rows, n_pad] (IEEE f32 FMAs). A tl.dot over the
    # whole [n_pad, dh] key block would stage both operands in shared memory (over the
    # H100's 227 KiB at n = 1024); f32 IEEE dots do not use tensor cores anyway.
    q_ref = q1_ref if half == 0 else q2_ref
    kt_ref = k1_ref if half == 0 else k2_ref                     # [dh_pad, n_pad]
    rows, n_pad = q_ref.shape[0], kt_ref.shape[1]

    def body(j, acc):
      qj = q_ref[:, pl.ds(j, 1)].astype(f32)                     # [rows, 1]
      kj = kt_ref[pl.ds(j, 1), :].astype(f32)                    # [1, n_pad]
      return acc + qj * kj

    return jax.lax.fori_loop(0, dh, body, jnp.zeros((rows, n_pad), f32))

  s, i = _retrieval_math(half_scores, la_ref[...], lb_ref[...], k, n, width=s_ref.shape[-1])
  s_ref[...] = s
  i_ref[...] = i


def launch_config(n_pad: int, block_rows: int | None = None) -> tuple[int, int]:
  """(rows per program, num_warps). Each program holds a ``[rows, n_pad]`` f32 score block
  in registers; small programs win, since a larger block spills registers to local memory
  (benchmarks/RESULTS.md has the sweep)."""
  if block_rows is None:
    block_rows = max(1, 4096 // n_pad) if n_pad >= 1024 else min(32, 2048 // n_pad)
  num_warps = 2 if block_rows * n_pad >= 2048 else 1
  return block_rows, num_warps


def topk_forward(queries, keys1, keys2, k: int, *, block_rows: int | None = None,
                 num_warps: int | None = None, num_stages: int = 1):
  """The kernel alone (no VJP): ``(scores f32, indices int32)`` ``[..., h, k]``."""
  ref.check_shapes(queries, keys1, keys2, k)
  h, d = queries.shape[-2:]
  dh = d // 2
  hk, n, _ = keys1.shape
  n_pad = max(16, _next_pow2(n))
  dh_pad = max(16, _next_pow2(dh))
  kp = max(16, _next_pow2(k))
  tr, warps = launch_config(n_pad, block_rows)
  num_warps = num_warps or warps

  qg = jnp.swapaxes(queries.reshape(-1, h, d), 0, 1)               # [h, T, d]
  rows = qg.shape[1]
  rows_pad = -(-rows // tr) * tr
  pad_q = ((0, 0), (0, rows_pad - rows), (0, dh_pad - dh))
  q1 = jnp.pad(qg[..., :dh], pad_q)
  q2 = jnp.pad(qg[..., dh:], pad_q)
  pad_k = ((0, 0), (0, dh_pad - dh), (0, n_pad - n))
  k1 = jnp.pad(jnp.swapaxes(keys1, 1, 2), pad_k)                  # [hk, dh_pad, n_pad]
  k2 = jnp.pad(jnp.swapaxes(keys2, 1, 2), pad_k)
  lane_a, lane_b = candidate_lanes(k, pow2=True)

  q_spec = pl.BlockSpec((None, tr, dh_pad), lambda gi, ri: (gi, ri, 0))
  if hk == 1:
    k_spec = pl.BlockSpec((None, dh_pad, n_pad), lambda gi, ri: (0, 0, 0))
  else:
    k_spec = pl.BlockSpec((None, dh_pad, n_pad), lambda gi, ri: (gi, 0, 0))
  c_spec = pl.BlockSpec(lane_a.shape, lambda gi, ri: (0, 0))
  o_spec = pl.BlockSpec((None, tr, kp), lambda gi, ri: (gi, ri, 0))
  scores, idx = pl.pallas_call(
      functools.partial(_kernel, k=k, n=n, dh=dh),
      grid=(h, rows_pad // tr),
      in_specs=[q_spec, q_spec, k_spec, k_spec, c_spec, c_spec],
      out_specs=[o_spec, o_spec],
      out_shape=[jax.ShapeDtypeStruct((h, rows_pad, kp), jnp.float32),
                 jax.ShapeDtypeStruct((h, rows_pad, kp), jnp.int32)],
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="product_key_topk",
  )(q1, q2, k1, k2, jnp.asarray(lane_a), jnp.asarray(lane_b))
  lead = queries.shape[:-1]
  scores = jnp.swapaxes(scores[:, :rows, :k], 0, 1).reshape(lead + (k,))
  idx = jnp.swapaxes(idx[:, :rows, :k], 0, 1).reshape(lead + (k,))
  return scores, idx


def product_key_topk(queries: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int, *,
                     block_rows: int | None = None, num_warps: int | None = None,
                     num_stages: int = 1) -> tuple[jax.Array, jax.Array]:
  """Exact product-key top-k (the reference's contract) as a fused Pallas Triton kernel.

  Args:
    queries: ``[..., h, d_key]`` f32 or bf16.
    keys1, keys2: sub-keys ``[h or 1, n, d_key/2]``.
    k: keys to return, ``1 <= k <= n``.
    block_rows, num_warps, num_stages: launch overrides (defaults from
      :func:`launch_config`).

  Returns:
    ``(scores float32, indices int32)``, both ``[..., h, k]``, scores descending,
    ``index = i1·n + i2``. Differentiable w.r.t. queries and sub-keys through the scores.
  """
  ref.check_shapes(queries, keys1, keys2, k)
  forward = functools.partial(topk_forward, k=k, block_rows=block_rows,
                              num_warps=num_warps, num_stages=num_stages)
  return with_rescore_vjp(forward)(queries, keys1, keys2)
