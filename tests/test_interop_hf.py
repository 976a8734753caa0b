"""Hugging Face checkpoints in and out (moejax.interop.hf, python -m moejax.convert), against
fixtures that transformers wrote (tests/fixtures/hf/make_fixtures.py): logits and greedy
generation equal transformers', training continues, export gives the same tensors back."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lm_utils import synthetic_batches
from moejax import config as config_lib
from moejax import convert
from moejax.evaluation import run as eval_run
from moejax.generation import Generator
from moejax.interop import hf
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("llama", "mixtral", "qwen2_moe", "olmoe")


def _reference(family):
  return np.load(os.path.join(FIXTURES, family, "reference.npz"))


def _tensors(path):
  return load_file(os.path.join(path, "model.safetensors"))


def _import(family, workdir, **kw):
  config = hf.import_checkpoint(os.path.join(FIXTURES, family), str(workdir), **kw)
  _, ms, _ = eval_run.load(os.path.join(str(workdir), "export"))
  return config, nnx.merge(ms.graphdef, ms.state)


def _train_config(workdir):
  """The config of an import's ``config.py``, read as train.py reads it."""
  path = str(workdir / "config.py")
  spec = {"__file__": path}
  exec(compile(open(path).read(), path, "exec"), spec)
  return spec["get_config"]()


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_and_exports_back(family, tmp_path):
  ref = _reference(family)
  config, model = _import(family, tmp_path / "run")
  logits = np.asarray(model(ref["tokens"])[0])
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
  new = Generator(model).generate([ref["prompt"].tolist()], len(ref["greedy"]), temperature=0.0)
  np.testing.assert_array_equal(new[0], ref["greedy"])
  # export: the very tensors transformers wrote, and a config.json of the same model
  files = hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
  assert files == ["model.safetensors", "config.json", "generation_config.json"]
  src, out = _tensors(os.path.join(FIXTURES, family)), _tensors(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for name in src:
    np.testing.assert_array_equal(out[name], src[name], err_msg=name)
  again = hf.config_from_hf(json.load(open(tmp_path / "out" / "config.json")))
  assert again.model.to_dict() == config.model.to_dict()
  assert again.moe.to_dict() == config.moe.to_dict()


# One family trains in the default suite (each family's tensor mapping is pinned above by
# its exact export): qwen2_moe has the most kinds of tensors (attention biases, dense and
# MoE blocks, shared experts, an untied head); llama's tied head trains in
# test_train_py_config_of_an_import_fine_tunes_from_its_weights. The rest run with -m slow.
@pytest.mark.parametrize("family", [
    pytest.param(f, marks=() if f == "qwen2_moe" else pytest.mark.slow) for f in FAMILIES])
def test_import_trains_and_exports_back_to_the_same_arrays(family, tmp_path):
  """One training step from the import (train.init_from), then export -> import: same arrays."""
  hf.import_checkpoint(os.path.join(FIXTURES, family), str(tmp_path / "run"))
  config = _train_config(tmp_path / "run")
  assert config.train.init_from == str(tmp_path / "run" / "export")
  config.data.seq_len, config.data.batch_size = 16, 8
  config.optim.warmup_steps = 0
  config_lib.validate(config)
  ts = state_lib.create_train_state(config)
  ckpt_lib.load_model_state(config.train.init_from, ts.state[0], ts.shardings[0])
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(ts.state[0]))
  step = state_lib.make_train_step(ts)
  ts.state, metrics = step(ts.state, state_lib.device_batch(next(synthetic_batches(config)),
                                                            ts.mesh))
  assert np.isfinite(float(metrics["loss"]))
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(ts.state[0]))
  assert not np.array_equal(after["embed"], before["embed"])
  ckpt_lib.export(str(tmp_path / "tuned"), ts.state[0], config)
  hf.export_checkpoint(str(tmp_path / "tuned"), str(tmp_path / "tuned_hf"))
  hf.import_checkpoint(str(tmp_path / "tuned_hf"), str(tmp_path / "again"))
  _, ms, _ = eval_run.load(str(tmp_path / "again" / "export"))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.to_pure_dict(ms.state)), after)


