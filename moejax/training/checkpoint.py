"""Orbax checkpoints: resumable training state, and params-only exports for eval.

Layout of a workdir::

    config.json              the config the run started with
    checkpoints/<step>/      state (model + optimizer arrays) and data (iterator position)
    export/config.json       config of the exported model
    export/model/            model variables only (Param, BatchStat)

Restores go into ``jax.ShapeDtypeStruct``s carrying concrete ``NamedSharding``s
of the current mesh, so a checkpoint written on one mesh loads on another.
Nothing here deletes a checkpoint except orbax's keep-N policy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax import config as config_lib
from moejax.errors import CheckpointError

# Fields that change the shapes of the state; a resumed run must match them.
_SHAPE_SECTIONS = ("model",)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises CheckpointError naming the first model field that differs."""
  current = config.to_dict()
  kinds = {current["model"]["ffn"], current["model"]["sparse_ffn"]}
  for section in (*_SHAPE_SECTIONS, *sorted(kinds)):
    for key, value in current.get(section, {}).items():
      old = saved.get(section, {}).get(key, value)
      if old != value:
        raise CheckpointError(
            f"{where} holds a model with config.{section}.{key}={old!r}, this run has {value!r} "
            f"(use the same config to resume, or a new --workdir)")


def _gather_json(value: Any) -> dict[str, Any]:
  """{process index: value} on every process (values are small JSON objects)."""
  if jax.process_count() == 1:
    return {"0": value}
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(np.max(multihost_utils.process_allgather(np.array([encoded.size]))))
  padded = np.zeros(size, np.uint8)
  padded[:encoded.size] = encoded
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), size)
  return {str(i): json.loads(bytes(r).rstrip(b"\0").decode()) for i, r in enumerate(rows)}


class Checkpointer:
  """Async, keep-N, resumable checkpoints of a TrainState and its data iterator."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: nnx.State, data_state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` and every process's data-iterator state (each reads its own shard)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state.to_pure_dict()),
                              data=ocp.args.JsonSave(_gather_json(data_state)))
    return self.manager.save(step, args=args, force=force)

  def restore(self, state: nnx.State, shardings, step: int | None = None) -> tuple[nnx.State, Any]:
    """Restores into the structure/shardings of ``state``; returns (state, data_state)."""
    step = self.latest_step() if step is None else step
    target = _abstract(state.to_pure_dict(), shardings.to_pure_dict())
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0][:200]
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this model "
                            f"({first}); use the config it was written with or a new --workdir") from e
    nnx.replace_by_pure_dict(state, restored["state"])
    per_process = restored["data"]
    if len(per_process) != jax.process_count():
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} was written by {len(per_process)} processes, this run has "
          f"{jax.process_count()} (resume with the same number of hosts)")
    return state, per_process[str(jax.process_index())]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def export(path: str, model_state: nnx.State, config: ml_collections.ConfigDict) -> str:
  """Writes model variables (no optimizer) and the config for evaluation."""
  path = os.path.abspath(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "model"), model_state.to_pure_dict(), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=1)
  return path


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config.json in ``path`` (an export dir or a workdir)."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise CheckpointError(f"--checkpoint={path}: no config.json there (pass a workdir or its export/ dir)")
  with open(file) as f:
    return config_lib.from_dict(json.load(f))


def load_model_state(path: str, model_state: nnx.State, shardings) -> nnx.State:
  """Fills ``model_state`` from an export at ``path``, resharded to ``shardings``."""
  target = _abstract(model_state.to_pure_dict(), shardings.to_pure_dict())
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "model"), target)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"export {path} cannot be loaded into this model ({first})") from e
  nnx.replace_by_pure_dict(model_state, restored)
  return model_state
