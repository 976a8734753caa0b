"""Pallas product-key retrieval kernels (moejax.kernels.retrieval_tpu / retrieval_gpu).

Default suite (CPU):
  * the TPU kernel in interpret mode (``pltpu.InterpretParams(detect_races=True)``) equals
    ``retrieval_xla.product_key_topk``: same index sets, same scores; shared and
    per-head sub-keys, T not a multiple of the block, several blocks, k = 1, k = n, bf16
    queries, leading dims [b, l]; exact ties broken exactly as ``lax.top_k`` does;
  * gradients w.r.t. queries, keys1, keys2 equal the reference's;
  * a real TPU compile (libtpu AOT) for v5e:2x2 and v5p:2x2x1 at the production shape
    (T=8192, h=8, n=1024, d_key=128, k=16), shared and per-head keys: compiled temp memory
    is far below one f32 [T, h, n] half-score tensor (it is never materialised);
  * the Triton kernel (forward and gradients) lowers for CUDA, with no [T, h, n] tensor.

``@pytest.mark.gpu`` (on a CUDA GPU: ``JAX_PLATFORMS=cuda pytest -m gpu``; tests/conftest.py
defaults JAX_PLATFORMS to cpu): the Triton kernel against the reference, forward and
gradients, small and production-like shapes.
"""

from __future__ import annotations

import os
import re

# libtpu takes a machine-wide lock file unless told otherwise: compiles in parallel test
# processes (pytest-xdist, other sessions) would fail with "libtpu multi-process lockfile".
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from moejax import kernels
from moejax.aot import targets as aot
from moejax.kernels import retrieval_gpu as rg
from moejax.kernels import retrieval_xla as ref
from moejax.kernels import retrieval_tpu as rt
from moejax.kernels import reference

RACES = pltpu.InterpretParams(detect_races=True)


def _races_found() -> bool:
  try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  except ImportError:  # private module moved: nothing to check
    return False
  races = getattr(ipc, "races", None)
  return bool(getattr(races, "races_found", False))


def _interpret(q, k1, k2, k, **kw):
  try:
    out = rt.product_key_topk(q, k1, k2, k, interpret=RACES, **kw)
    out = jax.block_until_ready(out)
  except Exception:
    pltpu.reset_tpu_interpret_mode_state()
    raise
  assert not _races_found(), "the race detector reported a data race"
  return out


