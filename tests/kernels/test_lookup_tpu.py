"""TPU Pallas lookup kernels: interpret mode (CPU) against the references; TPU compiles.

Interpret mode runs the Mosaic kernels with simulated DMAs and semaphores and a race
detector; shapes are tiny because every DMA is a host callback. The compile tests use
libtpu's real TPU compiler (no TPU needed) and check per-device temporary memory.
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other processes may hold libtpu

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from moejax.aot import targets as aot  # noqa: E402
from moejax.kernels import lookup_tpu, lookup_vjp, lookup_xla, reference  # noqa: E402
from moejax.kernels.row_plan import row_plan, unique_rows  # noqa: E402

D = 128
PARAMS = pltpu.InterpretParams(detect_races=True)


def _races_found():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  return ipc.races is not None and ipc.races.races_found


@pytest.fixture(autouse=True)
def _interpret_state():
  yield
  races = _races_found()
  pltpu.reset_tpu_interpret_mode_state()   # also clears the state after a failed test
  assert not races, "the interpret-mode race detector found a data race"


def _inputs(lead, h, k, n, table_dtype, seed=0, dup=True):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], lead + (D,), jnp.float32)
  idx = jax.random.randint(ks[1], lead + (h, k), 0, n)
  if dup and k > 1:   # a row twice within one token (and n small: repeats across tokens)
    idx = idx.at[..., 0, 1].set(idx[..., 0, 0])
  scores = jax.random.normal(ks[2], lead + (h, k), jnp.float32)
  up = jax.random.normal(ks[3], (n, D), jnp.float32).astype(table_dtype)
  down = (jax.random.normal(ks[4], (n, D), jnp.float32) / 8).astype(table_dtype)
  return x, idx, scores, up, down


def _tol(dtype):
  return dict(atol=2e-4, rtol=2e-4) if dtype == jnp.float32 else dict(atol=2e-3, rtol=2e-3)


def _close(a, b, **tol):
  chex.assert_trees_all_close(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), **tol)


@pytest.mark.parametrize("lead,h,k,table_dtype,activation", [
    ((2, 3), 2, 2, jnp.float32, "gelu_tanh"),    # leading [b, l]; T=6 pads to the block
    ((5,), 3, 1, jnp.bfloat16, "gelu"),          # k = 1, bf16 tables, exact gelu
])
def test_peer_dense_matches_reference(lead, h, k, table_dtype, activation):
  x, idx, scores, up, down = _inputs(lead, h, k, 6, table_dtype)
  dy = jax.random.normal(jax.random.key(9), lead + (D,))

  def run(fn):
    def f(x, scores, up, down):
      return fn(x, idx, scores, up, down, activation=activation)
    y, vjp = jax.vjp(f, x, scores, up, down)
    return y, vjp(dy)

  got = run(lambda *a, **kw: lookup_tpu.lookup(*a, interpret=PARAMS, **kw))
  want = run(lookup_xla.lookup)
  _close(got[0], want[0], **_tol(table_dtype))
  for g, w in zip(got[1], want[1]):
    chex.assert_equal(g.dtype, w.dtype)
    # bf16 table grads: the reference scatter-adds in bf16, the kernels sum in f32
    _close(g, w, **(_tol(g.dtype) if g.dtype == jnp.float32 else dict(atol=0.1, rtol=0.05)))
  if table_dtype != jnp.float32:   # the exact semantics: f32 sums, one final rounding
    exact = run(lookup_vjp.make_lookup(reference.LOOKUP_PIECES)[0])
    for g, w in zip(got[1][2:], exact[1][2:]):
      _close(g, w, atol=1e-2, rtol=1e-2)


def test_pkm_dense_bf16_matches_reference():
  """PKM (x, down None), bf16 table; PKM with f32 tables runs in the sparse test."""
  _, idx, scores, up, _ = _inputs((9,), 2, 2, 6, jnp.bfloat16, seed=1)
  dy = jax.random.normal(jax.random.key(8), (9, D))

  def run(fn):
    y, vjp = jax.vjp(lambda s, u: fn(None, idx, s, u), scores, up)
    return y, vjp(dy)

  got = run(lambda *a: lookup_tpu.lookup(*a, interpret=PARAMS))
  want = run(lookup_xla.lookup)
  exact = run(lookup_vjp.make_lookup(reference.LOOKUP_PIECES)[0])
  _close(got[0], want[0], **_tol(jnp.bfloat16))
  _close(got[1][0], want[1][0], **_tol(jnp.bfloat16))
  chex.assert_equal(got[1][1].dtype, jnp.bfloat16)
  _close(got[1][1], want[1][1], atol=0.1, rtol=0.05)    # reference sums in bf16
  _close(got[1][1], exact[1][1], atol=1e-2, rtol=1e-2)  # f32 sums, one rounding


@pytest.mark.parametrize("peer", [True, False])
def test_sparse_taps_match_reference_and_dense(peer):
  lead, h, k, n = (2, 3), 2, 2, 16          # U = min(12, 16) = 12 slots, some are padding
  x, idx, scores, up, down = _inputs(lead, h, k, n, jnp.float32, seed=2)
  down = down if peer else None
  x = x if peer else None
  u = unique_rows(idx, n)
  taps = (jnp.zeros((u.shape[0], D)) if peer else None, jnp.zeros((u.shape[0], D)))
  act = "relu"

  def loss(fn, taps, scores):
    return jnp.sum(jnp.sin(fn(x, idx, scores, up, down, taps, activation=act)))

  got = jax.grad(lambda t, s: loss(lambda *a, **kw: lookup_tpu.lookup_sparse(
      *a, interpret=PARAMS, **kw), t, s), argnums=(0, 1))(taps, scores)
  want = jax.grad(lambda t, s: loss(lookup_xla.lookup_sparse, t, s),
                  argnums=(0, 1))(taps, scores)
  chex.assert_trees_all_close(got, want, atol=2e-4, rtol=2e-4)

  # the tap gradients are the dense table gradients at the unique rows (0 at padding)
  dense = jax.grad(lambda up, down: jnp.sum(jnp.sin(lookup_xla.lookup(
      x, idx, scores, up, down, activation=act))), argnums=(0, 1))(up, down)
  real = (u < n)[:, None]
  for tap_grad, table_grad in zip((got[0][1], got[0][0]), dense):
    if table_grad is None:
      continue
    _close(tap_grad, jnp.where(real, table_grad[jnp.minimum(u, n - 1)], 0.0),
           atol=2e-4, rtol=2e-4)


def test_row_backward_matches_jax_piece():
  """Dense and compact row pass, runs longer than the SMEM block (M > block)."""
  t, hk, n = 40, 4, 7                       # M = 160 > 128 entries per block; 7 rows
  idx = jax.random.randint(jax.random.key(3), (t, hk), 0, n)
  plan = row_plan(idx, n)
  vectors = jax.random.normal(jax.random.key(4), (t, D))
  coefs = jax.random.normal(jax.random.key(5), (t * hk,))
  pieces = lookup_tpu.kernels(PARAMS)
  for dense in (True, False):
    got = pieces.row_backward(plan, vectors, coefs, n, dense)
    want = reference.LOOKUP_PIECES.row_backward(plan, vectors, coefs, n, dense)
    chex.assert_shape(got, want.shape)
    _close(got, want, atol=1e-4, rtol=1e-4)


def test_unsupported_shapes_are_clear_errors():
  idx = jnp.zeros((4, 2, 2), jnp.int32)
  with pytest.raises(ValueError, match="multiple of 128"):
    lookup_tpu.lookup(None, idx, jnp.ones((4, 2, 2)), jnp.ones((8, 96)), interpret=PARAMS)
  with pytest.raises(ValueError, match="even number of rows"):
    lookup_tpu.lookup(None, idx, jnp.ones((4, 2, 2)), jnp.ones((7, D), jnp.bfloat16),
                      interpret=PARAMS)


# ------------------------------------------------------------- real TPU compiles (libtpu)

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed")


def _grad_fn(lookup, mesh, peer=True):
  def f(x, idx, scores, up, down):
    def loss(x, scores, up, down):
      return lookup(x, idx, scores, up, down, activation="gelu").astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, scores, up, down)
  # Mosaic calls are not auto-partitioned: run one copy per device (replicated inputs).
  return jax.shard_map(f, mesh=mesh, in_specs=(P(),) * 5, out_specs=P(), check_vma=False)


@needs_libtpu
@pytest.mark.parametrize("topology,table_dtype", [
    ("v5e:2x2", jnp.float32), ("v5p:2x2x1", jnp.float32), ("v5p:2x2x1", jnp.bfloat16)])
def test_compiles_for_tpu_without_per_retrieval_rows(topology, table_dtype):
  t, h, k, n, d = 1024, 8, 16, 65536, 1024
  mesh = Mesh(np.array(aot.topology_devices(topology)), ("x",))
  sds = jax.ShapeDtypeStruct
  args = (sds((t, d), jnp.float32), sds((t, h, k), jnp.int32), sds((t, h, k), jnp.float32),
          sds((n, d), table_dtype), sds((n, d), table_dtype))
  compiled = aot.compile_for_tpu(_grad_fn(lookup_tpu.lookup, mesh), *args, topology=topology)
  temp = aot.memory(compiled)["temp"]
  one_rows_tensor = t * h * k * d * 4                   # [T, H, d] f32 = 512 MiB
  # f32: a few MiB; bf16: + the f32 [N, d] table gradient before its cast (256 MiB)
  allowed = 16 * 2**20 + (n * d * 4 if table_dtype == jnp.bfloat16 else 0)
  assert temp < allowed < one_rows_tensor, (topology, temp)


def _report(topology="v5p:2x2x1", t=8192, h=8, k=16, n=1024 ** 2, d=1024):
  """Per-device temp memory and compile time of fwd+bwd: kernels vs the reference."""
  import time
  mesh = Mesh(np.array(aot.topology_devices(topology)), ("x",))
  sds = jax.ShapeDtypeStruct
  for dtype in (jnp.float32, jnp.bfloat16):
    args = (sds((t, d), jnp.float32), sds((t, h, k), jnp.int32), sds((t, h, k), jnp.float32),
            sds((n, d), dtype), sds((n, d), dtype))
    for name, fn in (("lookup_tpu", lookup_tpu.lookup), ("reference", lookup_xla.lookup)):
      t0 = time.time()
      mem = aot.memory(aot.compile_for_tpu(_grad_fn(fn, mesh), *args, topology=topology))
      print(f"{topology} PEER T={t} H={h * k} d={d} N={n} {jnp.dtype(dtype).name} tables "
            f"{name}: temp {mem['temp'] / 2**20:.1f} MiB (args {mem['argument'] / 2**20:.0f} "
            f"MiB), compile {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":   # JAX_PLATFORMS=cpu python tests/kernels/test_lookup_tpu.py
  _report()
