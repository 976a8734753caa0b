"""DenseFFN and activations.glu: the CPU program (2-D matmuls, fused GLU backward) and the
TPU/GPU one compute the plain formula's function and gradients."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moejax import kernels
from moejax.kernels import activations as act_lib
from moejax.layers import dense


@pytest.mark.parametrize("activation", act_lib.NAMES)
@pytest.mark.parametrize("gated", [True, False])
def test_glu_vjp_equals_autodiff(activation, gated):
  ka, kb, kc = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (7, 5)) * 2
  b = jax.random.normal(kb, (7, 5)) if gated else None
  ct = jax.random.normal(kc, (7, 5))
  f = act_lib.fn(activation)
  plain = lambda a, b: f(a) if b is None else f(a) * b
  got, got_vjp = jax.vjp(lambda a, b: act_lib.glu(activation, a, b), a, b)
  want, want_vjp = jax.vjp(plain, a, b)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(got_vjp(ct), want_vjp(ct), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", False), ("gelu", True)])
def test_dense_ffn_equals_formula(activation, gated, platform):
  """Both programs: CPU (flattened, fused backward) and TPU/GPU (einsums, autodiff)."""
  with kernels.target_platform(platform):
    _check_dense_ffn(activation, gated)


def _check_dense_ffn(activation, gated):
  m = dense.DenseFFN(6, 10, dense.DenseSettings(activation=activation, gated=gated),
                     rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 6))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss_layer(p, x):
    y, _ = nnx.merge(graphdef, p, rest, copy=True)(x)
    return jnp.sum(jnp.sin(y)), y

  def loss_formula(p, x):
    f = act_lib.fn(activation)
    h = f(jnp.einsum("bld,df->blf", x, p["wi"][...]))
    if gated:
      h = h * jnp.einsum("bld,df->blf", x, p["wg"][...])
    y = jnp.einsum("blf,fd->bld", h, p["wo"][...])
    return jnp.sum(jnp.sin(y)), y

  got = jax.grad(loss_layer, argnums=(0, 1), has_aux=True)(params, x)
  want = jax.grad(loss_formula, argnums=(0, 1), has_aux=True)(params, x)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
