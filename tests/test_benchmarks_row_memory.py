"""benchmarks/row_memory.py at tiny shapes: the steps and row kernels it times run, and its
table names every kernel at both sizes."""

import importlib.util
import os
import re
import sys

import pytest

from moejax.backends.cpu import native as cpu_kernels

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "row_memory.py")
_spec = importlib.util.spec_from_file_location("row_memory", _PATH)
row_memory = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("row_memory", row_memory)
_spec.loader.exec_module(row_memory)


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs a C++17 compiler (CPU kernels)")
def test_tiny_run_prints_every_row_kernel_and_the_step_ratio(capsys):
  row_memory.main(["--n", "16", "--n_small", "8", "--iters", "1", "--batch", "2",
                   "--length", "32", "--heads", "2", "--top_k", "4", "--stream_mib", "4"])
  out = capsys.readouterr().out
  for name in row_memory.PER_STEP:
    assert re.search(rf"\| {name} \| [\d.]+ \| [\d.]+ \| 2 \| [+-][\d.]+ \|", out), out
  assert re.search(r"N = 8² \d+ ms, N = 16² \d+ ms, ratio [\d.]+", out), out
  assert re.search(r"lazy Adam at N = 16²: [\d,]+ rows", out), out


def test_row_kernels_update_the_table_and_read_the_rows():
  """The timed Adam moves the retrieved rows only; the gathers read the same table."""
  import numpy as np
  fns, u = row_memory.row_kernel_fns(8, tokens=16, retrievals=4)
  assert 0 < u <= 16 * 4
  before = np.asarray(fns["gather_dot"]())
  fns["factored_adam_rows"]()
  after = np.asarray(fns["gather_dot"]())
  assert before.shape == (16, 4) and not np.allclose(before, after)