def _data(seed, lead, h, hk, n, d, dtype=jnp.float32, integer=False):
  kq, ka, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
  shapes = (lead + (h, d), (hk, n, d // 2), (hk, n, d // 2))
  if integer:  # small integers: every score exact, so ties are exact
    arrs = [jax.random.randint(r, s, -2, 3).astype(jnp.float32)
            for r, s in zip((kq, ka, kb), shapes)]
  else:
    arrs = [jax.random.normal(r, s, jnp.float32) for r, s in zip((kq, ka, kb), shapes)]
  q, k1, k2 = arrs
  return q.astype(dtype), k1, k2


def _check(got, want, k, n, atol=1e-5):
  """Same shapes/dtypes, descending scores, same scores, same index set per row."""
  s, i = got
  rs, ri = want
  chex.assert_shape((s, i), rs.shape)
  assert s.dtype == jnp.float32 and i.dtype == jnp.int32
  s, i, rs, ri = map(np.asarray, (s, i, rs, ri))
  assert np.all(np.diff(s, axis=-1) <= 0), "scores not sorted descending"
  assert i.min() >= 0 and i.max() < n * n
  chex.assert_trees_all_close(s, rs, atol=atol, rtol=1e-5)
  np.testing.assert_array_equal(np.sort(i, axis=-1), np.sort(ri, axis=-1))


# ------------------------------------------------------------------ interpret mode (CPU)

CASES = [
    # lead, h, hk, n, d_key, k, dtype, block_rows
    ((13,), 4, 1, 32, 16, 5, jnp.float32, None),        # shared keys, T·h-free rows
    ((13,), 4, 4, 32, 16, 5, jnp.float32, None),        # per-head keys, T = 13 (pad to 16)
    ((300,), 1, 1, 16, 8, 4, jnp.float32, 128),         # 3 row blocks, last one partial
    ((2, 75), 2, 2, 24, 12, 3, jnp.float32, 128),       # per-head, [b, l], 2 blocks
    ((2, 3), 2, 2, 24, 12, 1, jnp.float32, None),       # k = 1, n and d/2 not powers of 2
    ((5,), 2, 1, 8, 8, 8, jnp.float32, None),           # k = n
    ((3, 4), 3, 3, 16, 16, 4, jnp.bfloat16, None),      # bf16 queries, per-head
]


@pytest.mark.parametrize("lead,h,hk,n,d,k,dtype,block_rows", CASES)
def test_interpret_equals_reference(lead, h, hk, n, d, k, dtype, block_rows):
  q, k1, k2 = _data(0, lead, h, hk, n, d, dtype)
  got = _interpret(q, k1, k2, k, block_rows=block_rows)
  _check(got, ref.product_key_topk(q, k1, k2, k), k, n)


def test_interpret_matches_brute_force():
  q, k1, k2 = _data(1, (6,), 2, 2, 12, 8)
  got = _interpret(q, k1, k2, 7)
  _check(got, reference.product_key_topk(q, k1, k2, 7), 7, 12)


@pytest.mark.parametrize("hk", [1, 3])
def test_interpret_exact_ties_like_top_k(hk):
  """Integer data: many exact ties; the kernel breaks them as the reference does (lowest
  index within each half, lowest candidate position), so even the order is identical."""
  q, k1, k2 = _data(2, (2, 5), 3, hk, 10, 4, integer=True)
  s, i = _interpret(q, k1, k2, 6)
  rs, ri = ref.product_key_topk(q, k1, k2, 6)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


def test_interpret_under_jit_and_registry():
  q, k1, k2 = _data(3, (7,), 2, 1, 16, 8)
  topk = kernels.get("interpret").topk                 # interpret=True: default params
  s, i = jax.jit(lambda q, a, b: topk(q, a, b, 3))(q, k1, k2)
  _check((s, i), ref.product_key_topk(q, k1, k2, 3), 3, 16)


@pytest.mark.parametrize("hk,dtype", [(1, jnp.bfloat16), (2, jnp.float32)])
def test_interpret_gradients(hk, dtype):
  q, k1, k2 = _data(4, (2, 3), 2, hk, 16, 8, dtype)
  k = 4
  w = jax.random.normal(jax.random.PRNGKey(9), (2, 3, 2, k))

  def grads(fn):
    loss = lambda q, a, b: jnp.sum(fn(q, a, b, k)[0] * w)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k1, k2)

  try:
    got = grads(lambda q, a, b, k: rt.product_key_topk(q, a, b, k, interpret=RACES))
  except Exception:
    pltpu.reset_tpu_interpret_mode_state()
    raise
  want = grads(ref.product_key_topk)
  for g, r, x in zip(got, want, (q, k1, k2)):
    assert g.dtype == x.dtype and g.shape == x.shape
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  chex.assert_trees_all_close(got, want, atol=tol, rtol=tol)
  assert float(jnp.abs(got[1].astype(jnp.float32)).sum()) > 0   # keys get gradient


def test_shape_errors():
  q, k1, k2 = _data(5, (3,), 2, 1, 8, 8)
  with pytest.raises(ValueError):
    rt.product_key_topk(q, k1, k2, 9, interpret=RACES)
  with pytest.raises(ValueError):
    rg.product_key_topk(q, k1[:, :, :3], k2[:, :, :3], 2)


def test_candidate_lanes_are_the_reference_pairs():
  for k in (1, 2, 5, 16, 33):
    pa, pb = ref.candidate_pairs(k)
    for pow2 in (False, True):
      la, lb = rt.candidate_lanes(k, pow2=pow2)
      c = len(pa)
      np.testing.assert_array_equal(la[0, :c], pa)
      np.testing.assert_array_equal(lb[0, :c], pb)
      assert np.all(la[0, c:] == -1) and np.all(lb[0, c:] == -1)
      w = la.shape[1]
      assert (w & (w - 1) == 0) if pow2 else (w % 128 == 0)


# ------------------------------------------------------------- real TPU compile (libtpu)

PROD = dict(tokens=8192, heads=8, n=1024, d_key=128, k=16)


@pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (jax[tpu])")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
def test_tpu_compile_production_shape(topology, shared):
  from jax.sharding import Mesh, PartitionSpec as P
  t, h, n, d, k = (PROD[x] for x in ("tokens", "heads", "n", "d_key", "k"))
  hk = 1 if shared else h
  args = (jax.ShapeDtypeStruct((t, h, d), jnp.float32),
          jax.ShapeDtypeStruct((hk, n, d // 2), jnp.float32),
          jax.ShapeDtypeStruct((hk, n, d // 2), jnp.float32))
  # Mosaic calls are not auto-partitioned: run the kernel per device (replicated inputs).
  mesh = Mesh(np.array(aot.topology_devices(topology)), ("x",))
  fn = jax.shard_map(lambda q, a, b: rt.product_key_topk(q, a, b, k), mesh=mesh,
                     in_specs=P(), out_specs=P(), check_vma=False)
  compiled = aot.compile_for_tpu(fn, *args, topology=topology)
  mem = aot.memory(compiled)
  half_scores = t * h * n * 4                      # one f32 [T, h, n]: 256 MiB
  assert "tpu_custom_call" in compiled.as_text()
  assert mem["temp"] < half_scores // 16, mem
  assert mem["output"] <= 2 * t * h * k * 4 + (1 << 16), mem


@pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (jax[tpu])")
@pytest.mark.parametrize("t,h,hk,n,d,k,dtype", [
    (1000, 4, 4, 100, 32, 5, jnp.bfloat16),     # bf16, 4 row blocks (last partial), odd n
    (24, 2, 2, 8, 8, 8, jnp.bfloat16),          # one small block, k = n, d/2 = 4
    (37, 2, 1, 64, 16, 1, jnp.float32),         # k = 1, shared
])
def test_tpu_compile_small_shapes(t, h, hk, n, d, k, dtype):
  """Mosaic's block / layout rules hold for shapes off the production path too."""
  from jax.sharding import Mesh, PartitionSpec as P
  args = (jax.ShapeDtypeStruct((t, h, d), dtype),
          jax.ShapeDtypeStruct((hk, n, d // 2), jnp.float32),
          jax.ShapeDtypeStruct((hk, n, d // 2), jnp.float32))
  mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")), ("x",))
  fn = jax.shard_map(lambda q, a, b: rt.product_key_topk(q, a, b, k), mesh=mesh,
                     in_specs=P(), out_specs=P(), check_vma=False)
  compiled = aot.compile_for_tpu(fn, *args, topology="v5e:2x2")
  assert "tpu_custom_call" in compiled.as_text()


# ---------------------------------------------------------------- CUDA lowering (CPU)


@pytest.mark.parametrize("hk,dtype", [(1, jnp.float32), (8, jnp.bfloat16)])
def test_gpu_kernel_lowers_for_cuda(hk, dtype):
  t, h, n, d, k = 40, 8, 1000, 128, 16   # t != d/2: the keys are [h, d/2, n_pad]
  args = (jax.ShapeDtypeStruct((t, h, d), dtype),
          jax.ShapeDtypeStruct((hk, n, d // 2), jnp.float32),
          jax.ShapeDtypeStruct((hk, n, d // 2), jnp.float32))
  fwd = lambda q, a, b: rg.product_key_topk(q, a, b, k)
  loss = lambda q, a, b: jnp.sum(fwd(q, a, b)[0])
  for fn in (fwd, jax.grad(loss, argnums=(0, 1, 2))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r"custom_call @([\w$.]+)", text)) == {"__gpu$xla.gpu.triton"}
    for shape in (f"{t}x{h}x{n}", f"{h}x{t}x{n}", f"{t}x{h}x1024", f"{h}x{t}x1024"):
      assert f"tensor<{shape}x" not in text, shape      # no half-score tensor outside


# ------------------------------------------------------------------------ on a GPU


def _check_gpu(got, q, k1, k2, k, n):
  """Reference at highest matmul precision; near-ties (gap < 1e-4) may swap members."""
  with jax.default_matmul_precision("highest"):
    rs, ri = jax.jit(ref.product_key_topk, static_argnums=3)(q, k1, k2, k)
    rescored = jax.jit(ref.rescore)(q, k1, k2, got[1])
  s, i = map(np.asarray, got)
  rs, ri = np.asarray(rs), np.asarray(ri)
  chex.assert_shape((s, i), rs.shape)
  assert np.all(np.diff(s, axis=-1) <= 0)
  assert i.min() >= 0 and i.max() < n * n
  chex.assert_trees_all_close(s, rs, atol=1e-4, rtol=1e-5)
  chex.assert_trees_all_close(s, np.asarray(rescored), atol=1e-4, rtol=1e-5)
  flat_i, flat_r = i.reshape(-1, k), ri.reshape(-1, k)
  assert all(len(set(row)) == k for row in flat_i.tolist())   # no index twice
  same = np.all(np.sort(flat_i, -1) == np.sort(flat_r, -1), axis=-1)
  gap = np.abs(rs.reshape(-1, k)[:, -1:] - s.reshape(-1, k)).min(-1) if k else None
  assert np.all(same | (gap < 1e-4)), f"{np.sum(~same)} rows differ beyond near-ties"
  assert same.mean() > 0.99


GPU_CASES = [
    # lead, h, hk, n, d_key, k, dtype
    ((13,), 4, 1, 32, 16, 5, jnp.float32),           # shared keys, odd T
    ((13,), 4, 4, 32, 16, 5, jnp.float32),           # per-head keys
    ((2, 3), 2, 2, 24, 12, 1, jnp.float32),          # k = 1, non-powers of two
    ((5,), 2, 1, 8, 8, 8, jnp.float32),              # k = n
    ((3, 40), 3, 3, 100, 40, 7, jnp.bfloat16),       # bf16 queries, [b, l]
    ((256,), 8, 1, 1024, 128, 16, jnp.float32),      # production n, d_key, k; shared
    ((256,), 8, 8, 1024, 128, 16, jnp.bfloat16),     # production, per-head, bf16
]


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("lead,h,hk,n,d,k,dtype", GPU_CASES)
def test_gpu_equals_reference(lead, h, hk, n, d, k, dtype):
  q, k1, k2 = _data(0, lead, h, hk, n, d, dtype)
  got = jax.jit(rg.product_key_topk, static_argnums=3)(q, k1, k2, k)
  _check_gpu(got, q, k1, k2, k, n)


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("hk", [1, 4])
def test_gpu_gradients(hk):
  q, k1, k2 = _data(4, (2, 9), 4, hk, 48, 32)
  k = 6
  w = jax.random.normal(jax.random.PRNGKey(9), (2, 9, 4, k))
  _, idx = jax.jit(rg.product_key_topk, static_argnums=3)(q, k1, k2, k)

  def grads(fn):
    loss = lambda q, a, b: jnp.sum(fn(q, a, b) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k1, k2)

  with jax.default_matmul_precision("highest"):
    got = grads(lambda q, a, b: rg.product_key_topk(q, a, b, k)[0])
    want = grads(lambda q, a, b: ref.rescore(q, a, b, idx))   # same indices: no tie luck
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
