"""Where the row-sparse PEER LM step at N = n² spends its time beyond its N = n_small² time.

    python benchmarks/row_memory.py [--n 1024] [--n_small 128] [--iters 5]

Issue 11 asks for the row-sparse step at N = 1024² within 1.5x of its N = 128² time. The
step differs between the two sizes in the row kernels' memory: at 128² a table and its
Adam moments (6 x 16 MiB) stay in a large L3, at 1024² (6 x 1 GiB) every retrieved row
comes from DRAM. This script times, round-robin in one run:

* the row-sparse LM train step at both sizes (``moejax.benchmarking.train_steps``, as
  ``vs_pytorch.py`` section c);
* the step's row kernels alone at both sizes, on the step's shapes (T tokens, h·k
  retrievals each, uniform rows): ``gather_dot`` and ``gather_weighted_sum`` (each twice per
  step: forward and backward) and ``adam_rows`` (once per table, two tables);
* an in-place read-modify-write of 1 GiB (XLA, all threads): the host's streaming bandwidth.

It prints the row kernels' extra time per step at the large size, run alone, next to the
step's measured extra time, and the lazy Adam's traffic rate against the streaming
bandwidth. Run alone, the kernels' extra time is not a bound on the step's: in the step,
XLA:CPU runs independent ops at once (the two tables' updates, a gather beside a matmul),
so part of it overlaps other work (2026-11-28: +320 ms alone, +256 ms in the step).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moejax import backends  # noqa: E402
from moejax.benchmarking import timing  # noqa: E402
from moejax.benchmarking.row_kernels import D_ROW, PER_STEP, row_kernel_fns, stream_fn  # noqa: E402
from moejax.benchmarking.train_steps import peer_lm_train_step  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=1024)
  p.add_argument("--n_small", type=int, default=128)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--top_k", type=int, default=16)
  p.add_argument("--stream_mib", type=int, default=1024, help="the streaming pass's array")
  a = p.parse_args(argv)
  kept = backends.prepare_process()   # as train.py, before JAX's first computation
  import jax
  from moejax.backends.cpu import native as cpu_kernels
  if not cpu_kernels.available():
    sys.exit("row_memory: the CPU kernels did not build (see the warning above)")
  tokens, retrievals = a.batch * a.length, a.heads * a.top_k
  sizes = (a.n_small, a.n)

  steps = [peer_lm_train_step(
      n, "row_sparse", d_model=D_ROW, heads=a.heads, top_k=a.top_k, d_key=128,
      query_norm="batch", batch=a.batch, length=a.length) for n in sizes]
  kernels, uniques = {}, {}
  for n in sizes:
    fns, uniques[n] = row_kernel_fns(n, tokens, retrievals)
    for name, fn in fns.items():
      kernels[(name, n)] = fn
  stream, stream_bytes = stream_fn(a.stream_mib)
  for fn in steps:
    timing.ready(fn())   # the first steps still grow the heap
  labels = [("step", n) for n in sizes] + list(kernels) + [("stream", 0)]
  times = dict(zip(labels, timing.round_robin([*steps, *kernels.values(), stream], a.iters)))

  print(f"host: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; freed memory kept: "
        f"{kept}; {tokens} tokens x {retrievals} retrievals, rows of {D_ROW} floats; "
        f"median of {a.iters}, round-robin")
  print(f"\n| row kernel | N = {a.n_small}² ms | N = {a.n}² ms | calls / step | extra ms / step |")
  print("|---|---|---|---|---|")
  extra = 0.0
  for name, calls in PER_STEP.items():
    small, big = times[(name, a.n_small)] * 1e3, times[(name, a.n)] * 1e3
    extra += calls * (big - small)
    print(f"| {name} | {small:.1f} | {big:.1f} | {calls} | {calls * (big - small):+.1f} |")
  s_small, s_big = times[("step", a.n_small)] * 1e3, times[("step", a.n)] * 1e3
  adam_bytes = uniques[a.n] * D_ROW * 4 * 7   # table, mu, nu rows read and written; g read
  adam_gbs = adam_bytes / times[("adam_rows", a.n)] / 1e9
  stream_gbs = stream_bytes / times[("stream", 0)] / 1e9
  print(f"\nrow-sparse LM step: N = {a.n_small}² {s_small:.0f} ms, N = {a.n}² {s_big:.0f} ms, "
        f"ratio {s_big / s_small:.2f}")
  print(f"extra time at N = {a.n}²: the step {s_big - s_small:+.0f} ms; its row kernels, run "
        f"alone, {extra:+.0f} ms")
  print(f"lazy Adam at N = {a.n}²: {uniques[a.n]:,} rows, {adam_bytes / 2**30:.2f} GiB moved, "
        f"{adam_gbs:.1f} GB/s; streaming read+write over {a.stream_mib} MiB: {stream_gbs:.1f} GB/s")


if __name__ == "__main__":
  main()
