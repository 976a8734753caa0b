"""Fused grouped expert FFN over expert-sorted row blocks, in plain JAX (dropless on CPU).

Layout (:func:`block_layout`): expert ``e``'s rows fill one segment of a static buffer
``[rows, embed]``, padded to a multiple of the smallest block size, and the segment is cut
into blocks: as many of the largest size as fit, then at most one of each smaller size (the
binary digits of the rest). Sizes (512, 256, 128, 64) and 1000 rows: 512 + 256 + 128 + 64 +
64 (1024 rows, 24 of them padding).

:func:`grouped_mlp` runs, per block, ``act(x @ wi[e]) * (x @ wg[e]) @ wo[e]`` with its
expert's matrices picked by ``dynamic_index_in_dim``, in ``lax.fori_loop`` s over the blocks
in use (one loop per size, a dynamic trip count: unused blocks cost nothing), and the
weight gradients accumulate per expert in the loop carry (megablox ``gmm`` / ``tgmm``
without Pallas, plus the activation). A custom VJP, as autodiff cannot reverse a loop with
a dynamic trip count.

Why this shape on XLA:CPU (measured at 8192 rows, embed 512, mlp 1024, 8 experts; the
figures are in ``benchmarks/RESULTS.md``):

* ``jax.lax.ragged_dot`` is a masked dense dot over all experts (E times the FLOPs), and
  gathering one weight matrix per block (``w[block_expert]``, ``[blocks, embed, mlp]``)
  copies the weights and makes their gradient a scatter-add of as many matrices.
* One dot per block runs further below one big dot's rate the smaller the block, while
  padding every expert to a single block size wastes half a block per expert: big blocks
  for the bulk, small ones for the tail get both.
* Fused per block, the activation and its derivative run on a ``[block, mlp]`` tile in
  cache; as separate grouped matmuls they are passes over whole ``[rows, mlp]`` buffers
  (and zero-filled loop outputs), a sizeable part of the step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from moejax.kernels import activations as act_lib


class Blocks(NamedTuple):
  """The blocks of one size: ``start [max]`` (first row), ``expert [max]``; the first
  ``count`` (int32 scalar) entries are in use."""
  start: jax.Array
  expert: jax.Array
  count: jax.Array


def block_sizes(largest: int, levels: int = 4, smallest: int = 8) -> tuple[int, ...]:
  """``(largest, largest / 2, ...)``: ``levels`` sizes, none below ``smallest`` (nor the
  largest itself, which must be a power of two)."""
  if largest < 1 or largest & (largest - 1):
    raise ValueError(f"the largest block must be a power of two, got {largest}")
  sizes = [largest]
  while len(sizes) < levels and sizes[-1] // 2 >= smallest:
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def buffer_rows(rows: int, num_experts: int, sizes: tuple[int, ...]) -> int:
  """Static rows of the buffer for ``rows`` rows: each expert's padding < smallest block."""
  return (-(-rows // sizes[-1]) + num_experts) * sizes[-1]


def block_layout(counts: jax.Array, sizes: tuple[int, ...],
                 rows: int) -> tuple[jax.Array, tuple[Blocks, ...]]:
  """Segments and blocks of ``counts [experts]`` rows per expert in a buffer of ``rows``
  (:func:`buffer_rows`).

  Returns:
    ``offset [experts]`` (expert ``e``'s ``i``-th row goes to row ``offset[e] + i``) and one
    :class:`Blocks` per size.
  """
  big, small = sizes[0], sizes[-1]
  e = counts.shape[0]
  padded = (-(-counts // small) * small).astype(jnp.int32)
  offset = jnp.cumsum(padded) - padded
  n_big = padded // big
  rest = padded - n_big * big
  # Largest size: entry j belongs to the expert whose running count of big blocks passes j.
  big_end = jnp.cumsum(n_big)
  j = jnp.arange(rows // big, dtype=jnp.int32)
  ex = jnp.minimum(jnp.searchsorted(big_end, j, side="right"), e - 1).astype(jnp.int32)
  blocks = [Blocks(offset[ex] + (j - (big_end - n_big)[ex]) * big, ex, big_end[-1])]
  # Smaller sizes: at most one per expert, after the larger blocks of its segment.
  for s in sizes[1:]:
    has = (rest & s) > 0
    ex = jnp.nonzero(has, size=e, fill_value=0)[0].astype(jnp.int32)
    start = offset + n_big * big + rest - rest % (2 * s)
    blocks.append(Blocks(start[ex], ex, has.sum(dtype=jnp.int32)))
  return offset, tuple(blocks)


def _loop(blocks: Blocks, body, carry):
  """``body(first row, expert, carry)`` over the blocks in use of one size."""
  return lax.fori_loop(0, blocks.count,
                       lambda i, c: body(blocks.start[i], blocks.expert[i], c), carry)


def _glu(activation, a, b):
  f = act_lib.fn(activation)
  return f(a) if b is None else f(a) * b


def _pick(w, e):
  return None if w is None else lax.dynamic_index_in_dim(w, e, keepdims=False)


def _forward(x, wi, wg, wo, blocks, sizes, activation, keep):
  """y ``[rows, embed]``; with ``keep`` also the pre-activations ``a, b [rows, mlp]``."""
  m, f = x.shape[0], wi.shape[2]
  carry = (jnp.zeros((m, wo.shape[2]), x.dtype),
           jnp.zeros((m, f), x.dtype) if keep else None,
           jnp.zeros((m, f), x.dtype) if keep and wg is not None else None)
  for blk, s in zip(blocks, sizes):
    def body(r, e, carry, s=s):
      y, a_buf, b_buf = carry
      xb = lax.dynamic_slice_in_dim(x, r, s)
      a = xb @ _pick(wi, e)
      b = None if wg is None else xb @ _pick(wg, e)
      y = lax.dynamic_update_slice_in_dim(y, _glu(activation, a, b) @ _pick(wo, e), r, 0)
      if keep:
        a_buf = lax.dynamic_update_slice_in_dim(a_buf, a, r, 0)
        if b is not None:
          b_buf = lax.dynamic_update_slice_in_dim(b_buf, b, r, 0)
      return y, a_buf, b_buf
    carry = _loop(blk, body, carry)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def grouped_mlp(x: jax.Array, wi: jax.Array, wg: jax.Array | None, wo: jax.Array,
                blocks: tuple[Blocks, ...], sizes: tuple[int, ...], activation: str) -> jax.Array:
  """Grouped FFN ``act(x @ wi[e]) * (x @ wg[e]) @ wo[e]`` on each block (no gate: ``wg`` None).

  Args:
    x: ``[rows, embed]`` in the layout of ``blocks``; padding rows pass through the
      matmuls of their block, so they must be finite, and the caller must not read their
      outputs (then their cotangent is 0, and they add 0 to every weight gradient).
    wi, wg: ``[experts, embed, mlp]``; wo: ``[experts, mlp, embed]``.
    blocks, sizes: from :func:`block_layout` / :func:`block_sizes` (``sizes`` static).

  Returns:
    ``[rows, embed]``; 0 on rows in no block.
  """
  return _forward(x, wi, wg, wo, blocks, sizes, activation, False)[0]


def _fwd(x, wi, wg, wo, blocks, sizes, activation):
  y, a_buf, b_buf = _forward(x, wi, wg, wo, blocks, sizes, activation, True)
  return y, (x, wi, wg, wo, blocks, a_buf, b_buf)


def _tdot(u, v):
  """``uᵀ v`` over the rows of a block, ``[s, p], [s, q] -> [p, q]`` in float32."""
  return lax.dot_general(u, v, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _bwd(sizes, activation, res, dy):
  # One loop per size computes dx and the three weight gradients. Where dx is not needed
  # (grads w.r.t. the weights only, or the first layer) XLA drops its dead loop carry and
  # the two dots that feed it. The activation's backward is its derivative formula
  # (``activations.glu_vjp``): one fused pass over the block's tile.
  x, wi, wg, wo, blocks, a_buf, b_buf = res
  add = lambda dw, e, g: lax.dynamic_update_index_in_dim(dw, _pick(dw, e) + g, e, 0)
  zeros32 = lambda w: None if w is None else jnp.zeros(w.shape, jnp.float32)  # sums of blocks
  carry = (jnp.zeros_like(x), zeros32(wi), zeros32(wg), zeros32(wo))
  for blk, s in zip(blocks, sizes):
    def body(r, e, carry, s=s):
      dx, dwi, dwg, dwo = carry
      rows = lambda buf: lax.dynamic_slice_in_dim(buf, r, s)
      xb, dyb, a = rows(x), rows(dy), rows(a_buf)
      b = None if wg is None else rows(b_buf)
      dwo = add(dwo, e, _tdot(_glu(activation, a, b), dyb))
      dh = lax.dot_general(dyb, _pick(wo, e), (((1,), (1,)), ((), ())))   # dyb @ wo[e]^T
      da, db = act_lib.glu_vjp(activation, a, b, dh)
      dwi = add(dwi, e, _tdot(xb, da))
      dxb = da @ _pick(wi, e).T
      if wg is not None:
        dwg = add(dwg, e, _tdot(xb, db))
        dxb = dxb + db @ _pick(wg, e).T
      return lax.dynamic_update_slice_in_dim(dx, dxb.astype(dx.dtype), r, 0), dwi, dwg, dwo
    carry = _loop(blk, body, carry)
  dx, dwi, dwg, dwo = carry
  cast = lambda g, w: None if w is None else g.astype(w.dtype)
  return dx, cast(dwi, wi), cast(dwg, wg), cast(dwo, wo), jax.tree.map(lambda _: None, blocks)


grouped_mlp.defvjp(_fwd, _bwd)
