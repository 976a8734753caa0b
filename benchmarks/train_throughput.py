"""Tokens/s of the train step, and its achieved FLOP/s as a fraction of a matmul's.

    python benchmarks/train_throughput.py [--config configs/dense_small.py] [--steps 20]

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


def matmul_timer(n: int = 1024, reps: int = 10):
  """A function that times ``reps`` f32 ``[n, n] @ [n, n]`` matmuls and returns FLOP/s."""
  a0 = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a0).block_until_ready()

  def flops_per_sec() -> float:
    a = a0
    t = time.perf_counter()
    for _ in range(reps):
      a = f(a) * (1.0 / n)
    a.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)
  return flops_per_sec


def step_flops_per_token(config, num_params: int) -> float:
  m = config.model
  embed = m.vocab_size * m.d_model          # the embedding lookup does no matmul
  attn = 12 * m.num_layers * config.data.seq_len * m.num_heads * m.head_dim
  return 6.0 * (num_params - embed) + attn


def train_step_setup(config, total_steps: int):
  """``(train state, jitted step, device batch of random tokens)`` for ``config``, whose
  schedule is set to ``total_steps``."""
  config.model.vocab_size = config.model.vocab_size or 258
  config.train.steps = total_steps
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  b, l = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, config.model.vocab_size, size=(b, l + 1)).astype(np.int32)
  batch = state_lib.device_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                  "weights": np.ones((b, l), np.float32),
                                  "num_bytes": np.ones((b, l), np.float32)}, ts.mesh)
  return ts, step, batch


def measure(config, *, steps: int = 20, rounds: int = 5) -> dict:
  """Times ``config``'s train step and an f32 matmul in alternating rounds (medians: on a
  shared host the machine's speed drifts, and both sides of the ratio should see the same
  drift). Returns step seconds, tokens/s, achieved and matmul FLOP/s, and the params."""
  ts, step, batch = train_step_setup(config, steps + rounds + 2)
  b, l = config.data.batch_size, config.data.seq_len
  matmul = matmul_timer()
  step_times, peaks = [], []
  per_round = max(1, steps // rounds)
  with jax.set_mesh(ts.mesh):
    for _ in range(2):   # compile + warm up
      ts.state, m = step(ts.state, batch)
    jax.block_until_ready(m)
    for _ in range(rounds):
      t = time.perf_counter()
      for _ in range(per_round):
        ts.state, m = step(ts.state, batch)
      jax.block_until_ready(m)
      step_times.append((time.perf_counter() - t) / per_round)
      peaks.append(matmul())
  dt = float(np.median(step_times))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.state[0]))
  tok_s = b * l / dt
  return {"step_s": dt, "tokens_per_s": tok_s, "params": n_params, "batch": (b, l),
          "achieved": tok_s * step_flops_per_token(config, n_params),
          "matmul": float(np.median(peaks))}


def main():
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
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
