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

Conventions: PEER-pytorch's ``dim_key`` is the size of ONE sub-key half and its keys are
per head; moejax's ``d_key`` is the whole query (two halves). So moejax d_key = 128 with
``per_head_keys=True`` is PEER-pytorch dim_key = 64: the same function, the same FLOPs.
HF Mixtral's experts run the ``--mixtral_impl`` experts implementation (default
``grouped_mm``, the fastest of transformers' implementations on CPU; ``eager`` loops
over experts in Python and is several times slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PARTS = ("peer", "moe", "dense", "flops")
# moejax-only parts, each run in a child process set up as train.py sets itself up.
CHILD_PARTS = ("lm", "flops")
INSTALL = "pip install -e '.[compare]'"


def require_torch_peers():
  """(torch, PEER_pytorch, transformers), or exit with one line naming the extra."""
  try:
    import torch
    import PEER_pytorch
    import transformers
  except ImportError as e:
    sys.stderr.write(f"error: {e.name} is missing (the PyTorch peers are an optional extra): "
                     f"{INSTALL}\n")
    sys.exit(2)
  return torch, PEER_pytorch, transformers


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="N = 128² and 64², 8 × 64 tokens")
  p.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--n", type=int, default=1024, help="PEER N = n²")
  p.add_argument("--n_small", type=int, default=128, help="the second, small PEER N = n²")
  p.add_argument("--peer_d", type=int, default=256)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--top_k", type=int, default=16)
  p.add_argument("--d_key", type=int, default=128, help="moejax d_key (PEER-pytorch dim_key = d_key/2)")
  p.add_argument("--lm_query_norm", default="batch", help="query norm of the LM steps' PEER (c)")
  p.add_argument("--moe_d", type=int, default=512)
  p.add_argument("--moe_ff", type=int, default=1024, help="hidden size of each expert")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--moe_top_k", type=int, default=2)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--keep_freed_memory", action="store_true",
                 help="both sides on moejax.backends.cpu.host_memory's malloc setting (train.py's)")
  p.add_argument("--mixtral_impl", default="grouped_mm", help="eager | grouped_mm | batched_mm")
  p.add_argument("--child", default="", choices=("", *CHILD_PARTS), help=argparse.SUPPRESS)
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


# ------------------------------------------------------------------------------ timing


def _ready(out):
  import jax
  return jax.block_until_ready(out)


def round_robin(fns: list[Callable[[], Any]], iters: int) -> list[float]:
  """Median seconds per call of each zero-argument fn: one warm-up (compile) call each,
  then ``iters`` rounds of one call of each, in turns."""
  for f in fns:
    _ready(f())
  times = [[] for _ in fns]
  for _ in range(iters):
    for i, f in enumerate(fns):
      t = time.perf_counter()
      _ready(f())
      times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]


@dataclasses.dataclass
class Case:
  """One workload: a torch peer and moejax variants, each a zero-argument timed fn.

  ``jax``: (label, factory) pairs; ``factory()`` builds the fn (lazily, so that with
  ``pairwise`` only one big moejax variant is alive at a time: each is then timed
  round-robin against the torch fn on its own). ``check``: (torch_y, jax_y) fns returning
  numpy outputs of the same function with the same weights, for tests.
  """
  title: str
  tokens: int
  torch_label: str | None
  torch_fn: Callable | None
  jax: list[tuple[str, Callable[[], Callable]]]
  pairwise: bool = False
  check: tuple[Callable, Callable] | None = None


def run_case(case: Case, iters: int) -> list[tuple[str, float | None, str, float]]:
  """[(moejax label, torch seconds or None, torch label, moejax seconds)]."""
  rows = []
  groups = [[j] for j in case.jax] if case.pairwise else [case.jax]
  for group in groups:
    fns = [factory() for _, factory in group]
    lead = [case.torch_fn] if case.torch_fn else []
    ts = round_robin(lead + fns, iters)
    t_torch = ts[0] if lead else None
    rows += [(label, t_torch, case.torch_label, t) for (label, _), t in zip(group, ts[len(lead):])]
    del fns
    gc.collect()
  return rows


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


# ------------------------------------------------------------------------------ helpers


def _np(t):
  return t.detach().cpu().numpy()


def _tokens(torch, b, l, d, seed=0):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(b, l, d, generator=g)


