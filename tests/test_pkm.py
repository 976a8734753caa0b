"""PKM layer: == a direct transcription, gradients, sharding, config, tiny LM."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from moejax import config as config_lib
from moejax import sharding
from moejax.errors import ConfigError
from moejax.layers import pkm
from moejax.kernels import reference
from moejax.layers.base import TableParam, build_ffn

D = 16


def _pkm(seed=0, dtype=jnp.float32, **kw):
  args = dict(num_keys_sqrt=8, heads=2, top_k=4, d_key=8, query_norm="none")
  args.update(kw)
  return pkm.PKM(D, pkm.PKMSettings(**args), dtype=dtype, rngs=nnx.Rngs(seed))


def _x(seed=1, b=2, l=5):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def pkm_reference(x, m, *, layer_norm=False):
  """Lample et al. (2019): per-head query, top-k over all N keys, softmax-weighted values."""
  q = jnp.einsum("btd,dhk->bthk", x, m.retrieval.query[...])
  if layer_norm:
    q = (q - q.mean(-1, keepdims=True)) / jnp.sqrt(q.var(-1, keepdims=True) + 1e-5)
  keys = reference.full_product_keys(m.retrieval.keys1[...], m.retrieval.keys2[...])  # [h, N, dk]
  scores, idx = jax.lax.top_k(jnp.einsum("bthk,hnk->bthn", q, keys), m.retrieval.top_k)
  return jnp.einsum("bthk,bthkd->btd", jax.nn.softmax(scores, -1), m.values[...][idx])


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_matches_reference(norm):
  m = _pkm(query_norm=norm)
  assert m.retrieval.keys1.shape == (2, 8, 4)        # per-head sub-keys by default
  assert isinstance(m.values, TableParam)
  x = _x()
  y, aux = nnx.jit(lambda m, x: m(x))(m, x)
  chex.assert_trees_all_close(y, pkm_reference(x, m, layer_norm=norm == "layer"), atol=1e-5)
  chex.assert_shape(aux.counts["score_sum"], (64,))
  np.testing.assert_allclose(aux.counts["score_sum"].sum(), 2 * 5 * 2, rtol=1e-5)
  assert set(aux.metrics) == {"slots_hit_frac", "max_score"}


def test_gradients_match_finite_differences():
  with jax.enable_x64():
    m = _pkm(query_norm="batch", num_keys_sqrt=6, top_k=3, dtype=jnp.float64)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = _x(b=2, l=3).astype(jnp.float64)
    w = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)

    def f(params, x):
      return jnp.sum(w * nnx.merge(graphdef, params, rest, copy=True)(x)[0])

    check_grads(f, (params, x), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_batchnorm_padding_excluded():
  mask = jnp.array([[True] * 5, [True, True, False, False, False]])
  x = _x()
  y1, _ = _pkm(query_norm="batch")(x, mask=mask)
  y2, _ = _pkm(query_norm="batch")(x.at[1, 2:].set(50.0), mask=mask)
  chex.assert_trees_all_close(y1[mask], y2[mask], atol=1e-5)


def test_sharded_equals_single_device():
  x = _x(b=8, l=4)

  def run(m, x):
    (_, y), g = nnx.value_and_grad(lambda m: (jnp.sum(m(x)[0] ** 2), m(x)[0]), has_aux=True)(m)
    return y, g

  ref = nnx.jit(run)(_pkm(query_norm="batch"), x)
  for mesh, rules in [(sharding.make_mesh(data=2, expert=4), sharding.logical_rules()),
                      (sharding.make_mesh(data=4, model=2),
                       sharding.logical_rules({"table_rows": None, "table_embed": "model"}))]:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      m = _pkm(query_norm="batch")
      out = nnx.jit(run)(m, jax.device_put(x, sharding.batch_sharding(mesh, 3)))
    chex.assert_trees_all_close(jax.tree.leaves(jax.device_get(out)),
                                jax.tree.leaves(jax.device_get(ref)), atol=1e-4, rtol=1e-4)


def _config(**fields):
  c = config_lib.default_config()
  c.model.sparse_ffn = "pkm"
  c.pkm.update(dict(num_keys_sqrt=16, heads=2, top_k=4, d_key=16))
  c.pkm.update(fields)
  return c


def test_default_config_is_paper_baseline():
  c = pkm.default_config()
  assert (c.num_keys_sqrt ** 2, c.heads, c.top_k, c.query_norm) == (1024 ** 2, 8, 32, "batch")


@pytest.mark.parametrize("field,value", [("top_k", 17), ("d_key", 7), ("query_norm", "bn"),
                                         ("heads", 0), ("value_init_scale", -1.0)])
def test_config_errors(field, value):
  with pytest.raises(ConfigError, match=rf"^config\.pkm\.{field}=.*--config\.pkm\.{field}="):
    config_lib.validate(_config(**{field: value}))


def test_build_from_config():
  c = _config()
  config_lib.validate(c)
  m = build_ffn("pkm", c.pkm, d_model=D, d_ff=64, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert m.values.shape == (256, D)
  chex.assert_shape(m(_x())[0], (2, 5, D))


def test_tiny_lm_with_pkm_trains():
  lm_utils = pytest.importorskip("lm_utils")
  c = lm_utils.tiny_config(sparse_ffn="pkm", sparse_layers="middle")
  c.pkm.update(dict(num_keys_sqrt=16, heads=2, top_k=4, d_key=16))
  losses = lm_utils.train_losses(c, steps=10)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
