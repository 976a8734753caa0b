"""The CPU backend's decoding kernels next to the XLA programs they replace, side by side.

    python benchmarks/decode_kernels.py [--iters 20] [--sets 5] [--tokens 8] [--tiny]

At the shapes of ``benchmarks/generate.py``'s batch-8 decode step (Mixtral-shaped: d_model
512, expert hidden 1792, 8 experts top-2, 8 query / 2 KV heads of 64, a 192-slot cache,
vocab 32000), each timed round-robin in one process (``moejax.benchmarking.timing``):

* routed FFN: ``native.routed_ffn`` vs the blocked XLA path (``moe_dispatch``), 8 tokens
  (``--tokens``: more, e.g. a prompt's, where the CPU backend keeps the blocked path);
* few-row matmul: ``native.few_row_matmul`` vs ``jnp.dot``, the output layer's
  ``[8, 512] @ [512, 32000]``;
* cached attention: ``native.cached_attention`` vs ``jax.nn.dot_product_attention`` over
  the cache;
* greedy argmax: the CPU backend's blocked argmax vs ``jnp.argmax``, ``[8, 32000]``.

Each call reads one of ``--sets`` copies of its weights in turn, as a decode step reads
each block's weights after every other block's have gone through the cache. Prints ms per
call, XLA / native, and the native call's weight bytes over its time (GB/s).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moejax import platform_env  # noqa: E402

platform_env.skip_absent_tpu()   # before JAX is imported: no libtpu start-up lines without a TPU


def _cases(tiny: bool, sets: int, tokens: int):
  """{name: (shape text, weight bytes per call, native fn, XLA fn)}: zero-argument calls,
  each reading the next of ``sets`` weight copies."""
  import itertools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from moejax.backends.cpu import argmax, moe_dispatch, native

  b, d, f, e, k = (8, 64, 96, 8, 2) if tiny else (8, 512, 1792, 8, 2)
  vocab, heads, kv, dh, slots = (500, 4, 2, 16, 24) if tiny else (32000, 8, 2, 64, 192)
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05)

  def rotating(make, fns):
    """Zero-argument versions of each fn(*operands), one operand set after another."""
    operands = [make() for _ in range(sets)]
    jitted = [jax.jit(fn) for fn in fns]
    return [lambda j=j, c=itertools.cycle(operands): j(*next(c)) for j in jitted]

  x = normal(tokens, d)
  expert = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(tokens)]).astype(np.int32))
  weight = jnp.asarray(rng.random((tokens, k), dtype=np.float32))
  distinct = len(set(np.asarray(expert).ravel().tolist()))
  ffn = rotating(lambda: (normal(e, d, f), normal(e, d, f), normal(e, f, d)), [
      lambda wi, wg, wo: native.routed_ffn(x, expert, weight, wi, wg, wo, "silu"),
      lambda wi, wg, wo: moe_dispatch._blocked_combine(x, expert, weight, (wi, wg, wo),
                                                       "silu", 0)])
  out = rotating(lambda: (normal(d, vocab),),
                 [lambda w: native.few_row_matmul(x, w), lambda w: jnp.dot(x, w)])
  q = normal(b, 1, heads, dh)
  mask = jnp.ones((b, 1, slots), bool)
  attend = rotating(lambda: (normal(b, slots, kv, dh), normal(b, slots, kv, dh)), [
      lambda kk, vv: native.cached_attention(q, kk, vv, mask),
      lambda kk, vv: jax.nn.dot_product_attention(q, kk, vv, mask=mask[:, None])])
  top = rotating(lambda: (normal(b, vocab),),
                 [argmax.argmax, lambda z: jnp.argmax(z, -1).astype(jnp.int32)])
  return {
      "routed FFN": (f"{tokens} tokens, {distinct} of {e} experts, {d}x{f}", distinct * 3 * d * f * 4,
                     *ffn),
      "few-row matmul": (f"[{b}, {d}] @ [{d}, {vocab}]", d * vocab * 4, *out),
      "cached attention": (f"{b} rows x {heads} heads over {slots} slots, {kv} KV heads",
                           2 * b * slots * kv * dh * 4, *attend),
      "greedy argmax": (f"[{b}, {vocab}]", b * vocab * 4, *top),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--sets", type=int, default=5, help="weight copies each kernel cycles through")
  ap.add_argument("--tokens", type=int, default=8, help="tokens of the routed FFN")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (tests)")
  args = ap.parse_args()
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  from moejax.backends.cpu import native
  from moejax.benchmarking.timing import round_robin
  if not native.available():
    sys.exit("error: the C++ CPU kernels did not build (see the warning above); nothing to time")
  print("| computation | shape | native ms | XLA ms | XLA / native | native GB/s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, (shape, nbytes, mine, xla) in _cases(args.tiny, args.sets, args.tokens).items():
    t_mine, t_xla = round_robin([mine, xla], args.iters)
    print(f"| {name} | {shape} | {t_mine * 1e3:.3f} | {t_xla * 1e3:.3f} | "
          f"{t_xla / t_mine:.2f} | {nbytes / t_mine / 1e9:.1f} |")


if __name__ == "__main__":
  main()
