"""Expert usage statistics from accumulated router scores (PEER paper §3.4).

Evaluation sums each layer's ``aux.counts['score_sum']`` (``[N]`` router scores per expert)
over a dataset on device, then calls :func:`summarize`:

* usage      = fraction of experts whose accumulated score is non-zero;
* unevenness = KL(z ‖ uniform over N) with z = accumulated scores normalised to sum 1
  (0·log 0 = 0), i.e. log N − H(z): 0 for perfectly even use, log N when one expert
  takes everything.

All functions are pure and jit-able (``summarize`` returns Python floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def accumulate(total: Any, counts: Any) -> Any:
  """Adds a batch's counts (any pytree of arrays) into running totals (None to start)."""
  if total is None:
    return jax.tree.map(lambda c: c.astype(jnp.float32), counts)
  return jax.tree.map(lambda t, c: t + c.astype(jnp.float32), total, counts)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flatten(v, f"{prefix}/{i}" if prefix else str(i)))
    return out
  return {prefix: tree}


def summarize(counts: Any, keys: tuple[str, ...] = ("score_sum", "load")) -> dict[str, float]:
  """Usage / unevenness of every per-expert array in ``counts``.

  ``counts`` is a (nested) mapping, e.g. ``{'block_6': {'score_sum': [N]}}`` as summed by
  evaluation. For each leaf whose last name is in ``keys`` it returns
  ``{'<path>/usage': .., '<path>/unevenness': .., '<path>/num_experts': ..}`` (path without
  the leaf name when that is 'score_sum', the PEER paper's statistic).
  """
  out: dict[str, float] = {}
  for path, arr in _flatten(counts).items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf not in keys or arr is None or jnp.ndim(arr) != 1:
      continue
    parent = path[: -len(leaf)]                       # '' or 'a/b/'
    prefix = parent if leaf == "score_sum" else f"{path}_"
    name = lambda stat: f"{prefix}{stat}"  # noqa: E731
    out[name("usage")] = float(usage(arr))
    out[name("unevenness")] = float(unevenness(arr))
    out[name("num_experts")] = float(jnp.shape(arr)[0])
  return out
