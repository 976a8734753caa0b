"""Dense feed-forward: the default block FFN (gated or plain)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.errors import config_error
from moejax.kernels import activations as act_lib
from moejax.kernels import registry
from moejax.layers.base import Aux, register_ffn
from moejax.layers.projection import project
from moejax.layers.settings import Settings

# The one table of named activations (gelu = exact erf, gelu_tanh, silu, relu).
ACTIVATIONS = act_lib.NAMES


@dataclasses.dataclass(frozen=True)
class DenseSettings(Settings):
  """``config.dense``."""

  activation: str = "gelu_tanh"  # gelu (exact erf) | gelu_tanh | silu | relu (kernels/activations.py)
  gated: bool = False            # GLU-style gate (SwiGLU with activation='silu')


default_config = DenseSettings.default_config


def validate(cfg, config):
  if cfg.activation not in ACTIVATIONS:
    raise config_error("dense.activation", cfg.activation, f"must be one of {list(ACTIVATIONS)}",
                       "set --config.dense.activation=gelu")


class DenseFFN(nnx.Module):
  """y = W_out · act(W_in · x) [⊙ W_gate · x].  x, y: [batch, length, embed]."""

  def __init__(self, d_model: int, d_ff: int, settings: DenseSettings = DenseSettings(), *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.wi = sharding.param(init(rngs.params(), (d_model, d_ff)), ("embed", "mlp"))
    self.wg = (sharding.param(init(rngs.params(), (d_model, d_ff)), ("embed", "mlp"))
               if settings.gated else None)
    self.wo = sharding.param(init(rngs.params(), (d_ff, d_model)), ("mlp", "embed"))
    act_lib.get(settings.activation)  # ValueError for an unknown name
    self.activation = settings.activation
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
  return DenseFFN(d_model, d_ff, DenseSettings.from_config(cfg), dtype=dtype, rngs=rngs)
