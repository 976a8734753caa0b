"""moejax against its PyTorch peers on the same CPU, same shapes, same run.

Every PyTorch / moejax pair is built at the same shapes *with the same weights* (copied
from the torch module into the moejax one) and timed round-robin in one run (one call of
each per round after a warm-up call, median of --iters), so a load change on a shared
host hits both sides alike. torch uses as many threads as JAX's CPU client (all cores).

Workloads (defaults; --small shrinks them):
  a. PEER layer forward, N = 1024², d = 256, h = 8, k = 16, d_key = 128, 8 × 512 tokens,
     softmax scores, exact GELU, no query norm. torch: PEER_pytorch.PEER (no_grad).
  b. PEER layer + Adam step (loss = mean(y²)) at N = 1024² and 128²: torch.optim.Adam
     over every parameter vs moejax optax Adam over every parameter (dense tables), and
     vs moejax lazy row-sparse Adam on the tables (a different algorithm for the rows
     not retrieved in the step; moejax/training/row_sparse.py).
  c. Train step of a 2-block LM with PEER in block 1 (d_model 256, 8 × 512 tokens):
     dense Adam vs row-sparse lazy Adam on the tables at N = 1024² and 128² (moejax only:
     in a child process, see below).
  d. MoE, top-2 of 8 SwiGLU experts, d = 512, expert hidden 1024, 8 × 512 tokens, fwd+bwd
     (grads w.r.t. parameters): HF transformers MixtralSparseMoeBlock vs moejax MoE
     (dispatch dropless, and einsum at capacity factor 1.25; train mode, default aux losses).
  e. Dense SwiGLU FFN, hidden 2048 (the active parameters of top-2 × 1024): three
     nn.Linear vs moejax DenseFFN; also moejax dropless MoE / moejax dense.
  f. The dense LM's train step (configs/dense_small.py): FLOP/s as a fraction of a same-run matmul's
     (benchmarks/train_throughput.py; moejax only, in a child process).
Ends with the issue's goals, measured value, met / not met.

  pip install -e '.[compare]'                       # torch, PEER-pytorch, transformers
  python benchmarks/vs_pytorch.py                   # all, default shapes (CPU: ~10 min, ~16 GiB free)
  python benchmarks/vs_pytorch.py --small           # N = 128² / 64², 8 × 64 tokens, ~1 min
  python benchmarks/vs_pytorch.py --only peer,moe   # a subset: peer (a, b, c), moe (d), dense (e), flops (f)

Memory: the PyTorch / moejax pairs run on glibc's default malloc, as in a notebook (with
--keep_freed_memory both on train.py's setting, moejax.backends.cpu.host_memory). The moejax-only parts
c and f measure train.py's step, so they run in a child process set up as train.py sets
itself up (freed memory kept), the big dense step alone, the rest round-robin.

The workloads and their conventions (PEER-pytorch's ``dim_key`` is half of moejax's ``d_key``)
are ``moejax.benchmarking.torch_peers``. HF Mixtral's experts run the ``--mixtral_impl``
experts implementation (default ``grouped_mm``, the fastest of transformers' implementations
on CPU; ``eager`` loops over experts in Python).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moejax.benchmarking import timing, train_steps  # noqa: E402
from moejax.benchmarking.child import in_child  # noqa: E402
from moejax.benchmarking.torch_peers import (  # noqa: E402
    Case, Shapes, dense_case, moe_case, peer_adam_case, peer_fwd_case, require_torch_peers,
    run_case)

PARTS = ("peer", "moe", "dense", "flops")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "dense_small.py")


def parse_args(argv=None):
  d = Shapes()
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="N = 128² and 64², 8 × 64 tokens")
  p.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--batch", type=int, default=d.batch)
  p.add_argument("--length", type=int, default=d.length)
  p.add_argument("--n", type=int, default=d.n, help="PEER N = n²")
  p.add_argument("--n_small", type=int, default=d.n_small, help="the second, small PEER N = n²")
  p.add_argument("--peer_d", type=int, default=d.peer_d)
  p.add_argument("--heads", type=int, default=d.heads)
  p.add_argument("--top_k", type=int, default=d.top_k)
  p.add_argument("--d_key", type=int, default=d.d_key, help="moejax d_key (PEER-pytorch dim_key = d_key/2)")
  p.add_argument("--lm_query_norm", default=d.lm_query_norm, help="query norm of the LM steps' PEER (c)")
  p.add_argument("--moe_d", type=int, default=d.moe_d)
  p.add_argument("--moe_ff", type=int, default=d.moe_ff, help="hidden size of each expert")
  p.add_argument("--experts", type=int, default=d.experts)
  p.add_argument("--moe_top_k", type=int, default=d.moe_top_k)
  p.add_argument("--capacity_factor", type=float, default=d.capacity_factor)
  p.add_argument("--keep_freed_memory", action="store_true",
                 help="both sides on moejax.backends.cpu.host_memory's malloc setting (train.py's)")
  p.add_argument("--mixtral_impl", default=d.mixtral_impl, help="eager | grouped_mm | batched_mm")
  a = p.parse_args(argv)
  if a.small:   # shrinks only what was left at its default
    for name, value in (("length", 64), ("n", 128), ("n_small", 64)):
      if getattr(a, name) == p.get_default(name):
        setattr(a, name, value)
  a.only = [s.strip() for s in a.only.split(",") if s.strip()]
  bad = [s for s in a.only if s not in PARTS]
  if bad:
    p.error(f"--only: unknown {bad}, choose from {list(PARTS)}")
  return a


def shapes_of(a) -> Shapes:
  return Shapes(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Shapes)})


def lm_kwargs(a) -> dict:
  """c. :func:`train_steps.peer_lm_step_times`'s arguments: both sizes, the PEER's shapes."""
  return dict(n=a.n, n_small=a.n_small, iters=a.iters, d_model=a.peer_d, heads=a.heads,
              top_k=a.top_k, d_key=a.d_key, query_norm=a.lm_query_norm, batch=a.batch,
              length=a.length)


def available_gib() -> float:
  """MemAvailable of this host in GiB (inf where /proc/meminfo is not there)."""
  try:
    with open("/proc/meminfo") as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib / 2**20
  except (OSError, StopIteration):
    return float("inf")


def fits(need_gib: float, what: str) -> bool:
  """False (and one printed line) when ``what`` needs more memory than the host has free:
  a shared host must not be pushed into the OOM killer by a benchmark."""
  free = available_gib()
  if need_gib <= free:
    return True
  print(f"\n### {what}: skipped, needs ~{need_gib:.1f} GiB, {free:.1f} GiB available "
        f"(shrink with --n)")
  return False


def table_gib(a, n: int) -> float:
  """GiB of one side's two PEER tables [n², d] in float32."""
  return 2 * n * n * a.peer_d * 4 / 2**30


