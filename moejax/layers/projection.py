"""Projections of token activations by a weight.

Every dense projection of the model (FFN, attention q/k/v/o, query networks, router,
vocabulary) goes through :func:`project` (and a hand-written backward through
:func:`project_back` / :func:`weight_grad`): one einsum (``dot_general``) over the natural
shapes, or the target platform's layout of the same product (registry operation
``projection``; the CPU backend's flattens to 2-D matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels import registry


def _check(x, w_in, in_dims, what):
  if x.shape[x.ndim - in_dims:] != tuple(w_in):
    raise ValueError(f"{what}: x {x.shape} does not end with the weight's dims {tuple(w_in)}")


def project(x: jax.Array, w: jax.Array, *, in_dims: int = 1, preferred_element_type=None
            ) -> jax.Array:
  """``x [..., *w.shape[:in_dims]]`` · ``w`` -> ``[..., *w.shape[in_dims:]]``.

  ``in_dims``: how many trailing dims of ``x`` (= leading dims of ``w``) are contracted,
  e.g. 2 for an attention output ``[b, l, heads, head_dim]`` · ``[heads, head_dim, d]``.
  """
  w_in = w.shape[:in_dims]
  _check(x, w_in, in_dims, "project")
  platform = registry.find("projection")
  if platform is not None:
    return platform.project(x, w, in_dims=in_dims, preferred_element_type=preferred_element_type)
  return jnp.tensordot(x, w, axes=in_dims, preferred_element_type=preferred_element_type)


def project_back(dy: jax.Array, w: jax.Array, *, in_dims: int = 1, preferred_element_type=None
                 ) -> jax.Array:
  """The input gradient of :func:`project` by hand: ``dy [..., *out]`` · ``wᵀ`` ->
  ``[..., *w.shape[:in_dims]]`` (no transposed copy of ``w`` is made)."""
  w_out = w.shape[in_dims:]
  _check(dy, w_out, len(w_out), "project_back")
  platform = registry.find("projection")
  if platform is not None:
    return platform.project_back(dy, w, in_dims=in_dims,
                                 preferred_element_type=preferred_element_type)
  lead = dy.shape[:dy.ndim - len(w_out)]
  out_axes = tuple(range(in_dims, w.ndim))
  dims = ((tuple(range(len(lead), dy.ndim)), out_axes), ((), ()))
  return jax.lax.dot_general(dy, w, dims, preferred_element_type=preferred_element_type)


def weight_grad(x: jax.Array, dy: jax.Array, *, in_dims: int = 1, preferred_element_type=None
                ) -> jax.Array:
  """The weight gradient of :func:`project` by hand: ``Σ_tokens x ⊗ dy``,
  ``x [..., *in]``, ``dy [..., *out]`` (same leading dims) -> ``[*in, *out]``."""
  n_lead = x.ndim - in_dims
  lead = x.shape[:n_lead]
  if dy.shape[:n_lead] != lead:
    raise ValueError(f"weight_grad: x {x.shape} and dy {dy.shape} differ in their token dims")
  platform = registry.find("projection")
  if platform is not None:
    return platform.weight_grad(x, dy, in_dims=in_dims,
                                preferred_element_type=preferred_element_type)
  dims = ((tuple(range(n_lead)), tuple(range(n_lead))), ((), ()))
  return jax.lax.dot_general(x, dy, dims, preferred_element_type=preferred_element_type)
