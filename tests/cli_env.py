"""The environment of the tests' train.py / eval.py subprocesses.

CPU devices, and one JAX compilation cache shared by all the subprocesses this test process
starts: most of a tiny run's time is XLA compiling the same few programs (train step, eval
step, initialisation) that the previous run of the same test, or another test of the same
model, compiled already. The cache is keyed by the programs themselves, so a changed model
or step compiles anew; the pytest process's own JAX does not use it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="moejax-tests-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def cli_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """``os.environ`` for a CPU subprocess with ``devices`` fake devices (None: the default)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  if devices is not None:
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
  return env
