"""Rotary position embeddings (rotate-half), as every platform runs them.

:func:`rotate_half` is the rotation; :func:`rotate_half_vjp` the same with the rotation by
the opposite angle as its backward (one fused pass; autodiff of split / concatenate is a
pad and an add per half, four passes over q and k per layer on XLA:CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, theta: float, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """``(sin, cos)`` of the rotary angles, ``[batch, length, head_dim / 2]`` float32, for int
  ``positions [batch, length]``."""
  half = head_dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)          # [half]
  angle = positions[..., None].astype(jnp.float32) * freq               # [batch, length, half]
  return jnp.sin(angle), jnp.cos(angle)


def rotate_half(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotate-half: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` on the last dim of
  ``x [..., D]``; ``sin, cos`` broadcast to ``[..., D / 2]``."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@jax.custom_vjp
def rotate_half_vjp(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """:func:`rotate_half` whose backward is the opposite rotation (no gradient to the angles)."""
  return rotate_half(x, sin, cos)


rotate_half_vjp.defvjp(lambda x, sin, cos: (rotate_half(x, sin, cos), (sin, cos)),
                       lambda res, dy: (rotate_half(dy, -res[0], res[1]), None, None))


def rotate_heads(x: jax.Array, sin: jax.Array, cos: jax.Array, *,
                 fused_backward: bool = True) -> jax.Array:
  """``x [batch, length, heads, head_dim]`` rotated (in float32, back in ``x.dtype``) by
  ``sin, cos [1 | batch, length, head_dim / 2]``: :func:`rotate_half_vjp`, or with
  ``fused_backward=False`` plain :func:`rotate_half` (autodiff's backward)."""
  rotate = rotate_half_vjp if fused_backward else rotate_half
  return rotate(x.astype(jnp.float32), sin[:, :, None], cos[:, :, None]).astype(x.dtype)
