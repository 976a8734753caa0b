"""Lazy (row-sparse) Adam against dense optax Adam and a per-row reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.training.row_sparse import adam_on_unique_rows

B1, B2, EPS, LR = 0.9, 0.98, 1e-8, 0.1


def dedupe_rows(indices, row_grads, num_rows):
  """Unique ids ``[M]`` of ``indices [M]`` (padded with ``num_rows``) and the summed
  gradients ``[M, d]`` of ``row_grads [M, d]`` (zeros in padding): the plain-JAX dedupe of
  this file's reference (the training step gets its rows from ``row_plan``)."""
  m = indices.shape[0]
  unique, inverse = jnp.unique(indices, size=m, fill_value=num_rows, return_inverse=True)
  return unique, jax.ops.segment_sum(row_grads, inverse.reshape(-1), num_segments=m)


def lazy_adam_rows(table, mu, nu, indices, row_grads, *, count, lr, b1, b2, eps):
  """One lazy-Adam step on the rows ``indices [...]`` with gradients ``row_grads [..., d]``
  (repeats summed): dedupe, then update those rows, as the training step does."""
  d = table.shape[-1]
  unique, g = dedupe_rows(indices.reshape(-1), row_grads.reshape(-1, d).astype(jnp.float32),
                          table.shape[0])
  return adam_on_unique_rows(table, mu, nu, unique, g, count=count, lr=lr, b1=b1, b2=b2, eps=eps)


def test_dedupe_sums_repeats():
  idx = jnp.array([3, 1, 3, 0, 1, 3])
  g = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))
  unique, summed = dedupe_rows(idx, g, num_rows=5)
  got = {int(u): float(s[0]) for u, s in zip(unique, summed) if u < 5}
  assert got == {0: 3.0, 1: 1.0 + 4.0, 3: 0.0 + 2.0 + 5.0}
  assert int(jnp.sum(unique == 5)) == 3   # padding slots


def _dense_grad(n, d, idx, rows):
  return jnp.zeros((n, d)).at[idx.reshape(-1)].add(rows.reshape(-1, d))


def test_first_step_equals_dense_adam():
  n, d = 16, 4
  key = jax.random.key(0)
  table = jax.random.normal(key, (n, d))
  idx = jax.random.randint(jax.random.key(1), (5, 3), 0, n)
  rows = jax.random.normal(jax.random.key(2), (5, 3, d))
  zeros = jnp.zeros_like(table)
  new, mu, nu = lazy_adam_rows(table, zeros, zeros, idx, rows, count=jnp.array(1), lr=LR,
                               b1=B1, b2=B2, eps=EPS)
  tx = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
  updates, _ = tx.update(_dense_grad(n, d, idx, rows), tx.init(table), table)
  chex.assert_trees_all_close(new, table + updates, atol=1e-6)


def test_untouched_rows_keep_their_moments():
  n, d = 8, 2
  table = jnp.ones((n, d))
  mu, nu = jnp.zeros_like(table), jnp.zeros_like(table)
  # Step 1 touches rows 0 and 1; step 2 touches only row 1.
  steps = [(jnp.array([0, 1]), jnp.ones((2, d))), (jnp.array([1]), 2 * jnp.ones((1, d)))]
  ref_t, ref_m, ref_v = np.ones((n, d)), np.zeros((n, d)), np.zeros((n, d))
  for t, (idx, g) in enumerate(steps, start=1):
    table, mu, nu = lazy_adam_rows(table, mu, nu, idx, g, count=jnp.array(t), lr=LR, b1=B1, b2=B2,
                                   eps=EPS)
    for i, row in zip(np.asarray(idx), np.asarray(g)):
      ref_m[i] = B1 * ref_m[i] + (1 - B1) * row
      ref_v[i] = B2 * ref_v[i] + (1 - B2) * row ** 2
      ref_t[i] -= LR * (ref_m[i] / (1 - B1 ** t)) / (np.sqrt(ref_v[i] / (1 - B2 ** t)) + EPS)
  chex.assert_trees_all_close((table, mu, nu), (ref_t, ref_m, ref_v), atol=1e-6)
  assert abs(float(mu[0, 0]) - (1 - B1)) < 1e-7        # row 0's moment did not decay at step 2
  np.testing.assert_array_equal(table[2:], 1.0)     # never-touched rows unchanged


def test_cost_does_not_grow_with_table_rows():
  """Compiled temp memory is the same for N = 2^10 and 2^16 (no [N, d] temporaries)."""
  def temp_bytes(n):
    d, m = 16, 64
    args = (jnp.zeros((n, d)),) * 3 + (jnp.zeros((m,), jnp.int32), jnp.zeros((m, d)))
    f = jax.jit(lambda t, mu, nu, i, g: lazy_adam_rows(t, mu, nu, i, g, count=jnp.array(1), lr=0.1,
                                                       b1=B1, b2=B2, eps=EPS), donate_argnums=(0, 1, 2))
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes
  small, large = temp_bytes(2 ** 10), temp_bytes(2 ** 16)
  assert large <= small + 4096, (small, large)
