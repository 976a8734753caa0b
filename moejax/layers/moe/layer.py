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
from flax import nnx

from moejax import sharding
from moejax.layers.base import Aux, register_ffn
from moejax.layers.dense import DenseFFN, DenseSettings
from moejax.layers.projection import project
from moejax.layers.moe import config as moe_config
from moejax.layers.moe import dispatch as dispatch_lib
from moejax.layers.moe import losses
from moejax.layers.moe import routing
from moejax.layers.moe.config import routing_group_size
from moejax.layers.moe.experts import Experts


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

  def __init__(self, settings: moe_config.MoESettings, *, d_model: int, d_ff: int,
               dtype=jnp.float32, rngs: nnx.Rngs):
    s = self.settings = settings
    router = routing.ROUTERS[s.router]
    self.eval_drop_free = router.noncausal_reason(s) is not None and s.eval_no_drop
    self.no_drop = False
    self.wants_token_ids = s.router == "hash"
    self.dtype = dtype
    self.deterministic = False
    self._check_mesh()
    expert_ff = s.d_ff or d_ff
    self.router = (None if not router.uses_scores else
                   routing.RouterScores(d_model, s.num_experts, kind=s.router_scores,
                                        noise=s.router_noise, jitter_eps=s.jitter_eps, rngs=rngs))
    self.experts = Experts(s.num_experts, d_model, expert_ff, gated=s.gated,
                           activation=s.activation, rngs=rngs)
    shared_ff = s.shared_d_ff or expert_ff * s.num_shared_experts
    self.shared = (DenseFFN(d_model, shared_ff, DenseSettings(activation=s.activation, gated=s.gated),
                            dtype=dtype, rngs=rngs)
                   if s.num_shared_experts else None)
    # Qwen2-MoE's shared expert gate: y_shared * sigmoid(x @ shared_gate) [embed, 1].
    self.shared_gate = (sharding.param(nnx.initializers.lecun_normal()(rngs.params(), (d_model, 1)),
                                       ("embed", None))
                        if s.num_shared_experts and s.shared_gate else None)
    random = (s.router_noise != "none" or
              (s.router == "top_k" and s.top_k > 1 and
               {s.second_policy, s.second_policy_eval} & {"sampling", "random"}))
    if random:
      stream = "router" if "router" in rngs else "params"
      self.rngs = rngs[stream].fork()
    else:
      self.rngs = nnx.data(None)

  def _drop_free(self) -> bool:
    """Nothing may be dropped: evaluation of a non-causal layer, or ``no_drop`` (decoding)."""
    return self.deterministic and (self.no_drop or self.eval_drop_free)

  def _capacity(self, group_size: int, train: bool) -> int | None:
    s = self.settings
    if self._drop_free() or dispatch_lib.resolve_dispatch(s.dispatch)[1].dropless:
      return None
    factor = s.capacity_factor_train if train else s.capacity_factor_eval
    k = routing.ROUTERS[s.router].experts_per_token(s.top_k)
    return routing.capacity(group_size, s.num_experts, k, factor, s.min_capacity)

  def route(self, xg: jax.Array, mask: jax.Array, token_ids: jax.Array | None = None):
    """``xg [G, S, D]``, ``mask [G, S]`` -> (plan, logits ``[G, S, E]`` or None)."""
    train = not self.deterministic
    s = self.settings
    router = routing.ROUTERS[s.router]
    cap = self._capacity(xg.shape[1], train)
    policy = s.second_policy if train else s.second_policy_eval
    noisy = train and self.router is not None and self.router.noise != "none"
    needs_rng = router.needs_rng(s, policy)
    rng = self.rngs() if (noisy or needs_rng) else None
    noise_rng = None
    if noisy:
      rng, noise_rng = jax.random.split(rng)
    logits = None if self.router is None else self.router(xg, train=train, rng=noise_rng)
    plan = router.plan(s, xg, logits, mask, token_ids, capacity=cap, policy=policy,
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
    st = self.settings
    k = routing.ROUTERS[st.router].experts_per_token(st.top_k)
    s = l if self._drop_free() else routing_group_size(st.group_size, l, st.num_experts, k)
    g = b * l // s
    xg = sharding.constrain(x.reshape(g, s, d), ("groups", None, "embed"))
    mg = mask.reshape(g, s)
    tg = None if token_ids is None else token_ids.reshape(g, s)
    plan, logits = self.route(xg, mg, tg)

    weights = self.experts.weights(self.dtype)
    _, mode = dispatch_lib.resolve_dispatch(st.dispatch)
    if self._drop_free() and not mode.dropless:
      mode = dispatch_lib.DISPATCH_MODES["dropless"]
    if mode.splits_groups:
      self._check_mesh(b, l, g, s)
    opts = dispatch_lib.DispatchOptions(impl=st.dropless_impl, block=st.dropless_block,
                                        buffer_factor=st.ep_buffer_factor)
    y, plan = mode.apply(xg, plan, weights, st.activation, opts)
    y = sharding.constrain(y, ("groups", None, "embed")).reshape(b, l, d)
    if self.shared is not None:
      ys = self.shared(x, mask=mask)[0]
      if self.shared_gate is not None:
        ys = ys * jax.nn.sigmoid(project(x, self.shared_gate[...].astype(self.dtype)))
      y = y + ys
    return y.astype(self.dtype), self._aux(plan, logits, mg)

  def _check_mesh(self, b: int = 0, l: int = 0, g: int = 0, s: int = 0) -> None:
    """Raises ValueError unless the experts split evenly over the ``expert`` shards and, for
    the shard_map dispatches (``g > 0``), the ``g`` routing groups of ``s`` tokens (``b``
    sequences of ``l``) over the ``groups`` (data x expert) shards. Runs under the active
    mesh, at construction and at trace time. Training checks the same first, naming the
    config field to change (``moe_config.check_mesh``)."""
    e_axes = sharding.mesh_axes("expert")
    if not e_axes:
      return  # experts not sharded (expert_parallel falls back to einsum)
    shape = jax.sharding.get_abstract_mesh().shape
    n_e = math.prod(shape[a] for a in e_axes)
    n_g = math.prod(shape[a] for a in sharding.mesh_axes("groups"))
    st = self.settings
    if st.num_experts % n_e:
      raise ValueError(f"{st.num_experts} experts do not split evenly over the {n_e} expert "
                       f"shards (mesh axis {' x '.join(e_axes)})")
    if g and g % n_g:
      raise ValueError(f"dispatch={st.dispatch} splits the {g} routing groups of {s} tokens "
                       f"({b} sequences of {l}) over {n_g} data x expert shards, which must "
                       f"divide {g}")

  def _aux(self, plan, logits, mask) -> Aux:
    load = plan.load()
    probs = None if logits is None else jax.nn.softmax(logits, axis=-1)
    metrics = losses.routing_metrics(load, plan.token_kept(), mask, probs)
    aux_losses = {}
    if logits is not None:
      z = losses.z_loss(logits, mask)
      metrics["z_loss"] = z
      aux_losses["z_loss"] = self.settings.z_loss_weight * z
      bal = losses.load_balance_loss(probs, plan.routed_fraction(), mask)
      metrics["balance_loss"] = bal
      if not routing.ROUTERS[self.settings.router].balanced:  # e.g. expert choice
        aux_losses["load_balance"] = self.settings.balance_loss_weight * bal
    return Aux(losses=aux_losses, metrics=metrics, counts={"load": load})


@register_ffn("moe", default_config=moe_config.default_config, validate=moe_config.validate,
              check_mesh=moe_config.check_mesh)
def build(cfg, *, d_model, d_ff, dtype, rngs):
  return MoE(moe_config.MoESettings.from_config(cfg), d_model=d_model, d_ff=d_ff, dtype=dtype,
             rngs=rngs)
