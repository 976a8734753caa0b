"""Default: a small sparse LM on local_text (Python stdlib sources), byte tokens.

The dense base (4 blocks, d_model 128, d_ff 512) with a PEER layer in its middle block
(block 2): N = 128² = 16,384 single-neuron experts, h = 4 heads × k = 8 (32 active
experts per token), product-key retrieval, query BatchNorm -- the model of
configs/peer_small.py. configs/dense_small.py is the all-dense baseline. Trains on 2 CPU
cores in a few minutes; ``eval.py`` on its export draws the experts' sorted usage. See
README for the losses it reaches.
"""

from moejax.config import default_config


def get_config():
  c = default_config()
  c.model.sparse_ffn = "peer"
  c.model.sparse_layers = "middle"
  c.peer.num_experts_sqrt = 128
  c.peer.heads = 4
  c.peer.top_k = 8
  c.peer.d_key = 64
  c.peer.query_norm = "batch"
  # More batches than the built-in validation split has (161 of 16 x 128): every eval of
  # the run covers the whole split, so its final numbers are the ones eval.py prints.
  c.train.eval_batches = 200
  return c
