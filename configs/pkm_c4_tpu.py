"""PKM baseline on C4 with the PEER paper's settings, for a TPU VM (documented, not run in CI).

He 2024: the PKM baseline has 1024² memories, h = 8 heads, k = 32, query BatchNorm, in the
middle block only (block 6 of 12); batch 128 × 2048 tokens. Trunk, steps, data and mesh as
in configs/peer_c4_tpu.py (see there for the data_dir / tokenizer placeholders).

Values: 1024² × 768 float32 = 3.2 GB (+ Adam), rows sharded over the 'expert' axis by
default, or by feature with --config.mesh.rules=table_rows=,table_embed=model.

  python train.py --config=configs/pkm_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/pkm_c4
"""

from moejax.config import c4_tpu_base


def get_config():
  c = c4_tpu_base(seq_len=2048, batch_size=128, steps=35000, warmup_steps=2000)
  c.model.sparse_ffn = "pkm"
  c.model.sparse_layers = "middle"

  c.pkm.num_keys_sqrt = 1024                # 1024² memory slots
  c.pkm.heads = 8
  c.pkm.top_k = 32
  c.pkm.d_key = 128
  c.pkm.query_norm = "batch"
  c.pkm.per_head_keys = True

  c.optim.table_lr = 1e-3

  c.mesh.data = -1
  c.mesh.expert = 4
  c.mesh.model = 1
  return c
