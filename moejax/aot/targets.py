"""A TPU topology's devices as compile targets on any machine (needs libtpu: ``jax[tpu]``).

XLA's real TPU compiler runs on a CPU host for a topology that is not there; the compiled
executable reports per-device memory and cost, and Mosaic kernels are checked for real
(block shapes, layouts, VMEM). Nothing runs. Used by :mod:`moejax.aot.compile` and the TPU
kernel tests and benchmarks.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def share_libtpu() -> None:
  """Lets several processes on one CPU machine (tests, tools) load libtpu at once, which its
  machine-wide lock file otherwise refuses ("Internal error when accessing libtpu
  multi-process lockfile"). Only where the TPU is a compile target (JAX_PLATFORMS=cpu),
  never on a TPU VM that may be training."""
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


share_libtpu()


def libtpu_available() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str) -> tuple:
  """Devices of a TPU topology such as ``'v5e:2x2'`` or ``'v5p:2x2x1'`` (compile targets only)."""
  from jax.experimental import topologies
  return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def compile_for_tpu(fn, *args, topology: str = "v5e:2x2", in_specs=None, out_specs=None,
                    mesh_axes: tuple[str, ...] = ("x",), per_device: bool = False):
  """``jax.jit(fn)`` compiled for ``topology``; ``args`` are arrays or ShapeDtypeStructs.

  Without specs every argument is replicated on a 1-D mesh of all the topology's devices
  (per-device memory is then that of one device running ``fn`` alone). ``per_device``:
  run ``fn`` inside ``shard_map`` on every device (what a Pallas TPU kernel, which GSPMD
  cannot partition, needs when ``fn`` does not place one in a ``shard_map`` itself).
  """
  devices = np.array(topology_devices(topology))
  mesh = Mesh(devices.reshape(-1) if len(mesh_axes) == 1 else devices.reshape(
      (len(devices),) + (1,) * (len(mesh_axes) - 1)), mesh_axes)
  in_specs = in_specs if in_specs is not None else (P(),) * len(args)
  abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
              for a, s in zip(args, in_specs)]
  kw = {}
  if out_specs is not None:
    kw["out_shardings"] = jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs)
  if per_device:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=P(), check_vma=False)
  from moejax import kernels
  with kernels.target_platform("tpu"):
    return jax.jit(fn, **kw).lower(*abstract).compile()


def memory(compiled) -> dict[str, int]:
  """Per-device bytes: argument, output, alias, temp (from the compiled memory analysis)."""
  m = compiled.memory_analysis()
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
