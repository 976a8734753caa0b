"""Checkpoint resharding of MoE and PEER models (experts / tables on other mesh axes)."""

import jax
import numpy as np
import pytest

from lm_utils import synthetic_batches, tiny_config
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib


def _config(kind):
  # One block: resharding is per array, a second block would only add to each compile.
  c = tiny_config(num_layers=1, sparse_ffn=kind, sparse_layers="all")
  if kind == "moe":
    c.moe.update(dict(num_experts=4, top_k=2, dispatch="dropless"))
  else:
    c.peer.update(dict(num_experts_sqrt=8, heads=2, top_k=3, d_key=8))
  return c


@pytest.mark.parametrize("kind", ["moe", "peer"])
def test_sparse_round_trip_onto_another_mesh(tmp_path, kind):
  config = _config(kind)
  config.mesh.update(data=8, expert=1, model=1)
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  for _, b in zip(range(2), synthetic_batches(config)):
    ts.state, _ = step(ts.state, state_lib.device_batch(b, ts.mesh))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(ts.step, ts.state, {"position": 1})
  ckpt.wait()

  other = _config(kind)
  other.mesh.update(data=2, expert=2, model=2)
  fresh = state_lib.create_train_state(other)
  restored, _ = ckpt.restore(fresh.state, fresh.shardings)
  ckpt.close()
  want = jax.tree.leaves(ts.state)
  got = jax.tree.leaves(restored)
  assert len(want) == len(got)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ffn = restored[0]["blocks"][0]["ffn"]
  if kind == "moe":
    spec = ffn["experts"]["wi"][...].sharding.spec
    assert spec[0] == "expert", spec                  # experts split over 'expert' now
  else:
    spec = ffn["u"][...].sharding.spec
    assert spec[0] == "expert", spec                  # table rows split over 'expert' (default rule)
  # really split now: each device holds half the experts / table rows (before: all of them)
  table = ffn["experts"]["wi"][...] if kind == "moe" else ffn["u"][...]
  assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 2
  old = ts.state[0]["blocks"][0]["ffn"]
  old = old["experts"]["wi"][...] if kind == "moe" else old["u"][...]
  assert old.addressable_shards[0].data.shape[0] == old.shape[0]
  # and the restored state trains on the new mesh
  step2 = state_lib.make_train_step(fresh)
  batch = next(synthetic_batches(other))
  _, metrics = step2(restored, state_lib.device_batch(batch, fresh.mesh))
  assert np.isfinite(float(metrics["loss"]))
