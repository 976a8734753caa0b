"""Metric writers (JSONL + TensorBoard) and the progress bar. Process 0 writes."""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np
from etils import epath

from moejax import paths


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Appends ``{"step": s, "split": ..., name: value}`` lines to metrics.jsonl; mirrors to TensorBoard.

  On resume (``resume_step``), rows logged after that step by the interrupted run are
  dropped (and a torn last line), so the file reads as one run. On a bucket (no appends) the file is rewritten.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self.rows = [r for r in read_metrics(workdir) if r["step"] <= resume_step] if resume_step else []
    self.rows.sort(key=lambda r: r["step"])   # stable: train before eval within a step, as written
    self.tb = None
    if not self.active:
      return
    self._rewrite()
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(paths.join(workdir, "tensorboard"))
      except Exception as e:  # e.g. a bucket without a tensorboardX filesystem for it
        logging.warning("no TensorBoard events (%s); metrics.jsonl has everything", e)

  def _rewrite(self) -> None:
    epath.Path(self.path).write_text("".join(json.dumps(r) + "\n" for r in self.rows))

  def last(self, split: str = "train") -> dict | None:
    """The last row of ``split`` kept so far (e.g. to carry running totals over a resume)."""
    return next((r for r in reversed(self.rows) if r.get("split") == split), None)

  def write(self, step: int, metrics: dict, split: str = "train", *, replace: bool = False) -> None:
    """Appends a row; ``replace`` first drops the rows of the same step and split (a
    re-evaluation replaces the eval row instead of adding a duplicate)."""
    if not self.active:
      return
    row = {"step": int(step), "split": split, "time": time.time(),
           **{k: _scalar(v) for k, v in metrics.items()}}
    dropped = replace and any(r["step"] == step and r.get("split") == split for r in self.rows)
    if dropped:
      self.rows = [r for r in self.rows if not (r["step"] == step and r.get("split") == split)]
    self.rows.append(row)
    if paths.is_remote(self.path) or dropped:
      self._rewrite()
    else:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("step", "split", "time"):
          self.tb.add_scalar(f"{split}/{k}", v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``metrics.jsonl``. A line that is not a JSON row (the torn last line of a
  run killed mid-write, or a damaged one) is dropped with a warning, never fatal."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  rows, bad = [], []
  lines = epath.Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append(row)
    else:
      bad.append(i + 1)
  if bad:
    last = " (the torn last line of an interrupted write)" if bad == [len(lines)] else ""
    logging.warning("%s: dropped %d unreadable line(s) %s%s", path, len(bad), bad[:5], last)
  return rows


class Progress:
  """tqdm bar with step, loss, tokens/s and ETA (or plain log lines when disabled).

  Until :meth:`started` (the first step of the run has finished) the bar says "compiling…":
  the first step compiles the train step and builds or loads the CPU kernels, which takes
  as long as many steps. The bar with the rate and ETA is created then, so that neither
  counts that work.
  """

  def __init__(self, total: int, initial: int, enabled: bool):
    self.total = total
    self.bar = None
    self._enabled = enabled and jax.process_index() == 0
    if self._enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, desc="compiling…", leave=False,
                      bar_format="{desc} (step {n_fmt}/{total_fmt})", dynamic_ncols=True)
    self._compiling = self._enabled

  def started(self, step: int) -> None:
    """The run's first step (``step``) has finished: the rate and ETA start from here."""
    if not self._compiling:
      return
    from tqdm import tqdm
    self.bar.close()
    self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True,
                    mininterval=1.0)
    self._compiling = False

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                           refresh=False)
      self.bar.update(n)
      if not self._compiling and self.bar.n >= self.total:
        self.close()   # now, so that its last line is the training rate (not the final save's)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif jax.process_index() == 0:
      print(text, flush=True)

  def close(self) -> None:
    """Ends the bar (its last line keeps the training rate); later writes are plain lines."""
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    self._compiling = False
