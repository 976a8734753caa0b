"""Tokens/s of the train step, and its achieved FLOP/s as a fraction of a matmul's.

    python benchmarks/train_throughput.py [--config configs/dense_small.py] [--steps 20]

Both numbers are measured in the same run on the same machine, so the ratio is
meaningful even on a noisy host. FLOPs of the step: the usual MFU convention
(``moejax.benchmarking.train_steps``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.benchmarking.train_steps import load_config, measure  # noqa: E402


def main():
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  import jax
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "dense_small.py"))
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rounds", type=int, default=5, help="alternating step / matmul rounds")
  args = p.parse_args()
  r = measure(load_config(args.config), steps=args.steps, rounds=args.rounds)
  b, l = r["batch"]
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"params: {r['params'] / 1e6:.2f}M  batch {b}x{l}")
  print(f"{'train step':<24}{r['step_s'] * 1e3:10.1f} ms  {r['tokens_per_s']:12.0f} tokens/s  "
        f"{r['achieved'] / 1e9:8.2f} GFLOP/s")
  print(f"{'f32 matmul 1024^2':<24}{'':>10}     {'':>12}            {r['matmul'] / 1e9:8.2f} GFLOP/s")
  print(f"ratio (train step / matmul): {r['achieved'] / r['matmul']:.3f}")


if __name__ == "__main__":
  main()
