"""PKM baseline on C4 with the PEER paper's settings, for a TPU VM (documented, not run in CI).

Target slice: v5p:2x2x1 (``TOPOLOGY``; 4 v5p chips, one host: a v5p-8 TPU VM), at the paper's
batch of 128 x 2048 tokens. Compiled there with libtpu (vocab 32,000; jax 0.10.2, libtpu
0.0.42.1; ``python -m moejax.compile --config configs/pkm_c4_tpu.py --topology v5p:2x2x1``),
per device of 95.74 GiB usable HBM:
  train step  18.83 GiB (arguments 3.72, temporaries 15.04): 80.3 % headroom
  eval step   14.26 GiB: 85.1 % headroom
What gets it there (``benchmarks/RESULTS.md``, "TPU compiles"): model.remat=full +
model.scan_layers, and the fused Pallas PKM kernels (pkm.kernel=auto, the default). Each is
needed: without remat + scan the train step needs 119.8 GiB of temporaries; with the plain-JAX
lookup (pkm.kernel=reference) 202.7 GiB; with neither 270.1 GiB.

He 2024: the PKM baseline has 1024² memories, h = 8 heads, k = 32, query BatchNorm, in the
middle block only (block 6 of 12); batch 128 × 2048 tokens. Trunk, steps, data and mesh as
in configs/peer_c4_tpu.py (see there for the data_dir / tokenizer placeholders and the
isoFLOP steps: ``get_config(budget)``, 6e18 by default).

Values: 1024² × 768 float32 = 3.2 GB (+ Adam), rows sharded over the 'expert' axis by
default, or by feature with --config.mesh.rules=table_rows=,table_embed=model.

  python train.py --config=configs/pkm_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/pkm_c4
"""

from moejax import flops
from moejax.config import C4_VOCAB, c4_tpu_base

TOPOLOGY = "v5p:2x2x1"                      # target slice: 4 v5p chips (v5p-8)


def get_config(budget: str = "6e18"):
  c = c4_tpu_base(seq_len=2048, batch_size=128, steps=1, warmup_steps=2000)
  c.model.sparse_ffn = "pkm"
  c.model.sparse_layers = "middle"

  c.pkm.num_keys_sqrt = 1024                # 1024² memory slots
  c.pkm.heads = 8
  c.pkm.top_k = 32
  c.pkm.d_key = 128
  c.pkm.query_norm = "batch"
  c.pkm.per_head_keys = True

  c.optim.table_lr = 1e-3

  # Memory (see docstring): activations of a block are recomputed in the backward and the
  # 12 blocks run under nnx.scan (the repeating dense blocks scanned, the PKM block not).
  c.model.remat = "full"
  c.model.scan_layers = True
  c.pkm.kernel = "auto"                     # fused Pallas kernels on TPU (d_model 768 = 6 x 128)

  c.mesh.data = -1
  c.mesh.expert = 4                         # value rows over 4 devices
  c.mesh.model = 1
  c.train.steps = flops.steps_for_budget(c, float(budget), vocab_size=C4_VOCAB)
  return c
