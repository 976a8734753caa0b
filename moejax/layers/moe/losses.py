"""Auxiliary losses and routing statistics (float32, padding tokens excluded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.layers.base import masked_mean


def load_balance_loss(probs: jax.Array, routed_fraction: jax.Array, mask: jax.Array) -> jax.Array:
  """Switch Transformer load balancing loss ``E * sum_e f_e * P_e`` (Fedus et al. 2021, eq. 4).

  Args:
    probs: float32 ``[groups, tokens, experts]`` router probabilities.
    routed_fraction: float32 ``[experts]`` f_e, the share of routed assignments that went
      to expert e before capacity dropping (for k > 1: all k choices, so sum_e f_e = 1).
    mask: bool ``[groups, tokens]``.

  ``P_e`` is the mean router probability of expert e over real tokens. Both are taken
  over the whole batch (not per group). Equals 1 when routing is uniform.
  """
  num_experts = probs.shape[-1]
  m = mask.astype(jnp.float32)[..., None]
  p = jnp.sum(probs * m, (0, 1)) / jnp.maximum(m.sum(), 1.0)
  return num_experts * jnp.sum(jax.lax.stop_gradient(routed_fraction) * p)


def z_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE, Zoph et al. 2022): mean over real tokens of ``logsumexp(logits)^2``."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return masked_mean(lse ** 2, mask)


def routing_metrics(load: jax.Array, token_kept: jax.Array, mask: jax.Array,
                    probs: jax.Array | None) -> dict[str, jax.Array]:
  """Scalar statistics of one batch.

  Args:
    load: float32 ``[experts]`` kept assignments per expert.
    token_kept: bool ``[groups, tokens]`` the token reached at least one expert.
    mask: bool ``[groups, tokens]``.
    probs: float32 ``[groups, tokens, experts]`` or None (hash routing).

  Returns:
    ``dropped_fraction`` (real tokens that reached no expert and pass through the
    residual only), ``load_cv`` (std / mean of ``load``), ``load_max_over_mean``, and
    ``router_confidence`` (mean top-1 probability) when there are probabilities.
  """
  mean = jnp.maximum(load.mean(), 1e-9)
  out = {
      "dropped_fraction": masked_mean(1.0 - token_kept.astype(jnp.float32), mask),
      "load_cv": jnp.std(load) / mean,
      "load_max_over_mean": load.max() / mean,
  }
  if probs is not None:
    out["router_confidence"] = masked_mean(probs.max(-1), mask)
  return out
