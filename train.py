"""Train a moejax language model.

    python train.py [--config configs/NAME.py] [--config.FIELD=VALUE ...] [--workdir DIR]

With no arguments: the default small model on the built-in offline dataset
(``local_text`` over the Python standard library sources), byte tokenizer.
Re-running the same command resumes from the newest checkpoint in --workdir that
restores; re-running a finished run does nothing (``--reevaluate`` evaluates again).

Exit codes: 0 done (or preempted, or already finished); 2 a bad input (config, flag,
data, tokenizer, checkpoint, workdir: one ``error:`` line on stderr, nothing written);
1 stopped by a non-finite loss (``train.on_nonfinite=stop``).
"""

import os
import sys

from moejax import platform_env

platform_env.skip_absent_tpu()   # before JAX is imported: no libtpu start-up lines without a TPU

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from moejax import backends, cli
from moejax.errors import (EXIT_NONFINITE, CheckpointError, ConfigError, DataError,
                           NonFiniteError)

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
FLAGS = flags.FLAGS
if __name__ == "__main__":
  # config_flags parses --config.* overrides right here; name bad fields / files in one line first.
  cli.check_config_overrides_or_fail(sys.argv)
  if cli._config_file(sys.argv) is not None:
    cli._check_config_file(cli._config_file(sys.argv))
config_flags.DEFINE_config_file("config", _DEFAULT, "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics, export.")
flags.DEFINE_bool("reevaluate", False, "On a finished workdir: run the final evaluation again "
                  "(replacing its row in metrics.jsonl); otherwise a finished run does nothing.")
flags.DEFINE_string("coordinator", "", "host:port for jax.distributed (multi-host); '' = auto/none.")
flags.DEFINE_integer("num_processes", 0, "Processes for jax.distributed; 0 = auto/none.")
flags.DEFINE_integer("process_id", -1, "This process for jax.distributed.")


def _check_flags() -> None:
  """Each bad flag is one line naming it (exit 2), before JAX is imported."""
  if FLAGS.coordinator:
    cli.check(FLAGS.num_processes >= 1, "num_processes", FLAGS.num_processes,
              f"must be >= 1 with --coordinator={FLAGS.coordinator} (the number of processes)")
    cli.check(0 <= FLAGS.process_id < FLAGS.num_processes, "process_id", FLAGS.process_id,
              f"must be in [0, {FLAGS.num_processes}) with --coordinator={FLAGS.coordinator} "
              "(this process's index)")
  else:
    cli.check(FLAGS.num_processes == 0, "num_processes", FLAGS.num_processes,
              "needs --coordinator=HOST:PORT (or leave both out)")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax/TFDS log every file op
  _check_flags()
  backends.prepare_process()   # before JAX's first computation
  from moejax.distributed import maybe_initialize
  maybe_initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  cli.check_cpu_kernels()
  from moejax.training import checkpoint, loop
  checkpoint.quiet_asyncio_noise()
  try:
    result = loop.train(FLAGS.config, FLAGS.workdir, reevaluate=FLAGS.reevaluate)
  except (ConfigError, DataError, CheckpointError) as e:
    cli.fail(str(e))
  except NonFiniteError as e:
    cli.fail(str(e), EXIT_NONFINITE)
  if result["preempted"]:
    print(f"stopped at step {result['step']} (preempted); re-run the same command to resume")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
