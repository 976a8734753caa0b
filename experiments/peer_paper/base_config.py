"""The study's base: moejax's dense defaults, on which each arm's flags set trunk and FFN.

Not ``configs/default.py``, so that a change of the project's quick-start model never
changes what a study arm trains.
"""

from moejax.config import default_config


def get_config():
  return default_config()
