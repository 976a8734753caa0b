"""The ``config.moe`` section: its settings (one frozen dataclass, the defaults) and validation."""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from moejax import config as config_lib
from moejax import sharding
from moejax.errors import config_error
from moejax.kernels.activations import NAMES as ACTIVATIONS
from moejax.layers.moe import dispatch as _dispatch
from moejax.layers.moe import routing as _routing
from moejax.layers.settings import Settings

ROUTERS = tuple(_routing.ROUTERS)              # registered routers
ROUTER_SCORES = tuple(_routing.SCORE_FUNCTIONS)  # registered score functions
SECOND_POLICIES = ("all", "sampling", "random")
PRIORITIES = ("position", "batch")
DISPATCHES = ("einsum", "dropless", "expert_parallel", "dropless_ep")
DROPLESS_IMPLS = ("auto", "blocked", "ragged_dot", "gmm")
AUTO_SLOTS_PER_EXPERT = 32      # moe.group_size = -1: groups where each expert expects this load
NOISES = ("none", "jitter", "gaussian")


# Routers of released MoE families, as settings of this section (router=top_k,
# router_scores=linear, gated=True, activation=silu in all three): the router takes the
# softmax over all experts, then the top k; the families differ in what follows.
#   Mixtral:   renormalize=True (the k chosen gates sum to 1).
#   Qwen2-MoE: renormalize=False (norm_topk_prob), plus num_shared_experts=1 with
#              shared_d_ff=shared_expert_intermediate_size and shared_gate=True.
#   OLMoE:     renormalize=False (and model.qk_norm=full in the attention).


@dataclasses.dataclass(frozen=True)
class MoESettings(Settings):
  """``config.moe``: every setting of the MoE layer and its router, with its default."""

  num_experts: int = 8
  top_k: int = 2                       # experts per token (token choice and hash)
  router: str = "top_k"                # top_k (token choice) | expert_choice | hash
  router_scores: str = "linear"        # linear | attention (Yuan 2.0-M32 attention router)
  router_noise: str = "none"           # none | jitter (Switch) | gaussian (noisy top-k); train only
  jitter_eps: float = 0.01             # jitter: x *= U(1-eps, 1+eps) on the router input
  second_policy: str = "all"           # slots 2..k in training: all | sampling | random (GShard)
  second_policy_eval: str = "all"      # the same in evaluation (deterministic by default)
  second_threshold: float = 0.5        # random: keep slot i with prob min(1, renormalised gate / threshold)
  # Combine weights renormalised over the chosen experts; only for top_k > 1 (top_k=1 keeps
  # the raw gate, as in Switch, else the weight is g/g = 1 and the router gets no LM gradient).
  renormalize: bool = True
  capacity_factor_train: float = 1.25  # C = ceil(k * group_size * factor / E); <= 0: no dropping (C = S)
  capacity_factor_eval: float = 2.0    # expert_choice: factor = average experts per token
  min_capacity: int = 4
  # Tokens per routing group of the capacity dispatches (einsum, expert_parallel):
  # capacity C = ceil(k * group * factor / E) is per group and expert, and the GShard
  # masks [G, group, E, C] make dispatch + combine cost O(group) per token. Smaller
  # groups are cheaper but drop more: each group must absorb its own load imbalance
  # (a globally skewed router drops alike at any size).
  # Drops depend on each expert's expected load per group, S * k / E.
  # -1 (auto): the smallest divisor of the sequence length with S * k / E >= 32
  #   (AUTO_SLOTS_PER_EXPERT): 128 tokens for top-2 of 8, whole 512-token sequences
  #   for top-1 of 128 (layer.routing_group_size). 0: one group per sequence. > 0:
  #   exactly this many consecutive tokens of the batch (must divide batch_size *
  #   seq_len; may span sequences). Dropless dispatches give the same result at any size.
  group_size: int = -1
  priority: str = "position"           # capacity goes to: position (first tokens) | batch (BPR, top-1 prob)
  # einsum (GShard masks) | dropless (sorted, grouped matmul) | expert_parallel (all_to_all
  # in shard_map) | dropless_ep (ragged_all_to_all; TPU/GPU, on CPU it runs expert_parallel,
  # with a note in the log)
  dispatch: str = "dropless"
  dropless_impl: str = "auto"          # auto | blocked (CPU) | ragged_dot | gmm (megablox, TPU)
  # Largest block (rows, a power of two) of the blocked path; smaller blocks halve down
  # from it; 0: auto.
  dropless_block: int = 0
  # dropless_ep receive buffer: <= 0: worst case (never drops; grows with the expert
  # shards); > 0: this times the balanced load, overflow rows dropped.
  ep_buffer_factor: float = 0.0
  balance_loss_weight: float = 0.01    # Switch load balancing loss weight
  z_loss_weight: float = 0.001         # router z-loss weight
  d_ff: int = 0                        # hidden size of each expert; 0: model.d_ff
  num_shared_experts: int = 0          # DeepSeek-style experts every token uses (one FFN of n * d_ff)
  shared_d_ff: int = 0                 # hidden size of that shared FFN; 0: num_shared_experts * d_ff
  shared_gate: bool = False            # scale the shared FFN's output by sigmoid(x @ w) (Qwen2-MoE)
  gated: bool = False                  # GLU experts (SwiGLU with activation='silu')
  activation: str = "gelu_tanh"        # gelu (exact erf) | gelu_tanh | silu | relu (kernels/activations.py)
  hash_seed: int = 0                   # seed of the fixed hash routing table / projection
  # Routers that let later tokens change earlier tokens' outputs in a decoder (expert
  # choice; top-k > 1 or priority=batch with a capacity) are refused unless this is
  # set: their training loss can use the future. Evaluation and generation run such
  # layers without dropping (dropless, or every expert for expert choice).
  allow_noncausal: bool = False
  # Evaluation of such a layer: True drops nothing (token choice dropless, expert choice
  # every token at every expert: a causal function, but not the one trained, and E times
  # the expert compute); False evaluates with capacity_factor_eval, routing over the
  # whole group as in training (what the expert-choice paper and PEER's MoE baseline do).
  eval_no_drop: bool = True


