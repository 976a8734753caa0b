"""Dense feed-forward: the default block FFN (gated or plain)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import sharding
from moejax.kernels import registry
from moejax.layers.base import Aux, register_ffn
from moejax.layers.projection import project

from moejax.kernels import activations as act_lib

# The one table of named activations (gelu = exact erf, gelu_tanh, silu, relu).
ACTIVATIONS = act_lib.NAMES


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "activation": "gelu_tanh",  # gelu (exact erf) | gelu_tanh | silu | relu (kernels/activations.py)
      "gated": False,        # GLU-style gate (SwiGLU with activation='silu')
  })


def validate(cfg, config):
  from moejax.errors import ConfigError
  if cfg.activation not in ACTIVATIONS:
    raise ConfigError(f"config.dense.activation={cfg.activation!r}: must be one of "
                      f"{list(ACTIVATIONS)} (set --config.dense.activation=gelu)")


class DenseFFN(nnx.Module):
  """y = W_out · act(W_in · x) [⊙ W_gate · x].  x, y: [batch, length, embed]."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "gelu_tanh", gated: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.wi = sharding.param(init(rngs.params(), (d_model, d_ff)), ("embed", "mlp"))
    self.wg = (sharding.param(init(rngs.params(), (d_model, d_ff)), ("embed", "mlp"))
               if gated else None)
    self.wo = sharding.param(init(rngs.params(), (d_ff, d_model)), ("mlp", "embed"))
    act_lib.get(activation)  # ValueError for an unknown name
    self.activation = activation
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    del mask
    dt = self.dtype
    x = x.astype(dt)
    wi = self.wi[...].astype(dt)
    wg = None if self.wg is None else self.wg[...].astype(dt)
    hidden = registry.find("ffn.hidden")   # the platform's layout of it, if any
    if hidden is not None:
      h = hidden(x, wi, wg, self.activation)
    else:
      a = project(x, wi)
      b = None if wg is None else project(x, wg)
      h = act_lib.fn(self.activation)(a) if b is None else act_lib.fn(self.activation)(a) * b
    h = sharding.constrain(h, ("batch", "length", "mlp"))
    return project(h, self.wo[...].astype(dt)), Aux()


@register_ffn("dense", default_config=default_config, validate=validate)
def build(cfg, *, d_model, d_ff, dtype, rngs):
  return DenseFFN(d_model, d_ff, activation=cfg.activation, gated=cfg.gated, dtype=dtype, rngs=rngs)
