"""The C++ CPU kernels (moejax.backends.cpu.native, XLA FFI calls to cpu_kernels.cc) equal
the XLA ops they replace exactly: top_k = jax.lax.top_k (values, indices, order, ties,
signed zeros, infinities and NaNs). The lookup's row contractions (gather_dot,
gather_weighted_sum, scatter_outer_add) equal their einsum / scatter-add forms up to float
rounding (another summation order), and the lookup gives the same values and gradients with
and without them; adam_rows is the lazy-Adam update.

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
from moejax.backends.cpu import native as cpu_kernels
from moejax.kernels import retrieval_xla


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


def test_build_is_announced_cached_and_a_missing_compiler_is_one_clear_error(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "cache"))
  lib = cpu_kernels._build()
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("moejax: building CPU kernels into "), err
  stamp = lib.stat().st_mtime_ns
  assert cpu_kernels._build() == lib and lib.stat().st_mtime_ns == stamp   # loaded, not rebuilt
  assert capsys.readouterr().err == ""                                      # silently
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "other"))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(OSError, match="no C\\+\\+ compiler: .*no-such-compiler not found"):
    cpu_kernels._build()
  assert not list((tmp_path / "other").glob("*.so"))


def test_cache_is_keyed_by_header_contents_not_their_path(tmp_path, monkeypatch):
  """Two virtual environments with the same jax, jaxlib and compiler share the library:
  the FFI headers' contents key it, not where they are; the compiler and jaxlib key it."""
  import shutil
  from pathlib import Path
  include = Path(jax.ffi.include_dir())
  copy = tmp_path / "other-venv" / "include"
  shutil.copytree(include, copy)
  _, compiler = cpu_kernels._compiler()
  path = cpu_kernels._cached_path(compiler, include)
  assert cpu_kernels._cached_path(compiler, copy) == path
  assert cpu_kernels._cached_path(compiler + " (another build)", include) != path
  header = next(p for p in copy.rglob("*.h"))
  header.write_text(header.read_text() + "\n// changed\n")
  assert cpu_kernels._cached_path(compiler, copy) != path
  monkeypatch.setattr(cpu_kernels.jaxlib, "__version__", "0.0.0-other")
  assert cpu_kernels._cached_path(compiler, include) != path


def test_failed_build_is_one_warning_line_and_an_error_when_required(tmp_path, monkeypatch,
                                                                     capsys):
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  load = cpu_kernels._library.__wrapped__   # uncached: registers nothing when it fails
  monkeypatch.delenv("MOEJAX_CPU_KERNELS", raising=False)
  assert load() is None
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("moejax: warning: CPU kernels not built"), err
  assert "slower" in err and "C++17 compiler" in err and "CXX" in err
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "1")
  with pytest.raises(cpu_kernels.KernelBuildError, match="MOEJAX_CPU_KERNELS=1 requires them") as e:
    load()
  assert "\n" not in str(e.value)


def test_a_failing_compiler_is_one_line_with_its_log_kept(tmp_path, monkeypatch, capsys):
  """A compiler that runs but fails: the first error line, and where the whole output is."""
  fake = tmp_path / "bad-cxx"
  fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'bad-cxx 1.0'; exit 0; }\n"
                  "echo 'x.cc:1: error: no good' >&2; echo 'more detail' >&2; exit 1\n")
  fake.chmod(0o755)
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "1")
  with pytest.raises(cpu_kernels.KernelBuildError, match="bad-cxx 1.0 failed: x.cc:1: error: no "
                     "good") as e:
    cpu_kernels._library.__wrapped__()
  assert "\n" not in str(e.value)
  (log,) = (tmp_path / "cache").glob("*.log")
  assert str(log) in str(e.value) and "more detail" in log.read_text()
  assert not list((tmp_path / "cache").glob("*.so"))