default_config = MoESettings.default_config


def routing_group_size(group_size: int, length: int, num_experts: int, experts_per_token: int
                       ) -> int:
  """Tokens per routing group for ``moe.group_size`` and sequences of ``length`` tokens.

  ``-1`` (auto): the smallest divisor ``S`` of ``length`` at which every expert expects
  ``S * k / E >= AUTO_SLOTS_PER_EXPERT`` (32) routed slots: the drop rate depends on that
  expected load (uniform top-2 of 8 at factor 1.25, 128 tokens: 0.4% of slots), while
  the masks cost O(S) per token. Top-2 of 8: 128 tokens; top-1 of 128: the whole
  sequence (so is any length without such a divisor). ``0``: the whole sequence.
  ``> 0``: as given.
  """
  if group_size > 0:
    return group_size
  if group_size == 0:
    return length
  want = -(-AUTO_SLOTS_PER_EXPERT * num_experts // max(experts_per_token, 1))
  return min((s for s in range(want, length + 1) if length % s == 0), default=length)


def check_mesh(cfg, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
  """The MoE checks that need the resolved mesh (``validate`` cannot resolve ``mesh.expert=-1``):
  the experts split evenly over the expert shards, and a dispatch that splits the routing
  groups over the batch shards (expert_parallel, dropless_ep) gets a multiple of them from
  a training batch. Raises ConfigError naming the field to change; the layer checks the
  same at trace time with a plain ValueError."""
  rules = dict(sharding.logical_rules(config_lib.parse_rules(config.mesh.rules)))

  def shards(name):   # mesh axes (of size > 1) the logical axis name maps to, and their product
    axes = [a for a in sharding.as_axes(rules.get(name)) if mesh_shape.get(a, 1) > 1]
    return axes, math.prod(mesh_shape[a] for a in axes)

  e_axes, n_e = shards("expert")
  if not e_axes:
    return  # experts not sharded (expert_parallel falls back to einsum)
  if cfg.num_experts % n_e:
    raise _err("num_experts", cfg.num_experts,
               f"must be a multiple of the {n_e} expert shards (mesh axis {' x '.join(e_axes)})",
               f"set --config.moe.num_experts={n_e * max(1, cfg.num_experts // n_e)} "
               f"or --config.mesh.expert to a divisor of {cfg.num_experts}")
  if not _dispatch.resolve_dispatch(cfg.dispatch)[1].splits_groups:
    return
  _, n_g = shards("groups")
  b, l = config.data.batch_size, config.data.seq_len
  k = _routing.ROUTERS[cfg.router].experts_per_token(cfg.top_k)
  s = routing_group_size(cfg.group_size, l, cfg.num_experts, k)
  if (b * l) % s or (b * l // s) % n_g == 0:
    return  # a group size that does not divide the batch is validate's error
  g = b * l // s
  per_shard = b * l // n_g if (b * l) % n_g == 0 else 0
  # a group size that gives a multiple of n_g groups (at most one sequence long)
  size = max((d for d in range(1, l + 1) if per_shard % d == 0), default=0) if per_shard else 0
  batch_fix = f"--config.data.batch_size to a multiple of {n_g}"
  if cfg.group_size > 0:   # explicit: the size is at fault
    field, value = "moe.group_size", cfg.group_size
    fix = (f"set --config.moe.group_size={size}" if size else
           f"set {batch_fix} and --config.moe.group_size=-1")
  else:                    # auto / whole sequences: the batch is
    field, value = "data.batch_size", b
    fix = f"set {batch_fix}" + (f" or --config.moe.group_size={size}" if size else "")
  raise config_error(
      field, value,
      f"dispatch={cfg.dispatch} splits the {g} routing groups of {s} "
      f"tokens over {n_g} data x expert shards, which must divide {g}", fix)


def _err(field, value, why, fix):
  return config_error(f"moe.{field}", value, why, fix)


def validate(cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad ``config.moe`` field."""
  choices = {"router": ROUTERS, "router_scores": ROUTER_SCORES, "router_noise": NOISES,
             "second_policy": SECOND_POLICIES, "second_policy_eval": SECOND_POLICIES,
             "priority": PRIORITIES, "dispatch": DISPATCHES, "dropless_impl": DROPLESS_IMPLS}
  for field, allowed in choices.items():
    if cfg[field] not in allowed:
      raise _err(field, cfg[field], f"must be one of {list(allowed)}",
                 f"set --config.moe.{field}={allowed[0]}")
  if cfg.activation not in ACTIVATIONS:
    raise _err("activation", cfg.activation, f"must be one of {list(ACTIVATIONS)}",
               "set --config.moe.activation=gelu")
  if cfg.num_experts < 1:
    raise _err("num_experts", cfg.num_experts, "must be >= 1", "set --config.moe.num_experts=8")
  if not 1 <= cfg.top_k <= cfg.num_experts:
    raise _err("top_k", cfg.top_k, f"must be in [1, moe.num_experts={cfg.num_experts}]",
               f"set --config.moe.top_k={min(2, cfg.num_experts)}")
  for f in ("d_ff", "num_shared_experts", "shared_d_ff", "dropless_block", "min_capacity"):
    if cfg[f] < 0:
      raise _err(f, cfg[f], "must be >= 0", f"set --config.moe.{f}=0")
  if (cfg.shared_gate or cfg.shared_d_ff) and not cfg.num_shared_experts:
    field = "shared_gate" if cfg.shared_gate else "shared_d_ff"
    raise _err(field, cfg[field], "applies to the shared expert, and moe.num_shared_experts=0",
               "set --config.moe.num_shared_experts=1")
  if cfg.group_size < -1:
    raise _err("group_size", cfg.group_size, "must be >= -1 (-1: auto, 0: one group per sequence)",
               "set --config.moe.group_size=-1")
  if cfg.dropless_block & (cfg.dropless_block - 1):
    raise _err("dropless_block", cfg.dropless_block, "must be 0 (auto) or a power of two",
               f"set --config.moe.dropless_block={1 << (cfg.dropless_block.bit_length() - 1)}")
  for f in ("balance_loss_weight", "z_loss_weight", "jitter_eps"):
    if cfg[f] < 0:
      raise _err(f, cfg[f], "must be >= 0", f"set --config.moe.{f}=0")
  if cfg.second_threshold <= 0:
    raise _err("second_threshold", cfg.second_threshold, "must be > 0",
               "set --config.moe.second_threshold=0.5")
  why = _routing.ROUTERS[cfg.router].noncausal_reason(cfg)
  if why and not cfg.allow_noncausal:
    other = ("--config.moe.dispatch=dropless" if _routing.ROUTERS[cfg.router].dropless_ok
             else "--config.moe.router=top_k --config.moe.dispatch=dropless")
    raise _err("router", cfg.router, f"not causal in a decoder: {why}",
               f"set --config.moe.allow_noncausal=true to train with it anyway, or {other}")
  if cfg.router == "expert_choice":
    for f in ("capacity_factor_train", "capacity_factor_eval"):
      if cfg[f] <= 0:
        raise _err(f, cfg[f], "expert_choice needs a capacity factor > 0 (average experts per token)",
                   f"set --config.moe.{f}=2.0")
    if cfg.dispatch in ("dropless", "dropless_ep"):
      raise _err("dispatch", cfg.dispatch, "expert_choice is capacity-based, it has no dropless form",
                 "set --config.moe.dispatch=einsum")
  if cfg.router == "hash" and cfg.router_noise != "none":
    raise _err("router_noise", cfg.router_noise, "hash routing has no router to add noise to",
               "set --config.moe.router_noise=none")
  seq_len = config.data.seq_len if "data" in config else None
  if cfg.group_size > 0 and seq_len and (seq_len * config.data.batch_size) % cfg.group_size:
    raise _err("group_size", cfg.group_size,
               f"must divide data.batch_size * data.seq_len = {seq_len * config.data.batch_size}",
               "set --config.moe.group_size=-1 (auto, within sequences)")
  mesh = config.get("mesh")
  if mesh is not None and mesh.expert > 1 and cfg.num_experts % mesh.expert:
    raise _err("num_experts", cfg.num_experts, f"must be a multiple of mesh.expert={mesh.expert}",
               f"set --config.moe.num_experts={mesh.expert * max(1, cfg.num_experts // mesh.expert)}")
