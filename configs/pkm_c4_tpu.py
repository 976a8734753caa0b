"""PKM baseline on C4 with the PEER paper's settings, for a TPU VM (documented, not run in CI).

He 2024: the PKM baseline has 1024² memories, h = 8 heads, k = 32, query BatchNorm, in the
middle block only (block 6 of 12); batch 128 × 2048 tokens. Trunk, steps, data and mesh as
in configs/peer_c4_tpu.py (see there for the data_dir / tokenizer placeholders).

Values: 1024² × 768 float32 = 3.2 GB (+ Adam), rows sharded over the 'expert' axis by
default, or by feature with --config.mesh.rules=table_rows=,table_embed=model.

  python train.py --config=configs/pkm_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/pkm_c4
"""

from moejax.config import default_config


def get_config():
  c = default_config()
  c.model.update(dict(vocab_size=0, d_model=768, num_layers=12, num_heads=12, head_dim=64,
                      d_ff=3072, dtype="bfloat16"))
  c.model.sparse_ffn = "pkm"
  c.model.sparse_layers = "middle"

  c.pkm.num_keys_sqrt = 1024                # 1024² memory slots
  c.pkm.heads = 8
  c.pkm.top_k = 32
  c.pkm.d_key = 128
  c.pkm.query_norm = "batch"
  c.pkm.per_head_keys = True

  c.data.dataset = "c4/en:3.1.0"
  c.data.data_dir = ""                      # gs://YOUR_BUCKET/tensorflow_datasets
  c.data.tokenizer = "byte"                 # gs://YOUR_BUCKET/spm/c4_32k.model
  c.data.text_key = "text"
  c.data.eval_split = "validation"
  c.data.seq_len = 2048
  c.data.batch_size = 128
  c.data.worker_count = 8

  c.optim.lr = 1e-3
  c.optim.table_lr = 1e-3
  c.optim.warmup_steps = 2000
  c.optim.schedule = "cosine"
  c.train.steps = 35000
  c.train.log_every = 100
  c.train.eval_every = 2000
  c.train.checkpoint_every = 2000

  c.mesh.data = -1
  c.mesh.expert = 4
  c.mesh.model = 1
  c.eval.datasets = "c4/en:3.1.0"
  return c
