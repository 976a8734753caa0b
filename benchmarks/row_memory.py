"""Where the row-sparse PEER LM step at N = n² spends its time beyond its N = n_small² time.

    python benchmarks/row_memory.py [--n 1024] [--n_small 128] [--iters 5]

Issue 11 asks for the row-sparse step at N = 1024² within 1.5x of its N = 128² time. The
step differs between the two sizes in the row kernels' memory: at 128² a table and its
Adam moments (6 x 16 MiB) stay in a large L3, at 1024² (6 x 1 GiB) every retrieved row
comes from DRAM. This script times, round-robin in one run:

* the row-sparse LM train step at both sizes (``benchmarks/peer.py``'s builder, as
  ``vs_pytorch.py`` section c);
* the step's row kernels alone at both sizes, on the step's shapes (T tokens, h·k
  retrievals each, uniform rows): ``gather_dot`` and ``gather_weighted_sum`` (each twice per
  step: forward and backward) and ``factored_adam_rows`` (once per table, two tables);
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

from moejax import backends

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:   # the sibling scripts, when this file is loaded by path (tests)
  sys.path.insert(0, _HERE)

D_ROW = 256   # expert row width of the shape (d = 256)


def row_kernel_fns(n: int, tokens: int, retrievals: int, seed: int = 0):
  """{name: zero-argument fn} of the step's row kernels on an N = n² table, and the number
  of distinct rows retrieved."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax.backends.cpu import native as cpu_kernels
  from moejax.kernels import row_plan
  if not cpu_kernels.available():
    raise SystemExit("row_memory: the CPU kernels did not build (see the warning above)")
  rows_n = n * n
  rng = np.random.default_rng(seed)
  idx = jnp.asarray(rng.integers(0, rows_n, size=(tokens, retrievals)), jnp.int32)
  rows = row_plan.unique_rows(idx, rows_n)          # as the step: [U], padded with N
  slots = row_plan.row_slots(idx, rows, rows_n)
  u = int(jnp.sum(rows < rows_n))                    # the distinct rows Adam touches
  coefs = jnp.asarray(rng.normal(size=(tokens, retrievals)) * 0.01, jnp.float32)
  vec = jnp.asarray(rng.normal(size=(tokens, D_ROW)), jnp.float32)
  order, starts = jax.jit(lambda s: cpu_kernels.slot_runs(s, rows.shape[0]))(slots)
  keys = jax.random.split(jax.random.key(seed), 3)
  state = {"t": jax.random.normal(keys[0], (rows_n, D_ROW)) * 0.02,
           "m": jnp.zeros((rows_n, D_ROW)), "v": jnp.zeros((rows_n, D_ROW))}
  adam = jax.jit(lambda t, m, v: cpu_kernels.factored_adam_rows(
      t, m, v, rows, order, starts, coefs, vec, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
      c1=0.5, c2=0.5), donate_argnums=(0, 1, 2))
  gd = jax.jit(cpu_kernels.gather_dot)
  gws = jax.jit(cpu_kernels.gather_weighted_sum)

  def run_adam():
    state["t"], state["m"], state["v"] = adam(state["t"], state["m"], state["v"])
    return state["t"]
  return {"gather_dot": lambda: gd(state["t"], idx, vec),
          "gather_weighted_sum": lambda: gws(state["t"], idx, coefs),
          "factored_adam_rows": run_adam}, u


# Calls per train step of each row kernel (PEER: two tables, forward and backward).
PER_STEP = {"gather_dot": 2, "gather_weighted_sum": 2, "factored_adam_rows": 2}


def stream_fn(mib: int):
  """In-place x *= 1.0001 over ``mib`` MiB (read and written) and the bytes it moves."""
  import jax
  import jax.numpy as jnp
  holder = {"x": jnp.ones((mib << 18,), jnp.float32)}
  f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)

  def run():
    holder["x"] = f(holder["x"])
    return holder["x"]
  return run, 2 * (mib << 20)


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
  import peer
  import vs_pytorch as vs
  tokens, retrievals = a.batch * a.length, a.heads * a.top_k
  sizes = (a.n_small, a.n)

  steps = [peer.lm_train_step(
      n, "row_sparse", d_model=D_ROW, heads=a.heads, top_k=a.top_k, d_key=128,
      query_norm="batch", batch=a.batch, length=a.length) for n in sizes]
  kernels, uniques = {}, {}
  for n in sizes:
    fns, uniques[n] = row_kernel_fns(n, tokens, retrievals)
    for name, fn in fns.items():
      kernels[(name, n)] = fn
  stream, stream_bytes = stream_fn(a.stream_mib)
  for fn in steps:
    vs._ready(fn())   # the first steps still grow the heap
  labels = [("step", n) for n in sizes] + list(kernels) + [("stream", 0)]
  times = dict(zip(labels, vs.round_robin([*steps, *kernels.values(), stream], a.iters)))

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
  adam_bytes = uniques[a.n] * D_ROW * 4 * 6   # table, mu, nu rows: read and written
  adam_gbs = adam_bytes / times[("factored_adam_rows", a.n)] / 1e9
  stream_gbs = stream_bytes / times[("stream", 0)] / 1e9
  print(f"\nrow-sparse LM step: N = {a.n_small}² {s_small:.0f} ms, N = {a.n}² {s_big:.0f} ms, "
        f"ratio {s_big / s_small:.2f}")
  print(f"extra time at N = {a.n}²: the step {s_big - s_small:+.0f} ms; its row kernels, run "
        f"alone, {extra:+.0f} ms")
  print(f"lazy Adam at N = {a.n}²: {uniques[a.n]:,} rows, {adam_bytes / 2**30:.2f} GiB moved, "
        f"{adam_gbs:.1f} GB/s; streaming read+write over {a.stream_mib} MiB: {stream_gbs:.1f} GB/s")


if __name__ == "__main__":
  main()
