"""MOEJAX_CPU_KERNELS_OFF turns off one group of the CPU backend's native kernels: the
names parse (an unknown one is a one-line error naming the valid ones), and a program
traced with a group off has none of that group's kernels, keeps the others, and computes
what it computes with every kernel on."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import pytest

from moejax.backends.cpu import native


def test_parse_groups_off():
  assert native.parse_groups_off("") == frozenset()
  assert native.parse_groups_off(" topk , attention,,") == {"topk", "attention"}
  assert native.parse_groups_off(",".join(native.GROUPS)) == set(native.GROUPS)
  with pytest.raises(native.KernelSwitchError) as e:
    native.parse_groups_off("topk,atention")
  message = str(e.value)
  assert "\n" not in message and "'atention'" in message
  assert f"(valid: {', '.join(native.GROUPS)})" in message


def test_an_unknown_group_is_an_error_when_a_kernel_is_traced(monkeypatch):
  monkeypatch.setenv(native.OFF_VARIABLE, "scatter,lookups")
  with pytest.raises(native.KernelSwitchError, match="unknown kernel group 'lookups'"):
    native.top_k(jnp.zeros((2, 8)), 3)


def _attention(q, k, v):
  mask = jnp.tril(jnp.ones((1, 1, q.shape[1], q.shape[1]), bool))
  sin = jnp.sin(jnp.arange(q.shape[1] * 2.0).reshape(1, q.shape[1], 2) / 7)
  return native.attention(q, k, v, mask, sin, jnp.sqrt(1 - sin * sin))


def _peer_lookup_loss(x, scores, up, down):
  """The reference lookup (top-k of scores, row contractions, scatter in its backward)."""
  from moejax.kernels import lookup_xla
  _, idx = native.top_k(scores, 4)                                 # [t, h, 4]
  s = jnp.take_along_axis(scores, idx, axis=-1)
  y = lookup_xla.lookup(x, idx, jax.nn.softmax(s), up, down, activation="gelu")
  return jnp.sum(jnp.sin(y))


def _adam(table, mu, nu, g):
  from moejax.training import row_sparse
  rows = jnp.arange(0, 2 * g.shape[0], 2, dtype=jnp.int32)
  return row_sparse.adam_on_unique_rows(table, mu, nu, rows, g, count=jnp.int32(2), lr=1e-2,
                                        b1=0.9, b2=0.999, eps=1e-8)


def _routed_ffn(x, weight, wi, wg, wo):
  """A few tokens' top-2 experts on the CPU's dropless path (the routed FFN kernel)."""
  from moejax.backends.cpu import moe_dispatch
  from moejax.layers.moe.dispatch import DispatchOptions
  expert = jnp.array([[0, 3], [2, 1], [3, 0]], jnp.int32)
  y = moe_dispatch.blocked_combine(x, expert, weight, (wi, wg, wo), "silu",
                                   DispatchOptions(impl="blocked", block=0))
  return jnp.sum(jnp.sin(y))


def _few_row_projection(x, w):
  """A few tokens' projection (the CPU backend's few-row matmul)."""
  from moejax.backends.cpu import projection
  return jnp.sum(jnp.sin(projection.project(x, w)))


def _cached_attention(x, k, v):
  """One new token per row attending over a KV cache (grouped-query heads)."""
  from flax import nnx

  from moejax.layers.attention import Attention
  attn = Attention(16, 4, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
  valid = jnp.arange(k.shape[1])[None, :] < jnp.array([[7], [3]])
  y, _ = attn.decode(x, jnp.array([[6], [6]]), {"k": k, "v": v}, jnp.int32(6), kv_valid=valid)
  return jnp.sum(jnp.sin(y))


def _programs():
  """{group: (f, args)}: a computation that runs that group's kernels when all are on."""
  ks = jax.random.split(jax.random.key(3), 6)
  n, d, t, h = 64, 16, 40, 2
  q, k, v = (jax.random.normal(kk, (2, 12, 2, 4)) for kk in ks[:3])
  lookup_args = (jax.random.normal(ks[3], (t, d)), jax.random.normal(ks[4], (t, h, 16)),
                 jax.random.normal(ks[5], (n, d)), jax.random.normal(ks[0], (n, d)))
  lookup = jax.value_and_grad(_peer_lookup_loss, argnums=(0, 2, 3))
  adam_args = (jax.random.normal(ks[1], (n, d)), jnp.zeros((n, d)), jnp.ones((n, d)),
               jax.random.normal(ks[2], (20, d)))
  return {"topk": (lookup, lookup_args), "lookup": (lookup, lookup_args),
          "scatter": (lookup, lookup_args),
          "adam_rows": (_adam, adam_args),
          "attention": (jax.value_and_grad(lambda *a: jnp.sum(_attention(*a) ** 2),
                                           argnums=(0, 1, 2)), (q, k, v)),
          "routed_ffn": (jax.value_and_grad(_routed_ffn, argnums=(0, 1, 2, 3, 4)),
                         (jax.random.normal(ks[0], (3, d)), jax.random.uniform(ks[1], (3, 2)),
                          jax.random.normal(ks[2], (4, d, 24)) / 4,
                          jax.random.normal(ks[3], (4, d, 24)) / 4,
                          jax.random.normal(ks[4], (4, 24, d)) / 4)),
          "few_row_matmul": (jax.value_and_grad(_few_row_projection, argnums=(0, 1)),
                             (jax.random.normal(ks[5], (2, 3, d)), jax.random.normal(ks[0], (d, 40)))),
          "cached_attention": (jax.value_and_grad(_cached_attention, argnums=(0, 1, 2)),
                               (jax.random.normal(ks[1], (2, 1, 16)),
                                jax.random.normal(ks[2], (2, 9, 2, 4)),
                                jax.random.normal(ks[3], (2, 9, 2, 4))))}


def test_every_group_has_a_program_here():
  assert set(_programs()) == set(native.GROUPS)


def _kernels_in(text: str) -> set[str]:
  return set(re.findall(r"moejax_\w+_f32", text))


@pytest.mark.parametrize("group", list(native.GROUPS))
def test_a_group_off_runs_its_xla_form_with_the_same_results(group, monkeypatch):
  assert native.available(), "the C++ CPU kernels did not build"
  f, args = _programs()[group]
  monkeypatch.delenv(native.OFF_VARIABLE, raising=False)
  on = jax.jit(lambda *a: f(*a))
  on_kernels = _kernels_in(on.lower(*args).as_text())
  assert set(native.GROUPS[group]) & on_kernels, on_kernels
  want = on(*args)
  monkeypatch.setenv(native.OFF_VARIABLE, group)
  off = jax.jit(lambda *a: f(*a))   # a new function: jit's trace cache ignores the switch
  off_kernels = _kernels_in(off.lower(*args).as_text())
  # The scatter kernel writes the lookup backward's accumulator whole, from zeros, in its
  # one-chunk form, which needs the contractions too: the lookup off chunks it (XLA's scatter).
  also_off = set(native.GROUPS["scatter"]) if group == "lookup" else set()
  assert off_kernels == on_kernels - set(native.GROUPS[group]) - also_off, (on_kernels,
                                                                             off_kernels)
  chex.assert_trees_all_close(off(*args), want, rtol=2e-5, atol=2e-5)
