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
  assert files == ["model.safetensors", "config.json"]
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


def test_scanned_layout_imports_and_exports(tmp_path):
  ref = _reference("mixtral")
  config, model = _import("mixtral", tmp_path / "run", scan_layers=True)
  assert config.model.scan_layers and not hasattr(model, "blocks")
  np.testing.assert_allclose(np.asarray(model(ref["tokens"])[0]), ref["logits"], rtol=0, atol=1e-4)
  hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
  src, out = _tensors(os.path.join(FIXTURES, "mixtral")), _tensors(tmp_path / "out")
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


def _missing_shard(path):
  _, tensors = hf.read_checkpoint(str(path))
  cfg = json.load(open(path / "config.json"))
  shutil.rmtree(path)
  files = hf.write_checkpoint(str(path), cfg, tensors, max_shard_bytes=100_000)
  assert files[1].startswith("model-00002-of-")
  os.remove(path / files[1])


@pytest.mark.parametrize("breaks,expect", [
    (lambda p: shutil.rmtree(p), "not a directory"),
    (lambda p: os.remove(p / "config.json"), "no config.json"),
    (lambda p: os.remove(p / "model.safetensors"), "neither model.safetensors"),
    (lambda p: _edit_config(p, model_type="gpt2"), "model_type='gpt2'"),
    (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}),
     "rope_type='yarn'"),
    (lambda p: _edit_config(p, num_local_experts=8),
     "gate.weight: shape [4, 64], config.json implies [8, 64]"),
    (_bad_shape, "tensor model.layers.1.self_attn.k_proj.weight: shape [16, 64]"),
    (_extra_tensor, "tensor model.layers.0.mlp.extra.weight: has no place"),
    (_missing_shard, "shard model-00002-of-"),
])
def test_bad_checkpoints_are_one_line_and_write_nothing(breaks, expect, tmp_path, capsys):
  src = _copy_fixture(tmp_path)
  breaks(src)
  with pytest.raises(SystemExit) as e:
    convert.main(["--from_hf", str(src), "--workdir", str(tmp_path / "out")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and expect in err, err
  assert not (tmp_path / "out").exists()


def test_export_refuses_what_no_family_holds_and_existing_outputs(tmp_path, capsys):
  hf.import_checkpoint(os.path.join(FIXTURES, "llama"), str(tmp_path / "run"))
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    convert.main(["--to_hf", str(tmp_path / "run" / "export"), str(tmp_path / "taken")])
  assert e.value.code == 2 and "exists and is not empty" in capsys.readouterr().err
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]
  cfg = json.load(open(tmp_path / "run" / "export" / "config.json"))
  cfg["dense"]["activation"] = "gelu_tanh"
  json.dump(cfg, open(tmp_path / "run" / "export" / "config.json", "w"))
  with pytest.raises(SystemExit):
    convert.main(["--to_hf", str(tmp_path / "run" / "export"), str(tmp_path / "new")])
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: config.dense.activation='gelu_tanh'") and "\n" not in err
  assert not (tmp_path / "new").exists()
  with pytest.raises(SystemExit):       # importing over an existing export
    convert.main(["--from_hf", os.path.join(FIXTURES, "llama"), "--workdir", str(tmp_path / "run")])
  assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_export(family, tmp_path):
  """With the ``compare`` extra: transformers reads what --to_hf writes, same logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf.import_checkpoint(os.path.join(FIXTURES, family), str(tmp_path / "run"))
  hf.export_checkpoint(str(tmp_path / "run" / "export"), str(tmp_path / "out"))
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
