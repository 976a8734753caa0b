"""Every router kind trains the tiny LM (tests/lm_utils.py) with falling loss."""

import numpy as np
import pytest

import moejax.layers.moe  # noqa: F401  (registers 'moe' before default_config)
import jax
from flax import nnx
from lm_utils import tiny_config, train_losses

from moejax.training import state as state_lib

ROUTERS = {
    "switch": dict(router="top_k", top_k=1, router_noise="jitter"),
    "gshard_random": dict(router="top_k", top_k=2, second_policy="random"),
    "expert_choice": dict(router="expert_choice", capacity_factor_train=2.0,
                          dispatch="einsum", allow_noncausal=True),
    "hash": dict(router="hash", top_k=1),
    "attention": dict(router="top_k", top_k=2, router_scores="attention"),
    "noisy_topk_dropless": dict(router="top_k", top_k=2, router_noise="gaussian",
                                dispatch="dropless"),
}
STEPS = 12


def _losses(kw):
  c = tiny_config(sparse_ffn="moe", sparse_layers="every:2:1")
  c.moe.num_experts = 4
  c.moe.update(kw)
  return train_losses(c, STEPS)


def _check_falls(losses):
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_switch_trains():
  _check_falls(_losses(ROUTERS["switch"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ROUTERS if n != "switch"])
def test_every_router_trains(name):
  _check_falls(_losses(ROUTERS[name]))


@pytest.mark.slow
def test_expert_parallel_training_matches_gspmd_einsum():
  """The tiny LM on a data=2 x expert=4 mesh: all_to_all EP gives the einsum path's losses."""
  runs = {}
  for dispatch in ("einsum", "expert_parallel"):
    c = tiny_config(sparse_ffn="moe", sparse_layers="every:2:1")
    c.moe.update(dict(num_experts=4, top_k=2, dispatch=dispatch))
    c.mesh.data, c.mesh.expert = 2, 4
    mesh = state_lib.make_mesh(c)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(state_lib.axis_rules(c)):
      runs[dispatch] = train_losses(c, 6, mesh)
  np.testing.assert_allclose(runs["expert_parallel"], runs["einsum"], rtol=2e-4)
  _check_falls(runs["expert_parallel"])
