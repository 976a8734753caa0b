"""Expert usage statistics from accumulated router scores (PEER paper §3.4).

Evaluation sums each layer's ``aux.counts['score_sum']`` (``[N]`` router scores per expert)
over a dataset on device; ``moejax.evaluation.expert_stats`` then reports per layer:

* usage      = fraction of experts whose accumulated score is non-zero;
* unevenness = KL(z ‖ uniform over N) with z = accumulated scores normalised to sum 1
  (0·log 0 = 0), i.e. log N − H(z): 0 for perfectly even use, log N when one expert
  takes everything.

Both functions are pure and jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def usage(score_sum: jax.Array) -> jax.Array:
  """Fraction of experts with non-zero accumulated score."""
  return jnp.mean((score_sum > 0).astype(jnp.float32))


def unevenness(score_sum: jax.Array) -> jax.Array:
  """KL(z ‖ uniform) = Σ z_i log(N z_i) with z = score_sum / Σ score_sum; 0·log 0 = 0.

  Returns 0 when nothing was accumulated.
  """
  s = jnp.maximum(score_sum.astype(jnp.float32), 0.0)
  n = s.shape[-1]
  total = jnp.sum(s, axis=-1, keepdims=True)
  z = s / jnp.where(total > 0, total, 1.0)
  terms = jnp.where(z > 0, z * jnp.log(jnp.where(z > 0, z, 1.0) * n), 0.0)
  return jnp.sum(terms, axis=-1)
