"""Trunk options of imported architectures (GQA, attention biases, q/k norm, gated shared
expert): off by default and then bit-for-bit today's model; on, each does what it says."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import tiny_config
from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.generation import prepare
from moejax.layers.moe import MoE, MoESettings
from moejax.model import Transformer

# Logits [0, :3, :4] and sum |logits| of the default tiny models, computed by moejax before
# these options existed (same config, seed and tokens as _golden_logits).
GOLDEN = {
    "dense": ([[0.7504621744155884, -0.045685555785894394, -0.2176670879125595, 0.6159487962722778],
               [1.6568762063980103, 0.43293580412864685, 0.30823683738708496, -0.48622170090675354],
               [0.8514999747276306, -0.789813220500946, 0.5309128165245056, -0.43051669001579285]],
              664.650390625),
    "moe": ([[-0.798954963684082, 1.0531690120697021, 1.2597975730895996, 0.0766744464635849],
             [-1.8336437940597534, 0.7690510153770447, 0.7911874055862427, 0.9373087882995605],
             [-0.8156887292861938, 0.2823140025138855, 0.188506081700325, 1.0695048570632935]],
            557.8369750976562),
}


def _golden_logits(name):
  c = tiny_config(**({} if name == "dense" else {"sparse_ffn": "moe", "sparse_layers": "all"}))
  if name == "moe":
    c.moe.num_shared_experts = 1
  m = Transformer(c, rngs=nnx.Rngs(0))
  m.eval()
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, c.model.vocab_size)
  return np.asarray(m(tokens)[0])


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_defaults_give_the_models_of_before(name):
  logits = _golden_logits(name)
  corner, total = GOLDEN[name]
  np.testing.assert_allclose(logits[0, :3, :4], np.array(corner, np.float32), rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.abs(logits).sum(), total, rtol=1e-6)


def test_defaults_add_no_variables():
  m = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m))}
  assert not any(s in n for n in names for s in ("bq", "bo", "q_norm", "k_norm", "shared_gate"))


def _copy(src: Transformer, dst: Transformer, fix=lambda path, x: x):
  pure = nnx.to_pure_dict(nnx.state(src))
  pure = jax.tree_util.tree_map_with_path(fix, pure)
  graphdef, state = nnx.split(dst)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def test_grouped_query_attention_equals_repeated_heads():
  """num_kv_heads=2 of 4 heads == 4-head attention whose KV heads 2j, 2j+1 are KV head j."""
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 32)
  gqa = Transformer(tiny_config(num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(0))
  assert gqa.blocks[0].attn.wk.shape == (32, 2, 8)
  mha = Transformer(tiny_config(num_heads=4, head_dim=8), rngs=nnx.Rngs(1))

  def fix(path, x):
    name = str(path[-1].key)
    return jnp.repeat(x, 2, axis=1) if name in ("wk", "wv") else x

  mha = _copy(gqa, mha, fix)
  chex.assert_trees_all_close(gqa(tokens)[0], mha(tokens)[0], atol=1e-5)
  # the cache holds the KV heads only, and decoding equals the full forward
  g = prepare(gqa)
  cache = g.init_cache(2, 10)
  assert cache[0]["k"].shape == (2, 10, 2, 8)
  step, _ = g.decode(tokens[:, :6], cache, jnp.int32(0))
  chex.assert_trees_all_close(step, gqa(tokens[:, :6])[0], atol=1e-5)


@pytest.mark.parametrize("bias", ["qkv", "all"])
def test_attention_bias_zero_at_init_and_used(bias):
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 32)
  plain = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  biased = Transformer(tiny_config(attention_bias=bias), rngs=nnx.Rngs(0))
  attn = biased.blocks[0].attn
  assert (attn.bo is not None) == (bias == "all")
  chex.assert_trees_all_close(plain(tokens)[0], biased(tokens)[0], atol=0)   # zero biases
  attn.bv.bias[...] = jnp.ones_like(attn.bv.bias[...])
  # a bias on v adds bias @ wo to every position (attention weights sum to one)
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  shift = jnp.einsum("hk,hkd->d", attn.bv.bias[...], attn.wo[...])
  attn.bv.bias[...] = jnp.zeros_like(attn.bv.bias[...])
  y0 = attn(x, pos)
  attn.bv.bias[...] = jnp.ones_like(attn.bv.bias[...])
  chex.assert_trees_all_close(attn(x, pos), y0 + shift, atol=1e-5)


@pytest.mark.parametrize("norm", ["full", "head"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(norm):
  c = tiny_config(qk_norm=norm)
  m = Transformer(c, rngs=nnx.Rngs(0))
  attn = m.blocks[0].attn
  want = (2 * 16,) if norm == "full" else (16,)
  assert attn.q_norm.scale.shape == want
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  y = attn(x, pos)
  attn.wq[...] = attn.wq[...] * 3.0
  attn.wk[...] = attn.wk[...] * 0.25
  chex.assert_trees_all_close(attn(x, pos), y, atol=2e-5)
  plain = Transformer(tiny_config(), rngs=nnx.Rngs(0)).blocks[0].attn
  plain.wq[...] = plain.wq[...] * 3.0
  assert not np.allclose(plain(x, pos), y, atol=1e-3)
  # and decoding with the cache still equals the full forward
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  g = prepare(m)
  step, _ = g.decode(tokens, g.init_cache(2, 8), jnp.int32(0))
  chex.assert_trees_all_close(step, m(tokens)[0], atol=1e-5)


def test_shared_expert_behind_a_sigmoid_gate():
  c = tiny_config(sparse_ffn="moe", sparse_layers="all")
  c.moe.update(num_shared_experts=1, shared_d_ff=24, shared_gate=True, gated=True,
               activation="silu", renormalize=False)
  config_lib.validate(c)
  layer = MoE(MoESettings.from_config(c.moe), d_model=32, d_ff=64, rngs=nnx.Rngs(0))
  layer.eval()
  assert layer.shared.wi.shape == (32, 24) and layer.shared_gate.shape == (32, 1)
  x = jax.random.normal(jax.random.key(2), (2, 8, 32))
  y, _ = layer(x)
  shared = layer.shared(x)[0] * jax.nn.sigmoid(x @ layer.shared_gate[...])
  layer.shared.wo[...] = jnp.zeros_like(layer.shared.wo[...])
  routed, _ = layer(x)
  chex.assert_trees_all_close(y, routed + shared, atol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("model.num_kv_heads", 3), ("model.attention_bias", "some"), ("model.qk_norm", "rms"),
    ("moe.shared_gate", True)])
def test_bad_options_name_the_field(field, value):
  c = tiny_config(num_heads=4, head_dim=8)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    if section == "moe":
      c.model.sparse_ffn, c.model.sparse_layers = "moe", "all"
    config_lib.validate(c)


def test_kv_heads_must_divide_over_the_model_axis():
  from moejax.training import loop
  c = tiny_config(num_heads=4, head_dim=8)
  c.model.num_kv_heads, c.mesh.model = 1, 2
  config_lib.validate(c)  # only the resolved mesh can tell
  with pytest.raises(ConfigError, match=r"mesh\.model=2: 1 key/value heads do not divide"):
    config_lib.check_kv_heads(c, 2)
  c.model.num_kv_heads = 2
  config_lib.check_kv_heads(c, 2)
  # -1 resolves against the 8 devices: a model axis of 8 over 4 heads.
  c.model.num_kv_heads = 0
  c.mesh.update(data=1, expert=1, model=-1)
  with pytest.raises(ConfigError, match=r"mesh\.model=-1: 4 key/value heads .* model axis of 8"):
    loop.check_mesh(c)