# Unscanned import and export: every family above. Scanned: Mixtral (every block the same,
# one scan) here, and a dense block before a scan of MoE blocks in
# test_scanned_and_unscanned_blocks_mix_both_ways; Qwen2-MoE's fixture with -m slow.
@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_scanned_layout_imports_and_exports(family, tmp_path):
  ref = _reference(family)
  config, model = _import(family, tmp_path / "run", scan_layers=True)
  assert config.model.scan_layers and not hasattr(model, "blocks")
  np.testing.assert_allclose(np.asarray(model(ref["tokens"])[0]), ref["logits"], rtol=0, atol=1e-4)
  hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
  src, out = _tensors(os.path.join(FIXTURES, family)), _tensors(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for name in src:
    np.testing.assert_array_equal(out[name], src[name], err_msg=name)


def test_sharded_checkpoints_write_an_index_and_read_back(tmp_path):
  hf_config, tensors = hf.read_checkpoint(os.path.join(FIXTURES, "mixtral"))
  files = hf.write_checkpoint(str(tmp_path / "sharded"), hf_config, tensors,
                              max_shard_bytes=100_000)
  assert hf.INDEX in files and sum(f.endswith(".safetensors") for f in files) > 2
  _, back = hf.read_checkpoint(str(tmp_path / "sharded"))
  assert sorted(back) == sorted(tensors)
  for name in tensors:
    np.testing.assert_array_equal(back[name], tensors[name])


def test_scanned_and_unscanned_blocks_mix_both_ways(tmp_path):
  """Three blocks, dense + MoE + MoE: scanned, block 0 runs alone and blocks 1-2 as one scan.
  Exported from the unscanned layout, imported into the scanned one (the variables that
  ``to_layout`` stacks from the original), exported from that: the same tensors."""
  from moejax.model import to_layout
  from lm_utils import tiny_config
  config = tiny_config(num_layers=3, sparse_ffn="moe", sparse_layers="1,2", num_kv_heads=1,
                       attention_bias="qkv")
  config.dense.update(gated=True, activation="silu")
  config.moe.update(num_experts=4, top_k=2, gated=True, activation="silu", renormalize=False,
                    dispatch="dropless", num_shared_experts=1, shared_gate=True)
  config_lib.validate(config)
  assert hf.family_of(config) == "qwen2_moe"
  ms = state_lib.create_model_state(config)
  ckpt_lib.export(str(tmp_path / "export"), ms.state, config)
  hf.export_checkpoint(str(tmp_path / "export"), str(tmp_path / "hf"))
  _, model = _import_dir(tmp_path / "hf", tmp_path / "run", scan_layers=True)
  assert [(start, repeats) for start, _, repeats in model.layout] == [(0, 1), (1, 2)]
  want = to_layout(jax.tree.map(np.asarray, nnx.to_pure_dict(ms.state)), config, scanned=True)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))),
                              jax.tree.map(np.asarray, want))
  hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "hf_again"))
  src, out = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf_again")
  assert sorted(src) == sorted(out)
  for name in src:
    np.testing.assert_array_equal(out[name], src[name], err_msg=name)


def _import_dir(hf_dir, workdir, **kw):
  config = hf.import_checkpoint(str(hf_dir), str(workdir), **kw)
  _, ms, _ = eval_run.load(os.path.join(str(workdir), "export"))
  return config, nnx.merge(ms.graphdef, ms.state)


# ------------------------------------------------------------------ special token ids


