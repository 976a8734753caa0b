"""Platform backends: implementations of the registry's operations for one platform.

A backend is a package ``moejax.backends.<name>`` with a ``register()`` that hands its
implementations to :mod:`moejax.kernels.registry` (the product-key ``row_ops``, the MoE
dispatch's grouped matmuls, ...) and a ``prepare_process()`` the entry points run first
(:func:`prepare_process`, before JAX's first computation; it imports no JAX). The registry
calls :func:`load` the first time a layer asks it for an operation; nothing under
``moejax.layers``, ``moejax.training`` or ``moejax.model`` imports a backend. Without any
backend every layer runs its portable XLA program (what TPU and GPU run), on every platform.

* ``cpu``: the CPU speed work: native kernels (XLA FFI, C++ built on first use), the
  CPU-tuned XLA layouts (flattened projections, row-moving MoE dispatch, blocked grouped
  matmuls, chunked lookups) and the host-memory setting of the entry points.
  ``MOEJAX_CPU_BACKEND=0`` leaves it unregistered (``MOEJAX_CPU_KERNELS=0`` keeps it but
  skips only its native kernels).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = ("cpu",)


def enabled(name: str) -> bool:
  """False when ``MOEJAX_<NAME>_BACKEND=0``."""
  return os.environ.get(f"MOEJAX_{name.upper()}_BACKEND", "1") != "0"


def _enabled_backends() -> list[ModuleType]:
  """The enabled backend packages of this install (importing one imports no JAX)."""
  found = []
  for name in BACKENDS:
    if not enabled(name):
      continue
    try:
      found.append(importlib.import_module(f"{__name__}.{name}"))
    except ModuleNotFoundError as e:   # a backend left out of this install: XLA's programs
      if e.name != f"{__name__}.{name}":
        raise
  return found


def load() -> None:
  """Registers every enabled backend's operations (the registry calls this once)."""
  for backend in _enabled_backends():
    backend.register()


def prepare_process() -> bool:
  """The entry points' first call, before JAX's first computation: each enabled backend's
  process setting (the CPU's keeps freed host memory mapped, see
  ``moejax.backends.cpu.host_memory``). True if one changed anything."""
  changed = False
  for backend in _enabled_backends():
    changed |= bool(backend.prepare_process())
  return changed
