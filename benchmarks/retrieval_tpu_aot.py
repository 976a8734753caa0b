"""Compile time and per-device memory of the Pallas product-key retrieval kernel alone for
TPU slices, compiled here with libtpu (nothing runs).

    python benchmarks/retrieval_tpu_aot.py [--topologies v5e:2x2,v5p:2x2x1] [--tokens 8192]

Shared (hk = 1) and per-head (hk = h) sub-keys. The line ends with the size of one f32
``[T, h, n]`` half-score tensor, which the kernel keeps in VMEM and never writes to HBM.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from moejax.aot import targets  # noqa: E402
from moejax.kernels.retrieval_tpu import product_key_topk  # noqa: E402


def report(topologies, tokens: int, heads: int, n: int, d_key: int, k: int) -> None:
  half_bytes = tokens * heads * n * 4
  for topo in topologies:
    mesh = Mesh(np.array(targets.topology_devices(topo)), ("x",))
    for hk in (1, heads):
      args = (jax.ShapeDtypeStruct((tokens, heads, d_key), jnp.float32),
              jax.ShapeDtypeStruct((hk, n, d_key // 2), jnp.float32),
              jax.ShapeDtypeStruct((hk, n, d_key // 2), jnp.float32))
      fn = jax.shard_map(lambda q, a, b: product_key_topk(q, a, b, k), mesh=mesh,
                         in_specs=P(), out_specs=P(), check_vma=False)
      t = time.perf_counter()
      compiled = targets.compile_for_tpu(fn, *args, topology=topo)
      mem = targets.memory(compiled)
      print(f"{topo} T={tokens} h={heads} hk={hk} n={n} d_key={d_key} k={k}: compile "
            f"{time.perf_counter() - t:.1f} s, memory {mem} (one f32 [T, h, n] half-score "
            f"tensor: {half_bytes} bytes)", flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--n", type=int, default=1024, help="sub-keys per half (N = n² experts)")
  p.add_argument("--d_key", type=int, default=128)
  p.add_argument("--k", type=int, default=16)
  a = p.parse_args(argv)
  if not targets.libtpu_available():
    raise SystemExit("error: libtpu is not installed (pip install -e '.[tpu]')")
  report(a.topologies.split(","), a.tokens, a.heads, a.n, a.d_key, a.k)


if __name__ == "__main__":
  main()
