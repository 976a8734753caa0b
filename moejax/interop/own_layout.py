"""moejax's own safetensors layout, for models no transformers class holds (PEER, PKM).

``config.json`` is ``{"format": "moejax", "moejax_config": <the export's config>}`` and each
tensor is one variable of the unscanned layout, named by its path joined with dots
(``blocks.1.ffn.u``, ``blocks.0.attn.wq``, ``embed``; query BatchNorm statistics included),
stored as moejax holds it (``[in, out]``, float32). ``--from_hf`` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from moejax.interop.checkpoint_dir import InteropError
from moejax.interop.hf_tensors import flat_paths, get_path, model_shapes, put_path, shape_of

OWN_FORMAT = "moejax"             # config.json "format" of moejax's own layout
TABLE_KINDS = ("peer", "pkm")    # FFN kinds that only the own layout holds


def holds_tables(config: ml_collections.ConfigDict) -> bool:
  """The model has PEER / PKM blocks (exported in moejax's own layout)."""
  m = config.model
  return m.ffn in TABLE_KINDS or (m.sparse_ffn in TABLE_KINDS and m.sparse_layers != "none")


def own_layout(config: ml_collections.ConfigDict, pure: dict) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config.json, tensors)`` of moejax's own layout (:data:`OWN_FORMAT`)."""
  if config.model.scan_layers:
    from moejax.model import to_layout
    pure = to_layout(pure, config, scanned=False)
  tensors = {".".join(map(str, path)): np.ascontiguousarray(np.asarray(get_path(pure, path)))
             for path in flat_paths(pure)}
  return {"format": OWN_FORMAT, "moejax_config": config.to_dict()}, tensors


def params_from_own_layout(config: ml_collections.ConfigDict, tensors: Mapping[str, np.ndarray]
                           ) -> dict:
  """The model variables (``config``'s layout) of moejax's own layout: names and shapes all
  checked (from the file headers) before any tensor's data is read."""
  target = model_shapes(config)
  left = set(tensors)
  paths = list(flat_paths(target))
  for path in paths:
    name, want = ".".join(map(str, path)), get_path(target, path)
    if name not in left:
      raise InteropError(f"tensor {name}: missing from the checkpoint (its moejax_config needs it)")
    left.discard(name)
    shape = shape_of(tensors, name)
    if shape != tuple(want.shape):
      raise InteropError(f"tensor {name}: shape {list(shape)}, moejax_config implies "
                         f"{list(want.shape)}")
  if left:
    raise InteropError(f"tensor {sorted(left)[0]}: has no place in the model of moejax_config")
  out: dict = {}
  for path in paths:
    put_path(out, path, np.asarray(tensors[".".join(map(str, path))], get_path(target, path).dtype))
  if config.model.scan_layers:
    from moejax.model import to_layout
    out = jax.tree.map(np.asarray, to_layout(out, config, scanned=True, consume=True))
  return out
