"""Dense projections flattened to 2-D matmuls on XLA:CPU (registry operation ``projection``).

Every dense projection of the model (``moejax.layers.projection``) runs here on CPU: the
leading token dims (``[batch, length, ...]``) flattened into one and the weight into
``[in, out]``, so that the product and both its gradients are plain ``[tokens, in] @ [in,
out]`` matmuls. Written as an einsum over ``[batch, length, d]``, the *weight* gradient
contracts two axes (batch and length), which XLA:CPU runs as a generic tensor contraction,
much slower than its matmul (``benchmarks/RESULTS.md`` has the measurement).

TPU and GPU keep the einsums: their compilers contract several axes natively, and on TPU
the reshapes are not free (merging ``[heads, head_dim]`` changes the tiled layout: the
flattened Switch-Base train step compiles for v5p to more bytes accessed and more
temporaries, ``python -m moejax.compile``). Shapes are checked by the caller.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.backends.cpu import native
from moejax.kernels import activations as act_lib

# The most tokens whose projections take the native few-row matmul (decoding's batch): it
# streams the weight once and adds it into every row, which outruns XLA's matmul only
# while the rows' arithmetic stays below the weight's reading time.
FEW_ROWS = 16


def project(x, w, *, in_dims=1, preferred_element_type=None):
  w_in, w_out = w.shape[:in_dims], w.shape[in_dims:]
  lead = x.shape[:x.ndim - in_dims]
  x2 = x.reshape(math.prod(lead), math.prod(w_in))
  w2 = w.reshape(math.prod(w_in), math.prod(w_out))
  if (x2.shape[0] <= FEW_ROWS and preferred_element_type in (None, jnp.float32)
      and native.usable("few_row_matmul", x2, w2)):
    y = _few_row_matmul(x2, w2)
  else:
    y = jnp.dot(x2, w2, preferred_element_type=preferred_element_type)
  return y.reshape(lead + w_out)


@jax.custom_vjp
def _few_row_matmul(x, w):
  """``x [N, D] @ w [D, C]`` by the native kernel (no backward of its own); its gradients
  are XLA's matmuls ``dy wᵀ`` and ``xᵀ dy``."""
  return native.few_row_matmul(x, w)


def _few_row_matmul_fwd(x, w):
  return native.few_row_matmul(x, w), (x, w)


def _few_row_matmul_bwd(res, dy):
  x, w = res
  return dy @ w.T, x.T @ dy


_few_row_matmul.defvjp(_few_row_matmul_fwd, _few_row_matmul_bwd)


def project_back(dy, w, *, in_dims=1, preferred_element_type=None):
  w_in, w_out = w.shape[:in_dims], w.shape[in_dims:]
  lead = dy.shape[:dy.ndim - len(w_out)]
  t, i, o = math.prod(lead), math.prod(w_in), math.prod(w_out)
  dx = jax.lax.dot_general(dy.reshape(t, o), w.reshape(i, o), (((1,), (1,)), ((), ())),
                           preferred_element_type=preferred_element_type)
  return dx.reshape(lead + w_in)


def weight_grad(x, dy, *, in_dims=1, preferred_element_type=None):
  n_lead = x.ndim - in_dims
  t = math.prod(x.shape[:n_lead])
  g = jax.lax.dot_general(x.reshape(t, -1), dy.reshape(t, -1), (((0,), (0,)), ((), ())),
                          preferred_element_type=preferred_element_type)
  return g.reshape(x.shape[n_lead:] + dy.shape[n_lead:])


def ffn_hidden(x, wi, wg, activation):
  """The dense FFN's ``act(x·wi) [* x·wg]`` (registry ``ffn.hidden``), flattened once to
  ``[tokens, embed]`` so that the activation runs on 2-D tiles and fuses with no bitcasts
  in between, with its one-pass backward (``activations.glu``), which runs faster than
  autodiff's here."""
  lead = x.shape[:-1]
  xt = x.reshape(-1, x.shape[-1])
  a = project(xt, wi)
  b = None if wg is None else project(xt, wg)
  return act_lib.glu(activation, a, b).reshape(lead + a.shape[-1:])
