"""The sparse Mixture-of-Experts feed-forward layer (registered as FFN kind ``moe``).

Flow of one call (B batch, L length, D embed, G groups, S tokens per group, E experts)::

  x [B, L, D] -> groups [G, S, D] -> router logits [G, S, E] (float32)
    -> plan (routing.py) -> dispatch (einsum | dropless | expert_parallel | dropless_ep,
       dispatch.DISPATCH_MODES) -> [G, S, D]
    -> + shared experts -> y [B, L, D],  aux (losses, metrics, counts['load'] [E])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import sharding
from moejax.errors import config_error
from moejax.layers.base import Aux, register_ffn
from moejax.layers.dense import DenseFFN
from moejax.layers.projection import project
from moejax.layers.moe import config as moe_config
from moejax.layers.moe import dispatch as dispatch_lib
from moejax.layers.moe import losses
from moejax.layers.moe import routing
from moejax.layers.moe.experts import Experts


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
  want = -(-moe_config.AUTO_SLOTS_PER_EXPERT * num_experts // max(experts_per_token, 1))
  return min((s for s in range(want, length + 1) if length % s == 0), default=length)


class MoE(nnx.Module):
  """Sparse MoE FFN. ``y, aux = moe(x, mask=mask)``, ``x, y: [batch, length, embed]``.

  Train / eval follow ``model.train()`` / ``model.eval()`` (the ``deterministic``
  attribute): capacity factor, router noise and the second-expert policy differ.
  Randomness comes from the ``router`` stream of the ``rngs`` given at construction
  (a fork of ``params`` if there is none), only when a random option is on.

  Routing groups (``moe.group_size``, :func:`routing_group_size`): the capacity
  dispatches (einsum, expert_parallel) give every expert C = ceil(k * S * factor / E)
  slots per group of S tokens. Their masks ``[G, S, E, C]`` make dispatch and combine
  cost O(S) per token: about 20% of the layer's fwd+bwd for whole 512-token sequences on
  CPU (top-2 of 8, d_model 512). The default (auto) groups give each expert an expected
  32 slots per group: 128 tokens there, a quarter of that cost, but a few more drops, as
  each group absorbs its own imbalance (uniform top-2 routing at factor 1.25: 0.4% of
  slots dropped, vs 0.1% at 256 tokens and 1.5% at 64; a globally skewed router drops
  alike at any size).
  Dropless dispatches route per token: grouping does not change their result.

  Dropping: in evaluation (``deterministic``) a layer whose routing is not causal (see
  ``routing.Router.noncausal_reason``; allowed only with ``moe.allow_noncausal``) drops
  nothing: token choice runs dropless, expert choice gives every token to every expert
  (capacity C = S); with ``moe.eval_no_drop = False`` it is evaluated as trained instead. ``no_drop = True`` (set by ``moejax.generation``) does the same for
  every router, so that decoding one token at a time equals the full forward.
  ``wants_token_ids``: the Transformer passes the token ids (hash routing by token id).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, d_model: int, d_ff: int,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_experts = cfg.num_experts
    self.top_k = cfg.top_k
    self.router_kind = cfg.router
    self.eval_drop_free = (routing.ROUTERS[cfg.router].noncausal_reason(cfg) is not None
                           and cfg.eval_no_drop)
    self.no_drop = False
    self.wants_token_ids = cfg.router == "hash"
    self.second_policy = cfg.second_policy
    self.second_policy_eval = cfg.second_policy_eval
    self.second_threshold = cfg.second_threshold
    self.renormalize = cfg.renormalize
    self.capacity_factor_train = cfg.capacity_factor_train
    self.capacity_factor_eval = cfg.capacity_factor_eval
    self.min_capacity = cfg.min_capacity
    self.group_size = cfg.group_size
    self.batch_priority = cfg.priority == "batch"
    self.dispatch = cfg.dispatch
    self.dropless_impl = cfg.dropless_impl
    self.dropless_block = cfg.dropless_block
    self.ep_buffer_factor = cfg.ep_buffer_factor
    self.balance_loss_weight = cfg.balance_loss_weight
    self.z_loss_weight = cfg.z_loss_weight
    self.hash_seed = cfg.hash_seed
    self.activation = cfg.activation
    self.dtype = dtype
    self.deterministic = False
    self._check_mesh()
    expert_ff = cfg.d_ff or d_ff
    self.router = (None if not routing.ROUTERS[cfg.router].uses_scores else
                   routing.RouterScores(d_model, cfg.num_experts, kind=cfg.router_scores,
                                        noise=cfg.router_noise, jitter_eps=cfg.jitter_eps,
                                        rngs=rngs))
    self.experts = Experts(cfg.num_experts, d_model, expert_ff, gated=cfg.gated,
                           activation=cfg.activation, rngs=rngs)
    shared_ff = cfg.get("shared_d_ff", 0) or expert_ff * cfg.num_shared_experts
    self.shared = (DenseFFN(d_model, shared_ff, activation=cfg.activation,
                            gated=cfg.gated, dtype=dtype, rngs=rngs)
                   if cfg.num_shared_experts else None)
    # Qwen2-MoE's shared expert gate: y_shared * sigmoid(x @ shared_gate) [embed, 1].
    self.shared_gate = (sharding.param(nnx.initializers.lecun_normal()(rngs.params(), (d_model, 1)),
                                       ("embed", None))
                        if cfg.num_shared_experts and cfg.get("shared_gate", False) else None)
    random = (cfg.router_noise != "none" or
              (cfg.router == "top_k" and cfg.top_k > 1 and
               {cfg.second_policy, cfg.second_policy_eval} & {"sampling", "random"}))
    if random:
      stream = "router" if "router" in rngs else "params"
      self.rngs = rngs[stream].fork()
    else:
      self.rngs = nnx.data(None)

  def _drop_free(self) -> bool:
    """Nothing may be dropped: evaluation of a non-causal layer, or ``no_drop`` (decoding)."""
    return self.deterministic and (self.no_drop or self.eval_drop_free)

  def _capacity(self, group_size: int, train: bool) -> int | None:
    if self._drop_free() or dispatch_lib.resolve_dispatch(self.dispatch)[1].dropless:
      return None
    factor = self.capacity_factor_train if train else self.capacity_factor_eval
    k = routing.ROUTERS[self.router_kind].experts_per_token(self.top_k)
    return routing.capacity(group_size, self.num_experts, k, factor, self.min_capacity)

  def route(self, xg: jax.Array, mask: jax.Array, token_ids: jax.Array | None = None):
    """``xg [G, S, D]``, ``mask [G, S]`` -> (plan, logits ``[G, S, E]`` or None)."""
    train = not self.deterministic
    router = routing.ROUTERS[self.router_kind]
    cap = self._capacity(xg.shape[1], train)
    policy = self.second_policy if train else self.second_policy_eval
    noisy = train and self.router is not None and self.router.noise != "none"
    needs_rng = router.needs_rng(self, policy)
    rng = self.rngs() if (noisy or needs_rng) else None
    noise_rng = None
    if noisy:
      rng, noise_rng = jax.random.split(rng)
    logits = None if self.router is None else self.router(xg, train=train, rng=noise_rng)
    plan = router.plan(self, xg, logits, mask, token_ids, capacity=cap, policy=policy,
                       rng=rng, no_drop=self._drop_free())
    return plan, logits

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               token_ids: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Args:
      x: ``[batch, length, embed]``.
      mask: bool ``[batch, length]`` real tokens (padding is not routed, takes no
        capacity, counts in no statistic, and gets a zero expert output).
      token_ids: optional int ``[batch, length]``, used only by ``router='hash'`` (the
        Transformer passes them, as ``wants_token_ids`` is set; without them hash routing
        hashes a fixed random projection of ``x``).

    Returns:
      ``y [batch, length, embed]`` and an :class:`Aux`.
    """
    b, l, d = x.shape
    x = x.astype(self.dtype)
    mask = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
    # Drop-free routing is per token: any grouping gives the same result (decoding: l = 1).
    k = routing.ROUTERS[self.router_kind].experts_per_token(self.top_k)
    s = l if self._drop_free() else routing_group_size(self.group_size, l, self.num_experts, k)
    g = b * l // s
    xg = sharding.constrain(x.reshape(g, s, d), ("groups", None, "embed"))
    mg = mask.reshape(g, s)
    tg = None if token_ids is None else token_ids.reshape(g, s)
    plan, logits = self.route(xg, mg, tg)

    weights = self.experts.weights(self.dtype)
    _, mode = dispatch_lib.resolve_dispatch(self.dispatch)
    if self._drop_free() and not mode.dropless:
      mode = dispatch_lib.DISPATCH_MODES["dropless"]
    if mode.splits_groups:
      self._check_mesh(b, l, g, s)
    opts = dispatch_lib.DispatchOptions(impl=self.dropless_impl, block=self.dropless_block,
                                        buffer_factor=self.ep_buffer_factor)
    y, plan = mode.apply(xg, plan, weights, self.activation, opts)
    y = sharding.constrain(y, ("groups", None, "embed")).reshape(b, l, d)
    if self.shared is not None:
      ys = self.shared(x, mask=mask)[0]
      if self.shared_gate is not None:
        ys = ys * jax.nn.sigmoid(project(x, self.shared_gate[...].astype(self.dtype)))
      y = y + ys
    return y.astype(self.dtype), self._aux(plan, logits, mg)

  def _check_mesh(self, b: int = 0, l: int = 0, g: int = 0, s: int = 0) -> None:
    """Raises ConfigError unless the experts split evenly over the ``expert`` shards and,
    for the shard_map dispatches (``g > 0``), shard_map can split the ``g`` routing
    groups over the ``groups`` (data x expert) shards. Runs under the active mesh, at
    construction and at trace time: ``validate`` cannot resolve ``mesh.expert=-1``."""
    e_axes = sharding.mesh_axes("expert")
    if not e_axes:
      return  # experts not sharded (expert_parallel falls back to einsum)
    shape = jax.sharding.get_abstract_mesh().shape
    n_e = math.prod(shape[a] for a in e_axes)
    n_g = math.prod(shape[a] for a in sharding.mesh_axes("groups"))
    if self.num_experts % n_e:
      raise config_error(
          "moe.num_experts", self.num_experts,
          f"must be a multiple of the {n_e} expert shards (mesh axis {' x '.join(e_axes)})",
          f"set --config.moe.num_experts={n_e * max(1, self.num_experts // n_e)} "
          f"or --config.mesh.expert to a divisor of {self.num_experts}")
    if g and g % n_g:
      per_shard = b * l // n_g if (b * l) % n_g == 0 else 0
      # a group size that gives a multiple of n_g groups (at most one sequence long)
      size = max((d for d in range(1, l + 1) if per_shard % d == 0), default=0) if per_shard else 0
      batch_fix = f"--config.data.batch_size to a multiple of {n_g}"
      if self.group_size > 0:   # explicit: the size is at fault
        field, value = "moe.group_size", self.group_size
        fix = (f"set --config.moe.group_size={size}" if size else
               f"set {batch_fix} and --config.moe.group_size=-1")
      else:                     # auto / whole sequences: the batch is
        field, value = "data.batch_size", b
        fix = f"set {batch_fix}" + (f" or --config.moe.group_size={size}" if size else "")
      raise config_error(
          field, value,
          f"dispatch={self.dispatch} splits the {g} routing groups of {s} "
          f"tokens over {n_g} data x expert shards, which must divide {g}", fix)

  def _aux(self, plan, logits, mask) -> Aux:
    load = plan.load()
    probs = None if logits is None else jax.nn.softmax(logits, axis=-1)
    metrics = losses.routing_metrics(load, plan.token_kept(), mask, probs)
    aux_losses = {}
    if logits is not None:
      z = losses.z_loss(logits, mask)
      metrics["z_loss"] = z
      aux_losses["z_loss"] = self.z_loss_weight * z
      bal = losses.load_balance_loss(probs, plan.routed_fraction(), mask)
      metrics["balance_loss"] = bal
      if not routing.ROUTERS[self.router_kind].balanced:  # e.g. expert choice
        aux_losses["load_balance"] = self.balance_loss_weight * bal
    return Aux(losses=aux_losses, metrics=metrics, counts={"load": load})


@register_ffn("moe", default_config=moe_config.default_config, validate=moe_config.validate)
def build(cfg, *, d_model, d_ff, dtype, rngs):
  return MoE(cfg, d_model=d_model, d_ff=d_ff, dtype=dtype, rngs=rngs)
