"""Autoregressive decoding with a KV cache, for every FFN kind (dense, MoE, PEER, PKM).

:class:`Generator` runs a whole generation -- prompt and new tokens -- as one jitted
``lax.fori_loop`` over positions: each step feeds one token per row through
:meth:`moejax.model.Transformer.decode` (keys / values of earlier positions come from the
cache), takes the next-token logits and either copies the next prompt token (rows whose
prompt is not finished: prompts of different lengths share the loop) or samples. The
function is compiled once per (batch, max length) and never retraced per token; sampling
settings are traced arguments.

The model runs in eval mode (:func:`prepare`): query BatchNorm uses its running statistics,
MoE layers route without dropping (``MoE.no_drop``: dropless token choice, every expert
for expert choice) and pick second experts greedily, so decoding token by token gives the
full forward pass's outputs (:func:`full_forward_logits`) at every position.

Sampling (:func:`sample_logits`): ``temperature`` 0 is greedy (argmax); otherwise logits
are divided by the temperature, cut to the ``top_k`` best (0: all), then to the smallest set
whose probability reaches ``top_p`` (1: all), and sampled.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.model import Transformer


def prepare(model: Transformer) -> Transformer:
  """A copy of ``model`` set up for decoding: eval mode, MoE layers drop nothing and route
  second experts greedily (no randomness inside the decoder)."""
  from moejax.layers.moe import MoE
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, state)          # shares arrays, own attributes
  model.eval()
  for _, m in nnx.iter_modules(model):
    if isinstance(m, MoE):
      m.no_drop = True
      m.settings = m.settings.replace(second_policy_eval="all")
  return model


def full_forward_logits(model: Transformer, tokens: jax.Array) -> jax.Array:
  """Logits ``[batch, length, vocab]`` of the full forward pass of a :func:`prepare`d model
  (what decoding with the cache must reproduce)."""
  return model(tokens)[0]


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Next tokens ``[batch]`` from ``logits [batch, vocab]`` (float32).

  ``temperature`` <= 0: greedy. ``top_k`` <= 0: no top-k cut. ``top_p`` >= 1: no nucleus
  cut. All three may be traced scalars.
  """
  v = logits.shape[-1]
  greedy = jnp.argmax(logits, -1).astype(jnp.int32)
  z = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  sorted_z = -jnp.sort(-z, axis=-1)                                       # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
  sorted_z = jnp.where(jnp.arange(v) < k, sorted_z, -jnp.inf)
  probs = jax.nn.softmax(sorted_z, axis=-1)
  # nucleus: keep rank i while the probability before it is < top_p (at least one)
  keep = (jnp.cumsum(probs, -1) - probs) < top_p
  n_keep = jnp.maximum(jnp.sum(keep & (jnp.arange(v) < k), -1), 1)
  threshold = jnp.take_along_axis(sorted_z, (n_keep - 1)[:, None], -1)
  z = jnp.where(z >= threshold, z, -jnp.inf)
  sampled = jax.random.categorical(rng, z, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def _write_next(tokens, logits, t, rng, done, lengths, temperature, top_k, top_p, eos_id,
                pad_id):
  """Token ``t + 1`` of every row from ``logits [b, vocab]`` at ``t``: the prompt's own token
  while the prompt lasts, else a sample (``pad_id`` once a row has ended with ``eos_id``).
  Returns the updated (tokens ``[b, T]``, rng, done ``[b]``)."""
  rng, sub = jax.random.split(rng)
  nxt = sample_logits(logits, sub, temperature, top_k, top_p)
  forced = t + 1 < lengths
  given = jax.lax.dynamic_slice_in_dim(tokens, t + 1, 1, axis=1)[:, 0]
  nxt = jnp.where(forced, given, jnp.where(done, pad_id, nxt))
  done = done | (~forced & (nxt == eos_id))
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], t + 1, axis=1)
  return tokens, rng, done


class Generator:
  """Generates from a Transformer with a KV cache; one compilation per (batch, max length).

  ``gen = Generator(model); rows = gen.generate([[ids...], ...], max_new_tokens=200)``.
  ``gen.traces`` counts how often the loop was traced (tests: once per shape).
  """

  def __init__(self, model: Transformer, *, mesh=None, rules=None):
    self.graphdef, self.state = nnx.split(prepare(model))
    self.mesh, self.rules = mesh, rules
    self.traces = 0
    self._run = jax.jit(self._loop)
    self._full = jax.jit(self._full_loop)

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _loop(self, state, tokens, lengths, rng, temperature, top_k, top_p, eos_id, pad_id):
    """tokens ``[b, T]`` (prompts, right-padded), lengths ``[b]`` -> tokens ``[b, T]``."""
    self.traces += 1
    model = self._model(state)
    b, t_max = tokens.shape
    cache = model.init_cache(b, t_max)

    def body(t, carry):
      tokens, cache, rng, done = carry
      cur = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)               # [b, 1]
      logits, cache = model.decode(cur, cache, t)
      tokens, rng, done = _write_next(tokens, logits[:, 0], t, rng, done, lengths, temperature,
                                      top_k, top_p, eos_id, pad_id)
      return tokens, cache, rng, done

    done = jnp.zeros((b,), bool)
    tokens, *_ = jax.lax.fori_loop(0, t_max - 1, body, (tokens, cache, rng, done))
    return tokens

  def _full_loop(self, state, tokens, lengths, rng, temperature, top_k, top_p, eos_id, pad_id):
    """The same generation without a cache: the full forward over all ``T`` positions at
    every step (the baseline of ``benchmarks/generate.py``)."""
    model = self._model(state)
    b, t_max = tokens.shape

    def body(t, carry):
      tokens, rng, done = carry
      logits = jax.lax.dynamic_slice_in_dim(full_forward_logits(model, tokens), t, 1, axis=1)
      return _write_next(tokens, logits[:, 0], t, rng, done, lengths, temperature, top_k, top_p,
                         eos_id, pad_id)

    tokens, *_ = jax.lax.fori_loop(0, t_max - 1, body,
                                   (tokens, rng, jnp.zeros((b,), bool)))
    return tokens

  def generate(self, prompts: list, max_new_tokens: int, *, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int = -1,
               pad_id: int = 0, use_cache: bool = True) -> list[np.ndarray]:
    """New tokens of each prompt (a list of token ids, at least one each): up to
    ``max_new_tokens``, ending at the first ``eos_id`` (included). Same ``seed``, same
    prompts and settings: same tokens."""
    if any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    t_max = int(lengths.max()) + max_new_tokens
    tokens = np.full((len(prompts), t_max), pad_id, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    fn = self._run if use_cache else self._full
    args = (self.state, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
            jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(eos_id),
            jnp.int32(pad_id))
    out = np.asarray(self._call(fn, args))
    rows = []
    for i, n in enumerate(lengths):
      new = out[i, n:n + max_new_tokens]
      stop = np.flatnonzero(new == eos_id)
      rows.append(new[:stop[0] + 1] if len(stop) else new)
    return rows

  def _call(self, fn, args):
    if self.mesh is None:
      return fn(*args)
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return fn(*args)
