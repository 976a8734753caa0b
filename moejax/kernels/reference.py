"""The plain-JAX oracles: one per computation, short, never tuned, never calling a kernel.

Every implementation is tested against these: the Pallas kernels (TPU, GPU), the CPU
backend's native kernels and the tuned XLA paths (``retrieval_xla``,
``lookup_xla``, the CPU backend's ``attention_xla``). They build the big intermediates the tuned paths
avoid (all ``n²`` product keys, the ``[..., h, k, d]`` gathered rows, the full score
matrix), so use them at test sizes.

* :func:`product_key_topk` -- product-key retrieval by brute force over all ``n²`` keys.
* :func:`lookup` -- the PEER / PKM lookup (gradients by autodiff); :data:`LOOKUP_PIECES`
  its forward / token-backward / row-backward pieces (``lookup_vjp``'s contract).
* :func:`attention` -- causal softmax attention with rotary positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels import activations
from moejax.kernels.lookup_vjp import LookupKernels
from moejax.kernels.row_plan import RowPlan, run_sums

# ------------------------------------------------------------------- product-key retrieval


def full_product_keys(keys1: jax.Array, keys2: jax.Array) -> jax.Array:
  """All n² product keys ``[h|1, n², d_key]``; row ``i1·n + i2`` = concat(keys1[i1], keys2[i2])."""
  n = keys1.shape[1]
  return jnp.concatenate([jnp.repeat(keys1, n, axis=1), jnp.tile(keys2, (1, n, 1))], axis=-1)


def product_key_topk(queries: jax.Array, keys1: jax.Array, keys2: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
  """Exhaustive top ``k`` of ``q · key`` over all n² product keys (in at least float32):
  ``queries [..., h, d_key]``, ``keys1, keys2 [h|1, n, d_key/2]`` -> ``(scores, indices)``
  ``[..., h, k]`` (scores descending, int32 indices ``i1·n + i2``)."""
  keys = full_product_keys(keys1, keys2)
  dt = jnp.promote_types(queries.dtype, jnp.float32)
  q = queries.astype(dt)
  if keys.shape[0] == 1:
    scores = jnp.einsum("...hd,nd->...hn", q, keys[0].astype(dt))
  else:
    scores = jnp.einsum("...hd,hnd->...hn", q, keys.astype(dt))
  s, i = jax.lax.top_k(scores, k)
  return s, i.astype(jnp.int32)


# ---------------------------------------------------------------------------- the lookup


def lookup(x: jax.Array | None, indices: jax.Array, scores: jax.Array, up: jax.Array,
           down: jax.Array | None = None, *, activation: str = "gelu_tanh") -> jax.Array:
  """PEER ``y = Σ_{h,k} score · σ(x · down[i]) · up[i]`` (``down`` given) or PKM ``y =
  Σ_{h,k} score · up[i]``, ``i = indices[..., h, k]``: ``x [..., d]``, ``indices, scores
  [..., h, k]``, tables ``[N, d]`` -> ``[..., d]`` in ``scores.dtype`` (computed in
  float32)."""
  w = scores.astype(jnp.float32)
  if down is not None:
    act, _ = activations.get(activation)
    a = jnp.einsum("...d,...hkd->...hk", x.astype(jnp.float32), down[indices].astype(jnp.float32))
    w = act(a) * w
  y = jnp.einsum("...hk,...hkd->...d", w, up[indices].astype(jnp.float32))
  return y.astype(scores.dtype)


# The lookup in the pieces a kernel backend supplies (lookup_vjp.LookupKernels), on
# token-flattened arrays: x [T, d], idx / scores [T, H].


def lookup_forward(x, idx, scores, up, down, activation):
  dt = jnp.float32
  w = scores.astype(dt)
  if down is not None:
    act, _ = activations.get(activation)
    a = jnp.einsum("td,tjd->tj", x.astype(dt), down[idx].astype(dt))
    w = act(a) * w
  return jnp.einsum("tj,tjd->td", w, up[idx].astype(dt)).astype(scores.dtype)


def lookup_token_backward(x, idx, scores, up, down, dy, activation):
  dt = jnp.float32
  g, dy = scores.astype(dt), dy.astype(dt)
  dw = jnp.einsum("td,tjd->tj", dy, up[idx].astype(dt))
  if down is None:
    return None, dw.astype(scores.dtype), None, g
  act, dact = activations.get(activation)
  rows = down[idx].astype(dt)
  a = jnp.einsum("td,tjd->tj", x.astype(dt), rows)
  s = act(a)
  da = dw * g * dact(a)
  dx = jnp.einsum("tj,tjd->td", da, rows)
  return dx.astype(x.dtype), (dw * s).astype(scores.dtype), da, g * s


def lookup_row_backward(plan: RowPlan, vectors, coefs, num_rows, dense, out_dtype=jnp.float32):
  del out_dtype   # f32; the glue casts
  compact = run_sums(plan.order, plan.starts, coefs, vectors)
  if not dense:
    return compact
  return jnp.zeros((num_rows, vectors.shape[-1]), jnp.float32).at[plan.unique].set(
      compact, mode="drop")


LOOKUP_PIECES = LookupKernels(lookup_forward, lookup_token_backward, lookup_row_backward)


# ----------------------------------------------------------------------------- attention


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array | None = None,
              theta: float = 1e4, segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal softmax attention, ``q`` and ``k`` first rotated (rotate-half) at ``positions
  [B, L]`` (None: not rotated): ``q [B, L, H, D]``, ``k, v [B, L, Hkv, D]`` (query head
  ``n`` reads KV head ``n // (H / Hkv)``) -> ``[B, L, H, D]``; with ``segment_ids [B, L]``
  a query sees only keys of its own segment."""
  b, length, h, d = q.shape
  if positions is not None:
    freq = theta ** (-jnp.arange(d // 2, dtype=jnp.float32) / (d // 2))
    angle = positions[..., None, None].astype(jnp.float32) * freq         # [B, L, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)

    def rotate(x):
      x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
      return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)

    q, k = rotate(q), rotate(k)
  rep = h // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d).astype(q.dtype)
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)
