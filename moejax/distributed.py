"""Multi-host start-up (``jax.distributed.initialize``)."""

from __future__ import annotations

import os

import jax


def maybe_initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Initialises jax.distributed when asked, or on a multi-host TPU/cluster environment.

  On CPU (tests, several local processes) pass all three arguments; collectives
  then use gloo.
  """
  if coordinator:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise SystemExit(f"error: --coordinator={coordinator} needs --num_processes=N (>= 1) and "
                       f"--process_id=I (0 <= I < N); got {num_processes} and {process_id}")
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "cpu"
    if "cpu" in platforms.split(","):   # e.g. "cuda,cpu" set by moejax.platform_env
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
    jax.distributed.initialize()
