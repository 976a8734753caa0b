"""Hugging Face checkpoints <-> moejax exports, without torch.

A Hugging Face checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or
shards ``model-0000k-of-0000n.safetensors`` listed by ``model.safetensors.index.json``);
linear weights are stored ``[out, in]``. The families read and written here, and how their
conventions map onto moejax's config (see ``moejax.layers.moe.config`` for the routers):

=============  =============================================================================
llama/mistral  dense SwiGLU blocks (``dense.gated``, ``dense.activation=silu``), GQA
               (``model.num_kv_heads``), ``attention_bias`` -> ``model.attention_bias=all``
mixtral        every block MoE, softmax over all experts, top-k renormalised
               (``moe.renormalize=True``)
qwen2_moe      MoE blocks by ``decoder_sparse_step`` / ``mlp_only_layers`` (the others dense,
               ``intermediate_size``), experts of ``moe_intermediate_size``, no
               renormalisation unless ``norm_topk_prob``, one shared expert behind a sigmoid
               gate (``moe.shared_gate``), q/k/v biases (``model.attention_bias=qkv``)
olmoe          every block MoE, no renormalisation unless ``norm_topk_prob``, RMSNorm on the
               whole q and k projections (``model.qk_norm=full``)
=============  =============================================================================

:func:`mapping` lists, for a moejax config, every model variable with the Hugging Face
tensors it is made of and the two (exact) conversions between them: transposes, reshapes
and the stacking of per-expert matrices. Import and export both go through it, with shape
checks, so a tensor that has no place, a missing one or one of the wrong shape is refused
by name (:class:`InteropError`, one line) before anything is written. Unscanned and scanned
(``model.scan_layers``) layouts both convert: the mapping is per block, and
``moejax.model.to_layout`` stacks the blocks.

Models with PEER or PKM blocks, which no transformers class holds, export to moejax's own
safetensors layout (:data:`OWN_FORMAT`): ``config.json`` is ``{"format": "moejax",
"moejax_config": <the export's config>}`` and each tensor is one variable of the unscanned
layout, named by its path joined with dots (``blocks.1.ffn.u``, ``blocks.0.attn.wq``,
``embed``; query BatchNorm statistics included), stored as moejax holds it (``[in, out]``,
float32). ``--from_hf`` reads that layout back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.config import parse_sparse_layers
from moejax.errors import CheckpointError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024 ** 3    # export: shards of at most this many bytes (HF's 5 GB cap)

OWN_FORMAT = "moejax"             # config.json "format" of moejax's own layout
TABLE_KINDS = ("peer", "pkm")    # FFN kinds that only the own layout holds
FAMILIES = ("llama", "mistral", "mixtral", "qwen2_moe", "olmoe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
# Buffers some checkpoints carry that hold no weights (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class InteropError(CheckpointError):
  """A checkpoint or config that cannot be converted; the message names the tensor or field."""


# ---------------------------------------------------------------------- reading / writing


def read_checkpoint(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config.json as a dict, {tensor name: array})`` of the checkpoint in ``hf_dir``;
  floating tensors come as float32 (moejax's parameters), whatever their stored dtype."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  if not os.path.isdir(hf_dir):
    raise InteropError(f"--from_hf={hf_dir}: not a directory (pass a Hugging Face checkpoint "
                       "directory with config.json and *.safetensors)")
  hf_config = _read_json(os.path.join(hf_dir, CONFIG), f"--from_hf={hf_dir}: no config.json "
                         "there, not a Hugging Face checkpoint (pass its directory)")
  index = os.path.join(hf_dir, INDEX)
  if os.path.exists(index):
    weight_map = _read_json(index, "").get("weight_map")
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
      raise InteropError(f"{path}: not readable as safetensors ({_first_line(e)})") from None
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


def _read_json(path: str, missing: str):
  if not os.path.exists(path):
    raise InteropError(missing or f"{path}: missing")
  try:
    with open(path) as f:
      out = json.load(f)
  except (ValueError, OSError) as e:
    raise InteropError(f"{path}: not valid JSON ({_first_line(e)})") from None
  if not isinstance(out, dict):
    raise InteropError(f"{path}: not a JSON object")
  return out


def _first_line(e: BaseException, limit: int = 160) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


# ---------------------------------------------------------------------- configs


def _field(hf: dict, name: str, default=None, *, required: bool = True):
  if name in hf and hf[name] is not None:
    return hf[name]
  if required and default is None:
    raise InteropError(f"config.json field {name}: missing (a {hf.get('model_type')} config "
                       "needs it)")
  return default


def _refuse(name: str, value, why: str) -> InteropError:
  return InteropError(f"config.json field {name}={value!r}: {why}")


def _rope_theta(hf: dict) -> float:
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise _refuse("rope_parameters.rope_type", kind, "only plain rotary positions convert "
                  "(moejax has no rope scaling)")
  theta = rope.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise InteropError("config.json field rope_theta: missing")
  return float(theta)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """The moejax config of a Hugging Face ``config.json`` (:data:`FAMILIES`)."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise _refuse("model_type", family, f"not a family that converts (one of {', '.join(FAMILIES)})")
  if _field(hf, "hidden_act", "silu", required=False) != "silu":
    raise _refuse("hidden_act", hf["hidden_act"], "only SwiGLU (silu) feed-forwards convert")
  if family in ("mistral", "mixtral") and hf.get("sliding_window") is not None:
    raise _refuse("sliding_window", hf["sliding_window"], "moejax attends over the whole "
                  "context; set it to null in config.json if you only use contexts up to the window")
  if family == "qwen2_moe" and hf.get("use_sliding_window"):
    raise _refuse("use_sliding_window", True, "moejax attends over the whole context")
  if family == "olmoe" and hf.get("clip_qkv") is not None:
    raise _refuse("clip_qkv", hf["clip_qkv"], "moejax does not clip q/k/v")
  if hf.get("mlp_bias"):
    raise _refuse("mlp_bias", True, "moejax's feed-forwards have no biases")
  d, heads = int(_field(hf, "hidden_size")), int(_field(hf, "num_attention_heads"))
  kv_heads = int(_field(hf, "num_key_value_heads", heads, required=False))
  head_dim = int(_field(hf, "head_dim", d // heads, required=False))
  layers = int(_field(hf, "num_hidden_layers"))
  c = config_lib.default_config()
  c.model.update(dict(
      vocab_size=int(_field(hf, "vocab_size")), d_model=d, num_layers=layers, num_heads=heads,
      num_kv_heads=0 if kv_heads == heads else kv_heads, head_dim=head_dim,
      d_ff=int(_field(hf, "intermediate_size")), dtype="float32",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=_rope_theta(hf),
      norm_eps=float(_field(hf, "rms_norm_eps"))))
  if family == "qwen2_moe":
    c.model.attention_bias = "qkv" if hf.get("qkv_bias", True) else "none"
  elif hf.get("attention_bias"):
    c.model.attention_bias = "all"
  if family == "olmoe":
    c.model.qk_norm = "full"
  c.dense.update(gated=True, activation="silu")
  if family in ("llama", "mistral"):
    return _validated(c)
  experts_key = "num_local_experts" if family == "mixtral" else "num_experts"
  experts, top_k = int(_field(hf, experts_key)), int(_field(hf, "num_experts_per_tok"))
  renormalize = True if family == "mixtral" else bool(hf.get("norm_topk_prob", False))
  if renormalize and top_k == 1:
    raise _refuse("num_experts_per_tok", 1, "with renormalised top-k the one gate is 1, while "
                  "moejax keeps the raw gate at k=1")
  c.model.sparse_ffn = "moe"
  c.model.sparse_layers = "all"
  c.moe.update(dict(num_experts=experts, top_k=top_k, router="top_k", router_scores="linear",
                    router_noise="none", renormalize=renormalize, gated=True, activation="silu",
                    dispatch="dropless", z_loss_weight=0.0,
                    balance_loss_weight=float(hf.get("router_aux_loss_coef", 0.0) or 0.0)))
  if family == "qwen2_moe":
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    sparse = [i for i in range(layers) if i not in dense_only and (i + 1) % step == 0]
    c.model.sparse_layers = (",".join(map(str, sparse)) if sparse else "none") \
        if len(sparse) < layers else "all"
    c.moe.update(d_ff=int(_field(hf, "moe_intermediate_size")), num_shared_experts=1,
                 shared_d_ff=int(_field(hf, "shared_expert_intermediate_size")), shared_gate=True)
  return _validated(c)


def _validated(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``c`` if moejax's checks pass; else InteropError naming the config.json field behind."""
  from moejax.errors import ConfigError
  try:
    return config_lib.validate(c)
  except ConfigError as e:
    raise InteropError(f"config.json gives a model moejax refuses: {e}") from None


def family_of(config: ml_collections.ConfigDict) -> str:
  """The Hugging Face family that holds a moejax model, or InteropError naming the field
  that no family holds."""
  m = config.model
  def no(field, value, why):
    return InteropError(f"config.{field}={value!r}: {why}; no Hugging Face family holds it")
  kinds = {m.ffn, m.sparse_ffn} if m.sparse_layers != "none" else {m.ffn}
  bad = kinds - {"dense", "moe"}
  if bad:
    field = "model.ffn" if m.ffn in bad else "model.sparse_ffn"
    raise no(field, m[field.split(".")[1]], "only dense and moe blocks convert (PEER / PKM "
             "have no transformers class)")
  sparse = set(parse_sparse_layers(m.sparse_layers, m.num_layers)) if m.sparse_ffn == "moe" else set()
  if m.ffn == "moe":
    sparse = set(range(m.num_layers))
  if len(sparse) < m.num_layers:        # some blocks are dense
    if not config.dense.gated or config.dense.activation != "silu":
      raise no("dense.activation", config.dense.activation, "transformers' blocks are SwiGLU: "
               "dense.gated=True, activation=silu")
  if m.get("qk_norm", "none") == "head":
    raise no("model.qk_norm", "head", "per-head q/k norms are not in these families")
  if not sparse:
    if m.get("qk_norm", "none") != "none" or m.get("attention_bias", "none") == "qkv":
      field = "model.qk_norm" if m.get("qk_norm", "none") != "none" else "model.attention_bias"
      raise no(field, m[field.split(".")[1]], "Llama blocks have no such option")
    return "llama"
  e = config.moe
  for field, want in (("router", "top_k"), ("router_scores", "linear"), ("gated", True),
                      ("activation", "silu")):
    if e[field] != want:
      raise no(f"moe.{field}", e[field], f"transformers' MoE families need moe.{field}={want!r}")
  if e.renormalize and e.top_k == 1:
    raise no("moe.renormalize", True, "renormalised top-1 is weight 1 in transformers, the raw "
             "gate in moejax")
  if e.num_shared_experts:
    if not e.get("shared_gate", False) or e.num_shared_experts != 1:
      raise no("moe.shared_gate", e.get("shared_gate", False), "Qwen2-MoE's shared expert is "
               "one FFN behind a sigmoid gate (num_shared_experts=1, shared_gate=True)")
    if m.get("qk_norm", "none") != "none" or m.get("attention_bias", "none") == "all":
      field = "model.qk_norm" if m.get("qk_norm", "none") != "none" else "model.attention_bias"
      raise no(field, m[field.split(".")[1]], "Qwen2-MoE has no such option")
    return "qwen2_moe"
  if len(sparse) != m.num_layers:
    raise no("model.sparse_layers", m.sparse_layers, "Mixtral and OLMoE have MoE in every block")
  if m.get("qk_norm", "none") == "full":
    if m.get("attention_bias", "none") == "qkv":
      raise no("model.attention_bias", "qkv", "OLMoE biases all four projections or none")
    return "olmoe"
  if not e.renormalize:
    raise no("moe.renormalize", False, "Mixtral renormalises the top-k gates (OLMoE, which does "
             "not, also needs model.qk_norm=full)")
  if m.get("attention_bias", "none") != "none":
    raise no("model.attention_bias", m.attention_bias, "Mixtral has no attention biases")
  return "mixtral"


def config_to_hf(config: ml_collections.ConfigDict) -> dict:
  """The ``config.json`` of the Hugging Face family holding ``config``'s model."""
  family = family_of(config)
  m = config.model
  kv = m.get("num_kv_heads", 0) or m.num_heads
  hf = {"architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": kv, "head_dim": m.head_dim, "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": bool(m.tie_embeddings), "torch_dtype": "float32",
        "dtype": "float32", "max_position_embeddings": max(4096, config.data.seq_len),
        "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  if family in ("llama", "olmoe"):
    hf["attention_bias"] = m.get("attention_bias", "none") == "all"
  if family == "llama":
    hf["mlp_bias"] = False
    return hf
  e = config.moe
  if family == "mixtral":
    hf.update(num_local_experts=e.num_experts, num_experts_per_tok=e.top_k,
              intermediate_size=e.d_ff or m.d_ff, sliding_window=None, router_jitter_noise=0.0,
              router_aux_loss_coef=e.balance_loss_weight)
    return hf
  hf.update(num_experts=e.num_experts, num_experts_per_tok=e.top_k, norm_topk_prob=e.renormalize,
            router_aux_loss_coef=e.balance_loss_weight)
  if family == "olmoe":
    hf.update(intermediate_size=e.d_ff or m.d_ff, clip_qkv=None)
    return hf
  sparse = set(parse_sparse_layers(m.sparse_layers, m.num_layers)) if m.ffn != "moe" else \
      set(range(m.num_layers))
  hf.update(moe_intermediate_size=e.d_ff or m.d_ff,
            shared_expert_intermediate_size=e.shared_d_ff or (e.d_ff or m.d_ff),
            decoder_sparse_step=1, mlp_only_layers=sorted(set(range(m.num_layers)) - sparse),
            qkv_bias=m.get("attention_bias", "none") == "qkv", use_sliding_window=False,
            sliding_window=None)
  return hf


# ---------------------------------------------------------------------- tensors


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


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _put(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _flat_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat_paths(v, prefix + (k,))
  else:
    yield prefix


def _model_shapes(config) -> dict:
  """The unscanned pure dict of ``config``'s model as ShapeDtypeStructs (nothing allocated)."""
  import copy
  from flax import nnx
  from moejax.model import Transformer
  c = copy.deepcopy(config)
  c.model.scan_layers = False
  model = nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(params=0, router=1)))
  return nnx.to_pure_dict(nnx.state(model))


def params_from_hf(config: ml_collections.ConfigDict, tensors: dict[str, np.ndarray]) -> dict:
  """The model variables (pure dict, ``config``'s layout) from Hugging Face ``tensors``:
  every tensor is used, every variable is filled, every shape checked, or InteropError."""
  target = _model_shapes(config)
  left = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
  out: dict = {}
  for entry in mapping(config):
    want = _get(target, entry.path)
    shapes = jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(want.shape, jnp.float32))
    xs = []
    for name, s in zip(entry.hf, shapes):
      if name not in left:
        raise InteropError(f"tensor {name}: missing from the checkpoint (its config.json "
                           "needs it)")
      x = left.pop(name)
      if tuple(x.shape) != tuple(s.shape):
        raise InteropError(f"tensor {name}: shape {list(x.shape)}, config.json implies "
                           f"{list(s.shape)}")
      if not np.issubdtype(x.dtype, np.floating):
        raise InteropError(f"tensor {name}: dtype {x.dtype}, not a float")
      xs.append(np.asarray(x, np.float32))
    _put(out, entry.path, np.asarray(entry.to_moejax([np.asarray(x) for x in xs]), np.float32))
  if left:
    name = sorted(left)[0]
    raise InteropError(f"tensor {name}: has no place in the {config_to_hf(config)['model_type']} "
                       f"model of config.json ({len(left)} such tensors)")
  have = set(_flat_paths(out))
  for path in _flat_paths(target):
    if path not in have:   # not reachable for the families above: a mapping gap
      raise InteropError(f"moejax variable {'/'.join(map(str, path))}: no Hugging Face tensor "
                         "maps to it")
  if config.model.scan_layers:
    from moejax.model import to_layout
    out = jax.tree.map(np.asarray, to_layout(out, config, scanned=True))
  return out


def params_to_hf(config: ml_collections.ConfigDict, pure: dict) -> dict[str, np.ndarray]:
  """Hugging Face tensors (float32) of the model variables ``pure`` (``config``'s layout)."""
  if config.model.scan_layers:
    from moejax.model import to_layout
    pure = to_layout(pure, config, scanned=False)
  out = {}
  for entry in mapping(config):
    for name, x in zip(entry.hf, entry.to_hf(np.asarray(_get(pure, entry.path), np.float32))):
      out[name] = np.ascontiguousarray(np.asarray(x, np.float32))
  return out


def holds_tables(config: ml_collections.ConfigDict) -> bool:
  """The model has PEER / PKM blocks (exported in moejax's own layout)."""
  m = config.model
  return m.ffn in TABLE_KINDS or (m.sparse_ffn in TABLE_KINDS and m.sparse_layers != "none")


def own_layout(config: ml_collections.ConfigDict, pure: dict) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config.json, tensors)`` of moejax's own layout (:data:`OWN_FORMAT`)."""
  if config.model.scan_layers:
    from moejax.model import to_layout
    pure = to_layout(pure, config, scanned=False)
  tensors = {".".join(map(str, path)): np.ascontiguousarray(np.asarray(_get(pure, path)))
             for path in _flat_paths(pure)}
  return {"format": OWN_FORMAT, "moejax_config": config.to_dict()}, tensors


def params_from_own_layout(config: ml_collections.ConfigDict, tensors: dict[str, np.ndarray]
                           ) -> dict:
  """The model variables (``config``'s layout) of moejax's own layout, shapes checked."""
  target = _model_shapes(config)
  left = dict(tensors)
  out: dict = {}
  for path in _flat_paths(target):
    name, want = ".".join(map(str, path)), _get(target, path)
    if name not in left:
      raise InteropError(f"tensor {name}: missing from the checkpoint (its moejax_config needs it)")
    x = left.pop(name)
    if tuple(x.shape) != tuple(want.shape):
      raise InteropError(f"tensor {name}: shape {list(x.shape)}, moejax_config implies "
                         f"{list(want.shape)}")
    _put(out, path, np.asarray(x, want.dtype))
  if left:
    raise InteropError(f"tensor {sorted(left)[0]}: has no place in the model of moejax_config")
  if config.model.scan_layers:
    from moejax.model import to_layout
    out = jax.tree.map(np.asarray, to_layout(out, config, scanned=True))
  return out


# ---------------------------------------------------------------------- whole directories


def _refuse_existing(path: str, flag: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise InteropError(f"{flag}={path}: exists and is not empty (pass a new directory; nothing "
                       "is overwritten)")


def import_checkpoint(hf_dir: str, workdir: str, *, scan_layers: bool = False
                      ) -> ml_collections.ConfigDict:
  """Converts the Hugging Face checkpoint in ``hf_dir`` to a moejax export in
  ``workdir/export`` (config.json + model/) and writes ``workdir/config.py``, a config file
  for ``train.py`` that starts from those weights (``train.init_from``). Every check runs
  before anything is written. Returns the moejax config."""
  from flax import nnx
  from moejax.model import Transformer
  from moejax.training import checkpoint as ckpt_lib
  from moejax.training import state as state_lib
  export_dir = os.path.join(os.path.abspath(workdir), "export")
  _refuse_existing(export_dir, "--workdir")
  for name in ("config.py", "tokenizer.model"):
    if os.path.exists(os.path.join(workdir, name)):
      raise InteropError(f"--workdir={workdir}: holds {name} already (pass a new directory; "
                         "nothing is overwritten)")
  hf, tensors = read_checkpoint(hf_dir)
  own = hf.get("format") == OWN_FORMAT
  if own:
    try:
      config = config_lib.from_dict(hf.get("moejax_config") or {})
    except Exception as e:
      raise InteropError(f"config.json field moejax_config: not a config of this moejax "
                         f"({_first_line(e)})") from None
  else:
    config = config_from_hf(hf)
  config.model.scan_layers = scan_layers
  config.mesh.update({"data": -1, "expert": 1, "model": 1})   # this host; train.py sets its own
  pure = params_from_own_layout(config, tensors) if own else params_from_hf(config, tensors)
  mesh, rules = state_lib.make_mesh(config), state_lib.axis_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0, router=1)))
    _, state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(state, mesh).to_pure_dict()
  arrays = jax.tree.map(lambda x, s: jax.device_put(x, s), pure, shardings)
  nnx.replace_by_pure_dict(state, arrays)
  tokenizer = os.path.join(hf_dir, "tokenizer.model")    # SentencePiece, as moejax reads
  if os.path.exists(tokenizer):
    config.data.tokenizer = os.path.join(os.path.abspath(workdir), "tokenizer.model")
  ckpt_lib.export(export_dir, state, config)
  if os.path.exists(tokenizer):
    import shutil
    shutil.copyfile(tokenizer, config.data.tokenizer)
  with open(os.path.join(os.path.abspath(workdir), "config.py"), "w") as f:
    f.write(_TRAIN_CONFIG.format(hf_dir=os.path.abspath(hf_dir)))
  return config


