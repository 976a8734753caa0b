"""Evaluate a moejax export or training checkpoint.

    python eval.py --checkpoint WORKDIR/export [--dataset NAME[,NAME]] [--split validation]

Prints loss, perplexity and bits-per-byte per dataset as a table, writes
eval.json and PNG plots (training loss curve, expert load / usage) next to it.
A bad input (flag, checkpoint, dataset) is one ``error:`` line on stderr, exit code 2.
"""

import json

from moejax import platform_env

platform_env.skip_absent_tpu()   # before JAX is imported: no libtpu start-up lines without a TPU

from absl import app, flags
from absl import logging as absl_logging

from moejax import backends, cli
from moejax.errors import CheckpointError, ConfigError, DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "An export dir, a workdir or its checkpoints/ dir.", required=True)
flags.DEFINE_string("dataset", "", "Comma list of TFDS dataset names; '' = the config's.")
flags.DEFINE_string("split", "", "Split to evaluate; '' = config.eval.split.")
flags.DEFINE_integer("max_batches", -1, "Stop after this many batches per dataset; -1 = config, 0 = all.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir override.")
flags.DEFINE_string("out", "", "Where to write eval.json and plots; '' = <checkpoint>/eval.")
flags.DEFINE_bool("json", False, "Print the JSON report instead of the table.")


def _check_flags() -> None:
  """Each bad flag is one line naming it (exit 2), before JAX is imported."""
  cli.check(FLAGS.max_batches >= -1, "max_batches", FLAGS.max_batches,
            "must be -1 (the config's), 0 (all) or a number of batches (e.g. --max_batches=100)")
  cli.check(all(d.strip() for d in FLAGS.dataset.split(",")) or not FLAGS.dataset, "dataset",
            FLAGS.dataset, "an empty name in the list (e.g. --dataset=local_text,c4)")
  cli.check_checkpoint(FLAGS.checkpoint)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax/TFDS log every file op
  _check_flags()
  backends.prepare_process()   # before JAX's first computation
  from moejax.evaluation import run
  from moejax.training.checkpoint import quiet_asyncio_noise
  quiet_asyncio_noise()
  cli.check_cpu_kernels()
  try:
    report = run.evaluate(
        FLAGS.checkpoint, datasets=[d.strip() for d in FLAGS.dataset.split(",") if d.strip()] or None,
        split=FLAGS.split or None, max_batches=None if FLAGS.max_batches < 0 else FLAGS.max_batches,
        data_dir=FLAGS.data_dir, out_dir=FLAGS.out or None)
  except (ConfigError, DataError, CheckpointError) as e:
    cli.fail(str(e), hard=True)
  print(json.dumps(report, indent=1) if FLAGS.json else run.format_table(report))
  for f in report["plots"]:
    print(f"plot: {f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