def _with_special_tokens(tmp_path, family="llama", *, bos=1, eos=2, pad=0, generation_eos=None):
  src = _copy_fixture(tmp_path, family)
  _edit_config(src, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
  if generation_eos is not None:
    gen = json.load(open(src / "generation_config.json"))
    gen.update(bos_token_id=bos, eos_token_id=generation_eos, pad_token_id=pad)
    json.dump(gen, open(src / "generation_config.json", "w"))
  return src


def test_special_token_ids_go_through_import_training_config_and_export(tmp_path):
  # generation_config.json's eos (two ids) wins over config.json's: transformers'
  # generate reads it first.
  src = _with_special_tokens(tmp_path, bos=1, eos=2, pad=0, generation_eos=[2, 7])
  config = hf.import_checkpoint(str(src), str(tmp_path / "run"))
  held = {"bos_token_id": (1,), "eos_token_id": (2, 7), "pad_token_id": (0,)}
  assert config.special_tokens.to_dict() == held
  saved = json.load(open(tmp_path / "run" / "export" / "config.json"))["special_tokens"]
  assert saved == {k: list(v) for k, v in held.items()}
  assert _train_config(tmp_path / "run").special_tokens.to_dict() == held
  files = hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
  assert hf.GENERATION_CONFIG in files
  want = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0}
  out_config = json.load(open(tmp_path / "out" / "config.json"))
  assert {k: out_config[k] for k in want} == want
  assert json.load(open(tmp_path / "out" / "generation_config.json")) == want
  again = hf.import_checkpoint(str(tmp_path / "out"), str(tmp_path / "again"))
  assert again.special_tokens.to_dict() == held
  # without generation_config.json: config.json's ids, kept as they are
  src2 = _with_special_tokens(tmp_path / "b", bos=5, eos=6, pad=None)
  os.remove(src2 / "generation_config.json")
  config2 = hf.import_checkpoint(str(src2), str(tmp_path / "run2"))
  assert config2.special_tokens.to_dict() == {"bos_token_id": (5,), "eos_token_id": (6,),
                                              "pad_token_id": ()}
  hf.export_checkpoint(str(tmp_path / "run2" / "export"), str(tmp_path / "out2"))
  out2 = json.load(open(tmp_path / "out2" / "config.json"))
  assert (out2["bos_token_id"], out2["eos_token_id"], out2["pad_token_id"]) == (5, 6, None)
  assert json.load(open(tmp_path / "out2" / "generation_config.json")) == {
      "bos_token_id": 5, "eos_token_id": 6}


