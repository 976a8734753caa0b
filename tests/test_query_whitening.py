"""Query whitening (query_norm='whiten'): decorrelated queries, running statistics, usage."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.layers import query as pkq


def _low_rank_inputs(tokens=4096, d=64, rank=6, seed=0):
  """Inputs spanning ``rank`` directions of ``d`` plus a little noise: [1, tokens, d]."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  basis = jax.random.normal(k1, (rank, d))
  x = jax.random.normal(k2, (tokens, rank)) @ basis + 0.05 * jax.random.normal(k3, (tokens, d))
  return x[None]


def test_whitened_queries_have_identity_covariance_and_padding_is_ignored():
  norm = pkq.MaskedWhitening(2, 8, momentum=0.0, epsilon=1e-6)
  q = jax.random.normal(jax.random.key(1), (4, 64, 2, 8)) @ jax.random.normal(jax.random.key(2), (8, 8))
  mask = jnp.arange(64)[None, :] < jnp.array([[64], [40], [64], [10]])
  q = jnp.where(mask[..., None, None], q, 1e3)        # padding far away: must not count
  y = norm(q, mask)
  real = np.asarray(y)[np.asarray(mask)]               # [tokens, h, d]
  for h in range(2):
    cov = np.cov(real[:, h].T, bias=True)
    chex.assert_trees_all_close(cov, np.eye(8), atol=1e-3)
    chex.assert_trees_all_close(real[:, h].mean(0), np.zeros(8), atol=1e-4)
  # momentum 0: the running statistics are this batch's; eval mode reproduces training.
  norm.use_running_average = True
  chex.assert_trees_all_close(norm(q, mask)[np.asarray(mask)], real, atol=1e-4)


def test_whitening_passes_gradients_to_queries():
  norm = pkq.MaskedWhitening(1, 4, momentum=0.9)
  q = jax.random.normal(jax.random.key(0), (2, 16, 1, 4))
  g = jax.grad(lambda q: jnp.sum(nnx.clone(norm)(q) * jnp.arange(4.0)))(q)
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_whitening_raises_usage_on_low_rank_inputs():
  """Per-feature BatchNorm leaves low-rank queries correlated: few product keys are formed.
  Whitening the same queries forms about as many as isotropic inputs do."""
  def usage(x, norm):
    qn = pkq.ProductKeyQuery(64, num_keys_sqrt=32, heads=2, top_k=4, d_key=32, query_norm=norm,
                             rngs=nnx.Rngs(0))
    _, idx = qn(x)
    return np.unique(np.asarray(idx)).size / 32 ** 2

  low_rank = _low_rank_inputs()
  isotropic = jax.random.normal(jax.random.key(5), low_rank.shape)
  reference = usage(isotropic, "batch")
  assert usage(low_rank, "batch") < reference - 0.2
  assert usage(low_rank, "whiten") > reference - 0.05
