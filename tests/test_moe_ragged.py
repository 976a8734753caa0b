"""Dropless expert parallelism (``moe.dispatch='dropless_ep'``, ``jax.lax.ragged_all_to_all``).

XLA:CPU cannot run ``ragged_all_to_all``, so the shard_map body is checked on 8 fake CPU
devices with the exchange replaced by a reference built from ``all_gather`` and dense ops
(written from the primitive's docstring, checked on its example): the sorting, send sizes
and offsets must give the single-device dropless result, values and gradients. The real
path is compiled for TPU slices with libtpu (skipped without it).
"""

import logging
import os

if os.environ.get("JAX_PLATFORMS") == "cpu":   # the TPU is only a compile target here:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other compile checks hold libtpu
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import moejax.layers.moe as moe  # noqa: E402
from moejax import kernels, sharding  # noqa: E402
from moejax.errors import ConfigError  # noqa: E402
from moejax.layers.moe import config as moe_config  # noqa: E402
from moejax.layers.moe import dispatch, routing  # noqa: E402

E, K, D, F, B, L = 8, 2, 8, 16, 8, 8


def reference_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                       *, axis_name):
  """``jax.lax.ragged_all_to_all`` semantics from its docstring, with ``all_gather``: the
  offsets and sizes hold ``n * P`` slices, slice ``j`` of source ``i`` goes to device
  ``j // P``: ``operand_i[input_offsets_i[j] : + send_sizes_i[j]]`` lands at
  ``output[output_offsets_i[j] : ...]`` there; the rest of ``output`` is kept.
  ``recv_sizes`` must equal ``all_to_all(send_sizes)`` (the primitive's contract): a float
  result is all NaN where it does not."""
  me = jax.lax.axis_index(axis_name)
  n = jax.lax.axis_size(axis_name)
  per = input_offsets.shape[0] // n                                     # slices per device
  ops = jax.lax.all_gather(operand, axis_name)                          # [n, N, ...]
  to_me = lambda a: jax.lax.dynamic_slice_in_dim(
      jax.lax.all_gather(a, axis_name), me * per, per, axis=1).reshape(-1)  # [(src, slice)]
  start, size, dest = to_me(input_offsets), to_me(send_sizes), to_me(output_offsets)
  source = jnp.repeat(jnp.arange(n), per)
  q = jnp.arange(output.shape[0])
  hit = (q[None] >= dest[:, None]) & (q[None] < (dest + size)[:, None])  # [n*P, M]
  idx = jnp.clip(start[:, None] + q[None] - dest[:, None], 0, operand.shape[0] - 1)
  vals = ops[source[:, None], idx]                                      # [n*P, M, ...]
  tail = (1,) * (operand.ndim - 1)
  got = jnp.sum(jnp.where(hit.reshape(hit.shape + tail), vals, 0), 0)  # slices never overlap
  out = jnp.where(hit.any(0).reshape((-1,) + tail), got, output)
  agree = jnp.all(recv_sizes == jax.lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True))
  return jnp.where(agree, out, jnp.nan) if jnp.issubdtype(out.dtype, jnp.inexact) else out


def _rules():
  return nnx.logical_axis_rules(sharding.logical_rules())


def test_reference_exchange_matches_the_docstring_example():
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  args = [np.array(a, np.int32) for a in (
      [[1, 2, 2], [3, 4, 0]], [[0] * 4] * 2, [[0, 1], [0, 1]], [[1, 2], [1, 1]],
      [[0, 0], [1, 2]], [[1, 1], [2, 1]])]

  def body(*a):
    return reference_exchange(*(v[0] for v in a), axis_name="x")[None]

  out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(jax.P("x"),) * 6,
                              out_specs=jax.P("x")))(*args)
  np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


def _problem(skew: bool):
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  mask = jnp.ones((B, L), bool).at[3, 4:].set(False).at[6, 1:].set(False)
  logits = 2.0 * jax.random.normal(jax.random.key(2), (B, L, E))
  if skew:  # nearly every token picks experts 0 and 1: device 0 receives (almost) everything
    logits = logits + jnp.array([8.0, 8.0] + [0.0] * (E - 2)).at[5].set(3.0)
  ks = jax.random.split(jax.random.key(3), 3)
  w = (jax.random.normal(ks[0], (E, D, F)) / 3, jax.random.normal(ks[1], (E, D, F)) / 3,
       jax.random.normal(ks[2], (E, F, D)) / 4)
  return x, mask, logits, w


def _dense_loss(x, mask, logits, w):
  plan = routing.top_k_route(logits, mask, k=K, capacity=None)
  y = dispatch.dropless_dispatch(x, plan, w, "gelu", impl="blocked")
  return jnp.sum(y ** 2), y


@pytest.mark.parametrize("impl,skew", [("blocked", False), ("ragged_dot", False),
                                       ("blocked", True)])
