"""Routers alone: hand-made logits -> plans; golden aux-loss values computed by hand."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax.layers.moe  # noqa: F401  (registers 'moe')
from moejax.layers.moe import losses, routing


def _logits(probs):
  """Logits whose softmax is ``probs`` (rows sum to 1)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_capacity_formula():
  assert routing.capacity(16, 4, 1, 1.0) == 4
  assert routing.capacity(16, 4, 2, 1.25) == 10          # ceil(2*16*1.25/4)
  assert routing.capacity(16, 8, 1, 0.1, min_capacity=4) == 4
  assert routing.capacity(16, 2, 2, 4.0) == 16            # never above the group
  assert routing.capacity(16, 8, 2, 0.0) == 16            # <= 0: no dropping


def test_top1_capacity_drops_later_tokens():
  # 4 tokens, all prefer expert 0; capacity 2 -> tokens 0, 1 kept, 2, 3 dropped.
  p = [[0.7, 0.2, 0.1]] * 4
  # renormalize=True (the default) leaves k=1 alone: the weight is the raw gate 0.7, not 1.
  plan = routing.top_k_route(_logits([p]), jnp.ones((1, 4), bool), k=1, capacity=2,
                             renormalize=True)
  np.testing.assert_array_equal(plan.expert_index[0, :, 0], [0, 0, 0, 0])
  np.testing.assert_array_equal(plan.position[0, :, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(plan.kept[0, :, 0], [True, True, False, False])
  np.testing.assert_allclose(plan.weight[0, :, 0], [0.7, 0.7, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(plan.load(), [2, 0, 0])
  np.testing.assert_array_equal(plan.token_kept()[0], [True, True, False, False])
  dispatch, combine = plan.masks()
  chex.assert_shape(dispatch, (1, 4, 3, 2))
  assert dispatch[0, 0, 0, 0] and dispatch[0, 1, 0, 1] and not dispatch[0, 2].any()
  np.testing.assert_allclose(combine.sum((2, 3))[0], [0.7, 0.7, 0, 0], rtol=1e-6)


def test_top1_combine_weight_carries_router_gradient():
  # With k=1 a renormalised weight would be g/g = 1 (zero gradient); the raw gate is used.
  logits = jax.random.normal(jax.random.key(0), (2, 5, 4))
  mask = jnp.ones((2, 5), bool)

  def total_weight(logits, renormalize):
    return routing.top_k_route(logits, mask, k=1, capacity=None,
                               renormalize=renormalize).weight.sum()

  g_renorm = jax.grad(total_weight)(logits, True)
  np.testing.assert_allclose(g_renorm, jax.grad(total_weight)(logits, False))
  assert float(jnp.abs(g_renorm).sum()) > 0.1
  # k=2 still renormalises: the weights of each token sum to 1.
  plan = routing.top_k_route(logits, mask, k=2, capacity=None)
  np.testing.assert_allclose(plan.weight.sum(-1), 1.0, rtol=1e-6)


def test_top2_first_choices_take_capacity_before_second_choices():
  # token 0: 1st=e1, 2nd=e0; tokens 1, 2: 1st=e0. Capacity 2 for e0:
  # first choices (tokens 1, 2) fill e0; token 0's second choice is dropped.
  p = [[0.4, 0.5, 0.1], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1]]
  plan = routing.top_k_route(_logits([p]), jnp.ones((1, 3), bool), k=2, capacity=2)
  np.testing.assert_array_equal(plan.expert_index[0], [[1, 0], [0, 1], [0, 1]])
  np.testing.assert_array_equal(plan.position[0], [[0, 2], [0, 1], [1, 2]])
  np.testing.assert_array_equal(plan.kept[0], [[True, False], [True, True], [True, False]])
  # Renormalised over the two chosen experts, before dropping.
  np.testing.assert_allclose(plan.weight[0], [[5 / 9, 0], [8 / 9, 1 / 9], [2 / 3, 0]], rtol=1e-5)


def test_batch_prioritized_routing_orders_by_top1_probability():
  # Both tokens want e0 (capacity 1); BPR gives it to the more confident token 1.
  p = [[0.6, 0.4], [0.9, 0.1]]
  pos = routing.top_k_route(_logits([p]), jnp.ones((1, 2), bool), k=1, capacity=1)
  bpr = routing.top_k_route(_logits([p]), jnp.ones((1, 2), bool), k=1, capacity=1,
                            batch_priority=True)
  np.testing.assert_array_equal(pos.kept[0, :, 0], [True, False])
  np.testing.assert_array_equal(bpr.kept[0, :, 0], [False, True])


def test_padding_is_not_routed_and_takes_no_capacity():
  p = [[0.9, 0.1]] * 3
  mask = jnp.array([[False, True, True]])
  plan = routing.top_k_route(_logits([p]), mask, k=1, capacity=1)
  np.testing.assert_array_equal(plan.kept[0, :, 0], [False, True, False])
  np.testing.assert_array_equal(plan.load(), [1, 0])
  ec = routing.expert_choice_route(_logits([p]), mask, capacity=3)
  assert not ec.valid[0, :, :].all() and int(ec.valid.sum()) == 4  # 2 real tokens x 2 experts
  assert float(ec.weight[0][~ec.valid[0]].sum()) == 0.0


def test_expert_choice_plan():
  p = [[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]
  plan = routing.expert_choice_route(_logits([p]), jnp.ones((1, 4), bool), capacity=2)
  np.testing.assert_array_equal(plan.token_index[0], [[0, 2], [1, 3]])
  np.testing.assert_allclose(plan.weight[0], [[0.7, 0.6], [0.8, 0.5]], rtol=1e-6)
  np.testing.assert_array_equal(plan.token_kept()[0], [True, True, True, True])
  _, combine = plan.masks()
  np.testing.assert_allclose(combine[0].sum((1, 2)), [0.7, 0.8, 0.6, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kind", ["top2", "top1_dropping", "expert_choice"])
def test_plan_slots_are_the_masks(kind):
  """Each buffer slot holds the token, weight and validity that the masks say."""
  logits = jax.random.normal(jax.random.key(3), (2, 12, 4))
  mask = jnp.ones((2, 12), bool).at[1, 3:].set(False)      # group 1: 3 real tokens
  if kind == "expert_choice":
    plan = routing.expert_choice_route(logits, mask, capacity=5)
  else:
    k = 2 if kind == "top2" else 1
    plan = routing.top_k_route(logits, mask, k=k, capacity=7 if k == 2 else 2)
  dispatch, combine = plan.masks()                              # [G, S, E, C]
  token, weight, valid = plan.slots()                           # [G, E, C]
  hot = jax.nn.one_hot(token, 12, dtype=jnp.float32) * valid[..., None]   # [G, E, C, S]
  chex.assert_trees_all_equal(jnp.transpose(hot, (0, 3, 1, 2)) > 0, dispatch)
  np.testing.assert_allclose(jnp.einsum("gecs,gec->gsec", hot, weight), combine, rtol=1e-6)
  assert not np.asarray(weight)[~np.asarray(valid)].any()
  assert bool(valid.any()) and not bool(valid.all())          # some slots stay empty


def test_second_policy_random_keeps_with_probability_2_g2():
  # renormalised g2 = 0.2 / (0.6 + 0.2) = 0.25 -> kept with prob 2 * 0.25 = 0.5.
  n = 4000
  logits = _logits([[[0.6, 0.2, 0.1, 0.1]] * n])
  plan = routing.top_k_route(logits, jnp.ones((1, n), bool), k=2, capacity=None,
                             second_policy="random", rng=jax.random.key(0))
  assert plan.routed[0, :, 0].all()
  assert abs(float(plan.routed[0, :, 1].mean()) - 0.5) < 0.04
  # GShard convention: a dropped second expert's share is lost; the first keeps
  # g1 / (g1 + g2) = 0.75, as when the capacity drops it (test below).
  w = plan.weight[0]
  np.testing.assert_allclose(w[~plan.routed[0, :, 1], 0], 0.75, rtol=1e-6)
  np.testing.assert_allclose(w[~plan.routed[0, :, 1], 1], 0.0)


def test_second_expert_dropped_by_capacity_or_policy_same_first_weight():
  """One GShard convention (Lepikhin et al. 2020, Alg. 1) for both ways of dropping."""
  logits = _logits([[[0.6, 0.2, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.6, 0.2]]])
  mask = jnp.ones((1, 3), bool)
  # capacity 1: token 0's second choice (expert 1) loses its place to token 1's first.
  cap = routing.top_k_route(logits, mask, k=2, capacity=1)
  assert not bool(cap.kept[0, 0, 1]) and bool(cap.kept[0, 0, 0])
  # random policy with threshold tiny: every second choice kept; huge: every one dropped.
  pol = routing.top_k_route(logits, mask, k=2, capacity=None, second_policy="random",
                            second_threshold=1e9, rng=jax.random.key(0))
  assert not bool(pol.routed[0, :, 1].any())
  np.testing.assert_allclose(cap.weight[0, 0, 0], pol.weight[0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(cap.weight[0, 0, 0], 0.6 / 0.8, rtol=1e-6)


def test_second_policy_sampling_distribution():
  n = 4000
  probs = [0.5, 0.3, 0.15, 0.05]
  plan = routing.top_k_route(_logits([[probs] * n]), jnp.ones((1, n), bool), k=2,
                             capacity=None, second_policy="sampling", rng=jax.random.key(1))
  assert (plan.expert_index[0, :, 0] == 0).all()
  second = np.bincount(np.asarray(plan.expert_index[0, :, 1]), minlength=4) / n
  np.testing.assert_allclose(second, [0, 0.6, 0.3, 0.1], atol=0.03)   # softmax of the rest


def test_hash_routing_is_fixed():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  a = routing.hash_experts(x, None, num_experts=4, k=2, seed=3)
  b = routing.hash_experts(2.0 * x, None, num_experts=4, k=2, seed=3)
  np.testing.assert_array_equal(a, b)                                 # scale invariant LSH
  assert (a[..., 0] != a[..., 1]).all()
  ids = jnp.array([[5, 7, 5, 9, 7]])
  t = routing.hash_experts(None, ids, num_experts=4, k=1, seed=3)
  assert t[0, 0, 0] == t[0, 2, 0] and t[0, 1, 0] == t[0, 4, 0]
  plan = routing.hash_route(t, jnp.ones((1, 5), bool), num_experts=4, capacity=None)
  np.testing.assert_allclose(plan.weight, 1.0)


def test_golden_balance_and_z_loss():
  # 3 real tokens + 1 padding token (huge logits, must be ignored), 2 experts, top-1.
  probs = np.array([[0.75, 0.25], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
  shift = np.array([1.0, 2.0, 0.0, 50.0])           # logsumexp(logits_t) = shift_t
  logits = jnp.asarray(np.log(probs) + shift[:, None], jnp.float32)[None]
  mask = jnp.array([[True, True, True, False]])
  plan = routing.top_k_route(logits, mask, k=1, capacity=None)
  # f = (2/3, 1/3) (tokens 0, 1 -> e0; token 2 -> e1); P = (1.55/3, 1.45/3)
  # E * sum f P = 2 * (2/3 * 1.55/3 + 1/3 * 1.45/3) = 9.1 / 9
  bal = losses.load_balance_loss(jax.nn.softmax(logits), plan.routed_fraction(), mask)
  np.testing.assert_allclose(bal, 9.1 / 9, rtol=1e-5)
  # z = mean(shift^2) over real tokens = (1 + 4 + 0) / 3
  np.testing.assert_allclose(losses.z_loss(logits, mask), 5 / 3, rtol=1e-5)
  m = losses.routing_metrics(plan.load(), plan.token_kept(), mask, jax.nn.softmax(logits))
  np.testing.assert_allclose(m["router_confidence"], (0.75 + 0.6 + 0.8) / 3, rtol=1e-5)
  np.testing.assert_allclose(m["dropped_fraction"], 0.0)
  # load (2, 1): mean 1.5, std 0.5
  np.testing.assert_allclose(m["load_cv"], 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(m["load_max_over_mean"], 4 / 3, rtol=1e-5)


def test_balance_loss_top2_counts_both_choices():
  # 2 tokens, 4 experts, top-2: choices {0,1} and {0,2} -> f = (2, 1, 1, 0) / 4
  probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  plan = routing.top_k_route(logits, jnp.ones((1, 2), bool), k=2, capacity=None)
  # P = mean probs = (0.45, 0.2, 0.25, 0.1)
  want = 4 * (0.5 * 0.45 + 0.25 * 0.2 + 0.25 * 0.25 + 0.0)
  np.testing.assert_allclose(
      losses.load_balance_loss(jax.nn.softmax(logits), plan.routed_fraction(),
                               jnp.ones((1, 2), bool)), want, rtol=1e-5)


def test_attention_router_matches_formula():
  r = routing.RouterScores(6, 3, kind="attention", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 2, 6))
  got = r(x, train=True, rng=None)
  xn = np.asarray(x[0], np.float64)
  wq, wk, wv = (np.asarray(w[...], np.float64) for w in (r.wq, r.wk, r.wv))
  for t in range(2):
    q, k, v = xn[t] @ wq, xn[t] @ wk, xn[t] @ wv
    for i in range(3):
      a = np.exp(q[i] * k - np.max(q[i] * k))
      np.testing.assert_allclose(got[0, t, i], np.sum(a / a.sum() * v), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("noise", ["jitter", "gaussian"])
def test_router_noise_only_in_training(noise):
  r = routing.RouterScores(8, 4, noise=noise, jitter_eps=0.5, rngs=nnx.Rngs(0))
  if noise == "gaussian":
    r.w_noise[...] = jnp.ones_like(r.w_noise[...])
  x = jax.random.normal(jax.random.key(1), (1, 4, 8))
  clean = r(x, train=False, rng=None)
  noisy = r(x, train=True, rng=jax.random.key(2))
  np.testing.assert_allclose(r(x, train=False, rng=jax.random.key(3)), clean)
  assert float(jnp.abs(noisy - clean).max()) > 1e-3


class TestJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_k_route_variants(self):
    logits = jax.random.normal(jax.random.key(0), (2, 6, 4))
    mask = jnp.ones((2, 6), bool)

    @self.variant
    def route(logits, mask):
      plan = routing.top_k_route(logits, mask, k=2, capacity=3)
      return plan.masks()

    dispatch, combine = route(logits, mask)
    chex.assert_shape([dispatch, combine], (2, 6, 4, 3))
    # Every buffer slot holds at most one token; every kept token-expert pair one slot.
    assert int(dispatch.sum(1).max()) <= 1
    np.testing.assert_array_less(combine.sum((2, 3)), 1.0 + 1e-5)
    assert math.isclose(float(dispatch.sum()), float((combine > 0).sum()))
