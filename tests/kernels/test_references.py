"""The plain-JAX references: product-key top-k == exhaustive top-k over all N keys; the
gathered contractions' VJPs; per-row score sums."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import enable_x64
from jax.test_util import check_grads

from moejax.backends.cpu import native as cpu_kernels
from moejax.kernels import lookup_xla as lr
from moejax.kernels import retrieval_xla as pk
from moejax.kernels import reference
from moejax.layers import table_mix
from moejax.layers.base import masked_mean


def _inputs(seed, n, h, hk, d, batch=(3, 5)):
  kq, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (*batch, h, d))
  keys1 = jax.random.normal(k1, (hk, n, d // 2))
  keys2 = jax.random.normal(k2, (hk, n, d // 2))
  return q, keys1, keys2


def _decomposed_brute(q, keys1, keys2, k):
  """All N scores as the same two half-sums the fast path adds (bitwise equal sums)."""
  d, n = q.shape[-1], keys1.shape[1]
  s1 = pk.half_scores(q[..., : d // 2], keys1)
  s2 = pk.half_scores(q[..., d // 2:], keys2)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
  return jax.lax.top_k(full, k)


def test_candidate_pairs_down_set():
  for k in (1, 2, 5, 16, 32):
    pa, pb = pk.candidate_pairs(k)
    assert np.all((pa + 1) * (pb + 1) <= k)
    assert len(pa) == sum(k // (a + 1) for a in range(k))
  assert len(pk.candidate_pairs(16)[0]) == 50


class TopKTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((8, 1, 1, False), (8, 8, 2, True), (16, 5, 3, False),
                            (32, 16, 2, True), (24, 7, 1, False))
  def test_topk_equals_brute_force(self, n, k, h, per_head):
    d = 8
    fast = self.variant(lambda q, a, b: pk.product_key_topk(q, a, b, k))
    for seed in range(3):
      q, keys1, keys2 = _inputs(seed, n, h, h if per_head else 1, d)
      s, i = fast(q, keys1, keys2)
      chex.assert_shape([s, i], (3, 5, h, k))
      assert i.dtype == jnp.int32
      # Same sums, every one of the N candidates: identical result.
      ds, di = _decomposed_brute(q, keys1, keys2, k)
      chex.assert_trees_all_close(s, ds, atol=0, rtol=0)
      np.testing.assert_array_equal(i, di)
      # Against the materialised N x d_key keys: scores equal; indices where no near-ties.
      bs, bi = reference.product_key_topk(q, keys1, keys2, k)
      chex.assert_trees_all_close(s, bs, atol=1e-4, rtol=1e-5)
      full = pk.half_scores(q, reference.full_product_keys(keys1, keys2))
      chex.assert_trees_all_close(jnp.take_along_axis(full, i, -1), s, atol=1e-4, rtol=1e-5)
      top = jax.lax.top_k(full, min(k + 1, n * n))[0]
      gaps = -jnp.diff(top, axis=-1).max(-1)                  # smallest gap, [3, 5, h]
      clear = np.asarray(gaps > 1e-3)
      assert clear.mean() > 0.3
      np.testing.assert_array_equal(np.sort(np.asarray(i), -1)[clear],
                                    np.sort(np.asarray(bi), -1)[clear])

  @chex.variants(with_jit=True, without_jit=True)
  def test_gather_contractions_values_and_grads(self):
    kt, ki, kx, kw = jax.random.split(jax.random.key(0), 4)
    table = jax.random.normal(kt, (20, 6))
    idx = jax.random.randint(ki, (2, 3, 2, 4), 0, 20)
    idx = idx.at[0, 0, 0, 1].set(idx[0, 0, 0, 0])        # a repeated row
    x = jax.random.normal(kx, (2, 3, 6))
    w = jax.random.normal(kw, (2, 3, 2, 4))
    dot = self.variant(lr.gather_dot)
    wsum = self.variant(lr.gather_weighted_sum)
    chex.assert_trees_all_close(dot(table, idx, x), jnp.einsum("bld,blhkd->blhk", x, table[idx]),
                                atol=1e-5)
    chex.assert_trees_all_close(wsum(table, idx, w),
                                jnp.einsum("blhk,blhkd->bld", w, table[idx]), atol=1e-5)
    with enable_x64():
      t64, x64, w64 = (a.astype(jnp.float64) for a in (table, x, w))
      check_grads(lambda t, x: lr.gather_dot(t, idx, x), (t64, x64), order=1, modes=("rev",))
      check_grads(lambda t, w: lr.gather_weighted_sum(t, idx, w), (t64, w64), order=1,
                  modes=("rev",))


def test_topk_bfloat16_queries_and_errors():
  q, keys1, keys2 = _inputs(0, 16, 2, 1, 8)
  s, i = pk.product_key_topk(q.astype(jnp.bfloat16), keys1, keys2, 4)
  assert s.dtype == jnp.float32
  with pytest.raises(ValueError):
    pk.product_key_topk(q, keys1, keys2, 17)
  with pytest.raises(ValueError):
    pk.product_key_topk(q[..., :7], keys1, keys2, 4)


def test_topk_score_gradients_match_brute_force():
  q, keys1, keys2 = _inputs(3, 16, 2, 2, 8)
  w = jax.random.normal(jax.random.key(9), (3, 5, 2, 4))

  def loss(fn):
    return lambda q, a, b: jnp.sum(w * fn(q, a, b, 4)[0])

  g_fast = jax.grad(loss(pk.product_key_topk), argnums=(0, 1, 2))(q, keys1, keys2)
  g_ref = jax.grad(loss(reference.product_key_topk), argnums=(0, 1, 2))(q, keys1, keys2)
  chex.assert_trees_all_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)


def test_topk_never_materialises_n_scores():
  """At N = 1024² the compiled retrieval needs far less memory than one float per key."""
  n, d = 1024, 32
  q = jax.ShapeDtypeStruct((4, 2, d), jnp.float32)
  keys = jax.ShapeDtypeStruct((1, n, d // 2), jnp.float32)
  compiled = jax.jit(lambda q, a, b: pk.product_key_topk(q, a, b, 16)).lower(q, keys, keys).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("no memory analysis on this backend")
  assert mem.temp_size_in_bytes < n * n * 4 // 16


def test_score_sum_and_masked_mean():
  idx = jnp.array([[[[0, 1]], [[1, 2]]]])                 # [1, 2, 1, 2]
  g = jnp.array([[[[0.75, 0.25]], [[0.5, 0.5]]]])
  mask = jnp.array([[True, False]])
  np.testing.assert_allclose(table_mix.score_sum(idx, g, 4), [0.75, 0.75, 0.5, 0.0])
  np.testing.assert_allclose(table_mix.score_sum(idx, g, 4, mask), [0.75, 0.25, 0.0, 0.0])
  np.testing.assert_allclose(masked_mean(g[..., 0], mask), 0.75)


@pytest.mark.parametrize("hk", [1, 2])
def test_chunked_rescore_vjp_equals_plain_vjp(hk):
  """The retrieval kernels' backward: gradients through the selected scores, chunked."""
  q, keys1, keys2 = _inputs(4, 16, 2, hk, 8, batch=(3, 7))
  _, i = pk.product_key_topk(q, keys1, keys2, 4)
  g = jax.random.normal(jax.random.key(5), i.shape)
  _, vjp = jax.vjp(lambda q, a, b: pk.rescore(q, a, b, i), q, keys1, keys2)
  want = vjp(g)
  for chunk in (1, 4, 21, 64):    # 21 tokens: exact, padded and single-chunk cases
    chex.assert_trees_all_close(pk.rescore_vjp(q, keys1, keys2, i, g, chunk_tokens=chunk),
                                want, atol=1e-5, rtol=1e-5)
  # On CPU the row kernels (no chunks) run instead of the chunked scan: both agree.
  rows = lambda *a, **kw: pk.rescore_vjp(*a, row_kernels=True, **kw)
  text = jax.jit(rows).lower(q, keys1, keys2, i, g).as_text()
  assert cpu_kernels.SCATTER_OUTER in text and cpu_kernels.GATHER_WEIGHTED_SUM in text
  with mock.patch.object(cpu_kernels, "usable", lambda *a: False):
    chunked = jax.jit(lambda *a: rows(*a, chunk_tokens=4))(q, keys1, keys2, i, g)
  chex.assert_trees_all_close(rows(q, keys1, keys2, i, g), chunked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("peer", [True, False], ids=["peer", "pkm"])
def test_tuned_lookups_equal_the_oracle(peer):
  """lookup_xla (the tuned XLA lookup, chunked, with the backend's row ops) and the lookup
  pieces glued by lookup_vjp equal kernels.reference.lookup: values and gradients w.r.t.
  x, scores and both tables (repeated rows included)."""
  from moejax.kernels import lookup_vjp
  ks = jax.random.split(jax.random.key(7), 5)
  n, d = 40, 16
  x = jax.random.normal(ks[0], (3, 5, d))
  idx = jax.random.randint(ks[1], (3, 5, 2, 4), 0, n).at[0, 0, 0, 1].set(3).at[0, 0, 0, 0].set(3)
  scores = jax.random.normal(ks[2], (3, 5, 2, 4))
  up = jax.random.normal(ks[3], (n, d))
  down = jax.random.normal(ks[4], (n, d)) if peer else None
  pieces, _ = lookup_vjp.make_lookup(reference.LOOKUP_PIECES)

  if peer:
    args, argnums = (x, scores, up, down), (0, 1, 2, 3)
  else:   # PKM: no x, no down
    args, argnums = (None, scores, up, None), (1, 2)

  def loss(fn):
    return lambda x, s, u, dn: jnp.sum(jnp.sin(fn(x, idx, s, u, dn, activation="gelu")))

  want = jax.grad(loss(reference.lookup), argnums=argnums)(*args)
  assert any(float(jnp.abs(g).max()) > 0 for g in want)
  for fn in (lr.lookup, pieces):
    chex.assert_trees_all_close(fn(*args[:1], idx, *args[1:], activation="gelu"),
                                reference.lookup(*args[:1], idx, *args[1:], activation="gelu"),
                                atol=1e-5, rtol=1e-5)
    got = jax.grad(loss(fn), argnums=argnums)(*args)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
