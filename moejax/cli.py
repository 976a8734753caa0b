"""Command-line helpers shared by train.py, eval.py, generate.py and the compile tool: every
bad input is one line.

``parse_flags`` is absl's ``flags_parser``: an unknown flag or ``--config.FIELD`` (with "did you
mean"), a flag value of the wrong type, a missing required flag, a config file that is missing,
does not parse or has no ``get_config()``, and stray arguments all end in one ``error: ...``
line on stderr and exit code 2 (``errors.EXIT_BAD_INPUT``), before anything runs. ``check``,
``check_exists`` and ``check_checkpoint`` do the same for a flag's value or path after parsing,
before JAX is imported; ``check_cpu_kernels`` for ``MOEJAX_CPU_KERNELS=1`` without a compiler.
"""

from __future__ import annotations

import os
import re
import sys

import ml_collections

from moejax.errors import EXIT_BAD_INPUT, CheckpointError, ConfigError, nearest


def fail(message: str, code: int = EXIT_BAD_INPUT, *, hard: bool = False):
  """Prints ``error: MESSAGE`` (one line) on stderr and exits with ``code``.

  ``hard``: exit the process at once (``os._exit``), for a command-line entry point whose
  failed checkpoint read left tensorstore threads that would print tracebacks on the way
  out (see ``checkpoint.quiet_asyncio_noise``); never from a library or a test process.
  """
  sys.stderr.flush()
  line = f"error: {' '.join(str(message).split())}"
  if hard:
    # Silence fd 2 first (threads still printing go nowhere), then write the one line to a
    # saved copy of it and leave at once.
    sys.stdout.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.write(saved, (line + "\n").encode())
    os._exit(code)
  print(line, file=sys.stderr, flush=True)
  raise SystemExit(code)


def check(ok: bool, flag: str, value, rule: str) -> None:
  """Unless ``ok``: ``error: --FLAG=VALUE: RULE`` (one line) and exit 2.

  ``rule`` says what the flag must be and how to fix it, e.g. ``must be in (0, 1] (e.g.
  --top_p=0.95)``.
  """
  if not ok:
    fail(f"--{flag}={value!r}: {rule}")


def check_exists(flag: str, path: str, fix: str) -> None:
  """A local ``path`` given by ``--FLAG`` that is missing: one line saying so, exit 2.

  Bucket paths (``gs://...``) are left to the reader, which names them if they are missing.
  """
  if path and "://" not in path and not os.path.exists(path):
    fail(f"--{flag}={path}: does not exist ({fix})")


def check_checkpoint(path: str) -> None:
  """``--checkpoint`` that is missing or neither an export nor a workdir: one line, exit 2,
  before JAX is imported."""
  from moejax.evaluation.locate import locate
  try:
    locate(path)
  except CheckpointError as e:
    fail(str(e))


def check_cpu_kernels() -> None:
  """``MOEJAX_CPU_KERNELS=1`` on a CPU run whose kernels cannot be built, or a
  ``MOEJAX_CPU_KERNELS_OFF`` naming an unknown group: one line, exit 2.

  Builds (or loads) the kernels now, as the first step would, so that the failure is not a
  traceback from inside the first step's trace. Call after ``jax.distributed`` is set up
  (this starts JAX's backends).
  """
  if os.environ.get("MOEJAX_CPU_KERNELS_OFF"):
    from moejax.backends.cpu import native
    try:
      native.parse_groups_off(os.environ["MOEJAX_CPU_KERNELS_OFF"])
    except native.KernelSwitchError as e:
      fail(str(e))
  if os.environ.get("MOEJAX_CPU_KERNELS") != "1":
    return
  import jax
  if jax.default_backend() != "cpu":
    return
  from moejax.backends.cpu import native as cpu_kernels
  try:
    cpu_kernels.available()
  except Exception as e:  # whatever stopped the build: the message names it and the fix
    why = " ".join(str(e).split())
    fail(f"MOEJAX_CPU_KERNELS=1: {why[len('moejax: '):] if why.startswith('moejax: ') else why}")


def _lookup(path: str):
  """The default config's node at dotted ``path``; raises ConfigError for an unknown field."""
  from moejax.config import default_config, unknown_field_error
  root = default_config()
  node, walked = root, []
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"config.{'.'.join(walked)} is a value, not a section "
                          f"(set --config.{'.'.join(walked)}=VALUE)")
      raise unknown_field_error(".".join(walked + [part]), node, root)
    node, walked = node[part], walked + [part]
  return node


def check_config_overrides(argv: list[str]) -> None:
  """Exits with a one-line error for ``--config.FIELD=...`` naming an unknown field.

  absl's config flags would raise a multi-line traceback for these.
  """
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    try:
      _lookup(path)
    except ConfigError as e:
      sys.exit(f"error: {e}")


