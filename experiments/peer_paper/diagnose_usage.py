"""Why is expert usage what it is? Sub-key usage and coverage from an eval's counts.

    python experiments/peer_paper/diagnose_usage.py RUNS/cpu/peer_n128_h8k16_bn/seed0 [...]

For each workdir (evaluated by the study, ``eval/counts.npz``), per product-key layer:

* usage: experts (of N = n²) with a non-zero accumulated router score;
* sub-key usage: first-half sub-keys ``i1`` (expert ``i1·n + i2``) and second-half sub-keys
  ``i2`` that some used expert contains. An expert whose sub-key is never in its half's top-k
  can never be retrieved, so usage <= rows used × columns used / n²;
* pair fill: usage ÷ that bound, how much of the grid of live sub-keys the router combines;
* uniform coverage: the usage a router spreading the same number of retrievals evenly at
  random would reach, 1 − exp(−R / N), to tell a small eval set from a skewed router.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np


def diagnose(score_sum: np.ndarray, retrievals: float) -> dict:
  """``score_sum [N]`` (N = n²) and the number of retrievals behind it -> statistics."""
  n = math.isqrt(score_sum.size)
  used = score_sum.reshape(n, n) > 0
  rows, cols = used.any(1).mean(), used.any(0).mean()
  usage = used.mean()
  bound = rows * cols
  return {"n": n, "usage": float(usage), "subkeys_used_first_half": float(rows),
          "subkeys_used_second_half": float(cols), "usage_bound_from_subkeys": float(bound),
          "pair_fill": float(usage / bound) if bound else 0.0,
          "uniform_coverage": float(1 - math.exp(-retrievals / score_sum.size))}


def main(argv: list[str]) -> int:
  for wd in map(Path, argv):
    spec = json.loads((wd / "study_arm.json").read_text())
    report = json.loads((wd / "eval" / "eval.json").read_text())
    tokens = next(iter(report["datasets"].values()))["tokens"]
    with np.load(wd / "eval" / "counts.npz") as z:
      for key in (k for k in z.files if k.endswith("/score_sum")):
        flags = dict(f[len("--config."):].split("=", 1) for f in spec["flags"])
        kind = spec["kind"]
        hk = int(flags[f"{kind}.heads"]) * int(flags[f"{kind}.top_k"])
        d = diagnose(z[key], tokens * hk)
        print(f"{spec['arm']} seed {spec['seed']} {key}: " +
              ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
