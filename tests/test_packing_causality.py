"""Document-masked packing, causality of every router allowed by default, token-id hashing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_utils import tiny_config
from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.layers.moe import MoE, MoESettings, routing
from moejax.model import Transformer

SEG = np.array([[1] * 6 + [2] * 5 + [3] * 5, [1] * 9 + [2] * 4 + [0] * 3], np.int32)


def _positions(seg):
  pos = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
  return pos


PACKED_KINDS = {
    "dense": dict(),
    "moe_dropless": dict(sparse_ffn="moe", moe=dict(top_k=2, dispatch="dropless")),
    "peer_layer_norm": dict(sparse_ffn="peer", peer=dict(num_experts_sqrt=8, heads=2, top_k=3,
                                                         d_key=8, query_norm="layer")),
    "pkm_layer_norm": dict(sparse_ffn="pkm", pkm=dict(num_keys_sqrt=8, heads=2, top_k=3, d_key=8,
                                                      query_norm="layer")),
}


def _lm(spec, **model):
  spec = dict(spec)
  sparse = spec.pop("sparse_ffn", "dense")
  c = tiny_config(sparse_ffn=sparse, sparse_layers="all" if sparse != "dense" else "none",
                  **model)
  for section, fields in spec.items():
    c[section].update(fields)
  config_lib.validate(c)
  return Transformer(c, rngs=nnx.Rngs(params=0, router=1))


@pytest.mark.parametrize("kind", list(PACKED_KINDS))
@pytest.mark.parametrize("scan", [False, True])
def test_changing_one_document_leaves_the_others_unchanged(kind, scan):
  model = _lm(PACKED_KINDS[kind], num_layers=3, scan_layers=scan)
  model.train()       # training forward (the one that sees packed rows)
  seg = jnp.asarray(SEG)
  pos = jnp.asarray(_positions(SEG))
  tokens = jax.random.randint(jax.random.key(0), SEG.shape, 2, 32)
  mask = seg > 0
  base, _ = model(tokens, mask=mask, segment_ids=seg, positions=pos)
  # change document 2 of row 0 (positions 6..10) and document 1 of row 1
  changed = tokens.at[0, 6:11].set((tokens[0, 6:11] + 5) % 32).at[1, 0:9].set(
      (tokens[1, 0:9] + 3) % 32)
  other, _ = model(changed, mask=mask, segment_ids=seg, positions=pos)
  assert float(jnp.abs(base[0, 6:11] - other[0, 6:11]).max()) > 1e-3   # it did change
  keep = np.ones(SEG.shape, bool)
  keep[0, 6:11] = False
  keep[1, 0:9] = False
  keep &= SEG > 0
  np.testing.assert_allclose(other[keep], base[keep], atol=1e-5, rtol=1e-5)
  # a document gives the logits it gives alone, at its own positions 0..
  alone, _ = model(tokens[:1, 11:16])
  np.testing.assert_allclose(base[0, 11:16], alone[0], atol=1e-4, rtol=1e-4)


def test_without_segments_documents_leak():
  """The check above can fail: without segment ids the same change reaches later documents."""
  model = _lm({})
  tokens = jax.random.randint(jax.random.key(0), SEG.shape, 2, 32)
  changed = tokens.at[0, 6:11].set((tokens[0, 6:11] + 5) % 32)
  a, _ = model(tokens)
  b, _ = model(changed)
  assert float(jnp.abs(a[0, 11:] - b[0, 11:]).max()) > 1e-3


def test_pipeline_batches_carry_segments_and_positions():
  from moejax.data import pipeline
  from moejax.data.tokenizers import ByteTokenizer
  shift = pipeline._Shift(ByteTokenizer())
  packed = {"tokens": np.array([5, 6, 1, 7, 8, 9, 1, 0], np.int32),
            "tokens_segment_ids": np.array([1, 1, 1, 2, 2, 2, 2, 0], np.int32),
            "tokens_positions": np.array([0, 1, 2, 0, 1, 2, 3, 0], np.int32)}
  ex = shift.map(packed)
  np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 3])
  np.testing.assert_array_equal(ex["weights"], [1, 1, 1, 1, 1, 1, 0])


# ---------------------------------------------------------------- causality


def _moe_cfg(**fields):
  c = tiny_config(sparse_ffn="moe", sparse_layers="all")
  c.moe.update(dict(num_experts=4, min_capacity=1, **fields))
  return c


# capacity factor f in training and evaluation (0: no capacity)
COMBOS = [dict(router=r, dispatch=d, top_k=k, priority=p, capacity_factor_train=f,
               capacity_factor_eval=f)
          for r, d, k, p, f in itertools.product(
              ["top_k", "hash", "expert_choice"], ["einsum", "dropless", "expert_parallel"],
              [1, 2], ["position", "batch"], [0.5, 0.0])
          if not (r == "expert_choice" and (d == "dropless" or f <= 0 or k > 1))
          and not (r != "top_k" and p == "batch")]


def _allowed(fields):
  try:
    config_lib.validate(_moe_cfg(**fields))
    return True
  except ConfigError as e:
    assert "not causal in a decoder" in str(e) and "allow_noncausal" in str(e), str(e)
    assert "\n" not in str(e)
    return False


def _future_change(model, seeds=3):
  """max |Δ logits| at positions 0..7 when positions 8..15 change, over a few seeds."""
  graphdef, state = nnx.split(model)      # the mode (train / eval) is in the graphdef
  logits = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
  worst = 0.0
  for s in range(seeds):
    tokens = jax.random.randint(jax.random.key(s), (4, 16), 2, 32)
    changed = tokens.at[:, 8:].set(jax.random.randint(jax.random.key(100 + s), (4, 8), 2, 32))
    a, b = logits(state, tokens), logits(state, changed)
    worst = max(worst, float(jnp.abs(a[:, :8] - b[:, :8]).max()))
  return worst


@pytest.mark.parametrize("fields", COMBOS, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_routers_allowed_by_default_are_causal(fields):
  model = Transformer(_moe_cfg(**fields, allow_noncausal=True), rngs=nnx.Rngs(params=0, router=1))
  if _allowed(fields):
    model.train()          # training: capacity dropping in force
    assert _future_change(model) < 1e-5
  model.eval()             # evaluation never drops for a non-causal router: causal too
  assert _future_change(model) < 1e-5


@pytest.mark.parametrize("fields", [
    dict(router="expert_choice", dispatch="einsum", top_k=1, capacity_factor_train=1.0),
    dict(router="top_k", dispatch="einsum", top_k=2, capacity_factor_train=0.5),
    dict(router="top_k", dispatch="einsum", top_k=1, priority="batch", capacity_factor_train=0.5),
])
def test_refused_routers_do_see_the_future(fields):
  """What validation refuses really is non-causal in training (so the refusal is needed)."""
  assert not _allowed(fields)
  model = Transformer(_moe_cfg(**fields, allow_noncausal=True), rngs=nnx.Rngs(params=0, router=1))
  model.train()
  assert _future_change(model, seeds=4) > 1e-4


def test_capacity_in_evaluation_alone_counts():
  """Top-2 without a training capacity but with one in evaluation is refused as well."""
  assert not _allowed(dict(router="top_k", dispatch="einsum", top_k=2, capacity_factor_train=0.0,
                           capacity_factor_eval=0.5))
  assert _allowed(dict(router="top_k", dispatch="einsum", top_k=2, capacity_factor_train=0.0,
                       capacity_factor_eval=0.0))


def test_noncausal_opt_in_message_is_one_line():
  c = _moe_cfg(router="expert_choice", dispatch="einsum")
  with pytest.raises(ConfigError, match=r"^config\.moe\.router='expert_choice': not causal in a "
                     r"decoder: .*allow_noncausal=true"):
    config_lib.validate(c)
  c.moe.allow_noncausal = True
  config_lib.validate(c)


# ---------------------------------------------------------------- hash routing by token id


def test_lm_passes_token_ids_to_hash_routing(monkeypatch):
  seen = []
  orig = routing.hash_experts

  def spy(x, token_ids, **kw):
    seen.append(token_ids)
    return orig(x, token_ids, **kw)

  monkeypatch.setattr(routing, "hash_experts", spy)
  model = Transformer(_moe_cfg(router="hash", top_k=1), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 2, 32)
  model(tokens)
  assert seen and all(t is not None for t in seen)
  np.testing.assert_array_equal(seen[0].reshape(tokens.shape), tokens)


def test_hash_by_token_id_ignores_the_hidden_state():
  """Same token id, different hidden states -> same experts (and different ids can differ)."""
  c = _moe_cfg(router="hash", top_k=2)
  layer = MoE(MoESettings.from_config(c.moe), d_model=32, d_ff=64, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 64, 32))
  ids = jnp.tile(jnp.array([5, 9]), 32)[None]
  plan, _ = layer.route(x, jnp.ones((1, 64), bool), ids)
  e = np.asarray(plan.expert_index[0])
  assert (e[0::2] == e[0]).all() and (e[1::2] == e[1]).all()
  # without ids the hash of the hidden state varies over these random states
  plan2, _ = layer.route(x, jnp.ones((1, 64), bool), None)
  assert len({tuple(r) for r in np.asarray(plan2.expert_index[0, 0::2])}) > 1
