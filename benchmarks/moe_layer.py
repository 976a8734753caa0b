"""MoE layer benchmark: throughput against a dense FFN, dispatch modes, all-to-all bytes.

Prints one table:

* fwd+bwd tokens/s of the MoE layer (top-k of E experts, each of hidden ``d_ff``) per
  dispatch mode, and of a dense FFN with the same *active* parameters (hidden
  ``top_k * d_ff``), and their ratio, measured in the same run on the same device;
* the all-to-all traffic of expert parallelism, read from the compiled HLO of the layer
  on a ``data x expert`` mesh of fake CPU devices: every ``all-to-all`` op and its
  operand shapes (bytes one device receives per call, its own chunk included).

  python benchmarks/moe_layer.py                       # small, CPU, ~1 minute
  python benchmarks/moe_layer.py --batch=32 --length=512 --d_model=512 --d_ff=1024
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_DEVICES = 8


def _setup_devices():
  """8 fake CPU devices for the expert-parallel mesh (before JAX initialises its backend)."""
  import jax
  jax.config.update("jax_num_cpu_devices", _DEVICES)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--d_ff", type=int, default=512, help="hidden size of each expert")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--gated", action="store_true")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--mesh_data", type=int, default=2)
  p.add_argument("--mesh_expert", type=int, default=4)
  p.add_argument("--skip_ragged", action="store_true",
                 help="skip dropless with jax.lax.ragged_dot (slow on CPU: a masked dense dot)")
  return p.parse_args()


def _time(fn, *args, iters: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))          # compile + warm up
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _time_round_robin(steps, x, *, iters: int) -> list[float]:
  """Median seconds per call of each ``(step, state)``, timed in turns (one call of each
  per round) so that load changes on a shared host hit all paths alike."""
  import jax
  for step, state in steps:
    jax.block_until_ready(step(state, x))   # compile + warm up
  times = [[] for _ in steps]
  for _ in range(iters):
    for i, (step, state) in enumerate(steps):
      t = time.perf_counter()
      jax.block_until_ready(step(state, x))
      times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]


def _fwd_bwd(module, x, mask):
  """jit(state, x) -> grads of mean(y^2) + aux losses w.r.t. params and x."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, state = nnx.split(module)

  @jax.jit
  def step(state, x):
    def loss(state, x):
      y, aux = nnx.merge(graphdef, state)(x, mask=mask)
      return jnp.mean(y.astype(jnp.float32) ** 2) + aux.total_loss()
    return jax.grad(loss, argnums=(0, 1))(state, x)

  return step, state


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s8": 1}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|f64|s8)\[([0-9,]*)\]")


