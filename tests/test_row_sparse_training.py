"""Row-sparse (lazy Adam) table updates inside the real train step."""

import jax
import numpy as np
import pytest

from lm_utils import synthetic_batches, tiny_config, train_losses
from moejax.errors import ConfigError
from moejax.training import state as state_lib


def _config(kind="peer", n=16, update="row_sparse"):
  c = tiny_config()
  c.model.sparse_ffn, c.model.sparse_layers = kind, "1"
  if kind == "peer":
    c.peer.update(num_experts_sqrt=n, heads=2, top_k=4, d_key=16)
  else:
    c.pkm.update(num_keys_sqrt=n, heads=2, top_k=4, d_key=16)
  c.optim.update(table_update=update, warmup_steps=0, schedule="constant", grad_clip=0.0,
                 table_lr=0.05)
  return c


def _one_step(config):
  config.train.steps = 1
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  batch = next(synthetic_batches(config))
  ts.state, _ = step(ts.state, state_lib.device_batch(batch, ts.mesh))
  return ts.state[0]


@pytest.mark.parametrize("kind,clip", [("peer", 0.0), ("pkm", 0.0), ("peer", 0.05)])
def test_first_step_equals_dense_adam(kind, clip):
  """With clip=0.05 clipping is active: the global norm must include the table rows."""
  dense_config, sparse_config = _config(kind, update="dense"), _config(kind, update="row_sparse")
  dense_config.optim.grad_clip = sparse_config.optim.grad_clip = clip
  dense = _one_step(dense_config)
  sparse = _one_step(sparse_config)
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_untouched_rows_do_not_move_and_loss_falls():
  config = _config("peer", n=32)
  losses = train_losses(config, 12)
  assert losses[-1] < losses[0] - 0.5
  ts = state_lib.create_train_state(config)
  before = np.asarray(ts.state[0]["blocks"][1]["ffn"]["u"][...])
  step = state_lib.make_train_step(ts)
  batch = next(synthetic_batches(config))
  ts.state, _ = step(ts.state, state_lib.device_batch(batch, ts.mesh))
  after = np.asarray(ts.state[0]["blocks"][1]["ffn"]["u"][...])
  moved = np.any(after != before, axis=1)
  assert 0 < moved.sum() < moved.size          # only the retrieved rows changed
  mu = np.asarray(ts.state[2]["mu"]["blocks/1/ffn/u"][...])
  np.testing.assert_array_equal(np.any(mu != 0, axis=1), moved)


def test_data_parallel_equals_single_device():
  single = train_losses(_config(), 4)
  config = _config()
  config.mesh.data = 8
  np.testing.assert_allclose(train_losses(config, 4), single, rtol=2e-4)


def test_step_memory_does_not_grow_with_table_rows():
  """Compiled temporaries: dense Adam grows with N (a dense [N, d] gradient), lazy Adam not."""
  def temp_bytes(update, n):
    config = _config("peer", n=n, update=update)
    config.train.steps = 1
    ts = state_lib.create_train_state(config)
    batch = state_lib.device_batch(next(synthetic_batches(config)), ts.mesh)
    compiled = state_lib.make_train_step(ts).lower(ts.state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  dense_growth = temp_bytes("dense", 128) - temp_bytes("dense", 16)
  sparse_growth = temp_bytes("row_sparse", 128) - temp_bytes("row_sparse", 16)
  assert sparse_growth < 0.25 * dense_growth, (sparse_growth, dense_growth)


def test_sharded_tables_are_a_config_error():
  config = _config()
  config.mesh.update(data=2, expert=4)
  with pytest.raises(ConfigError, match="row_sparse"):
    state_lib.create_train_state(config)
