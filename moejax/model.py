"""Decoder-only Transformer whose blocks take their feed-forward from the registry.

Which kind each block uses is config (``model.ffn`` everywhere, ``model.sparse_ffn``
at the blocks named by ``model.sparse_layers``), so MoE, PEER and PKM layers plug
in without this file knowing them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import sharding
from moejax.config import parse_sparse_layers
from moejax.layers import Aux, build_ffn
from moejax.layers.attention import Attention, RMSNorm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x))."""

  def __init__(self, config: ml_collections.ConfigDict, ffn_kind: str, *, rngs: nnx.Rngs):
    m = config.model
    dtype = DTYPES[m.dtype]
    self.ffn_kind = ffn_kind
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.attn = Attention(m.d_model, m.num_heads, m.head_dim, rope_theta=m.rope_theta,
                          dtype=dtype, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.ffn = build_ffn(ffn_kind, config[ffn_kind], d_model=m.d_model, d_ff=m.d_ff, dtype=dtype,
                         rngs=rngs)

  def __call__(self, x, positions, mask) -> tuple[jax.Array, Aux]:
    x = x + self.attn(self.attn_norm(x), positions).astype(x.dtype)
    y, aux = self.ffn(self.ffn_norm(x), mask=mask)
    x = x + y.astype(x.dtype)
    return sharding.constrain(x, ("batch", "length", "embed")), aux


class Transformer(nnx.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (float32), {block name: Aux}."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    if m.vocab_size < 1:
      raise ValueError("config.model.vocab_size must be set (train.py takes it from the tokenizer)")
    self.dtype = DTYPES[m.dtype]
    sparse = set(parse_sparse_layers(m.sparse_layers, m.num_layers))
    self.embed = sharding.param(
        jax.random.normal(rngs.params(), (m.vocab_size, m.d_model)) * m.d_model ** -0.5,
        ("vocab", "embed"))
    self.blocks = nnx.List([
        Block(config, m.sparse_ffn if i in sparse else m.ffn, rngs=rngs) for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.head = None if m.tie_embeddings else sharding.param(
        nnx.initializers.lecun_normal()(rngs.params(), (m.d_model, m.vocab_size)), ("embed", "vocab"))

  def block_names(self) -> list[str]:
    return [f"block_{i}_{b.ffn_kind}" for i, b in enumerate(self.blocks)]

  def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, Aux]]:
    """
    Args:
      tokens: [batch, length] int32.
      mask: [batch, length] bool, True for real tokens (padding is ignored by
        batch statistics in sparse layers). None: all real.
    """
    if mask is None:
      mask = jnp.ones(tokens.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    auxes = {}
    for name, block in zip(self.block_names(), self.blocks):
      x, aux = block(x, positions, mask)
      if block.ffn_kind != "dense":
        auxes[name] = aux
    x = self.final_norm(x)
    w = self.embed[...].T if self.head is None else self.head[...]
    logits = jnp.einsum("bld,dv->blv", x, w.astype(self.dtype)).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "vocab")), auxes
