"""The typed, validated experiment config: the one place that knows every field.

Experiments are ``ml_collections`` config files (``configs/*.py``) whose
``get_config()`` starts from :func:`default_config` and changes fields. Command
line overrides (``--config.model.d_model=128``) go through absl's config flags.
:func:`validate` checks the result once at start and raises
:class:`~moejax.errors.ConfigError` with a one-line message naming the field.

Sections:
  model     the Transformer and which feed-forward kind each block uses
  <ffn>     one section per registered feed-forward kind (dense, moe, peer, pkm)
  data      dataset, tokenizer, sequence length, batch
  optim     optimizer and schedule
  train     steps, logging, checkpoints, profiling
  mesh      device mesh shape and extra logical-axis rules
  eval      evaluation datasets and sizes
  special_tokens  bos / eos / pad ids of a Hugging Face checkpoint (kept for --to_hf)
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections

from moejax.errors import ConfigError, config_error


# model.remat: how a block is rematerialised (moejax.model.remat_policy builds the policy).
REMAT_POLICIES = ("none", "full", "save_dots", "save_named")
# Activations a block names for remat=save_named (saved; everything else is recomputed).
REMAT_NAMES = ("attn_out", "ffn_in", "ffn_out")


def default_config() -> ml_collections.ConfigDict:
  # Imported here so that every registered kind (and the data section) is known.
  from moejax import layers  # noqa: F401
  from moejax import data
  from moejax.layers.base import FFN_REGISTRY

  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict({
      "vocab_size": 0,           # 0: taken from the tokenizer
      "d_model": 128,
      "num_layers": 4,
      "num_heads": 4,
      "num_kv_heads": 0,         # key/value heads (grouped-query attention); 0: num_heads
      "head_dim": 32,
      "d_ff": 512,
      "dtype": "float32",        # compute dtype: float32 | bfloat16 (params are float32)
      "ffn": "dense",            # feed-forward kind of ordinary blocks
      "sparse_ffn": "dense",     # feed-forward kind of the blocks named by sparse_layers
      "sparse_layers": "none",   # none | all | middle | every:K[:OFFSET] | comma list of indices
      "tie_embeddings": False,
      "rope_theta": 10000.0,
      "norm_eps": 1e-6,
      "attention_bias": "none",  # none | qkv (Qwen2) | all (q, k, v and output projections)
      "qk_norm": "none",         # RMSNorm on q and k: none | full (whole projection, OLMoE) | head
      # Rematerialisation per block: none | full (save only block inputs) | save_dots (save
      # matmul outputs without batch dims: projections, not attention scores) | save_named
      # (save only the activations named in model.remat_names).
      "remat": "none",
      "remat_names": "attn_out,ffn_in",  # names for remat=save_named (of REMAT_NAMES)
      # Run repeating blocks under nnx.scan (params stacked on a leading 'layers' axis);
      # blocks that break the repetition run unscanned. Changes the checkpoint layout.
      "scan_layers": False,
      # Tokens per chunk of the vocabulary loss (the f32 logits of only this many tokens
      # exist at once, recomputed in the backward); 0: plain loss on full logits.
      "loss_chunk": 0,
  })
  for name, kind in sorted(FFN_REGISTRY.items()):
    c[name] = kind.default_config()

  c.data = data.default_config()

  c.optim = ml_collections.ConfigDict({
      "name": "adamw",           # adamw | adam | sgd
      "lr": 3e-3,
      "table_lr": 0.0,           # LR of TableParam tables (PEER experts, PKM values); 0: same as lr
      "table_update": "dense",   # dense | row_sparse (lazy Adam on retrieved rows only; unsharded tables)
      "warmup_steps": 20,
      "schedule": "cosine",      # cosine | constant | linear
      "min_lr_ratio": 0.1,
      "b1": 0.9,
      "b2": 0.98,
      "eps": 1e-9,
      "weight_decay": 0.01,      # decoupled; never applied to tables, norms or biases
      "grad_clip": 1.0,          # global-norm clip; 0 disables
  })

  c.train = ml_collections.ConfigDict({
      "steps": 300,
      "log_every": 10,
      "eval_every": 100,         # 0: only at the end
      "eval_batches": 4,
      "checkpoint_every": 100,
      "keep_checkpoints": 2,
      "profile": False,          # jax.profiler trace of a few steps into workdir/profile
      "profile_start": 5,
      "profile_steps": 3,
      "progress_bar": True,
      # A non-finite loss or gradient norm (caught inside the step, never applied):
      # stop = end the run naming the step (exit 1); skip = leave params and optimizer
      # state unchanged for that step, count and log it.
      "on_nonfinite": "stop",
      # A moejax export (e.g. WORKDIR/export, or one made by python -m moejax.convert) whose
      # model variables start a run that has no checkpoint yet (fine-tuning); "": random init.
      "init_from": "",
  })

  c.mesh = ml_collections.ConfigDict({
      "data": -1,
      "expert": 1,
      "model": 1,
      # Extra logical rules, "name=axis" or "name=axis1+axis2" or "name=" (replicated),
      # comma separated, e.g. "table_rows=,table_embed=model" to shard PEER tables by feature.
      "rules": "",
  })

  c.eval = ml_collections.ConfigDict({
      "datasets": "",            # comma list of TFDS names; "": the training dataset
      "split": "validation",
      "max_batches": 0,          # 0: the whole split
  })

  # The special token ids a Hugging Face checkpoint names (its generation_config.json's, else
  # its config.json's), each a tuple: () none, (2,) one, (2, 7) several (Llama 3's eos).
  # python -m moejax.convert --from_hf sets them, --to_hf writes them back to config.json and
  # generation_config.json, so that transformers' generate stops where the original did.
  # moejax's own data pipeline and generate.py take theirs from data.tokenizer.
  c.special_tokens = ml_collections.ConfigDict({
      "bos_token_id": (),
      "eos_token_id": (),        # e.g. --config.special_tokens.eos_token_id='(2, 7)'
      "pad_token_id": (),
  })
  return c


C4_VOCAB = 32000   # the SentencePiece vocabulary the C4 TPU configs are sized and budgeted for


def c4_tpu_base(*, seq_len: int, batch_size: int, steps: int, warmup_steps: int
                ) -> ml_collections.ConfigDict:
  """The shared trunk of the TPU configs: a 12 x 768 bf16 LM on c4/en (TFDS, array_record).

  ``data.data_dir`` and ``data.tokenizer`` are placeholders to set on the command line:
  ``--config.data.data_dir=gs://BUCKET/tensorflow_datasets
  --config.data.tokenizer=gs://BUCKET/spm/c4_32k.model``. The tokenizer placeholder is a
  SentencePiece path (never the byte tokenizer, which would silently train a 258-token
  model on c4), so ``python -m moejax.compile`` sizes the vocabulary by ``--vocab_size``
  (32,000) and ``train.py`` stops until a real model file is given.
  """
  c = default_config()
  c.model.update(dict(vocab_size=0, d_model=768, num_layers=12, num_heads=12, head_dim=64,
                      d_ff=3072, dtype="bfloat16"))
  c.data.update(dict(dataset="c4/en:3.1.0", data_dir="",
                     tokenizer="gs://YOUR_BUCKET/spm/c4_32k.model", text_key="text",
                     eval_split="validation", seq_len=seq_len, batch_size=batch_size,
                     worker_count=8))
  c.optim.update(dict(lr=1e-3, warmup_steps=warmup_steps, schedule="cosine"))
  c.train.update(dict(steps=steps, log_every=100, eval_every=2000, checkpoint_every=2000))
  c.eval.datasets = "c4/en:3.1.0,lambada"   # the PEER paper's eval sets that TFDS has (data/eval_sets.py)
  return c


def parse_sparse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
  """Block indices that use ``model.sparse_ffn``."""
  spec = spec.strip()
  if spec in ("", "none"):
    return ()
  if spec == "all":
    return tuple(range(num_layers))
  if spec == "middle":
    return (num_layers // 2,)
  m = re.fullmatch(r"every:(\d+)(?::(\d+))?", spec)
  if m:
    k, off = int(m.group(1)), int(m.group(2) or 0)
    if k < 1:
      raise ValueError(spec)
    return tuple(range(off, num_layers, k))
  idx = tuple(int(s) for s in spec.split(","))
  if any(i < 0 or i >= num_layers for i in idx):
    raise ValueError(spec)
  return idx


def parse_rules(spec: str) -> dict[str, Any]:
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, axes = item.partition("=")
    axes = tuple(a for a in axes.split("+") if a)
    out[name.strip()] = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return out


_fail = config_error


def _leaf_paths(ref, prefix: str = "") -> list[str]:
  out = []
  for key in ref.keys():
    if isinstance(ref[key], ml_collections.ConfigDict):
      out += _leaf_paths(ref[key], f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def unknown_field_error(field: str, ref, root) -> ConfigError:
  """``config.FIELD: unknown field (did you mean config.NEAREST?)`` for a mistyped field.

  ``ref`` is the section that lacks the last part of ``field``, ``root`` the whole default
  config: the same name in another section (``train.lr`` -> ``optim.lr``) comes first, then
  a near spelling in the same section, then anywhere. Without a near name, the known ones.
  """
  from moejax.errors import nearest
  prefix, _, key = field.rpartition(".")
  prefix = prefix + "." if prefix else ""
  leaves = _leaf_paths(root)
  by_leaf: dict[str, str] = {}
  for path in leaves:
    by_leaf.setdefault(path.rpartition(".")[2], path)
  guess = by_leaf.get(key)
  if guess is None:
    near = nearest(key, ref.keys(), cutoff=0.75)
    guess = prefix + near if near else None
  if guess is None:
    near = nearest(key, by_leaf)
    guess = by_leaf[near] if near else None
  if guess is None:
    near = nearest(key, ref.keys())
    guess = prefix + near if near else None
  if guess is not None:
    return ConfigError(f"config.{field}: unknown field (did you mean config.{guess}?)")
  return ConfigError(f"config.{field}: unknown field (known here: {', '.join(sorted(ref.keys()))})")


def _check_schema(cfg, ref, prefix: str = "", root=None) -> None:
  """Unknown fields and type mismatches against the defaults."""
  root = ref if root is None else root
  for key in cfg.keys():
    field = f"{prefix}{key}"
    if key not in ref:
      raise unknown_field_error(field, ref, root)
    val, want = cfg[key], ref[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(val, ml_collections.ConfigDict):
        raise ConfigError(f"config.{field}: must be a section, got {val!r}")
      _check_schema(val, want, field + ".", root)
      continue
    if want is None or val is None:
      continue
    if isinstance(want, bool) != isinstance(val, bool) or (
        isinstance(want, (int, float)) and not isinstance(val, (int, float))) or (
        isinstance(want, str) and not isinstance(val, str)) or (
        isinstance(want, int) and not isinstance(want, bool) and isinstance(val, float)):
      raise _fail(field, val, f"must be {type(want).__name__}",
                  f"set --config.{field}=<{type(want).__name__}>, default {want!r}")


def check_mesh_shape(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
  """The checks that need the mesh resolved against the devices (an axis of -1 is only known
  then): the key/value heads and each feed-forward kind's ``check_mesh``.

  ``mesh_shape``: mesh axis -> size, e.g. ``{'data': 4, 'expert': 2, 'model': 1}``.
  Raises ConfigError naming the field.
  """
  from moejax import layers  # noqa: F401  (registers every kind)
  from moejax.layers.base import FFN_REGISTRY
  check_kv_heads(cfg, mesh_shape["model"])
  m = cfg.model
  for name in {m.ffn, m.sparse_ffn}:
    if FFN_REGISTRY[name].check_mesh is not None:
      FFN_REGISTRY[name].check_mesh(cfg[name], cfg, mesh_shape)


def check_kv_heads(cfg: ml_collections.ConfigDict, model_axis: int) -> None:
  """k, v and the KV cache are sharded by head over the 'model' mesh axis of size ``model_axis``.

  Called once the mesh is resolved against the devices (an axis of -1 is only known then).
  """
  kv_heads = cfg.model.num_kv_heads or cfg.model.num_heads
  if kv_heads % model_axis:
    raise _fail("mesh.model", cfg.mesh.model,
                f"{kv_heads} key/value heads do not divide over a model axis of {model_axis}",
                "set --config.mesh.model to a divisor of the key/value heads")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks ``cfg``; returns it. Raises ConfigError naming the first bad field."""
  from moejax import data
  from moejax.layers.base import FFN_REGISTRY

  _check_schema(cfg, default_config())
  m = cfg.model
  kinds = sorted(FFN_REGISTRY)
  for f in ("ffn", "sparse_ffn"):
    if m[f] not in FFN_REGISTRY:
      raise _fail(f"model.{f}", m[f], f"unknown feed-forward kind, one of {kinds}",
                  f"set --config.model.{f}=dense")
  for f in ("d_model", "num_layers", "num_heads", "head_dim", "d_ff"):
    if m[f] < 1:
      raise _fail(f"model.{f}", m[f], "must be >= 1", f"set --config.model.{f} to a positive int")
  if m.vocab_size < 0:
    raise _fail("model.vocab_size", m.vocab_size, "must be >= 0", "0 takes it from the tokenizer")
  if m.dtype not in ("float32", "bfloat16"):
    raise _fail("model.dtype", m.dtype, "must be float32 or bfloat16", "set --config.model.dtype=float32")
  if m.num_kv_heads < 0 or (m.num_kv_heads and m.num_heads % m.num_kv_heads):
    raise _fail("model.num_kv_heads", m.num_kv_heads,
                f"must be 0 (= num_heads) or a divisor of model.num_heads={m.num_heads}",
                "set --config.model.num_kv_heads=0")
  from moejax.layers.attention import ATTENTION_BIASES, QK_NORMS
  for f, allowed in (("attention_bias", ATTENTION_BIASES), ("qk_norm", QK_NORMS)):
    if m[f] not in allowed:
      raise _fail(f"model.{f}", m[f], f"must be one of {'|'.join(allowed)}",
                  f"set --config.model.{f}=none")
  if m.head_dim % 2:
    raise _fail("model.head_dim", m.head_dim, "must be even for rotary positions",
                "set --config.model.head_dim to an even int")
  try:
    parse_sparse_layers(m.sparse_layers, m.num_layers)
  except ValueError:
    raise _fail("model.sparse_layers", m.sparse_layers,
                f"not none|all|middle|every:K[:OFFSET]|indices below num_layers={m.num_layers}",
                "e.g. --config.model.sparse_layers=middle") from None
  if m.remat not in REMAT_POLICIES:
    raise _fail("model.remat", m.remat, f"must be one of {'|'.join(REMAT_POLICIES)}",
                "set --config.model.remat=full (least memory) or none")
  names = [n.strip() for n in m.remat_names.split(",") if n.strip()]
  bad = [n for n in names if n not in REMAT_NAMES]
  if bad or (m.remat == "save_named" and not names):
    raise _fail("model.remat_names", m.remat_names,
                f"must be a comma list of {','.join(REMAT_NAMES)}" + ("" if bad else " (non-empty)"),
                "e.g. --config.model.remat_names=attn_out,ffn_in")
  if m.loss_chunk < 0:
    raise _fail("model.loss_chunk", m.loss_chunk, "must be >= 0 (0 = plain loss)",
                "set --config.model.loss_chunk=0 or e.g. 4096")
  for name in {m.ffn, m.sparse_ffn}:
    if FFN_REGISTRY[name].validate is not None:
      FFN_REGISTRY[name].validate(cfg[name], cfg)

  o = cfg.optim
  if o.name not in ("adamw", "adam", "sgd"):
    raise _fail("optim.name", o.name, "must be adamw, adam or sgd", "set --config.optim.name=adamw")
  if o.schedule not in ("cosine", "constant", "linear"):
    raise _fail("optim.schedule", o.schedule, "must be cosine, constant or linear",
                "set --config.optim.schedule=cosine")
  if o.table_update not in ("dense", "row_sparse"):
    raise _fail("optim.table_update", o.table_update, "must be dense or row_sparse",
                "set --config.optim.table_update=dense")
  if o.table_update == "row_sparse" and o.name == "sgd":
    raise _fail("optim.table_update", o.table_update, "row_sparse is lazy Adam, it needs optim.name adam or adamw",
                "set --config.optim.name=adamw or --config.optim.table_update=dense")
  for f in ("lr", "table_lr", "warmup_steps", "weight_decay", "grad_clip"):
    if o[f] < 0:
      raise _fail(f"optim.{f}", o[f], "must be >= 0", f"set --config.optim.{f} to 0 or more")
  if o.lr == 0:
    raise _fail("optim.lr", o.lr, "must be > 0", "e.g. --config.optim.lr=3e-3")

  t = cfg.train
  if t.steps < 1:
    raise _fail("train.steps", t.steps, "must be >= 1", "set --config.train.steps=N")
  for f in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if t[f] < 1:
      raise _fail(f"train.{f}", t[f], "must be >= 1", f"set --config.train.{f}=N")
  if t.on_nonfinite not in ("stop", "skip"):
    raise _fail("train.on_nonfinite", t.on_nonfinite, "must be stop or skip",
                "set --config.train.on_nonfinite=stop (end the run) or skip (drop that step)")
  if t.eval_every < 0 or t.eval_batches < 1:
    raise _fail("train.eval_every", t.eval_every, "eval_every must be >= 0 and eval_batches >= 1",
                "set --config.train.eval_every=100 --config.train.eval_batches=4")

  for f in ("data", "expert", "model"):
    if cfg.mesh[f] == 0 or cfg.mesh[f] < -1:
      raise _fail(f"mesh.{f}", cfg.mesh[f], "must be a positive int or -1 (= the rest)",
                  f"set --config.mesh.{f}=1")
  if [cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model].count(-1) > 1:
    raise _fail("mesh", (cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model), "at most one axis may be -1",
                "set the others to explicit sizes")
  from moejax.sharding import BASE_RULES, MESH_AXES
  names = {n for n, _ in BASE_RULES}
  for name, axes in parse_rules(cfg.mesh.rules).items():
    bad_axes = [a for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes)
                if a not in MESH_AXES]
    if name not in names or bad_axes:
      why = (f"unknown logical name {name!r} (one of {sorted(names)})" if name not in names
             else f"unknown mesh axis {bad_axes[0]!r} (one of {list(MESH_AXES)})")
      raise _fail("mesh.rules", cfg.mesh.rules, why,
                  "e.g. --config.mesh.rules=table_rows=,table_embed=model")

  for f, v in cfg.special_tokens.items():
    if not isinstance(v, tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
      raise _fail(f"special_tokens.{f}", v, "must be a tuple of token ids: () none, (2,) one, "
                  "(2, 7) several", f"set --config.special_tokens.{f}='(2,)'")

  data.validate(cfg.data, cfg)
  return cfg


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """A config saved by ``ConfigDict.to_dict()`` (e.g. ``config.json`` of an export), on top of defaults.

  Unknown fields (from a newer or older moejax) raise ConfigError.
  """
  cfg = default_config()
  _check_schema(ml_collections.ConfigDict(d), cfg)
  cfg.update(d)
  return cfg
