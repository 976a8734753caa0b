"""Config validation: one-line errors that name the field and the fix."""

import json

import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError


def _error(mutate) -> str:
  c = config_lib.default_config()
  mutate(c)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_default_is_valid():
  config_lib.validate(config_lib.default_config())


@pytest.mark.parametrize("mutate,field", [
    (lambda c: setattr(c.model, "num_heads", 0), "config.model.num_heads"),
    (lambda c: setattr(c.model, "ffn", "nope"), "config.model.ffn"),
    (lambda c: setattr(c.model, "sparse_layers", "every:0"), "config.model.sparse_layers"),
    (lambda c: setattr(c.model, "dtype", "float16"), "config.model.dtype"),
    (lambda c: setattr(c.model, "head_dim", 7), "config.model.head_dim"),
    (lambda c: setattr(c.optim, "lr", 0.0), "config.optim.lr"),
    (lambda c: setattr(c.optim, "schedule", "step"), "config.optim.schedule"),
    (lambda c: setattr(c.train, "steps", 0), "config.train.steps"),
    (lambda c: setattr(c.mesh, "expert", 0), "config.mesh.expert"),
    (lambda c: setattr(c.data, "seq_len", 1), "config.data.seq_len"),
    (lambda c: setattr(c.dense, "activation", "tanh"), "config.dense.activation"),
    (lambda c: setattr(c.special_tokens, "pad_token_id", (0, 1.5)),
     "config.special_tokens.pad_token_id"),
])
def test_bad_value_names_field(mutate, field):
  assert _error(mutate).startswith(field)


def test_unknown_field():
  def add(c):
    c.model.num_expert = 4
  message = _error(add)
  assert message.startswith("config.model.num_expert: unknown field")
  assert "did you mean config.moe.num_experts?" in message   # the nearest field, any section


def test_wrong_type_in_saved_config():
  with pytest.raises(ConfigError, match=r"^config.model.d_model='wide': must be int"):
    config_lib.from_dict({"model": {"d_model": "wide"}})


def test_round_trip_through_dict():
  c = config_lib.default_config()
  c.model.d_model = 64
  c.special_tokens.update(bos_token_id=(1,), eos_token_id=(2, 7))
  back = config_lib.validate(config_lib.from_dict(json.loads(json.dumps(c.to_dict()))))
  assert back.model.d_model == 64
  assert back.special_tokens.to_dict() == {"bos_token_id": (1,), "eos_token_id": (2, 7),
                                           "pad_token_id": ()}
  with pytest.raises(ConfigError):
    config_lib.from_dict({"model": {"width": 3}})


def test_mesh_rules_parse_exactly():
  assert config_lib.parse_rules("table_rows=,table_embed=model") == {"table_rows": None,
                                                                     "table_embed": "model"}
  assert config_lib.parse_rules("batch=data+expert") == {"batch": ("data", "expert")}


@pytest.mark.parametrize("spec,word", [("tabel_rows=model", "logical name"), ("table_rows=foo", "mesh axis")])
def test_bad_mesh_rules(spec, word):
  def bad(c):
    c.mesh.rules = spec
  message = _error(bad)
  assert message.startswith("config.mesh.rules=") and word in message


def test_every_shipped_config_validates():
  import glob
  import importlib.util
  import os
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  files = sorted(glob.glob(os.path.join(root, "*.py")))
  assert len(files) >= 10
  for path in files:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_lib.validate(module.get_config())


def test_default_run_trains_a_sparse_model():
  """``python train.py`` with no --config trains a sparse LM (PEER in the middle block), so
  that the main job and eval.py's expert plot show what the library is for; the dense base
  config stays dense (configs/dense_small.py and the other configs build on it)."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "default.py")
  spec = importlib.util.spec_from_file_location("default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  config_lib.validate(c)
  assert c.model.sparse_ffn == "peer"
  assert config_lib.parse_sparse_layers(c.model.sparse_layers, c.model.num_layers) == (2,)
  base = config_lib.default_config()
  assert base.model.ffn == base.model.sparse_ffn == "dense"
