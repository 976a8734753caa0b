"""The attention core ``softmax(q kᵀ / √d + mask) v`` in XLA, with a hand-written backward,
and the rotary positions it takes: the XLA form of the CPU attention kernel
(``native.attention``, ``cpu_attention.cc``), what runs on CPU where that kernel does not
(e.g. under a mesh that shards the batch). Its oracle is
:func:`moejax.kernels.reference.attention`.

Why: autodiff of the XLA softmax attention runs the masking, the 1/√d scale, the max, the
exp, the normalisation and their derivatives as about ten passes over the
``[batch, heads, length, length]`` scores, with a layout copy between most of them. Here:

* forward: ``e = exp(s - max s)`` over masked scores and ``o = (e · v) / Σe``: the division
  is on ``[.., length, head_dim]``, not on the scores;
* backward (the flash-attention form): ``ds = e / Σe · (do · vᵀ - rowsum(do ⊙ o))``, one pass
  over the scores, and ``dv = eᵀ · (do / Σe)`` straight from the saved ``e``;
* the scores are held key-major, ``[.., keys, queries]``, and the small ``[.., length,
  head_dim]`` operands are transposed instead, so all six products are plain (batched)
  ``A · B`` or ``A · Bᵀ`` matmuls: in query-major form the ``dk`` and ``dv`` products
  contract the scores' first axis, which XLA:CPU runs as a generic contraction at half
  the speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.rotary import rotate_heads


def _heads_first(x):
  """[batch, length, heads, d] -> [batch, heads, length, d] (batch-matmul layout)."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _from_dim_major(x):
  """[batch, heads, d, length] -> [batch, length, heads, d]."""
  return jnp.transpose(x, (0, 3, 1, 2))


def _t(x):
  return jnp.swapaxes(x, -1, -2)


@jax.custom_vjp
def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention of ``q`` over ``k`` / ``v``, scaled by ``1/√head_dim``.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, length_q, length_k]; True where a query may
      attend. Every query row must allow at least one key (causal masks allow the
      diagonal).
  Returns:
    [batch, length, heads, head_dim], = ``jax.nn.dot_product_attention(q, k, v, mask=mask)``.
  """
  return _forward(q, k, v, mask)[0]


def _forward(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  qh, kh, vh = _heads_first(q * scale), _heads_first(k), _heads_first(v)   # [b, h, l, d]
  s = jnp.einsum("bhmd,bhld->bhml", kh, qh)                   # [b, h, keys, queries]
  s = jnp.where(_t(mask), s, -jnp.inf)
  e = jnp.exp(s - jnp.max(s, axis=-2, keepdims=True))
  inv = 1.0 / jnp.sum(e, axis=-2, keepdims=True)              # [b, h, 1, queries]
  o = jnp.einsum("bhdm,bhml->bhdl", _t(vh), e) * inv          # [b, h, d, queries]
  return _from_dim_major(o), (qh, kh, vh, e, inv, o)


def _backward(res, do):
  qh, kh, vh, e, inv, o = res
  scale = qh.shape[-1] ** -0.5
  doh = _heads_first(do)                                      # [b, h, queries, d]
  rowsum = jnp.sum(_t(doh) * o, axis=-2, keepdims=True)       # Σ_keys p dp, [b, h, 1, queries]
  dp = jnp.einsum("bhmd,bhld->bhml", vh, doh)
  ds = e * inv * (dp - rowsum)                                # masked entries: e = 0
  dk = jnp.einsum("bhml,bhld->bhmd", ds, qh)                  # qh already holds the scale
  dv = jnp.einsum("bhml,bhld->bhmd", e, doh * _t(inv))
  dq = jnp.einsum("bhdm,bhml->bhdl", _t(kh), ds) * scale      # [b, h, d, queries]
  return _from_dim_major(dq), _heads_first(dk), _heads_first(dv), None


masked_attention.defvjp(lambda q, k, v, mask: _forward(q, k, v, mask), _backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              sin: jax.Array | None = None, cos: jax.Array | None = None) -> jax.Array:
  """:func:`masked_attention` of ``q`` and ``k`` rotated by ``sin, cos [1 | batch, length,
  head_dim / 2]`` (rotary positions; None: not rotated) — what ``native.attention``
  computes."""
  if sin is not None:
    q, k = rotate_heads(q, sin, cos), rotate_heads(k, sin, cos)
  return masked_attention(q, k, v, mask)


def causal_mask(length: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """bool ``[1 | batch, 1, length, length]``: key ≤ query, and (with ``segment_ids
  [batch, length]``) the same document."""
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return mask