def test_models_without_special_tokens_export_none(tmp_path):
  """Today's exports (no ids, or written before config.special_tokens existed) export as
  before: null ids in config.json, an empty generation_config.json."""
  hf.import_checkpoint(os.path.join(FIXTURES, "llama"), str(tmp_path / "run"))
  cfg = json.load(open(tmp_path / "run" / "export" / "config.json"))
  assert cfg.pop("special_tokens") == {"bos_token_id": [], "eos_token_id": [],
                                       "pad_token_id": []}
  json.dump(cfg, open(tmp_path / "run" / "export" / "config.json", "w"))   # an older export
  hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
  out = json.load(open(tmp_path / "out" / "config.json"))
  assert [out[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None] * 3
  assert json.load(open(tmp_path / "out" / "generation_config.json")) == {}


@pytest.mark.slow
def test_transformers_generate_stops_at_the_imported_eos(tmp_path):
  """With the ``compare`` extra: eos = the third greedy token of the fixture; transformers'
  generate on the export stops there, as moejax's generation given the config's eos."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ref = _reference("llama")
  eos = int(ref["greedy"][2])
  src = _with_special_tokens(tmp_path, bos=None, eos=eos, pad=0, generation_eos=eos)
  config, model = _import_dir(src, tmp_path / "run")
  assert config.special_tokens.eos_token_id == (eos,)
  mine = Generator(model).generate([ref["prompt"].tolist()], len(ref["greedy"]),
                                   temperature=0.0, eos_id=config.special_tokens.eos_token_id[0])
  np.testing.assert_array_equal(mine[0], ref["greedy"][:3])
  hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
  tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert tm.generation_config.eos_token_id == eos
  with torch.no_grad():
    out = tm.generate(torch.from_numpy(ref["prompt"][None]).long(),
                      max_new_tokens=len(ref["greedy"]), do_sample=False)
  np.testing.assert_array_equal(out[0, len(ref["prompt"]):].numpy(), ref["greedy"][:3])


# ------------------------------------------------------------------ memory: a tensor at a time


def test_import_reads_each_tensor_once_and_never_a_whole_file(tmp_path, monkeypatch):
  import safetensors.numpy
  def whole_file(*a, **k):
    raise AssertionError("a whole safetensors file was loaded at once")
  monkeypatch.setattr(safetensors.numpy, "load_file", whole_file)
  monkeypatch.setattr(safetensors.numpy, "load", whole_file)
  reads = []
  get = hf.Tensors.__getitem__
  monkeypatch.setattr(hf.Tensors, "__getitem__",
                      lambda self, name: reads.append(name) or get(self, name))
  _, tensors = hf.read_checkpoint(os.path.join(FIXTURES, "mixtral"))
  assert isinstance(tensors, hf.Tensors) and not reads       # headers only, so far
  assert tensors.shape("model.layers.1.self_attn.k_proj.weight") == (32, 64)
  config, model = _import("mixtral", tmp_path / "run")
  assert sorted(reads) == sorted(tensors)                   # each tensor read once
  ref = _reference("mixtral")
  np.testing.assert_allclose(np.asarray(model(ref["tokens"])[0]), ref["logits"], rtol=0, atol=1e-4)


def test_sharded_export_round_trips_through_the_cli(tmp_path, capsys):
  """--max_shard_size 100KB: shards of at most 100 KB of tensors (a larger tensor alone in
  its shard), an index naming each tensor's shard and the total size, and an import of the
  shards gives the fixture's tensors and the same model."""
  assert convert.main(["--from_hf", os.path.join(FIXTURES, "mixtral"),
                       "--workdir", str(tmp_path / "run")]) == 0
  assert convert.main(["--to_hf", str(tmp_path / "run" / "export"), str(tmp_path / "out"),
                       "--max_shard_size", "100KB"]) == 0
  assert "model.safetensors.index.json" in capsys.readouterr().out
  out = tmp_path / "out"
  index = json.load(open(out / hf.INDEX))
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
  assert not (out / hf.SINGLE).exists()
  src = _tensors(os.path.join(FIXTURES, "mixtral"))
  assert sorted(index["weight_map"]) == sorted(src)
  assert index["metadata"]["total_size"] == sum(int(x.nbytes) for x in src.values())
  for shard in shards:
    held = load_file(str(out / shard))
    assert sum(x.nbytes for x in held.values()) <= 100_000 or len(held) == 1
    assert all(index["weight_map"][name] == shard for name in held)
  _, back = hf.read_checkpoint(str(out))
  for name in src:
    np.testing.assert_array_equal(back[name], src[name], err_msg=name)
  assert convert.main(["--from_hf", str(out), "--workdir", str(tmp_path / "again")]) == 0
  _, a, _ = eval_run.load(str(tmp_path / "run" / "export"))
  _, b, _ = eval_run.load(str(tmp_path / "again" / "export"))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.to_pure_dict(b.state)),
                              jax.tree.map(np.asarray, nnx.to_pure_dict(a.state)))


@pytest.mark.parametrize("text,size", [("100000", 100_000), ("100KB", 100_000),
                                       ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30),
                                       ("1.5mb", 1_500_000)])
def test_shard_sizes_read_as_transformers_writes_them(text, size):
  assert hf.parse_size(text) == size


# ------------------------------------------------------------------ bad inputs: one line, exit 2


def _copy_fixture(tmp_path, family="mixtral"):
  dst = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, family), dst)
  return dst


def _edit_config(path, **fields):
  cfg = json.load(open(path / "config.json"))
  cfg.update(fields)
  json.dump(cfg, open(path / "config.json", "w"))


