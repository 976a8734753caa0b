"""Expert-choice MoE baseline of the PEER paper's Table 1 on C4, for a TPU VM (documented, not
run in CI).

Target slice: v5p:2x2x1 (``TOPOLOGY``; 4 v5p chips, one host: a v5p-8 TPU VM), at the paper's
batch of 128 x 2048 tokens. Compiled there with libtpu (vocab 32,000; jax 0.10.2, libtpu
0.0.42.1; ``python -m moejax.compile --config configs/moe_ec_c4_tpu.py --topology v5p:2x2x1``),
per device of 95.74 GiB usable HBM:
  train step  17.92 GiB (arguments 3.14, temporaries 14.70): 81.3 % headroom
  eval step   13.04 GiB: 86.4 % headroom

He 2024: the MoE baseline uses expert-choice routing (Zhou et al. 2022) with 128 experts, each
the size of the dense MLP (d_ff 3072), in the middle block only (block 6 of 12). The paper gives
no capacity factor; here 1 (each expert takes 1/128 of a routing group's tokens, so a token is
computed by one expert on average, as the dense FFW it replaces), the choice of the cpu-scale
study (experiments/peer_paper). Expert choice ranks a group's tokens per expert, later tokens
included: not causal in a decoder (``moe.allow_noncausal``), the paper's baseline all the same.
It is evaluated as trained (``moe.eval_no_drop=false``): the drop-free evaluation would send
every token to all 128 experts, a different function at 128x the compute.

Experts: 128 x 2 x 768 x 3072 f32 = 2.4 GB (+ 2x that for Adam), sharded over the 'expert'
mesh axis (32 per chip); routing groups of moe.group_size=-1 (auto: 32 slots per expert).
Trunk, data, remat + scan and steps (``get_config(budget)``, 6e18 default, 2e19 with
``:2e19``) as in configs/dense_c4_tpu.py.

  python train.py --config=configs/moe_ec_c4_tpu.py --workdir=gs://YOUR_BUCKET/runs/moe_ec_c4 \\
      --config.data.data_dir=gs://YOUR_BUCKET/tensorflow_datasets \\
      --config.data.tokenizer=gs://YOUR_BUCKET/spm/c4_32k.model
"""

from moejax import flops
from moejax.config import C4_VOCAB, c4_tpu_base

TOPOLOGY = "v5p:2x2x1"                      # target slice: 4 v5p chips (v5p-8)


def get_config(budget: str = "6e18"):
  c = c4_tpu_base(seq_len=2048, batch_size=128, steps=1, warmup_steps=2000)
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "middle"          # block 6 of 12

  c.moe.num_experts = 128
  c.moe.router = "expert_choice"
  c.moe.capacity_factor_train = 1.0
  c.moe.capacity_factor_eval = 1.0
  c.moe.dispatch = "einsum"
  c.moe.allow_noncausal = True
  c.moe.balance_loss_weight = 0.0           # expert choice is balanced by construction
  c.moe.eval_no_drop = False                # evaluated as trained (see docstring)

  c.model.remat = "full"
  c.model.scan_layers = True

  c.mesh.data = -1
  c.mesh.expert = 4                         # 32 of the 128 experts per chip
  c.mesh.model = 1
  c.train.steps = flops.steps_for_budget(c, float(budget), vocab_size=C4_VOCAB)
  return c
