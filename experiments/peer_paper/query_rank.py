"""Is low expert usage the queries' fault? Effective rank and usage of a PEER layer's inputs.

    python experiments/peer_paper/query_rank.py WORKDIR/export [--batches 16]

Runs the export's model over validation batches, keeps the inputs of its (first) PEER
layer, and prints:

* the effective rank (exp of the entropy of the normalised singular-value spectrum) of
  those inputs ``[tokens, d_model]`` and of each head's normalised queries ``[tokens, d_key]``;
* expert usage of the layer as trained, on these tokens;
* expert usage when the same inputs are first whitened (PCA to unit variance in every
  direction, same mean), with the layer's own query network and keys: if that is near 100%,
  the keys can reach every expert, and what limits usage is how few directions the inputs
  (hence the queries) span.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moejax import data  # noqa: E402
from moejax.evaluation import run as eval_lib  # noqa: E402
from moejax.layers import peer as peer_lib  # noqa: E402
from moejax.layers.query import topk_batch_parallel  # noqa: E402
from moejax.training.state import model_lm_loss  # noqa: E402


def effective_rank(x: np.ndarray) -> float:
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  p = s ** 2 / np.sum(s ** 2)
  return float(np.exp(-np.sum(p * np.log(p + 1e-30))))


@contextlib.contextmanager
def peer_inputs():
  """Collects the ``[tokens, d_model]`` inputs of every PEER call made inside the block."""
  seen, call = [], peer_lib.PEER.__call__

  def recording(self, x, *args, **kwargs):
    seen.append(np.asarray(x).reshape(-1, x.shape[-1]))
    return call(self, x, *args, **kwargs)

  peer_lib.PEER.__call__ = recording
  try:
    yield seen
  finally:
    peer_lib.PEER.__call__ = call


def usage(retrieval, x: np.ndarray, chunk: int = 4096) -> float:
  n = retrieval.n
  used = np.zeros(n * n, bool)
  for i in range(0, x.shape[0], chunk):
    q = retrieval.queries(jnp.asarray(x[None, i:i + chunk]))
    _, idx = topk_batch_parallel(q, retrieval.keys1[...], retrieval.keys2[...], retrieval.top_k)
    used[np.asarray(idx).ravel()] = True
  return float(used.mean())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("export")
  p.add_argument("--batches", type=int, default=16)
  args = p.parse_args(argv)
  config, ms, _ = eval_lib.load(args.export)
  model = nnx.merge(ms.graphdef, ms.state)
  model.eval()
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  with peer_inputs() as seen:
    for batch in data.make_eval_iterator(config.data, tokenizer, max_batches=args.batches):
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
      model_lm_loss(model, batch, batch["weights"] > 0)
  if not seen:
    print("error: no PEER layer in this model", file=sys.stderr)
    return 2
  x = np.concatenate(seen)
  layer = next(m for _, m in nnx.iter_modules(model) if isinstance(m, peer_lib.PEER))
  retrieval = layer.retrieval
  q = np.asarray(retrieval.queries(jnp.asarray(x[None, :8192])))[0]          # [T, h, d_key]
  head_ranks = [effective_rank(q[:, h]) for h in range(q.shape[1])]
  mean = x.mean(0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  white = ((x - mean) @ vt.T / s * np.sqrt(x.shape[0]) + mean).astype(np.float32)
  print(f"tokens {x.shape[0]}, d_model {x.shape[1]}, d_key {q.shape[2]}, N = {retrieval.n}², "
        f"h = {retrieval.heads}, k = {retrieval.top_k}")
  print(f"effective rank of the layer's inputs: {effective_rank(x):.1f} of {x.shape[1]}")
  print(f"effective rank of each head's queries: {', '.join(f'{r:.1f}' for r in head_ranks)} "
        f"of {q.shape[2]}")
  print(f"expert usage, the layer as trained: {100 * usage(retrieval, x):.2f}%")
  print(f"expert usage, the same inputs whitened: {100 * usage(retrieval, white):.2f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
