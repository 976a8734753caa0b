"""moejax.benchmarking at tiny shapes: the train steps and row kernels the benchmarks time
run, a function runs in a child process set up as train.py, and benchmarks/row_memory.py's
table names every row kernel at both sizes."""

import os
import platform
import re
import subprocess
import sys

import pytest

from moejax.backends.cpu import native as cpu_kernels
from moejax.benchmarking import row_kernels, train_steps
from moejax.benchmarking.child import in_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="needs a C++17 compiler (CPU kernels)")


@needs_kernels
def test_row_memory_tiny_run_prints_every_row_kernel_and_the_step_ratio():
  argv = ["--n", "16", "--n_small", "8", "--iters", "1", "--batch", "2", "--length", "32",
          "--heads", "2", "--top_k", "4", "--stream_mib", "4"]
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "row_memory.py"), *argv],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  out = done.stdout
  assert done.returncode == 0, done.stderr[-3000:]
  for name in row_kernels.PER_STEP:
    assert re.search(rf"\| {name} \| [\d.]+ \| [\d.]+ \| 2 \| [+-][\d.]+ \|", out), out
  assert re.search(r"N = 8² \d+ ms, N = 16² \d+ ms, ratio [\d.]+", out), out
  assert re.search(r"lazy Adam at N = 16²: [\d,]+ rows", out), out


@needs_kernels
def test_row_kernels_update_the_table_and_read_the_rows():
  """The timed Adam moves the retrieved rows only; the gathers read the same table."""
  import numpy as np
  fns, u = row_kernels.row_kernel_fns(8, tokens=16, retrievals=4)
  assert 0 < u <= 16 * 4
  before = np.asarray(fns["gather_dot"]())
  fns["adam_rows"]()
  after = np.asarray(fns["gather_dot"]())
  assert before.shape == (16, 4) and not np.allclose(before, after)


@pytest.mark.slow   # four LM programs compiled in a fresh process (~25 s)
def test_peer_lm_steps_run_in_a_child_process_with_train_py_memory_setting():
  lm = dict(d_model=32, heads=2, top_k=2, d_key=16, query_norm="batch", batch=2, length=16)
  times, kept = in_child(train_steps.peer_lm_step_times, n=8, n_small=4, iters=1, **lm)
  assert kept == (platform.libc_ver()[0] == "glibc")          # CPU host, setting not turned off
  assert sorted(times) == sorted(f"{u} N={n}²" for n in (8, 4) for u in ("dense", "row_sparse"))
  assert all(0 < t < 60 for t in times.values())
  with pytest.raises(RuntimeError, match="unexpected keyword argument"):   # the child's error
    in_child(train_steps.peer_lm_step_times, n=8, n_small=4, iters=1, bogus=1, **lm)


def test_benchmark_scripts_are_leaves():
  """No benchmark script imports a sibling, and no test or package module puts benchmarks/ on
  sys.path or loads a script by path: what a script and a test share is in moejax.benchmarking."""
  import ast
  import glob
  scripts = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
  stems = {os.path.splitext(os.path.basename(p))[0] for p in scripts}
  offences = []
  for path in scripts:
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        offences += [(path, a.name) for a in node.names if a.name.split(".")[0] in stems]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module.split(".")[0] in stems:
          offences.append((path, node.module))
  others = glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True)
  others += glob.glob(os.path.join(ROOT, "moejax", "**", "*.py"), recursive=True)
  for path in others:
    with open(path) as f:
      tree = ast.parse(f.read())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(n)}
    loads = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", "") in ("spec_from_file_location", "insert")]
    names_benchmarks = any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                           and "benchmarks" in n.value and id(n) not in docstrings
                           for n in ast.walk(tree))
    if loads and names_benchmarks:
      offences.append((path, loads))
  assert not offences, offences


@needs_kernels
def test_decode_kernels_tiny_run_prints_each_kernel_next_to_xla():
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode_kernels.py"),
                         "--tiny", "--iters", "2", "--sets", "2"],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("routed FFN", "few-row matmul", "cached attention", "greedy argmax"):
    assert re.search(rf"\| {name} \| [^|]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
                     done.stdout), done.stdout
