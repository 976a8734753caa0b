"""Check that a config fits a TPU slice before renting one: compile it there from any machine.

    python -m moejax.compile --config configs/X.py --topology v5p:2x2x1 [--config.FIELD=VALUE ...]
    python -m moejax.compile --list_topologies

(or ``moejax-compile ...`` once installed with ``pip install -e '.[tpu]'``). With libtpu
installed, XLA's real TPU compiler runs on this (CPU) machine for a slice that is not there
(JAX's ahead-of-time lowering for ``jax.experimental.topologies``): the train state is built
abstractly on the topology's devices, the train step and the eval step are compiled exactly as
``train.py`` / ``eval.py`` build them, and one table reports per-device memory against the
chip's HBM, FLOPs per step, compile times, the mesh and a roofline step-time *estimate*.
Nothing runs and nothing is timed on a TPU.

Exit codes: 0 fits; 1 out of memory (one line on stderr naming the knobs to turn);
2 a bad config field, mesh or topology name (one line); 3 the compile failed otherwise
(traceback, then one line).

API: :func:`moejax.aot.compile.compile_config` ``(config, topology) -> CompileReport``
(used by this command, the tests and ``benchmarks/tpu_compile.py``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from moejax.aot import chips
from moejax.aot.report import OutOfMemory
from moejax.cli import _check_config_file, _config_file, _flag_error, check_config_overrides
from moejax.config import default_config
from moejax.errors import ConfigError


def _quiet_libtpu() -> None:
  # libtpu logs warnings about TPU_ACCELERATOR_TYPE / worker hostnames on a machine without TPUs.
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the TPU is only a compile target
  if os.environ["JAX_PLATFORMS"] == "cpu":   # as moejax.aot.targets.share_libtpu, before JAX loads
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main(argv=None) -> int:
  """The CLI; returns the exit code."""
  _quiet_libtpu()

  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--list_topologies", "--list_topologies=true", "--list_topologies=True") for a in argv[1:]):
    print(chips.topology_table())
    return 0
  try:
    check_config_overrides(argv)   # one line for an unknown --config.FIELD
  except SystemExit as e:
    print(e.code, file=sys.stderr)
    return 2

  fv = flags.FlagValues()
  # Default: this file's get_config() (the default config), so overrides work without --config.
  config_flags.DEFINE_config_file("config", os.path.abspath(__file__), "Config file "
                                  "(ml_collections); default: the default config.",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:2x2x1 or v5p-8 "
                      "(--list_topologies).", flag_values=fv)
  flags.DEFINE_boolean("list_topologies", False, "Print the accepted topology names.", flag_values=fv)
  flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size when config.model.vocab_size is 0 and "
                       "the tokenizer is a SentencePiece file (not read).",
                       flag_values=fv)
  flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.", flag_values=fv)
  flags.DEFINE_boolean("eval_step", True, "Also compile the eval step.", flag_values=fv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__.split("\n\nAPI:")[0].strip() + "\n\nflags:\n" + fv.get_help())
    return 0
  spec = _config_file(argv)
  if spec is not None:
    try:
      _check_config_file(spec)   # missing or not Python: one line naming --config
    except SystemExit as e:
      return e.code
  try:
    rest = fv(argv)
  except flags.Error as e:
    print(f"error: {_flag_error(e, fv)}", file=sys.stderr)
    return 2
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f"error: unexpected argument {rest[1]!r} (flags are --name=value; see --help)",
          file=sys.stderr)
    return 2
  if fv.json and os.path.isdir(fv.json):
    print(f"error: --json={fv.json}: is a directory (pass a file path, e.g. {fv.json.rstrip('/')}/report.json)",
          file=sys.stderr)
    return 2
  if fv.json and not os.path.isdir(os.path.dirname(os.path.abspath(fv.json))):
    print(f"error: --json={fv.json}: its directory does not exist (create it or pass another "
          "path)", file=sys.stderr)
    return 2

  # JAX and libtpu load only now, after the environment above is set (and --help is quick).
  from moejax.aot import targets
  from moejax.aot.compile import compile_config
  if not targets.libtpu_available():
    print("error: libtpu is not installed (pip install -e '.[tpu]' or pip install 'jax[tpu]')",
          file=sys.stderr)
    return 2
  try:
    topology = chips.resolve_topology(fv.topology)
  except chips.TopologyError as e:
    print(f"error: --topology={fv.topology}: {e}", file=sys.stderr)
    return 2

  try:
    _silently(lambda: targets.topology_devices(topology))   # libtpu's init warnings about the absent TPU
  except Exception as e:
    print(f"error: libtpu cannot describe {topology}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  name = config_flags.get_config_filename(fv["config"])
  try:
    config = fv.config
    config.to_dict()   # a config file that failed to load raises here
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    why = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    print(f"error: cannot load --config {name}: {why}", file=sys.stderr)
    return 2
  if os.path.abspath(name) == os.path.abspath(__file__):
    name = "default_config()"
  try:
    report = compile_config(config, topology, vocab_size=fv.vocab_size, config_name=name,
                            eval_step=fv.eval_step)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OutOfMemory as e:
    print(f"error: {e.one_line()}", file=sys.stderr)
    if fv.json:
      _write_json(fv.json, {"config_name": name, "topology": topology, "fits": False,
                            "error": e.one_line(), "step": e.step})
    return 1
  except Exception as e:  # a compile that failed for another reason: show it whole
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"error: compiling for {topology} failed: {type(e).__name__}: {first}", file=sys.stderr)
    return 3
  print(report.table())
  if fv.json:
    _write_json(fv.json, report.to_dict())
  return 0 if report.fits else 1


def _silently(fn):
  """Runs ``fn`` with the process's stderr (fd 2) sent to /dev/null: libtpu prints warnings
  about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES from C++ when it first loads on a machine
  without TPUs. Exceptions still propagate with their messages."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    return fn()
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _write_json(path: str, d: dict) -> None:
  with open(path, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
    f.write("\n")


def get_config() -> ml_collections.ConfigDict:
  """The default config: what ``--config`` loads when it is not given."""
  return default_config()


def cli() -> None:
  """Console entry point (``moejax-compile``)."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
