"""The MoE layer against a per-token python loop; dispatch modes against each other;
expert parallelism on 8 fake CPU devices; config errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax.layers.moe as moe
from moejax import sharding
from moejax.errors import ConfigError
from moejax.layers.base import FFN_REGISTRY, Aux

D, F, E, B, L = 8, 16, 4, 2, 8


def _moe(cfg, **kw):
  """The MoE layer of a ``config.moe`` section."""
  return moe.MoE(moe.MoESettings.from_config(cfg), **kw)


def _cfg(**kw):
  cfg = moe.default_config()
  cfg.num_experts = E
  cfg.min_capacity = 1
  cfg.dispatch = "einsum"
  cfg.update(kw)
  return cfg


def _layer(seed=0, train=False, **kw):
  m = _moe(_cfg(**kw), d_model=D, d_ff=F, rngs=nnx.Rngs(seed))
  if train:
    m.train()
  else:
    m.eval()
  return m


def _inputs(seed=1):
  x = jax.random.normal(jax.random.key(seed), (B, L, D))
  mask = jnp.ones((B, L), bool).at[1, 5:].set(False)
  return x, mask


def _gelu(h):
  return np.asarray(jax.nn.gelu(jnp.asarray(h)))


def _expert(m, e, v):
  wi, wo = np.asarray(m.experts.wi[...][e]), np.asarray(m.experts.wo[...][e])
  return _gelu(v @ wi) @ wo


def reference(m, x, mask, train=False):
  """Per-token python loop, written from the papers' description, not from the code.

  Token choice: groups = sequences; first every token's 1st choice in position order,
  then every token's 2nd choice, ... each fills its expert's buffer up to capacity C;
  weights = top-k probabilities renormalised over the k choices when k > 1, the raw
  top-1 probability when k = 1 (Switch). Expert choice: each
  expert takes its C most probable real tokens, weight = probability.
  """
  x, mask = np.asarray(x), np.asarray(mask)
  y = np.zeros_like(x)
  logits = np.asarray(m.router(jnp.asarray(x), train=False, rng=None), np.float64)
  k = m.settings.top_k
  for g in range(x.shape[0]):
    p = np.exp(logits[g] - logits[g].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    real = [s for s in range(x.shape[1]) if mask[g, s]]
    if m.settings.router == "expert_choice":
      cap = m._capacity(x.shape[1], train=train)
      for e in range(E):
        chosen = sorted(real, key=lambda s: (-p[s, e], s))[:cap]
        for s in chosen:
          y[g, s] += p[s, e] * _expert(m, e, x[g, s])
      continue
    cap = m._capacity(x.shape[1], train=train)
    choices = {s: list(np.argsort(-p[s], kind="stable")[:k]) for s in real}
    fill = [0] * E
    kept = {}
    for slot in range(k):
      for s in real:
        e = choices[s][slot]
        if cap is None or fill[e] < cap:
          fill[e] += 1
          kept[(s, slot)] = e
    for s in real:
      tot = sum(p[s, e] for e in choices[s]) if k > 1 else 1.0
      for slot in range(k):
        if (s, slot) in kept:
          e = kept[(s, slot)]
          y[g, s] += p[s, e] / tot * _expert(m, e, x[g, s])
  return y


@pytest.mark.parametrize("router,k,cf", [
    ("top_k", 1, 0.5),          # Switch, C = 1: overflow, dropped tokens
    ("top_k", 2, 0.5),          # GShard top-2, C = 2: second choices dropped
    ("top_k", 2, 0.0),          # no dropping
    ("expert_choice", 1, 1.0),  # C = 2 tokens per expert
])
def test_layer_matches_per_token_loop(router, k, cf):
  # Training forward (no noise, greedy second choices): where capacity applies to every router.
  m = _layer(router=router, top_k=k, capacity_factor_train=cf, train=True)
  x, mask = _inputs()
  y, aux = m(x, mask=mask)
  want = reference(m, x, mask, train=True)
  chex.assert_trees_all_close(np.asarray(y), want, atol=2e-5, rtol=1e-4)
  if cf == 0.5 and k == 1:
    assert float(aux.metrics["dropped_fraction"]) > 0     # whole tokens dropped
  if cf == 0.5 and k == 2:
    assert float(aux.counts["load"].sum()) < k * 13       # some second choices dropped
  # Dropped and padding tokens get exactly zero.
  assert float(jnp.abs(y[1, 5:]).max()) == 0.0
  if router == "top_k":
    assert float(aux.counts["load"].sum()) <= k * 13      # 13 real tokens
  else:
    assert float(aux.counts["load"].sum()) == E * 2 * B   # E experts x C = 2 x groups


@pytest.mark.parametrize("router,k,cf", [("top_k", 2, 0.5), ("top_k", 3, 1.0),
                                         ("expert_choice", 1, 1.5)])
def test_einsum_dispatch_by_rows_equals_mask_einsums(router, k, cf):
  """On CPU the einsum path moves rows (the CPU backend's moe.capacity_moves: gather /
  scatter-add, routing.*Plan.slots); the GShard mask einsums (what TPU / GPU run) give the
  same outputs and gradients."""
  from moejax import kernels
  from moejax.kernels import registry
  m = _layer(router=router, top_k=k, capacity_factor_train=cf, train=True, gated=True)
  x, mask = _inputs()
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest, copy=True)(x, mask=mask)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  assert registry.find("moe.capacity_moves") is not None
  (_, y_rows), g_rows = grad(params, x)
  with kernels.target_platform("tpu"):                    # the mask einsums
    assert registry.find("moe.capacity_moves") is None
    (_, y_mask), g_mask = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x)
  assert float(jnp.abs(y_rows).max()) > 0
  chex.assert_trees_all_close(y_rows, y_mask, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(g_rows, g_mask, atol=1e-6, rtol=1e-5)


def test_dropless_equals_einsum_with_full_capacity():
  x, mask = _inputs()
  ein = _layer(top_k=2, capacity_factor_eval=0.0, gated=True)
  y_e, aux_e = ein(x, mask=mask)
  drop = _layer(top_k=2, dispatch="dropless", dropless_impl="blocked", gated=True)
  y_d, aux_d = drop(x, mask=mask)
  chex.assert_trees_all_close(y_d, y_e, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(aux_d.counts, aux_e.counts)
  # blocked with a tiny block (many blocks, uneven padding)
  drop = _layer(top_k=2, dispatch="dropless", dropless_impl="blocked", dropless_block=2, gated=True)
  chex.assert_trees_all_close(drop(x, mask=mask)[0], y_e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(router="top_k", top_k=1, router_noise="jitter"),
    dict(router="top_k", top_k=2, second_policy="random", router_noise="gaussian"),
    dict(router="top_k", top_k=2, router_scores="attention", dispatch="dropless",
         num_shared_experts=1),
    dict(router="expert_choice", capacity_factor_train=2.0),
    dict(router="hash", top_k=1),
])
def test_gradients_finite_in_training(kw):
  # No aux losses: the router's gradient must come through the combine weights alone
  # (with top_k=1 and renormalize=True a renormalised weight g/g = 1 would give ~1e-8).
  cfg = _cfg(balance_loss_weight=0.0, z_loss_weight=0.0, **kw)
  assert cfg.renormalize
  m = _moe(cfg, d_model=D, d_ff=F, rngs=nnx.Rngs(params=0, router=1))
  m.train()
  x, mask = _inputs()

  def loss(m, x):
    y, aux = m(x, mask=mask)
    return jnp.mean(y ** 2) + aux.total_loss()

  val, grads = nnx.jit(nnx.value_and_grad(loss))(m, x)
  assert np.isfinite(float(val))
  leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  expert_grad = float(jnp.abs(grads["experts"]["wi"][...]).sum())
  assert expert_grad > 0
  if kw["router"] != "hash":
    router_grad = sum(float(jnp.abs(g).sum())
                      for g in jax.tree.leaves(nnx.to_pure_dict(grads["router"])))
    assert router_grad > 1e-2 * expert_grad, (router_grad, expert_grad)   # 0.03 .. 0.6 here


def test_aux_record_and_jit_traces_once():
  m = _layer(top_k=2)
  x, mask = _inputs()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(state, x, mask):
    return nnx.merge(graphdef, state)(x, mask=mask)

  graphdef, state = nnx.split(m)
  y, aux = f(state, x, mask)
  y2, _ = f(state, x + 1.0, mask)
  chex.assert_shape([y, y2], (B, L, D))
  assert isinstance(aux, Aux)
  assert set(aux.losses) == {"load_balance", "z_loss"}
  assert {"dropped_fraction", "router_confidence", "balance_loss", "z_loss",
          "load_cv", "load_max_over_mean"} <= set(aux.metrics)
  chex.assert_shape(aux.counts["load"], (E,))
  np.testing.assert_allclose(aux.losses["z_loss"], 0.001 * aux.metrics["z_loss"], rtol=1e-6)
  np.testing.assert_allclose(aux.losses["load_balance"], 0.01 * aux.metrics["balance_loss"],
                             rtol=1e-6)


def test_expert_parallel_equals_single_device():
  cfg = _cfg(num_experts=8, top_k=2, gated=True, capacity_factor_train=1.0)
  x = jax.random.normal(jax.random.key(1), (8, L, D))
  mask = jnp.ones((8, L), bool).at[3, 4:].set(False)

  def loss(m, x):
    y, aux = m(x, mask=mask)
    return jnp.sum(y ** 2) + aux.total_loss(), (y, aux)

  grad_fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  ref = _moe(cfg, d_model=D, d_ff=F, rngs=nnx.Rngs(0))
  (_, (y0, aux0)), g0 = grad_fn(ref, x)
  assert float(aux0.metrics["dropped_fraction"]) > 0      # capacity matters in this check

  mesh = sharding.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules()):
    cfg.dispatch = "expert_parallel"
    m = _moe(cfg, d_model=D, d_ff=F, rngs=nnx.Rngs(0))
    assert m.experts.wi[...].sharding.spec[0] == "expert"
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
    (_, (y1, aux1)), g1 = grad_fn(m, xs)
    hlo = jax.jit(lambda s, x: nnx.merge(nnx.graphdef(m), s)(x, mask=mask)[0]).lower(
        nnx.state(m), xs).compile().as_text()
  assert "all-to-all" in hlo
  chex.assert_trees_all_close(y1, y0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(aux1.metrics, aux0.metrics, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mesh_shape,kw,batch,match", [
    # 6 sequences = 6 groups over 2 x 4 shards
    ((2, 4), {}, 6, r"config\.data\.batch_size=6: dispatch=expert_parallel splits the 6 routing "
                    r"groups .* \(set --config\.data\.batch_size to a multiple of 8 or "
                    r"--config\.moe\.group_size=6\)"),
    ((2, 4), dict(group_size=16), 8, r"config\.moe\.group_size=16: .* 4 routing groups .*"
                                     r"\(set --config\.moe\.group_size=8\)"),
])
def test_expert_parallel_uneven_split(mesh_shape, kw, batch, match):
  """The layer refuses in plain words while jit traces; the config check, once the mesh is
  resolved, names the field to change."""
  from moejax import config as config_lib
  cfg = _cfg(top_k=1, dispatch="expert_parallel", **kw)
  x = jnp.ones((batch, L, D))
  mesh = sharding.make_mesh(data=mesh_shape[0], expert=mesh_shape[1])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules()):
    m = _moe(cfg, d_model=D, d_ff=F, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="data x expert shards, which must divide") as e:
      nnx.jit(lambda m, x: m(x)[0])(m, x)
  assert "--config" not in str(e.value) and not isinstance(e.value, ConfigError)
  c = config_lib.default_config()
  c.moe.update(cfg.to_dict())
  c.data.update(batch_size=batch, seq_len=L)
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "all"
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.check_mesh_shape(c, dict(zip(sharding.MESH_AXES, (*mesh_shape, 1))))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("dispatch", ["einsum", "expert_parallel"])
def test_experts_not_divisible_by_expert_shards(dispatch):
  # mesh.expert=-1 (8 expert shards): validate cannot see that 4 experts do not divide.
  from moejax import config as config_lib
  cfg = _cfg(dispatch=dispatch)
  with jax.set_mesh(sharding.make_mesh(data=1, expert=-1)), \
       nnx.logical_axis_rules(sharding.logical_rules()):
    with pytest.raises(ValueError, match=r"^4 experts do not split evenly over the 8 expert shards"):
      nnx.eval_shape(lambda: _moe(cfg, d_model=D, d_ff=F, rngs=nnx.Rngs(0)))
  c = config_lib.default_config()
  c.moe.update(cfg.to_dict())
  c.model.sparse_ffn = "moe"
  c.mesh.expert = -1
  with pytest.raises(ConfigError, match=r"^config\.moe\.num_experts=4: must be a multiple of the "
                                        r"8 expert shards .*num_experts=8"):
    config_lib.check_mesh_shape(c, {"data": 1, "expert": 8, "model": 1})


def test_registered_and_config_section():
  assert "moe" in FFN_REGISTRY
  from moejax import config as config_lib
  c = config_lib.default_config()
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "every:2:1"
  config_lib.validate(c)
  layer = FFN_REGISTRY["moe"].build(c.moe, d_model=D, d_ff=F, dtype=jnp.float32, rngs=nnx.Rngs(0))
  y, aux = layer(jnp.ones((1, 4, D)))
  chex.assert_shape(y, (1, 4, D))


@pytest.mark.parametrize("field,value,match", [
    ("top_k", 9, r"config\.moe\.top_k=9: must be in \[1, moe\.num_experts=8\] \(set --config\.moe\.top_k=2\)"),
    ("router", "switch", r"config\.moe\.router='switch': must be one of"),
    ("second_policy", "best", r"config\.moe\.second_policy='best'"),
    ("dispatch", "ragged", r"config\.moe\.dispatch='ragged'"),
    ("activation", "tanh", r"config\.moe\.activation='tanh'"),
    ("num_experts", 6, r"config\.moe\.num_experts=6: must be a multiple of mesh\.expert=4"),
    ("group_size", 7, r"config\.moe\.group_size=7: must divide"),
    ("group_size", -2, r"config\.moe\.group_size=-2: must be >= -1"),
    ("dropless_block", 384, r"config\.moe\.dropless_block=384: must be 0 \(auto\) or a power of "
                            r"two \(set --config\.moe\.dropless_block=256\)"),
])
def test_config_errors(field, value, match):
  from moejax import config as config_lib
  c = config_lib.default_config()
  c.model.sparse_ffn = "moe"
  c.mesh.expert = 4
  c.moe[field] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_config_error_expert_choice_dropless():
  from moejax import config as config_lib
  c = config_lib.default_config()
  c.model.sparse_ffn = "moe"
  c.moe.router = "expert_choice"
  c.moe.allow_noncausal = True
  c.moe.dispatch = "dropless"
  with pytest.raises(ConfigError, match=r"config\.moe\.dispatch='dropless'.*set --config\.moe\.dispatch=einsum"):
    config_lib.validate(c)


@pytest.mark.parametrize("impl", ["ragged_dot", "gmm"])
def test_dropless_grouped_matmul_impls_match_blocked(impl):
  """ragged_dot (XLA's ragged_dot after an argsort, as on TPU / GPU) and megablox gmm
  (Pallas interpret mode on CPU) against the blocked path (the CPU's), values and
  gradients; unrouted rows (padding) must not leak garbage into either."""
  from moejax.layers.moe import dispatch, routing
  x, mask = _inputs()
  m = _layer(top_k=2, gated=True)
  logits = m.router(x, train=False, rng=None)
  plan = routing.top_k_route(logits, mask, k=2, capacity=None)

  def run(impl, x, weights):
    y = dispatch.dropless_dispatch(x, plan, weights, "gelu", impl=impl, interpret=True)
    return jnp.sum(y ** 2), y

  weights = m.experts.weights(jnp.float32)
  grad = jax.grad(run, argnums=(1, 2), has_aux=True)
  (gx, gw), y = grad(impl, x, weights)
  (gx0, gw0), y0 = grad("blocked", x, weights)
  chex.assert_trees_all_close(y, y0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close((gx, gw), (gx0, gw0), atol=1e-4, rtol=1e-4)


def test_groups_bf16_and_shared_experts():
  x, mask = _inputs()
  # group_size 4: the B*L = 16 tokens form 4 routing groups of 4.
  m32 = _layer(top_k=2, group_size=4, num_shared_experts=1, capacity_factor_eval=0.0)
  y32, _ = m32(x, mask=mask)
  m16 = _moe(_cfg(top_k=2, group_size=4, num_shared_experts=1, capacity_factor_eval=0.0),
                d_model=D, d_ff=F, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  m16.eval()
  y16, aux16 = m16(x, mask=mask)
  assert y16.dtype == jnp.bfloat16
  chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=5e-2, rtol=5e-2)
  assert float(aux16.metrics["dropped_fraction"]) == 0.0
  # Shared expert: y = routed + shared exactly (the same layer without its shared expert
  # gives the routed part), and padding tokens still get the shared output.
  shared = m32.shared(x, mask=mask)[0]
  m32.shared = None
  routed, _ = m32(x, mask=mask)
  chex.assert_trees_all_close(y32, routed + shared, atol=1e-6, rtol=1e-6)
  assert float(jnp.abs(shared).min()) > 0 and float(jnp.abs(routed[0]).min()) > 0
  np.testing.assert_array_equal(y32[1, 5:], shared[1, 5:])
  assert float(jnp.abs(routed[1, 5:]).max()) == 0.0

def test_expert_choice_eval_as_trained_or_drop_free():
  """moe.eval_no_drop=False evaluates expert choice with the training capacity (the same
  function as the training forward); the default drops nothing (every token at every expert)."""
  x, mask = _inputs()
  kw = dict(router="expert_choice", allow_noncausal=True, capacity_factor_train=1.0,
            capacity_factor_eval=1.0, z_loss_weight=0.0)
  trained = _layer(train=True, eval_no_drop=False, **kw)(x, mask=mask)[0]
  as_trained = _layer(eval_no_drop=False, **kw)(x, mask=mask)[0]
  drop_free = _layer(**kw)(x, mask=mask)[0]
  chex.assert_trees_all_close(as_trained, trained, atol=1e-6)
  assert float(jnp.max(jnp.abs(drop_free - trained))) > 1e-3
