"""The C++ CPU kernels (moejax.kernels.cpu_kernels, XLA FFI calls to cpu_kernels.cc) equal
the XLA ops they replace exactly: top_k = jax.lax.top_k (values, indices, order, ties,
signed zeros, infinities and NaNs); take_rows = jnp.take(axis=0, mode="clip").

The kernel must build here (a C++17 compiler is part of the dev setup): a failed build
fails these tests instead of letting the fallback pass them.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.kernels import retrieval_reference, cpu_kernels


def _lowered_text(f, *args) -> str:
  return jax.jit(f).lower(*args).as_text()


def _check_equal(x, k):
  want_v, want_i = jax.lax.top_k(x, k)
  got_v, got_i = jax.jit(lambda x: cpu_kernels.top_k(x, k))(x)
  chex.assert_trees_all_equal(got_i, want_i)
  np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))   # NaN == NaN here


def test_kernel_builds_and_is_the_op_that_runs():
  assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the log warning)"
  x = jnp.zeros((4, 32), jnp.float32)
  text = _lowered_text(lambda x: cpu_kernels.top_k(x, 3), x)
  assert cpu_kernels.TOPK in text
  assert "topk" not in text.lower().replace(cpu_kernels.TOPK, "")


@pytest.mark.parametrize("n,k", [(1, 1), (5, 2), (16, 16), (17, 16), (100, 7), (1024, 16),
                                 (1024, 1), (300, 64), (40, 40)])
def test_equals_lax_top_k_random(n, k):
  x = jax.random.normal(jax.random.key(n * 31 + k), (3, 5, n), jnp.float32)
  _check_equal(x, k)


@pytest.mark.parametrize("n,k", [(64, 16), (1024, 16), (33, 5), (256, 256)])
def test_ties_keep_index_order(n, k):
  x = jax.random.randint(jax.random.key(n + k), (7, n), 0, 3).astype(jnp.float32)
  _check_equal(x, k)
  _check_equal(jnp.zeros((2, n), jnp.float32), k)          # every entry tied


def test_signed_zeros_infinities_and_nans():
  special = np.array([1, 1, 0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 2, 2, -1, 5, 0.0,
                      -0.0, np.inf, np.nan], np.float32)
  x = jnp.asarray(np.stack([special, special[::-1], np.roll(special, 5)]))
  for k in (1, 4, 9, 16):
    _check_equal(x, k)
  wide = jnp.asarray(np.tile(special, 64)[None])            # n = 1024, several groups of NaN
  _check_equal(wide, 16)


def test_vmap_and_leading_dims():
  x = jax.random.normal(jax.random.key(7), (4, 2, 3, 50), jnp.float32)
  got = jax.vmap(lambda r: cpu_kernels.top_k(r, 6))(x)
  want = tuple(jax.lax.top_k(x, 6))
  chex.assert_trees_all_equal(got, want)


def test_falls_back_to_lax_top_k(monkeypatch):
  x = jnp.ones((2, 8), jnp.float32)
  f = lambda x: cpu_kernels.top_k(x, 2)
  with kernels.target_platform("tpu"):            # compiling for TPU: XLA's op
    assert cpu_kernels.TOPK not in _lowered_text(f, x)
  assert cpu_kernels.TOPK not in _lowered_text(f, x.astype(jnp.bfloat16))
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "0")
  assert cpu_kernels.TOPK not in _lowered_text(f, x)


def test_sharded_rows_use_lax_top_k_and_shard_map_the_kernel():
  """Under a mesh of several devices XLA would replicate a custom call's operand: lax.top_k
  runs there; inside shard_map over those axes every device has its own rows."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.random.normal(jax.random.key(2), (jax.device_count() * 2, 64), jnp.float32)
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    assert cpu_kernels.TOPK not in _lowered_text(lambda x: cpu_kernels.top_k(x, 4), x)
    local = jax.shard_map(lambda r: cpu_kernels.top_k(r, 4), in_specs=P("data"),
                          out_specs=(P("data"), P("data")))
    assert cpu_kernels.TOPK in _lowered_text(local, x)
    chex.assert_trees_all_equal(jax.jit(local)(x), tuple(jax.lax.top_k(x, 4)))


