"""Routers: float32 logits in, a frozen "dispatch plan" out.

A router is split in two, as in flaxformer (router vs. the layer that applies the
mask) and V-MoE (router -> dispatcher object):

* a *scorer* (``RouterScores``, an nnx module holding the router weights) maps tokens
  ``[groups, tokens, embed]`` to logits ``[groups, tokens, experts]`` (linear, or the
  attention router of Yuan 2.0-M32), with optional train-time noise;
* an *assigner* (a pure function, tested alone) maps logits to a plan:
  :func:`top_k_route` (token choice: Switch k=1, GShard k=2, any k),
  :func:`expert_choice_route` (each expert takes its top-C tokens, Zhou et al. 2022),
  :func:`hash_route` (fixed assignment, Roller et al. 2021).

Plans are ``flax.struct`` dataclasses (pytrees, every array leaf leads with ``groups``)
that say which token goes to which expert, at which buffer slot, with which combine
weight, and what was dropped. Dispatchers (``dispatch.py``) apply them, so every router
works with every dispatch mode that its plan type supports.

Shape letters: G groups, S tokens per group, E experts, K experts per token,
C capacity (buffer slots per expert and group), D embed.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.layers.projection import project

_BIG = np.iinfo(np.int32).max // 2


# ----------------------------------------------------------------------------- plans


@flax.struct.dataclass
class TokenChoicePlan:
  """Each token picked up to K experts (top-k, hash).

  Attributes:
    expert_index: int32 ``[groups, tokens, k]`` chosen experts, distinct per token.
    weight: float32 ``[groups, tokens, k]`` combine weights; 0 where a slot was not
      routed or was dropped for capacity.
    routed: bool ``[groups, tokens, k]`` the router sent this slot (a real token and
      not discarded by the second-expert policy), before any capacity limit.
    position: int32 ``[groups, tokens, k]`` rank of the slot in its expert's buffer
      in priority order (all first choices before all second choices, ...); only
      routed slots take places; a huge value where not routed.
    capacity: buffer slots per expert and group, or None (dropless: nothing dropped).
  """

  expert_index: jax.Array
  weight: jax.Array
  routed: jax.Array
  position: jax.Array
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)
  num_experts: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def kept(self) -> jax.Array:
    """bool ``[groups, tokens, k]``: routed and within capacity."""
    if self.capacity is None:
      return self.routed
    return self.routed & (self.position < self.capacity)

  def masks(self) -> tuple[jax.Array, jax.Array]:
    """GShard dispatch (bool) and combine (float32) tensors ``[groups, tokens, experts, capacity]``."""
    assert self.capacity is not None, "a dropless plan has no capacity buffers"
    kept = self.kept
    e_hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)  # [G,S,K,E]
    c_hot = jax.nn.one_hot(jnp.where(kept, self.position, -1), self.capacity,
                           dtype=jnp.float32)                                      # [G,S,K,C]
    combine = jnp.einsum("gske,gskc,gsk->gsec", e_hot, c_hot, self.weight)
    dispatch = jnp.einsum("gske,gskc->gsec", e_hot, c_hot) > 0
    return dispatch, combine

  def slots(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The buffer slots' view of :meth:`masks`: ``token`` int32, ``weight`` float32 and
    ``valid`` bool, each ``[groups, experts, capacity]``: slot ``(e, c)`` of group ``g``
    holds token ``token[g, e, c]`` with combine weight ``weight[g, e, c]`` where ``valid``
    (elsewhere token 0, weight 0)."""
    assert self.capacity is not None, "a dropless plan has no capacity buffers"
    g, s, k = self.expert_index.shape
    shape = (g, self.num_experts, self.capacity)
    at = (jnp.arange(g)[:, None, None], self.expert_index,
          jnp.where(self.kept, self.position, self.capacity))    # capacity: dropped on write
    token = jnp.zeros(shape, jnp.int32).at[at].set(
        jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None], (g, s, k)), mode="drop")
    weight = jnp.zeros(shape, jnp.float32).at[at].set(self.weight, mode="drop")
    valid = jnp.zeros(shape, bool).at[at].set(True, mode="drop")
    return token, weight, valid

  def load(self) -> jax.Array:
    """float32 ``[experts]``: kept assignments per expert (tokens each expert processes)."""
    hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
    return jnp.einsum("gske,gsk->e", hot, self.kept.astype(jnp.float32))

  def routed_fraction(self) -> jax.Array:
    """float32 ``[experts]``: share of routed slots per expert, before capacity (sums to 1)."""
    hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
    counts = jnp.einsum("gske,gsk->e", hot, self.routed.astype(jnp.float32))
    return counts / jnp.maximum(counts.sum(), 1.0)

  def token_kept(self) -> jax.Array:
    """bool ``[groups, tokens]``: the token reaches at least one expert."""
    return self.kept.any(-1)


