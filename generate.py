"""Sample text from a trained moejax model (an export or a training workdir).

    python generate.py --checkpoint WORKDIR[/export] --prompt "def " --max_new_tokens 200
    python generate.py --checkpoint DIR --prompts_file prompts.txt --batch_size 8 --temperature 0

One prompt per line of ``--prompts_file`` (``\\n`` in a line is a newline), decoded together
``--batch_size`` at a time: each batch's prompts go through one prefill forward, then a KV
cache decodes them token by token (``moejax.generation``), compiled once per (batch, prompt
length bucket, max_new_tokens); ``--temperature 0`` is greedy. A row ends at the tokenizer's
end of sequence, at the model's own (``config.special_tokens.eos_token_id``, kept from a
Hugging Face checkpoint), or at a ``--stop`` string (cut before it). Output: each prompt
followed by its continuation, bytes decoded with the config's tokenizer. A bad input (flag,
prompts file, checkpoint) is one ``error:`` line on stderr naming it, exit code 2.
"""

from moejax import platform_env

platform_env.skip_absent_tpu()   # before JAX is imported: no libtpu start-up lines without a TPU

from absl import app, flags
from absl import logging as absl_logging

from moejax import backends, cli
from moejax.errors import CheckpointError, ConfigError, DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "An export dir, a workdir or its checkpoints/ dir.",
                    required=True)
flags.DEFINE_string("prompt", "", "The prompt (text).")
flags.DEFINE_string("prompts_file", "", "A file with one prompt per line.")
flags.DEFINE_alias("prompts", "prompts_file")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together (the last batch may be smaller).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = all.")
flags.DEFINE_float("top_p", 1.0, "Nucleus: the smallest set of tokens with this probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same text).")
flags.DEFINE_multi_string("stop", [], "A string that ends a row (cut before it); repeat the "
                          "flag for several. \\n in it is a newline.")


def _prompts() -> list[str]:
  if FLAGS.prompts_file:
    try:
      with open(FLAGS.prompts_file, encoding="utf-8") as f:
        lines = [l.rstrip("\n").replace("\\n", "\n") for l in f]
    except (OSError, UnicodeDecodeError) as e:
      why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
      raise DataError(f"--prompts_file={FLAGS.prompts_file}: {why}") from None
    lines = [l for l in lines if l]
    if not lines:
      raise DataError(f"--prompts_file={FLAGS.prompts_file}: no prompt in it (one per line)")
    return lines
  return [FLAGS.prompt]


def _check_flags() -> list[str]:
  """Each bad flag is one line naming it (exit 2), before JAX is imported; -> the prompts."""
  cli.check(FLAGS.max_new_tokens >= 1, "max_new_tokens", FLAGS.max_new_tokens,
            "must be >= 1 (e.g. --max_new_tokens=200)")
  cli.check(FLAGS.temperature >= 0, "temperature", FLAGS.temperature,
            "must be >= 0 (0 = greedy, e.g. --temperature=0.8)")
  cli.check(FLAGS.top_k >= 0, "top_k", FLAGS.top_k, "must be >= 0 (0 = all tokens, e.g. --top_k=40)")
  cli.check(0 < FLAGS.top_p <= 1, "top_p", FLAGS.top_p, "must be in (0, 1] (1 = all tokens, "
            "e.g. --top_p=0.95)")
  cli.check(FLAGS.batch_size >= 1, "batch_size", FLAGS.batch_size,
            "must be >= 1 (prompts decoded together, e.g. --batch_size=8)")
  for s in FLAGS.stop:
    cli.check(s != "", "stop", repr(s), "must not be empty (e.g. --stop='\\n\\n')")
  if FLAGS.prompt and FLAGS.prompts_file:
    cli.fail(f"--prompt and --prompts_file={FLAGS.prompts_file}: give one of them")
  cli.check_exists("prompts_file", FLAGS.prompts_file,
                   "pass a text file with one prompt per line")
  cli.check_checkpoint(FLAGS.checkpoint)
  try:
    return _prompts()
  except DataError as e:
    cli.fail(str(e))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)
  texts = _check_flags()
  backends.prepare_process()   # before JAX's first computation
  from moejax import data
  from moejax.evaluation import run
  from moejax.generation import Generator, cut_at_stop, end_ids, stop_at_strings
  from flax import nnx
  cli.check_cpu_kernels()
  try:
    config, ms, _ = run.load(FLAGS.checkpoint, {"data": 1, "expert": 1, "model": 1})
    tokenizer = data.load_tokenizer(config.data.tokenizer)
  except (ConfigError, DataError, CheckpointError) as e:
    cli.fail(str(e), hard=True)
  model = nnx.merge(ms.graphdef, ms.state)
  gen = Generator(model, mesh=ms.mesh, rules=ms.rules)
  # An empty prompt starts after an end of document, as documents do in training.
  prompts = [list(tokenizer.encode(t)) or [tokenizer.eos_id] for t in texts]
  ends = end_ids(tokenizer.eos_id, config.special_tokens.eos_token_id)
  stops = [s.replace("\\n", "\n") for s in FLAGS.stop]
  decode = lambda row: tokenizer.decode([int(t) for t in row if t not in ends])
  rows = gen.generate(prompts, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                      top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                      eos_id=ends, pad_id=tokenizer.pad_id, batch_size=FLAGS.batch_size,
                      stop=stop_at_strings([stops] * len(prompts), decode) if stops else None)
  for i, (text, row) in enumerate(zip(texts, rows)):
    if len(texts) > 1:
      print(f"=== {i}")
    print(text + cut_at_stop(decode(row), stops))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
