"""Default: a 0.9M-parameter dense LM on local_text (Python stdlib sources), byte tokens.

Trains on 2 CPU cores in a few minutes; see README for the loss it reaches.
"""

from moejax.config import default_config


def get_config():
  return default_config()
