"""Projections of token activations by a weight, laid out for the platform's compiler.

Every dense projection of the model (FFN, attention q/k/v/o, query networks, router,
vocabulary) goes through :func:`project` (and a hand-written backward through
:func:`project_back` / :func:`weight_grad`).

* On CPU they flatten the leading token dims (``[batch, length, ...]``) into one and the
  weight into ``[in, out]``: the product and both its gradients are plain
  ``[tokens, in] @ [in, out]`` matmuls. Written as an einsum over ``[batch, length, d]``,
  the *weight* gradient contracts two axes (batch and length), which XLA:CPU runs as a
  generic tensor contraction instead of its matmul: a SwiGLU FFN's fwd+bwd at 4096 tokens,
  d = 512, hidden 2048 ran 1.86x faster flattened (15.3k vs 8.3k tokens/s, side by side on
  a 2-core Xeon; ``benchmarks/vs_pytorch.py``).
* On TPU and GPU they are the einsums they always were (one ``dot_general`` over the
  natural shapes). Their compilers contract several axes natively, and on TPU the
  reshapes are not free: merging ``[heads, head_dim]`` changes the tiled layout, and the
  flattened Switch-Base train step compiled for v5p:2x2x4 to 5% more bytes accessed and
  160 MB more temporaries (``python -m moejax.compile``). So the TPU program is unchanged.

The platform is :func:`moejax.kernels.current_platform`: the target while compiling for a
TPU from a CPU host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax import kernels


def _flatten() -> bool:
  return kernels.current_platform() == "cpu"


def _check(x, w_in, in_dims, what):
  if x.shape[x.ndim - in_dims:] != tuple(w_in):
    raise ValueError(f"{what}: x {x.shape} does not end with the weight's dims {tuple(w_in)}")


def project(x: jax.Array, w: jax.Array, *, in_dims: int = 1, preferred_element_type=None
            ) -> jax.Array:
  """``x [..., *w.shape[:in_dims]]`` · ``w`` -> ``[..., *w.shape[in_dims:]]``.

  ``in_dims``: how many trailing dims of ``x`` (= leading dims of ``w``) are contracted,
  e.g. 2 for an attention output ``[b, l, heads, head_dim]`` · ``[heads, head_dim, d]``.
  """
  w_in, w_out = w.shape[:in_dims], w.shape[in_dims:]
  _check(x, w_in, in_dims, "project")
  if not _flatten():
    return jnp.tensordot(x, w, axes=in_dims, preferred_element_type=preferred_element_type)
  lead = x.shape[:x.ndim - in_dims]
  y = jnp.dot(x.reshape(math.prod(lead), math.prod(w_in)),
              w.reshape(math.prod(w_in), math.prod(w_out)),
              preferred_element_type=preferred_element_type)
  return y.reshape(lead + w_out)


def project_back(dy: jax.Array, w: jax.Array, *, in_dims: int = 1, preferred_element_type=None
                 ) -> jax.Array:
  """The input gradient of :func:`project` by hand: ``dy [..., *out]`` · ``wᵀ`` ->
  ``[..., *w.shape[:in_dims]]`` (no transposed copy of ``w`` is made)."""
  w_in, w_out = w.shape[:in_dims], w.shape[in_dims:]
  _check(dy, w_out, len(w_out), "project_back")
  lead = dy.shape[:dy.ndim - len(w_out)]
  out_axes = tuple(range(in_dims, w.ndim))
  if not _flatten():
    dims = ((tuple(range(len(lead), dy.ndim)), out_axes), ((), ()))
    return jax.lax.dot_general(dy, w, dims, preferred_element_type=preferred_element_type)
  t, i, o = math.prod(lead), math.prod(w_in), math.prod(w_out)
  dx = jax.lax.dot_general(dy.reshape(t, o), w.reshape(i, o), (((1,), (1,)), ((), ())),
                           preferred_element_type=preferred_element_type)
  return dx.reshape(lead + w_in)


def weight_grad(x: jax.Array, dy: jax.Array, *, in_dims: int = 1, preferred_element_type=None
                ) -> jax.Array:
  """The weight gradient of :func:`project` by hand: ``Σ_tokens x ⊗ dy``,
  ``x [..., *in]``, ``dy [..., *out]`` (same leading dims) -> ``[*in, *out]``."""
  n_lead = x.ndim - in_dims
  lead = x.shape[:n_lead]
  if dy.shape[:n_lead] != lead:
    raise ValueError(f"weight_grad: x {x.shape} and dy {dy.shape} differ in their token dims")
  if not _flatten():
    dims = ((tuple(range(n_lead)), tuple(range(n_lead))), ((), ()))
    return jax.lax.dot_general(x, dy, dims, preferred_element_type=preferred_element_type)
  t = math.prod(lead)
  g = jax.lax.dot_general(x.reshape(t, -1), dy.reshape(t, -1), (((0,), (0,)), ((), ())),
                          preferred_element_type=preferred_element_type)
  return g.reshape(x.shape[n_lead:] + dy.shape[n_lead:])
