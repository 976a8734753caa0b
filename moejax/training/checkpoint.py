"""Orbax checkpoints: resumable training state, and params-only exports for eval.

Layout of a workdir::

    config.json              the config the run started with
    checkpoints/<step>/      state (model + optimizer arrays) and data (iterator position)
    export/config.json       config of the exported model
    export/model/            model variables only (Param, BatchStat)

Restores go into ``jax.ShapeDtypeStruct``s carrying concrete ``NamedSharding``s
of the current mesh, so a checkpoint written on one mesh loads on another.
Nothing here deletes a checkpoint except orbax's keep-N policy; a non-finite state is
never saved, so rotation never deletes the newest finite checkpoint. A resume walks back
past checkpoints that do not restore (set aside in ``checkpoints_unrestorable/``).
"""

from __future__ import annotations

import json
from typing import Any

import inspect
import io
import logging
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from moejax import config as config_lib
from moejax import paths
from moejax.errors import CheckpointError, NonFiniteError

# What a resumed run must keep: the arrays of the state (paths, shapes, dtypes: decided by
# building the abstract state of both configs) and the data fields that define the stream
# and the iterator position (a different batch, order or tokenizer would resume at a wrong
# place silently). Any other changed field that changes no array is allowed and logged
# (``model.dtype``, ``moe.dispatch``, loss weights, ``optim.weight_decay``...).
# ``model.scan_layers`` is the variable layout (blocks/<i> or stacked segments/<j>), so it
# changes arrays: a checkpoint or export holds the layout of its config.
STREAM_FIELDS = ("dataset", "text_dir", "text_glob", "text_key", "train_split", "tokenizer",
                 "seq_len", "batch_size", "shuffle", "seed")
# Where and how long to run, what to log: never part of what a checkpoint holds.
_FREE_SECTIONS = ("train", "eval", "mesh")
# Values of fields that configs saved before the field existed had.
_SAVED_DEFAULTS = {"model": {"scan_layers": False}}
# Top-level entries of the train state pytree.
_PARTS = {"0": "model", "1": "optimizer", "2": "table_adam"}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path) -> str:
  parts = [_key_str(k) for k in path]
  if parts and parts[0] in _PARTS:
    parts[0] = _PARTS[parts[0]]
  return "/".join(parts)


def array_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{array path: (shape, dtype)} of a pytree of arrays / ShapeDtypeStructs / metadata."""
  return {_path_str(p): (tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, "shape") and hasattr(x, "dtype")}


def _spec_str(spec) -> str:
  shape, dtype = spec
  return f"{dtype}[{','.join(map(str, shape))}]"


def describe_difference(saved: dict, current: dict) -> str | None:
  """The first array that differs between two ``array_specs`` ('' paths sorted), or None."""
  for path in sorted(set(saved) | set(current)):
    if path not in current:
      return f"array {path} is in the checkpoint but not in this model"
    if path not in saved:
      return f"array {path} of this model is not in the checkpoint"
    if saved[path] != current[path]:
      return (f"array {path} is {_spec_str(saved[path])} in the checkpoint, "
              f"{_spec_str(current[path])} in this model")
  return None


def abstract_state_specs(config: ml_collections.ConfigDict) -> dict:
  """``array_specs`` of the (model, optimizer) state ``config`` builds (shapes only, no FLOPs)."""
  from moejax.training import state as state_lib
  abstract = nnx.eval_shape(lambda: state_lib._create(config))
  return array_specs(nnx.to_pure_dict(nnx.split(abstract)[1]))


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:   # a tuple field (config.special_tokens) reads back from config.json as a list
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) of every field that differs, but where/how long to run."""
  current = _flat({k: v for k, v in config.to_dict().items() if k not in _FREE_SECTIONS})
  old = _flat({k: v for k, v in saved.items() if k not in _FREE_SECTIONS})
  for section, fields in _SAVED_DEFAULTS.items():
    for key, value in fields.items():
      old.setdefault(f"{section}.{key}", value)
  return [(f, old[f], v) for f, v in current.items() if f in old and old[f] != v]


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str
                     ) -> list[tuple[str, Any, Any]]:
  """Raises CheckpointError unless a run saved with config ``saved`` may resume as ``config``.

  Refused: a changed data-stream field, or changed fields that change the state's arrays
  (the message names the field and the first differing array path). Returns the allowed
  changes (field, old, new), for the caller to log.
  """
  changes = config_changes(saved, config)
  keep = "(use the same config to resume, or a new --workdir)"
  for field, old, new in changes:
    if field.startswith("data.") and field[5:] in STREAM_FIELDS:
      raise CheckpointError(f"{where} holds a run with config.{field}={old!r}, this run has "
                            f"{new!r}: the data stream would not resume where it stopped {keep}")
  if not changes:
    return changes
  try:
    saved_config = config_lib.from_dict(saved)
    for section in _FREE_SECTIONS:
      saved_config[section] = config[section]
    saved_specs = abstract_state_specs(saved_config)
    difference = describe_difference(saved_specs, abstract_state_specs(config))
    if difference:
      # Name the field that changes the arrays: the first one that does so on its own.
      for i, (field, old, new) in enumerate(changes[:12]):
        one = config_lib.from_dict(saved_config.to_dict())
        section, _, key = field.rpartition(".")
        one[section][key] = new
        try:
          alone = describe_difference(saved_specs, abstract_state_specs(one))
        except Exception:
          alone = None
        if alone:
          changes.insert(0, changes.pop(i))
          difference = alone
          break
  except Exception as e:  # an old or hand-edited config.json that no longer builds
    field, old, new = changes[0]
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise CheckpointError(f"{where} holds a run with config.{field}={old!r}, this run has {new!r}, "
                          f"and its saved config does not build ({first}) {keep}") from None
  if difference:
    field, old, new = changes[0]
    others = len(changes) - 1
    more = f" (and {others} other changed field{'s' if others > 1 else ''})" if others else ""
    raise CheckpointError(f"{where} holds a run with config.{field}={old!r}, this run has "
                          f"{new!r}{more}, which changes the state: {difference} {keep}")
  return changes


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


