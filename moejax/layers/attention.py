"""Causal multi-head self-attention with rotary positions, and RMSNorm.

Packed rows: with ``segment_ids [batch, length]`` (document of each token, from the data
pipeline) a token attends only to earlier tokens of its own document, and the caller gives
RoPE ``positions`` that restart at each document. Decoding: :meth:`Attention.decode` runs
a chunk of new tokens against a KV cache (``init_cache``), attending to every cached
position up to its own.

What imported checkpoints need (``moejax.interop``), each off by default: grouped-query
attention (``num_kv_heads < num_heads``: query head ``n`` reads KV head ``n // (heads /
kv_heads)``, and the cache holds only the KV heads), biases on the projections (``bias``:
``qkv`` as Qwen2, ``all`` as Llama's ``attention_bias``) and RMSNorm on q and k before the
rotation (``qk_norm``: ``full`` over the whole projection as OLMoE, ``head`` per head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.kernels import registry
from moejax.kernels.rotary import rope_angles, rotate_heads
from moejax.layers.projection import project


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32.  x: [..., embed]."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = sharding.param(jnp.ones((dim,), jnp.float32), ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class Bias(nnx.Module):
  """An additive bias (zeros at init); its own module so that the optimizer's path ends in
  ``bias`` (no weight decay)."""

  def __init__(self, shape: tuple[int, ...], names: tuple[str, ...]):
    self.bias = sharding.param(jnp.zeros(shape, jnp.float32), names)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.bias[...].astype(x.dtype)


ATTENTION_BIASES = ("none", "qkv", "all")
QK_NORMS = ("none", "full", "head")


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] int.
  """
  sin, cos = rope_angles(positions, theta, x.shape[-1])
  return rotate_heads(x, sin, cos, fused_backward=False)