def test_body_equals_dense_dropless_values_and_gradients(impl, skew):
  x, mask, logits, w = _problem(skew)
  grad = jax.grad(_dense_loss, argnums=(0, 2, 3), has_aux=True)
  want = grad(x, mask, logits, w)

  def ep_loss(x, logits, w):
    plan = routing.top_k_route(logits, mask, k=K, capacity=None)
    y, plan2 = dispatch.dropless_ep_dispatch(x, plan, w, "gelu", impl=impl,
                                             exchange=reference_exchange)
    assert plan2 is plan                                  # worst-case buffer: nothing dropped
    return jnp.sum(y ** 2), y

  with jax.set_mesh(sharding.make_mesh(data=2, expert=4)), _rules():
    got = jax.jit(jax.grad(ep_loss, argnums=(0, 1, 2), has_aux=True))(x, logits, w)
  chex.assert_trees_all_close(got[1], want[1], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(got[0], want[0], atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(want[0][1]).sum()) > 0             # the router gets a gradient


def _clipped_kept(logits, mask, m, n=4, groups=2):
  """The documented overflow rule in numpy: each destination keeps its first ``m`` rows in
  (local expert, source device, token, slot) order."""
  plan = routing.top_k_route(logits, mask, k=K, capacity=None)
  idx = np.asarray(plan.expert_index)
  routed = np.asarray(plan.routed)
  kept = np.zeros_like(routed)
  el = E // n
  b_loc = B // (groups * n)                              # sequences per device
  for dev_g in range(groups):
    for dst in range(n):
      filled = 0
      for expert in range(dst * el, (dst + 1) * el):
        for src in range(n):
          for b in range((dev_g * n + src) * b_loc, (dev_g * n + src + 1) * b_loc):
            for t in range(L):
              for j in range(K):
                if routed[b, t, j] and idx[b, t, j] == expert and filled < m:
                  filled += 1
                  kept[b, t, j] = True
  return kept


def test_buffer_factor_drops_overflow_by_the_documented_rule():
  x, mask, logits, w = _problem(skew=True)
  rows = (B // 8) * L * K                                 # routed slots per device (16)
  m = dispatch.ep_receive_rows(rows, K, 4, E // 4, buffer_factor=1.0)
  assert m == 16 < dispatch.ep_receive_rows(rows, K, 4, E // 4)   # worst case 64

  with jax.set_mesh(sharding.make_mesh(data=2, expert=4)), _rules():
    @jax.jit
    def run(x, logits, w):
      plan = routing.top_k_route(logits, mask, k=K, capacity=None)
      return dispatch.dropless_ep_dispatch(x, plan, w, "gelu", buffer_factor=1.0,
                                           exchange=reference_exchange)
    y, plan = run(x, logits, w)
  kept = _clipped_kept(logits, mask, m)
  np.testing.assert_array_equal(np.asarray(plan.kept), kept)
  assert 0 < kept.sum() < np.asarray(plan.routed).sum()
  # The kept rows give exactly the dense dropless result of a plan routing only them.
  dense_plan = routing.top_k_route(logits, mask, k=K, capacity=None)
  dense_plan = dense_plan.replace(routed=jnp.asarray(kept),
                                  weight=dense_plan.weight * jnp.asarray(kept))
  want = dispatch.dropless_dispatch(x, dense_plan, w, "gelu", impl="blocked")
  chex.assert_trees_all_close(y, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(plan.load(), dense_plan.load())


def _moe(cfg, **kw):
  """The MoE layer of a ``config.moe`` section."""
  return moe.MoE(moe.MoESettings.from_config(cfg), **kw)


def _cfg(**kw):
  cfg = moe.default_config()
  cfg.update(dict(num_experts=E, top_k=K, gated=True, min_capacity=1), **kw)
  return cfg


def test_layer_dropless_ep_equals_single_device_dropless(monkeypatch):
  """The layer wiring: dispatch='dropless_ep' as on a TPU (target platform 'tpu': ragged
  path, ragged_dot experts), the exchange swapped for the reference; loss, aux and every
  gradient (router included) equal to dispatch='dropless' on one device."""
  x, mask, _, _ = _problem(skew=False)

  def loss(m, x):
    y, aux = m(x, mask=mask)
    return jnp.sum(y ** 2) + aux.total_loss(), (y, aux)

  grad_fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  ref = _moe(_cfg(dispatch="dropless", dropless_impl="blocked"), d_model=D, d_ff=F,
                rngs=nnx.Rngs(0))
  (l0, (y0, aux0)), g0 = grad_fn(ref, x)

  monkeypatch.setattr(jax.lax, "ragged_all_to_all", reference_exchange)
  mesh = sharding.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh), _rules(), kernels.target_platform("tpu"):
    m = _moe(_cfg(dispatch="dropless_ep"), d_model=D, d_ff=F, rngs=nnx.Rngs(0))
    assert m._capacity(L, train=True) is None
    (l1, (y1, aux1)), g1 = grad_fn(m, jax.device_put(x, sharding.batch_sharding(mesh, 3)))
  chex.assert_trees_all_close(y1, y0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(l1, l0, rtol=1e-5)
  chex.assert_trees_all_close(aux1.metrics, aux0.metrics, atol=1e-6, rtol=1e-5)
  assert float(aux1.metrics["dropped_fraction"]) == 0.0
  chex.assert_trees_all_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g0), atol=1e-4, rtol=1e-4)


def test_cpu_runs_the_capacity_all_to_all_with_a_note(caplog):
  x, mask, _, _ = _problem(skew=False)
  mesh = sharding.make_mesh(data=2, expert=4)
  out = {}
  dispatch._LOGGED.clear()
  with jax.set_mesh(mesh), _rules():
    for d in ("expert_parallel", "dropless_ep"):
      # top-1 with position priority: causal, so evaluation keeps its capacity
      m = _moe(_cfg(dispatch=d, capacity_factor_eval=1.0, top_k=1), d_model=D, d_ff=F,
                  rngs=nnx.Rngs(0))
      m.eval()
      assert m._capacity(L, train=False) is not None     # capacity applies on CPU
      with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        out[d] = nnx.jit(lambda m, x: m(x, mask=mask)[0])(m, x)
  np.testing.assert_array_equal(out["dropless_ep"], out["expert_parallel"])
  notes = [r.getMessage() for r in caplog.records if "dropless_ep" in r.getMessage()]
  assert len(notes) == 1 and "capacity all_to_all" in notes[0] and "\n" not in notes[0]
  assert dispatch.resolve_dispatch("dropless_ep", "tpu")[0] == "dropless_ep"
  assert dispatch.resolve_dispatch("dropless_ep", "gpu")[0] == "dropless_ep"


def test_registry_config_and_buffer_rows():
  assert set(dispatch.DISPATCH_MODES) == set(moe_config.DISPATCHES)
  from moejax import config as config_lib
  c = config_lib.default_config()
  c.model.sparse_ffn = "moe"
  c.moe.dispatch = "dropless_ep"
  config_lib.validate(c)
  c.moe.router = "expert_choice"
  c.moe.allow_noncausal = True
  with pytest.raises(ConfigError, match=r"^config\.moe\.dispatch='dropless_ep': expert_choice "
                                        r".*set --config\.moe\.dispatch=einsum"):
    config_lib.validate(c)
  # worst case: every token of the n shards sends min(k, local experts) rows here
  assert dispatch.ep_receive_rows(4096, 2, 4, 2) == 4 * 2048 * 2
  assert dispatch.ep_receive_rows(4096, 8, 16, 4) == 16 * 512 * 4
  assert dispatch.ep_receive_rows(4096, 2, 4, 2, buffer_factor=1.25) == 5120
  assert dispatch.ep_receive_rows(100, 1, 2, 1, buffer_factor=9.0) == 200   # capped


# ----------------------------------------------------------------------------- TPU compile

TD, TF, TB, TL = 128, 256, 8, 64


def _compile_train_step(topology, **kw):
  """Value and gradients (state, x) of a small MoE layer (the layer path, abstract state), compiled
  for ``topology`` on a (data=1, expert=4) mesh."""
  from moejax.aot import targets as aot
  mesh = sharding.make_mesh(data=1, expert=4, model=1, devices=aot.topology_devices(topology))
  cfg = _cfg(**kw)
  with jax.set_mesh(mesh), _rules(), kernels.target_platform("tpu"):
    gdef, state = nnx.split(nnx.eval_shape(
        lambda: _moe(cfg, d_model=TD, d_ff=TF, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, nnx.get_named_sharding(state, mesh))
    x = jax.ShapeDtypeStruct((TB, TL, TD), jnp.float32, sharding=sharding.batch_sharding(mesh, 3))

    def loss(state, x):
      m = nnx.merge(gdef, state)
      y, aux = m(x)
      return jnp.sum(y ** 2) + aux.total_loss()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x).compile()


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5e:2x2"])
def test_compiles_for_tpu(topology):
  from moejax.aot import targets as aot
  if not aot.libtpu_available():
    pytest.skip("needs libtpu (pip install 'jax[tpu]')")
  c = _compile_train_step(topology, dispatch="dropless_ep")
  hlo = c.as_text()
  # there and back, and both transposed in the backward pass
  assert hlo.count("ragged-all-to-all(") == 4, hlo.count("ragged-all-to-all(")
  mem = aot.memory(c)
  per_device = 3 * E // 4 * TD * TF * 4 + TD * E * 4 + TB * TL * TD * 4 // 4
  assert mem["argument"] == per_device, mem
  assert per_device < mem["output"] <= per_device + 4096, mem   # gradients, loss (padded)
  m_rows = dispatch.ep_receive_rows(TB // 4 * TL * K, K, 4, E // 4)   # 1024 rows
  assert m_rows * TD * 4 <= mem["temp"] < 64 * m_rows * (TD + TF) * 4, mem
  if topology == "v5p:2x2x1":   # the capacity path and a bounded buffer, for scale
    cap = aot.memory(_compile_train_step(topology, dispatch="expert_parallel"))
    bounded = aot.memory(_compile_train_step(topology, dispatch="dropless_ep",
                                             ep_buffer_factor=1.25))
    print(f"{topology} temp bytes: dropless_ep {mem['temp']}, bounded 1.25 {bounded['temp']}, "
          f"expert_parallel {cap['temp']}")
    assert bounded["temp"] < mem["temp"]
