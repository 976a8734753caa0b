"""Train steps on random tokens, as the benchmarks time them, and their achieved FLOP/s.

* :func:`train_step_setup` / :func:`measure`: a config's train step, timed in alternating
  rounds with an f32 matmul, so that the ratio of their FLOP/s is measured side by side.
  FLOPs of the step: 6 × parameters per token for the matmuls plus attention (12 × layers ×
  length × heads × head_dim per token, forward + backward, causal not discounted), the usual
  MFU convention (:mod:`moejax.flops` counts the model's products one by one instead).
* :func:`peer_lm_train_step` / :func:`peer_lm_step_times`: a 2-block LM with PEER in block 1,
  with dense Adam or row-sparse lazy Adam on its tables.
"""

from __future__ import annotations

import gc
import importlib.util
import time

from moejax.benchmarking import timing


def load_config(path: str):
  """``get_config()`` of the config file at ``path``."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _random_batch(ts, batch: int, length: int, vocab_size: int):
  """A device batch of random tokens ``[batch, length]`` (every weight 1) on ``ts``'s mesh."""
  import numpy as np
  from moejax.training import state as state_lib
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, vocab_size, size=(batch, length + 1)).astype(np.int32)
  ones = np.ones((batch, length), np.float32)
  return state_lib.device_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                 "weights": ones, "num_bytes": ones}, ts.mesh)


def train_step_setup(config, total_steps: int):
  """``(train state, jitted step, device batch of random tokens)`` for ``config``, whose
  schedule is set to ``total_steps``."""
  from moejax.training import state as state_lib
  config.model.vocab_size = config.model.vocab_size or 258
  config.train.steps = total_steps
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  return ts, step, _random_batch(ts, config.data.batch_size, config.data.seq_len,
                                 config.model.vocab_size)


def matmul_timer(n: int = 1024, reps: int = 10):
  """A function that times ``reps`` f32 ``[n, n] @ [n, n]`` matmuls and returns FLOP/s."""
  import jax
  import jax.numpy as jnp
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
  """Train FLOPs per token by the MFU convention (see the module docstring)."""
  m = config.model
  embed = m.vocab_size * m.d_model          # the embedding lookup does no matmul
  attn = 12 * m.num_layers * config.data.seq_len * m.num_heads * m.head_dim
  return 6.0 * (num_params - embed) + attn


def measure(config, *, steps: int = 20, rounds: int = 5) -> dict:
  """Times ``config``'s train step and an f32 matmul in alternating rounds (medians: both
  sides of the ratio see the same drift of a shared host). Returns step seconds, tokens/s,
  achieved and matmul FLOP/s, and the parameter count."""
  import jax
  import numpy as np
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


def matmul_fraction(config_path: str, iters: int) -> tuple[float, float, float]:
  """(train step GFLOP/s, matmul GFLOP/s, their fraction) of the config at ``config_path``."""
  rounds = max(iters, 3)
  r = measure(load_config(config_path), steps=5 * rounds, rounds=rounds)
  return r["achieved"] / 1e9, r["matmul"] / 1e9, r["achieved"] / r["matmul"]


def peer_lm_train_step(n: int, update: str, *, d_model: int, heads: int, top_k: int, d_key: int,
                       query_norm: str, batch: int, length: int, dtype: str = "float32"):
  """A zero-argument fn running one train step (returns its metrics) of a 2-block LM with
  PEER (N = n²) in block 1, table_update = ``update`` (dense | row_sparse); random tokens."""
  from moejax import config as config_lib
  from moejax.training import state as state_lib
  c = config_lib.default_config()
  c.model.update(vocab_size=258, d_model=d_model, num_layers=2, num_heads=4,
                 head_dim=d_model // 4, d_ff=4 * d_model, sparse_ffn="peer", sparse_layers="1",
                 dtype=dtype)
  c.peer.update(num_experts_sqrt=n, heads=heads, top_k=top_k, d_key=d_key, query_norm=query_norm)
  c.data.update(batch_size=batch, seq_len=length)
  c.optim.update(table_update=update, warmup_steps=0)
  c.mesh.data = 1
  ts = state_lib.create_train_state(c)
  step = state_lib.make_train_step(ts)
  data = _random_batch(ts, batch, length, 258)
  holder = {"state": ts.state}

  def run():
    holder["state"], m = step(holder["state"], data)
    return m
  return run


def peer_lm_step_times(n: int, n_small: int, iters: int, **lm) -> dict[str, float]:
  """Median seconds per step of :func:`peer_lm_train_step` (``lm``: its keyword arguments),
  ``{"<update> N=<n>²": s}`` for both updates at both sizes. The dense N = n² step runs alone
  (two such states with their Adam moments would crowd a 24 GiB host), then the other three
  round-robin, so that the row-sparse N = n² / n_small² ratio is measured side by side (on a
  shared host a load change between two separate timings moved it by more than the effect
  being measured)."""
  out = {}

  def timed(keys):
    fns = [peer_lm_train_step(size, update, **lm) for size, update in keys]
    for fn in fns:
      timing.ready(fn())   # + round_robin's warm-up call: the first steps still grow the heap
    for (size, update), t in zip(keys, timing.round_robin(fns, iters)):
      out[f"{update} N={size}²"] = t
    del fns
    gc.collect()

  timed([(n, "dense")])
  timed([(n, "row_sparse"), (n_small, "row_sparse"), (n_small, "dense")])
  return out