def all_to_all_ops(hlo_text: str) -> list[tuple[str, int]]:
  """(result shape text, bytes) of every all-to-all op in compiled HLO text."""
  ops = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-to-all\(", line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    nbytes = sum(_DTYPE_BYTES[t] * _prod(d) for t, d in shapes)
    ops.append((m.group(1).split("{")[0] + ("..." if len(shapes) > 1 else ""), nbytes))
  return ops


def _prod(dims: str) -> int:
  out = 1
  for d in filter(None, dims.split(",")):
    out *= int(d)
  return out


def main():
  args = parse_args()
  from moejax import backends
  backends.prepare_process()   # before JAX's first computation
  _setup_devices()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import moejax.layers.moe as moe
  from moejax import sharding
  from moejax.layers.dense import DenseFFN, DenseSettings
  from moejax.layers.moe import routing

  b, l, d = args.batch, args.length, args.d_model
  tokens = b * l
  x = jax.random.normal(jax.random.key(0), (b, l, d), jnp.float32)
  mask = jnp.ones((b, l), bool)

  def make(dispatch, impl="auto", cf=args.capacity_factor, group_size=0):
    cfg = moe.default_config()
    cfg.update(dict(num_experts=args.experts, top_k=args.top_k, dispatch=dispatch,
                    dropless_impl=impl, capacity_factor_train=cf, gated=args.gated,
                    group_size=group_size))
    return moe.MoE(moe.MoESettings.from_config(cfg), d_model=d, d_ff=args.d_ff,
                   rngs=nnx.Rngs(params=0, router=1))

  cap = routing.capacity(l, args.experts, args.top_k, args.capacity_factor, 4)
  cases = [(f"dense FFN d_ff={args.top_k * args.d_ff} (same active params)",
            DenseFFN(d, args.top_k * args.d_ff, DenseSettings(gated=args.gated),
                     rngs=nnx.Rngs(0))),
           (f"moe einsum cf={args.capacity_factor} (C={cap})",
            make("einsum", "auto", args.capacity_factor)),
           ("moe einsum cf=0 (C=S, no drops)", make("einsum", "auto", 0.0)),
           ("moe dropless blocked (sort+pad+batched einsum)", make("dropless", "blocked", 0.0))]
  if not args.skip_ragged:
    cases.append(("moe dropless ragged_dot", make("dropless", "ragged_dot", 0.0)))
  steps = [_fwd_bwd(module, x, mask) for _, module in cases]
  times = _time_round_robin(steps, x, iters=args.iters)
  t_dense = times[0]
  rows = [(name, t, "" if i == 0 else f"{t_dense / t:.2f}")
          for i, ((name, _), t) in enumerate(zip(cases, times))]

  print(f"\nMoE layer fwd+bwd on {jax.devices()[0].platform} ({jax.device_count()} devices, "
        f"single-device timings), batch={b} length={l} d_model={d} d_ff={args.d_ff} "
        f"experts={args.experts} top_k={args.top_k} gated={args.gated}\n")
  print(f"{'path':<56} {'ms/step':>9} {'tokens/s':>11} {'vs dense':>9}")
  for name, t, ratio in rows:
    print(f"{name:<56} {t * 1e3:9.2f} {tokens / t:11.0f} {ratio:>9}")

  # ---- all-to-all bytes of expert parallelism, from the compiled HLO
  mesh = sharding.make_mesh(data=args.mesh_data, expert=args.mesh_expert)
  shards = args.mesh_data * args.mesh_expert
  # Routing groups are split over the data x expert shards. One group per sequence when
  # the batch splits; else groups of `group` tokens (a divisor of the length) so that the
  # b·l / group groups do, and the input goes in replicated (the layer shards the groups).
  group = l
  if b % shards:
    group = max((s for s in range(1, l + 1) if l % s == 0 and (b * l // s) % shards == 0),
                default=0)
    if not group:
      print(f"\nexpert-parallel section skipped: {b} x {l} tokens cannot form a multiple of "
            f"{shards} (mesh data x expert) routing groups within sequences")
      return
    print(f"\nbatch {b} does not split over {shards} data x expert shards: the expert-parallel "
          f"section routes groups of {group} tokens ({b * l // group} groups)")
  cap = routing.capacity(group, args.experts, args.top_k, args.capacity_factor, 4)
  per_dev_groups = b * l // group // shards
  expect = args.experts * per_dev_groups * cap * d * 4
  for dispatch in ("expert_parallel", "einsum"):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules()):
      m = make(dispatch, group_size=0 if group == l else group)
      xs = jax.device_put(x, sharding.batch_sharding(mesh, 3) if group == l
                          else sharding.replicated(mesh))
      step, state = _fwd_bwd(m, xs, mask)
      hlo = step.lower(state, xs).compile().as_text()
      t_ep = _time(step, state, xs, iters=args.iters)
    ops = all_to_all_ops(hlo)
    title = ("Expert parallel (all_to_all in shard_map)" if dispatch == "expert_parallel"
             else "GSPMD einsum path (sharding constraints only)")
    print(f"\n{title}, mesh data={args.mesh_data} x expert={args.mesh_expert}, fwd+bwd: "
          f"{t_ep * 1e3:.2f} ms/step ({tokens / t_ep:.0f} tokens/s on {shards} fake CPU devices "
          f"sharing the host's cores)")
    print(f"{'all-to-all op (compiled HLO result shape)':<64} {'bytes/device':>13}")
    for shape, nbytes in ops:
      print(f"{shape[:64]:<64} {nbytes:13,d}")
    others = {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
              for op in ("all-gather", "all-reduce", "collective-permute", "reduce-scatter")}
    print(f"{len(ops)} all-to-all ops, {sum(n for _, n in ops):,d} bytes received per device per "
          f"step (incl. its own chunk); other collectives: "
          + ", ".join(f"{k} x{v}" for k, v in others.items()))
  print(f"expected per all-to-all: E x groups/device x C x D x 4 bytes = {args.experts} x "
        f"{per_dev_groups} x {cap} x {d} x 4 = {expect:,d}")

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