# ------------------------------------------------------------------------------ main


def machine_line(torch) -> str:
  import jax
  from moejax.backends.cpu import native as cpu_kernels
  cpu = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"machine: {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}, "
          f"JAX {jax.devices()[0].platform} × {jax.device_count()}); torch {torch.__version__}, "
          f"jax {jax.__version__}; moejax CPU kernels "
          f"{'built' if cpu_kernels.available() else 'NOT built (XLA ops instead)'}; "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")


def _rate(tokens, t):
  return f"{tokens / t:,.0f}" if t else "-"


def print_rows(case: Case, rows):
  print(f"\n### {case.title}, {case.tokens} tokens")
  print("| workload | PyTorch peer | its tokens/s | moejax | tokens/s | ratio (moejax / torch) |")
  print("|---|---|---|---|---|---|")
  for label, t_torch, torch_label, t in rows:
    ratio = f"{t_torch / t:.2f}" if t_torch else "-"
    print(f"| {case.title.split(',')[0]} | {torch_label or '-'} | {_rate(case.tokens, t_torch)} | "
          f"{label} | {_rate(case.tokens, t)} | {ratio} |")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parse_args(argv)
  s = shapes_of(a)
  # By default both sides run on glibc's default malloc, as in a notebook: the setting
  # train.py makes (moejax.backends.cpu.host_memory) is process-wide, and torch gains from it too (HF
  # Mixtral's block 1.19x, moejax's dropless MoE 1.06x, on the 2-core Xeon).
  if a.keep_freed_memory:
    from moejax import backends
    backends.prepare_process()   # before JAX's first computation
  torch, _, _ = require_torch_peers()
  torch.set_num_threads(os.cpu_count())
  print(machine_line(torch))
  print(f"shapes: {a.batch} × {a.length} tokens, iters {a.iters} (median, round-robin)")
  goals = []   # (goal, measured text, met)
  ratio = lambda rows, i: rows[i][1] / rows[i][3]

  if "peer" in a.only:
    # Peak memory: both sides' tables (+ their Adam moments), one side's transient table
    # copy / gradient, gathered [T, h, k, d] rows, 1 GiB slack.
    rows_gib = 2 * a.batch * a.length * a.heads * a.top_k * a.peer_d * 4 / 2**30
    if fits(3 * table_gib(a, a.n) + rows_gib + 1, f"PEER forward, N = {a.n}²"):
      case = peer_fwd_case(s)
      rows = run_case(case, a.iters)
      print_rows(case, rows)
      goals.append(("PEER forward ≥ 2× PEER-pytorch", f"{ratio(rows, 0):.2f}×",
                    ratio(rows, 0) >= 2))
      del case
      gc.collect()
    else:
      goals.append(("PEER forward ≥ 2× PEER-pytorch", "skipped (memory)", None))
    for n in (a.n, a.n_small):
      if not fits(7 * table_gib(a, n) + rows_gib + 1, f"PEER + Adam, N = {n}²"):
        if n == a.n:
          goals.append((f"PEER + Adam ≥ 2× PEER-pytorch at N = {n}²", "skipped (memory)", None))
        continue
      case = peer_adam_case(s, n)
      rows = run_case(case, a.iters)
      print_rows(case, rows)
      if n == a.n:
        goals.append((f"PEER + Adam ≥ 2× PEER-pytorch at N = {n}² (dense Adam, same algorithm)",
                      f"{ratio(rows, 0):.2f}×", ratio(rows, 0) >= 2))
        goals.append((f"PEER + Adam ≥ 2× PEER-pytorch at N = {n}² (moejax lazy row-sparse Adam)",
                      f"{ratio(rows, 1):.2f}×", ratio(rows, 1) >= 2))
      del case
      gc.collect()
    t, kept = (in_child(train_steps.peer_lm_step_times, **lm_kwargs(a))
               if fits(7 * table_gib(a, a.n) + rows_gib + 1, "LM train steps") else ({}, False))
    if t:
      print(f"\n### LM train step (2 blocks, PEER in block 1), d_model = {a.peer_d}, "
            f"{a.batch * a.length} tokens ({a.batch} × {a.length}), h = {a.heads}, k = {a.top_k}, "
            f"d_key = {a.d_key}, query_norm = {a.lm_query_norm} (moejax only; a child process, "
            f"the dense N = {a.n}² step alone, the others round-robin, freed memory kept as in "
            f"train.py: {kept})")
      print("dense: optax Adam over the whole [N, d] tables; row_sparse: lazy Adam on the "
            "retrieved rows only")
      print("| N | dense ms | row_sparse ms | dense / row_sparse |\n|---|---|---|---|")
      for n in (a.n, a.n_small):
        d, r = t[f"dense N={n}²"], t[f"row_sparse N={n}²"]
        print(f"| {n}² | {d * 1e3:.1f} | {r * 1e3:.1f} | {d / r:.2f}× |")
      big, small = t[f"row_sparse N={a.n}²"], t[f"row_sparse N={a.n_small}²"]
      speedup = t[f"dense N={a.n}²"] / big
      print(f"row_sparse(N={a.n}²) / row_sparse(N={a.n_small}²) = {big / small:.2f}")
      goals.append((f"row-sparse LM step ≥ 3× dense at N = {a.n}²", f"{speedup:.2f}×", speedup >= 3))
      goals.append((f"row-sparse LM step at N = {a.n}² ≤ 1.5× its N = {a.n_small}² time",
                    f"{big / small:.2f}×", big / small <= 1.5))
    else:
      goals.append(("row-sparse LM step ≥ 3× dense, ≤ 1.5× its small-N time",
                    "skipped (memory)", None))

  if "moe" in a.only or "dense" in a.only:
    cases = ([moe_case(s)] if "moe" in a.only else []) + ([dense_case(s)] if "dense" in a.only else [])
    # One round-robin over every fn of both cases: the MoE / dense ratio is same-run too.
    fns = [c.torch_fn for c in cases] + [f() for c in cases for _, f in c.jax]
    ts = timing.round_robin(fns, a.iters)
    t_torch, t_jax = ts[:len(cases)], iter(ts[len(cases):])
    by_title = {}
    for c, tt in zip(cases, t_torch):
      rows = [(label, tt, c.torch_label, next(t_jax)) for label, _ in c.jax]
      by_title[c.title.split(",")[0]] = rows
      print_rows(c, rows)
    moe_rows = next((r for k, r in by_title.items() if k.startswith("MoE")), None)
    dense_rows = next((r for k, r in by_title.items() if k.startswith("Dense")), None)
    if moe_rows:
      goals.append(("MoE dropless ≥ 1.0× HF Mixtral", f"{ratio(moe_rows, 0):.2f}×",
                    ratio(moe_rows, 0) >= 1.0))
    if dense_rows:
      goals.append(("— (no goal) moejax DenseFFN vs torch SwiGLU", f"{ratio(dense_rows, 0):.2f}×",
                    None))
    if moe_rows and dense_rows:
      t_dense = dense_rows[0][3]
      drop, ein = t_dense / moe_rows[0][3], t_dense / moe_rows[1][3]
      print(f"\nmoejax MoE / moejax DenseFFN (same active params), tokens/s ratio: "
            f"dropless {drop:.2f}, einsum cf={a.capacity_factor} {ein:.2f}")
      goals.append(("MoE dropless ≥ 0.9× moejax dense FFN", f"{drop:.2f}×", drop >= 0.9))
      goals.append((f"MoE einsum ≥ 0.6× moejax dense FFN at cf {a.capacity_factor}",
                    f"{ein:.2f}×", ein >= 0.6))
    del cases, fns
    gc.collect()

  if "flops" in a.only:
    (step_g, mm_g, frac), kept = in_child(train_steps.matmul_fraction,
                                          config_path=DEFAULT_CONFIG, iters=a.iters)
    print(f"\n### Default LM train step vs f32 matmul 1024² (benchmarks/train_throughput.py; "
          f"a child process, freed memory kept as in train.py: {kept})")
    print(f"train step {step_g:.2f} GFLOP/s, matmul {mm_g:.2f} GFLOP/s, fraction {frac:.3f}")
    goals.append(("default LM step ≥ 0.5 of matmul FLOP/s", f"{frac:.3f}", frac >= 0.5))

  print("\n### Goals (issue 11)")
  print("| goal | measured | met |\n|---|---|---|")
  for goal, value, met in goals:
    print(f"| {goal} | {value} | {'-' if met is None else ('met' if met else 'not met')} |")


if __name__ == "__main__":
  main()
