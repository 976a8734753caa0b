"""A benchmark function run in a fresh process set up as ``train.py`` sets itself up.

What a benchmark of ``train.py``'s step measures depends on the process's host-memory
setting (``backends.prepare_process``, which must precede JAX's first computation), so a
benchmark that shares its process with another library (PyTorch, on glibc's default malloc)
runs those parts in a child: :func:`in_child` starts ``python`` on :func:`_main`, which sets
the process up, calls the function with keyword arguments sent as JSON, and prints its
result as the last line of JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any, Callable

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CODE = "from moejax.benchmarking import child; child._main()"


def in_child(fn: Callable, **kwargs) -> tuple[Any, bool]:
  """``fn(**kwargs)`` (a module-level function; JSON arguments and result) in a child process
  that keeps freed memory as ``train.py`` does. Returns its result and whether the setting
  took (False off glibc, or where the backend steps aside); a failed child raises
  ``RuntimeError`` with the end of its stderr."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
  target = f"{fn.__module__}:{fn.__qualname__}"
  done = subprocess.run([sys.executable, "-c", _CODE, target, json.dumps(kwargs)],
                        capture_output=True, text=True, env=env)
  if done.returncode:
    raise RuntimeError(f"{target}(**{kwargs}) failed in a child process:\n{done.stderr[-3000:]}")
  out = json.loads(done.stdout.strip().splitlines()[-1])
  return out["result"], out["kept_freed_memory"]


def _main() -> None:
  from moejax import backends
  kept = backends.prepare_process()   # before JAX's first computation
  module, name = sys.argv[1].split(":")
  fn = getattr(importlib.import_module(module), name)
  result = fn(**json.loads(sys.argv[2]))
  print(json.dumps({"result": result, "kept_freed_memory": kept}))