def test_product_key_retrieval_same_with_either_top_k(monkeypatch):
  """The reference retrieval (which calls cpu_kernels) gives the same scores and indices with
  the kernel and with XLA's TopK, at a PEER-like shape."""
  kq, k1, k2 = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (2, 40, 4, 32))
  keys1 = jax.random.normal(k1, (4, 256, 16))
  keys2 = jax.random.normal(k2, (4, 256, 16))
  f = lambda q: retrieval_xla.product_key_topk(q, keys1, keys2, 16)
  got = jax.jit(f)(q)
  assert cpu_kernels.TOPK in _lowered_text(f, q)
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "0")
  want = jax.jit(f)(q)
  chex.assert_trees_all_equal(got, want)


# ------------------------------------------------------------ the lookup's row contractions


def _lookup_operands(n=300, d=40, t=23, h=12, seed=0):
  kt, ki, kx, kw = jax.random.split(jax.random.key(seed), 4)
  table = jax.random.normal(kt, (n, d), jnp.float32)
  idx = jax.random.randint(ki, (t, h), -3, n + 3)           # out of range: clipped
  return table, idx, jax.random.normal(kx, (t, d)), jax.random.normal(kw, (t, h))


@pytest.mark.parametrize("n,d,t,h", [(1, 1, 1, 1), (300, 40, 23, 12), (5000, 256, 70, 128),
                                     (64, 17, 3, 5)])
def test_gather_contractions_equal_einsum_of_take(n, d, t, h):
  table, idx, x, w = _lookup_operands(n, d, t, h, seed=n + t)
  rows = jnp.take(table, idx, axis=0, mode="clip")            # [t, h, d]
  assert cpu_kernels.GATHER_DOT in _lowered_text(cpu_kernels.gather_dot, table, idx, x)
  assert cpu_kernels.GATHER_WEIGHTED_SUM in _lowered_text(cpu_kernels.gather_weighted_sum,
                                                          table, idx, w)
  np.testing.assert_allclose(jax.jit(cpu_kernels.gather_dot)(table, idx, x),
                             jnp.einsum("td,tjd->tj", x, rows), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(cpu_kernels.gather_weighted_sum)(table, idx, w),
                             jnp.einsum("tj,tjd->td", w, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r,d,t,h,spread", [(1, 3, 4, 2, False), (50, 40, 23, 12, False),
                                            (9000, 64, 40, 64, False), (9000, 64, 300, 64, True),
                                            (70_000, 256, 500, 64, True)])   # 68 MiB: streamed
