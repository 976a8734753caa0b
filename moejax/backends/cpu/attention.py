"""Attention on CPU.

* ``attention.rotary``: causal self-attention, the rotary positions and the attention in
  one native kernel (``native.attention``, ``cpu_attention.cc``), or its XLA form where the
  kernel does not run.
* ``attention.cached``: a few new queries over the KV cache (decoding) in one native
  kernel (``native.cached_attention``); a prompt's prefill keeps the portable program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.backends.cpu import native
from moejax.backends.cpu.attention_xla import causal_mask
from moejax.kernels.rotary import rope_angles


def rotary_attention(q, k, v, positions, theta, segment_ids=None):
  """``q [B, L, H, D]``, ``k, v [B, L, Hkv, D]`` (not rotated) -> ``[B, L, H, D]``."""
  if k.shape[2] != q.shape[2]:   # the kernel takes as many KV heads as queries
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  sin, cos = rope_angles(positions, theta, q.shape[-1])
  mask = causal_mask(q.shape[1], segment_ids)
  return native.attention(q, k, v, mask, sin, cos)


# The most new tokens per row whose attention over the cache takes the native kernel: its
# per-query loops read the cache once per query, which is the whole cost for a decode
# step's one token and loses to XLA's matmuls for a prompt.
CACHED_MAX_QUERIES = 4


def cached_attention(q, k, v, mask, portable):
  """``q [B, N, H, D]`` over the cache ``k, v [B, T, KV, D]`` where ``mask [B|1, 1, N, T]``;
  None (the caller runs ``portable``) for more than :data:`CACHED_MAX_QUERIES` queries or
  operands the kernel does not take."""
  if q.shape[1] > CACHED_MAX_QUERIES or not native.usable("cached_attention", q, k, v):
    return None
  mask = jnp.broadcast_to(mask[:, 0], (q.shape[0],) + mask.shape[2:])   # [B, N, T]
  return _cached(q, k, v, mask, portable)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cached(q, k, v, mask, portable):
  return native.cached_attention(q, k, v, mask)


def _cached_fwd(q, k, v, mask, portable):
  return native.cached_attention(q, k, v, mask), (q, k, v, mask)


def _cached_bwd(portable, res, dout):
  """The portable program's gradient (decoding takes none; a caller that does gets it)."""
  q, k, v, mask = res
  dq, dk, dv = jax.vjp(lambda q, k, v: portable(q, k, v, mask[:, None]), q, k, v)[1](dout)
  return dq, dk, dv, np.zeros(mask.shape, jax.dtypes.float0)


_cached.defvjp(_cached_fwd, _cached_bwd)
