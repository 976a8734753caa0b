"""What the CPU backend buys end to end: the train step of each config with the whole backend
(native kernels + CPU-tuned XLA paths), with its native kernels off, and with no backend.

    python benchmarks/cpu_backend_gain.py [--configs configs/default.py,...] [--rounds 3]

Each setting runs ``benchmarks/train_throughput.py`` in its own process (the switches are
read at import: ``MOEJAX_CPU_KERNELS=0``, ``MOEJAX_CPU_BACKEND=0``); the settings alternate
within each round, so a noisy machine slows all of them alike. Prints the median ms per step
and the ratio of each setting to the whole backend.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"backend": {}, "no native kernels": {"MOEJAX_CPU_KERNELS": "0"},
            "no backend": {"MOEJAX_CPU_BACKEND": "0"}}


def step_ms(config: str, env: dict, steps: int) -> float:
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"),
                        "--config", config, "--steps", str(steps), "--rounds", "2"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **env), cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  return float(re.search(r"train step\s+([\d.]+) ms", out).group(1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="configs/default.py,configs/peer_small.py,configs/switch_small.py")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  a = p.parse_args()
  for config in a.configs.split(","):
    times = {name: [] for name in SETTINGS}
    for _ in range(a.rounds):
      for name, env in SETTINGS.items():
        times[name].append(step_ms(config, env, a.steps))
    base = statistics.median(times["backend"])
    cells = [f"{name} {statistics.median(t):.1f} ms ({statistics.median(t) / base:.2f}x)"
             for name, t in times.items()]
    print(f"{config}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
  main()
