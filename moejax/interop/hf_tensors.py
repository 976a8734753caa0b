"""Every moejax variable and the Hugging Face tensors it is made of (:func:`mapping`), and the
two exact conversions between them: transposes, reshapes, the stacking of per-expert matrices."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.config import parse_sparse_layers
from moejax.interop.checkpoint_dir import InteropError
from moejax.interop.hf_config import config_to_hf, family_of

# Buffers some checkpoints carry that hold no weights (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One moejax variable (``path`` in the unscanned pure dict) made of ``hf`` tensors:
  ``to_moejax(list of hf arrays) -> array``, ``to_hf(array) -> list of hf arrays``."""
  path: tuple
  hf: tuple[str, ...]
  to_moejax: Callable
  to_hf: Callable


def _one(path, name, to_m=lambda a: a, to_h=lambda a: a) -> Entry:
  return Entry(path, (name,), lambda xs: to_m(xs[0]), lambda a: [to_h(a)])


def _linear(path, name) -> Entry:
  """HF ``[out, in]`` <-> moejax ``[in, out]``."""
  return _one(path, name, lambda a: a.T, lambda a: a.T)


def _heads_in(path, name, heads, head_dim) -> Entry:
  """HF ``[heads * head_dim, d]`` <-> moejax ``[d, heads, head_dim]``."""
  return _one(path, name, lambda a: a.T.reshape(a.shape[1], heads, head_dim),
              lambda a: a.reshape(a.shape[0], heads * head_dim).T)


def _experts(path, names) -> Entry:
  """Per-expert HF ``[out, in]`` matrices <-> moejax ``[experts, in, out]``."""
  return Entry(path, tuple(names), lambda xs: jnp.stack([x.T for x in xs]),
               lambda a: [a[e].T for e in range(a.shape[0])])


def mapping(config: ml_collections.ConfigDict) -> list[Entry]:
  """Every variable of ``config``'s model (unscanned layout) and its Hugging Face tensors."""
  family = family_of(config)
  m = config.model
  h, kv, hd = m.num_heads, m.get("num_kv_heads", 0) or m.num_heads, m.head_dim
  out = [_one(("embed",), "model.embed_tokens.weight"),
         _one(("final_norm", "scale"), "model.norm.weight")]
  if not m.tie_embeddings:
    out.append(_linear(("head",), "lm_head.weight"))
  sparse = set(range(m.num_layers)) if m.ffn == "moe" else (
      set(parse_sparse_layers(m.sparse_layers, m.num_layers)) if m.sparse_ffn == "moe" else set())
  moe_name = "block_sparse_moe" if family == "mixtral" else "mlp"
  for i in range(m.num_layers):
    b, p = ("blocks", i), f"model.layers.{i}."
    a = p + "self_attn."
    out += [_one(b + ("attn_norm", "scale"), p + "input_layernorm.weight"),
            _one(b + ("ffn_norm", "scale"), p + "post_attention_layernorm.weight"),
            _heads_in(b + ("attn", "wq"), a + "q_proj.weight", h, hd),
            _heads_in(b + ("attn", "wk"), a + "k_proj.weight", kv, hd),
            _heads_in(b + ("attn", "wv"), a + "v_proj.weight", kv, hd),
            _one(b + ("attn", "wo"), a + "o_proj.weight",
                 lambda x, h=h, hd=hd: x.T.reshape(h, hd, x.shape[0]),
                 lambda x, h=h, hd=hd: x.reshape(h * hd, x.shape[-1]).T)]
    bias = m.get("attention_bias", "none")
    if bias != "none":
      for w, n in (("bq", h), ("bk", kv), ("bv", kv)):
        out.append(_one(b + ("attn", w, "bias"), a + f"{w[1]}_proj.bias",
                        lambda x, n=n: x.reshape(n, hd), lambda x: x.reshape(-1)))
    if bias == "all":
      out.append(_one(b + ("attn", "bo", "bias"), a + "o_proj.bias"))
    if m.get("qk_norm", "none") == "full":
      out += [_one(b + ("attn", "q_norm", "scale"), a + "q_norm.weight"),
              _one(b + ("attn", "k_norm", "scale"), a + "k_norm.weight")]
    f = b + ("ffn",)
    if i not in sparse:
      out += [_linear(f + ("wi",), p + "mlp.gate_proj.weight"),
              _linear(f + ("wg",), p + "mlp.up_proj.weight"),
              _linear(f + ("wo",), p + "mlp.down_proj.weight")]
      continue
    q = f"{p}{moe_name}."
    e = range(config.moe.num_experts)
    names = (("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj"))
    out += [_linear(f + ("router", "w"), q + "gate.weight")]
    out += [_experts(f + ("experts", w), [f"{q}experts.{j}.{n}.weight" for j in e])
            for w, n in zip(("wi", "wg", "wo"), names)]
    if config.moe.num_shared_experts:
      out += [_linear(f + ("shared", w), f"{q}shared_expert.{n}.weight")
              for w, n in zip(("wi", "wg", "wo"), ("gate_proj", "up_proj", "down_proj"))]
      out.append(_linear(f + ("shared_gate",), q + "shared_expert_gate.weight"))
  return out


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def put_path(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def flat_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from flat_paths(v, prefix + (k,))
  else:
    yield prefix


def model_shapes(config) -> dict:
  """The unscanned pure dict of ``config``'s model as ShapeDtypeStructs (nothing allocated)."""
  import copy
  from flax import nnx
  from moejax.model import Transformer
  c = copy.deepcopy(config)
  c.model.scan_layers = False
  model = nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(params=0, router=1)))
  return nnx.to_pure_dict(nnx.state(model))


