"""Dense baseline of the PEER paper's Table 1 on C4, for a TPU VM (documented, not run in CI).

Target slice: v5p:2x2x1 (``TOPOLOGY``; 4 v5p chips, one host: a v5p-8 TPU VM), at the paper's
batch of 128 x 2048 tokens. Compiled there with libtpu (vocab 32,000; jax 0.10.2, libtpu
0.0.42.1; ``python -m moejax.compile --config configs/dense_c4_tpu.py --topology v5p:2x2x1``),
per device of 95.74 GiB usable HBM:
  train step  15.94 GiB (arguments 1.50, temporaries 14.41): 83.4 % headroom
  eval step   12.41 GiB: 87.0 % headroom
The trunk, data, remat + scan and mesh are those of configs/peer_c4_tpu.py; every block has
the dense FFW (d_ff 3072) that PEER, PKM and the MoE replace in block 6.

Steps: the isoFLOP budget (``get_config(budget)``, default 6e18) divided by the model FLOPs of
one step (``moejax.flops``: 3 x forward, attention scores included, vocab 32,000). The 2e19
set of Table 1 is the same trunk trained longer: ``--config=configs/dense_c4_tpu.py:2e19``.
The paper moves widths along its isoFLOP curves; here only the steps move, one trunk for
every arm (``experiments/peer_paper/tpu_table.py`` prints the whole table's commands).

  python train.py --config=configs/dense_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/dense_c4 \\
      --config.data.data_dir=gs://YOUR_BUCKET/tensorflow_datasets \\
      --config.data.tokenizer=gs://YOUR_BUCKET/spm/c4_32k.model
"""

from moejax import flops
from moejax.config import C4_VOCAB, c4_tpu_base

TOPOLOGY = "v5p:2x2x1"                      # target slice: 4 v5p chips (v5p-8)


def get_config(budget: str = "6e18"):
  c = c4_tpu_base(seq_len=2048, batch_size=128, steps=1, warmup_steps=2000)
  c.model.sparse_layers = "none"            # the dense FFW in all 12 blocks

  c.model.remat = "full"                    # as the sparse arms: one trunk, one memory plan
  c.model.scan_layers = True

  c.mesh.data = -1
  c.mesh.expert = 1
  c.mesh.model = 1
  c.train.steps = flops.steps_for_budget(c, float(budget), vocab_size=C4_VOCAB)
  return c
