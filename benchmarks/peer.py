"""PEER benchmark: product-key retrieval vs exhaustive top-k; PEER / PKM layer vs a dense FFN.

Prints two tables, every row measured in this run on this device (median of --iters):

1. Retrieval at N = n² keys (default 1024²): ``product_key_topk`` (two top-k over n
   sub-keys + top-k over ~k·ln k candidates) against an exhaustive top-k over all N
   product keys, which are precomputed and stored (the honest O(N·d_key) baseline: one
   matmul against [N, d_key] and a top-k over N scores per query-head).
2. fwd+bwd tokens/s (gradients w.r.t. the input and every parameter, tables included) of a
   PEER layer at N = 128², 256², 512², 1024² and of a dense FFN with equal active expert
   FLOPs (h·k hidden units), and their ratio; optionally a PKM layer.
3. The whole train step of a small LM with a PEER block at the same N, with dense optax
   Adam on the tables vs row-sparse lazy Adam (``optim.table_update``), and their ratio.

  python benchmarks/peer.py                 # CPU, about 2 minutes
  python benchmarks/peer.py --small         # fewer tokens, N up to 512²
  python benchmarks/peer.py --batch=16 --length=512 --d_model=512 --dtype=bfloat16   # accelerator
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moejax.benchmarking.timing import median_seconds  # noqa: E402
# Named lm_train_step here: tests/kernels/test_cpu_kernels.py still imports it from this script.
from moejax.benchmarking.train_steps import peer_lm_train_step as lm_train_step  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="fewer tokens, N up to 512²")
  p.add_argument("--retrieval_n", type=int, default=1024, help="n for table 1 (N = n²)")
  p.add_argument("--retrieval_tokens", type=int, default=32)
  p.add_argument("--ns", default="128,256,512,1024", help="n values for table 2")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--top_k", type=int, default=16)
  p.add_argument("--d_key", type=int, default=128)
  p.add_argument("--query_norm", default="batch")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--pkm", action="store_true", help="also time a PKM layer (k = 2·top_k)")
  p.add_argument("--iters", type=int, default=5)
  a = p.parse_args()
  if a.small:
    a.ns = a.ns if a.ns != "128,256,512,1024" else "128,256,512"
    a.batch, a.length, a.retrieval_tokens = 2, 64, 16
  return a


def bench_retrieval(a):
  import jax
  import jax.numpy as jnp
  from moejax.kernels import reference
  from moejax.kernels import retrieval_xla as pk
  n, h, k, d = a.retrieval_n, a.heads, a.top_k, a.d_key
  kq, k1, k2 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (a.retrieval_tokens, h, d))
  keys1 = jax.random.normal(k1, (1, n, d // 2))
  keys2 = jax.random.normal(k2, (1, n, d // 2))
  full = jax.block_until_ready(reference.full_product_keys(keys1, keys2))  # [1, N, d], stored

  fast = jax.jit(lambda q, a_, b: pk.product_key_topk(q, a_, b, k))

  @jax.jit
  def exhaustive(q, full):
    return jax.lax.top_k(jnp.einsum("thd,nd->thn", q, full[0]), k)

  s_f, i_f = fast(q, keys1, keys2)
  s_e, i_e = exhaustive(q, full)
  same = float(jnp.mean(jnp.all(jnp.sort(i_f, -1) == jnp.sort(i_e, -1), -1)))
  t_fast = median_seconds(fast, q, keys1, keys2, iters=a.iters)
  t_exh = median_seconds(exhaustive, q, full, iters=max(2, a.iters // 2))
  del full
  print(f"\n## Retrieval, N = {n}² = {n * n:,}, d_key = {d}, h = {h}, k = {k}, "
        f"{a.retrieval_tokens} tokens ({a.retrieval_tokens * h} queries)")
  print("| method | ms / call | queries / s | ratio |\n|---|---|---|---|")
  qn = a.retrieval_tokens * h
  print(f"| exhaustive top-k over N (stored keys) | {t_exh * 1e3:.1f} | {qn / t_exh:,.0f} | 1.0 |")
  print(f"| product keys | {t_fast * 1e3:.2f} | {qn / t_fast:,.0f} | {t_exh / t_fast:.0f}x faster |")
  print(f"identical index sets for {same:.1%} of the queries (the rest: near-ties in float32)")


def bench_layers(a):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from moejax.layers import dense, peer, pkm
  from moejax.layers.base import TableParam
  dtype = jnp.dtype(a.dtype)
  tokens = a.batch * a.length
  x = jax.random.normal(jax.random.key(1), (a.batch, a.length, a.d_model), dtype)

  # Functional steps (split / merge): only y or the gradients leave the jit, not the
  # (possibly mutated) module state with its tables.
  def steps(m):
    graphdef, tables, params, rest = nnx.split(m, TableParam, nnx.Param, ...)

    def loss(tables, params, x):
      y, _ = nnx.merge(graphdef, tables, params, rest, copy=True)(x)
      return jnp.mean(jnp.square(y.astype(jnp.float32)))

    fwd = jax.jit(lambda t, p, x: nnx.merge(graphdef, t, p, rest, copy=True)(x)[0])
    full = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    no_tables = jax.jit(jax.grad(loss, argnums=(1, 2)))
    return [(f, (tables, params, x)) for f in (fwd, no_tables, full)]

  def measure(m):
    return tuple(median_seconds(f, *args, iters=a.iters) for f, args in steps(m))

  rows = []
  hk = a.heads * a.top_k
  m = dense.DenseFFN(a.d_model, hk, dtype=dtype, rngs=nnx.Rngs(0))
  t_dense = measure(m)
  rows.append((f"dense FFN, d_ff = h·k = {hk}", "-", t_dense))
  t_dense = t_dense[-1]
  del m
  for n in [int(s) for s in a.ns.split(",")]:
    m = peer.PEER(a.d_model, peer.PEERSettings(num_experts_sqrt=n, heads=a.heads, top_k=a.top_k,
                                               d_key=a.d_key, query_norm=a.query_norm),
                  dtype=dtype, rngs=nnx.Rngs(0))
    rows.append((f"PEER N = {n}²", f"{2 * n * n * a.d_model / 1e6:.1f}M", measure(m)))
    del m
    if a.pkm:
      m = pkm.PKM(a.d_model, pkm.PKMSettings(num_keys_sqrt=n, heads=a.heads, top_k=2 * a.top_k,
                                             d_key=a.d_key, query_norm=a.query_norm),
                  dtype=dtype, rngs=nnx.Rngs(0))
      rows.append((f"PKM N = {n}² (k = {2 * a.top_k})", f"{n * n * a.d_model / 1e6:.1f}M",
                   measure(m)))
      del m
  print(f"\n## Layer fwd+bwd, {tokens} tokens ({a.batch}×{a.length}), d_model = {a.d_model}, "
        f"h = {a.heads}, k = {a.top_k}, d_key = {a.d_key}, query_norm = {a.query_norm}, {a.dtype}")
  print("fwd+bwd: gradients w.r.t. x and every parameter (dense [N, d] table gradients);"
        " 'no table grads': w.r.t. x, query and keys only (what remains without the dense"
        " table-gradient scatter).")
  print("| layer | table params | fwd ms | fwd+bwd no table grads ms | fwd+bwd ms | fwd+bwd tokens/s"
        " | vs dense |\n|---|---|---|---|---|---|---|")
  for name, params, (t_f, t_nt, t) in rows:
    print(f"| {name} | {params} | {t_f * 1e3:.1f} | {t_nt * 1e3:.1f} | {t * 1e3:.1f} | "
          f"{tokens / t:,.0f} | {t_dense / t:.3f} |")


def bench_train_step(a):
  """Whole train step of a 2-block LM with PEER in block 1: dense vs row-sparse table updates."""

  def make(n, update):
    return lm_train_step(n, update, d_model=a.d_model, heads=a.heads, top_k=a.top_k,
                         d_key=a.d_key, query_norm=a.query_norm, batch=a.batch,
                         length=a.length, dtype=a.dtype)

  tokens = a.batch * a.length
  print(f"\n## Train step (2-block LM, PEER in block 1, AdamW), {tokens} tokens, "
        f"d_model = {a.d_model}, h = {a.heads}, k = {a.top_k}")
  print("dense: optax Adam over whole [N, d] tables; row_sparse: lazy Adam on retrieved rows only")
  print("| N | dense ms | row_sparse ms | dense tokens/s | row_sparse tokens/s | speed-up |")
  print("|---|---|---|---|---|---|")
  for n in [int(s) for s in a.ns.split(",")]:
    t_dense = median_seconds(make(n, "dense"), iters=a.iters)
    t_sparse = median_seconds(make(n, "row_sparse"), iters=a.iters)
    print(f"| {n}² | {t_dense * 1e3:.1f} | {t_sparse * 1e3:.1f} | {tokens / t_dense:,.0f} | "
          f"{tokens / t_sparse:,.0f} | {t_dense / t_sparse:.2f}x |")


def main():
  a = parse_args()
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  import jax
  print(f"device: {jax.devices()[0].device_kind} × {jax.device_count()}, jax {jax.__version__}")
  bench_retrieval(a)
  bench_layers(a)
  bench_train_step(a)


if __name__ == "__main__":
  main()
