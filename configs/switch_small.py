"""Switch Transformer (top-1) in every other block of the default small LM; CPU-sized.

8 experts of the model's d_ff (512), top-1 with raw gate (Switch), capacity factor 1.25
(train) / 2.0 (eval), input jitter, load-balancing loss 0.01, z-loss 1e-3. Trains on 2
CPU cores in a few minutes.

  python train.py --config=configs/switch_small.py --workdir=/tmp/switch_small
"""

from moejax.config import default_config


def get_config():
  c = default_config()
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "every:2:1"
  c.moe.num_experts = 8
  c.moe.top_k = 1
  c.moe.router = "top_k"
  c.moe.renormalize = False              # Switch: y = p_i(x) E_i(x)
  c.moe.router_noise = "jitter"
  c.moe.jitter_eps = 0.01
  c.moe.capacity_factor_train = 1.25
  c.moe.capacity_factor_eval = 2.0
  c.moe.balance_loss_weight = 0.01
  c.moe.z_loss_weight = 1e-3
  c.moe.dispatch = "einsum"
  c.moe.activation = "gelu_tanh"         # experts: the tanh approximation
  c.dense.activation = "gelu_tanh"       # dense blocks: the tanh approximation
  return c
