"""Causal multi-head self-attention with rotary positions, and RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32.  x: [..., embed]."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = sharding.param(jnp.ones((dim,), jnp.float32), ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] int.
  """
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)          # [half]
  angle = positions[..., None].astype(jnp.float32) * freq               # [batch, length, half]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal self-attention.  x: [batch, length, embed] -> [batch, length, embed]."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rope_theta: float = 1e4,
               dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    shape_in = (d_model, num_heads, head_dim)
    names_in = ("embed", "heads", "kv")
    self.wq = sharding.param(init(rngs.params(), shape_in), names_in)
    self.wk = sharding.param(init(rngs.params(), shape_in), names_in)
    self.wv = sharding.param(init(rngs.params(), shape_in), names_in)
    # fan-in of the output projection is heads * head_dim, not head_dim.
    wo = jax.random.normal(rngs.params(), (num_heads, head_dim, d_model)) / jnp.sqrt(num_heads * head_dim)
    self.wo = sharding.param(wo, ("heads", "kv", "embed"))
    self.rope_theta = rope_theta
    self.dtype = dtype

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    q, k, v = (jnp.einsum("bld,dnh->blnh", x, w[...].astype(self.dtype))
               for w in (self.wq, self.wk, self.wv))
    q = rotary(q, positions, self.rope_theta)
    k = rotary(k, positions, self.rope_theta)
    q = sharding.constrain(q, ("batch", "length", "heads", "kv"))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)          # [batch, length, heads, kv]
    return jnp.einsum("blnh,nhd->bld", out, self.wo[...].astype(self.dtype))
