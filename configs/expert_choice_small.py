"""Expert choice routing (Zhou et al. 2022) in every other block of the default small LM.

8 experts; each takes the top C = 2 * S / E tokens of its sequence (capacity factor 2:
on average two experts per token), weighted by the router probability. No balancing loss
(balanced by construction), z-loss 1e-3. Trains on 2 CPU cores in a few minutes.

Note: expert choice looks at the whole sequence to pick tokens, so a token's routing
depends on later tokens of the same group (not causal) -- as in the paper.

  python train.py --config=configs/expert_choice_small.py --workdir=/tmp/ec_small
"""

from moejax.config import default_config


def get_config():
  c = default_config()
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "every:2:1"
  c.moe.num_experts = 8
  c.moe.router = "expert_choice"
  c.moe.capacity_factor_train = 2.0
  c.moe.capacity_factor_eval = 2.0
  c.moe.z_loss_weight = 1e-3
  c.moe.dispatch = "einsum"
  c.moe.allow_noncausal = True          # expert choice is not causal in a decoder (it ranks the whole group);
                                         # evaluation / generation run it without dropping
  c.moe.activation = "gelu_tanh"         # experts: the tanh approximation
  c.dense.activation = "gelu_tanh"       # dense blocks: the tanh approximation
  return c