@flax.struct.dataclass
class ExpertChoicePlan:
  """Each expert picked its top-C tokens of a group.

  Attributes:
    token_index: int32 ``[groups, experts, capacity]`` chosen tokens (within the group).
    weight: float32 ``[groups, experts, capacity]`` combine weights (router probability),
      0 where the slot holds a padding token.
    valid: bool ``[groups, experts, capacity]`` the slot holds a real token.
    group_size: tokens per group S.
  """

  token_index: jax.Array
  weight: jax.Array
  valid: jax.Array
  group_size: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    return self.token_index.shape[-1]

  @property
  def num_experts(self) -> int:
    return self.token_index.shape[-2]

  def masks(self) -> tuple[jax.Array, jax.Array]:
    """Dispatch (bool) and combine (float32) tensors ``[groups, tokens, experts, capacity]``."""
    hot = jax.nn.one_hot(self.token_index, self.group_size, dtype=jnp.float32)  # [G,E,C,S]
    hot = hot * self.valid[..., None]
    dispatch = jnp.transpose(hot, (0, 3, 1, 2)) > 0
    combine = jnp.einsum("gecs,gec->gsec", hot, self.weight)
    return dispatch, combine

  def slots(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``token``, ``weight``, ``valid [groups, experts, capacity]`` (see
    :meth:`TokenChoicePlan.slots`)."""
    return (jnp.where(self.valid, self.token_index, 0).astype(jnp.int32),
            jnp.where(self.valid, self.weight, 0.0), self.valid)

  def load(self) -> jax.Array:
    """float32 ``[experts]``: real tokens each expert processes."""
    return self.valid.astype(jnp.float32).sum((0, 2))

  def routed_fraction(self) -> jax.Array:
    load = self.load()
    return load / jnp.maximum(load.sum(), 1.0)

  def token_kept(self) -> jax.Array:
    hot = jax.nn.one_hot(self.token_index, self.group_size, dtype=jnp.float32)
    return jnp.einsum("gecs,gec->gs", hot, self.valid.astype(jnp.float32)) > 0


# ----------------------------------------------------------------------------- helpers


def capacity(group_size: int, num_experts: int, k: float, factor: float,
             min_capacity: int = 1) -> int:
  """Buffer slots per expert and group: ``ceil(k * S * factor / E)``, in ``[min_capacity, S]``.

  ``k`` is experts per token (token choice) or 1 (expert choice, where ``factor`` is
  the average number of experts per token). ``factor <= 0`` means no dropping (C = S).
  """
  if factor <= 0:
    return group_size
  c = math.ceil(k * group_size * factor / num_experts)
  return int(min(max(c, min_capacity), group_size))


def _priority_positions(expert_index, routed, num_experts, priority_score=None):
  """Rank of each routed slot in its expert's buffer. int32 ``[G, S, K]``.

  Slot-major priority as in GShard / Praxis ``top2_gating_on_logits``: every token's
  first choice comes before any second choice. Within one slot, tokens go in order of
  position, or (batch-prioritised routing, Riquelme et al. 2021) in order of
  decreasing ``priority_score [G, S]``.
  """
  g, s, k = expert_index.shape
  hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * routed[..., None]  # [G,S,K,E]
  if priority_score is not None:
    order = jnp.argsort(-priority_score, axis=1, stable=True)                         # [G,S]
    hot = jnp.take_along_axis(hot, order[:, :, None, None], axis=1)
  flat = jnp.transpose(hot, (0, 2, 1, 3)).reshape(g, k * s, num_experts)              # [G,K*S,E]
  before = jnp.cumsum(flat, axis=1) - flat                                            # exclusive
  pos = jnp.sum(before * flat, -1).reshape(g, k, s).transpose(0, 2, 1)                # [G,S,K]
  if priority_score is not None:
    inv = jnp.argsort(order, axis=1)
    pos = jnp.take_along_axis(pos, inv[:, :, None], axis=1)
  return jnp.where(routed, pos, _BIG).astype(jnp.int32)


def token_choice_plan(expert_index, gates, routed, *, num_experts, capacity=None,
                      renormalize=True, priority_score=None) -> TokenChoicePlan:
  """Builds a :class:`TokenChoicePlan` from chosen experts and their gates ``[G, S, K]``.

  One convention for a dropped slot, whatever dropped it (the second-expert policy or the
  capacity): ``renormalize`` divides the gates of the K *chosen* experts by their sum
  before anything is dropped, and a dropped slot's weight is 0 -- its share is lost, not
  handed to the kept experts. This is GShard's (Lepikhin et al. 2020, arXiv 2006.16668,
  Algorithm 1: ``g1, g2 = g1/(g1+g2), g2/(g1+g2)``, then the random test ``2*g2 > U`` and the
  capacity test decide whether expert 2 gets the token; a token whose second expert is
  dropped keeps ``g1/(g1+g2)`` on the first). Renormalising applies only when K > 1: with
  one expert per token the weight would be g / g = 1 and the router would get no gradient
  from the main loss, so K = 1 always combines with the raw gate (Switch Transformer,
  Fedus et al. 2021; flaxformer).
  """
  gates = gates.astype(jnp.float32)
  if renormalize and expert_index.shape[-1] > 1:
    gates = gates / jnp.maximum(gates.sum(-1, keepdims=True), 1e-9)
  gates = gates * routed
  position = _priority_positions(expert_index, routed, num_experts, priority_score)
  plan = TokenChoicePlan(expert_index.astype(jnp.int32), gates, routed, position,
                         capacity=capacity, num_experts=num_experts)
  return plan.replace(weight=gates * plan.kept)


def all_experts_plan(logits: jax.Array, mask: jax.Array) -> TokenChoicePlan:
  """Every token to every expert, weighted by ``softmax(logits)``: expert choice with
  capacity C = S (nothing dropped), as a dropless plan. Per-token, hence causal."""
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  idx = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
  routed = jnp.broadcast_to(mask[..., None], (g, s, e))
  return token_choice_plan(idx, probs, routed, num_experts=e, capacity=None, renormalize=False)


# ----------------------------------------------------------------------------- assigners


def top_k_route(logits: jax.Array, mask: jax.Array, *, k: int, capacity: int | None,
                renormalize: bool = True, second_policy: str = "all",
                second_threshold: float = 0.5, batch_priority: bool = False,
                rng: jax.Array | None = None) -> TokenChoicePlan:
  """Token choice top-k routing (Switch k=1; GShard k=2; general k).

  Args:
    logits: float32 ``[groups, tokens, experts]``.
    mask: bool ``[groups, tokens]``; padding tokens are not routed and take no capacity.
    k: experts per token.
    capacity: buffer slots per expert and group, None for dropless.
    renormalize: combine weights = gates renormalised over the routed slots (k > 1 only;
      k = 1 keeps the raw gate, see :func:`token_choice_plan`).
    second_policy: how slots 2..k are chosen (GShard, Lepikhin et al. 2020; Praxis
      ``gshard_utils.top2_gating_on_logits``):
      ``all``: greedily, the next best experts;
      ``sampling``: sampled from the softmax of the remaining experts (Gumbel-max);
      ``random``: greedily, then kept with probability ``min(1, g_i / threshold)``,
      where ``g_i`` is the slot's gate renormalised over the top-k. With k=2 and
      threshold 0.5 this is GShard Algorithm 1's ``2 * g2 > uniform``. (Praxis divides
      the raw softmax gate by the threshold instead.) A slot dropped here is weighted as
      one dropped for capacity (see :func:`token_choice_plan`).
    second_threshold: the threshold of ``random``.
    batch_priority: BPR: capacity is filled in order of each token's top-1 probability
      instead of its position.
    rng: PRNG key, needed by ``sampling`` and ``random`` when k >= 2.

  Returns:
    A :class:`TokenChoicePlan`.
  """
  logits = logits.astype(jnp.float32)
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  if k > 1 and second_policy == "sampling":
    rng, sub = jax.random.split(rng)
    first = jnp.argmax(logits, -1)
    noisy = logits + jax.random.gumbel(sub, logits.shape, jnp.float32)
    noisy = jnp.where(jax.nn.one_hot(first, num_experts, dtype=bool), -jnp.inf, noisy)
    _, rest = jax.lax.top_k(noisy, k - 1)
    expert_index = jnp.concatenate([first[..., None], rest], -1)
  else:
    _, expert_index = jax.lax.top_k(probs, k)
  gates = jnp.take_along_axis(probs, expert_index, -1)                         # [G,S,K]
  routed = jnp.broadcast_to(mask[..., None], expert_index.shape)
  if k > 1 and second_policy == "random":
    norm = gates / jnp.maximum(gates.sum(-1, keepdims=True), 1e-9)
    u = jax.random.uniform(rng, gates.shape, jnp.float32)
    keep = u < norm / max(second_threshold, 1e-9)
    routed = routed & keep.at[..., 0].set(True)
  return token_choice_plan(expert_index, gates, routed, num_experts=num_experts,
                           capacity=capacity, renormalize=renormalize,
                           priority_score=probs.max(-1) if batch_priority else None)


def expert_choice_route(logits: jax.Array, mask: jax.Array, *, capacity: int) -> ExpertChoicePlan:
  """Expert choice routing (Zhou et al. 2022): expert e takes the C tokens of a group
  with the highest router probability ``softmax(logits)[:, e]``, weighted by it.

  Args:
    logits: float32 ``[groups, tokens, experts]``.
    mask: bool ``[groups, tokens]``; padding tokens rank last and, if picked (a group
      with fewer than C real tokens), get weight 0 and count nowhere.
    capacity: tokens per expert and group (``<= tokens``).
  """
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  scores = jnp.where(mask[..., None], probs, -1.0)
  _, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)          # [G,E,C]
  weight = jnp.take_along_axis(jnp.swapaxes(probs, 1, 2), token_index, -1)
  valid = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], (g, e, s)), token_index, -1)
  return ExpertChoicePlan(token_index.astype(jnp.int32), weight * valid, valid, group_size=s)


def hash_route(expert_index: jax.Array, mask: jax.Array, *, num_experts: int,
               capacity: int | None) -> TokenChoicePlan:
  """Fixed routing (Hash Layers, Roller et al. 2021): ``expert_index [G, S, K]`` comes
  from a hash; each of the K experts gets weight 1/K."""
  routed = jnp.broadcast_to(mask[..., None], expert_index.shape)
  gates = jnp.ones(expert_index.shape, jnp.float32)
  return token_choice_plan(expert_index, gates, routed, num_experts=num_experts,
                           capacity=capacity, renormalize=True)


def hash_experts(x: jax.Array, token_ids: jax.Array | None, *, num_experts: int, k: int,
                 seed: int = 0, buckets: int = 8192) -> jax.Array:
  """Fixed, parameter-free expert choice ``[G, S, K]`` (int32, K distinct experts).

  With ``token_ids [G, S]`` (the faithful Hash Layers variant): a fixed random table
  ``bucket -> K experts`` indexed by ``token_id % buckets``. Without them (the model
  passes only hidden states): random-projection LSH of the hidden state, i.e. the top-K
  of ``x @ R`` for a fixed Gaussian ``R [embed, experts]`` drawn from ``seed``. This is
  a fixed, not learned, routing of the *contextual* state, not of the token identity.
  """
  rs = np.random.default_rng(seed)
  if token_ids is not None:
    table = np.argsort(rs.random((buckets, num_experts)), axis=-1)[:, :k].astype(np.int32)
    return jnp.asarray(table)[token_ids % buckets]
  proj = rs.standard_normal((x.shape[-1], num_experts)).astype(np.float32)
  _, idx = jax.lax.top_k(x.astype(jnp.float32) @ jnp.asarray(proj), k)
  return idx.astype(jnp.int32)


# ----------------------------------------------------------------------------- scorers


@dataclasses.dataclass(frozen=True)
class ScoreFunction:
  """A registered ``moe.router_scores``: named weights ``[embed, experts]`` -> logits.

  params: names of its weights (each ``[embed, experts]``, attributes of RouterScores).
  logits: ``(weights dict, x [G, S, D] float32) -> [G, S, E]`` float32.
  """
  name: str
  params: tuple[str, ...]
  logits: Callable[[dict[str, jax.Array], jax.Array], jax.Array]


SCORE_FUNCTIONS: dict[str, ScoreFunction] = {}


def register_scores(name: str, params: tuple[str, ...]):
  """Decorator registering ``logits(weights, x)`` as ``moe.router_scores=name``."""
  def deco(fn):
    SCORE_FUNCTIONS[name] = ScoreFunction(name, params, fn)
    return fn
  return deco


@register_scores("linear", ("w",))
def _linear_scores(w, x):
  return project(x, w["w"])


@register_scores("attention", ("wq", "wk", "wv"))
def _attention_scores(w, x):
  """Yuan 2.0-M32's attention router (arXiv 2405.17976, Sec. 2.1): per token
  ``q, k, v = x @ Wq, x @ Wk, x @ Wv`` (each ``[experts]``, E one-dim elements);
  ``logits_i = sum_j softmax_j(q_i k_j) v_j`` (``[experts, experts]`` attention per token)."""
  q, k, v = (project(x, w[n]) for n in ("wq", "wk", "wv"))
  att = jax.nn.softmax(q[..., :, None] * k[..., None, :], axis=-1)   # [G,S,E,E]
  return jnp.einsum("gsef,gsf->gse", att, v)


class RouterScores(nnx.Module):
  """Router logits ``[groups, tokens, experts]`` (float32) from tokens ``[groups, tokens, embed]``.

  kind: a registered score function (:data:`SCORE_FUNCTIONS`: ``linear`` = ``x @ W``;
    ``attention`` = Yuan 2.0-M32's attention router).
  noise (training only, from the ``router`` rng stream):
    ``jitter``: Switch input jitter, ``x *= Uniform(1 - eps, 1 + eps)`` on the router input.
    ``gaussian``: noisy top-k gating (Shazeer et al. 2017),
      ``logits += N(0, 1) * softplus(x @ W_noise)`` with ``W_noise`` initialised to 0.
  """

  def __init__(self, d_model: int, num_experts: int, *, kind: str = "linear",
               noise: str = "none", jitter_eps: float = 0.01, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    names = ("embed", None)
    shape = (d_model, num_experts)
    for p in SCORE_FUNCTIONS[kind].params:
      setattr(self, p, sharding.param(init(rngs.params(), shape), names))
    self.w_noise = (sharding.param(jnp.zeros(shape, jnp.float32), names)
                    if noise == "gaussian" else None)
    self.kind = kind
    self.noise = noise
    self.jitter_eps = jitter_eps

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None) -> jax.Array:
    x = x.astype(jnp.float32)
    if train and self.noise == "jitter":
      rng, sub = jax.random.split(rng)
      x = x * jax.random.uniform(sub, x.shape, jnp.float32,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    fn = SCORE_FUNCTIONS[self.kind]
    logits = fn.logits({p: getattr(self, p)[...].astype(jnp.float32) for p in fn.params}, x)
    if train and self.noise == "gaussian":
      rng, sub = jax.random.split(rng)
      std = jax.nn.softplus(project(x, self.w_noise[...].astype(jnp.float32)))
      logits = logits + jax.random.normal(sub, logits.shape, jnp.float32) * std
    return logits


# ----------------------------------------------------------------------------- routers


def capacity_limited(settings) -> bool:
  """Whether MoE ``settings`` (``MoESettings`` or ``config.moe``) can drop tokens for capacity,
  in training or in evaluation (a capacity-buffer dispatch with ``capacity_factor_train`` or
  ``capacity_factor_eval`` > 0)."""
  return settings.dispatch in ("einsum", "expert_parallel") and (
      settings.capacity_factor_train > 0 or settings.capacity_factor_eval > 0)


class Router(abc.ABC):
  """A registered ``moe.router``: what the layer needs to know about one routing rule.

  Its methods read the layer's settings (``settings``: a ``MoESettings``, or the
  ``config.moe`` section it is made from), never the layer.

  ``uses_scores``: needs router logits (the layer builds a :class:`RouterScores`).
  ``balanced``: balanced by construction (no load-balancing loss is added).
  ``dropless_ok``: has a dropless plan (else only the capacity dispatches apply).
  """

  name = ""
  uses_scores = True
  balanced = False
  dropless_ok = True

  def experts_per_token(self, top_k: int) -> int:
    """K in the capacity ``ceil(K * S * factor / E)``."""
    return top_k

  def noncausal_reason(self, settings) -> str | None:
    """Why this router lets later tokens change earlier tokens' outputs in a decoder, or
    None when it is causal."""
    return None

  def needs_rng(self, settings, policy: str) -> bool:
    return False

  @abc.abstractmethod
  def plan(self, settings, xg, logits, mask, token_ids, *, capacity, policy, rng, no_drop):
    """-> a plan (``capacity`` None: dropless; ``no_drop``: nothing may be dropped)."""


ROUTERS: dict[str, Router] = {}


def register_router(name: str):
  """Class decorator registering a :class:`Router` subclass as ``moe.router=name``."""
  def deco(cls):
    cls.name = name
    ROUTERS[name] = cls()
    return cls
  return deco


@register_router("top_k")
class TopKRouter(Router):
  """Token choice (Switch k=1, GShard k=2, any k): :func:`top_k_route`."""

  def noncausal_reason(self, settings):
    if not capacity_limited(settings):
      return None
    if settings.priority == "batch":
      return ("batch-prioritised capacity (priority=batch) ranks a group's tokens by router "
              "probability, so later tokens can push earlier ones out of an expert")
    if settings.top_k > 1:
      return (f"top-{settings.top_k} with a capacity fills every first choice before any second "
              "choice, so later tokens' first choices can drop earlier tokens' second choices")
    return None

  def needs_rng(self, settings, policy):
    return settings.top_k > 1 and policy != "all"

  def plan(self, settings, xg, logits, mask, token_ids, *, capacity, policy, rng, no_drop):
    return top_k_route(logits, mask, k=settings.top_k, capacity=capacity,
                       renormalize=settings.renormalize, second_policy=policy,
                       second_threshold=settings.second_threshold,
                       batch_priority=settings.priority == "batch", rng=rng)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
  """Each expert takes its top-C tokens of a group (:func:`expert_choice_route`)."""

  balanced = True
  dropless_ok = False

  def experts_per_token(self, top_k):
    return 1

  def noncausal_reason(self, settings):
    return ("expert choice ranks all tokens of a group, so later tokens change which earlier "
            "tokens an expert takes")

  def plan(self, settings, xg, logits, mask, token_ids, *, capacity, policy, rng, no_drop):
    if no_drop:   # C = S: every expert takes every token
      return all_experts_plan(logits, mask)
    return expert_choice_route(logits, mask, capacity=capacity)


@register_router("hash")
class HashRouter(Router):
  """Fixed routing by token id (Hash Layers): :func:`hash_experts` + :func:`hash_route`."""

  uses_scores = False

  def noncausal_reason(self, settings):
    if capacity_limited(settings) and settings.top_k > 1:
      return (f"hash routing to {settings.top_k} experts with a capacity fills every first choice "
              "before any second choice, so later tokens can drop earlier tokens' second choices")
    return None

  def plan(self, settings, xg, logits, mask, token_ids, *, capacity, policy, rng, no_drop):
    idx = hash_experts(xg, token_ids, num_experts=settings.num_experts, k=settings.top_k,
                       seed=settings.hash_seed)
    return hash_route(idx, mask, num_experts=settings.num_experts, capacity=capacity)
