"""PEER: Parameter Efficient Expert Retrieval ("Mixture of A Million Experts", He 2024).

N = n² experts, expert i a single hidden neuron ``e_i(x) = σ(u_iᵀx)·v_i``. Each of h heads
has its own query projection; all heads share one product-key set (two sub-key sets
``[n, d_key/2]``; ``per_head_keys`` gives each head its own) and one expert pool
(``per_head_experts`` gives each head its own N experts, as PEER-pytorch can). A head
retrieves its k best experts by product keys, weights them with ``softmax`` over the k
scores (paper) or ``sigmoid``; head outputs are summed::

    y = Σ_h Σ_{i ∈ topk_h(x)} g_{h,i}(x) · σ(u_iᵀ x) · v_i

Compute follows the paper's einsums (``bld,blhkd->blhk``, σ, × g, ``blhk,blhkd->bld``)
through :func:`~moejax.layers.table_mix.table_mix` (under a mesh a ``shard_map`` that keeps
row- or feature-sharded tables local, see there). ``kernel`` picks the implementation of
the top-k and of the lookup (:mod:`moejax.kernels`): ``auto`` = fused Pallas kernels on
TPU and GPU, the plain-JAX reference on CPU.

Memory (b·l = tokens T): materialised are the per-head queries ``[T, h, d_key]``, scores /
indices / activations ``[T, h, k]``; the reference kernels (CPU) run the top-k and the
lookup over chunks of tokens, so the half-scores ``[c, h, n]`` and gathered rows
``[c, h, k, d]`` of one chunk live in cache and nothing of size ``[T, h, k, d]`` or
``[T, h, n]`` is materialised (the Pallas kernels fuse the same on TPU / GPU). Nothing of
that size is saved for the backward pass (custom VJPs regather the rows), which
scatter-adds the row gradients into a dense ``[N, d]`` table gradient (a plain-JAX
optimizer needs it anyway) or, row-sparse, into the ``[U, d]`` taps.

Initialisation (x is assumed to have ~unit-variance components, as after the block's
pre-norm):
  * query projection and sub-keys: see :class:`~moejax.layers.query.ProductKeyQuery`.
  * u ~ N(0, u_init_scale² / d_model): the pre-activation u_iᵀx is ~N(0, 1), as for the
    first matrix of a LeCun-initialised dense FFN.
  * v ~ N(0, v_init_scale² · c): chosen so the layer's initial output variance per
    component ≈ E[σ(a)²], which is what a dense FFN with LeCun init gives
    (Var(y_j) = d_ff · E[σ(a)²] · 1/d_ff). For PEER, Var(y_j) = E[σ(a)²] · Var(v) · Σ_h Σ_k g²
    (distinct experts, independent rows). Softmax scores over k that are roughly flat at init
    give Σ_k g² ≈ 1/k per head, so c = k / h; sigmoid scores of the top keys are ≈ 1,
    Σ_h Σ_k g² ≈ h·k, so c = 1 / (h·k) — exactly a LeCun output layer of a dense FFN with h·k
    hidden units. (PEER-pytorch uses N(0, 1) for both tables, which makes the initial
    output ~√(d_model) times too large; XLM PKM uses N(0, 1/d).)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels, sharding
from moejax.errors import config_error
from moejax.kernels import activations as act_lib
from moejax.kernels.row_plan import num_unique_slots
from moejax.layers import query as pkq
from moejax.layers import table_mix as tm
from moejax.layers.base import Aux, TableParam, masked_mean, register_ffn, row_taps
from moejax.layers.settings import Settings

# Names of moejax.kernels.activations (the one table: gelu = exact erf, gelu_tanh, ...).
ACTIVATIONS = act_lib.NAMES
SCORES = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class PEERSettings(Settings):
  """``config.peer``: the paper's settings (N = 1024², h = 8, k = 16, query BN); configs set
  the size."""

  num_experts_sqrt: int = 1024   # n; N = n² experts
  heads: int = 8                 # h retrieval heads (own query projections), outputs summed
  top_k: int = 16                # k experts per head; active experts per token = h·k
  d_key: int = 128               # query / product-key dim (even); not given by the paper
  activation: str = "gelu_tanh"  # gelu (exact erf, PEER-pytorch) | gelu_tanh | silu | relu
  kernel: str = "auto"           # auto (Pallas on TPU/GPU, reference on CPU) | reference | pallas | interpret
  score: str = "softmax"         # softmax (over the k retrieved, paper) | sigmoid
  query_norm: str = "batch"      # batch (paper) | whiten (decorrelated BN, experimental) | layer (causal-safe) | none
  per_head_keys: bool = False    # each head its own sub-keys (paper: shared)
  per_head_experts: bool = False  # each head its own N experts (paper: shared pool)
  bn_momentum: float = 0.99      # running-stat momentum of query BatchNorm
  norm_epsilon: float = 1e-5     # BatchNorm / LayerNorm epsilon
  query_init_scale: float = 1.0  # query projection std × √d_model
  key_init_scale: float = 1.0    # sub-key std × √(d_key/2)
  u_init_scale: float = 1.0      # u std × √d_model
  v_init_scale: float = 1.0      # multiplier of the variance-matching v std (see peer.py)


default_config = PEERSettings.default_config


def validate(cfg, config):
  pkq.validate_common("peer", cfg, n_field="num_experts_sqrt",
                      width=config.model.d_model)
  if cfg.activation not in ACTIVATIONS:
    raise config_error("peer.activation", cfg.activation, f"must be one of {list(ACTIVATIONS)}",
                       "set --config.peer.activation=gelu")
  if cfg.score not in SCORES:
    raise config_error("peer.score", cfg.score, f"must be one of {list(SCORES)}",
                       "set --config.peer.score=softmax")


def v_init_std(heads: int, top_k: int, score: str, scale: float = 1.0) -> float:
  """Std of v that makes the initial output variance ≈ a LeCun dense FFN's (see module doc)."""
  c = top_k / heads if score == "softmax" else 1.0 / (heads * top_k)
  return scale * math.sqrt(c)