def _config_file(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(spec: str) -> None:
  """A config file that is missing or does not parse, named in one line."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    what = "a directory" if os.path.isdir(path) else "no such file"
    fail(f"--config={spec}: {what} (pass a config file, e.g. --config=configs/switch_small.py)")
  try:
    with open(path, "rb") as f:
      compile(f.read(), path, "exec")
  except SyntaxError as e:
    fail(f"--config={spec}: syntax error at line {e.lineno}: {e.msg} (fix the file)")
  except (OSError, ValueError) as e:
    fail(f"--config={spec}: cannot be read ({e}) (pass a readable config file)")


_FLAG_ERROR = re.compile(r"flag --([\w.]+)=(.*?): (.*)$")


def _type_name(value) -> str:
  return type(value).__name__


def _flag_error(e: Exception, flag_values) -> str:
  """One line for an absl flags.Error: which flag, what it must be, and an example."""
  text = " ".join(str(e).split())
  m = re.search(r"Unknown command line flag '([^']+)'", text)
  if m:
    name = m.group(1)
    guess = nearest(name, list(flag_values))
    hint = f"did you mean --{guess}?" if guess else "see --helpfull"
    return f"--{name}: unknown flag ({hint})"
  m = _FLAG_ERROR.search(text)
  if m:
    name, value, why = m.groups()
    if name.startswith("config."):
      try:
        default = _lookup(name[len("config."):])
      except ConfigError as err:
        return str(err)
      if isinstance(default, bool):
        want, example = "true or false", str(default).lower()
      else:
        want, example = _type_name(default), (default if default != "" else '""')
      return f"config.{name[len('config.'):]}={value!r}: must be {want} (e.g. --{name}={example})"
    if name in flag_values:
      flag = flag_values[name]
      if "must have a value other than None" in why:
        return f"--{name}: required ({flag.help})"
      return f"--{name}={value!r}: must be {flag.flag_type()} ({flag.help})"
    return f"--{name}={value!r}: {why}"
  if "before a value for --config was specified" in text:
    return f"{text} (put --config=FILE before the --config.FIELD=VALUE overrides)"
  m = re.search(r"flag --(\w+)", text)
  if m and m.group(1) in flag_values and "other than None" in text:
    return f"--{m.group(1)}: required ({flag_values[m.group(1)].help})"
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl ``flags_parser`` for ``app.run``: one line and exit 2 for any bad flag or config file."""
  from absl import flags
  from ml_collections import config_flags
  check_config_overrides_or_fail(argv)
  spec = _config_file(argv)
  if spec is not None:
    _check_config_file(spec)
  flag_values = flags.FLAGS
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    fail(_flag_error(e, flag_values))
  except ConfigError as e:
    fail(str(e))
  except Exception as e:  # the config file raised while loading
    chain, cause = [], e
    while cause is not None and len(chain) < 5:
      chain.append(cause)
      cause = cause.__cause__ or cause.__context__
    for err in chain:
      if isinstance(err, AttributeError) and "get_config" in str(err):
        fail(f"--config={spec}: has no get_config() (define get_config() returning a "
             "ml_collections.ConfigDict, e.g. from moejax.config.default_config())")
    returned = _get_config_result(spec)
    if returned is not None and not isinstance(returned, ml_collections.ConfigDict):
      fail(f"--config={spec}: get_config() returned a {type(returned).__name__}, not a "
           "ml_collections.ConfigDict (return one, e.g. moejax.config.default_config() with fields "
           "changed)")
    root = chain[-1]
    first = " ".join(str(root).split())[:200] or type(root).__name__
    fail(f"--config={spec}: get_config() failed: {type(root).__name__}: {first} (fix the file)")
  if "config" in flag_values:
    try:
      config = flag_values.config
    except Exception as e:
      fail(f"--config={spec}: cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    if not isinstance(config, ml_collections.ConfigDict):
      fail(f"--config={spec or config_flags.get_config_filename(flag_values['config'])}: "
           f"get_config() returned a {type(config).__name__}, not a ml_collections.ConfigDict "
           "(return one, e.g. moejax.config.default_config() with fields changed)")
  if len(rest) > 1:
    fail(f"unexpected argument {rest[1]!r} (flags are --name=value; see --helpfull)")
  return rest


def _get_config_result(spec: str | None):
  """What the config file's get_config() returns (None if that cannot be told)."""
  if not spec:
    return None
  import importlib.util
  try:
    path = spec.split(":", 1)[0]
    module_spec = importlib.util.spec_from_file_location("_moejax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()
  except Exception:
    return None


def check_config_overrides_or_fail(argv: list[str]) -> None:
  try:
    check_config_overrides(argv)
  except SystemExit as e:
    fail(str(e.code)[len("error: "):] if str(e.code).startswith("error: ") else str(e.code))
