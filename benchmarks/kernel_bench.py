"""Kernel benchmarks: the Pallas product-key kernels against their plain-JAX references.

  python benchmarks/kernel_bench.py                  # every section this machine can run
  python benchmarks/kernel_bench.py --section gpu    # PYTHONPATH=. works too (jax + numpy only)
  python benchmarks/kernel_bench.py --section gpu --ns 256 --iters 5    # quicker

GPU section (needs a CUDA GPU; prints "no GPU: skipped" otherwise), every number measured
in this run on this device (jit, warm-up, then the median of --iters calls, each ended by
``jax.block_until_ready``), at T tokens, model width d, h heads, top-k k (H = h·k rows per
token) and N = n² table rows for each n of --ns (skipped when the estimate does not fit):

1. copy bandwidth: ``a * 2`` on a 1 GiB array (read + write bytes / time), the yardstick.
2. per N: the PEER lookup forward, fwd+bwd with dense table gradients, fwd+bwd with
   row-sparse taps, and the PKM lookup (no down table), kernel (``lookup_gpu``) vs
   ``lookup_xla``; the forward's achieved bandwidth (rows read T·H·d·itemsize, twice
   for PEER, plus x, y, indices, scores) as a fraction of the copy; the kernel pieces one
   by one (row plan, forward, token pass, row pass).
3. a small sweep of ``lookup_gpu.GpuConfig`` s (fwd and fwd+bwd) at the first N.
4. if ``moejax.kernels.retrieval_gpu`` imports: product-key top-k kernel vs reference, and
   the PEER layer core = retrieval + softmax + lookup, fwd+bwd, kernels vs references.

TPU section (``--section tpu``, any machine with libtpu): compiled per-device memory of the\nPEER layer core fwd+bwd for v5e:2x2 and v5p:2x2x1, Pallas vs reference; last line: the ratio.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GiB = 1 << 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--section", choices=("gpu", "tpu", "all"), default="all")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--d", type=int, default=1024, help="model width (table row length)")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--top_k", type=int, default=16)
  p.add_argument("--d_key", type=int, default=128)
  p.add_argument("--ns", default="1024,256", help="sub-key counts n (N = n² rows)")
  p.add_argument("--dtype", default="bfloat16", help="tables, x, scores")
  p.add_argument("--activation", default="gelu_tanh")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no_sweep", action="store_true", help="skip the GpuConfig sweep")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- timing


def time_ms(fn, *args, iters=10, warmup=2):
  """Median wall time in ms of ``fn(*args)`` (compiled and warmed up first)."""
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t)
    del out
  return statistics.median(ts) * 1e3


class Table:
  """Rows of (what, N, kernel ms, reference ms, note), printed as one markdown table."""

  def __init__(self, title):
    self.title, self.rows = title, []

  def add(self, what, n, kernel_ms=None, ref_ms=None, note=""):
    self.rows.append((what, n, kernel_ms, ref_ms, note))
    k = "-" if kernel_ms is None else f"{kernel_ms:.3f}"
    r = "-" if ref_ms is None else f"{ref_ms:.3f}"
    print(f"  {what} N={n}: kernel {k} ms, reference {r} ms {note}", flush=True)

  def print(self):
    print(f"\n## {self.title}\n")
    print("| what | N | kernel ms | reference ms | speed-up | note |")
    print("|---|---|---|---|---|---|")
    for what, n, k, r, note in self.rows:
      ks = "-" if k is None else f"{k:.3f}"
      rs = "-" if r is None else f"{r:.3f}"
      sp = f"{r / k:.2f}x" if (k and r) else "-"
      ns = n if isinstance(n, str) else f"{n:,}"
      print(f"| {what} | {ns} | {ks} | {rs} | {sp} | {note} |")
    sys.stdout.flush()


def _guard(table, what, n, fn):
  """Run one measurement; an error (OOM, compile failure) becomes a row, not an exit."""
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - report and go on with the next row
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    print(f"  {what} N={n} FAILED {msg}", flush=True)
    traceback.print_exc(limit=3)
    table.add(what, n, None, None, "FAILED " + msg.replace("|", "/"))
  finally:
    gc.collect()


# -------------------------------------------------------------------------- GPU


def _device_memory():
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 0)) or None
  except Exception:  # noqa: BLE001
    return None


def copy_bandwidth(iters, warmup, nbytes=GiB):
  """Bytes/s of a device-to-device copy-like op (``a * 2``: read + write)."""
  a = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 2)
  ms = time_ms(f, a, iters=iters, warmup=warmup)
  del a
  return 2 * nbytes / (ms * 1e-3), ms


def _inputs(a, n_rows, dtype, seed=0):
  t, h, k, d = a.tokens, a.heads, a.top_k, a.d
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (t, d), dtype)
  idx = jax.random.randint(ks[1], (t, h, k), 0, n_rows, dtype=jnp.int32)
  sc = jax.nn.softmax(jax.random.normal(ks[2], (t, h, k), jnp.float32), -1).astype(dtype)
  up = jax.random.normal(ks[3], (n_rows, d), dtype)
  down = (jax.random.normal(ks[4], (n_rows, d), jnp.float32) / np.sqrt(d)).astype(dtype)
  dy = jax.random.normal(ks[5], (t, d), dtype)
  return jax.block_until_ready((x, idx, sc, up, down, dy))


def _lookup_fns(lookup, lookup_sparse, act):
  """jitted fwd, dense fwd+bwd, sparse fwd+bwd (PEER) and fwd, fwd+bwd (PKM)."""
  f32 = jnp.float32

  def peer_loss(x, idx, sc, up, down, dy):
    return jnp.sum(lookup(x, idx, sc, up, down, activation=act).astype(f32) * dy.astype(f32))

  def pkm_loss(idx, sc, up, dy):
    return jnp.sum(lookup(None, idx, sc, up, None, activation=act).astype(f32)
                   * dy.astype(f32))

  def sparse_loss(x, idx, sc, up, down, taps, dy):
    y = lookup_sparse(x, idx, sc, up, down, taps, activation=act)
    return jnp.sum(y.astype(f32) * dy.astype(f32))

  return dict(
      fwd=jax.jit(lambda x, idx, sc, up, down: lookup(x, idx, sc, up, down, activation=act)),
      fwd_bwd=jax.jit(jax.value_and_grad(peer_loss, argnums=(0, 2, 3, 4))),
      sparse_fwd_bwd=jax.jit(jax.value_and_grad(sparse_loss, argnums=(0, 2, 5))),
      pkm_fwd=jax.jit(lambda idx, sc, up: lookup(None, idx, sc, up, None, activation=act)),
      pkm_fwd_bwd=jax.jit(jax.value_and_grad(pkm_loss, argnums=(1, 2))),
  )


def _estimate_bytes(a, n_rows, itemsize):
  nd = n_rows * a.d
  thd = a.tokens * a.heads * a.top_k * a.d
  # tables, f32 dense grads + cast copies, the reference's gathered [T, H, d] temporaries
  return 2 * nd * itemsize + 2 * nd * 4 + 2 * nd * itemsize + 4 * thd * 4


def bench_lookup(a, table, n_rows, copy_bw, sweep):
  from moejax.kernels import lookup_gpu, lookup_xla, lookup_vjp
  from moejax.kernels.row_plan import num_unique_slots, row_plan

  dtype = jnp.dtype(a.dtype)
  t, hk, d = a.tokens, a.heads * a.top_k, a.d
  x, idx, sc, up, down, dy = _inputs(a, n_rows, dtype)
  u = num_unique_slots(idx.size, n_rows)
  taps = (jnp.zeros((u, d), dtype), jnp.zeros((u, d), dtype))
  kern = _lookup_fns(lookup_gpu.lookup, lookup_gpu.lookup_sparse, a.activation)
  ref = _lookup_fns(lookup_xla.lookup, lookup_xla.lookup_sparse, a.activation)
  it = dict(iters=a.iters, warmup=a.warmup)
  res = {}

  def both(name, key, *args, note=""):
    def go():
      res[name] = time_ms(kern[key], *args, **it)
      r = time_ms(ref[key], *args, **it)
      table.add(name, n_rows, res[name], r, note)
    _guard(table, name, n_rows, go)

  both("PEER lookup fwd", "fwd", x, idx, sc, up, down)
  if "PEER lookup fwd" in res:
    isz = dtype.itemsize
    nbytes = (2 * t * hk * d * isz + 2 * t * d * isz + t * hk * (4 + isz))
    bw = nbytes / (res["PEER lookup fwd"] * 1e-3)
    table.add("PEER fwd bandwidth", n_rows, None, None,
              f"{bw / 1e9:,.0f} GB/s = {bw / copy_bw:.0%} of copy")
  both("PEER lookup fwd+bwd (dense grads)", "fwd_bwd", x, idx, sc, up, down, dy)
  both("PEER lookup fwd+bwd (sparse taps)", "sparse_fwd_bwd", x, idx, sc, up, down, taps, dy)
  both("PKM lookup fwd", "pkm_fwd", idx, sc, up)
  if "PKM lookup fwd" in res:
    isz = dtype.itemsize
    nbytes = t * hk * d * isz + t * d * isz + t * hk * (4 + isz)
    bw = nbytes / (res["PKM lookup fwd"] * 1e-3)
    table.add("PKM fwd bandwidth", n_rows, None, None,
              f"{bw / 1e9:,.0f} GB/s = {bw / copy_bw:.0%} of copy")
  both("PKM lookup fwd+bwd (dense grads)", "pkm_fwd_bwd", idx, sc, up, dy)

  # the pieces one by one (default config), token-flattened
  p = lookup_gpu.GPU_PIECES
  fi, fs = idx.reshape(t, hk), sc.reshape(t, hk)
  act = a.activation

  def pieces():
    plan_f = jax.jit(lambda i: row_plan(i, n_rows))
    plan = jax.block_until_ready(plan_f(fi))
    fwd = jax.jit(lambda x, i, s, up, down: p.forward(x, i, s, up, down, act))
    tok = jax.jit(lambda x, i, s, up, down, dy: p.token_backward(x, i, s, up, down, dy, act))
    coefs = jnp.ones((t * hk,), jnp.float32)
    dense = jax.jit(lambda pl_, v, c: p.row_backward(pl_, v, c, n_rows, True))
    compact = jax.jit(lambda pl_, v, c: p.row_backward(pl_, v, c, n_rows, False))
    table.add("  piece: row plan (argsort)", n_rows, time_ms(plan_f, fi, **it))
    table.add("  piece: forward", n_rows, time_ms(fwd, x, fi, fs, up, down, **it))
    table.add("  piece: token backward", n_rows,
              time_ms(tok, x, fi, fs, up, down, dy, **it))
    table.add("  piece: row backward dense", n_rows, time_ms(dense, plan, dy, coefs, **it),
              note="one table")
    table.add("  piece: row backward compact", n_rows,
              time_ms(compact, plan, dy, coefs, **it), note="one table")
    nu = int(jnp.sum(plan.unique < n_rows))
    table.add("  distinct rows retrieved", n_rows, None, None,
              f"{nu:,} of {t * hk:,} retrievals")
  _guard(table, "pieces", n_rows, pieces)

  if sweep:
    configs = [
        ("default", lookup_gpu.DEFAULT_CONFIG),
        ("token_tile=4096", lookup_gpu.GpuConfig(token_tile=4096)),
        ("token_tile=16384 warps=8", lookup_gpu.GpuConfig(token_tile=16384, token_warps=8)),
        ("stages=2", lookup_gpu.GpuConfig(token_stages=2, row_stages=2)),
        ("rows 16x32x128", lookup_gpu.GpuConfig(rows_block=16, entries_block=32,
                                                cols_block=128)),
        ("rows 32x64x128 warps=8", lookup_gpu.GpuConfig(cols_block=128, row_warps=8)),
    ]
    for name, cfg in configs:
      def go(name=name, cfg=cfg):
        lk, lks = lookup_vjp.make_lookup(lookup_gpu.make_pieces(cfg))
        fns = _lookup_fns(lk, lks, a.activation)
        f = time_ms(fns["fwd"], x, idx, sc, up, down, **it)
        fb = time_ms(fns["fwd_bwd"], x, idx, sc, up, down, dy, **it)
        table.add(f"  sweep {name}: fwd", n_rows, f)
        table.add(f"  sweep {name}: fwd+bwd (dense grads)", n_rows, fb)
      _guard(table, f"sweep {name}", n_rows, go)



def bench_retrieval(a, table, n):
  try:
    from moejax.kernels import retrieval_gpu
  except Exception as e:  # noqa: BLE001
    print(f"retrieval_gpu not available ({type(e).__name__}: {e}): retrieval rows skipped")
    return
  from moejax.kernels import lookup_gpu, lookup_xla, retrieval_xla

  dtype = jnp.dtype(a.dtype)
  t, h, k, d, dk = a.tokens, a.heads, a.top_k, a.d, a.d_key
  n_rows = n * n
  ks = jax.random.split(jax.random.key(7), 8)
  q = jax.random.normal(ks[0], (t, h, dk), dtype)
  k1 = (jax.random.normal(ks[1], (h, n, dk // 2), jnp.float32) / np.sqrt(dk)).astype(dtype)
  k2 = (jax.random.normal(ks[2], (h, n, dk // 2), jnp.float32) / np.sqrt(dk)).astype(dtype)
  it = dict(iters=a.iters, warmup=a.warmup)

  def topk_fns(topk):
    fwd = jax.jit(lambda q, k1, k2: topk(q, k1, k2, k))
    w = jax.random.normal(ks[3], (t, h, k), jnp.float32)
    loss = lambda q, k1, k2: jnp.sum(topk(q, k1, k2, k)[0].astype(jnp.float32) * w)
    return fwd, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  kf, kb = topk_fns(retrieval_gpu.product_key_topk)
  rf, rb = topk_fns(retrieval_xla.product_key_topk)

  def go_fwd():
    table.add("retrieval top-k fwd", n_rows, time_ms(kf, q, k1, k2, **it),
              time_ms(rf, q, k1, k2, **it), f"n={n}, d_key={dk}")
  _guard(table, "retrieval top-k fwd", n_rows, go_fwd)

  def go_bwd():
    table.add("retrieval top-k fwd+bwd", n_rows, time_ms(kb, q, k1, k2, **it),
              time_ms(rb, q, k1, k2, **it))
  _guard(table, "retrieval top-k fwd+bwd", n_rows, go_bwd)

  def layer(topk, lookup):
    f32 = jnp.float32

    def loss(q, k1, k2, x, up, down, dy):
      s, i = topk(q, k1, k2, k)
      w = jax.nn.softmax(s.astype(f32), -1).astype(dtype)
      y = lookup(x, i, w, up, down, activation=a.activation)
      return jnp.sum(y.astype(f32) * dy.astype(f32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))

  def go_layer():
    x = jax.random.normal(ks[4], (t, d), dtype)
    up = jax.random.normal(ks[5], (n_rows, d), dtype)
    down = (jax.random.normal(ks[6], (n_rows, d), jnp.float32) / np.sqrt(d)).astype(dtype)
    dy = jax.random.normal(ks[7], (t, d), dtype)
    kl = layer(retrieval_gpu.product_key_topk, lookup_gpu.lookup)
    rl = layer(retrieval_xla.product_key_topk, lookup_xla.lookup)
    table.add("PEER layer core fwd+bwd (retrieval + lookup)", n_rows,
              time_ms(kl, q, k1, k2, x, up, down, dy, **it),
              time_ms(rl, q, k1, k2, x, up, down, dy, **it), "dense table grads")
  _guard(table, "PEER layer", n_rows, go_layer)


def gpu_section(a):
  if jax.default_backend() != "gpu":
    print("\n# GPU section\nno GPU: skipped")
    return
  dev = jax.devices()[0]
  ns = [int(v) for v in a.ns.split(",") if v.strip()]
  print(f"\n# GPU section: {dev.device_kind}, jax {jax.__version__}, T={a.tokens}, d={a.d}, "
        f"h={a.heads}, k={a.top_k} (H={a.heads * a.top_k}), d_key={a.d_key}, {a.dtype}, "
        f"activation={a.activation}, median of {a.iters}", flush=True)
  copy_bw, copy_ms = copy_bandwidth(a.iters, a.warmup)
  print(f"copy (a * 2, 1 GiB bf16, read + write): {copy_ms:.3f} ms = "
        f"{copy_bw / 1e9:,.0f} GB/s", flush=True)
  table = Table(f"Lookup and retrieval on {dev.device_kind} (copy: {copy_bw / 1e9:,.0f} GB/s)")
  limit = _device_memory()
  itemsize = jnp.dtype(a.dtype).itemsize
  first = True
  for n in ns:
    n_rows = n * n
    need = _estimate_bytes(a, n_rows, itemsize)
    if limit and need > 0.85 * limit:
      table.add("lookup", n_rows, None, None,
                f"skipped: needs ~{need / GiB:.0f} GiB of {limit / GiB:.0f} GiB")
      continue
    print(f"\n-- N = {n}² = {n_rows:,}", flush=True)
    bench_lookup(a, table, n_rows, copy_bw, sweep=first and not a.no_sweep)
    bench_retrieval(a, table, n)
    first = False
    gc.collect()
  table.print()


# -------------------------------------------------------------------------- TPU


def _layer_core_loss(topk, lookup, k, activation):
  """PEER layer core: retrieval + softmax + lookup; loss = Σ y·dy (its grads = fwd + bwd)."""
  f32 = jnp.float32

  def loss(q, k1, k2, x, up, down, dy):
    s, i = topk(q, k1, k2, k)
    w = jax.nn.softmax(s.astype(f32), -1).astype(x.dtype)
    y = lookup(x, i, w, up, down, activation=activation)
    return jnp.sum(y.astype(f32) * dy.astype(f32))
  return loss


def tpu_section(a):
  """Compiled per-device memory of the PEER layer core fwd+bwd for TPU slices (libtpu AOT
  from this host, nothing runs): Pallas TPU kernels vs the plain-JAX references.

  Shape: --tokens, --d, --heads, --top_k, --d_key and the first n of --ns; f32 tables and
  activations (moejax keeps tables in f32). The last line is the memory ratio on v5p.
  """
  from moejax.aot import targets as aot
  from moejax.kernels import lookup_tpu, lookup_xla, retrieval_xla
  from moejax.kernels import retrieval_tpu
  print("\n# TPU section: compiled memory per device (libtpu AOT, no TPU needed)")
  if not aot.libtpu_available():
    print("no libtpu (pip install 'jax[tpu]'): skipped")
    return
  t, h, k, d, dk = a.tokens, a.heads, a.top_k, a.d, a.d_key
  f32 = jnp.float32
  sds = jax.ShapeDtypeStruct
  impls = {"pallas": (retrieval_tpu.product_key_topk, lookup_tpu.lookup),
           "reference": (retrieval_xla.product_key_topk, lookup_xla.lookup)}
  print(f"PEER layer core fwd+bwd, T={t}, d={d}, h={h}, k={k}, d_key={dk}, f32")
  print("| topology | N | kernels | compile | temp GiB | args GiB | compile s |")
  print("|---|---|---|---|---|---|---|")
  temps = {}
  n0 = int(a.ns.split(",")[0])
  # A v5e chip (16 GiB) cannot hold two f32 [N, d] tables and their gradients at N = 1024²,
  # d = 1024 whatever the kernels: it gets a quarter of the rows.
  for topology, n in (("v5e:2x2", n0 // 2), ("v5p:2x2x1", n0)):
    args = (sds((t, h, dk), f32), sds((1, n, dk // 2), f32), sds((1, n, dk // 2), f32),
            sds((t, d), f32), sds((n * n, d), f32), sds((n * n, d), f32), sds((t, d), f32))
    for name, (topk, lookup) in impls.items():
      fn = jax.grad(_layer_core_loss(topk, lookup, k, a.activation), argnums=tuple(range(6)))
      t0 = time.perf_counter()
      try:
        mem = aot.memory(aot.compile_for_tpu(fn, *args, topology=topology, per_device=True))
        temps[topology, name] = mem["temp"]
        print(f"| {topology} | {n}² | {name} | ok | {mem['temp'] / GiB:.2f} | "
              f"{mem['argument'] / GiB:.2f} | {time.perf_counter() - t0:.0f} |")
      except Exception as e:  # noqa: BLE001  (out of HBM is a compile error)
        why = "out of HBM" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__
        print(f"| {topology} | {n}² | {name} | FAILED: {why} | - | - | "
              f"{time.perf_counter() - t0:.0f} |")
  ref, fused = temps.get(("v5p:2x2x1", "reference")), temps.get(("v5p:2x2x1", "pallas"))
  if ref and fused is not None:
    print(f"TPU memory ratio (pallas / reference temp, PEER layer fwd+bwd, v5p:2x2x1): "
          f"{fused / ref:.4f}")


def main(argv=None):
  a = parse_args(argv)
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  if a.section in ("gpu", "all"):
    gpu_section(a)
  if a.section in ("tpu", "all"):
    tpu_section(a)


if __name__ == "__main__":
  main()
