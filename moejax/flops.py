"""Model FLOPs per token of a moejax Transformer, by part: the matched-compute yardstick.

Counts the matrix products the model does as written (2 FLOPs per multiply-add), for one
token of a ``[batch, seq_len]`` batch:

* attention: the q/k/v/output projections (k and v of ``num_kv_heads``) and the score and value products over the whole
  ``seq_len`` window (dense attention computes every ``[L, L]`` score; the causal mask
  zeroes half of them after the fact, as in PaLM's MFU convention);
* the output projection ``d_model × vocab`` (the embedding lookup is a gather, 0 FLOPs);
* each block's feed-forward, by kind (:data:`FFN_FLOPS`): dense; MoE router, the experts
  each token is computed by (``top_k`` dropless; the capacity slots ``E · C / S`` of a
  capacity dispatch, padding included; expert choice ``E · C / S``) and shared experts;
  PEER and PKM query projection, sub-key scores over both halves (``2 · h · √N · d_key``:
  often more than the experts themselves), the ``k²`` candidate sums and the lookup.

Not counted: element-wise work (norms, activations, softmax, the top-k selection) and the
gathers of the sorted (dropless) dispatch, which are no matrix products. Training FLOPs are 3 × forward (the
backward is two products per forward product); the optimizer's update of the tables is
not model compute. ``tests/test_flops.py`` checks these counts against XLA's cost
analysis of the compiled forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from moejax import config as config_lib


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs per token, ``parts`` keyed like ``block_2/peer/scores``."""

  parts: dict[str, float]

  @property
  def forward(self) -> float:
    return float(sum(self.parts.values()))

  @property
  def train(self) -> float:
    """Forward + backward (3 × forward) per token."""
    return 3.0 * self.forward

  def by_prefix(self, prefix: str) -> float:
    return float(sum(v for k, v in self.parts.items() if k.startswith(prefix)))


def _dense_mlp(d_model: int, d_ff: int, gated: bool) -> float:
  return 2.0 * d_model * d_ff * (3 if gated else 2)


def _dense(cfg, config, *, train: bool) -> dict[str, float]:
  del train
  m = config.model
  return {"mlp": _dense_mlp(m.d_model, m.d_ff, cfg.gated)}


def _moe(cfg, config, *, train: bool) -> dict[str, float]:
  # Imported here: the MoE package pulls in its dispatchers, which the dense count never needs.
  from moejax.layers.moe import config as moe_config
  from moejax.layers.moe import routing
  m = config.model
  d_ff = cfg.d_ff or m.d_ff
  expert = _dense_mlp(m.d_model, d_ff, cfg.gated)
  router = routing.ROUTERS[cfg.router]
  k = router.experts_per_token(cfg.top_k)
  factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
  noncausal = router.noncausal_reason(cfg) is not None and cfg.eval_no_drop
  capacity = cfg.dispatch in ("einsum", "expert_parallel") or cfg.router == "expert_choice"
  if not train and noncausal:
    # Evaluation runs a non-causal router without dropping (moe/layer.py): token choice
    # dropless, expert choice with every token at every expert.
    per_token = cfg.num_experts if cfg.router == "expert_choice" else cfg.top_k
  elif capacity:
    length = config.data.seq_len
    s = moe_config.routing_group_size(cfg.group_size, length, cfg.num_experts, k)
    c = routing.capacity(s, cfg.num_experts, k, factor, cfg.min_capacity)
    per_token = cfg.num_experts * c / s
  else:
    per_token = cfg.top_k
  out = {"experts": per_token * expert}
  if capacity and cfg.dispatch == "einsum" and (train or not noncausal):
    # GShard's dispatch and combine einsums over the [S, E, C] masks: E·C·d multiply-adds
    # per token each (on a single CPU device the same rows move as gathers instead).
    out["dispatch"] = 2 * 2.0 * cfg.num_experts * c * m.d_model
  if router.uses_scores:
    out["router"] = 2.0 * m.d_model * cfg.num_experts
  if cfg.num_shared_experts:
    out["shared"] = _dense_mlp(m.d_model, cfg.shared_d_ff or d_ff * cfg.num_shared_experts,
                               cfg.gated)
    if cfg.shared_gate:
      out["shared_gate"] = 2.0 * m.d_model
  return out


def _product_key(cfg, config, n: int) -> dict[str, float]:
  d, h, dk, k = config.model.d_model, cfg.heads, cfg.d_key, cfg.top_k
  return {"query": 2.0 * d * h * dk,
          "scores": 2.0 * h * n * dk,           # two halves: n sub-keys of d_key / 2 each
          "candidates": float(h * k * k)}       # k² sums of two half-scores


def _peer(cfg, config, *, train: bool) -> dict[str, float]:
  del train
  out = _product_key(cfg, config, cfg.num_experts_sqrt)
  # Down (x · u_i) and up (σ · g · v_i) for h·k single-neuron experts.
  out["experts"] = 4.0 * cfg.heads * cfg.top_k * config.model.d_model
  return out


def _pkm(cfg, config, *, train: bool) -> dict[str, float]:
  del train
  out = _product_key(cfg, config, cfg.num_keys_sqrt)
  out["values"] = 2.0 * cfg.heads * cfg.top_k * config.model.d_model
  return out


# FFN kind -> (its config section, the model config, train?) -> {part: FLOPs per token}.
FFN_FLOPS: dict[str, Callable[..., dict[str, float]]] = {
    "dense": _dense, "moe": _moe, "peer": _peer, "pkm": _pkm}


def count(config: ml_collections.ConfigDict, *, train: bool = True) -> FlopCount:
  """Forward FLOPs per token of ``config``'s model (``train``: training-mode routing).

  ``config.model.vocab_size`` must be set (0 is taken as the byte tokenizer's 258 only
  when ``data.tokenizer`` is ``byte``).
  """
  m = config.model
  vocab = m.vocab_size
  if vocab == 0:
    if config.data.tokenizer != "byte":
      raise ValueError("model.vocab_size is 0 and the tokenizer is not 'byte': set the vocab size")
    from moejax.data.tokenizers import ByteTokenizer
    vocab = ByteTokenizer().vocab_size
  heads_dim = m.num_heads * m.head_dim
  kv_dim = (m.num_kv_heads or m.num_heads) * m.head_dim     # grouped-query: fewer k/v heads
  length = config.data.seq_len
  parts: dict[str, float] = {"output": 2.0 * m.d_model * vocab}
  sparse = set(config_lib.parse_sparse_layers(m.sparse_layers, m.num_layers))
  for i in range(m.num_layers):
    parts[f"block_{i}/attn/proj"] = 2.0 * m.d_model * (2 * heads_dim + 2 * kv_dim)
    parts[f"block_{i}/attn/scores"] = 4.0 * length * heads_dim
    kind = m.sparse_ffn if i in sparse else m.ffn
    for name, flops in FFN_FLOPS[kind](config[kind], config, train=train).items():
      parts[f"block_{i}/{kind}/{name}"] = flops
  return FlopCount(parts)


def steps_for_budget(config: ml_collections.ConfigDict, budget: float, *,
                     vocab_size: int | None = None) -> int:
  """Training steps that spend ``budget`` model FLOPs at ``config``'s batch (isoFLOP arms).

  Training FLOPs per step = :attr:`FlopCount.train` per token × ``batch_size × seq_len``.
  ``vocab_size`` stands in for ``config.model.vocab_size`` (0 when the tokenizer sets it).
  """
  if vocab_size is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.vocab_size = vocab_size
  tokens = config.data.batch_size * config.data.seq_len
  return max(1, round(budget / (count(config, train=True).train * tokens)))
