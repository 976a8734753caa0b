"""Host memory on CPU: keep freed blocks for reuse, so a step's large temporaries stop page-faulting.

XLA:CPU mallocs each execution's temporaries and frees them afterwards. glibc serves a block
above 32 MiB by a fresh ``mmap`` (and its per-thread arenas cannot hold one), unmapped again
on free, so every step faults all its large temporaries in again, page by page, and the
kernel zero-fills each page (``benchmarks/host_memory.py`` counts them with ``ru_minflt``).

:func:`keep_freed_memory` sets glibc's ``mallopt``: one arena for every thread, blocks up to
2 GiB from the heap instead of ``mmap``, and no trimming of the heap's top below 2 GiB.
Freed temporaries then stay mapped and the next step reuses them. The cost: the process keeps
its peak heap (as PyTorch's and XLA:TPU's own caching allocators do), and its threads share
one malloc lock (XLA allocates few, large blocks).

The entry points (``train.py``, ``eval.py``, ``generate.py``, the benchmarks, the tests) call
it first thing: it only acts on threads that have not allocated yet, i.e. before JAX's first
computation. It does nothing when ``MOEJAX_KEEP_FREED_MEMORY=0``, off glibc, or where an
accelerator will run the program (``JAX_PLATFORMS`` names one, or the host has TPU / GPU
device files): there host memory holds no per-step temporaries.
"""

from __future__ import annotations

import ctypes
import glob
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP_BYTES = 2 ** 31 - 1   # mallopt takes an int


def _accelerator_expected() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
              or glob.glob("/dev/nvidia[0-9]*"))


def keep_freed_memory() -> bool:
  """Sets glibc malloc to keep freed blocks (see the module doc); True if it did."""
  if os.environ.get("MOEJAX_KEEP_FREED_MEMORY", "1") == "0" or _accelerator_expected():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):   # not glibc
    return False
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP_BYTES), (_M_TRIM_THRESHOLD, _KEEP_BYTES)))
