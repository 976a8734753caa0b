"""model.remat and model.scan_layers change memory and compile time, never the maths."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import synthetic_batches, tiny_config, train_losses
from moejax import config as config_lib
from moejax.errors import CheckpointError, ConfigError
from moejax.model import Transformer, plan_layout, to_layout
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib

# Small sparse sections so each model traces in seconds.
KINDS = {
    "dense": dict(),
    "moe": dict(sparse_ffn="moe", sparse_layers="every:2"),
    "peer": dict(sparse_ffn="peer", sparse_layers="middle"),
    "pkm": dict(sparse_ffn="pkm", sparse_layers="1,3"),
}


def _config(kind: str, **model):
  c = tiny_config(num_layers=5, **{**KINDS[kind], **model})
  c.moe.update(num_experts=4, group_size=0)
  c.peer.update(num_experts_sqrt=8, heads=2, top_k=2, d_key=16, query_norm="batch")
  c.pkm.update(num_keys_sqrt=8, heads=2, top_k=2, d_key=16, query_norm="batch")
  return config_lib.validate(c)


def _batch(config, seed=0):
  batch = next(synthetic_batches(config, seed))
  batch["weights"][0, -3:] = 0.0      # some padding
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _loss_and_grads(config):
  """Loss, grads (per-block layout) and updated batch stats of one train-mode forward."""
  model = Transformer(config, rngs=nnx.Rngs(params=0, router=1))
  batch = _batch(config)

  def loss_fn(model):
    loss_sum, weight_sum, auxes = state_lib.model_lm_loss(model, batch, batch["weights"] > 0)
    aux = sum((a.total_loss() for a in auxes.values()), jnp.zeros(()))
    return loss_sum / weight_sum + aux, {k: a.metrics for k, a in auxes.items()}

  (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  grads = nnx.to_pure_dict(grads)
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  if config.model.scan_layers:
    grads = to_layout(grads, config, scanned=False)
    stats = to_layout(stats, config, scanned=False) if stats else stats
  return loss, grads, stats, metrics


@functools.cache
def _plain(kind: str):
  """_loss_and_grads of the plain (unscanned, no remat) model: the reference of both tests below."""
  return _loss_and_grads(_config(kind))


def _close(a, b, rtol, atol):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


POLICIES = ("full", "save_dots", "save_named")


def _check_remat_equals_none(kind, policies):
  ref = _plain(kind)
  for policy in policies:
    got = _loss_and_grads(_config(kind, remat=policy))
    _close(got[0], ref[0], 1e-6, 1e-6)
    _close(got[1], ref[1], 1e-5, 1e-6)           # gradients
    _close(got[2], ref[2], 1e-6, 1e-6)           # BatchNorm running stats survive remat
    _close(got[3], ref[3], 1e-5, 1e-6)           # aux metrics


# Every policy on the dense trunk; one policy each on the sparse blocks here, the others
# scanned in test_scanned_equals_unscanned (moe full, peer save_named). All of them: -m slow.
@pytest.mark.parametrize("kind,policies", [("dense", POLICIES), ("moe", ("save_dots",)),
                                           ("peer", ("full",))])
def test_remat_equals_none(kind, policies):
  _check_remat_equals_none(kind, policies)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["moe", "peer"])
def test_every_remat_policy_equals_none(kind):
  _check_remat_equals_none(kind, POLICIES)


@pytest.mark.parametrize("kind,remat", [("dense", "none"), ("moe", "full"), ("peer", "save_named"),
                                        ("pkm", "none")])
def test_scanned_equals_unscanned(kind, remat):
  ref = _plain(kind)
  got = _loss_and_grads(_config(kind, scan_layers=True, remat=remat))
  assert list(got[3]) == list(ref[3])             # aux records keep per-block names, in order
  _close(got[0], ref[0], 1e-5, 1e-6)
  _close(got[1], ref[1], 1e-4, 2e-6)
  _close(got[2], ref[2], 1e-5, 1e-6)
  _close(got[3], ref[3], 1e-4, 1e-6)


def test_layout_plans():
  d, s = "dense", "peer"
  assert plan_layout([d] * 6) == [(0, 1, 6)]
  assert plan_layout([d] * 3 + [s] + [d] * 2) == [(0, 1, 3), (3, 1, 1), (4, 1, 2)]
  assert plan_layout([s, d] * 3) == [(0, 2, 3)]
  assert plan_layout([s, d, d] * 2 + [s]) == [(0, 3, 2), (6, 1, 1)]
  assert plan_layout([d, s, d, s, d]) == [(0, 2, 2), (4, 1, 1)]
  assert plan_layout([d] * 4, [True, True, False, True]) == [(0, 1, 2), (2, 1, 1), (3, 1, 1)]
  model = nnx.eval_shape(lambda: Transformer(_config("dense", scan_layers=True), rngs=nnx.Rngs(0)))
  wq = model.segments[0].blocks[0].attn.wq
  assert wq.shape[0] == 5 and wq.get_metadata()["out_sharding"][0] == "layers"


def test_layout_conversion_round_trip():
  config = _config("moe", scan_layers=True)
  scanned = nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(0))))
  flat = nnx.to_pure_dict(nnx.state(Transformer(_config("moe"), rngs=nnx.Rngs(0))))
  _close(to_layout(scanned, config, scanned=False), flat, 0, 0)
  _close(to_layout(flat, config, scanned=True), scanned, 0, 0)
  # consume: the same stacked tree, on the host from host arrays; the stacked blocks'
  # arrays leave the input (what stays is shared with the output: blocks not stacked)
  host = jax.tree.map(np.asarray, flat)
  before = len(jax.tree.leaves(host["blocks"]))
  got = to_layout(host, config, scanned=True, consume=True)
  _close(got, scanned, 0, 0)
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(got))
  left, out = jax.tree.leaves(host["blocks"]), jax.tree.leaves(got)
  assert len(left) < before and all(any(a is b for b in out) for a in left)


def test_train_steps_equal_across_layouts_remat_and_loss_chunk():
  """Sharded training: scanned + remat + chunked loss == the plain model, step by step."""
  def config(**model):
    c = _config("moe", **model)
    c.mesh.update(data=4, model=2)
    return c
  ref = train_losses(config(), 4)
  got = train_losses(config(scan_layers=True, remat="save_dots", loss_chunk=40), 4)
  np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_row_sparse_tables_run_unscanned_and_survive_remat():
  def config(**model):
    c = _config("peer", sparse_layers="every:2", **model)
    c.optim.table_update = "row_sparse"
    return c
  # remat must keep the RowIndex a PEER layer writes and the RowDelta gradients.
  scanned = config(scan_layers=True, remat="full")
  model = nnx.eval_shape(lambda: Transformer(scanned, rngs=nnx.Rngs(0)))
  # PEER blocks (0, 2, 4) are not stacked: the dense ones between them are single too.
  assert list(model.layout) == [(i, 1, 1) for i in range(5)]
  np.testing.assert_allclose(train_losses(scanned, 3), train_losses(config(), 3), rtol=2e-4)

  c = config(scan_layers=True)
  c.model.sparse_layers = "middle"
  model = nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0)))
  assert model.layout == ((0, 1, 2), (2, 1, 1), (3, 1, 2))


def test_config_errors_are_one_line():
  for field, value in (("remat", "some"), ("remat_names", "attn_out,nope"), ("loss_chunk", -1)):
    c = tiny_config()
    c.model[field] = value
    with pytest.raises(ConfigError, match=rf"^config\.model\.{field}=.*\(.*\)$"):
      config_lib.validate(c)


def test_scanned_checkpoint_export_and_eval(tmp_path):
  """Train 2 steps scanned, checkpoint, export; the layout is checked on resume and the
  export evaluates (the eval step builds the scanned model from the export's config)."""
  config = _config("peer", scan_layers=True, remat="full", loss_chunk=64)
  config.train.steps = 2
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  for _, b in zip(range(2), synthetic_batches(config)):
    ts.state, _ = step(ts.state, state_lib.device_batch(b, ts.mesh))
  ckptr = ckpt_lib.Checkpointer(str(tmp_path / "wd"), keep=1, async_save=False)
  ckptr.save(2, ts.state, {"pos": 0}, force=True)
  ckptr.wait()
  ckpt_lib.export(str(tmp_path / "export"), ts.model_state(), config)

  saved = json.load(open(tmp_path / "export" / "config.json"))
  assert saved["model"]["scan_layers"] is True
  # remat / loss_chunk may change on resume; the layout may not.
  changed = config_lib.from_dict(saved)
  changed.model.update(remat="none", loss_chunk=0)
  ckpt_lib.check_compatible(saved, changed, "x")
  changed.model.scan_layers = False
  with pytest.raises(CheckpointError, match="scan_layers=True"):
    ckpt_lib.check_compatible(saved, changed, "x")
  # Configs saved before the field existed were unscanned.
  old = dict(saved, model={k: v for k, v in saved["model"].items() if k != "scan_layers"})
  with pytest.raises(CheckpointError, match="scan_layers=False"):
    ckpt_lib.check_compatible(old, config, "x")

  # Resume restores the stacked state.
  ts2 = state_lib.create_train_state(config)
  restored, _ = ckptr.restore(ts2.state, ts2.shardings)
  chex.assert_trees_all_close(nnx.to_pure_dict(restored), nnx.to_pure_dict(ts.state))
  ckptr.close()

  # eval.py's loader builds the scanned model from the export's config and loads it; the
  # same variables converted to the per-block layout evaluate to the same numbers.
  from moejax.evaluation import run
  loaded, ms, _ = run.load(str(tmp_path / "export"))
  assert loaded.model.scan_layers and "segments" in ms.state
  eval_step = state_lib.make_eval_step(ms.graphdef, ms.shardings, ms.mesh, ms.rules)
  batch = state_lib.device_batch(next(synthetic_batches(config, seed=5)), ms.mesh)
  scanned = eval_step(ms.state, batch)

  flat_cfg = config_lib.from_dict(loaded.to_dict())
  flat_cfg.model.update(scan_layers=False, loss_chunk=0)
  flat = state_lib.create_model_state(flat_cfg)
  nnx.replace_by_pure_dict(flat.state, to_layout(nnx.to_pure_dict(ms.state), loaded, scanned=False))
  unscanned = state_lib.make_eval_step(flat.graphdef, flat.shardings, flat.mesh, flat.rules)(
      flat.state, batch)
  np.testing.assert_allclose(scanned["loss_sum"], unscanned["loss_sum"], rtol=1e-5)
  chex.assert_trees_all_close(scanned["counts"], unscanned["counts"], rtol=1e-5, atol=1e-6)
