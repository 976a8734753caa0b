"""Per-layer expert statistics from counts summed over a dataset.

Every count array is per expert (``load`` [experts] for MoE layers, ``score_sum``
[N] for PEER/PKM). For each we report usage (fraction of experts with a non-zero
count) and unevenness KL(z ‖ uniform) with z the normalised counts (PEER paper
§3.4), plus max/mean.
"""

from __future__ import annotations

import numpy as np

from moejax.layers import expert_usage


def summarize(counts: dict[str, np.ndarray]) -> dict[str, dict]:
  """{'block_3_peer/score_sum': [N]} -> {'block_3_peer': {'score_sum_usage': ..., ...}}."""
  out: dict[str, dict] = {}
  for name, values in sorted(counts.items()):
    block, _, key = name.rpartition("/")
    values = np.asarray(values, np.float64)
    mean = values.mean() if values.size else 0.0
    out.setdefault(block, {}).update({
        f"{key}_usage": float(expert_usage.usage(values)),
        f"{key}_kl_uniform": float(expert_usage.unevenness(values)),
        f"{key}_max_over_mean": float(values.max() / mean) if mean > 0 else 0.0,
        key: values,
    })
  return out
