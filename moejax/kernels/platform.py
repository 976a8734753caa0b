"""The *target* platform: what kernels and layouts are chosen for.

It is JAX's default backend, or the one set by :func:`target_platform` while compiling
ahead of time for a TPU from a CPU machine (``moejax.compile``). Layers never ask it
themselves: they ask :mod:`moejax.kernels.registry` for an operation, and the registry picks
the target platform's implementation.
"""

from __future__ import annotations

import contextlib

import jax

_TARGET: list[str] = []

# Collectives a platform's XLA cannot run ("ragged_all_to_all": XLA:CPU has no lowering).
_MISSING_COLLECTIVES = {"cpu": frozenset({"ragged_all_to_all"})}


@contextlib.contextmanager
def target_platform(platform: str):
  """Within this context, kernels are chosen for ``platform`` ('tpu', 'gpu', 'cpu')."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def current_platform() -> str:
  if _TARGET:
    return _TARGET[-1]
  backend = jax.default_backend()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def lacking(collective: str, platform: str | None = None) -> str | None:
  """The name of ``platform`` (default: the target) where its XLA cannot run
  ``collective``; None where it can."""
  platform = platform or current_platform()
  return platform if collective in _MISSING_COLLECTIVES.get(platform, ()) else None
