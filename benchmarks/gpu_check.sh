#!/usr/bin/env bash
# The one GPU session's checks: kernel tests marked `gpu`, then the kernel benchmark.
# Run from the repo root on a CUDA machine (jax with CUDA installed); logs go to $OUT
# (or ./gpu_logs). Only jax, numpy and pytest are needed: the kernels import no Flax.
#   bash benchmarks/gpu_check.sh [extra args for benchmarks/kernel_bench.py]
set -u
out="${OUT:-gpu_logs}"; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
date -u +"%Y-%m-%d %H:%M UTC" | tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/env.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())" 2>&1 | tee -a "$out/env.txt"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/kernels/test_lookup_gpu.py tests/kernels/test_retrieval.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/kernel_bench.py --section gpu "$@" 2>&1 | tee "$out/bench.log"