def _bad_shape(path):
  t = _tensors(path)
  t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:16]
  save_file(t, str(path / "model.safetensors"))


def _extra_tensor(path):
  t = _tensors(path)
  t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  save_file(t, str(path / "model.safetensors"))


def _shard(path):
  """The checkpoint in ``path`` rewritten in shards of 100 KB; returns the files."""
  _, tensors = hf.read_checkpoint(str(path))
  tensors = dict(tensors)
  cfg = json.load(open(path / "config.json"))
  shutil.rmtree(path)
  return hf.write_checkpoint(str(path), cfg, tensors, max_shard_bytes=100_000)


def _missing_shard(path):
  files = _shard(path)
  assert files[1].startswith("model-00002-of-")
  os.remove(path / files[1])


def _index_names_an_absent_tensor(path):
  files = _shard(path)
  index = json.load(open(path / hf.INDEX))
  index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = files[0]
  json.dump(index, open(path / hf.INDEX, "w"))


def _export(tmp_path):
  """A moejax export of the llama fixture (the input of the --to_hf cases)."""
  hf.import_checkpoint(os.path.join(FIXTURES, "llama"), str(tmp_path / "made"))
  return tmp_path / "made" / "export"


def _export_no_family_holds(tmp_path):
  export = _export(tmp_path)
  cfg = json.load(open(export / "config.json"))
  cfg["dense"]["activation"] = "gelu_tanh"
  json.dump(cfg, open(export / "config.json", "w"))
  return export


def _export_of_other_shapes(tmp_path):
  export = _export(tmp_path)
  cfg = json.load(open(export / "config.json"))
  cfg["model"]["d_ff"] = 128
  json.dump(cfg, open(export / "config.json", "w"))
  return export


# name: (how to break a copy of the mixtral fixture, what the one line names)
FROM_HF_CASES = {
    "no_directory": (lambda p: shutil.rmtree(p), "not a directory"),
    "not_a_checkpoint": (lambda p: os.remove(p / "config.json"), "no config.json"),
    "no_safetensors": (lambda p: os.remove(p / "model.safetensors"), "neither model.safetensors"),
    "bad_config_json": (lambda p: (p / "config.json").write_text("{oops"),
                        "config.json: not valid JSON"),
    "architecture": (lambda p: _edit_config(p, model_type="gpt2"), "model_type='gpt2'"),
    "activation": (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act='gelu'"),
    "rope_scaling": (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn",
                                                                "rope_theta": 1e6}),
                     "rope_type='yarn'"),
    "config_shape": (lambda p: _edit_config(p, num_local_experts=8),
                     "gate.weight: shape [4, 64], config.json implies [8, 64]"),
    "tensor_shape": (_bad_shape, "tensor model.layers.1.self_attn.k_proj.weight: shape [16, 64]"),
    "extra_tensor": (_extra_tensor, "tensor model.layers.0.mlp.extra.weight: has no place"),
    "missing_shard": (_missing_shard, "shard model-00002-of-"),
    "index_names_absent_tensor": (_index_names_an_absent_tensor,
                                  "tensor model.layers.0.self_attn.q_norm.weight: listed in"),
    "special_token": (lambda p: _edit_config(p, eos_token_id="</s>"), "eos_token_id='</s>'"),
    "damaged_safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"\0" * 64),
                            "model.safetensors: not readable as safetensors"),
    "workdir_is_a_file": (None, "--workdir="),
    "workdir_holds_export": (None, "export: exists and is not empty"),
    "workdir_holds_config_py": (None, "holds config.py already"),
}
# name: (make the EXPORT_DIR argument, what the one line names)
TO_HF_CASES = {
    "not_an_export": (lambda t: t / "ckpt", "not a moejax export"),
    "no_family_holds_it": (_export_no_family_holds, "config.dense.activation='gelu_tanh'"),
    "weights_unlike_config": (_export_of_other_shapes, "array blocks/0/ffn/wg is float32[64,96]"),
    "out_dir_holds_files": (_export, "OUT_DIR="),
    "shard_size": (_export, "--max_shard_size=0: '0' is not a size"),
}


