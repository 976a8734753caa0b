"""C++ kernels for XLA:CPU, called through the XLA FFI; built from ``cpu_kernels.cc`` on first use.

* :func:`top_k` is ``jax.lax.top_k`` (same values, indices, order and ties). XLA:CPU's TopK
  sorts partially per row: at k = 16 of n = 1024 (product-key retrieval) it was ~57% of the
  PEER layer's forward at N = 1024², 4096 tokens. The kernel bounds the k-th entry by group
  maxima and sorts only the few entries above the bound: ~0.66 vs ~4.6 us per row.
* :func:`take_rows` is ``jnp.take(table, indices, axis=0, mode="clip")`` for a float32
  ``[N, d]`` table: whole-row copies with the next rows prefetched, ~2x XLA's gather on
  random 1 KiB rows of a table far larger than the caches (the PEER expert lookups).

Each is the XLA op instead (:func:`usable` is False) on TPU / GPU (the target platform,
:func:`moejax.kernels.current_platform`), for other dtypes, with ``MOEJAX_CPU_KERNELS=0``,
and under a mesh (``jax.set_mesh``) with an axis of several devices that is not manual
here: XLA cannot partition a custom call, so it would all-gather the operands (a whole
table) onto every device. Inside ``shard_map`` over those axes each device has its own
rows, and the kernels run.

Build: the first use compiles ``cpu_kernels.cc`` with the C++ compiler (``$CXX``, else
``c++``) against the XLA FFI headers that ship with jaxlib (``jax.ffi.include_dir()``) into
``$MOEJAX_CACHE_DIR`` (default ``~/.cache/moejax``), named by a hash of the source, the jax
version, the flags and this CPU's features; later processes load that file. Without a
compiler it logs one warning and the XLA ops run. No network is used.
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

TOPK = "moejax_topk_f32"
TAKE_ROWS = "moejax_take_rows_f32"
_SYMBOLS = {TOPK: "MoejaxTopKF32", TAKE_ROWS: "MoejaxTakeRowsF32"}
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# Tried first, for this CPU's vector units (0.66 vs 0.9 us per row); dropped where the
# compiler refuses it. The cache name includes the CPU's feature flags, so a cache shared
# between machines never loads code built for another CPU.
_NATIVE = ("-march=native",)


def enabled() -> bool:
  """False when ``MOEJAX_CPU_KERNELS=0`` (then the XLA ops run)."""
  return os.environ.get("MOEJAX_CPU_KERNELS", "1") != "0"


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
  lib = cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
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
  """Builds (or loads) the kernels and registers their FFI targets; False, with one
  warning, where that fails (e.g. no C++ compiler)."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    log.warning("moejax: the CPU kernels could not be built (%s); XLA's top_k and gather "
                "run instead (slower product-key layers on CPU). Set CXX to a C++17 "
                "compiler, or MOEJAX_CPU_KERNELS=0 to silence this.", e)
    return False
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True


def _rows_are_local() -> bool:
  """No mesh axis of several devices is left to XLA's partitioner (see the module doc)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or all(size == 1 or name in mesh.manual_axes
                           for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def usable(*arrays: jax.Array) -> bool:
  """The kernels run for these float32 operands here (see the module doc)."""
  return (all(a.dtype == jnp.float32 for a in arrays) and kernels.current_platform() == "cpu"
          and enabled() and _rows_are_local() and available())


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(x, k)``: ``x [..., n]`` -> values ``[..., k]`` (descending), int32
  indices ``[..., k]``."""
  if not 1 <= k <= x.shape[-1] or not usable(x):
    return tuple(jax.lax.top_k(x, k))
  out = x.shape[:-1] + (k,)
  aval = jax.typeof(x)   # results vary over the same shard_map axes as x
  call = jax.ffi.ffi_call(TOPK, (aval.update(shape=out, dtype=jnp.float32),
                                 aval.update(shape=out, dtype=jnp.int32)),
                          vmap_method="broadcast_all")
  values, indices = call(x)
  return values, indices


def take_rows(table: jax.Array, indices: jax.Array) -> jax.Array:
  """``jnp.take(table, indices, axis=0, mode="clip")``: ``table [N, d]``, int ``indices
  [...]`` -> ``[..., d]``. Not differentiable (callers with a custom VJP)."""
  if table.ndim != 2 or table.shape[0] == 0 or not usable(table):
    return jnp.take(table, indices, axis=0, mode="clip")
  indices = indices.astype(jnp.int32)
  # Inside shard_map the result varies over the axes of either operand.
  t_vary, i_vary = kernels.varying(table), kernels.varying(indices)
  if i_vary - t_vary:
    table = jax.lax.pcast(table, tuple(sorted(i_vary - t_vary)), to="varying")
  if t_vary - i_vary:
    indices = jax.lax.pcast(indices, tuple(sorted(t_vary - i_vary)), to="varying")
  out = jax.typeof(indices).update(shape=indices.shape + table.shape[1:], dtype=jnp.float32)
  return jax.ffi.ffi_call(TAKE_ROWS, out, vmap_method="sequential")(table, indices)
