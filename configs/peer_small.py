"""PEER in the middle block of the default small LM; trains on 2 CPU cores in minutes.

N = 128² = 16384 single-neuron experts, h = 4 heads × k = 8 (32 active experts per token),
query BatchNorm (paper). ~4.2M expert-table parameters against ~0.9M for the rest.

  python train.py --config=configs/peer_small.py --workdir=/tmp/peer_small
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
  c.peer.activation = "gelu_tanh"     # the tanh approximation (moejax before exact gelu)
  c.peer.score = "softmax"
  c.peer.query_norm = "batch"
  c.dense.activation = "gelu_tanh"       # dense blocks: the tanh approximation
  return c
