"""attention_core.masked_attention (CPU attention, hand-written backward) and the CPU rotary
backward compute jax.nn.dot_product_attention's / autodiff's function and gradients, and
the Attention layer is the same function on the CPU and the TPU/GPU program."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moejax import kernels
from moejax.layers import attention, attention_core


def _qkv(b=2, l=9, h=3, d=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v, dout = (jax.random.normal(kk, (b, l, h, d)) * 2 for kk in ks)
  return q, k, v, dout


@pytest.mark.parametrize("segments", [False, True])
def test_masked_attention_equals_dot_product_attention(segments):
  q, k, v, dout = _qkv()
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9]) if segments else None
  mask = attention_core.causal_mask(q.shape[1], seg)
  got, got_vjp = jax.vjp(lambda q, k, v: attention_core.masked_attention(q, k, v, mask), q, k, v)
  want, want_vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
                           q, k, v)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(got_vjp(dout), want_vjp(dout), atol=1e-5, rtol=1e-5)


def test_causal_mask_keeps_documents_apart():
  seg = jnp.array([[0, 0, 1, 1]])
  mask = attention_core.causal_mask(4, seg)[0, 0]
  want = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
  chex.assert_trees_all_equal(mask, want)


def test_cpu_rotary_backward_equals_autodiff():
  x = jax.random.normal(jax.random.key(3), (2, 5, 3, 8))
  pos = jnp.arange(5)[None].repeat(2, 0) + jnp.array([[0], [7]])
  ct = jax.random.normal(jax.random.key(4), x.shape)
  with kernels.target_platform("cpu"):
    got, got_vjp = jax.vjp(lambda x: attention.rotary(x, pos, 1e4), x)
  with kernels.target_platform("tpu"):   # plain autodiff through split / concatenate
    want, want_vjp = jax.vjp(lambda x: attention.rotary(x, pos, 1e4), x)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  chex.assert_trees_all_close(got_vjp(ct), want_vjp(ct), atol=1e-5, rtol=1e-5)


def test_attention_layer_same_on_cpu_and_tpu_programs():
  layer = attention.Attention(8, 2, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, 8))
  pos = jnp.arange(6)[None].repeat(2, 0)
  seg = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])

  def loss(layer, x):
    return jnp.sum(jnp.sin(layer(x, pos, seg)))

  results = {}
  for platform in ("cpu", "tpu"):
    with kernels.target_platform(platform):
      results[platform] = nnx.grad(loss, argnums=(0, 1))(layer, x), loss(layer, x)
  (g_cpu, gx_cpu), l_cpu = results["cpu"]
  (g_tpu, gx_tpu), l_tpu = results["tpu"]
  chex.assert_trees_all_close(l_cpu, l_tpu, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(gx_cpu, gx_tpu, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(nnx.state(g_cpu), nnx.state(g_tpu), atol=1e-5, rtol=1e-5)
