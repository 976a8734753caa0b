"""moejax.flops against XLA's cost analysis of the compiled forward, per FFN kind."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax import flops
from moejax.training import state as state_lib


def _config(**fields):
  c = config_lib.default_config()
  c.model.vocab_size = 258
  c.model.num_layers = 2      # the middle block is block 1
  for path, value in fields.items():
    section, name = path.split("__")
    c[section][name] = value
  return c


SPARSE = dict(model__sparse_layers="middle")
CASES = {
    "dense": _config(),
    "dense_gated": _config(dense__gated=True),
    "peer": _config(model__sparse_ffn="peer", peer__num_experts_sqrt=64, peer__heads=4,
                    peer__top_k=8, peer__d_key=32, peer__kernel="reference", **SPARSE),
    "pkm": _config(model__sparse_ffn="pkm", pkm__num_keys_sqrt=64, pkm__heads=4, pkm__top_k=16,
                   pkm__d_key=32, pkm__kernel="reference", **SPARSE),
    # Capacity dispatch in training: every expert computes its E·C/S slots per token.
    "moe_top2_capacity": _config(model__sparse_ffn="moe", moe__num_experts=8, moe__top_k=2,
                                 moe__d_ff=256, moe__dispatch="einsum",
                                 moe__allow_noncausal=True, **SPARSE),
    "moe_expert_choice": _config(model__sparse_ffn="moe", moe__router="expert_choice",
                                 moe__num_experts=8, moe__capacity_factor_train=1.0,
                                 moe__dispatch="einsum", moe__allow_noncausal=True, **SPARSE),
    "gqa": _config(model__num_kv_heads=1),
    "moe_shared": _config(model__sparse_ffn="moe", moe__num_experts=4, moe__top_k=1,
                          moe__num_shared_experts=1, moe__dispatch="einsum",
                          moe__capacity_factor_train=2.0, moe__shared_d_ff=384,
                          moe__shared_gate=True, **SPARSE),
}


def _xla_forward_flops(config) -> float:
  """XLA's FLOPs per token of the compiled training-mode forward (logits only).

  The cost analysis is per device; the batch is split over the mesh's data axis."""
  ms = state_lib.create_model_state(config)
  b, l = config.data.batch_size, config.data.seq_len

  def forward(state, tokens):
    model = nnx.merge(ms.graphdef, state)
    model.train()
    return model(tokens)[0]

  with jax.set_mesh(ms.mesh), nnx.logical_axis_rules(ms.rules):
    compiled = jax.jit(forward).lower(ms.state, jnp.zeros((b, l), jnp.int32)).compile()
  return compiled.cost_analysis()["flops"] * ms.mesh.size / (b * l)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_flops_match_xla_within_10_percent(name, monkeypatch):
  # XLA counts no FLOPs inside custom calls: the plain XLA program of every op here.
  monkeypatch.setenv("MOEJAX_CPU_KERNELS", "0")
  config = CASES[name]
  ours = flops.count(config, train=True).forward
  xla = _xla_forward_flops(config)
  assert abs(xla / ours - 1) < 0.10, (name, ours, xla)


def test_parts_and_training_multiple():
  c = CASES["peer"]
  count = flops.count(c)
  middle = c.model.num_layers // 2
  d, h, k, dk, n = 128, 4, 8, 32, 64
  chex.assert_trees_all_close(count.parts[f"block_{middle}/peer/scores"], 2.0 * h * n * dk)
  chex.assert_trees_all_close(count.parts[f"block_{middle}/peer/experts"], 4.0 * h * k * d)
  assert f"block_{middle}/dense/mlp" not in count.parts
  assert count.train == pytest.approx(3 * count.forward)


def test_moe_counts_follow_the_dispatch():
  """Dropless top-2 computes 2 experts per token; capacity dispatch its slots, padding too;
  evaluation of expert choice (no dropping) every expert."""
  dropless = _config(model__sparse_ffn="moe", moe__num_experts=8, moe__top_k=2,
                     moe__dispatch="dropless", **SPARSE)
  expert = flops.count(dropless).parts["block_1/moe/experts"]
  assert expert == pytest.approx(2 * 2 * 2 * 128 * 512)
  capacity = flops.count(CASES["moe_top2_capacity"]).parts["block_1/moe/experts"]
  assert capacity > 2 * 2 * 2 * 128 * 256            # capacity factor 1.25 of 2 half experts
  ec = CASES["moe_expert_choice"]
  assert flops.count(ec, train=False).parts["block_1/moe/experts"] == pytest.approx(
      8 * flops.count(ec, train=True).parts["block_1/moe/experts"])
