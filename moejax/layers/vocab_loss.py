"""A vocabulary cross-entropy that never holds the full ``[batch, length, vocab]`` logits.

The plain LM loss projects every token's final hidden state onto the vocabulary, keeps the
``[batch, length, vocab]`` float32 logits for the softmax, and autodiff keeps them (or the
softmax) again for the backward. At 128 x 2048 tokens and a 32k vocabulary that is 32 GiB
per copy. :func:`chunked_cross_entropy` walks the sequence in chunks of ``chunk_len``
positions (all of the batch at once, so the batch sharding is untouched): each chunk's
logits are made, reduced to a log-sum-exp and the target logit, and dropped. Its custom VJP
saves only the inputs and the per-token log-sum-exp ``[batch, length]`` and recomputes each
chunk's logits in the backward, accumulating ``dW`` over chunks. Peak logits memory is
``[batch, chunk_len, vocab]`` float32 in both passes.

Numerics: logits are ``x @ w`` accumulated in float32 (``preferred_element_type``); with
float32 inputs this is the plain loss to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.layers.projection import project, project_back, weight_grad


def chunk_length(batch: int, length: int, chunk_tokens: int) -> int:
  """Positions per chunk so that a chunk holds about ``chunk_tokens`` tokens of the batch."""
  return max(1, min(length, chunk_tokens // max(batch, 1)))


def _logits(x: jax.Array, w: jax.Array) -> jax.Array:
  z = project(x, w, preferred_element_type=jnp.float32)
  return sharding.constrain(z, ("batch", "length", "vocab"))


def _chunks(a: jax.Array, chunk_len: int) -> jax.Array:
  """``[b, l, ...]`` -> ``[n, b, chunk_len, ...]`` (l a multiple of chunk_len)."""
  b, l = a.shape[:2]
  a = a.reshape((b, l // chunk_len, chunk_len) + a.shape[2:])
  return jnp.moveaxis(a, 1, 0)


def _unchunk(a: jax.Array) -> jax.Array:
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape((a.shape[0], a.shape[1] * a.shape[2]) + a.shape[3:])


def _target_logit(z: jax.Array, t: jax.Array) -> jax.Array:
  return jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]


def _forward(x, w, targets, weights, chunk_len):
  """(sum of weighted CE, lse [b, l]) without the full logits."""

  def body(total, xs):
    xc, tc, wc = xs
    z = _logits(xc, w)
    lse = jax.nn.logsumexp(z, axis=-1)
    ce = lse - _target_logit(z, tc)
    return total + jnp.sum(ce * wc), lse

  total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (_chunks(x, chunk_len), _chunks(targets, chunk_len),
                             _chunks(weights.astype(jnp.float32), chunk_len)))
  return total, _unchunk(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(x, w, targets, weights, chunk_len):
  return _forward(x, w, targets, weights, chunk_len)[0]


def _fwd(x, w, targets, weights, chunk_len):
  total, lse = _forward(x, w, targets, weights, chunk_len)
  return total, (x, w, targets, weights, lse)


def _bwd(chunk_len, res, g):
  x, w, targets, weights, lse = res

  def body(dw, xs):
    xc, tc, wc, lc = xs
    z = _logits(xc, w)
    p = jnp.exp(z - lc[..., None])
    dz = p - jax.nn.one_hot(tc, z.shape[-1], dtype=jnp.float32)
    dz = dz * (wc * g)[..., None]
    dz = sharding.constrain(dz, ("batch", "length", "vocab"))
    dx = project_back(dz.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = dw + weight_grad(xc, dz.astype(xc.dtype), preferred_element_type=jnp.float32)
    return dw, dx

  dw, dx = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32),
                        (_chunks(x, chunk_len), _chunks(targets, chunk_len),
                         _chunks(weights.astype(jnp.float32), chunk_len), _chunks(lse, chunk_len)))
  return _unchunk(dx), dw.astype(w.dtype), None, jnp.zeros_like(weights)


_chunked_ce.defvjp(_fwd, _bwd)


def chunked_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                          *, chunk_tokens: int) -> jax.Array:
  """Sum over tokens of ``weights * CE(softmax(x @ w), targets)``, chunked over positions.

  Args:
    x: ``[batch, length, d]`` final hidden states (any float dtype).
    w: ``[d, vocab]`` output projection (same dtype as ``x``).
    targets: ``[batch, length]`` int; weights: ``[batch, length]`` (no gradient).
    chunk_tokens: about how many tokens (of the whole batch) one chunk holds.

  Returns:
    a float32 scalar; gradients flow to ``x`` and ``w``.
  """
  b, l = targets.shape
  c = chunk_length(b, l, chunk_tokens)
  pad = -l % c
  if pad:  # padded positions have weight 0
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  return _chunked_ce(x, w, targets.astype(jnp.int32), weights, c)


def plain_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array
                        ) -> jax.Array:
  """The same sum from the full ``[batch, length, vocab]`` logits: the reference the tests
  hold :func:`chunked_cross_entropy` to (the model never calls it)."""
  z = _logits(x, w)
  ce = jax.nn.logsumexp(z, axis=-1) - _target_logit(z, targets)
  return jnp.sum(ce * weights)
