"""Evaluate an export or a training checkpoint on one or more datasets."""

from __future__ import annotations

import io
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from moejax import data, paths
from moejax.errors import CheckpointError
from moejax.data import eval_sets
from moejax.evaluation import perplexity, plots
from moejax.evaluation.locate import locate
from moejax.training import checkpoint as ckpt_lib
from moejax.training import loop
from moejax.training import state as state_lib
from moejax.training.writers import read_metrics


def workdir_of(path: str) -> str:
  """The training workdir an export or checkpoint belongs to (for its metrics and plots)."""
  kind, where = locate(path)
  return where[:-len("/export")] if kind == "export" and where.endswith("/export") else where


def load(path: str, mesh_overrides: dict | None = None
         ) -> tuple[ml_collections.ConfigDict, state_lib.ModelState, int | None]:
  """Builds the model of ``path`` on this host's devices and loads its variables.

  Returns (config, model state in eval mode, training step; None for an export written
  before exports recorded their step).
  """
  kind, where = locate(path)
  config = ckpt_lib.read_config(where)
  # Evaluate on whatever devices are here: all of them on the data axis by default.
  config.mesh.update(mesh_overrides or {"data": -1, "expert": 1, "model": 1})
  loop.check_mesh(config)   # as training checks it: devices, experts and KV heads, one line
  if kind == "export":
    ms = state_lib.create_model_state(config)
    ckpt_lib.load_model_state(where, ms.state, ms.shardings)
    return config, ms, ckpt_lib.read_export_step(where)
  ts = state_lib.create_train_state(config)   # a train checkpoint restores as a whole
  ckptr = ckpt_lib.Checkpointer(where, keep=10**6, async_save=False, create=False)
  try:
    if ckptr.latest_step() is None:
      raise CheckpointError(f"--checkpoint={path}: no checkpoint in {ckptr.directory}")
    # The newest checkpoint that restores (a warning line for each one skipped).
    ts.state, _ = ckptr.restore(ts.state, ts.shardings)
    if jax.process_index() == 0:
      for line in ckptr.skipped_warnings():
        print(line, file=sys.stderr, flush=True)
  finally:
    ckptr.close()
  return config, state_lib.ModelState(ts.mesh, ts.rules, ts.eval_graphdef, ts.state[0],
                                      ts.shardings[0]), ts.step


def evaluate(path: str, *, datasets: list[str] | None = None, split: str | None = None,
             max_batches: int | None = None, data_dir: str | None = None, out_dir: str | None = None,
             mesh_overrides: dict | None = None) -> dict:
  """Loss / perplexity / bits-per-byte per dataset and expert statistics; writes JSON and PNGs."""
  config, ms, step = load(path, mesh_overrides)
  if data_dir is not None:
    config.data.data_dir = data_dir
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  names = datasets or [n for n in config.eval.datasets.split(",") if n] or [config.data.dataset]
  data_cfgs = {n: eval_sets.data_config_for(config.data, n, split, config.eval.split) for n in names}
  max_batches = config.eval.max_batches if max_batches is None else max_batches
  eval_step = state_lib.make_eval_step(ms.graphdef, ms.shardings, ms.mesh, ms.rules)
  workdir = workdir_of(path)
  out_dir = out_dir or paths.join(workdir, "eval")
  paths.makedirs(out_dir)

  results = {}
  with jax.set_mesh(ms.mesh), nnx.logical_axis_rules(ms.rules):
    for name in names:
      batches = data.make_eval_iterator(data_cfgs[name], tokenizer, max_batches=max_batches,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
      results[name] = perplexity.evaluate(eval_step, ms.state, batches, ms.mesh)

  files = _plots(results, workdir, out_dir) if jax.process_index() == 0 else []
  if jax.process_index() == 0:
    _write_counts(results, out_dir)
  splits = {d.eval_split for d in data_cfgs.values()}
  report = {"checkpoint": paths.absolute(path), "step": step,
            "split": splits.pop() if len(splits) == 1 else None,
            "splits": {n: d.eval_split for n, d in data_cfgs.items()},
            "datasets": {n: _jsonable(r) for n, r in results.items()}, "plots": files}
  if jax.process_index() == 0:
    paths.write_json(paths.join(out_dir, "eval.json"), report)
  return report


def _plots(results: dict, workdir: str, out_dir: str) -> list[str]:
  files = []
  curve = plots.loss_curve(read_metrics(workdir), paths.join(out_dir, "loss_curve.png"))
  if curve:
    files.append(curve)
  first = next(iter(results.values()))
  for block, stats in first["experts"].items():
    if "load" in stats:
      files.append(plots.expert_load(block, stats["load"], paths.join(out_dir, f"{block}_load.png")))
    if "score_sum" in stats:
      files.append(plots.sorted_usage(block, stats["score_sum"],
                                      paths.join(out_dir, f"{block}_usage.png")))
  return files


def _write_counts(results: dict, out_dir: str) -> None:
  """``counts.npz``: each dataset's per-expert arrays (``load`` [E], ``score_sum`` [N]) under
  ``DATASET/BLOCK/KEY``, for histograms and analyses that eval.json's scalars cannot give."""
  arrays = {f"{name}/{block}/{k}": np.asarray(v) for name, r in results.items()
            for block, stats in r["experts"].items() for k, v in stats.items() if np.ndim(v) == 1}
  if arrays:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    paths.write_bytes(paths.join(out_dir, "counts.npz"), buf.getvalue())


def _jsonable(result: dict) -> dict:
  out = {k: v for k, v in result.items() if k != "experts"}
  out["experts"] = {b: {k: v for k, v in s.items() if np.ndim(v) == 0} for b, s in result["experts"].items()}
  return out


def format_table(report: dict) -> str:
  """A plain-text table: one row per dataset."""
  head = f"{'dataset':<28} {'loss':>8} {'ppl':>10} {'bits/byte':>10} {'tokens':>10}"
  lines = [head, "-" * len(head)]
  for name, r in report["datasets"].items():
    lines.append(f"{name:<28} {r['loss']:>8.4f} {r['perplexity']:>10.3f} {r['bits_per_byte']:>10.4f} "
                 f"{int(r['tokens']):>10d}")
  for name, r in report["datasets"].items():
    blocks = sorted({k.rpartition("/")[0] for k in r["metrics"]} | set(r["experts"]))
    for block in blocks:
      stats = {k.rpartition("/")[2]: v for k, v in r["metrics"].items() if k.startswith(block + "/")}
      stats.update(r["experts"].get(block, {}))
      lines.append(f"  {name} {block}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(stats.items())))
  return "\n".join(lines)
