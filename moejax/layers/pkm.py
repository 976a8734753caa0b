"""Product Key Memory (Lample et al. 2019), the PEER paper's PKM baseline.

N = n² value slots ``[N, d_model]`` (a ``TableParam``). Each of h heads has its own query
projection and (by default, as in the PKM paper) its own sub-keys; all heads share the
values. A head reads its k best slots, weighted by softmax over their k scores; head
outputs are summed::

    y = Σ_h Σ_{i ∈ topk_h(x)} softmax_h(s)_i · value_i

Retrieval is :class:`~moejax.layers.query.ProductKeyQuery` (shared with PEER). The read is
the PEER lookup without its down-projection (:func:`~moejax.layers.table_mix.table_mix`).
``kernel=reference``: the forward materialises one ``[T, h, k, d]`` gathered tensor and
saves none for the backward, which regathers and scatter-adds one ``[T, h, k, d]``
row-gradient into a dense ``[N, d]`` gradient. ``kernel=pallas`` (``auto`` on TPU/GPU):
fused kernels that fetch rows by DMA and sum gradients per row, no ``[T, h, k, d]`` tensor.

Init: values ~ N(0, value_init_scale² · k / h). With roughly flat softmax weights at init
Σ_k g² ≈ 1/k per head, so Var(y_j) ≈ Var(value) · h / k ≈ value_init_scale²: an output of
unit-order variance, comparable to a LeCun dense FFN's (E[σ(a)²] ≈ 0.4–0.5). (XLM uses
N(0, 1/d), which starts the memory ~d·k/h times quieter.) Query projection and sub-keys: see
``ProductKeyQuery``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels, sharding
from moejax.kernels.row_plan import num_unique_slots
from moejax.layers import query as pkq
from moejax.layers import table_mix as tm
from moejax.layers.base import Aux, TableParam, masked_mean, register_ffn, row_taps
from moejax.layers.settings import Settings


@dataclasses.dataclass(frozen=True)
class PKMSettings(Settings):
  """``config.pkm``: the PEER paper's PKM baseline (1024² memories, h = 8, k = 32, query BN)."""

  num_keys_sqrt: int = 1024      # n; N = n² value slots of size d_model
  heads: int = 8
  top_k: int = 32
  d_key: int = 128               # even
  kernel: str = "auto"           # auto (Pallas on TPU/GPU, reference on CPU) | reference | pallas | interpret
  query_norm: str = "batch"      # batch (paper) | whiten (decorrelated BN, experimental) | layer (causal-safe) | none
  per_head_keys: bool = True     # PKM: each head its own sub-keys
  bn_momentum: float = 0.99
  norm_epsilon: float = 1e-5
  query_init_scale: float = 1.0
  key_init_scale: float = 1.0
  value_init_scale: float = 1.0  # value std = value_init_scale · √(k/h)


default_config = PKMSettings.default_config


def validate(cfg, config):
  pkq.validate_common("pkm", cfg, n_field="num_keys_sqrt",
                      width=config.model.d_model)


class PKM(nnx.Module):
  """``y, aux = pkm(x, mask=mask)``; x, y ``[batch, length, d_model]``.

  ``aux.counts['score_sum']`` ``[N]``: softmax weights summed per slot over real tokens.
  ``aux.metrics``: ``slots_hit_frac``, ``max_score``.
  """

  def __init__(self, d_model: int, settings: PKMSettings = PKMSettings(), *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    s = settings
    self.kernel = s.kernel
    self.retrieval = pkq.ProductKeyQuery(
        d_model, num_keys_sqrt=s.num_keys_sqrt, heads=s.heads, top_k=s.top_k, d_key=s.d_key,
        per_head_keys=s.per_head_keys, query_norm=s.query_norm, bn_momentum=s.bn_momentum,
        norm_epsilon=s.norm_epsilon, query_init_scale=s.query_init_scale,
        key_init_scale=s.key_init_scale, dtype=dtype, rngs=rngs)
    self.num_slots = s.num_keys_sqrt ** 2
    std = s.value_init_scale * math.sqrt(s.top_k / s.heads)
    self.values = sharding.param(
        std * jax.random.normal(rngs.params(), (self.num_slots, d_model), jnp.float32),
        ("table_rows", "table_embed"), kind=TableParam)
    self.dtype = dtype

  row_tables = ("values",)

  def row_index_shape(self, batch: int, length: int) -> tuple[int, ...]:
    """Shape of the distinct rows a row-sparse step can touch: ``(U,)``."""
    r = self.retrieval
    return (num_unique_slots(batch * length * r.heads * r.top_k, self.num_slots),)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    ops = kernels.get(kernels.resolve(self.kernel, width=x.shape[-1]))
    raw, idx = self.retrieval(x, mask, ops=ops)
    g = jax.nn.softmax(raw, axis=-1)
    taps, rows = row_taps(self, idx, self.num_slots)      # row-sparse training step
    if taps is not None:
      taps = (None, taps["values"])
    y = tm.table_mix(None, idx, g.astype(self.dtype), up=self.values[...], ops=ops, taps=taps,
                     rows=rows)
    y = sharding.constrain(y, ("batch", "length", "embed"))
    sums = tm.score_sum(idx, g, self.num_slots, mask)
    metrics = {
        "slots_hit_frac": jnp.mean((sums > 0).astype(jnp.float32)),
        "max_score": masked_mean(jax.lax.stop_gradient(g[..., 0]), mask),
    }
    return y, Aux(metrics=metrics, counts={"score_sum": sums})


@register_ffn("pkm", default_config=default_config, validate=validate)
def build(cfg, *, d_model, d_ff, dtype, rngs):
  del d_ff  # PKM's width is its value slots, not d_ff
  return PKM(d_model, PKMSettings.from_config(cfg), dtype=dtype, rngs=rngs)
