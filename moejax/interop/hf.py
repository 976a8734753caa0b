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

The special token ids (``bos/eos/pad_token_id``) of ``generation_config.json`` (where it
names them) or else ``config.json`` go into the export's config (``config.special_tokens``)
and back into both files on export, so that transformers' ``generate`` stops at the same eos.

Memory: import reads one tensor at a time (``checkpoint_dir.Tensors``: ``safe_open`` per
tensor, names and shapes checked from the file headers first), export makes the tensors of
one variable at a time and writes shards of at most ``max_shard_bytes``, so that a conversion
holds about one copy of the model (plus one shard when exporting).

Models with PEER or PKM blocks, which no transformers class holds, export to moejax's own
safetensors layout (``moejax.interop.own_layout``), which ``--from_hf`` reads back.

The pieces: ``checkpoint_dir`` (the directory and its safetensors), ``hf_config`` (config.json
per family), ``hf_tensors`` (:func:`mapping`), ``own_layout``; this module converts whole
directories.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.interop.checkpoint_dir import (CONFIG, GENERATION_CONFIG, INDEX,  # noqa: F401
                                           MAX_SHARD_BYTES, SINGLE, InteropError, Tensors,
                                           first_line, parse_size, read_checkpoint,
                                           read_generation_config, write_checkpoint)
from moejax.interop.hf_config import (ARCHITECTURES, FAMILIES, config_from_hf,  # noqa: F401
                                      config_to_hf, family_of, generation_config_to_hf)
from moejax.interop.hf_tensors import Entry, mapping, params_from_hf, params_to_hf  # noqa: F401
from moejax.interop.own_layout import (OWN_FORMAT, TABLE_KINDS, holds_tables, own_layout,  # noqa: F401
                                       params_from_own_layout)


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
  from moejax.training import checkpoint as ckpt_lib
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InteropError(f"--workdir={workdir}: is a file, not a directory (pass a new directory)")
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
                         f"({first_line(e)})") from None
  else:
    config = config_from_hf(hf, read_generation_config(hf_dir))
  config.model.scan_layers = scan_layers
  config.mesh.update({"data": -1, "expert": 1, "model": 1})   # this host; train.py sets its own
  pure = params_from_own_layout(config, tensors) if own else params_from_hf(config, tensors)
  state, shardings = _abstract_state(config)
  _to_devices(pure, nnx.to_pure_dict(shardings))
  nnx.replace_by_pure_dict(state, pure)
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


def _abstract_state(config: ml_collections.ConfigDict):
  """``(state, shardings)`` of ``config``'s model on this host's mesh, shapes only (nothing
  allocated)."""
  from flax import nnx
  from moejax.model import Transformer
  from moejax.training import state as state_lib
  mesh, rules = state_lib.make_mesh(config), state_lib.axis_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0, router=1)))
    abstract.eval()
    _, state = nnx.split(abstract)
    return state, nnx.get_named_sharding(state, mesh)


def _to_devices(pure: dict, shardings: dict) -> None:
  """Puts every host array of ``pure`` on its sharding, in place, one at a time: each host
  copy is dropped once its device copy exists, so the model is not held twice."""
  for k in list(pure):
    if isinstance(pure[k], dict):
      _to_devices(pure[k], shardings[k])
    else:
      pure[k] = jax.device_put(pure[k], shardings[k])


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
  _refuse_existing(out_dir, "OUT_DIR")
  if not os.path.isdir(os.path.join(export_dir, "model")):
    raise InteropError(f"--to_hf={export_dir}: not a moejax export (config.json + model/; pass "
                       "WORKDIR/export)")
  config = ckpt_lib.read_config(export_dir)
  own = holds_tables(config)
  if not own:
    config_to_hf(config)                 # refuses a model no family holds, before reading
  config.mesh.update({"data": -1, "expert": 1, "model": 1})
  state, shardings = _abstract_state(config)    # restored into: no random init beside it
  try:
    ckpt_lib.load_model_state(export_dir, state, shardings)
  except ckpt_lib.CheckpointError as e:   # its fix names eval.py's flag: name ours
    raise InteropError(str(e).replace("--checkpoint", "EXPORT_DIR")) from None
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  del state
  if own:
    (hf, tensors), generation = own_layout(config, pure), None
  else:
    hf, tensors = config_to_hf(config), params_to_hf(config, pure)
    generation = generation_config_to_hf(config)
  # Written beside OUT_DIR under a fresh name and renamed when whole: a failed export leaves
  # nothing behind and touches no directory it did not make.
  import shutil
  import tempfile
  parent, base = os.path.split(os.path.abspath(out_dir.rstrip("/")))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=base + ".partial-", dir=parent)
  try:
    files = write_checkpoint(tmp, hf, tensors, max_shard_bytes=max_shard_bytes,
                             generation_config=generation)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)                    # empty (checked above)
  os.replace(tmp, out_dir)
  return files
