"""Causal self-attention on CPU (registry operation ``attention.rotary``): the rotary
positions and the attention in one native kernel (``native.attention``,
``cpu_attention.cc``), or its XLA form where the kernel does not run."""

from __future__ import annotations

import jax.numpy as jnp

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
