"""The study's figures (PNG), drawn from the rows of :mod:`report` and the eval counts.

* ``loss_vs_flops.png``: main study, eval loss against training FLOPs per arm (mean over
  seeds, band from min to max);
* ``usage_kl.png``: expert usage and KL to uniform against N, query BatchNorm on / off;
* ``usage_hist.png``: per-expert accumulated router score (÷ the uniform share), BN on / off;
* ``usage_over_steps.png``: usage in the periodic evals during training;
* ``ablation.png``: eval loss against heads at fixed h·k, and against h·k.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import report  # noqa: E402

NORM_LABELS = {"bn": "query BatchNorm", "nonorm": "no query norm", "white": "whitened queries",
               "ln": "query LayerNorm"}


def write_all(rows: list[dict], runs: Path, out: Path) -> list[Path]:
  del runs
  files = []
  scale = out.name
  for fn in (loss_vs_flops, usage_kl, usage_hist, usage_over_steps, ablation):
    path = fn(rows, scale, out)
    if path is not None:
      files.append(path)
  return files


def _save(fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def loss_vs_flops(rows, scale, out) -> Path | None:
  main = [r for r in rows if r["study"] == "main"]
  if not main:
    return None
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name in dict.fromkeys(r["arm"] for r in main):
    rs = [r for r in main if r["arm"] == name]
    steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in rs)))
    if not steps:
      continue
    per_step = rs[0]["train_flops"] / rs[0]["steps"]
    losses = np.array([[next(p["loss"] for p in r["curve"] if p["step"] == s) for s in steps]
                       for r in rs])
    x = np.array(steps) * per_step
    line, = ax.plot(x, losses.mean(0), marker="o", ms=3, label=f"{name} ({len(rs)} seeds)")
    if len(rs) > 1:
      ax.fill_between(x, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("eval loss (nats / byte, in-training evals)")
  ax.set_title(f"Matched-compute arms, scale {scale}")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  lo = min(min(p["loss"] for p in r["curve"]) for r in main if r["curve"])
  ax.set_ylim(lo - 0.05, lo + 1.0)
  return _save(fig, out / "loss_vs_flops.png")


def usage_kl(rows, scale, out) -> Path | None:
  rs = [r for r in report.study_rows(rows, "usage", scale) if r["steps_factor"] == 1]
  if not rs:
    return None
  fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.4))
  for norm, style in (("bn", "o-"), ("nonorm", "s--"), ("white", "^:")):
    sel = sorted((r for r in rs if r["norm"] == norm), key=lambda r: r["n"])
    if not sel:
      continue
    n = [r["n"] ** 2 for r in sel]
    label = NORM_LABELS[norm]
    a.plot(n, [100 * r["usage"] for r in sel], style, label=label)
    b.plot(n, [r["kl_uniform"] for r in sel], style, label=label)
  for ax, title in ((a, "expert usage (%)"), (b, "KL(z ‖ uniform)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts N")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out / "usage_kl.png")


def _counts(row: dict) -> np.ndarray | None:
  path = Path(row["workdir"]) / "eval" / "counts.npz"
  if not path.exists():
    return None
  with np.load(path) as z:
    key = next((k for k in z.files if k.endswith("/score_sum")), None)
    return None if key is None else z[key]


def usage_hist(rows, scale, out) -> Path | None:
  rs = [r for r in report.study_rows(rows, "usage", scale) if r["steps_factor"] == 1]
  ns = sorted({r["n"] for r in rs})
  if not ns:
    return None
  fig, axes = plt.subplots(1, len(ns), figsize=(3.6 * len(ns), 3.2), squeeze=False)
  for ax, n in zip(axes[0], ns):
    for norm, color in (("bn", "C0"), ("nonorm", "C3"), ("white", "C2")):
      r = next((r for r in rs if r["n"] == n and r["norm"] == norm), None)
      counts = None if r is None else _counts(r)
      if counts is None:
        continue
      share = counts / counts.mean()
      bins = np.concatenate([[0], np.logspace(-3, np.log10(max(share.max(), 10)), 40)])
      ax.hist(share, bins=bins, histtype="step", color=color,
              label=f"{NORM_LABELS[norm]}: {100 * (counts > 0).mean():.1f}% used")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("log")
    ax.set_title(f"N = {n}²")
    ax.set_xlabel("accumulated score ÷ uniform share")
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("experts")
  return _save(fig, out / "usage_hist.png")


def usage_over_steps(rows, scale, out) -> Path | None:
  rs = [r for r in report.study_rows(rows, "usage", scale) if r["curve"]]
  if not rs:
    return None
  fig, ax = plt.subplots(figsize=(6.0, 3.6))
  for r in sorted(rs, key=lambda r: (r["n"], r["norm"])):
    pts = [(p["step"], p["usage"]) for p in r["curve"] if p["usage"] is not None]
    if pts:
      s, u = zip(*pts)
      ax.plot(s, 100 * np.array(u), {"bn": "o-", "nonorm": "s--"}.get(r["norm"], "^:"), ms=3,
              label=f"N={r['n']}² {r['norm']}" + (f" ×{r['steps_factor']} steps"
                                                  if r["steps_factor"] > 1 else ""))
  ax.set_xlabel("training step")
  ax.set_ylabel("expert usage (%) in periodic evals")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, out / "usage_over_steps.png")


def ablation(rows, scale, out) -> Path | None:
  rs = report.study_rows(rows, "ablation", scale)
  if len(rs) < 2:
    return None
  fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.4))
  by_hk = {}
  for r in rs:
    by_hk.setdefault(r["h"] * r["k"], []).append(r)
  for hk, sel in sorted(by_hk.items()):
    if len(sel) > 1:
      sel = sorted(sel, key=lambda r: r["h"])
      a.plot([r["h"] for r in sel], [r["eval_loss"] for r in sel], "o-", label=f"h·k = {hk}")
  a.set_xscale("log", base=2)
  a.set_xlabel("heads h (k = h·k / h)")
  a.set_ylabel("eval loss")
  a.set_title("fixed active experts")
  a.legend(fontsize=8)
  for h in sorted({r["h"] for r in rs}):
    sel = sorted((r for r in rs if r["h"] == h), key=lambda r: r["k"])
    b.plot([r["h"] * r["k"] for r in sel], [r["eval_loss"] for r in sel], "o-", label=f"h = {h}")
  b.set_xscale("log", base=2)
  b.set_xlabel("active experts h·k")
  b.set_title("growing active experts")
  b.legend(fontsize=8)
  for ax in (a, b):
    ax.grid(alpha=0.3)
  return _save(fig, out / "ablation.png")
