"""Tokens/s of the train step, and its achieved FLOP/s as a fraction of a matmul's.

    python benchmarks/train_throughput.py [--config configs/default.py] [--steps 20]

Both numbers are measured in the same run on the same machine, so the ratio is
meaningful even on a noisy host. FLOPs of the step: 6 x parameters per token for
the matmuls plus attention (12 x layers x length x heads x head_dim per token,
forward + backward, causal not discounted) — the usual MFU convention.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.training import state as state_lib  # noqa: E402


def load_config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def matmul_flops_per_sec(n: int = 1024, reps: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    a = f(a) * (1.0 / n)
  a.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def step_flops_per_token(config, num_params: int) -> float:
  m = config.model
  embed = m.vocab_size * m.d_model          # the embedding lookup does no matmul
  attn = 12 * m.num_layers * config.data.seq_len * m.num_heads * m.head_dim
  return 6.0 * (num_params - embed) + attn


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args()

  config = load_config(args.config)
  config.model.vocab_size = config.model.vocab_size or 258
  config.train.steps = args.steps + 2
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  b, l = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, config.model.vocab_size, size=(b, l + 1)).astype(np.int32)
  batch = state_lib.device_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                  "weights": np.ones((b, l), np.float32),
                                  "num_bytes": np.ones((b, l), np.float32)}, ts.mesh)
  with jax.set_mesh(ts.mesh):
    for _ in range(2):   # compile + warm up
      ts.state, m = step(ts.state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(args.steps):
      ts.state, m = step(ts.state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / args.steps

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.state[0]))
  tok_s = b * l / dt
  achieved = tok_s * step_flops_per_token(config, n_params)
  peak = matmul_flops_per_sec()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  params: {n_params / 1e6:.2f}M  "
        f"batch {b}x{l}")
  print(f"{'train step':<24}{dt * 1e3:10.1f} ms  {tok_s:12.0f} tokens/s  {achieved / 1e9:8.2f} GFLOP/s")
  print(f"{'f32 matmul 1024^2':<24}{'':>10}     {'':>12}            {peak / 1e9:8.2f} GFLOP/s")
  print(f"ratio (train step / matmul): {achieved / peak:.3f}")


if __name__ == "__main__":
  main()