class Attention(nnx.Module):
  """Causal self-attention.  x: [batch, length, embed] -> [batch, length, embed].

  ``num_kv_heads`` (0: ``num_heads``) must divide ``num_heads``; ``bias``: one of
  :data:`ATTENTION_BIASES`; ``qk_norm``: one of :data:`QK_NORMS` (``norm_eps`` its epsilon).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rope_theta: float = 1e4,
               num_kv_heads: int = 0, bias: str = "none", qk_norm: str = "none",
               norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    kv_heads = num_kv_heads or num_heads
    if num_heads % kv_heads:
      raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={num_heads}")
    init = nnx.initializers.lecun_normal()
    names_in = ("embed", "heads", "kv")
    self.wq = sharding.param(init(rngs.params(), (d_model, num_heads, head_dim)), names_in)
    self.wk = sharding.param(init(rngs.params(), (d_model, kv_heads, head_dim)), names_in)
    self.wv = sharding.param(init(rngs.params(), (d_model, kv_heads, head_dim)), names_in)
    # fan-in of the output projection is heads * head_dim, not head_dim.
    wo = jax.random.normal(rngs.params(), (num_heads, head_dim, d_model)) / jnp.sqrt(num_heads * head_dim)
    self.wo = sharding.param(wo, ("heads", "kv", "embed"))
    # Options below draw no random numbers: a default model's init is unchanged by them.
    if bias not in ATTENTION_BIASES:
      raise ValueError(f"attention bias {bias!r} not one of {ATTENTION_BIASES}")
    if qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm {qk_norm!r} not one of {QK_NORMS}")
    with_bias = bias != "none"
    self.bq = Bias((num_heads, head_dim), ("heads", "kv")) if with_bias else None
    self.bk = Bias((kv_heads, head_dim), ("heads", "kv")) if with_bias else None
    self.bv = Bias((kv_heads, head_dim), ("heads", "kv")) if with_bias else None
    self.bo = Bias((d_model,), ("embed",)) if bias == "all" else None
    self.qk_norm = qk_norm
    if qk_norm == "full":
      self.q_norm = RMSNorm(num_heads * head_dim, eps=norm_eps)
      self.k_norm = RMSNorm(kv_heads * head_dim, eps=norm_eps)
    elif qk_norm == "head":
      self.q_norm = RMSNorm(head_dim, eps=norm_eps)
      self.k_norm = RMSNorm(head_dim, eps=norm_eps)
    else:
      self.q_norm = self.k_norm = None
    self.num_heads, self.num_kv_heads = num_heads, kv_heads
    self.rope_theta = rope_theta
    self.dtype = dtype

  def _norm(self, norm, x):
    """q/k RMSNorm of ``x [batch, length, heads, head_dim]``."""
    if norm is None:
      return x
    if self.qk_norm == "head":
      return norm(x)
    return norm(x.reshape(x.shape[:2] + (-1,))).reshape(x.shape)

  def _qkv(self, x, positions, *, rotate: bool = True):
    """q ``[batch, length, heads, head_dim]``, k, v ``[batch, length, kv_heads, head_dim]``;
    q and k rotated unless not ``rotate``."""
    x = x.astype(self.dtype)
    q, k, v = (project(x, w[...].astype(self.dtype)) for w in (self.wq, self.wk, self.wv))
    if self.bq is not None:
      q, k, v = self.bq(q), self.bk(k), self.bv(v)
    q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
    if rotate:
      q = rotary(q, positions, self.rope_theta)
      k = rotary(k, positions, self.rope_theta)
    return sharding.constrain(q, ("batch", "length", "heads", "kv")), k, v

  def _out(self, out):
    y = project(out, self.wo[...].astype(self.dtype), in_dims=2)
    return y if self.bo is None else self.bo(y)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """``positions [batch, length]`` (RoPE); ``segment_ids [batch, length]`` or None (one
    document per row): attention is causal and stays inside each token's document."""
    fused = registry.find("attention.rotary")   # the platform's rotary + attention, if any
    if fused is not None:
      q, k, v = self._qkv(x, positions, rotate=False)
      return self._out(fused(q, k, v, positions, self.rope_theta, segment_ids))
    q, k, v = self._qkv(x, positions)
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]   # [b, 1, l, l]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)  # [b, l, heads, kv]
    return self._out(out)

  def init_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
    """An empty KV cache ``{'k', 'v': [batch, max_length, kv_heads, head_dim]}`` (compute dtype)."""
    shape = (batch, max_length) + self.wk.shape[1:]
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

  def decode(self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array],
             index: jax.Array, kv_valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """New tokens ``x [batch, n, embed]`` at cache slots ``index .. index + n - 1`` (one
    document per row; ``positions [batch, n]`` for RoPE): writes their keys / values into
    ``cache`` and attends causally over the cache, only to the slots ``kv_valid [batch,
    max_length]`` marks (None: all; left-padded prompts mark their padding invalid). Returns
    (``[batch, n, embed]``, the new cache)."""
    q, k, v = self._qkv(x, positions)
    start = (0, index, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
    n, t = x.shape[1], cache["k"].shape[1]
    slots, query_slots = jnp.arange(t)[None, :], index + jnp.arange(n)[:, None]
    mask = (slots <= query_slots)[None, None]                                 # [1, 1, n, t]
    if kv_valid is not None:   # a padding query sees itself only (no empty softmax)
      mask = mask & (kv_valid[:, None, None, :] | (slots == query_slots)[None, None])
    out = registry.call("attention.cached", q, cache["k"], cache["v"], mask, _cached_attention)
    if out is None:
      out = _cached_attention(q, cache["k"], cache["v"], mask)
    return self._out(out.astype(q.dtype)), cache


def _cached_attention(q, k, v, mask):
  """The portable attention of ``q [B, N, H, D]`` over a cache ``k, v [B, T, Hkv, D]``
  where ``mask [B|1, 1, N, T]`` (registry ``attention.cached``)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask)