class PEER(nnx.Module):
  """PEER layer: ``y, aux = peer(x, mask=mask)`` with x, y ``[batch, length, d_model]``.

  ``aux.counts['score_sum']`` ``[N]`` (``[h·N]`` with per_head_experts): router scores summed
  per expert over this batch's real tokens. ``aux.metrics``: ``experts_hit_frac`` (fraction of
  experts with a non-zero score sum in this batch), ``max_score`` (mean over tokens and
  heads of the largest router score), ``score_entropy`` (mean entropy of softmax scores).
  """

  def __init__(self, d_model: int, settings: PEERSettings = PEERSettings(), *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    s = settings
    if s.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {s.activation!r}: use one of {list(ACTIVATIONS)}")
    if s.score not in SCORES:
      raise ValueError(f"unknown score {s.score!r}: use one of {list(SCORES)}")
    self.kernel = s.kernel
    self.retrieval = pkq.ProductKeyQuery(
        d_model, num_keys_sqrt=s.num_experts_sqrt, heads=s.heads, top_k=s.top_k, d_key=s.d_key,
        per_head_keys=s.per_head_keys, query_norm=s.query_norm, bn_momentum=s.bn_momentum,
        norm_epsilon=s.norm_epsilon, query_init_scale=s.query_init_scale,
        key_init_scale=s.key_init_scale, dtype=dtype, rngs=rngs)
    self.num_experts = s.num_experts_sqrt ** 2
    self.heads, self.top_k = s.heads, s.top_k
    self.per_head_experts = s.per_head_experts
    rows = self.num_experts * (s.heads if s.per_head_experts else 1)
    names = ("table_rows", "table_embed")
    u_std = s.u_init_scale / math.sqrt(d_model)
    v_std = v_init_std(s.heads, s.top_k, s.score, s.v_init_scale)
    self.u = sharding.param(u_std * jax.random.normal(rngs.params(), (rows, d_model), jnp.float32),
                            names, kind=TableParam)
    self.v = sharding.param(v_std * jax.random.normal(rngs.params(), (rows, d_model), jnp.float32),
                            names, kind=TableParam)
    self.activation, self.score = s.activation, s.score
    self.dtype = dtype

  row_tables = ("u", "v")

  def row_index_shape(self, batch: int, length: int) -> tuple[int, ...]:
    """Shape of the distinct rows a row-sparse step can touch: ``(U,)``."""
    return (num_unique_slots(batch * length * self.heads * self.top_k, self.u.shape[0]),)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    ops = kernels.get(kernels.resolve(self.kernel, width=x.shape[-1]))
    raw, idx = self.retrieval(x, mask, ops=ops)            # [b, l, h, k] float32 / int32
    g = jax.nn.softmax(raw, axis=-1) if self.score == "softmax" else jax.nn.sigmoid(raw)
    if self.per_head_experts:
      idx = idx + (jnp.arange(self.heads, dtype=idx.dtype) * self.num_experts)[:, None]
    x = x.astype(self.dtype)
    # bld,blhkd->blhk; σ; × g; blhk,blhkd->bld
    taps, rows = row_taps(self, idx, self.u.shape[0])     # row-sparse training step
    if taps is not None:
      taps = (taps["u"], taps["v"])
    y = tm.table_mix(x, idx, g.astype(self.dtype), down=self.u[...], up=self.v[...],
                     activation=self.activation, ops=ops, taps=taps,
                     rows=rows)
    y = sharding.constrain(y, ("batch", "length", "embed"))

    sums = tm.score_sum(idx, g, self.u.shape[0], mask)
    ent = -jnp.sum(g * jnp.log(jnp.maximum(g, 1e-30)), axis=-1) if self.score == "softmax" \
        else jnp.zeros(g.shape[:-1])
    metrics = {
        "experts_hit_frac": jnp.mean((sums > 0).astype(jnp.float32)),
        "max_score": masked_mean(jax.lax.stop_gradient(g[..., 0]), mask),  # g is sorted
        "score_entropy": masked_mean(jax.lax.stop_gradient(ent), mask),
    }
    return y, Aux(metrics=metrics, counts={"score_sum": sums})


@register_ffn("peer", default_config=default_config, validate=validate)
def build(cfg, *, d_model, d_ff, dtype, rngs):
  del d_ff  # PEER's width is h·k single-neuron experts, not d_ff
  return PEER(d_model, PEERSettings.from_config(cfg), dtype=dtype, rngs=rngs)
