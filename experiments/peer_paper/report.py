"""Reads the study's workdirs back into results.json / results.csv, summary.md and figures.

Every number comes from a workdir: ``metrics.jsonl`` (training losses, the periodic evals
with expert usage over steps, tokens/s), ``eval/eval.json`` and ``eval/counts.npz`` (eval.py
on the export), ``study_times.json`` (wall time) and :mod:`moejax.flops` on the arm's config.
Runs not finished yet are left out of the tables and listed as missing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

import arms as arms_lib
from moejax import config as config_lib
from moejax import flops as flops_lib

CSV_FIELDS = ("study", "arm", "kind", "seed", "steps", "tokens", "train_flops_per_token",
              "train_flops", "eval_dataset", "eval_tokens", "eval_loss", "eval_perplexity",
              "eval_bits_per_byte", "usage", "kl_uniform", "max_over_mean", "train_seconds",
              "eval_seconds", "tokens_per_sec")


def arm_config(arm: arms_lib.Arm, scale: str, seed: int):
  """The config ``train.py`` builds for this run (the base plus the arm's flags)."""
  c = config_lib.default_config()
  for path, value in arm.config_items(scale, seed):
    node = c
    *parents, leaf = path.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  if c.model.vocab_size == 0:
    c.model.vocab_size = 258 if c.data.tokenizer == "byte" else 0
  return c


def _metrics(wd: Path) -> list[dict]:
  try:
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines() if line]
  except OSError:
    return []


def _expert_stats(experts: dict) -> dict:
  """usage / KL / max-over-mean of the (only) sparse block: score_sum (PEER, PKM) or load (MoE)."""
  for stats in experts.values():
    for key in ("score_sum", "load"):
      if f"{key}_usage" in stats:
        return {"usage": stats[f"{key}_usage"], "kl_uniform": stats[f"{key}_kl_uniform"],
                "max_over_mean": stats[f"{key}_max_over_mean"]}
  return {"usage": None, "kl_uniform": None, "max_over_mean": None}


def row(runs: Path, scale: str, study: str, arm: arms_lib.Arm, seed: int) -> dict | None:
  """One run's row, or None when it has not been evaluated yet."""
  import study as study_lib
  wd = study_lib.workdir(runs, scale, arm, seed)
  times = study_lib._read_json(wd / study_lib.TIMES, {})
  report = study_lib._read_json(wd / "eval" / "eval.json", None)
  if report is None or not times.get("evaluated"):
    return None
  config = arm_config(arm, scale, seed)
  count = flops_lib.count(config, train=True)
  metrics = _metrics(wd)
  train_rows = [r for r in metrics if r.get("split") == "train"]
  tok_s = [r["tokens_per_sec"] for r in train_rows[1:] if "tokens_per_sec" in r]
  steps = config.train.steps
  tokens = steps * config.data.batch_size * config.data.seq_len
  (dataset, ev), = list(report["datasets"].items())[:1]
  curve = []
  for r in metrics:
    if r.get("split") == "eval":
      usage = next((v for k, v in r.items() if k.endswith("_usage")), None)
      curve.append({"step": r["step"], "loss": r["loss"], "usage": usage})
  return {
      "study": study, "arm": arm.name, "kind": arm.kind, "seed": seed, "steps": steps,
      "tokens": tokens, "train_flops_per_token": count.train, "train_flops": count.train * tokens,
      "eval_dataset": dataset, "eval_tokens": ev["tokens"], "eval_loss": ev["loss"],
      "eval_perplexity": ev["perplexity"], "eval_bits_per_byte": ev["bits_per_byte"],
      **_expert_stats(ev.get("experts", {})),
      "train_seconds": times.get("train_seconds"), "eval_seconds": times.get("eval_seconds"),
      "tokens_per_sec": float(np.median(tok_s)) if tok_s else None,
      "flops_parts": count.parts, "curve": curve, **arms_lib.parse_arm_name(arm.name),
      "workdir": str(wd),
  }