_TRAIN_CONFIG = '''"""moejax config of the Hugging Face checkpoint {hf_dir}, written by moejax.convert.

The model of export/config.json; training starts from the converted weights in export/
(``train.init_from``). Set the data fields (tokenizer, dataset) for fine-tuning.
"""

import os

from moejax import config as config_lib
from moejax import paths


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_dict(paths.read_json(os.path.join(here, "export", "config.json")))
  c.train.init_from = os.path.join(here, "export")
  return c
'''


def export_checkpoint(export_dir: str, out_dir: str, *,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes the moejax export ``export_dir`` as a Hugging Face checkpoint in ``out_dir``
  (config.json + safetensors, sharded with an index past ``max_shard_bytes``), loadable by
  ``transformers.AutoModelForCausalLM.from_pretrained``; a PEER / PKM model in moejax's own
  layout (:data:`OWN_FORMAT`). Returns the files written."""
  from flax import nnx
  from moejax.training import checkpoint as ckpt_lib
  from moejax.training import state as state_lib
  _refuse_existing(out_dir, "OUT_DIR")
  if not os.path.isdir(os.path.join(export_dir, "model")):
    raise InteropError(f"--to_hf={export_dir}: not a moejax export (config.json + model/; pass "
                       "WORKDIR/export)")
  config = ckpt_lib.read_config(export_dir)
  own = holds_tables(config)
  if not own:
    config_to_hf(config)                 # refuses a model no family holds, before reading
  config.mesh.update({"data": -1, "expert": 1, "model": 1})
  ms = state_lib.create_model_state(config)
  ckpt_lib.load_model_state(export_dir, ms.state, ms.shardings)
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(ms.state))
  if own:
    hf, tensors = own_layout(config, pure)
  else:
    hf, tensors = config_to_hf(config), params_to_hf(config, pure)
  # Written beside OUT_DIR under a fresh name and renamed when whole: a failed export leaves
  # nothing behind and touches no directory it did not make.
  import shutil
  import tempfile
  parent, base = os.path.split(os.path.abspath(out_dir.rstrip("/")))
  tmp = tempfile.mkdtemp(prefix=base + ".partial-", dir=parent)
  try:
    files = write_checkpoint(tmp, hf, tensors, max_shard_bytes=max_shard_bytes)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)                    # empty (checked above)
  os.replace(tmp, out_dir)
  return files
