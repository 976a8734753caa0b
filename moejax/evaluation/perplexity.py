"""Loss, perplexity and bits-per-byte over a dataset, with expert counts summed on device."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import numpy as np

from moejax.errors import DataError
from moejax.evaluation import expert_stats
from moejax.training.state import device_batch


def evaluate(eval_step: Callable, model_state, batches: Iterable[dict], mesh) -> dict:
  """Runs ``eval_step`` over ``batches``.

  Sums stay on device until the end (per-expert counts can be N = 1024² long),
  so there is one host transfer per dataset, not per batch.

  Returns: {'loss', 'perplexity', 'bits_per_byte', 'tokens', 'batches',
  'metrics': {name: mean over batches}, 'experts': {block: statistics}}.
  """
  total, n = None, 0
  add = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b))
  for batch in batches:
    out = eval_step(model_state, device_batch(batch, mesh))
    total = out if total is None else add(total, out)
    n += 1
  if total is None:
    raise DataError("the evaluation split produced no batches (check --dataset/--split, "
                    "or config.data.eval_split)")
  total = jax.device_get(total)
  tokens = float(total["weight_sum"])
  loss = float(total["loss_sum"]) / max(tokens, 1.0)
  bytes_ = float(total["bytes_sum"])
  return {
      "loss": loss,
      "perplexity": math.exp(min(loss, 80.0)),
      "bits_per_byte": float(total["loss_sum"]) / math.log(2) / bytes_ if bytes_ else float("nan"),
      "tokens": tokens,
      "batches": n,
      "metrics": {k: float(v) / n for k, v in total["metrics"].items()},
      "experts": expert_stats.summarize({k: np.asarray(v) for k, v in total["counts"].items()}),
  }


def scalars(result: dict) -> dict[str, float]:
  """Flat scalar view of an ``evaluate`` result, for metric writers."""
  out = {k: result[k] for k in ("loss", "perplexity", "bits_per_byte")}
  out.update(result["metrics"])
  for block, stats in result["experts"].items():
    out.update({f"{block}/{k}": v for k, v in stats.items() if np.ndim(v) == 0})
  return out
