"""moejax.backends.cpu.host_memory: with freed blocks kept, a jitted step's large temporaries stop
page-faulting once the heap has settled; without, every call faults them all in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from moejax.backends.cpu import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A step with two 48 MiB temporaries (above glibc's 32 MiB mmap threshold): warmed up
# until the heap has settled, then minor page faults per call, the least of 3 windows of 5
# calls (under a loaded test run the host may reclaim kept pages during one window; the
# default allocator faults every call in every window).
_STEP = """
import resource
from moejax.backends.cpu import host_memory
print("kept", host_memory.keep_freed_memory())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(x, axis=0)[::64].sum())
x = jnp.ones((48 * 1024, 256), jnp.float32)
for _ in range(60):
  f(x).block_until_ready()
windows = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    f(x).block_until_ready()
  windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print("faults", min(windows))
"""
_PAGES = 48 << 20 >> 12     # pages of one temporary


def _faults_per_call(keep: str) -> tuple[bool, float]:
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu", MOEJAX_KEEP_FREED_MEMORY=keep)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", _STEP], env=env, capture_output=True, text=True,
                        timeout=300, cwd=_ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
  return lines["kept"] == "True", float(lines["faults"])


def test_kept_blocks_stop_the_page_faults_of_large_temporaries():
  kept, faults = _faults_per_call("1")
  if platform.libc_ver()[0] != "glibc":   # no mallopt: the setting must say it did nothing
    assert not kept
    return
  assert kept
  assert faults < 0.05 * _PAGES, faults
  kept, faults = _faults_per_call("0")   # the default allocator: every call faults again
  assert not kept
  assert faults >= _PAGES, faults


def test_does_nothing_for_accelerators_or_when_turned_off(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not host_memory.keep_freed_memory()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.keep_freed_memory()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MOEJAX_KEEP_FREED_MEMORY", "0")
  assert not host_memory.keep_freed_memory()
