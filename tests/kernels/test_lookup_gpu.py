"""Triton Pallas lookup kernels (moejax.kernels.lookup_gpu).

Default suite (CPU): every kernel and the whole forward + backward lower for CUDA (PEER /
PKM, f32 / bf16, dense and row-sparse), with no ``[T, H, d]`` tensor in the program; the
same kernels run in Pallas interpret mode and equal the plain-JAX pieces / reference.

``@pytest.mark.gpu`` (run on a CUDA GPU: ``JAX_PLATFORMS=cuda pytest -m gpu``; the test
conftest defaults JAX_PLATFORMS to cpu): forward and every gradient (x, scores, up, down,
row-sparse taps) against ``lookup_xla`` and the plain-JAX pieces — PEER / PKM, each
activation, non-power-of-two shapes, duplicate and hot rows, k = 1, bf16, determinism.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import lookup_gpu as lg
from moejax.kernels import lookup_xla as lr
from moejax.kernels import lookup_vjp as lv
from moejax.kernels import reference
from moejax.kernels.row_plan import num_unique_slots, row_plan

ACTS = ("gelu_tanh", "relu", "gelu")
# Small blocks: several d chunks, unique-row blocks, entry chunks and column blocks.
SMALL = lg.GpuConfig(token_tile=256, rows_block=16, entries_block=16, cols_block=16)
JAX_LOOKUP, JAX_LOOKUP_SPARSE = lv.make_lookup(reference.LOOKUP_PIECES)


# ---------------------------------------------------------------------------- helpers


def _data(seed, lead, h, k, n, d, dtype=jnp.float32, peer=True, dups=False):
  """x, indices, scores, up, down (None for PKM), dy with O(1) pre-activations."""
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (*lead, d))
  idx = jax.random.randint(ks[1], (*lead, h, k), 0, n, dtype=jnp.int32)
  if dups and k > 1:   # the same row twice inside a token, and a row shared by all tokens
    idx = idx.at[..., 0, 1].set(idx[..., 0, 0])
    idx = idx.at[..., -1, -1].set(n - 1)
  sc = jax.random.normal(ks[2], (*lead, h, k))
  up = jax.random.normal(ks[3], (n, d))
  down = jax.random.normal(ks[4], (n, d)) / math.sqrt(d) if peer else None
  dy = jax.random.normal(ks[5], (*lead, d))
  cast = lambda a: None if a is None else a.astype(dtype)
  return cast(x) if peer else None, idx, cast(sc), cast(up), cast(down), cast(dy)


def _fwd_bwd(lookup, x, idx, sc, up, down, dy, act):
  """jit(y and the VJP of every differentiable input) of a dense ``lookup``."""
  if down is None:
    def f(sc, up):
      return lookup(None, idx, sc, up, None, activation=act)
    primals = (sc, up)
  else:
    def f(x, sc, up, down):
      return lookup(x, idx, sc, up, down, activation=act)
    primals = (x, sc, up, down)

  @jax.jit
  def run(*primals):
    y, vjp = jax.vjp(f, *primals)
    return (y, *vjp(dy.astype(y.dtype)))
  return run(*primals)


def _fwd_bwd_sparse(lookup_sparse, x, idx, sc, up, down, dy, act):
  """jit(y, d scores, d taps (and dx)) of ``lookup_sparse`` with zero taps."""
  u = num_unique_slots(idx.size, up.shape[0])
  taps = (None if down is None else jnp.zeros((u, down.shape[1]), down.dtype),
          jnp.zeros((u, up.shape[1]), up.dtype))

  def f(x, sc, taps):
    return lookup_sparse(x, idx, sc, up, down, taps, activation=act)

  @jax.jit
  def run(x, sc, taps):
    y, vjp = jax.vjp(f, x, sc, taps)
    dx, dsc, (dtd, dtu) = vjp(dy.astype(y.dtype))
    return y, dx, dsc, dtd, dtu
  return run(x, sc, taps)


def _reference(fn, *args):
  with jax.default_matmul_precision("highest"):
    return jax.block_until_ready(fn(*args))


def _close(got, want, tol, names=None):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, g.dtype, w.shape, w.dtype)
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    scale = max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale,
                               err_msg=f"output {names[i] if names else i}")


def _cuda_text(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _num_triton_calls(text):
  return len(re.findall(r"__gpu\$xla\.gpu\.triton|triton_kernel_call", text))


def _max_tensor_elems(text):
  best = 0
  for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", text):
    best = max(best, math.prod(int(v) for v in dims.rstrip("x").split("x")))
  return best


# ---------------------------------------------------------- lowering for CUDA (CPU)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("peer", [True, False], ids=["peer", "pkm"])
def test_pieces_lower_for_cuda(peer, dtype):
  x, idx, sc, up, down, dy = _data(0, (8,), 2, 3, 20, 24, dtype, peer)
  idx, sc = idx.reshape(8, 6), sc.reshape(8, 6)
  p = lg.GPU_PIECES
  text = _cuda_text(lambda x, sc, up, down: p.forward(x, idx, sc, up, down, "gelu_tanh"),
                    x, sc, up, down)
  assert _num_triton_calls(text) == 1
  text = _cuda_text(lambda x, sc, up, down, dy: p.token_backward(
      x, idx, sc, up, down, dy, "gelu"), x, sc, up, down, dy)
  assert _num_triton_calls(text) == 1
  for dense in (True, False):
    text = _cuda_text(lambda v, c: p.row_backward(row_plan(idx, 20), v, c, 20, dense),
                      dy, jnp.ones((48,), jnp.float32))
    assert _num_triton_calls(text) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("peer", [True, False], ids=["peer", "pkm"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_fwd_bwd_lowers_for_cuda_without_thd(peer, dtype, sparse):
  lead, h, k, n, d = (2, 4), 2, 3, 20, 24        # T·H·d = 1152 > N·d = 480
  x, idx, sc, up, down, dy = _data(0, lead, h, k, n, d, dtype, peer)
  if sparse:
    u = num_unique_slots(idx.size, n)
    taps = (jnp.zeros((u, d), dtype) if peer else None, jnp.zeros((u, d), dtype))

    def loss(x, sc, taps):
      y = lg.lookup_sparse(x, idx, sc, up, down, taps, activation="gelu")
      return jnp.sum(y.astype(jnp.float32) * dy)
    text = _cuda_text(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, sc, taps)
  else:
    def loss(x, sc, up, down):
      y = lg.lookup(x, idx, sc, up, down, activation="relu")
      return jnp.sum(y.astype(jnp.float32) * dy)
    argnums = (0, 1, 2, 3) if peer else (1, 2)
    text = _cuda_text(jax.value_and_grad(loss, argnums=argnums), x, sc, up, down)
  # forward, token backward, one row backward per table
  assert _num_triton_calls(text) == (4 if peer else 3)
  assert _max_tensor_elems(text) < math.prod(lead) * h * k * d


def test_non_power_of_two_lowers_for_cuda():
  x, idx, sc, up, down, dy = _data(1, (3, 5), 3, 5, 37, 72, jnp.bfloat16)

  def loss(x, sc, up, down):
    return jnp.sum(lg.lookup(x, idx, sc, up, down).astype(jnp.float32) * dy)
  text = _cuda_text(jax.grad(loss, argnums=(0, 1, 2, 3)), x, sc, up, down)
  assert _num_triton_calls(text) == 4


# ------------------------------------------------------ interpret mode on CPU


def test_kernel_erf_and_gelu():
  a = jnp.linspace(-6.0, 6.0, 2001)
  np.testing.assert_allclose(lg._erf(a), jax.lax.erf(a), atol=5e-7)
  f, df = lg.kernel_activation("gelu")
  np.testing.assert_allclose(f(a), jax.nn.gelu(a, approximate=False), atol=1e-6)
  np.testing.assert_allclose(
      df(a), jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(a), atol=1e-6)
  with pytest.raises(ValueError):
    lg.kernel_activation("swish")


@pytest.mark.parametrize("n", [3, 40], ids=["long_runs", "many_blocks"])
def test_interpret_pieces_equal_jax_pieces(n):
  t, h, d = 6, 6, 40
  p = lg.make_pieces(SMALL, interpret=True)
  j = reference.LOOKUP_PIECES
  x, idx, sc, up, down, dy = _data(2, (t,), 2, 3, n, d)
  idx, sc = idx.reshape(t, h), sc.reshape(t, h)
  for act, dn in (("gelu", down), ("relu", down), ("gelu_tanh", None)):
    _close(p.forward(x, idx, sc, up, dn, act), j.forward(x, idx, sc, up, dn, act), 1e-5)
    got = p.token_backward(x, idx, sc, up, dn, dy, act)
    want = j.token_backward(x, idx, sc, up, dn, dy, act)
    _close([g for g in got if g is not None], [w for w in want if w is not None], 1e-5)
    assert [g is None for g in got] == [w is None for w in want]
  plan = row_plan(idx, n)
  coefs = jax.random.normal(jax.random.key(3), (t * h,))
  for vec in (dy, dy.astype(jnp.bfloat16)):
    for dense in (True, False):
      _close(p.row_backward(plan, vec, coefs, n, dense),
             j.row_backward(plan, vec, coefs, n, dense), 1e-6)


def test_interpret_lookup_grads_equal_reference():
  lookup, lookup_sparse = lv.make_lookup(lg.make_pieces(SMALL, interpret=True))
  for peer in (True, False):
    x, idx, sc, up, down, dy = _data(4, (2, 3), 2, 3, 9, 20, peer=peer, dups=True)
    _close(_fwd_bwd(lookup, x, idx, sc, up, down, dy, "gelu_tanh"),
           _reference(_fwd_bwd, lr.lookup, x, idx, sc, up, down, dy, "gelu_tanh"), 1e-5)
  x, idx, sc, up, down, dy = _data(5, (5,), 1, 4, 7, 18, dups=True)
  _close(_fwd_bwd_sparse(lookup_sparse, x, idx, sc, up, down, dy, "relu"),
         _reference(_fwd_bwd_sparse, lr.lookup_sparse, x, idx, sc, up, down, dy, "relu"),
         1e-5)


# ------------------------------------------------------------------------ on a GPU


GPU_CASES = [
    # peer, activation, lead, h, k, n, d
    (True, "gelu_tanh", (3, 7), 2, 3, 50, 72),      # non-power-of-two T, H, d
    (True, "relu", (17,), 1, 1, 13, 16),             # k = 1, H = 1
    (True, "gelu", (4, 5), 4, 8, 5, 33),             # N = 5: every row repeated ~100x
    (False, "gelu_tanh", (2, 9), 2, 5, 40, 100),     # PKM
    (False, "gelu_tanh", (11,), 1, 1, 7, 48),        # PKM, k = 1
    (True, "gelu_tanh", (64,), 8, 16, 4096, 1024),   # the production H and d
]


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("peer,act,lead,h,k,n,d", GPU_CASES)
def test_gpu_lookup_equals_reference(peer, act, lead, h, k, n, d):
  x, idx, sc, up, down, dy = _data(10, lead, h, k, n, d, peer=peer, dups=True)
  got = _fwd_bwd(lg.lookup, x, idx, sc, up, down, dy, act)
  names = ["y", "dx", "dscores", "dup", "ddown"] if peer else ["y", "dscores", "dup"]
  _close(got, _reference(_fwd_bwd, lr.lookup, x, idx, sc, up, down, dy, act), 2e-5, names)
  _close(got, _reference(_fwd_bwd, JAX_LOOKUP, x, idx, sc, up, down, dy, act), 2e-5, names)
  # rows nobody retrieved get exactly zero
  untouched = np.setdiff1d(np.arange(n), np.asarray(idx).ravel())
  if untouched.size:
    assert not np.any(np.asarray(got[-1])[untouched])


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("peer", [True, False], ids=["peer", "pkm"])
def test_gpu_bf16(peer):
  x, idx, sc, up, down, dy = _data(11, (5, 13), 4, 6, 300, 96, jnp.bfloat16, peer, dups=True)
  got = _fwd_bwd(lg.lookup, x, idx, sc, up, down, dy, "gelu_tanh")
  # same math as the kernels (f32 inside, bf16 out): bf16 rounding apart
  _close(got, _reference(_fwd_bwd, JAX_LOOKUP, x, idx, sc, up, down, dy, "gelu_tanh"), 2e-2)
  # the bf16 reference rounds its intermediates too
  _close(got, _reference(_fwd_bwd, lr.lookup, x, idx, sc, up, down, dy, "gelu_tanh"), 1e-1)


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("peer", [True, False], ids=["peer", "pkm"])
def test_gpu_sparse_taps(peer, dtype):
  x, idx, sc, up, down, dy = _data(12, (6, 7), 2, 4, 60, 40, dtype, peer, dups=True)
  got = _fwd_bwd_sparse(lg.lookup_sparse, x, idx, sc, up, down, dy, "gelu")
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  _close(got, _reference(_fwd_bwd_sparse, JAX_LOOKUP_SPARSE, x, idx, sc, up, down, dy,
                         "gelu"), tol)
  _close(got, _reference(_fwd_bwd_sparse, lr.lookup_sparse, x, idx, sc, up, down, dy,
                         "gelu"), 2e-5 if dtype == jnp.float32 else 1e-1)


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
def test_gpu_hot_row_and_determinism():
  """Every retrieval of most tokens hits row 3: one run of ~10k entries (many chunks)."""
  x, idx, sc, up, down, dy = _data(13, (320,), 4, 8, 1000, 64)
  idx = jnp.where(jnp.arange(320)[:, None, None] % 5 == 0, idx, 3)
  a = _fwd_bwd(lg.lookup, x, idx, sc, up, down, dy, "gelu_tanh")
  b = _fwd_bwd(lg.lookup, x, idx, sc, up, down, dy, "gelu_tanh")
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))   # bitwise, no atomics
  _close(a, _reference(_fwd_bwd, JAX_LOOKUP, x, idx, sc, up, down, dy, "gelu_tanh"), 2e-5)


@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("config", [SMALL, lg.GpuConfig(token_warps=8, row_warps=8,
                                                         token_stages=2, row_stages=2)],
                         ids=["small_blocks", "8_warps"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_pieces_equal_jax_pieces(config, dtype):
  t, h, n, d = 45, 12, 70, 136
  p, j = lg.make_pieces(config), reference.LOOKUP_PIECES
  x, idx, sc, up, down, dy = _data(14, (t,), 3, 4, n, d, dtype)
  idx, sc = idx.reshape(t, h), sc.reshape(t, h)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  with jax.default_matmul_precision("highest"):
    for dn in (down, None):
      _close(jax.jit(p.forward, static_argnums=5)(x, idx, sc, up, dn, "gelu"),
             jax.jit(j.forward, static_argnums=5)(x, idx, sc, up, dn, "gelu"), tol)
      got = jax.jit(p.token_backward, static_argnums=6)(x, idx, sc, up, dn, dy, "gelu")
      want = jax.jit(j.token_backward, static_argnums=6)(x, idx, sc, up, dn, dy, "gelu")
      _close([g for g in got if g is not None], [w for w in want if w is not None], tol)
    plan = row_plan(idx, n)
    coefs = jax.random.normal(jax.random.key(3), (t * h,))
    for dense in (True, False):
      rb = jax.jit(p.row_backward, static_argnums=(3, 4))
      jb = jax.jit(j.row_backward, static_argnums=(3, 4))
      _close(rb(plan, dy, coefs, n, dense), jb(plan, dy, coefs, n, dense), 1e-5)
