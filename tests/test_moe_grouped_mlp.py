"""The CPU backend's dropless path (moejax.backends.cpu): block layout, the fused grouped FFN (custom VJP) against a plain
per-expert reference, values and gradients; the routing group size rule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.backends.cpu import grouped_mlp as gml
from moejax.backends.cpu import moe_dispatch
from moejax.layers.moe.layer import routing_group_size

E, D, F = 4, 6, 10
CASES = [
    ([5, 0, 17, 1], (16, 8, 4)),     # an empty expert, blocks of every size
    ([0, 40, 0, 0], (16, 8)),        # every row on one expert
    ([3, 3, 3, 3], (4,)),            # one size
    ([100, 7, 0, 30], (32, 16, 8)),  # several largest blocks for one expert
    ([0, 0, 0, 0], (8, 4)),          # nothing routed
]


def _segments(counts, sizes):
  rows = gml.buffer_rows(int(sum(counts)) + 3, E, sizes)
  offset, blocks = gml.block_layout(jnp.asarray(counts, jnp.int32), sizes, rows)
  return rows, np.asarray(offset), blocks


@pytest.mark.parametrize("counts,sizes", CASES)
def test_blocks_tile_each_segment_exactly(counts, sizes):
  rows, offset, blocks = _segments(counts, sizes)
  owner = np.full(rows, -1)
  for b, s in zip(blocks, sizes):
    for r, e in zip(np.asarray(b.start)[:int(b.count)], np.asarray(b.expert)[:int(b.count)]):
      assert (owner[r:r + s] == -1).all(), "blocks overlap"
      owner[r:r + s] = e
  small = sizes[-1]
  for e, (c, o) in enumerate(zip(counts, offset)):
    padded = -(-c // small) * small
    np.testing.assert_array_equal(owner[o:o + padded], e)
  assert (owner >= 0).sum() == sum(-(-c // small) * small for c in counts)


def _weights(seed, gated):
  ks = jax.random.split(jax.random.key(seed), 3)
  wi = jax.random.normal(ks[0], (E, D, F)) / 3
  wg = jax.random.normal(ks[1], (E, D, F)) / 3 if gated else None
  wo = jax.random.normal(ks[2], (E, F, D)) / 4
  return wi, wg, wo


def _reference(x, wi, wg, wo, counts, offset, activation):
  """Plain per-expert FFN on each expert's rows; other rows 0."""
  y = jnp.zeros_like(x)
  for e, (c, o) in enumerate(zip(counts, offset)):
    xe = x[o:o + c]
    h = jax.nn.silu(xe @ wi[e]) if activation == "silu" else jax.nn.gelu(xe @ wi[e], False)
    if wg is not None:
      h = h * (xe @ wg[e])
    y = y.at[o:o + c].set(h @ wo[e])
  return y


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("counts,sizes", CASES)
def test_grouped_mlp_equals_per_expert_reference(counts, sizes, gated, activation):
  rows, offset, blocks = _segments(counts, sizes)
  valid = np.zeros(rows, bool)
  for c, o in zip(counts, offset):
    valid[o:o + c] = True
  x = jax.random.normal(jax.random.key(1), (rows, D)) * valid[:, None]   # padding rows 0
  ct = jax.random.normal(jax.random.key(2), (rows, D)) * valid[:, None]
  w = _weights(3, gated)

  def loss(fn, x, w):
    y = fn(x, *w)
    return jnp.sum(y * ct), y

  got = jax.grad(loss, argnums=(1, 2), has_aux=True)(
      lambda x, *w: gml.grouped_mlp(x, *w, blocks, sizes, activation), x, w)
  want = jax.grad(loss, argnums=(1, 2), has_aux=True)(
      lambda x, *w: _reference(x, *w, counts, offset, activation), x, w)
  chex.assert_trees_all_close(got[1], want[1], atol=1e-5, rtol=1e-5)        # values
  (gx, gw), (rx, rw) = got[0], want[0]
  chex.assert_trees_all_close(gx * valid[:, None], rx, atol=1e-5, rtol=1e-5)  # d x
  chex.assert_trees_all_close(gw, rw, atol=1e-5, rtol=1e-5)                  # d weights
  if not gated:
    assert gw[1] is None


def test_blocked_dispatch_rows_equal_dense_loop():
  """``blocked_grouped_mlp``: rows gathered from tokens (each token twice), unrouted rows,
  an idle expert; values and gradients w.r.t. the tokens and every weight."""
  t, k = 24, 2
  x = jax.random.normal(jax.random.key(4), (t, D))
  expert = jax.random.randint(jax.random.key(5), (t * k,), 0, E - 1)       # expert E-1 idle
  expert = expert.at[::7].set(E)                                           # unrouted
  source = jnp.arange(t * k) // k
  w = _weights(6, True)

  def dense(x, wi, wg, wo):
    xr = x[source]
    h = jnp.einsum("nd,ndf->nf", xr, wi[jnp.minimum(expert, E - 1)])
    g = jnp.einsum("nd,ndf->nf", xr, wg[jnp.minimum(expert, E - 1)])
    y = jnp.einsum("nf,nfd->nd", jax.nn.silu(h) * g, wo[jnp.minimum(expert, E - 1)])
    return jnp.where((expert < E)[:, None], y, 0)

  def loss(fn, x, w):
    y = fn(x, *w)
    return jnp.sum(jnp.sin(y)), y

  blocked = lambda x, *w: moe_dispatch.blocked_grouped_mlp(x, source, expert, w, "silu", 8)
  got = jax.grad(loss, argnums=(1, 2), has_aux=True)(blocked, x, w)
  want = jax.grad(loss, argnums=(1, 2), has_aux=True)(dense, x, w)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(got[0][1][2][E - 1]).max()) == 0.0                   # idle expert


