"""Experts as stacked weights: ``wi, wg [experts, embed, expert_mlp]``, ``wo [experts, expert_mlp, embed]``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.kernels import activations as act_lib


def expert_mlp(x: jax.Array, wi: jax.Array, wg: jax.Array | None, wo: jax.Array,
               activation: str) -> jax.Array:
  """Batched expert FFN: ``x [experts, n, embed] -> [experts, n, embed]``.

  ``wi, wg [experts, embed, mlp]``, ``wo [experts, mlp, embed]`` (already in compute dtype).
  The same function serves the einsum path (n = groups * capacity), the blocked dropless
  path (one "expert" per block of rows) and each device under expert parallelism.
  """
  h = act_lib.fn(activation)(jnp.einsum("end,edf->enf", x, wi))
  if wg is not None:
    h = h * jnp.einsum("end,edf->enf", x, wg)
  return jnp.einsum("enf,efd->end", h, wo)


class Experts(nnx.Module):
  """``num_experts`` FFNs (gated or plain) with stacked, logically named weights."""

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *, gated: bool = False,
               activation: str = "gelu_tanh", rngs: nnx.Rngs):
    # Fan-in of each expert's own matrix (batch_axis=0 keeps the expert axis out of it).
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))
    names_in = ("expert", "embed", "expert_mlp")
    self.wi = sharding.param(init(rngs.params(), (num_experts, d_model, d_ff)), names_in)
    self.wg = (sharding.param(init(rngs.params(), (num_experts, d_model, d_ff)), names_in)
               if gated else None)
    self.wo = sharding.param(init(rngs.params(), (num_experts, d_ff, d_model)),
                             ("expert", "expert_mlp", "embed"))
    self.activation = activation
    self.num_experts = num_experts

  def weights(self, dtype) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    wg = None if self.wg is None else self.wg[...].astype(dtype)
    return self.wi[...].astype(dtype), wg, self.wo[...].astype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [experts, n, embed] -> [experts, n, embed]``."""
    wi, wg, wo = self.weights(x.dtype)
    return expert_mlp(x, wi, wg, wo, self.activation)