def _all_hosts(ok: bool) -> bool:
  """True on every process iff True on all (restore decisions must agree)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip()
  text = text.splitlines()[0].split(" See full TensorStore details")[0] if text else type(e).__name__
  return text[:limit]


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def is_finite(state: nnx.State) -> bool:
  """Whether every float array of ``state`` is finite (one host sync)."""
  return bool(jax.device_get(_all_finite(nnx.to_pure_dict(state))))


class Checkpointer:
  """Async, keep-N, resumable checkpoints of a TrainState and its data iterator.

  ``create=False`` opens an existing directory (or none) without writing anything.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, create: bool = True):
    quiet_asyncio_noise()
    self.workdir = paths.absolute(workdir)
    self.directory = paths.join(workdir, "checkpoints")
    self.keep, self.async_save = keep, async_save
    self.manager = self._open(create)
    self.skipped: list[tuple[int, str, str]] = []   # (step, "unreadable" | "mismatch", why)
    self.restored_step: int | None = None

  def _open(self, create: bool):
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=create,
                                             enable_async_checkpointing=self.async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: nnx.State, data_state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` and every process's data-iterator state (each reads its own shard).

    A state with a non-finite array is never saved (NonFiniteError): keep-N rotation would
    otherwise delete finite checkpoints to make room for it.
    """
    if not is_finite(state):
      raise NonFiniteError(f"step {step}: the train state has non-finite values; not saved "
                           f"(the newest checkpoint is step {self.latest_step()})")
    args = ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                              data=ocp.args.JsonSave(_gather_json(data_state)))
    return self.manager.save(step, args=args, force=force)

  def _array_metadata(self, step: int) -> dict:
    md = ocp.StandardCheckpointer().metadata(paths.join(self.directory, str(step), "state"))
    tree = getattr(md, "item_metadata", md)
    specs = array_specs(getattr(tree, "tree", tree))
    if not specs:
      raise CheckpointError("no array metadata")
    return specs

  def _try(self, step: int, target, want: dict) -> tuple[str, str, Any]:
    """("", "", restored) or (kind, why, None) with kind "unreadable" | "mismatch"."""
    try:
      have = self._array_metadata(step)
    except Exception as e:
      return "unreadable", f"metadata: {_first_line(e)}", None
    difference = describe_difference(have, want)
    if difference:
      return "mismatch", difference, None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:
      return "unreadable", _first_line(e), None
    if not isinstance(restored.get("data"), dict):
      return "unreadable", "no data-iterator state", None
    return "", "", restored

  def restore(self, state: nnx.State, shardings, step: int | None = None) -> tuple[nnx.State, Any]:
    """Restores into the structure/shardings of ``state``; returns (state, data_state).

    Without ``step``, walks back from the newest checkpoint to the newest one that restores;
    the ones skipped are in ``self.skipped`` (and ``skipped_warnings()``). Raises
    CheckpointError (one line) when none does: unreadable files, or a state that does not
    match this model (naming the first differing array path).
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target = _abstract(nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    want = array_specs(target)
    self.skipped = []
    for s in steps:
      kind, why, restored = self._try(s, target, want)
      if not _all_hosts(not kind):
        self.skipped.append((s, kind or "unreadable", why or "unreadable on another process"))
        continue
      per_process = restored["data"]
      if len(per_process) != jax.process_count():
        raise CheckpointError(
            f"checkpoint {self.directory}/{s} was written by {len(per_process)} processes, this run "
            f"has {jax.process_count()} (resume with the same number of hosts)")
      nnx.replace_by_pure_dict(state, restored["state"])
      self.restored_step = s
      return state, per_process[str(jax.process_index())]
    newest, kind, why = self.skipped[0]
    if all(k == "mismatch" for _, k, _ in self.skipped):
      raise CheckpointError(f"checkpoint {self.directory}/{newest} does not match this model ({why}); "
                            "use the config it was written with or a new --workdir")
    n = len(self.skipped)
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores ({n} tried; newest, step {newest}: "
        f"{'unreadable' if kind == 'unreadable' else 'does not match this model'}: {why}); "
        "move the directory away to start afresh, or use a new --workdir")

  def skipped_warnings(self) -> list[str]:
    """One line per checkpoint skipped by the last ``restore`` (newest first)."""
    out = []
    for s, kind, why in self.skipped:
      what = "is unreadable" if kind == "unreadable" else "does not match this model"
      out.append(f"warning: checkpoint {self.directory}/{s} {what} ({why}); skipped, resuming from "
                 f"step {self.restored_step}")
    return out

  def set_aside_skipped(self) -> list[str]:
    """Moves the checkpoints skipped by ``restore`` that are newer than the restored one to
    ``<workdir>/checkpoints_unrestorable/<step>`` (kept for inspection; training will write
    those steps again, and keep-N must not count them). Returns the new paths."""
    moved = []
    newer = [s for s, _, _ in self.skipped if self.restored_step is not None and s > self.restored_step]
    if newer and jax.process_index() == 0:
      aside = epath.Path(paths.join(self.workdir, "checkpoints_unrestorable"))
      aside.mkdir(parents=True, exist_ok=True)
      for s in newer:
        dest = aside / str(s)
        i = 1
        while dest.exists():
          dest, i = aside / f"{s}.{i}", i + 1
        epath.Path(paths.join(self.directory, str(s))).rename(dest)
        moved.append(str(dest))
    if newer:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("moejax_set_aside")
      self.manager.close()
      self.manager = self._open(create=True)
    return moved

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def export(path: str, model_state: nnx.State, config: ml_collections.ConfigDict,
           step: int | None = None) -> str:
  """Writes model variables (no optimizer), the config and the training ``step`` they are from
  (``step.json``, read by :func:`read_export_step`) for evaluation."""
  path = paths.absolute(path)
  if not is_finite(model_state):
    raise NonFiniteError(f"the model state has non-finite values; not exported to {path}")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(paths.join(path, "model"), nnx.to_pure_dict(model_state), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_json(paths.join(path, "config.json"), config.to_dict())
    if step is not None:
      paths.write_json(paths.join(path, "step.json"), {"step": int(step)})
  return path


def read_export_step(path: str) -> int | None:
  """The training step an export at ``path`` was written at; None for an export written before
  exports recorded it (no ``step.json``) or whose ``step.json`` is unreadable."""
  file = paths.join(path, "step.json")
  if not paths.exists(file):
    return None
  try:
    step = paths.read_json(file).get("step")
  except (ValueError, OSError, AttributeError):
    return None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config.json in ``path`` (an export dir or a workdir)."""
  file = paths.join(path, "config.json")
  if not paths.exists(file):
    raise CheckpointError(f"--checkpoint={path}: no config.json there (pass a workdir or its export/ dir)")
  try:
    saved = paths.read_json(file)
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({_first_line(e)}); restore it or pass another "
                          "--checkpoint") from None
  if not isinstance(saved, dict):
    raise CheckpointError(f"{file}: not a moejax config (a JSON object); pass another --checkpoint")
  try:
    return config_lib.from_dict(saved)
  except Exception as e:
    raise CheckpointError(f"{file}: not a config of this moejax ({_first_line(e)}); pass another "
                          "--checkpoint") from None


def load_model_state(path: str, model_state: nnx.State, shardings) -> nnx.State:
  """Fills ``model_state`` from an export at ``path``, resharded to ``shardings``."""
  quiet_asyncio_noise()
  target = _abstract(nnx.to_pure_dict(model_state), nnx.to_pure_dict(shardings))
  ckptr = ocp.StandardCheckpointer()
  try:
    try:
      md = ckptr.metadata(paths.join(path, "model"))
      have = array_specs(getattr(getattr(md, "item_metadata", md), "tree", md))
    except Exception as e:
      raise CheckpointError(f"export {path} is unreadable (metadata: {_first_line(e)}); "
                            "export it again or pass another --checkpoint") from None
    if not have:
      raise CheckpointError(f"export {path} is unreadable (no array metadata); export it again or "
                            "pass another --checkpoint")
    difference = describe_difference(have, array_specs(target))
    if difference:
      raise CheckpointError(f"export {path} cannot be loaded into the model of its config.json "
                            f"({difference}); export it again or pass another --checkpoint")
    try:
      restored = ckptr.restore(paths.join(path, "model"), target)
    except Exception as e:
      raise CheckpointError(f"export {path} is unreadable ({_first_line(e)}); export it again or "
                            "pass another --checkpoint") from None
  finally:
    ckptr.close()
  nnx.replace_by_pure_dict(model_state, restored)
  return model_state


# ---------------------------------------------------------------- stderr noise

# After a failed read, orbax has closed its event loop while tensorstore still completes the
# other reads; each completion prints a "RuntimeError: Event loop is closed" traceback on
# stderr (from tensorstore's threads, not catchable). The filter drops exactly those.
_NOISE = ("asyncio/base_events.py", "self._check_closed()", "raise RuntimeError('Event loop is closed')",
          "RuntimeError: Event loop is closed")


class _DropLoopClosed(io.TextIOBase):
  def __init__(self, stream):
    self._stream, self._buf, self._held, self._dropping = stream, "", None, False
    self._lock = threading.Lock()

  def write(self, text):
    with self._lock:
      self._buf += text
      *lines, self._buf = self._buf.split("\n")
      for line in lines:
        self._line(line)
    return len(text)

  def _line(self, line):
    noise = any(p in line for p in _NOISE)
    if self._held is not None:
      held, self._held = self._held, None
      if noise:
        self._dropping = True
        return
      self._stream.write(held + "\n")
    if line.strip() == "Traceback (most recent call last):":
      self._held = line
      return
    if self._dropping and noise:
      return
    self._dropping = False
    self._stream.write(line + "\n")

  def flush(self):
    with self._lock:
      if self._buf and not self._buf.startswith("Traceback"):
        self._stream.write(self._buf)
        self._buf = ""
      self._stream.flush()

  def fileno(self):
    return self._stream.fileno()

  def isatty(self):
    return self._stream.isatty()

  @property
  def encoding(self):
    return self._stream.encoding


def quiet_asyncio_noise() -> None:
  """Installs the filter on ``sys.stderr`` (once), and mutes asyncio's own logger.

  A failed checkpoint read leaves orbax's other read tasks failed and unawaited; asyncio
  logs each as "Task exception was never retrieved" (with a traceback) when it is
  collected. The failure itself is reported by the caller, in one line.
  """
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  if not getattr(sys.unraisablehook, "_moejax", False):
    previous = sys.unraisablehook

    def hook(unraisable):   # "Exception ignored in: <coroutine ...>" of those same reads
      if not inspect.iscoroutine(getattr(unraisable, "object", None)):
        previous(unraisable)

    hook._moejax = True
    sys.unraisablehook = hook
  if not isinstance(sys.stderr, _DropLoopClosed) and sys.stderr is not None:
    sys.stderr = _DropLoopClosed(sys.stderr)
