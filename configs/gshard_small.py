"""GShard top-2 in every other block of the default small LM; CPU-sized.

8 experts, top-2 with GShard's random second-expert policy (kept with probability
2 * g2 in training, always in evaluation), gates renormalised over the two experts,
capacity factor 2.0 (C = 2 * 2 * S / E per group). Trains on 2 CPU cores in a few minutes.

  python train.py --config=configs/gshard_small.py --workdir=/tmp/gshard_small
"""

from moejax.config import default_config


def get_config():
  c = default_config()
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "every:2:1"
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.router = "top_k"
  c.moe.second_policy = "random"
  c.moe.second_policy_eval = "all"
  c.moe.second_threshold = 0.5
  c.moe.renormalize = True
  c.moe.capacity_factor_train = 2.0
  c.moe.capacity_factor_eval = 2.0
  c.moe.balance_loss_weight = 0.01
  c.moe.z_loss_weight = 1e-3
  c.moe.dispatch = "einsum"
  c.moe.allow_noncausal = True          # GShard's top-2 capacity is not causal (later tokens can drop earlier second choices);
                                         # evaluation / generation run it without dropping
  c.moe.activation = "gelu_tanh"         # experts: the tanh approximation
  c.dense.activation = "gelu_tanh"       # dense blocks: the tanh approximation
  return c
