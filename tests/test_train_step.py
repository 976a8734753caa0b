"""Train step: sharded == single device, optimizer groups, loss falls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import tiny_config, train_losses
from moejax.layers.base import TableParam
from moejax.training.optimizer import make_optimizer


def test_loss_falls():
  losses = train_losses(tiny_config(), 25)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


@functools.cache
def _single_device_losses():
  return tuple(train_losses(tiny_config(), 6))


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, expert=2, model=2), dict(data=4, model=2)])
def test_sharded_equals_single_device(mesh):
  single = _single_device_losses()        # computed once for the three meshes
  config = tiny_config()
  config.mesh.update(mesh)
  sharded = train_losses(config, 6)
  np.testing.assert_allclose(sharded, single, rtol=2e-4)


class _Tiny(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((2, 2)))
    self.scale = nnx.Param(jnp.ones((2,)))
    self.table = TableParam(jnp.ones((4, 2)))


def test_table_group_has_own_lr_and_no_weight_decay():
  config = tiny_config()
  config.optim.update(name="sgd", lr=0.1, table_lr=1.0, warmup_steps=0, schedule="constant",
                      grad_clip=0.0)
  model = _Tiny()
  opt = make_optimizer(config, model)
  grads = nnx.grad(lambda m: m.w[...].sum() + m.scale[...].sum() + m.table[...].sum())(model)
  opt.update(model, grads)
  np.testing.assert_allclose(model.w[...], 0.9)
  np.testing.assert_allclose(model.table[...], 0.0)

  config.optim.update(name="adamw", lr=0.1, table_lr=0.0, weight_decay=0.5)
  model = _Tiny()
  opt = make_optimizer(config, model)
  zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  opt.update(model, zero)
  np.testing.assert_allclose(model.w[...], 1 - 0.1 * 0.5)       # matrices decay
  np.testing.assert_allclose(model.scale[...], 1.0)             # vectors do not
  np.testing.assert_allclose(model.table[...], 1.0)             # tables do not


def test_warmup_then_cosine():
  from moejax.training.optimizer import learning_rate
  config = tiny_config()
  config.optim.update(warmup_steps=10, min_lr_ratio=0.1)
  sched = learning_rate(config.optim, 1.0, 110)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(110)) == pytest.approx(0.1, abs=1e-3)


def test_no_weight_decay_on_norms_of_sparse_layers():
  """PEER's query-norm scale/bias are [heads, d_key]: rank 2, still not decayed."""
  config = tiny_config()
  config.model.update(sparse_ffn="peer", sparse_layers="1")
  config.peer.update(num_experts_sqrt=8, heads=2, top_k=2, d_key=8)
  config.optim.update(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant", grad_clip=0.0)
  from moejax.model import Transformer
  model = Transformer(config, rngs=nnx.Rngs(0))
  opt = make_optimizer(config, model)
  norm = model.blocks[1].ffn.retrieval.norm
  before = np.asarray(norm.scale[...]).copy()
  assert before.ndim == 2
  query_before = np.asarray(model.blocks[1].ffn.retrieval.query[...]).copy()
  opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(norm.scale[...], before)
  np.testing.assert_allclose(model.blocks[1].ffn.retrieval.query[...], query_before * (1 - 0.05), rtol=1e-6)
