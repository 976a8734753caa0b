"""Hugging Face ``config.json`` <-> moejax config, per family (see ``moejax.interop.hf``)."""

from __future__ import annotations

import ml_collections

from moejax import config as config_lib
from moejax.config import parse_sparse_layers
from moejax.interop.checkpoint_dir import InteropError

FAMILIES = ("llama", "mistral", "mixtral", "qwen2_moe", "olmoe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}


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


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_tokens_from_hf(hf: dict, generation: dict | None = None) -> dict:
  """``{bos,eos,pad}_token_id`` of a checkpoint as ``config.special_tokens`` holds them
  (tuples of ids): ``generation_config.json``'s where it names one (transformers' ``generate``
  reads that file first), else ``config.json``'s. InteropError naming the field for a value
  that is not an id, a list of ids or null."""
  out = {}
  for name in SPECIAL_TOKENS:
    for source, d in (("generation_config.json", generation or {}), ("config.json", hf)):
      v = d.get(name)
      if v is not None:
        break
    ids = [] if v is None else v if isinstance(v, list) else [v]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
      raise _refuse(name, v, f"in {source}: must be a token id, a list of them or null")
    out[name] = tuple(ids)
  return out


def config_from_hf(hf: dict, generation: dict | None = None) -> ml_collections.ConfigDict:
  """The moejax config of a Hugging Face ``config.json`` (:data:`FAMILIES`) and, if given,
  its ``generation_config.json`` (special token ids, see :func:`special_tokens_from_hf`)."""
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
  c.special_tokens.update(special_tokens_from_hf(hf, generation))
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


def special_tokens_to_hf(config: ml_collections.ConfigDict) -> dict:
  """``{bos,eos,pad}_token_id`` of ``config.special_tokens`` as transformers writes them: an
  id, a list of several, or None."""
  tokens = config.get("special_tokens") or {}
  out = {}
  for name in SPECIAL_TOKENS:
    ids = list(tokens.get(name) or ())
    out[name] = None if not ids else ids[0] if len(ids) == 1 else ids
  return out


def generation_config_to_hf(config: ml_collections.ConfigDict) -> dict:
  """``generation_config.json`` of ``config``: its special token ids (those it has)."""
  return {k: v for k, v in special_tokens_to_hf(config).items() if v is not None}


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
        "use_cache": True, **special_tokens_to_hf(config)}
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
