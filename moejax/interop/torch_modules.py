"""Reference PyTorch layers' weights in moejax layers that compute the same function.

  peer_from_pytorch(tp)      PEER-pytorch's ``PEER`` (softmax scores) -> :class:`~moejax.layers.peer.PEER`
  moe_from_mixtral(block)    transformers' ``MixtralSparseMoeBlock`` -> :class:`~moejax.layers.moe.MoE`
                             (``dispatch='dropless'`` computes the block's function)
  dense_from_swiglu(...)     a SwiGLU's three bias-free ``nn.Linear`` -> :class:`~moejax.layers.dense.DenseFFN`

Used by the side-by-side tests and ``moejax.benchmarking.torch_peers``. The torch modules are only
read (``.detach().cpu().numpy()``); torch is needed only to have them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.layers.dense import DenseFFN, DenseSettings
from moejax.layers.moe import MoE, MoESettings
from moejax.layers.peer import PEER, PEERSettings


def _np(t) -> np.ndarray:
  return t.detach().cpu().numpy()


def peer_from_pytorch(tp, *, kernel: str = "reference", rngs: nnx.Rngs | None = None) -> PEER:
  """A PEER with PEER-pytorch ``tp``'s weights (``non_competing_scores=False``: softmax over
  the k scores; its default ``nn.GELU`` is exact-erf ``gelu``; no pre-RMSNorm).

  Queries ``[d, (p h dk)]`` -> ``[d, h, 2·dk]``; keys ``[h, n, 2, dk]`` -> per-head sub-keys
  ``keys1``, ``keys2`` ``[h, n, dk]``; the down / up embeddings are ``u`` / ``v`` ``[N, d]``.
  """
  import torch.nn as nn
  if not isinstance(tp.score_activation, nn.Softmax):
    raise ValueError("PEER-pytorch with non_competing_scores=True (ReLU scores) has no moejax "
                     "equivalent: build it with non_competing_scores=False")
  if not isinstance(tp.norm, nn.Identity):
    raise ValueError("PEER-pytorch with pre_rmsnorm=True has no moejax equivalent inside the layer")
  h, n, _, dk = tp.keys.shape
  d = tp.weight_down_embed.weight.shape[1]
  settings = PEERSettings(num_experts_sqrt=n, heads=h, top_k=tp.product_key_topk, d_key=2 * dk,
                          activation="gelu", score="softmax", query_norm="none",
                          per_head_keys=True, per_head_experts=tp.separate_embed_per_head,
                          kernel=kernel)
  m = PEER(d, settings, rngs=rngs or nnx.Rngs(0))
  w = _np(tp.to_queries[0].weight).reshape(2, h, dk, d)       # '(p h d)' rows
  m.retrieval.query[...] = jnp.asarray(w.transpose(3, 1, 0, 2).reshape(d, h, 2 * dk))
  keys = _np(tp.keys)
  m.retrieval.keys1[...] = jnp.asarray(keys[:, :, 0])
  m.retrieval.keys2[...] = jnp.asarray(keys[:, :, 1])
  m.u[...] = jnp.asarray(_np(tp.weight_down_embed.weight))
  m.v[...] = jnp.asarray(_np(tp.weight_up_embed.weight))
  return m


def moe_from_mixtral(block, *, dispatch: str = "dropless", capacity_factor: float = 1.25,
                     rngs: nnx.Rngs | None = None) -> MoE:
  """A MoE (SwiGLU experts, top-k router renormalised over the chosen experts) with the
  weights of transformers' ``MixtralSparseMoeBlock``: experts ``gate_up_proj [E, 2F, D]``
  (``silu(gate) * up``) and ``down_proj [E, D, F]``, router ``gate.weight [E, D]``."""
  gate_up = _np(block.experts.gate_up_proj)
  e, two_f, d = gate_up.shape
  f = two_f // 2
  settings = MoESettings(num_experts=e, top_k=block.top_k, gated=True, activation="silu",
                         d_ff=f, dispatch=dispatch, capacity_factor_train=capacity_factor)
  m = MoE(settings, d_model=d, d_ff=f, rngs=rngs or nnx.Rngs(params=0, router=1))
  m.experts.wi[...] = jnp.asarray(gate_up[:, :f].transpose(0, 2, 1))
  m.experts.wg[...] = jnp.asarray(gate_up[:, f:].transpose(0, 2, 1))
  m.experts.wo[...] = jnp.asarray(_np(block.experts.down_proj).transpose(0, 2, 1))
  m.router.w[...] = jnp.asarray(_np(block.gate.weight).T)
  return m


def dense_from_swiglu(gate, up, down, *, rngs: nnx.Rngs | None = None) -> DenseFFN:
  """A gated silu DenseFFN computing ``down(silu(gate(x)) * up(x))`` of three bias-free
  ``nn.Linear`` (weights ``[F, D]``, ``[F, D]``, ``[D, F]``)."""
  f, d = gate.weight.shape
  m = DenseFFN(d, f, DenseSettings(activation="silu", gated=True), rngs=rngs or nnx.Rngs(0))
  m.wi[...] = jnp.asarray(_np(gate.weight).T)
  m.wg[...] = jnp.asarray(_np(up.weight).T)
  m.wo[...] = jnp.asarray(_np(down.weight).T)
  return m