def test_scatter_outer_add_equals_scatter_add_and_is_deterministic(r, d, t, h, spread):
  _, _, vec, coef = _lookup_operands(r, d, t, h, seed=r)
  if spread:   # targets over all rows (and ~1/8 past the end, dropped)
    targets = jax.random.randint(jax.random.key(r + 1), (t, h), 0, r + r // 8)
  else:        # repeats (few distinct rows) and out-of-range targets, which are dropped
    targets = jax.random.randint(jax.random.key(r + 1), (t, h), 0, min(r, 7) + 2)
    targets = jnp.where(targets > min(r, 7), r + targets, targets)
  rows = (coef[..., None] * vec[:, None]).reshape(-1, d)
  want = jnp.zeros((r, d)).at[targets.reshape(-1)].add(rows, mode="drop")
  zeros = jax.ShapeDtypeStruct((r, d), jnp.float32)          # the kernel starts from zeros
  f = jax.jit(lambda *a: cpu_kernels.scatter_outer_add(zeros, *a))
  assert cpu_kernels.SCATTER_OUTER in _lowered_text(f, targets, coef, vec)
  got = f(targets, coef, vec)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(f(targets, coef, vec), got)    # bit-identical again
  untouched = ~jnp.isin(jnp.arange(r), targets)
  assert not np.asarray(got[untouched]).any()
  # onto a given accumulator: XLA's scatter-add
  acc = jnp.ones((r, d))
  g = lambda *a: cpu_kernels.scatter_outer_add(acc, *a)
  assert cpu_kernels.SCATTER_OUTER not in _lowered_text(g, targets, coef, vec)
  np.testing.assert_allclose(jax.jit(g)(targets, coef, vec), want + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r,d1,d2,t,h", [(50, 40, 24, 23, 12), (70_000, 256, 256, 300, 64)])
def test_scatter_outer_add_pair_equals_two_scatters(r, d1, d2, t, h):
  _, _, vec1, coef1 = _lookup_operands(r, d1, t, h, seed=r)
  _, _, vec2, coef2 = _lookup_operands(r, d2, t, h, seed=r + 1)
  targets = jax.random.randint(jax.random.key(r + 2), (t, h), 0, r + r // 8)   # some dropped
  accs = (jax.ShapeDtypeStruct((r, d1), jnp.float32), jax.ShapeDtypeStruct((r, d2), jnp.float32))
  pair = jax.jit(lambda *a: cpu_kernels.scatter_outer_add_pair(*accs, *a))
  assert cpu_kernels.SCATTER_OUTER_PAIR in _lowered_text(pair, targets, coef1, vec1, coef2, vec2)
  got = pair(targets, coef1, vec1, coef2, vec2)
  single = jax.jit(cpu_kernels.scatter_outer_add, static_argnums=0)
  chex.assert_trees_all_equal(got, (single(accs[0], targets, coef1, vec1),
                                    single(accs[1], targets, coef2, vec2)))
  want = jnp.zeros((r, d2)).at[targets.reshape(-1)].add(
      (coef2[..., None] * vec2[:, None]).reshape(-1, d2), mode="drop")
  np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)
  with kernels.target_platform("tpu"):                          # two XLA scatter-adds there
    text = _lowered_text(lambda *a: cpu_kernels.scatter_outer_add_pair(*accs, *a), targets,
                         coef1, vec1, coef2, vec2)
    assert cpu_kernels.SCATTER_OUTER_PAIR not in text and "scatter" in text


def test_row_contractions_fall_back_and_run_in_shard_map():
  from jax.sharding import PartitionSpec as P
  table, _, _, _ = _lookup_operands()
  nd = jax.device_count()
  idx = jax.random.randint(jax.random.key(5), (nd * 3, 12), 0, table.shape[0])
  x = jax.random.normal(jax.random.key(6), (nd * 3, table.shape[1]))
  with kernels.target_platform("tpu"):
    assert cpu_kernels.GATHER_DOT not in _lowered_text(cpu_kernels.gather_dot, table, idx, x)
  mesh = jax.make_mesh((nd,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    local = jax.shard_map(cpu_kernels.gather_dot, in_specs=(P(), P("data"), P("data")),
                          out_specs=P("data"))
    assert cpu_kernels.GATHER_DOT in _lowered_text(local, table, idx, x)
    np.testing.assert_allclose(jax.jit(local)(table, idx, x),
                               jnp.einsum("td,tjd->tj", x, table[idx]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("peer", [True, False], ids=["peer", "pkm"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row_sparse"])
def test_lookup_same_with_and_without_the_kernels(monkeypatch, peer, sparse):
  """The reference lookup (forward and every gradient) with the C++ row contractions (one
  pass, no chunks) equals its XLA form (gathers + einsums over chunks of tokens)."""
  from moejax.kernels import lookup_xla as lr
  from moejax.kernels.row_plan import num_unique_slots
  n, d, t, h, k = 500, 32, 300, 4, 8
  ks = jax.random.split(jax.random.key(11), 5)
  up, down = (jax.random.normal(kk, (n, d)) for kk in ks[:2])
  down = down if peer else None
  idx = jax.random.randint(ks[2], (t, h, k), 0, n)
  scores = jax.nn.softmax(jax.random.normal(ks[3], (t, h, k)))
  x = jax.random.normal(ks[4], (t, d))
  monkeypatch.setattr(lr, "CHUNK_BYTES", 64 * 1024)          # several chunks without kernels
  u = num_unique_slots(t * h * k, n)
  taps = (None if down is None else jnp.zeros((u, d)), jnp.zeros((u, d)))

  def loss(x, scores, up, down, taps):
    if sparse:
      y = lr.lookup_sparse(x, idx, scores, up, down, taps, activation="gelu")
    else:
      y = lr.lookup(x, idx, scores, up, down, activation="gelu")
    return jnp.sum(jnp.sin(y))

  argnums = (0, 1, 4) if sparse else (0, 1, 2, 3)
  f = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  assert cpu_kernels.GATHER_WEIGHTED_SUM in _lowered_text(f, x, scores, up, down, taps)
  got = f(x, scores, up, down, taps)
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "0")
  f = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  text = _lowered_text(f, x, scores, up, down, taps)
  assert "moejax_" not in text and "while" in text               # XLA ops, over chunks
  chex.assert_trees_all_close(got, f(x, scores, up, down, taps), rtol=1e-4, atol=1e-4)


def test_adam_rows_equals_the_chunked_xla_update(monkeypatch):
  """Lazy Adam through the kernel (in place, padding slots skipped) equals the chunked
  gather-update-scatter, to an ulp (fused multiply-adds), and leaves other rows alone."""
  from moejax.training import row_sparse
  n, d, m = 3000, 24, 2500
  ks = jax.random.split(jax.random.key(4), 5)
  table = jax.random.normal(ks[0], (n, d))
  mu = jax.random.normal(ks[1], (n, d)) * 0.1
  nu = jax.random.uniform(ks[2], (n, d))
  rows = jax.random.permutation(ks[3], n)[:m].at[::9].set(n)    # distinct, some padding (N)
  g = jax.random.normal(ks[4], (m, d))
  monkeypatch.setattr(row_sparse, "ADAM_CHUNK_ROWS", 512)     # several chunks without kernels

  def step(table, mu, nu, lr, count):
    return row_sparse.adam_on_unique_rows(table, mu, nu, rows, g, count=count, lr=lr, b1=0.9,
                                          b2=0.999, eps=1e-8, scale=jnp.float32(0.7))

  args = (table, mu, nu, jnp.float32(1e-2), jnp.int32(3))
  assert cpu_kernels.ADAM_ROWS in _lowered_text(step, *args)
  got = jax.jit(step)(*args)
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "0")
  xla_step = lambda *a: step(*a)   # a new function: jit's trace cache ignores the env
  assert cpu_kernels.ADAM_ROWS not in _lowered_text(xla_step, *args)
  want = jax.jit(xla_step)(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  untouched = np.setdiff1d(np.arange(n), np.asarray(rows))
  chex.assert_trees_all_equal([a[untouched] for a in got], [table[untouched], mu[untouched],
                                                              nu[untouched]])


# A row-sparse PEER LM train step: its independent top-k / row-gather calls run at once on
# XLA's intra-op pool, inside loop bodies. A pool-wait bug hung this very step forever.
_CONCURRENT = """
import sys
sys.path.insert(0, "benchmarks")
import jax, peer
from moejax.backends.cpu import native as cpu_kernels
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


@pytest.mark.parametrize("u,used,d", [(1, 1, 1), (5000, 3900, 256), (70, 0, 24)])
def test_sum_squares_rows_equals_the_sum_and_skips_padding(u, used, d):
  n = 10_000
  rows = jnp.concatenate([jnp.arange(used, dtype=jnp.int32) * 2, jnp.full((u - used,), n)])
  g = jax.random.normal(jax.random.key(0), (u, d)) * (jnp.arange(u) < used)[:, None]
  f = lambda r, g: cpu_kernels.sum_squares_rows(r, g, n)
  assert cpu_kernels.SUM_SQUARES_ROWS in _lowered_text(f, rows, g)
  got = jax.jit(f)(rows, g)
  np.testing.assert_allclose(float(got), float(jnp.sum(g.astype(jnp.float64) ** 2)
                                               if jax.config.jax_enable_x64 else jnp.sum(g * g)),
                             rtol=2e-6)
  # padding slots are skipped: garbage there does not count
  junk = g.at[used:].set(7.0)
  assert float(jax.jit(f)(rows, junk)) == float(got)
