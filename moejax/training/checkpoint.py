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
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax import config as config_lib
from moejax import paths
from moejax.errors import CheckpointError

# What a resumed run must keep: the model (shapes of the state) and the data fields
# that define the iterator position (a different batch, order or tokenizer would resume
# at a wrong place silently).
# ``model.scan_layers`` is the variable layout (blocks/<i> or stacked segments/<j>): a
# checkpoint or export holds the layout of its config (``model.to_layout`` converts).
_RESUME_FIELDS = {
    "model": None,   # all fields but _FREE_FIELDS
    "data": ("dataset", "text_dir", "text_glob", "text_key", "train_split", "tokenizer",
             "seq_len", "batch_size", "shuffle", "seed"),
}
# How the step computes, not what the state holds: may change on resume.
_FREE_FIELDS = {"model": ("remat", "remat_names", "loss_chunk")}
# Values of fields that configs saved before the field existed had.
_SAVED_DEFAULTS = {"model": {"scan_layers": False}}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises CheckpointError naming the first model / data field that differs."""
  current = config.to_dict()
  kinds = {current["model"]["ffn"], current["model"]["sparse_ffn"]}
  sections = {**_RESUME_FIELDS, **{k: None for k in sorted(kinds)}}
  for section, fields in sections.items():
    for key in fields or current.get(section, {}):
      if key in _FREE_FIELDS.get(section, ()):
        continue
      value = current.get(section, {}).get(key)
      old = saved.get(section, {}).get(key, _SAVED_DEFAULTS.get(section, {}).get(key, value))
      if old != value:
        raise CheckpointError(
            f"{where} holds a run with config.{section}.{key}={old!r}, this run has {value!r} "
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
    self.directory = paths.join(workdir, "checkpoints")
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
  path = paths.absolute(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(paths.join(path, "model"), model_state.to_pure_dict(), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_json(paths.join(path, "config.json"), config.to_dict())
  return path


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config.json in ``path`` (an export dir or a workdir)."""
  file = paths.join(path, "config.json")
  if not paths.exists(file):
    raise CheckpointError(f"--checkpoint={path}: no config.json there (pass a workdir or its export/ dir)")
  try:
    saved = paths.read_json(file)
  except ValueError as e:
    raise CheckpointError(f"{file}: not valid JSON ({e}); restore it or pass another --checkpoint") from e
  return config_lib.from_dict(saved)


def load_model_state(path: str, model_state: nnx.State, shardings) -> nnx.State:
  """Fills ``model_state`` from an export at ``path``, resharded to ``shardings``."""
  target = _abstract(model_state.to_pure_dict(), shardings.to_pure_dict())
  try:
    restored = ocp.StandardCheckpointer().restore(paths.join(path, "model"), target)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"export {path} cannot be loaded into this model ({first})") from e
  nnx.replace_by_pure_dict(model_state, restored)
  return model_state
