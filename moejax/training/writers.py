"""Metric writers (JSONL + TensorBoard) and the progress bar. Process 0 writes."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Appends ``{"step": s, "split": ..., name: value}`` lines to metrics.jsonl; mirrors to TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, split: str = "train") -> None:
    if not self.active:
      return
    row = {"step": int(step), "split": split, "time": time.time(),
           **{k: _scalar(v) for k, v in metrics.items()}}
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
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """tqdm bar with step, loss, tokens/s and ETA (or plain log lines when disabled)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                           refresh=False)
      self.bar.update(n)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif jax.process_index() == 0:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
