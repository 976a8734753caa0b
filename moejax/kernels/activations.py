"""Named activations with their derivatives, for kernels that differentiate by hand.

Each entry is ``(f, df)`` on float arrays; ``df(a)`` is ``f'(a)``. Kept to elementwise
``jax.numpy`` so the same functions run inside Pallas kernels (Mosaic and Triton) and in
the plain-JAX references.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _relu(a):
  return jnp.maximum(a, 0.0)


def _drelu(a):
  return (a > 0).astype(a.dtype)


def _gelu_tanh(a):
  return 0.5 * a * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (a + 0.044715 * a * a * a)))


def _dgelu_tanh(a):
  inner = _SQRT_2_OVER_PI * (a + 0.044715 * a * a * a)
  t = jnp.tanh(inner)
  dinner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * a * a)
  return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dinner


def _gelu(a):
  return 0.5 * a * (1.0 + jax.lax.erf(a * (1.0 / math.sqrt(2.0))))


def _dgelu(a):
  cdf = 0.5 * (1.0 + jax.lax.erf(a * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
  return cdf + a * pdf


ACTIVATIONS = {
    "relu": (_relu, _drelu),
    "gelu_tanh": (_gelu_tanh, _dgelu_tanh),   # = jax.nn.gelu(approximate=True)
    "gelu": (_gelu, _dgelu),                  # exact (erf), = torch's default GELU
}


def get(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} not in {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
