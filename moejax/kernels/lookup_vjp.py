"""The lookup's forward / backward structure, shared by every kernel backend.

A backend supplies three pieces (:class:`LookupKernels`) on token-flattened arrays
(T tokens, H = h·k retrievals per token, M = T·H):

* ``forward(x, idx, scores, up, down, activation) -> y [T, d]``
    PEER ``y_t = Σ_j scores[t,j] · σ(x_t · down[idx[t,j]]) · up[idx[t,j]]``; PKM
    (``down`` and ``x`` None) ``y_t = Σ_j scores[t,j] · up[idx[t,j]]``.
* ``token_backward(x, idx, scores, up, down, dy, activation) -> (dx, dscores, alpha, beta)``
    pass 1, token-major: regathers the rows of each token and returns ``dx [T, d]`` (None
    for PKM), ``dscores [T, H]`` and the per-retrieval row coefficients: the gradient of
    row ``down[idx[t,j]]`` is ``alpha[t,j] · x_t`` (None for PKM), that of ``up[idx[t,j]]``
    is ``beta[t,j] · dy_t``.
* ``row_backward(plan, vectors, coefs, num_rows, dense, out_dtype) -> [N or U, d]``
    pass 2, row-major: for each distinct row ``u`` of ``plan``,
    ``G[u] = Σ_{e in run u} coefs[e] · vectors[e // H]`` (``coefs [M]`` flat in retrieval
    order), written at ``plan.unique[u]`` of a zero ``[N, d]`` gradient (``dense``) or as
    the compact ``[U, d]`` rows lazy Adam consumes. No atomics: each row is one sum in a
    fixed order (in f32; stored as ``out_dtype`` where the backend can, else f32).

so nothing of size ``[T, H, d]`` exists in forward or backward. :func:`make_lookup` turns
the pieces into ``lookup`` / ``lookup_sparse`` with the signatures of
:mod:`~moejax.kernels.lookup_xla`. :data:`moejax.kernels.reference.LOOKUP_PIECES` are the
pieces in plain JAX (they do build ``[M, d]`` temporaries): the oracle of this structure
and a model for kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.kernels import match_vma
from moejax.kernels.row_plan import row_plan


class LookupKernels(NamedTuple):
  forward: Callable
  token_backward: Callable
  row_backward: Callable


# --------------------------------------------------------------------------- the glue


def _flatten(x, indices, scores):
  lead = indices.shape[:-2]
  t = 1
  for s in lead:
    t *= s
  hh = indices.shape[-2] * indices.shape[-1]
  xf = None if x is None else x.reshape(t, x.shape[-1])
  return lead, xf, indices.reshape(t, hh).astype(jnp.int32), scores.reshape(t, hh)


def make_lookup(kernels: LookupKernels):
  """(lookup, lookup_sparse) built on ``kernels``; see lookup_xla for the contract."""

  def forward(x, indices, scores, up, down, activation):
    lead, xf, idx, sc = _flatten(x, indices, scores)
    y = kernels.forward(xf, idx, sc, up, down, activation)
    return y.reshape(lead + (up.shape[-1],))

  def backward(x, indices, scores, up, down, dy, activation, dense):
    lead, xf, idx, sc = _flatten(x, indices, scores)
    dyf = dy.reshape(-1, dy.shape[-1])
    dx, dsc, alpha, beta = kernels.token_backward(xf, idx, sc, up, down, dyf, activation)
    plan = row_plan(idx, up.shape[0])
    out_dtype = up.dtype if dense else jnp.float32
    d_up = kernels.row_backward(plan, dyf, beta.reshape(-1), up.shape[0], dense, out_dtype)
    d_down = None if down is None else kernels.row_backward(
        plan, xf, alpha.reshape(-1), up.shape[0], dense, out_dtype)
    dx = None if dx is None else dx.reshape(x.shape).astype(x.dtype)
    return dx, dsc.reshape(scores.shape).astype(scores.dtype), d_up, d_down, plan.unique

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def _dense(x, indices, scores, up, down, activation):
    return forward(x, indices, scores, up, down, activation)

  def _dense_fwd(x, indices, scores, up, down, activation):
    return forward(x, indices, scores, up, down, activation), (x, indices, scores, up, down)

  def _dense_bwd(activation, res, dy):
    x, indices, scores, up, down = res
    dx, dsc, d_up, d_down, _ = backward(x, indices, scores, up, down, dy, activation, True)
    return (None if x is None else match_vma(dx, x), None, match_vma(dsc, scores),
            match_vma(d_up.astype(up.dtype), up),
            None if down is None else match_vma(d_down.astype(down.dtype), down))

  _dense.defvjp(_dense_fwd, _dense_bwd)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
  def _sparse(x, indices, scores, up, down, tap_up, tap_down, rows, activation, own_rows):
    del tap_up, tap_down, rows   # gradient sinks: zeros, values not read
    return forward(x, indices, scores, up, down, activation)

  def _sparse_fwd(x, indices, scores, up, down, tap_up, tap_down, rows, activation, own_rows):
    return (forward(x, indices, scores, up, down, activation),
            (x, indices, scores, up, down, tap_up, tap_down, rows))

  def _sparse_bwd(activation, own_rows, res, dy):
    x, indices, scores, up, down, tap_up, tap_down, rows = res
    dx, dsc, d_up, d_down, plan_unique = backward(x, indices, scores, up, down, dy, activation,
                                                  False)
    if own_rows:   # the taps' slots are this call's distinct rows: the compact grads as they are
      place = lambda g, tap: match_vma(g.astype(tap.dtype), tap)
    else:
      # The taps' slots are ``rows`` (e.g. of the whole batch when this call is one batch
      # shard): place this call's compact rows there; the shards' cotangents are summed.
      slots = jnp.searchsorted(rows, plan_unique)
      place = lambda g, tap: match_vma(jnp.zeros(tap.shape, jnp.float32).at[slots].add(
          g.astype(jnp.float32), mode="drop").astype(tap.dtype), tap)
    return (None if x is None else match_vma(dx, x), None, match_vma(dsc, scores),
            jnp.zeros_like(up), None if down is None else jnp.zeros_like(down),
            place(d_up, tap_up), None if tap_down is None else place(d_down, tap_down), None)

  _sparse.defvjp(_sparse_fwd, _sparse_bwd)

  def lookup(x, indices, scores, up, down=None, *, activation="gelu_tanh"):
    return _dense(x, indices, scores, up, down, activation)

  def lookup_sparse(x, indices, scores, up, down, taps, *, activation="gelu_tanh", rows=None):
    tap_down, tap_up = taps
    own_rows = rows is None
    if own_rows:
      rows = jnp.zeros((0,), jnp.int32)    # unused: the slots are this call's distinct rows
    return _sparse(x, indices, scores, up, down, tap_up, tap_down, rows, activation, own_rows)

  return lookup, lookup_sparse
