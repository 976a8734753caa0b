"""Usage and unevenness (KL to uniform) of accumulated router scores."""

import math

import chex
import jax.numpy as jnp
import numpy as np

from moejax.layers import expert_usage as eu


class UsageTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_uniform_and_one_hot(self):
    usage, kl = self.variant(eu.usage), self.variant(eu.unevenness)
    n = 1024
    np.testing.assert_allclose(usage(jnp.full((n,), 3.0)), 1.0)
    np.testing.assert_allclose(kl(jnp.full((n,), 3.0)), 0.0, atol=1e-6)
    one_hot = jnp.zeros((n,)).at[17].set(5.0)
    np.testing.assert_allclose(usage(one_hot), 1 / n)
    np.testing.assert_allclose(kl(one_hot), math.log(n), rtol=1e-6)
    np.testing.assert_allclose(kl(jnp.zeros((n,))), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_made_distribution(self):
    s = jnp.array([2.0, 1.0, 1.0, 0.0])          # z = (1/2, 1/4, 1/4, 0)
    expect = 0.5 * math.log(0.5 * 4) + 2 * 0.25 * math.log(0.25 * 4)
    np.testing.assert_allclose(self.variant(eu.unevenness)(s), expect, rtol=1e-6)
    np.testing.assert_allclose(self.variant(eu.usage)(s), 0.75)
    # half the experts used evenly: KL = log 2
    np.testing.assert_allclose(self.variant(eu.unevenness)(jnp.array([1.0, 1.0, 0.0, 0.0])),
                               math.log(2), rtol=1e-6)


def test_evaluation_summary_per_block():
  from moejax.evaluation import expert_stats
  out = expert_stats.summarize({"block_2_peer/score_sum": np.array([0.0, 2.0, 0.0, 0.0]),
                                "block_1_moe/load": np.array([1.0, 1.0])})
  assert out["block_2_peer"]["score_sum_usage"] == 0.25
  assert abs(out["block_2_peer"]["score_sum_kl_uniform"] - np.log(4)) < 1e-6   # float32
  assert out["block_1_moe"]["load_kl_uniform"] == 0.0
  assert out["block_1_moe"]["load_max_over_mean"] == 1.0
