"""The index of the first maximum along the last axis on XLA:CPU (registry ``argmax``).

XLA:CPU runs ``jnp.argmax`` as a variadic (value, index) reduction, one element at a time;
over a vocabulary of logits (greedy decoding's every step) that is a scalar loop. Here the
last axis is cut into blocks of :data:`BLOCK`: a plain max per block (a vectorised
reduction), the first block holding the row's maximum, and the argmax within that block
alone. The first maximum is in the first block that holds it, so ties resolve as
``jnp.argmax``'s do. A row holding NaN (a model that diverged) gets an index in range, not
necessarily its first NaN: XLA's max does not carry NaN through, and finding the NaN is a
second pass over the row, as slow as the argmax it replaces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128


def argmax(x: jax.Array) -> jax.Array:
  """``x [..., n]`` -> int32 ``[...]``: ``jnp.argmax(x, -1)``'s values (rows without NaN)."""
  *lead, n = x.shape
  blocks = -(-n // BLOCK)
  if blocks < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.argmax(x, -1).astype(jnp.int32)
  xb = jnp.pad(x, [(0, 0)] * len(lead) + [(0, blocks * BLOCK - n)], constant_values=-jnp.inf)
  xb = xb.reshape(*lead, blocks, BLOCK)
  first = jnp.argmax(jnp.max(xb, -1), -1)                                   # [...]
  within = jnp.take_along_axis(xb, first[..., None, None], -2)[..., 0, :]   # [..., BLOCK]
  return (first * BLOCK + jnp.argmax(within, -1)).astype(jnp.int32)
