"""Transformer: shapes, causality, per-block FFN choice, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import tiny_config
from moejax.config import parse_sparse_layers
from moejax.model import Transformer


def _model(**overrides):
  return Transformer(tiny_config(**overrides), rngs=nnx.Rngs(0))


def test_logits_shape_and_dtype():
  model = _model()
  tokens = jnp.zeros((3, 16), jnp.int32)
  logits, auxes = model(tokens)
  chex.assert_shape(logits, (3, 16, 32))
  assert logits.dtype == jnp.float32
  assert auxes == {}   # dense blocks report nothing


def test_causal():
  model = _model()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 32)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 32)
  a, _ = model(tokens)
  b, _ = model(changed)
  chex.assert_trees_all_close(a[:, :10], b[:, :10], atol=1e-5)
  assert not np.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_bfloat16_compute_keeps_float32_params():
  model = _model(dtype="bfloat16")
  logits, _ = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_tied_embeddings_have_no_head():
  assert _model(tie_embeddings=True).head is None


@pytest.mark.parametrize("spec,expected", [
    ("none", ()), ("all", (0, 1, 2, 3)), ("middle", (2,)), ("every:2", (0, 2)),
    ("every:2:1", (1, 3)), ("0,3", (0, 3))])
def test_sparse_layer_spec(spec, expected):
  assert parse_sparse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["every:0", "4", "-1", "sometimes"])
def test_bad_sparse_layer_spec(spec):
  with pytest.raises(ValueError):
    parse_sparse_layers(spec, 4)
