"""Checkpoints: round trip, resharding on another mesh, mismatch errors, export."""

import jax
import numpy as np
import pytest

from lm_utils import synthetic_batches, tiny_config
from moejax.errors import CheckpointError
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib


def _trained(config, steps=3):
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  for _, b in zip(range(steps), synthetic_batches(config)):
    ts.state, _ = step(ts.state, state_lib.device_batch(b, ts.mesh))
  return ts


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_round_trip_onto_another_mesh(tmp_path):
  config = tiny_config()
  ts = _trained(config)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(ts.step, ts.state, {"position": 7})
  ckpt.wait()

  other = tiny_config()
  other.mesh.update(data=2, expert=2, model=2)
  fresh = state_lib.create_train_state(other)
  restored, data_state = ckpt.restore(fresh.state, fresh.shardings)
  assert data_state == {"position": 7}
  assert int(restored[1]["step"][...]) == 3
  for a, b in zip(_leaves(restored), _leaves(ts.state)):
    np.testing.assert_array_equal(a, b)
  wi = restored[0]["blocks"][0]["ffn"]["wi"][...]
  assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  ckpt.close()


def test_keep_n(tmp_path):
  config = tiny_config()
  ts = state_lib.create_train_state(config)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  for s in (1, 2, 3):
    ckpt.save(s, ts.state, {})
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 3]
  ckpt.close()


def test_mismatched_model_is_a_clear_error(tmp_path):
  ts = state_lib.create_train_state(tiny_config())
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, ts.state, {})
  ckpt.wait()
  wider = tiny_config(d_model=48)
  other = state_lib.create_train_state(wider)
  with pytest.raises(CheckpointError, match="does not match this model"):
    ckpt.restore(other.state, other.shardings)
  assert ckpt.manager.all_steps() == [1]   # nothing lost
  ckpt.close()
  with pytest.raises(CheckpointError, match="config.model.d_model=32"):
    ckpt_lib.check_compatible(tiny_config().to_dict(), wider, "workdir")


def test_a_saved_config_read_back_has_no_changes():
  """Tuple fields come back from config.json as lists: not a change when resuming."""
  import json
  config = tiny_config()
  config.special_tokens.update(eos_token_id=(2, 7), bos_token_id=(1,))
  saved = json.loads(json.dumps(config.to_dict()))
  assert saved["special_tokens"]["eos_token_id"] == [2, 7]
  assert ckpt_lib.config_changes(saved, config) == []
  config.special_tokens.eos_token_id = (2,)
  assert ckpt_lib.config_changes(saved, config) == [("special_tokens.eos_token_id", (2, 7), (2,))]


def test_export_and_load(tmp_path):
  config = tiny_config()
  ts = _trained(config)
  ckpt_lib.export(str(tmp_path / "export"), ts.state[0], config)
  loaded_config = ckpt_lib.read_config(str(tmp_path / "export"))
  assert loaded_config.model.d_model == config.model.d_model
  loaded_config.mesh.update(data=8)
  fresh = state_lib.create_train_state(loaded_config)
  ckpt_lib.load_model_state(str(tmp_path / "export"), fresh.state[0], fresh.shardings[0])
  for a, b in zip(_leaves(fresh.state[0]), _leaves(ts.state[0])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(CheckpointError):
    ckpt_lib.read_config(str(tmp_path))


def test_export_records_its_step(tmp_path):
  from moejax.evaluation import run
  config = tiny_config()
  ts = _trained(config, steps=2)
  new, old = str(tmp_path / "new"), str(tmp_path / "old")
  ckpt_lib.export(new, ts.state[0], config, step=ts.step)
  assert ckpt_lib.read_export_step(new) == 2
  assert run.load(new)[2] == 2
  # An export written before exports recorded their step still loads, with step None.
  ckpt_lib.export(old, ts.state[0], config)
  assert not (tmp_path / "old" / "step.json").exists()
  assert ckpt_lib.read_export_step(old) is None
  assert run.load(old)[2] is None
