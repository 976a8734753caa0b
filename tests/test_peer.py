"""PEER layer: == the paper's Algorithm 1, gradients, query BatchNorm, aux, sharding, config."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from jax.test_util import check_grads

from moejax import config as config_lib
from moejax import sharding
from moejax.errors import ConfigError
from moejax.layers import peer
from moejax.kernels import reference
from moejax.layers import query as pkq
from moejax.layers.base import FFN_REGISTRY, TableParam, build_ffn

D = 16


def _peer(seed=0, dtype=jnp.float32, **kw):
  args = dict(num_experts_sqrt=8, heads=2, top_k=3, d_key=8, query_norm="none")
  args.update(kw)
  return peer.PEER(D, peer.PEERSettings(**args), dtype=dtype, rngs=nnx.Rngs(seed))


def _x(seed=1, b=2, l=5, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, l, D), dtype)


def paper_peer_forward(x, params, *, top_k, activation, query_norm, eps=1e-5):
  """Algorithm 1 of He (2024), written out plainly (retrieval over ALL N product keys)."""
  # query network: per-head projection (+ BatchNorm with this batch's statistics)
  q = jnp.einsum("btd,dhk->bthk", x, params["query"])
  if query_norm == "batch":
    mean = q.mean(axis=(0, 1))
    var = q.var(axis=(0, 1))
    q = (q - mean) / jnp.sqrt(var + eps) * params["bn_scale"] + params["bn_bias"]
  # indices, scores = get_indices(query, sub_keys, top_k): exhaustive over N = n² keys
  keys = reference.full_product_keys(params["keys1"], params["keys2"])       # [h|1, N, d_key]
  if keys.shape[0] == 1:
    all_scores = jnp.einsum("bthk,nk->bthn", q, keys[0])
  else:
    all_scores = jnp.einsum("bthk,hnk->bthn", q, keys)
  scores, indices = jax.lax.top_k(all_scores, top_k)                  # 'bthk'
  w_down = params["u"][indices]                                       # w_down_embed(indices)
  w_up = params["v"][indices]                                         # w_up_embed(indices)
  x = jnp.einsum("btd,bthkd->bthk", x, w_down)
  x = activation(x)
  x = x * jax.nn.softmax(scores, axis=-1)
  x = jnp.einsum("bthk,bthkd->btd", x, w_up)
  return x


def _params(m):
  p = dict(query=m.retrieval.query[...], keys1=m.retrieval.keys1[...],
           keys2=m.retrieval.keys2[...], u=m.u[...], v=m.v[...])
  if isinstance(m.retrieval.norm, pkq.MaskedBatchNorm):
    p.update(bn_scale=m.retrieval.norm.scale[...], bn_bias=m.retrieval.norm.bias[...])
  return p


class AlgorithmOneTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("gelu", "none", False), ("relu", "batch", False),
                            ("gelu_tanh", "batch", True), ("silu", "none", False))
  def test_matches_paper_pseudocode(self, act, norm, per_head_keys):
    m = _peer(activation=act, query_norm=norm, per_head_keys=per_head_keys)
    # non-trivial BN affine parameters
    if norm == "batch":
      m.retrieval.norm.scale[...] = 1 + 0.1 * jax.random.normal(jax.random.key(5), (2, 8))
      m.retrieval.norm.bias[...] = 0.1 * jax.random.normal(jax.random.key(6), (2, 8))
    x = _x()
    graphdef, state = nnx.split(m)

    @self.variant
    def fwd(state, x):
      y, aux = nnx.merge(graphdef, state)(x)
      return y, aux

    y, aux = fwd(state, x)
    ref = paper_peer_forward(x, _params(m), top_k=3, activation={
        "gelu": lambda a: jax.nn.gelu(a, approximate=False), "gelu_tanh": jax.nn.gelu,
        "relu": jax.nn.relu, "silu": jax.nn.silu}[act],
                             query_norm=norm)
    chex.assert_shape(y, (2, 5, D))
    chex.assert_trees_all_close(y, ref, atol=1e-5, rtol=1e-5)
    chex.assert_shape(aux.counts["score_sum"], (64,))
    # softmax scores of each (token, head) sum to 1
    np.testing.assert_allclose(aux.counts["score_sum"].sum(), 2 * 5 * 2, rtol=1e-5)


def test_sigmoid_and_per_head_experts():
  m = _peer(score="sigmoid", per_head_experts=True, heads=3)
  assert m.u.shape == (3 * 64, D)
  x = _x()
  y, aux = m(x)
  q = jnp.einsum("btd,dhk->bthk", x, m.retrieval.query[...])
  s, i = reference.product_key_topk(q, m.retrieval.keys1[...], m.retrieval.keys2[...], 3)
  i = i + 64 * jnp.arange(3)[:, None]
  a = jax.nn.gelu(jnp.einsum("btd,bthkd->bthk", x, m.u[...][i])) * jax.nn.sigmoid(s)
  ref = jnp.einsum("bthk,bthkd->btd", a, m.v[...][i])
  chex.assert_trees_all_close(y, ref, atol=1e-5, rtol=1e-5)
  chex.assert_shape(aux.counts["score_sum"], (3 * 64,))


def test_param_kinds_and_names():
  m = _peer(query_norm="batch")
  assert isinstance(m.u, TableParam) and isinstance(m.v, TableParam)
  assert not isinstance(m.retrieval.keys1, TableParam)
  assert not isinstance(m.retrieval.query, TableParam)
  assert m.u.out_sharding == ("table_rows", "table_embed")
  assert m.retrieval.keys1.shape == (1, 8, 4)
  assert isinstance(m.retrieval.norm.mean, nnx.BatchStat)


def test_initial_output_variance_comparable_to_dense():
  """v's init scale makes Var(y) of the order of a LeCun dense FFN's (E[gelu(a)^2] ~ 0.4)."""
  d = 64
  x = jax.random.normal(jax.random.key(0), (4, 64, d))
  for score in ("softmax", "sigmoid"):
    m = peer.PEER(d, peer.PEERSettings(num_experts_sqrt=32, heads=4, top_k=8, d_key=32,
                                       score=score), rngs=nnx.Rngs(0))
    var = float(jnp.var(nnx.jit(lambda m, x: m(x)[0])(m, x)))
    assert 0.1 < var < 2.0, (score, var)


def test_gradients_match_finite_differences():
  with jax.enable_x64():
    # query BatchNorm in training mode: gradients flow through the batch statistics too
    m = _peer(query_norm="batch", num_experts_sqrt=6, top_k=2, dtype=jnp.float64)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = _x(b=2, l=3).astype(jnp.float64)
    w = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)

    def f(params, x):
      y, _ = nnx.merge(graphdef, params, rest, copy=True)(x)
      return jnp.sum(w * y)

    check_grads(f, (params, x), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_batchnorm_train_eval_and_padding():
  m = _peer(query_norm="batch", bn_momentum=0.9)
  bn = m.retrieval.norm
  x = _x(b=2, l=6)
  mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
  y1, aux1 = m(x, mask=mask)
  mean1, var1 = bn.mean[...], bn.var[...]
  # running statistics = momentum update with the masked batch statistics
  q = jnp.einsum("bld,dhk->blhk", x, m.retrieval.query[...])[mask]     # real tokens only
  chex.assert_trees_all_close(mean1, 0.1 * q.mean(0), atol=1e-6)
  chex.assert_trees_all_close(var1, 0.9 + 0.1 * q.var(0), atol=1e-5)
  # padding content does not change real outputs or statistics
  m2 = _peer(query_norm="batch", bn_momentum=0.9)
  x_pad = x.at[1, 3:].set(100.0 * jax.random.normal(jax.random.key(7), (3, D)))
  y2, aux2 = m2(x_pad, mask=mask)
  chex.assert_trees_all_close(y1[mask], y2[mask], atol=1e-5)
  chex.assert_trees_all_close(m2.retrieval.norm.mean[...], mean1, atol=1e-6)
  chex.assert_trees_all_close(aux1.counts["score_sum"], aux2.counts["score_sum"], atol=1e-5)
  np.testing.assert_allclose(aux1.counts["score_sum"].sum(), 9 * 2, rtol=1e-5)
  # train mode: a token's output depends on the rest of the batch
  y_alone, _ = m2(x[:1, :2])
  assert not np.allclose(y_alone, y1[:1, :2], atol=1e-4)
  # eval mode: running statistics, per-token, no update
  m.eval()
  assert bn.use_running_average
  ye, _ = m(x, mask=mask)
  ye_alone, _ = m(x[:1, :2])
  chex.assert_trees_all_close(ye[:1, :2], ye_alone, atol=1e-5)
  chex.assert_trees_all_close(bn.mean[...], mean1)
  qe = (jnp.einsum("bld,dhk->blhk", x, m.retrieval.query[...]) - mean1) / jnp.sqrt(var1 + 1e-5)
  s, i = reference.product_key_topk(qe, m.retrieval.keys1[...], m.retrieval.keys2[...], 3)
  a = jax.nn.gelu(jnp.einsum("btd,bthkd->bthk", x, m.u[...][i])) * jax.nn.softmax(s)
  chex.assert_trees_all_close(ye, jnp.einsum("bthk,bthkd->btd", a, m.v[...][i]), atol=1e-5)
  m.train()
  assert not bn.use_running_average


def test_empty_mask_keeps_running_stats():
  m = _peer(query_norm="batch")
  y, aux = m(_x(), mask=jnp.zeros((2, 5), bool))
  chex.assert_trees_all_close(m.retrieval.norm.mean[...], jnp.zeros((2, 8)))
  chex.assert_tree_all_finite(y)
  assert float(aux.counts["score_sum"].sum()) == 0.0


def test_aux_metrics():
  m = _peer()
  _, aux = m(_x(), mask=jnp.ones((2, 5), bool))
  assert set(aux.metrics) == {"experts_hit_frac", "max_score", "score_entropy"}
  # Each metric against its definition, recomputed from the retrieval itself.
  x, mask = _x(), jnp.ones((2, 5), bool).at[1, 3:].set(False)
  _, aux = m(x, mask=mask)
  raw, idx = m.retrieval(x, mask)
  g = np.asarray(jax.nn.softmax(raw, axis=-1))                     # [b, l, h, k]
  real = np.asarray(mask)
  np.testing.assert_allclose(aux.metrics["max_score"], g[..., 0][real].mean(), rtol=1e-5)
  ent = -(g * np.log(g)).sum(-1)
  np.testing.assert_allclose(aux.metrics["score_entropy"], ent[real].mean(), rtol=1e-5)
  hit = len(np.unique(np.asarray(idx)[real])) / 64
  np.testing.assert_allclose(aux.metrics["experts_hit_frac"], hit, rtol=1e-6)
  sums = np.zeros(64)
  np.add.at(sums, np.asarray(idx)[real].ravel(), g[real].ravel())
  np.testing.assert_allclose(aux.counts["score_sum"], sums, rtol=1e-5, atol=1e-6)
  assert not aux.losses


def test_bfloat16_compute():
  m = _peer(query_norm="batch", dtype=jnp.bfloat16)
  y, _ = m(_x())
  assert y.dtype == jnp.bfloat16
  grads = nnx.grad(lambda m: jnp.sum(m(_x())[0].astype(jnp.float32)))(m)
  assert grads["u"][...].dtype == jnp.float32


def _sharded_vs_single(mesh, rules, kw):
  x = _x(b=8, l=4)
  mask = jnp.ones((8, 4), bool).at[3, 2:].set(False)

  def run(m, x, mask):
    def loss(m):
      y, aux = m(x, mask=mask)
      return jnp.sum(y ** 2), (y, aux.counts["score_sum"])
    (_, (y, sums)), g = nnx.value_and_grad(loss, has_aux=True)(m)
    return y, sums, g

  single = _peer(**kw)
  ref = nnx.jit(run)(single, x, mask)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    m = _peer(**kw)
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
    ms = jax.device_put(mask, sharding.batch_sharding(mesh, 2))
    out = nnx.jit(run)(m, xs, ms)
    u_spec = m.u[...].sharding.spec
  chex.assert_trees_all_close(jax.tree.leaves(jax.device_get(out)),
                              jax.tree.leaves(jax.device_get(ref)), atol=1e-4, rtol=1e-4)
  if isinstance(m.retrieval.norm, pkq.MaskedBatchNorm):     # global (masked) batch statistics
    chex.assert_trees_all_close(m.retrieval.norm.mean[...], single.retrieval.norm.mean[...],
                                atol=1e-5)
  return u_spec


@pytest.mark.parametrize("mesh_shape,overrides,kw,u_spec", [
    # rows over 'expert' (a batch axis too): tokens all-gathered over it, outputs reduce-scattered
    ((2, 4, 1), {}, dict(query_norm="batch"), ("expert", None)),
    ((2, 4, 1), {}, dict(query_norm="layer", per_head_experts=True), ("expert", None)),
    # features over 'model' (Meta memory-layer layout)
    ((4, 1, 2), {"table_rows": None, "table_embed": "model"}, dict(query_norm="batch"),
     (None, "model")),
    # rows over 'model' (not a batch axis: outputs psum'd) and rows x features
    ((4, 1, 2), {"table_rows": "model"}, dict(query_norm="none"), ("model", None)),
    ((2, 2, 2), {"table_embed": "model"}, dict(query_norm="batch"), ("expert", "model")),
])
def test_sharded_equals_single_device(mesh_shape, overrides, kw, u_spec):
  mesh = sharding.make_mesh(*mesh_shape)
  spec = _sharded_vs_single(mesh, sharding.logical_rules(overrides), kw)
  assert tuple(spec) + (None,) * (2 - len(spec)) == u_spec


def test_sharded_step_never_gathers_a_table():
  """GSPMD alone would all-gather row-sharded tables; table_mix keeps them local."""
  mesh = sharding.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules()):
    m = _peer(num_experts_sqrt=16)
    x = jax.device_put(_x(b=8, l=4), sharding.batch_sharding(mesh, 3))
    graphdef, state = nnx.split(m)
    step = jax.jit(lambda state, x: nnx.grad(
        lambda m: jnp.sum(m(x)[0] ** 2))(nnx.merge(graphdef, state)))
    hlo = step.lower(state, x).compile().as_text()
  collectives = [l for l in hlo.split("\n")
                 if any(f" {op}(" in l for op in ("all-gather", "all-reduce", "reduce-scatter"))]
  assert collectives
  assert not any(f"[256,{D}]" in l for l in collectives), "a whole table crossed devices"


def _config(**peer_fields):
  c = config_lib.default_config()
  c.model.sparse_ffn = "peer"
  c.model.sparse_layers = "middle"
  c.peer.update(dict(num_experts_sqrt=16, heads=2, top_k=4, d_key=16))
  c.peer.update(peer_fields)
  return c


def test_default_config_is_paper():
  c = peer.default_config()
  assert (c.num_experts_sqrt ** 2, c.heads, c.top_k, c.query_norm) == (1024 ** 2, 8, 16, "batch")
  assert "peer" in FFN_REGISTRY


@pytest.mark.parametrize("field,value,expect", [
    ("top_k", 300, "config.peer.top_k=300: must be in [1, peer.num_experts_sqrt=16]"),
    ("top_k", 0, "config.peer.top_k=0"),
    ("d_key", 15, "config.peer.d_key=15: must be even"),
    ("num_experts_sqrt", 0, "config.peer.num_experts_sqrt=0"),
    ("heads", 0, "config.peer.heads=0"),
    ("activation", "tanh", "config.peer.activation='tanh'"),
    ("score", "relu", "config.peer.score='relu'"),
    ("query_norm", "rms", "config.peer.query_norm='rms'"),
    ("bn_momentum", 1.0, "config.peer.bn_momentum=1.0"),
    ("v_init_scale", 0.0, "config.peer.v_init_scale=0.0"),
])
def test_config_errors(field, value, expect):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(_config(**{field: value}))
  msg = str(e.value)
  assert expect in msg and "\n" not in msg and "--config.peer." in msg


def test_build_from_config():
  c = _config()
  config_lib.validate(c)
  m = build_ffn("peer", c.peer, d_model=D, d_ff=64, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert m.u.shape == (256, D)
  y, aux = m(_x())
  chex.assert_shape(y, (2, 5, D))


def test_tiny_lm_with_peer_trains():
  lm_utils = pytest.importorskip("lm_utils")
  c = lm_utils.tiny_config(sparse_ffn="peer", sparse_layers="middle")
  c.peer.update(dict(num_experts_sqrt=16, heads=2, top_k=4, d_key=16))
  losses = lm_utils.train_losses(c, steps=10)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses


@pytest.mark.slow
def test_tiny_lm_with_peer_sharded_matches_single_device():
  """The whole train step on a data=2 x expert=4 mesh (tables row-sharded) == 1 device."""
  lm_utils = pytest.importorskip("lm_utils")
  from moejax.training import state as state_lib

  def config():
    c = lm_utils.tiny_config(sparse_ffn="peer", sparse_layers="middle")
    c.peer.update(dict(num_experts_sqrt=16, heads=2, top_k=4, d_key=16))
    return c

  single = lm_utils.train_losses(config(), steps=4)
  c = config()
  c.mesh.update(data=2, expert=4)
  mesh = state_lib.make_mesh(c)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(state_lib.axis_rules(c)):
    sharded = lm_utils.train_losses(c, steps=4, mesh=mesh)
  np.testing.assert_allclose(sharded, single, rtol=2e-4)


def test_sharded_small_batch_falls_back_to_gspmd():
  """A batch that does not divide the batch shards (e.g. one sequence) still works."""
  mesh = sharding.make_mesh(data=2, expert=4)
  single = _peer()
  ref, _ = single(_x(b=1, l=3))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules()):
    m = _peer()
    y, _ = nnx.jit(lambda m, x: m(x))(m, _x(b=1, l=3))
  chex.assert_trees_all_close(jax.device_get(y), ref, atol=1e-5)


def test_compiled_memory_is_bounded_by_gathered_rows():
  """fwd+bwd temp memory: a few [T, h, k, d] tensors and table-sized gradients, nothing
  of size [T, h, N] (N = 128² here, so scoring all N keys per token would exceed it)."""
  m = _peer(num_experts_sqrt=128, heads=2, top_k=4, d_key=8, query_norm="batch")
  x = _x(b=2, l=32)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  step = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)[0])))
  mem = step.lower(params, x).compile().memory_analysis()
  if mem is None:
    pytest.skip("no memory analysis on this backend")
  rows = 2 * 32 * 2 * 4 * D * 4                  # one [T, h, k, d] float32 tensor
  tables = 2 * 128 ** 2 * D * 4                  # dense gradients of u and v
  per_token_n = 2 * 32 * 2 * 128 ** 2 * 4        # one [T, h, N] float32 tensor
  assert mem.temp_size_in_bytes < 6 * rows + 2 * tables < per_token_n, mem.temp_size_in_bytes