def _snapshot(root):
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", [f"from_hf:{k}" for k in FROM_HF_CASES]
                         + [f"to_hf:{k}" for k in TO_HF_CASES])
def test_bad_inputs_are_one_line_exit_2_and_touch_nothing(case, tmp_path, capsys):
  """Each bad input: one ``error:`` line naming the tensor / field / file, exit code 2, and
  the output directory (which already holds someone's file) byte for byte as it was."""
  direction, name = case.split(":")
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("someone's file\n")
  src = _copy_fixture(tmp_path)
  if direction == "from_hf":
    breaks, expect = FROM_HF_CASES[name]
    argv = ["--from_hf", str(src), "--workdir", str(out)]
    if name == "workdir_is_a_file":
      argv[-1] = str(out / "notes.txt")
    elif name == "workdir_holds_export":
      (out / "export").mkdir()
      (out / "export" / "config.json").write_text("{}")
    elif name == "workdir_holds_config_py":
      (out / "config.py").write_text("# mine\n")
    else:
      breaks(src)
  else:
    make, expect = TO_HF_CASES[name]
    export = make(tmp_path)
    argv = ["--to_hf", str(export), str(out if name == "out_dir_holds_files" else out / "hf")]
    if name == "shard_size":
      argv += ["--max_shard_size", "0"]
  before = _snapshot(out)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    convert.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and expect in err, err
  assert _snapshot(out) == before
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_export(family, tmp_path):
  """With the ``compare`` extra: transformers reads what --to_hf writes (Mixtral in shards),
  same logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf.import_checkpoint(os.path.join(FIXTURES, family), str(tmp_path / "run"))
  shard = 100_000 if family == "mixtral" else hf.MAX_SHARD_BYTES     # one family in shards
  files = hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"),
                               max_shard_bytes=shard)
  assert (hf.INDEX in files) == (family == "mixtral")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  ref = _reference(family)
  with torch.no_grad():
    logits = model(torch.from_numpy(ref["tokens"]).long()).logits.numpy()
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)


def test_bfloat16_checkpoints_read_as_float32(tmp_path):
  import jax.numpy as jnp
  from safetensors.flax import save_file as save_jax
  src = _copy_fixture(tmp_path, "llama")
  f32 = _tensors(src)
  save_jax({k: jnp.asarray(v, jnp.bfloat16) for k, v in f32.items()},
           str(src / "model.safetensors"))
  _, back = hf.read_checkpoint(str(src))
  for name, x in f32.items():
    assert back[name].dtype == np.float32
    np.testing.assert_array_equal(back[name], np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32))


def test_train_py_config_of_an_import_fine_tunes_from_its_weights(tmp_path, text_dir):
  """OUT/config.py as train.py reads it: the run starts from the imported weights."""
  from moejax.training import loop
  hf.import_checkpoint(os.path.join(FIXTURES, "llama"), str(tmp_path / "run"))
  config = _train_config(tmp_path / "run")
  config.data.update(seq_len=16, batch_size=8, text_dir=text_dir, data_dir=str(tmp_path / "tfds"))
  config.train.update(steps=1, eval_batches=1, progress_bar=False)
  config.optim.update(lr=1e-9, warmup_steps=0, schedule="constant")
  loop.train(config, str(tmp_path / "tuned"))
  _, imported, _ = eval_run.load(str(tmp_path / "run" / "export"))
  _, tuned, _ = eval_run.load(str(tmp_path / "tuned" / "export"))
  chex.assert_trees_all_close(nnx.to_pure_dict(tuned.state), nnx.to_pure_dict(imported.state), atol=1e-6)
  # an init_from that is not an export: one line, nothing written
  config.train.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ckpt_lib.CheckpointError, match="train.init_from") as e:
    loop.train(config, str(tmp_path / "other"))
  assert "\n" not in str(e.value) and not (tmp_path / "other").exists()


def test_peer_models_export_to_moejax_layout_and_back(tmp_path):
  from lm_utils import tiny_config
  config = tiny_config(sparse_ffn="peer", sparse_layers="1")
  config.peer.update(num_experts_sqrt=8, heads=2, top_k=3, d_key=8)
  config_lib.validate(config)
  ms = state_lib.create_model_state(config)
  ckpt_lib.export(str(tmp_path / "export"), ms.state, config)
  hf.export_checkpoint(str(tmp_path / "export"), str(tmp_path / "out"))
  meta = json.load(open(tmp_path / "out" / "config.json"))
  assert meta["format"] == "moejax" and meta["moejax_config"]["model"]["sparse_ffn"] == "peer"
  tensors = _tensors(tmp_path / "out")
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(ms.state))
  np.testing.assert_array_equal(tensors["blocks.0.attn.wq"], pure["blocks"][0]["attn"]["wq"])
  assert any(name.startswith("blocks.1.ffn.") for name in tensors)
  hf.import_checkpoint(str(tmp_path / "out"), str(tmp_path / "again"))
  _, back, _ = eval_run.load(str(tmp_path / "again" / "export"))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.to_pure_dict(back.state)), pure)


def test_native_models_find_their_family_or_name_the_field():
  from lm_utils import tiny_config
  c = tiny_config(sparse_ffn="moe", sparse_layers="all")     # dense section unused: no matter
  c.moe.update(gated=True, activation="silu")
  assert hf.family_of(c) == "mixtral"
  c.moe.renormalize = False
  with pytest.raises(hf.InteropError, match=r"config\.moe\.renormalize=False"):
    hf.family_of(c)
  c.model.qk_norm = "full"
  assert hf.family_of(c) == "olmoe"
  c = tiny_config(sparse_ffn="moe", sparse_layers="1")
  c.moe.update(gated=True, activation="silu", num_shared_experts=1, shared_gate=True)
  with pytest.raises(hf.InteropError, match=r"config\.dense\.activation='gelu_tanh'"):
    hf.family_of(c)
  c.dense.update(gated=True, activation="silu")
  assert hf.family_of(c) == "qwen2_moe"
  assert hf.config_to_hf(c)["mlp_only_layers"] == [0]


def test_the_command_prints_only_its_lines_without_jax_platforms(tmp_path):
  """``python -m moejax.convert`` as a user's shell runs it (``JAX_PLATFORMS`` unset, libtpu
  installed, no TPU): an import writes nothing on stderr, and an export whose weights do not
  fit its config.json (found after JAX started) is the one ``error:`` line, exit 2."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  hf.import_checkpoint(os.path.join(FIXTURES, "llama"), str(tmp_path / "bad"))
  cfg = json.load(open(tmp_path / "bad" / "export" / "config.json"))
  cfg["model"]["d_ff"] = 128
  json.dump(cfg, open(tmp_path / "bad" / "export" / "config.json", "w"))
  runs = [["--from_hf", os.path.join(FIXTURES, "llama"), "--workdir", str(tmp_path / "good")],
          ["--to_hf", str(tmp_path / "bad" / "export"), str(tmp_path / "bad_hf")]]
  procs = [subprocess.Popen([sys.executable, "-m", "moejax.convert", *args], cwd=root, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for args in runs]
  (out, err), (_, bad_err) = [p.communicate(timeout=300) for p in procs]
  assert procs[0].returncode == 0 and err == "" and out.startswith("imported "), err
  lines = bad_err.strip().splitlines()
  assert procs[1].returncode == 2 and len(lines) == 1, bad_err
  assert lines[0].startswith("error: export ") and "ffn/wg" in lines[0] and "EXPORT_DIR" in lines[0]
  assert not (tmp_path / "bad_hf").exists()
