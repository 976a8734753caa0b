"""A Hugging Face checkpoint directory, read and written without torch.

``config.json`` (and ``generation_config.json``, if there) and ``model.safetensors``, or shards
``model-0000k-of-0000n.safetensors`` listed by ``model.safetensors.index.json``; read with the
``safetensors`` package's numpy API one tensor at a time (:class:`Tensors`), written shard by
shard, each at most ``max_shard_bytes``, so that a conversion holds the model once, not also a
whole shard or a second copy beside it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from moejax.errors import CheckpointError

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024 ** 3    # export: shards of at most this many bytes (HF's 5 GB cap)


class InteropError(CheckpointError):
  """A checkpoint or config that cannot be converted; the message names the tensor or field."""


class Tensors(Mapping):
  """``{tensor name: float32 array}`` of a checkpoint's safetensors files, each tensor read
  from its file (``safe_open``) when asked for, never a whole shard at once. Floating tensors
  come as float32 (moejax's parameters), whatever their stored dtype. :meth:`shape` reads
  only the file's header."""

  def __init__(self, files: dict[str, str]):
    self._files = files            # tensor name -> path of the file holding it

  def __getitem__(self, name: str) -> np.ndarray:
    from safetensors import safe_open
    path = self._files[name]
    try:
      with safe_open(path, framework="numpy") as f:
        x = f.get_tensor(name)     # bfloat16 as ml_dtypes' numpy type (jax registers it)
    except Exception as e:         # a truncated or damaged shard
      raise InteropError(f"tensor {name}: not readable from {path} ({first_line(e)})") from None
    if x.dtype != np.float32 and (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
      x = x.astype(np.float32)
    return x

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(_header(self._files[name])[name])

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


def _header(path: str) -> dict[str, list[int]]:
  """``{tensor name: shape}`` of one safetensors file, from its header alone."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:
    raise InteropError(f"{path}: not readable as safetensors ({first_line(e)})") from None


def read_checkpoint(hf_dir: str) -> tuple[dict, Tensors]:
  """``(config.json as a dict, its tensors)`` of the checkpoint in ``hf_dir``. Every file is
  checked here (shards present and readable, each tensor of the index in its shard); the
  tensors' data are read only when :class:`Tensors` is indexed."""
  if not os.path.isdir(hf_dir):
    raise InteropError(f"--from_hf={hf_dir}: not a directory (pass a Hugging Face checkpoint "
                       "directory with config.json and *.safetensors)")
  hf_config = read_json(os.path.join(hf_dir, CONFIG), f"--from_hf={hf_dir}: no config.json "
                        "there, not a Hugging Face checkpoint (pass its directory)")
  index = os.path.join(hf_dir, INDEX)
  if os.path.exists(index):
    weight_map = read_json(index, "").get("weight_map")
    if (not isinstance(weight_map, dict) or not weight_map
        or not all(isinstance(f, str) for f in weight_map.values())):
      raise InteropError(f"{index}: no weight_map of tensor names to shard files (restore the "
                         "index or pass another checkpoint)")
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(hf_dir, SINGLE)):
    weight_map, files = None, [SINGLE]
  else:
    raise InteropError(f"--from_hf={hf_dir}: neither {SINGLE} nor {INDEX} there (only "
                       "safetensors checkpoints convert; save with safe_serialization=True)")
  for name in files:
    if not os.path.isfile(os.path.join(hf_dir, name)):
      raise InteropError(f"{index}: shard {name} is missing (copy every shard of the checkpoint)")
  where: dict[str, str] = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    for tensor in _header(path):
      where.setdefault(tensor, path)
  if weight_map is not None:
    for tensor, name in sorted(weight_map.items()):
      if tensor not in where:
        raise InteropError(f"tensor {tensor}: listed in {INDEX} but not in its shard {name}")
  return hf_config, Tensors(where)


def read_generation_config(hf_dir: str) -> dict:
  """``generation_config.json`` of ``hf_dir`` as a dict; ``{}`` when there is none."""
  path = os.path.join(hf_dir, GENERATION_CONFIG)
  return read_json(path, "") if os.path.exists(path) else {}


_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str) -> int:
  """Bytes of a size as transformers' ``max_shard_size`` writes it: ``5GB`` (10^9),
  ``500MiB`` (2^20), ``100000`` (bytes); ValueError naming the forms otherwise."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
  size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) if m else 0
  if size < 1:
    raise ValueError(f"{text!r} is not a size (write e.g. 5GB, 500MiB or 100000 for bytes)")
  return size


def write_checkpoint(out_dir: str, hf_config: dict,
                     tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], *,
                     max_shard_bytes: int = MAX_SHARD_BYTES,
                     generation_config: dict | None = None) -> list[str]:
  """Writes ``config.json`` (and ``generation_config.json`` when given) and the tensors (a
  mapping, or ``(name, array)`` pairs made one at a time) into ``out_dir``: one
  ``model.safetensors``, or, past ``max_shard_bytes``, shards of at most that many bytes
  (a tensor larger than that alone in its shard) and their index. Only one shard's tensors
  are held at a time. Returns the files written."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  items = ((k, tensors[k]) for k in sorted(tensors)) if isinstance(tensors, Mapping) else tensors
  meta = {"format": "pt"}    # what transformers expects of a safetensors file
  parts: list[str] = []      # shards written so far, under provisional names
  weight_map: dict[str, int] = {}
  total = 0
  shard: dict[str, np.ndarray] = {}
  size = 0

  def flush(shard):
    parts.append(os.path.join(out_dir, f".shard-{len(parts):05d}.safetensors"))
    save_file(shard, parts[-1], metadata=meta)

  for name, x in items:
    x = np.ascontiguousarray(x)
    if shard and size + x.nbytes > max_shard_bytes:
      flush(shard)
      shard, size = {}, 0
    shard[name] = x
    weight_map[name] = len(parts)
    size += x.nbytes
    total += x.nbytes
  flush(shard)
  del shard
  written = []
  if len(parts) == 1:
    os.replace(parts[0], os.path.join(out_dir, SINGLE))
    written.append(SINGLE)
  else:
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, name in zip(parts, names):
      os.replace(part, os.path.join(out_dir, name))
    written += names
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": {t: names[i] for t, i in sorted(weight_map.items())}}, f, indent=2)
    written.append(INDEX)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  written.append(CONFIG)
  if generation_config is not None:
    with open(os.path.join(out_dir, GENERATION_CONFIG), "w") as f:
      json.dump(generation_config, f, indent=2, sort_keys=True)
    written.append(GENERATION_CONFIG)
  return written


def read_json(path: str, missing: str):
  if not os.path.exists(path):
    raise InteropError(missing or f"{path}: missing")
  try:
    with open(path) as f:
      out = json.load(f)
  except (ValueError, OSError) as e:
    raise InteropError(f"{path}: not valid JSON ({first_line(e)})") from None
  if not isinstance(out, dict):
    raise InteropError(f"{path}: not a JSON object")
  return out


def first_line(e: BaseException, limit: int = 160) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
