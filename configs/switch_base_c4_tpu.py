"""Switch-Base (128 experts) on C4, for a TPU v5p pod slice (documented, not run in CI).

Target slice: v5p:2x2x4 (``TOPOLOGY``; 16 v5p chips on 4 hosts: a v5p-32 pod slice), the
slice its experts need: the 'expert' mesh axis is 16 wide, 8 of the 128 experts per chip.
Compiled there with libtpu (vocab 32,000; jax 0.10.2, libtpu 0.0.42.1;
``python -m moejax.compile --config configs/switch_base_c4_tpu.py --topology v5p:2x2x4``),
per device of 95.74 GiB usable HBM:
  train step  10.61 GiB (arguments 3.72, temporaries 6.66): 88.9 % headroom
  eval step    2.79 GiB: 97.1 % headroom
No remat or scan needed (with model.remat=full + model.scan_layers: 7.25 GiB, 92.4 %); the
slice is set by the experts' expert-parallel layout, not by memory.

Fedus et al. 2021, Switch-Base: T5-Base trunk (d_model 768, 12 layers, 12 heads × 64,
d_ff 3072), a Switch layer (128 experts, top-1, capacity factor 1.25 train / 2.0 eval,
balance loss 0.01, router z-loss 1e-3 as in ST-MoE, input jitter) in every other block,
512-token sequences. Decoder-only here (moejax trains LMs), with the T5 SentencePiece
vocabulary (32k).

Mesh: experts over the 'expert' axis with explicit all_to_all (dispatch='expert_parallel'):
on the v5p-32 (16 chips) mesh = data 1 × expert 16 (8 experts per chip); a larger slice
takes the rest on 'data' (v5p-64, 32 chips: data 2 × expert 16), or use
--config.mesh.expert=32 on 32 chips (4 experts per chip). The batch is sharded over data ×
expert outside the MoE layers; routing groups are sequences, so capacity per group is
ceil(1.25 × 512 / 128) = 5 slots per expert and sequence.

Data: TFDS c4/en:3.1.0 prepared as array_record (tfds build c4/en:3.1.0 --file_format=array_record)
in a bucket; pass it and the tokenizer on the command line, e.g.

  python train.py --config=configs/switch_base_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/switch_base \
      --config.data.data_dir=gs://YOUR_BUCKET/tensorflow_datasets \
      --config.data.tokenizer=gs://YOUR_BUCKET/spm/c4_32k.model
"""

from moejax.config import c4_tpu_base

TOPOLOGY = "v5p:2x2x4"                      # target slice: 16 v5p chips (v5p-32), one per expert shard


def get_config():
  c = c4_tpu_base(seq_len=512, batch_size=256, steps=100000, warmup_steps=10000)
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "every:2:1"

  c.moe.num_experts = 128
  c.moe.top_k = 1
  c.moe.router = "top_k"
  c.moe.renormalize = False
  c.moe.router_noise = "jitter"
  c.moe.jitter_eps = 0.01
  c.moe.capacity_factor_train = 1.25
  c.moe.capacity_factor_eval = 2.0
  c.moe.min_capacity = 4
  c.moe.balance_loss_weight = 0.01
  c.moe.z_loss_weight = 1e-3
  c.moe.dispatch = "expert_parallel"

  c.mesh.data = -1
  c.mesh.expert = 16
  c.mesh.model = 1
  return c
