"""CPU attention. attention_reference.masked_attention (XLA, hand-written backward) and the
CPU rotary backward compute jax.nn.dot_product_attention's / autodiff's function and
gradients; the C++ kernel (cpu_kernels.attention, cpu_attention.cc) equals that reference
with and without rotary positions, for causal, document and arbitrary masks, lengths and
head sizes off its tile sizes, and queries that see no key; the Attention layer is the
same function on the CPU and the TPU/GPU program."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import kernels
from moejax.backends.cpu import native as cpu_kernels
from moejax.backends.cpu import attention_xla as attention_reference
from moejax.kernels import reference, rotary
from moejax.layers import attention


def _qkv(b=2, l=9, h=3, d=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v, dout = (jax.random.normal(kk, (b, l, h, d)) * 2 for kk in ks)
  return q, k, v, dout


@pytest.mark.parametrize("segments", [False, True])
def test_masked_attention_equals_dot_product_attention(segments):
  q, k, v, dout = _qkv()
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9]) if segments else None
  mask = attention_reference.causal_mask(q.shape[1], seg)
  got, got_vjp = jax.vjp(lambda q, k, v: attention_reference.masked_attention(q, k, v, mask),
                         q, k, v)
  want, want_vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
                           q, k, v)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(got_vjp(dout), want_vjp(dout), atol=1e-5, rtol=1e-5)


def test_causal_mask_keeps_documents_apart():
  seg = jnp.array([[0, 0, 1, 1]])
  mask = attention_reference.causal_mask(4, seg)[0, 0]
  want = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
  chex.assert_trees_all_equal(mask, want)


def test_cpu_rotary_backward_equals_autodiff():
  x = jax.random.normal(jax.random.key(3), (2, 5, 3, 8))
  pos = jnp.arange(5)[None].repeat(2, 0) + jnp.array([[0], [7]])
  ct = jax.random.normal(jax.random.key(4), x.shape)
  sin, cos = attention.rope_angles(pos, 1e4, x.shape[-1])
  got, got_vjp = jax.vjp(lambda x: rotary.rotate_heads(x, sin, cos), x)
  # plain autodiff through split / concatenate (the layer's portable rotary)
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


def _kernel_case(b, lq, lk, h, d, seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, do = (jax.random.normal(kk, (b, lq, h, d)) for kk in ks[:2])
  k, v = (jax.random.normal(kk, (b, lk, h, d)) for kk in ks[2:])
  return q, k, v, do


def _check_kernel(q, k, v, do, mask, sin=None, cos=None):
  assert cpu_kernels.attention_usable(q, k, v, mask, sin, cos)
  text = jax.jit(lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(
      cpu_kernels.attention(q, k, v, mask, sin, cos) * do), argnums=(0, 1, 2))(q, k, v)
                 ).lower(q, k, v).as_text()
  assert cpu_kernels.ATTENTION_FWD in text and cpu_kernels.ATTENTION_BWD in text
  got, got_vjp = jax.vjp(lambda q, k, v: cpu_kernels.attention(q, k, v, mask, sin, cos), q, k, v)
  want, want_vjp = jax.vjp(lambda q, k, v: attention_reference.attention(q, k, v, mask, sin, cos),
                           q, k, v)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(got_vjp(do), want_vjp(do), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("b,l,h,d,segments,rope", [
    (2, 128, 4, 32, False, True),   # the default config's shape: whole query blocks, 2 column tiles
    (2, 128, 4, 32, False, False),
    (3, 45, 2, 16, True, True),     # a partial last block of queries, one column tile
    (1, 70, 3, 24, True, False),    # head_dim off the 16-column tile (its scalar tail)
    (2, 9, 1, 6, False, True),      # smaller than one tile
])
def test_kernel_equals_reference(b, l, h, d, segments, rope):
  q, k, v, do = _kernel_case(b, l, l, h, d, seed=l)
  seg = jnp.sort(jax.random.randint(jax.random.key(1), (b, l), 0, 3), axis=1) if segments else None
  mask = attention_reference.causal_mask(l, seg)
  sin = cos = None
  if rope:   # positions restarting at each document, as the data pipeline gives them
    pos = jnp.arange(l)[None].repeat(b, 0) - (0 if seg is None else
                                               jnp.argmax(seg[:, None, :] == seg[:, :, None], -1))
    sin, cos = attention.rope_angles(pos, 1e4, d)
  _check_kernel(q, k, v, do, mask, sin, cos)


def test_kernel_any_mask_and_key_length():
  """An arbitrary mask per batch row, keys not of the queries' length, and queries that see
  no key (output 0 and no gradient where the reference gives NaN: compared elsewhere)."""
  q, k, v, do = _kernel_case(2, 40, 75, 2, 16, seed=5)
  mask = jax.random.bernoulli(jax.random.key(6), 0.3, (2, 1, 40, 75))
  mask = mask.at[:, :, :, 0].set(True)   # every query sees a key
  _check_kernel(q, k, v, do, mask)
  blind = mask.at[1, 0, 7].set(False).at[:, 0, 33:].set(False)   # query 7 of row 1, 33.. of all
  out, vjp = jax.vjp(lambda q, k, v: cpu_kernels.attention(q, k, v, blind), q, k, v)
  dq, dk, dv = vjp(do)
  assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
  chex.assert_trees_all_equal(out[1, 7], jnp.zeros_like(out[1, 7]))
  chex.assert_trees_all_equal(out[:, 33:], jnp.zeros_like(out[:, 33:]))
  chex.assert_trees_all_equal(dq[:, 33:], jnp.zeros_like(dq[:, 33:]))
  seen = blind.at[1, 0, 7].set(True).at[:, 0, 33:].set(True)
  keep = jnp.ones((2, 40), bool).at[1, 7].set(False).at[:, 33:].set(False)
  want = attention_reference.masked_attention(q, k, v, seen)
  chex.assert_trees_all_close(jnp.where(keep[..., None, None], out, 0.0),
                              jnp.where(keep[..., None, None], want, 0.0), atol=2e-5)


def test_kernel_steps_aside_under_a_sharded_mesh():
  q, k, v, _ = _kernel_case(8, 16, 16, 2, 8, seed=2)
  mask = attention_reference.causal_mask(16)
  mesh = jax.make_mesh((8,), ("data",))
  with jax.set_mesh(mesh):
    assert not cpu_kernels.attention_usable(q, k, v, mask)
    text = jax.jit(lambda q, k, v: cpu_kernels.attention(q, k, v, mask)).lower(q, k, v).as_text()
  assert cpu_kernels.ATTENTION_FWD not in text


def test_kernel_rotary_needs_both_angles():
  q, k, v, _ = _kernel_case(1, 8, 8, 1, 4, seed=3)
  sin, cos = attention.rope_angles(jnp.arange(8)[None], 1e4, 4)
  mask = attention_reference.causal_mask(8)
  with pytest.raises(ValueError, match="sin and cos"):
    cpu_kernels.attention(q, k, v, mask, sin, None)
  assert cpu_kernels.attention_usable(q, k, v, mask, sin, cos)
  assert not cpu_kernels.attention_usable(q, k, v, mask, sin, cos[:, :4])   # wrong shape
  assert not cpu_kernels.attention_usable(q, k, v, mask, sin, cos.astype(jnp.bfloat16))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_attention_and_its_xla_form_equal_the_oracle(kv_heads):
  """The CPU backend's rotary attention (the native kernel where it builds) and its XLA form
  equal kernels.reference.attention: values and gradients, with documents and GQA."""
  from moejax.backends.cpu import attention as cpu_attention
  b, length, h, d = 2, 12, 4, 8
  ks = jax.random.split(jax.random.key(11), 4)
  q = jax.random.normal(ks[0], (b, length, h, d))
  k = jax.random.normal(ks[1], (b, length, kv_heads, d))
  v = jax.random.normal(ks[2], (b, length, kv_heads, d))
  do = jax.random.normal(ks[3], q.shape)
  pos = jnp.arange(length)[None].repeat(b, 0) + jnp.array([[0], [3]])
  seg = jnp.array([[0] * 5 + [1] * 7, [0] * 12])
  rep = h // kv_heads
  sin, cos = attention.rope_angles(pos, 1e4, d)
  xla = lambda q, k, v: attention_reference.attention(
      q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2), attention_reference.causal_mask(length, seg),
      sin, cos)
  want, want_vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, pos, 1e4, seg), q, k, v)
  for fn in (lambda q, k, v: cpu_attention.rotary_attention(q, k, v, pos, 1e4, seg), xla):
    got, got_vjp = jax.vjp(fn, q, k, v)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got_vjp(do), want_vjp(do), atol=1e-4, rtol=1e-4)
