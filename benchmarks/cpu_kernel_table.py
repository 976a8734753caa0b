"""What each group of the CPU backend's native kernels buys end to end: every workload with
all kernels on and with one group off (``MOEJAX_CPU_KERNELS_OFF=<group>``, its XLA form runs),
timed round-robin in one process.

    python benchmarks/cpu_kernel_table.py [--workloads default,peer_small,...] [--iters 5]
    python benchmarks/cpu_kernel_table.py --tests tests/test_peer.py,...  # suite time, on vs 0

Workloads: the train step of ``configs/default.py`` (``python train.py``'s), ``peer_small``
and ``switch_small`` (:func:`moejax.benchmarking.train_steps.train_step_setup`, ``--steps``
steps per timed call); at the PEER paper's size, ``benchmarks/vs_pytorch.py``'s moejax sides
(:mod:`moejax.benchmarking.torch_peers`, its default shapes): the PEER
layer's forward (``peer_fwd``, N = 1024², 8 × 512 tokens), its Adam step with dense tables
(``peer_dense``) and with lazy row-sparse Adam (``peer_row_sparse``), and the dropless MoE
layer's forward + backward (``moe_dropless``).

The switch is read when a computation is traced, so each setting is its own jitted function
traced (and called) with the variable set; the settings of a workload share its state (a
donated train state goes from one to the next). Only the groups whose kernels appear in the
all-on program are timed (the others cannot change it: listed as unused). Prints per
workload the all-on ms per call and, per group, its ms off and gain = off / on (a median of
``--iters`` round-robin rounds, so a load change on a shared host hits every setting alike).

``--tests``: the wall time of ``python -m pytest -n 0 -q FILES`` with the kernels on and with
``MOEJAX_CPU_KERNELS=0``, alternating, one process each.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"default": "configs/default.py", "peer_small": "configs/peer_small.py",
           "switch_small": "configs/switch_small.py"}
PAPER = ("peer_fwd", "peer_dense", "peer_row_sparse", "moe_dropless")
WORKLOADS = (*CONFIGS, *PAPER)


@contextlib.contextmanager
def groups_off(off: str):
  """``MOEJAX_CPU_KERNELS_OFF=off`` inside (a trace there reads it)."""
  from moejax.backends.cpu import native
  old = os.environ.get(native.OFF_VARIABLE)
  os.environ[native.OFF_VARIABLE] = off
  try:
    yield
  finally:
    if old is None:
      del os.environ[native.OFF_VARIABLE]
    else:
      os.environ[native.OFF_VARIABLE] = old


# A workload: make() -> (run: () -> result, text: () -> its program's StableHLO), each call
# of make() a new jitted function (so traced afresh, with the switch then set).


def config_workload(path: str, steps: int):
  import jax
  from moejax.benchmarking import train_steps
  from moejax.training import state as state_lib
  ts, _, batch = train_steps.train_step_setup(
      train_steps.load_config(os.path.join(ROOT, path)), 10**6)
  holder = {"state": ts.state}

  def make():
    step = state_lib.make_train_step(ts)

    def run():
      with jax.set_mesh(ts.mesh):
        for _ in range(steps):
          holder["state"], metrics = step(holder["state"], batch)
      return metrics

    def text():
      with jax.set_mesh(ts.mesh):
        return step.lower(holder["state"], batch).as_text()
    return run, text
  return make


def _partial_workload(build):
  """``build()`` -> a ``functools.partial`` of a jitted function (torch_peers' layers)."""
  def make():
    f = build()
    return f, lambda: f.func.lower(*f.args).as_text()
  return make


def paper_workload(name: str, a):
  import functools
  import jax.numpy as jnp
  from moejax.benchmarking import torch_peers as peers
  torch, _, _ = peers.require_torch_peers()
  if name == "moe_dropless":
    tm = peers.torch_mixtral(a)
    x = jnp.asarray(peers._np(peers._tokens(torch, a.batch, a.length, a.moe_d)))
    m = peers.moejax_moe_like(a, tm, "dropless")
    del tm
    return _partial_workload(lambda: functools.partial(peers._fwd_bwd_params(m, with_aux=True), x))
  tp = peers.torch_peer(a, a.n).train()
  x = jnp.asarray(peers._np(peers._tokens(torch, a.batch, a.length, a.peer_d)))
  m = peers.moejax_peer_like(a, a.n, tp)
  del tp
  gc.collect()
  if name == "peer_fwd":
    return _partial_workload(lambda: functools.partial(peers._split_fwd(m), x))
  step, state = (peers.peer_adam_dense_step(m, 1e-3) if name == "peer_dense"
                 else peers.peer_adam_row_sparse_step(m, x.shape[:2], 1e-3))
  return _donated_workload(step, state, x)


def _donated_workload(step, state, x):
  """Settings of ``step(state, x) -> (state, loss)`` that hand one donated state on."""
  import jax
  holder = {"state": state}

  def make():
    jitted = jax.jit(lambda s, x: step(s, x), donate_argnums=0)   # a new function: traced anew

    def run():
      holder["state"], loss = jitted(holder["state"], x)
      return loss
    return run, lambda: jitted.lower(holder["state"], x).as_text()
  return make


def used_groups(text: str) -> list[str]:
  from moejax.backends.cpu import native
  return [g for g, targets in native.GROUPS.items() if any(t in text for t in targets)]


def measure(name: str, make, iters: int, base_off: str = "") -> tuple[dict[str, float], list[str]]:
  """``({"all on" | group: median seconds per call}, unused groups)``; ``base_off``: groups
  off in every setting ("all on" is then all the others)."""
  from moejax.backends.cpu import native
  from moejax.benchmarking import timing
  settings = {}
  with groups_off(base_off):
    run, text = make()
    on_text = text()
  settings["all on"] = (base_off, run)
  used = used_groups(on_text)
  for group in used:
    with groups_off(",".join(filter(None, (base_off, group)))):
      run, text = make()
      off_text = text()
    # The program with the group off has none of its kernels (the switch took).
    assert not any(t in off_text for t in native.GROUPS[group]), (name, group)
    settings[group] = (",".join(filter(None, (base_off, group))), run)

  def call(off, run):
    def f():
      with groups_off(off):   # a retrace (if any) sees the same switch
        return run()
    return f

  times = timing.round_robin([call(off, run) for off, run in settings.values()], iters)
  return dict(zip(settings, times)), [g for g in native.GROUPS if g not in used]


def print_row(name: str, times: dict[str, float], unused: list[str], per_call: str) -> None:
  on = times["all on"]
  cells = [f"{g} off {t * 1e3:.1f} ms ({t / on:.2f}x)" for g, t in times.items() if g != "all on"]
  print(f"{name}: all on {on * 1e3:.1f} ms/{per_call} | " + " | ".join(cells)
        + f" | unused: {', '.join(unused) or '-'}", flush=True)


def test_times(files: list[str], rounds: int) -> None:
  """Wall seconds of the pytest subset with the kernels on and with MOEJAX_CPU_KERNELS=0."""
  settings = {"kernels on": {}, "MOEJAX_CPU_KERNELS=0": {"MOEJAX_CPU_KERNELS": "0"}}
  times = {k: [] for k in settings}
  for _ in range(rounds):
    for label, env in settings.items():
      t = time.perf_counter()
      done = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider",
                             *files], cwd=ROOT, env=dict(os.environ, **env), capture_output=True,
                            text=True)
      times[label].append(time.perf_counter() - t)
      last = (done.stdout.strip().splitlines() or ["?"])[-1]
      print(f"  {label}: {times[label][-1]:.1f} s ({last})", flush=True)
  on = statistics.median(times["kernels on"])
  off = statistics.median(times["MOEJAX_CPU_KERNELS=0"])
  print(f"test subset {' '.join(files)}: kernels on {on:.1f} s, MOEJAX_CPU_KERNELS=0 "
        f"{off:.1f} s ({off / on:.2f}x)", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {WORKLOADS}")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="train steps per timed call (configs)")
  p.add_argument("--base_off", default="", help="groups off in every setting, e.g. factored")
  p.add_argument("--small", action="store_true", help="the paper workloads at N = 128², 8 × 64 "
                 "tokens (a quick check that they run)")
  p.add_argument("--tests", default="", help="comma list of test files: time them instead")
  p.add_argument("--test_rounds", type=int, default=1)
  a = p.parse_args()
  if a.tests:
    return test_times(a.tests.split(","), a.test_rounds)
  names = [w for w in a.workloads.split(",") if w]
  bad = [w for w in names if w not in WORKLOADS]
  if bad:
    p.error(f"--workloads: unknown {bad}, choose from {list(WORKLOADS)}")
  from moejax import backends
  backends.prepare_process()   # train.py's setting, before JAX's first computation
  import jax
  from moejax.backends.cpu import native
  assert native.available(), "the CPU kernels did not build"
  print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        + (f"; off in every setting: {a.base_off}" if a.base_off else ""), flush=True)
  from moejax.benchmarking import torch_peers
  paper_args = torch_peers.Shapes(length=64, n=128) if a.small else torch_peers.Shapes()
  for name in names:
    if name in CONFIGS:
      make, per_call = config_workload(CONFIGS[name], a.steps), f"{a.steps} steps"
    else:
      make, per_call = paper_workload(name, paper_args), "call"
    times, unused = measure(name, make, a.iters, a.base_off)
    print_row(name, times, unused, per_call)
    del make
    gc.collect()


if __name__ == "__main__":
  main()
