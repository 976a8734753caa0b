"""Test setup: 8 fake CPU devices (before JAX is first used)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU backend without LLVM optimisation: the tests' programs are tiny, so compiling
# them (not running them) is most of the suite's time, and LLVM -O0 compiles them markedly
# faster (the same HLO; results agree to the last bits, which no test's tolerance is near).
# Inherited by the tests' subprocesses (tests/cli_env.py copies os.environ).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
# Tests compile for TPU topologies with libtpu (no TPU here); several test processes may
# load it at once, which its machine-wide lock file would otherwise refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


# ------------------------------------------------------------------ shared fixtures


@pytest.fixture
def on_gpu():
  """Fails (not skips) a `gpu`-marked test run without a GPU: a one-shot GPU run must not
  pass by skipping."""
  if jax.default_backend() != "gpu":
    pytest.fail("no GPU visible to JAX (backend %r): tests/conftest.py defaults "
                "JAX_PLATFORMS to cpu; run with JAX_PLATFORMS=cuda pytest -m gpu"
                % jax.default_backend())


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """A small directory of text files for end-to-end runs."""
  d = tmp_path_factory.mktemp("text")
  for i in range(12):
    (d / f"doc{i}.txt").write_text(
        "".join(f"line {j} of document {i}: the quick brown fox jumps over the lazy dog.\n"
                for j in range(40)))
  return str(d)