def shape_of(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
  """The shape of ``tensors[name]``, from the file header when ``tensors`` reads lazily
  (:class:`~moejax.interop.checkpoint_dir.Tensors`), without reading its data."""
  shape = getattr(tensors, "shape", None)
  return tuple(shape(name)) if callable(shape) else tuple(tensors[name].shape)


def params_from_hf(config: ml_collections.ConfigDict, tensors: Mapping[str, np.ndarray]) -> dict:
  """The model variables (pure dict, ``config``'s layout) from Hugging Face ``tensors``:
  every tensor is used, every variable is filled, every shape checked, or InteropError.
  Names and shapes are all checked before any tensor's data is read; then the tensors of one
  variable at a time are read and converted."""
  target = model_shapes(config)
  left = {k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)}
  entries = mapping(config)
  for entry in entries:
    want = get_path(target, entry.path)
    shapes = jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(want.shape, jnp.float32))
    for name, s in zip(entry.hf, shapes):
      if name not in left:
        raise InteropError(f"tensor {name}: missing from the checkpoint (its config.json "
                           "needs it)")
      left.discard(name)
      shape = shape_of(tensors, name)
      if shape != tuple(s.shape):
        raise InteropError(f"tensor {name}: shape {list(shape)}, config.json implies "
                           f"{list(s.shape)}")
  if left:
    name = sorted(left)[0]
    raise InteropError(f"tensor {name}: has no place in the {config_to_hf(config)['model_type']} "
                       f"model of config.json ({len(left)} such tensors)")
  out: dict = {}
  for entry in entries:
    xs = []
    for name in entry.hf:
      x = tensors[name]
      if not np.issubdtype(x.dtype, np.floating):
        raise InteropError(f"tensor {name}: dtype {x.dtype}, not a float")
      xs.append(np.asarray(x, np.float32))
    put_path(out, entry.path, np.asarray(entry.to_moejax(xs), np.float32))
    del xs
  have = set(flat_paths(out))
  for path in flat_paths(target):
    if path not in have:   # not reachable for the families above: a mapping gap
      raise InteropError(f"moejax variable {'/'.join(map(str, path))}: no Hugging Face tensor "
                         "maps to it")
  if config.model.scan_layers:
    from moejax.model import to_layout
    out = jax.tree.map(np.asarray, to_layout(out, config, scanned=True, consume=True))
  return out


def params_to_hf(config: ml_collections.ConfigDict, pure: dict) -> Iterator[tuple[str, np.ndarray]]:
  """Hugging Face tensors (float32) of the model variables ``pure`` (``config``'s layout), as
  ``(name, array)`` pairs made one variable at a time (``dict(...)`` for all at once), so that
  a writer holds at most one shard of them besides the model."""
  if config.model.scan_layers:
    from moejax.model import to_layout
    pure = to_layout(pure, config, scanned=False)
  for entry in mapping(config):
    for name, x in zip(entry.hf, entry.to_hf(np.asarray(get_path(pure, entry.path), np.float32))):
      yield name, np.ascontiguousarray(np.asarray(x, np.float32))