def _split_fwd(module):
  """jit(() -> y) of an nnx layer through split / merge: only y leaves the jit."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(module)
  f = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x)[0])
  return lambda x: f(state, x)


def _fwd_bwd_params(module, with_aux: bool):
  """jit(x) -> (loss, grads w.r.t. every nnx.Param) with loss = mean(y²) [+ aux losses]."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, rest, x):
    y, aux = nnx.merge(graphdef, params, rest, copy=True)(x)
    out = jnp.mean(jnp.square(y.astype(jnp.float32)))
    return out + aux.total_loss() if with_aux else out

  f = jax.jit(jax.value_and_grad(loss))
  return lambda x: f(params, rest, x)


# ------------------------------------------------------------------------------ PEER


def torch_peer(a, n):
  torch, PEER_pytorch, _ = require_torch_peers()
  torch.manual_seed(0)
  return PEER_pytorch.PEER(dim=a.peer_d, heads=a.heads, num_experts=n * n,
                           num_experts_per_head=a.top_k, dim_key=a.d_key // 2,
                           non_competing_scores=False)


def moejax_peer_like(a, n, tp):
  """moejax PEER computing the same function as PEER-pytorch ``tp`` (weights copied)."""
  from moejax.interop.torch_modules import peer_from_pytorch
  return peer_from_pytorch(tp)


def peer_fwd_case(a) -> Case:
  """a. PEER forward (torch under no_grad; moejax jitted, only y leaves the jit)."""
  import jax.numpy as jnp
  import numpy as np
  torch, _, _ = require_torch_peers()
  n, b, l = a.n, a.batch, a.length
  tp = torch_peer(a, n).eval()
  xt = _tokens(torch, b, l, a.peer_d)
  xj = jnp.asarray(_np(xt))
  fwd = _split_fwd(moejax_peer_like(a, n, tp))

  def torch_fn():
    with torch.no_grad():
      return tp(xt)

  return Case(f"PEER forward, N = {n}², d = {a.peer_d}, h = {a.heads}, k = {a.top_k}, "
              f"d_key = {a.d_key}", b * l, "PEER-pytorch PEER (no_grad)", torch_fn,
              [("PEER (jit)", lambda: lambda: fwd(xj))],
              check=(lambda: _np(torch_fn()), lambda: np.asarray(fwd(xj))))


def _jax_peer_adam_dense(m, x, lr):
  """jit step: optax Adam over every parameter (dense [N, d] table gradients and moments)."""
  import functools
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  opt = nnx.Optimizer(m, optax.adam(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((m, opt))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, x):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(
        lambda mdl: jnp.mean(jnp.square(mdl(x)[0])), argnums=nnx.DiffState(0, nnx.Param))(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  holder = {"s": state}

  def run():
    holder["s"], loss = step(holder["s"], x)
    return loss
  return run


def _jax_peer_adam_row_sparse(m, x, lr):
  """jit step: lazy Adam on the retrieved table rows (RowDelta taps, TableAdam), optax Adam
  on the other parameters; state donated (tables and moments updated in place)."""
  import functools
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from moejax.layers.base import RowDelta, TableParam
  from moejax.training import row_sparse
  b, l, _ = x.shape
  others = nnx.All(nnx.Param, nnx.Not(TableParam))
  opt = nnx.Optimizer(m, optax.adam(lr), wrt=others)
  table_adam = row_sparse.TableAdam(m, lr_schedule=lambda count: lr, b1=0.9, b2=0.999, eps=1e-8)
  graphdef, state = nnx.split((m, opt, table_adam))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, x):
    model, opt, ta = nnx.merge(graphdef, state)
    row_sparse.attach(model, b, l)
    loss, grads = nnx.value_and_grad(
        lambda mdl: jnp.mean(jnp.square(mdl(x)[0])),
        argnums=nnx.DiffState(0, nnx.Any(others, RowDelta)))(model)
    grads, delta_grads = nnx.split_state(grads, nnx.Not(RowDelta), RowDelta)
    rows = ta.row_grads(model, delta_grads)
    row_sparse.detach(model)
    ta.apply(model, rows, opt.step[...] + 1)
    opt.update(model, grads)
    return nnx.state((model, opt, ta)), loss

  holder = {"s": state}

  def run():
    holder["s"], loss = step(holder["s"], x)
    return loss
  return run


def peer_adam_case(a, n) -> Case:
  """b. PEER + Adam step. Pairwise: one moejax variant alive at a time next to torch."""
  import jax.numpy as jnp
  torch, _, _ = require_torch_peers()
  b, l, lr = a.batch, a.length, 1e-3
  tp = torch_peer(a, n).train()
  opt = torch.optim.Adam(tp.parameters(), lr=lr, fused=True)
  xt = _tokens(torch, b, l, a.peer_d)
  xj = jnp.asarray(_np(xt))

  def torch_fn():
    loss = tp(xt).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)       # no [N, d] gradients held between steps
    return loss.detach()

  return Case(f"PEER + Adam step (loss = mean(y²)), N = {n}²", b * l,
              "PEER-pytorch + torch.optim.Adam (fused)", torch_fn,
              [("PEER + optax Adam (dense tables)",
                lambda: _jax_peer_adam_dense(moejax_peer_like(a, n, tp), xj, lr)),
               ("PEER + lazy row-sparse Adam on tables (≠ dense Adam)",
                lambda: _jax_peer_adam_row_sparse(moejax_peer_like(a, n, tp), xj, lr))],
              pairwise=n >= 512)