def test_build_is_cached_and_a_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "cache"))
  lib = cpu_kernels._build()
  stamp = lib.stat().st_mtime_ns
  assert cpu_kernels._build() == lib and lib.stat().st_mtime_ns == stamp   # loaded, not rebuilt
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "other"))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises((RuntimeError, OSError), match="no-such-compiler"):
    cpu_kernels._build()
  assert not list((tmp_path / "other").glob("*.so"))


def test_product_key_retrieval_same_with_either_top_k(monkeypatch):
  """The reference retrieval (which calls cpu_kernels) gives the same scores and indices with
  the kernel and with XLA's TopK, at a PEER-like shape."""
  kq, k1, k2 = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (2, 40, 4, 32))
  keys1 = jax.random.normal(k1, (4, 256, 16))
  keys2 = jax.random.normal(k2, (4, 256, 16))
  f = lambda q: retrieval_reference.product_key_topk(q, keys1, keys2, 16)
  got = jax.jit(f)(q)
  assert cpu_kernels.TOPK in _lowered_text(f, q)
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "0")
  want = jax.jit(f)(q)
  chex.assert_trees_all_equal(got, want)


# ------------------------------------------------------------------------------ take_rows


def _lowered_take(table, idx):
  return _lowered_text(cpu_kernels.take_rows, table, idx)


@pytest.mark.parametrize("n,d,shape", [(1, 1, (3,)), (50, 7, (4, 9)), (1000, 256, (2, 3, 700)),
                                       (64, 128, (5000,))])
def test_take_rows_equals_jnp_take_clip(n, d, shape):
  kt, ki = jax.random.split(jax.random.key(n + d))
  table = jax.random.normal(kt, (n, d), jnp.float32)
  idx = jax.random.randint(ki, shape, -3, n + 3)             # out of range: clipped
  assert cpu_kernels.TAKE_ROWS in _lowered_take(table, idx)
  got = jax.jit(cpu_kernels.take_rows)(table, idx)
  chex.assert_trees_all_equal(got, jnp.take(table, idx, axis=0, mode="clip"))


def test_take_rows_falls_back_and_runs_in_shard_map():
  from jax.sharding import PartitionSpec as P
  table = jax.random.normal(jax.random.key(0), (40, 8), jnp.float32)
  idx = jnp.arange(jax.device_count() * 3) % 40
  assert cpu_kernels.TAKE_ROWS not in _lowered_take(table.astype(jnp.bfloat16), idx)
  with kernels.target_platform("gpu"):
    assert cpu_kernels.TAKE_ROWS not in _lowered_take(table, idx)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  idx = jax.device_put(idx, jax.sharding.NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    assert cpu_kernels.TAKE_ROWS not in _lowered_take(table, idx)   # XLA partitions its gather
    local = jax.shard_map(cpu_kernels.take_rows, in_specs=(P(), P("data")), out_specs=P("data"))
    assert cpu_kernels.TAKE_ROWS in _lowered_text(local, table, idx)
    chex.assert_trees_all_equal(jax.jit(local)(table, idx), table[idx])


# A row-sparse PEER LM train step: its independent top-k / row-gather calls run at once on
# XLA's intra-op pool, inside loop bodies. A pool-wait bug hung this very step forever.
_CONCURRENT = """
import sys
sys.path.insert(0, "benchmarks")
import jax, peer
from moejax.kernels import cpu_kernels
assert cpu_kernels.available()
run = peer.lm_train_step(128, "row_sparse", d_model=256, heads=8, top_k=16, d_key=128,
                         query_norm="batch", batch=8, length=512)
for _ in range(3):
  jax.block_until_ready(run())
print("ok")
"""


def test_concurrent_calls_share_the_thread_pool_without_deadlock():
  """Independent calls run at once on XLA's intra-op pool, each splitting its rows over
  the same pool: a call must never wait for a part that no free thread will pick up."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _CONCURRENT], env=env, capture_output=True,
                        text=True, timeout=240, cwd=root)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