def write(runs: Path, scale: str, todo: list, out: Path) -> Path:
  """Writes ``out``/results.json, results.csv, summary.md and the figures; returns ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  rows, missing = [], []
  for study, arm, seed in todo:
    r = row(runs, scale, study, arm, seed)
    (rows.append(r) if r else missing.append(f"{arm.name}/seed{seed}"))
  (out / "results.json").write_text(json.dumps({"scale": scale, "runs": rows, "missing": missing},
                                               indent=1))
  with open(out / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  (out / "summary.md").write_text(summary(rows, missing, scale))
  import figures
  figures.write_all(rows, runs, out)
  return out


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def main_table(rows: list[dict]) -> list[dict]:
  """Per main-study arm: seeds, FLOPs, eval loss mean ± std, in the order of the study."""
  out = []
  for name in dict.fromkeys(r["arm"] for r in rows if r["study"] == "main"):
    rs = [r for r in rows if r["arm"] == name and r["study"] == "main"]
    losses = [r["eval_loss"] for r in rs]
    out.append({"arm": name, "seeds": len(rs), "train_flops_per_token": rs[0]["train_flops_per_token"],
                "loss_mean": float(np.mean(losses)),
                "loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else float("nan"),
                "loss": _mean_std(losses),
                "bpb": float(np.mean([r["eval_bits_per_byte"] for r in rs])),
                "usage": rs[0]["usage"], "tok_s": np.mean([r["tokens_per_sec"] or 0 for r in rs])})
  return out


def summary(rows: list[dict], missing: list[str], scale: str) -> str:
  lines = [f"# PEER-paper study, scale `{scale}`", ""]
  main = main_table(rows)
  if main:
    dense = next((m for m in main if m["arm"] == "dense"), main[0])
    lines += ["## Main study: same trunk, the middle block's FFN replaced, matched training FLOPs",
              "", "| arm | seeds | train GFLOPs / token (vs dense) | eval loss (nats/byte) | bits/byte "
              "| expert usage | tokens/s |", "|---|---|---|---|---|---|---|"]
    for m in sorted(main, key=lambda m: m["loss_mean"]):
      rel = m["train_flops_per_token"] / dense["train_flops_per_token"] - 1
      usage = "" if m["usage"] is None else f"{100 * m['usage']:.1f}%"
      lines.append(f"| {m['arm']} | {m['seeds']} | {m['train_flops_per_token'] / 1e9:.5f} "
                   f"({rel:+.1%}) | {m['loss']} | {m['bpb']:.4f} | {usage} | {m['tok_s']:.0f} |")
    lines.append("")
  usage = sorted(study_rows(rows, "usage", scale), key=lambda r: (r["n"], r["norm"], r["steps"]))
  if usage:
    lines += ["## Expert usage and unevenness (paper Table 2)", "",
              "| N | query norm | steps | eval loss | usage | KL to uniform | top expert / mean "
              "| eval tokens | retrievals per expert if uniform |", "|---|---|---|---|---|---|---|---|---|"]
    for r in usage:
      per = r["eval_tokens"] * r["h"] * r["k"] / r["n"] ** 2
      lines.append(f"| {r['n']}² = {r['n'] ** 2} | {r['norm']} | {r['steps']} | {r['eval_loss']:.4f} | "
                   f"{100 * r['usage']:.2f}% | {r['kl_uniform']:.3f} | {r['max_over_mean']:.1f} | "
                   f"{int(r['eval_tokens'])} | {per:.0f} |")
    lines.append("")
  abl = sorted(study_rows(rows, "ablation", scale), key=lambda r: (r["h"] * r["k"], r["h"]))
  if len(abl) > 1:
    lines += ["## Heads × top-k", "", "| h | k | h·k | train GFLOPs / token | eval loss |",
              "|---|---|---|---|---|"]
    for r in abl:
      lines.append(f"| {r['h']} | {r['k']} | {r['h'] * r['k']} | "
                   f"{r['train_flops_per_token'] / 1e9:.5f} | {r['eval_loss']:.4f} |")
    lines.append("")
  if missing:
    lines += [f"Not finished yet: {', '.join(missing)}.", ""]
  return "\n".join(lines)


def study_rows(rows: list[dict], study: str, scale: str) -> list[dict]:
  """The rows of ``study``'s arms at the first seed (an arm shared with another study included)."""
  names = {a.name for a in arms_lib.study(study, scale)}
  seed = arms_lib.TRUNKS[scale]["seeds"][0]
  return [r for r in rows if r["arm"] in names and r["seed"] == seed]
