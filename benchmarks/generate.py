"""Decode throughput: KV cache vs re-running the full forward pass for every token.

    python benchmarks/generate.py [--ffn dense|moe|peer|pkm] [--new 512] [--batch 1]

Builds the small LM (configs/dense_small.py sizes, byte vocabulary) with the chosen
feed-forward kind in its middle block, random weights, and generates ``--new`` tokens
greedily after a 4-token prompt, both ways, each as one jitted loop (compile excluded, best
of ``--repeats``). Prints tokens/s of each and the speed-up of the cache.
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from moejax import config as config_lib
from moejax.generation import Generator
from moejax.model import Transformer

SPARSE = {
    "dense": {},
    "moe": {"moe": dict(num_experts=8, top_k=2, dispatch="dropless")},
    "peer": {"peer": dict(num_experts_sqrt=128, heads=4, top_k=8, d_key=64)},
    "pkm": {"pkm": dict(num_keys_sqrt=128, heads=4, top_k=8, d_key=64)},
}


def main():
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  ap = argparse.ArgumentParser()
  ap.add_argument("--ffn", default="dense", choices=list(SPARSE))
  ap.add_argument("--new", type=int, default=512)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()

  c = config_lib.default_config()
  c.model.vocab_size = 258
  if args.ffn != "dense":
    c.model.sparse_ffn, c.model.sparse_layers = args.ffn, "middle"
    for section, fields in SPARSE[args.ffn].items():
      c[section].update(fields)
  config_lib.validate(c)
  model = Transformer(c, rngs=nnx.Rngs(0))
  gen = Generator(model)
  prompts = [[102, 103, 104, 34]] * args.batch        # "def " in byte ids
  print(f"# {jax.devices()[0].platform}, ffn={args.ffn}, batch={args.batch}, "
        f"{args.new} new tokens after a 4-token prompt, d_model={c.model.d_model}, "
        f"layers={c.model.num_layers}")
  rates = {}
  for name, use_cache in (("kv_cache", True), ("full_forward", False)):
    gen.generate(prompts, args.new, temperature=0.0, use_cache=use_cache)   # compile
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = gen.generate(prompts, args.new, temperature=0.0, use_cache=use_cache)
      best = min(best, time.perf_counter() - t0)
    rates[name] = args.batch * args.new / best
    print(f"{name:13s} {rates[name]:10.1f} tokens/s  ({best:.2f} s)")
    if name == "kv_cache":
      ref = out
    else:
      same = all((a == b).all() for a, b in zip(ref, out))
      print(f"same tokens both ways: {same}")
  print(f"speed-up of the cache: {rates['kv_cache'] / rates['full_forward']:.1f}x")


if __name__ == "__main__":
  main()
