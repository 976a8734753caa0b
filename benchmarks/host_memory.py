"""Train-step time and page faults with and without ``moejax.backends.cpu.host_memory.keep_freed_memory``.

    python benchmarks/host_memory.py [--config configs/dense_small.py] [--rounds 2] [--steps 20]

The setting must precede JAX's first computation, so each measurement is a child process
(``MOEJAX_KEEP_FREED_MEMORY=1`` / ``0``), in alternating rounds; medians per setting. A child
warms up (the heap settles over the first steps), then times ``--steps`` steps and counts
the minor page faults they take (``ru_minflt``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, resource, sys, time
from moejax import backends
kept = backends.prepare_process()
import jax
from moejax.benchmarking import train_steps as tt
config = tt.load_config(sys.argv[1])
warmup, steps = int(sys.argv[2]), int(sys.argv[3])
ts, step, batch = tt.train_step_setup(config, warmup + steps + 1)
with jax.set_mesh(ts.mesh):
  for _ in range(warmup):
    ts.state, m = step(ts.state, batch)
  jax.block_until_ready(m)
  faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
  for _ in range(steps):
    ts.state, m = step(ts.state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / steps
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
print(json.dumps({"kept": kept, "step_s": dt, "fault_mib": faults * 4096 / 2**20}))
"""


def child(config: str, keep: bool, warmup: int, steps: int) -> dict:
  env = dict(os.environ, MOEJAX_KEEP_FREED_MEMORY="1" if keep else "0", PYTHONPATH=_ROOT)
  done = subprocess.run([sys.executable, "-c", _CHILD, config, str(warmup), str(steps)],
                        env=env, capture_output=True, text=True, cwd=_ROOT)
  if done.returncode:
    sys.exit(f"child failed: {done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default=os.path.join(_ROOT, "configs", "dense_small.py"))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--steps", type=int, default=20)
  a = p.parse_args()
  runs = {True: [], False: []}
  for _ in range(a.rounds):
    for keep in (False, True):
      runs[keep].append(child(a.config, keep, a.warmup, a.steps))
  print(f"config {os.path.relpath(a.config, _ROOT)}, {a.rounds} alternating rounds, medians")
  print("| freed blocks | step ms | page faults MiB / step |")
  print("|---|---|---|")
  med = {}
  for keep in (False, True):
    if keep and not any(r["kept"] for r in runs[keep]):
      sys.exit("keep_freed_memory did nothing here (accelerator host, or not glibc)")
    med[keep] = statistics.median(r["step_s"] for r in runs[keep])
    faults = statistics.median(r["fault_mib"] for r in runs[keep])
    print(f"| {'kept' if keep else 'returned (default)'} | {med[keep] * 1e3:.1f} | {faults:.1f} |")
  print(f"speed-up: {med[False] / med[True]:.2f}x")


if __name__ == "__main__":
  main()
