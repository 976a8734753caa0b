"""The chunked vocabulary loss: equal to the plain loss and its gradients, without full logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import tiny_config
from moejax import sharding
from moejax.layers import vocab_loss as vl
from moejax.model import Transformer
from moejax.training import state as state_lib


def _inputs(b=4, l=24, d=16, v=97, dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, l, d)).astype(dtype)
  w = (jax.random.normal(k[1], (d, v)) * 0.5).astype(dtype)
  t = jax.random.randint(k[2], (b, l), 0, v)
  wt = (jax.random.uniform(k[3], (b, l)) > 0.25).astype(jnp.float32)
  return x, w, t, wt


@pytest.mark.parametrize("chunk_tokens", [4, 40, 96, 10_000])   # 1, 10 (padded), 24, all positions
def test_equals_plain_loss_and_grads(chunk_tokens):
  x, w, t, wt = _inputs()
  plain = lambda x, w: vl.plain_cross_entropy(x, w, t, wt)
  chunked = lambda x, w: vl.chunked_cross_entropy(x, w, t, wt, chunk_tokens=chunk_tokens)
  chex.assert_trees_all_close(jax.jit(chunked)(x, w), plain(x, w), rtol=1e-6)
  g_ref = jax.grad(plain, (0, 1))(x, w)
  g = jax.jit(jax.grad(chunked, (0, 1)))(x, w)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)
  # A cotangent other than 1 (e.g. 1 / weight sum) scales the gradients.
  g2 = jax.grad(lambda x, w: 0.25 * chunked(x, w), (0, 1))(x, w)
  chex.assert_trees_all_close(g2, jax.tree.map(lambda a: 0.25 * a, g_ref), rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_close_to_float32():
  x, w, t, wt = _inputs()
  ref = vl.plain_cross_entropy(x, w, t, wt)
  got = vl.chunked_cross_entropy(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), t, wt,
                                 chunk_tokens=32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=2e-2)
  gx, gw = jax.grad(lambda x, w: vl.chunked_cross_entropy(x, w, t, wt, chunk_tokens=32), (0, 1))(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert gx.dtype == gw.dtype == jnp.bfloat16


def test_sharded_vocab_and_batch():
  """Batch over (data, expert), vocab over model: same numbers as unsharded."""
  x, w, t, wt = _inputs(b=8, v=96)
  mesh = sharding.make_mesh(data=4, expert=1, model=2)
  rules = sharding.logical_rules()

  def f(x, w):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
      return vl.chunked_cross_entropy(x, w, t, wt, chunk_tokens=64)

  from jax.sharding import NamedSharding, PartitionSpec as P
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
  ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
  got = jax.jit(jax.value_and_grad(f, (0, 1)))(xs, ws)
  ref = jax.value_and_grad(lambda x, w: vl.plain_cross_entropy(x, w, t, wt), (0, 1))(x, w)
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)


def test_never_holds_full_logits():
  """Compiled temporaries of loss + grads: the plain loss holds [b, l, v] f32 (twice); the
  chunked one holds a chunk's."""
  b, l, d, v = 8, 256, 64, 4096
  x, w, t, wt = _inputs(b, l, d, v)
  full_logits = b * l * v * 4                                     # 32 MiB

  def temp(loss):
    c = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile()
    return c.memory_analysis().temp_size_in_bytes

  plain = temp(lambda x, w: vl.plain_cross_entropy(x, w, t, wt))
  chunked = temp(lambda x, w: vl.chunked_cross_entropy(x, w, t, wt, chunk_tokens=256))
  assert plain >= full_logits
  assert chunked < full_logits / 3 and chunked < plain / 6, (chunked, plain)   # 9.4 vs 67 MB


def test_model_loss_path_equals_logits_path():
  """model_lm_loss with model.loss_chunk == the plain loss of the model's logits."""
  config = tiny_config()
  batch = {"inputs": jnp.arange(8 * 16).reshape(8, 16) % 32,
           "targets": (jnp.arange(8 * 16).reshape(8, 16) * 7 + 3) % 32,
           "weights": jnp.ones((8, 16)).at[0, -4:].set(0)}
  mask = batch["weights"] > 0

  def loss_and_grads(chunk):
    config.model.loss_chunk = chunk
    model = Transformer(config, rngs=nnx.Rngs(0))
    f = lambda m: state_lib.model_lm_loss(m, batch, mask)[0]
    return nnx.value_and_grad(f)(model)

  ref_loss, ref_g = loss_and_grads(0)
  loss, g = loss_and_grads(24)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  # loss is a sum over ~120 tokens: gradients are O(10), float32 rounding O(1e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(g), nnx.to_pure_dict(ref_g), rtol=1e-5, atol=1e-5)
