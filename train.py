"""Train a moejax language model.

    python train.py [--config configs/NAME.py] [--config.FIELD=VALUE ...] [--workdir DIR]

With no arguments: the default small model on the built-in offline dataset
(``local_text`` over the Python standard library sources), byte tokenizer.
Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from moejax.cli import check_config_overrides
from moejax.errors import CheckpointError, ConfigError, DataError

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
FLAGS = flags.FLAGS
if __name__ == "__main__":
  # config_flags parses --config.* overrides right here; name unknown fields in one line first.
  check_config_overrides(sys.argv)
config_flags.DEFINE_config_file("config", _DEFAULT, "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics, export.")
flags.DEFINE_string("coordinator", "", "host:port for jax.distributed (multi-host); '' = auto/none.")
flags.DEFINE_integer("num_processes", 0, "Processes for jax.distributed; 0 = auto/none.")
flags.DEFINE_integer("process_id", -1, "This process for jax.distributed.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax/TFDS log every file op
  from moejax.distributed import maybe_initialize
  maybe_initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from moejax.training import loop
  try:
    result = loop.train(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  if result["preempted"]:
    print(f"stopped at step {result['step']} (preempted); re-run the same command to resume")


if __name__ == "__main__":
  app.run(main)
