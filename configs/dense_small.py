"""The dense baseline: a 0.85M-parameter LM (4 blocks, d_model 128, d_ff 512) on local_text,
byte tokens; every block a dense feed-forward. ``moejax.config.default_config()`` as is, the
base the other configs change. The CPU throughput benchmarks time this step.

  python train.py --config=configs/dense_small.py --workdir=/tmp/dense_small
"""

from moejax.config import default_config


def get_config():
  return default_config()
