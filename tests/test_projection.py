"""project / project_back / weight_grad: every dense projection, 2-D on CPU, einsum elsewhere."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moejax import kernels
from moejax.layers.projection import project, project_back, weight_grad


@pytest.mark.parametrize("x_shape,w_shape,in_dims,spec", [
    ((2, 5, 8), (8, 6), 1, "bld,df->blf"),
    ((2, 5, 8), (8, 3, 4), 1, "bld,dnh->blnh"),        # attention q / k / v
    ((2, 5, 3, 4), (3, 4, 8), 2, "blnh,nhd->bld"),     # attention output
    ((7, 8), (8, 6), 1, "td,df->tf"),
])
@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_equals_einsum_values_and_grads(x_shape, w_shape, in_dims, spec, platform):
  with kernels.target_platform(platform):
    _check_against_einsum(x_shape, w_shape, in_dims, spec)


def _check_against_einsum(x_shape, w_shape, in_dims, spec):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  want = jnp.einsum(spec, x, w)
  chex.assert_trees_all_close(project(x, w, in_dims=in_dims), want, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.grad(loss(lambda x, w: project(x, w, in_dims=in_dims)), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))(x, w)
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)
  dy = jnp.cos(want)
  chex.assert_trees_all_close(weight_grad(x, dy, in_dims=in_dims), ref[1], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(project_back(dy, w, in_dims=in_dims), ref[0], rtol=1e-5, atol=1e-5)


def test_flattens_on_cpu_only():
  """CPU: 2-D matmuls (reshapes); TPU / GPU: one dot_general over the natural shapes, no
  reshape (they would change the TPU's tiled layouts), for forward and backward alike."""
  x, w = jnp.ones((4, 8, 16)), jnp.ones((16, 4, 8))   # more tokens than the few-row matmul's
  for platform, reshapes in (("cpu", True), ("tpu", False), ("gpu", False)):
    # a new function per platform: JAX caches traces by function, not by target platform
    grad = jax.grad(lambda x, w: jnp.sum(project(x, w)), argnums=(0, 1))
    with kernels.target_platform(platform):
      text = str(jax.make_jaxpr(grad)(x, w))
    assert ("reshape" in text) == reshapes, platform
    assert text.count("dot_general") == 3, platform


def test_a_few_tokens_take_the_few_row_matmul_on_cpu():
  """Up to FEW_ROWS tokens (decoding): the CPU backend's native few-row matmul, the same
  values and gradients as the einsum; more tokens, XLA's matmul."""
  from moejax.backends.cpu import native
  from moejax.backends.cpu import projection as cpu_projection
  assert native.available()
  w = jax.random.normal(jax.random.key(1), (16, 4, 8))
  for rows, kernel in ((cpu_projection.FEW_ROWS, True), (cpu_projection.FEW_ROWS + 1, False)):
    x = jax.random.normal(jax.random.key(0), (rows, 1, 16))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    grad = jax.value_and_grad(loss(project), argnums=(0, 1))
    assert (native.FEW_ROW_MATMUL in str(jax.make_jaxpr(grad)(x, w))) == kernel
    want = jax.value_and_grad(loss(lambda x, w: jnp.einsum("bld,dhk->blhk", x, w)),
                              argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(grad(x, w), want, rtol=1e-5, atol=1e-5)


def test_preferred_element_type():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  w = jnp.ones((4, 5), jnp.bfloat16)
  assert project(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32


def test_shape_mismatch_is_one_clear_error():
  with pytest.raises(ValueError, match="does not end with"):
    project(jnp.ones((2, 3, 4)), jnp.ones((5, 6)))


def test_keeps_the_batch_sharding():
  """Flattening [batch, length] must not make GSPMD gather the batch onto every device."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))   # as moejax.sharding
  x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 32)), jnp.float32),
                     NamedSharding(mesh, P("data")))
  w = jax.device_put(jnp.ones((32, 3, 4)), NamedSharding(mesh, P()))
  y = jax.jit(project)(x, w)
  assert y.shape == (8, 16, 3, 4)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), y.ndim)
  hlo = jax.jit(project).lower(x, w).compile().as_text()
  assert "all-gather" not in hlo
