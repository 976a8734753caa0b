"""Row-wise top-k of float32 on CPU: an XLA FFI call to ``topk_cpu.cc``, built on first use.

:func:`top_k` is ``jax.lax.top_k`` (same values, indices, order and ties). On CPU, for
float32, it calls the C++ kernel of ``topk_cpu.cc``: one pass per row that keeps the k best
in a sorted buffer and skips blocks of 16 that cannot enter it. XLA:CPU's TopK sorts
partially per row: at k = 16 of n = 1024 (product-key retrieval) it was ~57% of the PEER
layer's forward at N = 1024², 4096 tokens (``benchmarks/vs_pytorch.py``).
Elsewhere it is ``jax.lax.top_k``: on TPU / GPU, for other dtypes, with
``MOEJAX_CPU_TOPK=0``, and under a mesh (``jax.set_mesh``) with an axis of several devices
that is not manual here: XLA cannot partition a custom call, so it would all-gather the
operand and compute every row on every device (inside ``shard_map`` over those axes each
device has its own rows, and the kernel runs).

Build: the first call compiles ``topk_cpu.cc`` with the C++ compiler (``$CXX``, else
``c++``) against the XLA FFI headers that ship with jaxlib (``jax.ffi.include_dir()``) into
``$MOEJAX_CACHE_DIR`` (default ``~/.cache/moejax``), named by a hash of the source, the
headers' jax version and the machine; later processes load that file. Without a compiler
the call logs one warning and falls back to ``jax.lax.top_k``. No network is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from moejax import kernels

log = logging.getLogger(__name__)

TARGET = "moejax_topk_f32"
_SOURCE = Path(__file__).with_name("topk_cpu.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# Tried first, for this CPU's vector units (0.66 vs 0.9 us per row); dropped where the
# compiler refuses it. The cache name includes the CPU's feature flags, so a cache shared
# between machines never loads code built for another CPU.
_NATIVE = ("-march=native",)


def enabled() -> bool:
  """False when ``MOEJAX_CPU_TOPK=0`` (then :func:`top_k` is ``jax.lax.top_k``)."""
  return os.environ.get("MOEJAX_CPU_TOPK", "1") != "0"


def cache_dir() -> Path:
  return Path(os.environ.get("MOEJAX_CACHE_DIR", "~/.cache/moejax")).expanduser()


def _cpu_features() -> bytes:
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
  except OSError:
    return platform.processor().encode()


def _build() -> Path:
  """The shared library's path, compiled now unless already in the cache."""
  include = jax.ffi.include_dir()
  digest = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), include.encode(), jax.__version__.encode(),
               platform.machine().encode(), _cpu_features(), " ".join(_FLAGS).encode()):
    digest.update(part)
  lib = cache_dir() / f"topk_cpu-{digest.hexdigest()[:16]}.so"
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  cxx = os.environ.get("CXX", "c++")
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = Path(tmp) / lib.name
    errors = []
    for extra in (_NATIVE, ()):
      cmd = [cxx, *_FLAGS, *extra, f"-I{include}", str(_SOURCE), "-o", str(out)]
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if done.returncode == 0:
        break
      errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-1000:]}")
    else:
      raise RuntimeError("; ".join(errors))
    os.replace(out, lib)   # atomic: processes building at once each leave a whole file
  return lib


@functools.cache
def available() -> bool:
  """Builds (or loads) the kernel and registers its FFI target; False, with one warning,
  where that fails (e.g. no C++ compiler)."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    log.warning("moejax: the CPU top-k kernel could not be built (%s); product-key "
                "retrieval on CPU uses jax.lax.top_k instead (slower). Set CXX to a C++17 "
                "compiler, or MOEJAX_CPU_TOPK=0 to silence this.", e)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MoejaxTopKF32), platform="cpu")
  return True


def _rows_are_local() -> bool:
  """No mesh axis of several devices is left to XLA's partitioner (see the module doc)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or all(size == 1 or name in mesh.manual_axes
                           for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(x, k)``: ``x [..., n]`` -> values ``[..., k]`` (descending), int32
  indices ``[..., k]``."""
  if (x.dtype != jnp.float32 or kernels.current_platform() != "cpu" or not enabled()
      or not 1 <= k <= x.shape[-1] or not _rows_are_local() or not available()):
    return jax.lax.top_k(x, k)
  out = x.shape[:-1] + (k,)
  aval = jax.typeof(x)   # results vary over the same shard_map axes as x
  call = jax.ffi.ffi_call(TARGET, (aval.update(shape=out, dtype=jnp.float32),
                                   aval.update(shape=out, dtype=jnp.int32)),
                          vmap_method="broadcast_all")
  values, indices = call(x)
  return values, indices
