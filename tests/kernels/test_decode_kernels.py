"""The CPU backend's decoding kernels (``cpu_decode.cc``) against the XLA programs they
replace: the few-row matmul (``x @ w``) and the attention of a few queries over a KV cache,
at shapes with vector tails, grouped-query heads and masks that leave a query nothing; and
its blocked argmax against ``jnp.argmax`` (ties, NaN, a partial last block)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.backends.cpu import native


@pytest.fixture(autouse=True)
def _kernels_built():
  assert native.available(), "the C++ CPU kernels did not build"


@pytest.mark.parametrize("n,d,c", [(1, 5, 7), (3, 40, 37), (8, 64, 1000), (16, 17, 130)])
def test_few_row_matmul_is_the_matmul(n, d, c):
  x = jax.random.normal(jax.random.key(0), (n, d))
  w = jax.random.normal(jax.random.key(1), (d, c))
  got = native.few_row_matmul(x, w)
  chex.assert_trees_all_close(got, jnp.dot(x, w, precision="highest"), atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(native.few_row_matmul(x, w)), np.asarray(got))


@pytest.mark.parametrize("n,h,kv,dh,t", [(1, 8, 2, 64, 192), (2, 4, 4, 20, 33),
                                         (4, 6, 1, 16, 7)])
def test_cached_attention_is_dot_product_attention(n, h, kv, dh, t):
  ks = jax.random.split(jax.random.key(2), 4)
  b = 3
  q = jax.random.normal(ks[0], (b, n, h, dh))
  k, v = (jax.random.normal(kk, (b, t, kv, dh)) for kk in ks[1:3])
  mask = jax.random.bernoulli(ks[3], 0.6, (b, n, t))
  mask = mask.at[1, 0].set(False)       # a query that attends to nothing: every slot
  got = native.cached_attention(q, k, v, mask)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
  chex.assert_trees_all_close(got, want, atol=2e-6, rtol=2e-5)
  assert float(jnp.abs(got[1, 0] - v[1].mean(0).repeat(h // kv, 0)).max()) < 1e-5


@pytest.mark.parametrize("shape", [(8, 32000), (3, 1000), (2, 5, 300), (7,), (4, 129)])
def test_blocked_argmax_is_argmax(shape):
  """Ties, +inf, a row of -inf, a partial last block: jnp.argmax's indices; a row holding
  NaN: an index in range."""
  from moejax.backends.cpu import argmax
  x = jax.random.normal(jax.random.key(3), shape)
  x = jnp.round(x * 2) / 2                                  # many ties
  flat = x.reshape(-1, shape[-1])
  if flat.shape[0] > 2:
    flat = flat.at[1, -1].set(jnp.inf).at[1, 2].set(jnp.inf)
    flat = flat.at[0].set(-jnp.inf)                         # a row of -inf: index 0
  got = jax.jit(argmax.argmax)(flat.reshape(shape))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(flat.reshape(shape), -1)))
  nan_row = jax.jit(argmax.argmax)(flat[-1:].at[0, 1].set(jnp.nan))
  assert 0 <= int(nan_row[0]) < shape[-1]
