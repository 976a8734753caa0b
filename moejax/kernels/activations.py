"""THE table of named activations of moejax, with their derivatives.

Every layer that takes an ``activation`` name (dense FFN, MoE experts, PEER, the Pallas
lookup kernels) looks it up here, so a name means the same function everywhere:

  ``gelu``       exact GELU, ``x * Phi(x)`` with the erf (= ``torch.nn.GELU()``, HF ``gelu``,
                 ``jax.nn.gelu(approximate=False)``)
  ``gelu_tanh``  the tanh approximation (= ``jax.nn.gelu`` default, HF ``gelu_new``)
  ``silu``       ``x * sigmoid(x)`` (SwiGLU with a gate)
  ``relu``

Each entry is ``(f, df)`` on float arrays; ``df(a)`` is ``f'(a)``. Kept to elementwise
``jax.numpy`` so the same functions run inside Pallas kernels (Mosaic and Triton) and in
the plain-JAX references. :func:`fn` gives ``f`` alone (what the layers call; autodiff
differentiates it).
"""

from __future__ import annotations

import functools
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


def _silu(a):
  return a * (1.0 / (1.0 + jnp.exp(-a)))


def _dsilu(a):
  sig = 1.0 / (1.0 + jnp.exp(-a))
  return sig * (1.0 + a * (1.0 - sig))


ACTIVATIONS = {
    "relu": (_relu, _drelu),
    "gelu_tanh": (_gelu_tanh, _dgelu_tanh),   # = jax.nn.gelu(approximate=True)
    "gelu": (_gelu, _dgelu),                  # exact (erf), = torch's default GELU
    "silu": (_silu, _dsilu),                  # = jax.nn.silu
}
NAMES = tuple(sorted(ACTIVATIONS))


def get(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} not in {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def fn(name: str):
  """The activation ``f`` of ``name`` (ValueError for an unknown name)."""
  return get(name)[0]


# ------------------------------------------------------------------- gated (GLU) units


def glu_vjp(name: str, a: jax.Array, b: jax.Array | None, dh: jax.Array):
  """Cotangents ``(da, db)`` of ``h = f(a) * b`` (``h = f(a)`` when ``b`` is None, ``db``
  None) from the derivative formula: one elementwise pass, ``f(a)`` recomputed."""
  f, df = get(name)
  if b is None:
    return dh * df(a), None
  return dh * b * df(a), dh * f(a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def glu(name: str, a: jax.Array, b: jax.Array | None) -> jax.Array:
  """``f(a) * b`` (``f(a)`` when ``b`` is None) with :func:`glu_vjp` as its backward.

  Why (XLA:CPU): autodiff of e.g. silu ``a * (1 / (1 + exp(-a)))`` keeps ``exp(-a)`` and
  the reciprocal as separate ``[tokens, mlp]`` buffers and runs forward and backward as
  about five passes over them; the formula is one.
  """
  h = fn(name)(a)
  return h if b is None else h * b


def _glu_fwd(name, a, b):
  return glu(name, a, b), (a, b)


def _glu_bwd(name, res, dh):
  # The barrier keeps XLA from sharing the backward's recomputed f(a) with the forward's:
  # shared, the forward wrote f(a) and its parts (sigmoid, silu) out as [tokens, mlp]
  # buffers kept alive until the backward, instead of one fused pass to h. On XLA:CPU each
  # such buffer of >= 32 MiB is a fresh mmap faulted in every step (default malloc), so
  # fewer live buffers mean fewer page faults per step.
  a, b = jax.lax.optimization_barrier(res)
  return glu_vjp(name, a, b, dh)


glu.defvjp(_glu_fwd, _glu_bwd)
