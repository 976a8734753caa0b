"""The row-sparse PEER step's native row kernels alone, and the host's streaming bandwidth.

At a small table (N = 128²) a table and its Adam moments stay in a large L3; at N = 1024²
every retrieved row comes from DRAM. ``benchmarks/row_memory.py`` times these kernels at
both sizes, on the step's shapes, next to the step itself and to :func:`stream_fn`, to see
how much of the step's growth with N the row kernels' memory traffic explains.
"""

from __future__ import annotations

D_ROW = 256   # expert row width of the timed PEER (d = 256)

# Calls per train step of each row kernel (PEER: two tables, forward and backward).
PER_STEP = {"gather_dot": 2, "gather_weighted_sum": 2, "adam_rows": 2}


def row_kernel_fns(n: int, tokens: int, retrievals: int, seed: int = 0):
  """``({name: zero-argument fn}, distinct rows)``: the step's row kernels (:data:`PER_STEP`)
  on an N = n² table of rows [D_ROW] with its Adam moments, ``tokens`` × ``retrievals``
  uniform random rows; the lazy Adam (``adam_rows``, gradients ``[U, d]``) updates the
  table in place."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax.backends.cpu import native as cpu_kernels
  from moejax.kernels import row_plan
  if not cpu_kernels.available():
    raise RuntimeError("the CPU backend's native kernels did not build (see the warning above)")
  rows_n = n * n
  rng = np.random.default_rng(seed)
  idx = jnp.asarray(rng.integers(0, rows_n, size=(tokens, retrievals)), jnp.int32)
  rows = row_plan.unique_rows(idx, rows_n)          # as the step: [U], padded with N
  u = int(jnp.sum(rows < rows_n))                    # the distinct rows Adam touches
  coefs = jnp.asarray(rng.normal(size=(tokens, retrievals)) * 0.01, jnp.float32)
  vec = jnp.asarray(rng.normal(size=(tokens, D_ROW)), jnp.float32)
  grads = jnp.asarray(rng.normal(size=(rows.shape[0], D_ROW)) * 0.01, jnp.float32)   # [U, d]
  keys = jax.random.split(jax.random.key(seed), 3)
  state = {"t": jax.random.normal(keys[0], (rows_n, D_ROW)) * 0.02,
           "m": jnp.zeros((rows_n, D_ROW)), "v": jnp.zeros((rows_n, D_ROW))}
  adam = jax.jit(lambda t, m, v: cpu_kernels.adam_rows(
      t, m, v, rows, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, c1=0.5, c2=0.5),
      donate_argnums=(0, 1, 2))
  gd = jax.jit(cpu_kernels.gather_dot)
  gws = jax.jit(cpu_kernels.gather_weighted_sum)

  def run_adam():
    state["t"], state["m"], state["v"] = adam(state["t"], state["m"], state["v"])
    return state["t"]
  return {"gather_dot": lambda: gd(state["t"], idx, vec),
          "gather_weighted_sum": lambda: gws(state["t"], idx, coefs),
          "adam_rows": run_adam}, u


def stream_fn(mib: int):
  """In-place ``x *= 1.0001`` over ``mib`` MiB (read and written, XLA, all threads) and the
  bytes it moves: the host's streaming bandwidth."""
  import jax
  import jax.numpy as jnp
  holder = {"x": jnp.ones((mib << 18,), jnp.float32)}
  f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)

  def run():
    holder["x"] = f(holder["x"])
    return holder["x"]
  return run, 2 * (mib << 20)
