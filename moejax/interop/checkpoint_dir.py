"""A Hugging Face checkpoint directory, read and written without torch.

``config.json`` and ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
listed by ``model.safetensors.index.json``; read with the ``safetensors`` package's numpy API.
"""

from __future__ import annotations

import json
import os

import numpy as np

from moejax.errors import CheckpointError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024 ** 3    # export: shards of at most this many bytes (HF's 5 GB cap)


class InteropError(CheckpointError):
  """A checkpoint or config that cannot be converted; the message names the tensor or field."""


def read_checkpoint(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config.json as a dict, {tensor name: array})`` of the checkpoint in ``hf_dir``;
  floating tensors come as float32 (moejax's parameters), whatever their stored dtype."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  if not os.path.isdir(hf_dir):
    raise InteropError(f"--from_hf={hf_dir}: not a directory (pass a Hugging Face checkpoint "
                       "directory with config.json and *.safetensors)")
  hf_config = read_json(os.path.join(hf_dir, CONFIG), f"--from_hf={hf_dir}: no config.json "
                         "there, not a Hugging Face checkpoint (pass its directory)")
  index = os.path.join(hf_dir, INDEX)
  if os.path.exists(index):
    weight_map = read_json(index, "").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise InteropError(f"{index}: no weight_map (restore the index or pass another checkpoint)")
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(hf_dir, SINGLE)):
    weight_map, files = None, [SINGLE]
  else:
    raise InteropError(f"--from_hf={hf_dir}: neither {SINGLE} nor {INDEX} there (only "
                       "safetensors checkpoints convert; save with safe_serialization=True)")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.exists(path):
      raise InteropError(f"{index}: shard {name} is missing (copy every shard of the checkpoint)")
    try:
      tensors.update(load_file(path))   # bfloat16 as ml_dtypes' numpy type (jax registers it)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise InteropError(f"{path}: not readable as safetensors ({first_line(e)})") from None
  for name, x in tensors.items():   # float16 / bfloat16 (an ml_dtypes type) -> float32
    if x.dtype != np.float32 and (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
      tensors[name] = x.astype(np.float32)
  if weight_map is not None:
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise InteropError(f"tensor {missing[0]}: listed in {INDEX} but in none of its shards")
  return hf_config, tensors


def write_checkpoint(out_dir: str, hf_config: dict, tensors: dict[str, np.ndarray], *,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes ``config.json`` and the tensors (one file, or shards and an index when they pass
  ``max_shard_bytes``) into ``out_dir``; returns the files written."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    t = np.ascontiguousarray(tensors[name])
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  written = []
  meta = {"format": "pt"}    # what transformers expects of a safetensors file
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SINGLE), metadata=meta)
    written.append(SINGLE)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(out_dir, name), metadata=meta)
      weight_map.update({t: name for t in shard})
      written.append(name)
    total = sum(int(t.nbytes) for t in tensors.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    written.append(INDEX)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  written.append(CONFIG)
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
