"""Test setup: 8 fake CPU devices (before JAX is first used)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
# Tests compile for TPU topologies with libtpu (no TPU here); several test processes may
# load it at once, which its machine-wide lock file would otherwise refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
