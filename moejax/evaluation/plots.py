"""PNG plots: training loss curve, MoE expert load, PEER/PKM sorted usage."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax import paths  # noqa: E402


def loss_curve(rows: list[dict], path: str) -> str | None:
  train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
  evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval" and "loss" in r]
  if not train and not evals:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for pts, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
    if pts:
      ax.plot(*zip(*pts), style, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("training loss")
  ax.legend()
  ax.grid(alpha=0.3)
  return _save(fig, path)


def expert_load(block: str, load: np.ndarray, path: str) -> str:
  """Histogram-style bar chart of the fraction of routed tokens per expert."""
  frac = load / max(load.sum(), 1e-9)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(np.arange(len(frac)), frac)
  ax.axhline(1.0 / len(frac), color="k", linestyle="--", linewidth=1, label="uniform")
  ax.set_xlabel("expert")
  ax.set_ylabel("fraction of assignments")
  ax.set_title(f"{block}: expert load")
  ax.legend()
  return _save(fig, path)


def sorted_usage(block: str, scores: np.ndarray, path: str) -> str:
  """Accumulated router score per expert, sorted, on log axes (PEER/PKM)."""
  z = np.sort(scores)[::-1] / max(scores.sum(), 1e-30)
  used = z[z > 0]   # log axes: experts never retrieved are reported as usage, not drawn
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(np.arange(1, len(used) + 1), used)
  ax.axhline(1.0 / len(z), color="k", linestyle="--", linewidth=1, label="uniform")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(1, len(z))
  ax.set_xlabel("expert rank")
  ax.set_ylabel("share of router score")
  # fontsize 10: the title of a 16,384-expert block fits the 6-inch figure.
  ax.set_title(f"{block}: sorted expert usage ({len(used)}/{len(z)} = {len(used) / len(z):.1%} used)",
               fontsize=10)
  ax.legend()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  paths.write_bytes(path, buffer.getvalue())   # local or a bucket
  return path
