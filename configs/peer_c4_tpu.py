"""PEER on C4 with the paper's settings, for a TPU VM (documented, not run in CI).

Target slice: v5p:2x2x1 (``TOPOLOGY``; 4 v5p chips, one host: a v5p-8 TPU VM), at the paper's
batch of 128 x 2048 tokens. Compiled there with libtpu (vocab 32,000; jax 0.10.2, libtpu
0.0.42.1; ``python -m moejax.compile --config configs/peer_c4_tpu.py --topology v5p:2x2x1``),
per device of 95.74 GiB usable HBM:
  train step  22.68 GiB (arguments 5.96, temporaries 16.65): 76.3 % headroom
  eval step   14.33 GiB: 85.0 % headroom
What gets it there (``benchmarks/RESULTS.md``, "TPU compiles"): model.remat=full +
model.scan_layers, and the fused Pallas PEER kernels (peer.kernel=auto, the default). Each is
needed: without remat + scan the train step needs 121.4 GiB of temporaries; with the plain-JAX
lookup (peer.kernel=reference, which holds [tokens, h, k, d] tensors) 110.0 GiB; with neither
175.2 GiB. model.loss_chunk=4096 does not lower the peak here
(22.80 GiB). Check any change before renting: the command above with --config.FIELD=VALUE.

He 2024 ("Mixture of A Million Experts"): batch 128 × 2048 tokens, PEER replaces only the
FFW of the middle block (block 6 of 12), N = 1024² experts, h = 8 heads, k = 16, query
BatchNorm. The paper does not give widths (they vary along isoFLOP curves), d_key, init or
optimizer; here a ~GPT-2-small trunk (12 × 768) and d_key = 128. Steps: the isoFLOP budget
(``get_config(budget)``, default 6e18; ``--config=configs/peer_c4_tpu.py:2e19`` for the 2e19 set)
over the model FLOPs of one step (``moejax.flops``, vocab 32,000), as for the dense, MoE and PKM
arms of the same table (configs/dense_c4_tpu.py).

Data: TFDS 'c4/en:3.1.0' prepared as array_record, e.g.
  --config.data.data_dir=gs://YOUR_BUCKET/tensorflow_datasets
and a SentencePiece model (32k), e.g. --config.data.tokenizer=gs://YOUR_BUCKET/spm/c4_32k.model

Tables: 2 × 1024² × 768 float32 = 6.4 GB (+ 2× that for Adam); by default their rows are
sharded over the 'expert' mesh axis. For equal work per shard whatever rows are picked,
shard them by feature instead: --config.mesh.rules=table_rows=,table_embed=model with a
'model' axis (Meta memory layers do this).

  python train.py --config=configs/peer_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/peer_c4
"""

from moejax import flops
from moejax.config import C4_VOCAB, c4_tpu_base

TOPOLOGY = "v5p:2x2x1"                      # target slice: 4 v5p chips (v5p-8)


def get_config(budget: str = "6e18"):
  c = c4_tpu_base(seq_len=2048, batch_size=128, steps=1, warmup_steps=2000)
  c.model.sparse_ffn = "peer"
  c.model.sparse_layers = "middle"          # block 6 of 12

  c.peer.num_experts_sqrt = 1024            # N = 1024² = 1,048,576 experts
  c.peer.heads = 8
  c.peer.top_k = 16
  c.peer.d_key = 128
  c.peer.activation = "gelu_tanh"         # the tanh approximation, as moejax always used
  c.peer.score = "softmax"
  c.peer.query_norm = "batch"               # paper default (global batch statistics)

  c.optim.table_lr = 1e-3

  # Memory (see docstring): activations of a block are recomputed in the backward and the
  # 12 blocks run under nnx.scan (the repeating dense blocks scanned, the PEER block not).
  # model.loss_chunk=4096 was measured too: it does not lower the peak here (not set).
  c.model.remat = "full"
  c.model.scan_layers = True
  c.peer.kernel = "auto"                    # fused Pallas kernels on TPU (d_model 768 = 6 x 128)

  c.mesh.data = -1
  c.mesh.expert = 4                         # table rows over 4 devices (see docstring)
  c.mesh.model = 1
  c.train.steps = flops.steps_for_budget(c, float(budget), vocab_size=C4_VOCAB)
  return c