def _sibling(name: str):
  """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lm_step_fn(a, n: int, update: str):
  """c. Train step of a 2-block LM with PEER in block 1 (benchmarks/peer.py's builder)."""
  return _sibling("peer").lm_train_step(
      n, update, d_model=a.peer_d, heads=a.heads, top_k=a.top_k, d_key=a.d_key,
      query_norm=a.lm_query_norm, batch=a.batch, length=a.length)


def lm_step_times(a) -> dict[str, float]:
  """c. Median seconds per step, ``{"<update> N=<n>²": s}``. The dense N = a.n step runs
  alone (two such states with their Adam moments would crowd a 24 GiB host), then the
  other three round-robin, so that the row-sparse N = a.n / a.n_small ratio is measured
  side by side (on a shared host a load change between two separate timings moved it by
  more than the effect being measured)."""
  out = {}

  def timed(keys):
    fns = [lm_step_fn(a, n, update) for n, update in keys]
    for fn in fns:
      _ready(fn())   # + round_robin's warm-up call: the first steps still grow the heap
    for (n, update), t in zip(keys, round_robin(fns, a.iters)):
      out[f"{update} N={n}²"] = t
    del fns
    gc.collect()

  timed([(a.n, "dense")])
  timed([(a.n, "row_sparse"), (a.n_small, "row_sparse"), (a.n_small, "dense")])
  return out


def in_child(part: str, argv: list[str]):
  """``part`` (one of :data:`CHILD_PARTS`) run by this script in a child process, which
  keeps freed memory as train.py does (``moejax.backends.cpu.host_memory``): these parts have no
  PyTorch side to share the process's malloc setting with, and what they measure is
  train.py's step. Returns the child's JSON result and whether the setting took (False off
  glibc, or where moejax.backends.cpu.host_memory steps aside)."""
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", part]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  out = json.loads(done.stdout.strip().splitlines()[-1])
  return out["result"], out["kept_freed_memory"]


def child_main(a) -> None:
  from moejax import backends
  kept = backends.prepare_process()   # before JAX's first computation
  result = lm_step_times(a) if a.child == "lm" else flops_fraction(a.iters)
  print(json.dumps({"result": result, "kept_freed_memory": kept}))


# ------------------------------------------------------------------------------ MoE / dense


def torch_mixtral(a):
  torch, _, _ = require_torch_peers()
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  cfg = MixtralConfig(hidden_size=a.moe_d, intermediate_size=a.moe_ff,
                      num_local_experts=a.experts, num_experts_per_tok=a.moe_top_k,
                      router_jitter_noise=0.0)
  cfg._experts_implementation = a.mixtral_impl
  torch.manual_seed(0)
  m = MixtralSparseMoeBlock(cfg).train()
  with torch.no_grad():                    # the block alone allocates with torch.empty
    for p in m.parameters():
      p.normal_(0.0, a.moe_d ** -0.5)
  return m


def moejax_moe_like(a, tm, dispatch: str):
  """moejax MoE with Mixtral's weights (dropless computes Mixtral's function)."""
  from moejax.interop.torch_modules import moe_from_mixtral
  m = moe_from_mixtral(tm, dispatch=dispatch, capacity_factor=a.capacity_factor)
  m.train()
  return m


def torch_swiglu(a):
  torch, _, _ = require_torch_peers()
  nn = torch.nn
  hidden = a.moe_top_k * a.moe_ff

  class SwiGLU(nn.Module):
    def __init__(self):
      super().__init__()
      self.w1 = nn.Linear(a.moe_d, hidden, bias=False)   # gate (silu)
      self.w3 = nn.Linear(a.moe_d, hidden, bias=False)   # up
      self.w2 = nn.Linear(hidden, a.moe_d, bias=False)   # down

    def forward(self, x):
      return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

  torch.manual_seed(0)
  return SwiGLU()


def moejax_dense_like(a, tm):
  from moejax.interop.torch_modules import dense_from_swiglu
  return dense_from_swiglu(tm.w1, tm.w3, tm.w2)


def _torch_fwd_bwd(tm, xt):
  def run():
    tm.zero_grad(set_to_none=True)
    loss = tm(xt).square().mean()
    loss.backward()
    return loss.detach()
  return run


def moe_case(a) -> Case:
  """d. MoE fwd+bwd, grads w.r.t. parameters only (x needs no grad)."""
  import jax.numpy as jnp
  import numpy as np
  torch, _, _ = require_torch_peers()
  tm = torch_mixtral(a)
  xt = _tokens(torch, a.batch, a.length, a.moe_d)
  xj = jnp.asarray(_np(xt))

  def jax_row(dispatch):
    f = _fwd_bwd_params(moejax_moe_like(a, tm, dispatch), with_aux=True)
    return lambda: f(xj)

  dropless = moejax_moe_like(a, tm, "dropless")
  return Case(f"MoE fwd+bwd, top-{a.moe_top_k} of {a.experts} SwiGLU experts, d = {a.moe_d}, "
              f"expert hidden {a.moe_ff}", a.batch * a.length,
              f"HF MixtralSparseMoeBlock ({a.mixtral_impl})", _torch_fwd_bwd(tm, xt),
              [("MoE dropless (+ z / balance losses)", lambda: jax_row("dropless")),
               (f"MoE einsum cf={a.capacity_factor} (+ z / balance losses)",
                lambda: jax_row("einsum"))],
              check=(lambda: _np(tm(xt)), lambda: np.asarray(_split_fwd(dropless)(xj))))


def dense_case(a) -> Case:
  """e. Dense SwiGLU FFN fwd+bwd, grads w.r.t. parameters only."""
  import jax.numpy as jnp
  import numpy as np
  torch, _, _ = require_torch_peers()
  tm = torch_swiglu(a)
  xt = _tokens(torch, a.batch, a.length, a.moe_d)
  xj = jnp.asarray(_np(xt))
  m = moejax_dense_like(a, tm)
  f = _fwd_bwd_params(m, with_aux=False)
  return Case(f"Dense SwiGLU FFN fwd+bwd, d = {a.moe_d}, hidden {a.moe_top_k * a.moe_ff}",
              a.batch * a.length, "3 × nn.Linear SwiGLU", _torch_fwd_bwd(tm, xt),
              [("DenseFFN (silu, gated)", lambda: lambda: f(xj))],
              check=(lambda: _np(tm(xt)), lambda: np.asarray(_split_fwd(m)(xj))))


# ------------------------------------------------------------------------------ f. FLOP/s


def flops_fraction(iters: int) -> tuple[float, float, float]:
  """(train step GFLOP/s, matmul GFLOP/s, fraction) of the dense baseline (configs/dense_small.py), in turns."""
  tt = _sibling("train_throughput")
  config = tt.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                       "configs", "dense_small.py"))
  rounds = max(iters, 3)
  r = tt.measure(config, steps=5 * rounds, rounds=rounds)
  return r["achieved"] / 1e9, r["matmul"] / 1e9, r["achieved"] / r["matmul"]


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
  if a.child:
    return child_main(a)
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
      case = peer_fwd_case(a)
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
      case = peer_adam_case(a, n)
      rows = run_case(case, a.iters)
      print_rows(case, rows)
      if n == a.n:
        goals.append((f"PEER + Adam ≥ 2× PEER-pytorch at N = {n}² (dense Adam, same algorithm)",
                      f"{ratio(rows, 0):.2f}×", ratio(rows, 0) >= 2))
        goals.append((f"PEER + Adam ≥ 2× PEER-pytorch at N = {n}² (moejax lazy row-sparse Adam)",
                      f"{ratio(rows, 1):.2f}×", ratio(rows, 1) >= 2))
      del case
      gc.collect()
    t, kept = (in_child("lm", argv) if fits(7 * table_gib(a, a.n) + rows_gib + 1,
                                             "LM train steps") else ({}, False))
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
    cases = ([moe_case(a)] if "moe" in a.only else []) + ([dense_case(a)] if "dense" in a.only else [])
    # One round-robin over every fn of both cases: the MoE / dense ratio is same-run too.
    fns = [c.torch_fn for c in cases] + [f() for c in cases for _, f in c.jax]
    ts = round_robin(fns, a.iters)
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
    (step_g, mm_g, frac), kept = in_child("flops", argv)
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
