"""PKM (product key memory) in the middle block of the default small LM; CPU-sized.

N = 128² = 16384 value slots of size d_model, h = 4 heads × k = 8, per-head sub-keys,
query BatchNorm.

  python train.py --config=configs/pkm_small.py --workdir=/tmp/pkm_small
"""

from moejax.config import default_config


def get_config():
  c = default_config()
  c.model.sparse_ffn = "pkm"
  c.model.sparse_layers = "middle"
  c.pkm.num_keys_sqrt = 128
  c.pkm.heads = 4
  c.pkm.top_k = 8
  c.pkm.d_key = 64
  c.pkm.query_norm = "batch"
  c.dense.activation = "gelu_tanh"       # dense blocks: the tanh approximation
  return c