def test_block_sizes():
  assert gml.block_sizes(512) == (512, 256, 128, 64)
  assert gml.block_sizes(16) == (16, 8)
  assert gml.block_sizes(2) == (2,)
  with pytest.raises(ValueError, match="power of two"):
    gml.block_sizes(384)
  assert moe_dispatch.default_block(8192, 8) == 1024 and moe_dispatch.default_block(32, 4) == 8
  assert moe_dispatch.default_block(4096, 8) == 512 and moe_dispatch.default_block(1 << 20, 8) == 1024


@pytest.mark.parametrize("d,f,route", [
    (40, 37, "random"),     # vector blocks and a scalar tail of columns, rows past the groups
    (64, 48, "random"),
    (40, 37, "one"),        # every pair on one expert: parts cut inside one expert's rows
    (17, 130, "two"),       # two experts, a part boundary inside each
])
def test_routed_kernel_equals_the_blocked_path_at_any_shape(d, f, route):
  """The routed FFN kernel's parts (runs of weight rows with their own accumulators, added
  in a fixed order) give the blocked path's values at shapes with column tails, row tails
  and part boundaries inside an expert, and the same values on every call."""
  from moejax.backends.cpu import native
  assert native.available()
  t, k, e = 16, 2, 5
  keys = jax.random.split(jax.random.key(11), 6)
  x = jax.random.normal(keys[0], (t, d))
  if route == "random":
    expert = jax.random.randint(keys[1], (t, k), 0, e + 1)        # e: no expert
  elif route == "one":
    expert = jnp.full((t, k), 3, jnp.int32).at[:, 1].set(e)
  else:
    expert = jnp.tile(jnp.array([[1, 4]], jnp.int32), (t, 1))
  weight = jax.random.uniform(keys[2], (t, k))
  wi, wg = (jax.random.normal(kk, (e, d, f)) / d ** 0.5 for kk in keys[3:5])
  wo = jax.random.normal(keys[5], (e, f, d)) / f ** 0.5
  got = native.routed_ffn(x, expert, weight, wi, wg, wo, "silu")
  want = moe_dispatch._blocked_combine(x, expert, weight * (expert < e), (wi, wg, wo), "silu", 0)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(got).max()) > 0
  np.testing.assert_array_equal(np.asarray(native.routed_ffn(x, expert, weight, wi, wg, wo,
                                                             "silu")), np.asarray(got))


@pytest.mark.parametrize("group_size,length,experts,k,want", [
    (-1, 512, 8, 2, 128), (-1, 4096, 8, 2, 128),   # each expert expects 32 slots per group
    (-1, 100, 8, 2, 100),                          # shorter than that: the whole sequence
    (-1, 1000, 8, 2, 200), (-1, 288, 8, 2, 144),   # the smallest divisor >= 128
    (-1, 509, 8, 2, 509),                          # prime: the whole sequence
    (-1, 512, 128, 1, 512),                        # Switch, top-1 of 128: whole sequences
    (-1, 512, 8, 1, 256), (-1, 1, 8, 2, 1),
    (0, 512, 8, 2, 512), (16, 8, 8, 2, 16),        # explicit sizes are kept
])
def test_routing_group_size(group_size, length, experts, k, want):
  assert routing_group_size(group_size, length, experts, k) == want


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_few_tokens_take_the_routed_kernel_with_the_blocked_values_and_gradients(gated,
                                                                                  activation):
  """A few tokens (decoding) run the native routed FFN: the blocked path's values, and its
  gradients (the custom VJP recomputes the blocked path); unrouted choices add nothing."""
  from moejax.backends.cpu import native
  from moejax.layers.moe.dispatch import DispatchOptions
  assert native.available()
  t, k = 5, 2
  x = jax.random.normal(jax.random.key(7), (t, D))
  expert = jax.random.randint(jax.random.key(8), (t, k), 0, E).at[1, 1].set(E)   # unrouted
  weight = jax.random.uniform(jax.random.key(9), (t, k)) * (expert < E)
  w = _weights(10, gated)
  opts = DispatchOptions(impl="blocked", block=0)

  def loss(fn, x, weight, w):
    y = fn(x, expert, weight, w, activation, opts)
    return jnp.sum(jnp.sin(y)), y

  blocked = lambda x, e, wt, w, a, o: moe_dispatch._blocked_combine(x, e, wt, w, a, o.block)
  jaxpr = str(jax.make_jaxpr(lambda x: moe_dispatch.blocked_combine(x, expert, weight, w,
                                                                     activation, opts))(x))
  assert native.ROUTED_FFN in jaxpr
  got = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)(moe_dispatch.blocked_combine, x,
                                                        weight, w)
  want = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)(blocked, x, weight, w)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  # the kernel up to ROUTED_FFN_MAX_PAIRS pairs, the blocked path past them
  for pairs, kernel in ((moe_dispatch.ROUTED_FFN_MAX_PAIRS, True),
                        (moe_dispatch.ROUTED_FFN_MAX_PAIRS + 1, False)):
    one = jnp.zeros((pairs, 1), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda x: moe_dispatch.blocked_combine(
        x, one, jnp.ones(one.shape), w, activation, opts))(jnp.ones((pairs, D))))
    assert (native.ROUTED_FFN in jaxpr) == kernel
