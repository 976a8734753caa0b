"""Autoregressive decoding with a KV cache, batched, for every FFN kind (dense, MoE, PEER, PKM).

:func:`generate` (or :meth:`Generator.generate`, which keeps its compilations) decodes a
list of prompts of any lengths together. The prompts are left-padded to a common length
``P`` (a bucket: a power of two from 8, then a multiple of 256, so that varied prompt lengths
share compilations); every row keeps its own RoPE positions (``slot - padding``) and attends
only to its own tokens (``kv_valid``), so a row decodes as it would alone. Two jitted calls:

* **prefill**: the whole padded prompt ``[batch, P]`` in one forward
  (:meth:`moejax.model.Transformer.decode` at slot 0) fills a cache of ``P +
  max_new_tokens`` slots and gives the first new token;
* **decode**: a ``lax.while_loop`` of one-token steps on that cache (updated in place, no
  dispatch per token), sampling each next token, until ``max_new_tokens`` or every row has ended with
  ``eos_id``. With a ``stop`` test (e.g. stop strings, :func:`stop_at_strings`) the loop
  runs in chunks of ``check_every`` steps (the cache donated from chunk to chunk), and
  between chunks the host ends the rows that ``stop`` says are done.

Each is compiled once per (batch, ``P``, ``max_new_tokens``) and never retraced per token;
sampling settings are traced arguments.

The model runs in eval mode (:func:`prepare`): query BatchNorm uses its running statistics,
MoE layers route without dropping (``MoE.no_drop``: dropless token choice, every expert
for expert choice) and pick second experts greedily, so decoding gives the full forward
pass's outputs (:func:`full_forward_logits`) at every position.

Sampling (:func:`sample_logits`): ``temperature`` 0 is greedy (argmax); otherwise logits
are divided by the temperature, cut to the ``top_k`` best (0: all), then to the smallest set
whose probability reaches ``top_p`` (1: all), and sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.kernels import registry
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
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)

  def cut(z):   # the sort over the vocabulary runs only when a cut is asked for
    sorted_z = -jnp.sort(-z, axis=-1)                                     # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    sorted_z = jnp.where(jnp.arange(v) < k, sorted_z, -jnp.inf)
    probs = jax.nn.softmax(sorted_z, axis=-1)
    # nucleus: keep rank i while the probability before it is < top_p (at least one)
    keep = (jnp.cumsum(probs, -1) - probs) < top_p
    n_keep = jnp.maximum(jnp.sum(keep & (jnp.arange(v) < k), -1), 1)
    threshold = jnp.take_along_axis(sorted_z, (n_keep - 1)[:, None], -1)
    return jnp.where(z >= threshold, z, -jnp.inf)

  def sample():
    z = logits / jnp.maximum(temperature, 1e-6)
    z = jax.lax.cond((top_k > 0) | (top_p < 1), cut, lambda z: z, z)
    return jax.random.categorical(rng, z, axis=-1).astype(jnp.int32)

  # greedy decoding skips the sampling's work (a sort and a categorical draw per step)
  return jax.lax.cond(temperature > 0, sample,
                      lambda: _argmax(logits))


def _argmax(logits: jax.Array) -> jax.Array:
  """``[batch, vocab]`` -> int32 ``[batch]``, the first maximum (registry ``argmax``)."""
  impl = registry.find("argmax")
  return impl(logits) if impl is not None else jnp.argmax(logits, -1).astype(jnp.int32)


def _sample(logits, rng, done, temperature, top_k, top_p, eos_ids, pad_id):
  """-> (next tokens ``[b]``, ``pad_id`` in rows already done; the next rng; done, with the
  rows that sampled one of ``eos_ids [n]``)."""
  rng, sub = jax.random.split(rng)
  nxt = jnp.where(done, pad_id, sample_logits(logits, sub, temperature, top_k, top_p))
  return nxt, rng, done | jnp.isin(nxt, eos_ids)


def _id_array(eos_id: int | Sequence[int]) -> np.ndarray:
  """One end-of-sequence id or several (Llama 3's configs name three) -> int32 ``[n]``;
  -1 (none) ends no row."""
  ids = np.atleast_1d(np.asarray(eos_id, np.int32)).reshape(-1)
  return ids if ids.size else np.full((1,), -1, np.int32)


def end_ids(tokenizer_eos: int, special_eos: Sequence[int] = ()) -> tuple[int, ...]:
  """The ids that end a generated row: the tokenizer's end of sequence and the model's own
  (``config.special_tokens.eos_token_id``, from its Hugging Face checkpoint), without
  repeats."""
  return tuple(dict.fromkeys([int(tokenizer_eos), *(int(t) for t in special_eos)]))


def stop_at_strings(strings: list[list[str]], decode: Callable[[list[int]], str]
                    ) -> Callable[[int, np.ndarray], bool]:
  """A ``stop`` for :meth:`Generator.generate`: row ``i`` ends once ``decode`` of its new
  tokens contains one of ``strings[i]`` (none: it never stops this way)."""
  def stop(i: int, new: np.ndarray) -> bool:
    return bool(strings[i]) and any(s in decode([int(t) for t in new]) for s in strings[i])
  return stop


def cut_at_stop(text: str, strings: list[str]) -> str:
  """``text`` up to (without) the earliest of the stop ``strings`` (none found: all of it);
  a row :func:`stop_at_strings` ended holds its stop string, this removes it."""
  ends = [i for i in (text.find(s) for s in strings if s) if i >= 0]
  return text[:min(ends)] if ends else text


def prompt_bucket(n: int) -> int:
  """The padded prompt length of a longest prompt of ``n`` tokens: a power of two from 8 up
  to 256, then a multiple of 256 (few compilations, at most 2x or +255 padding)."""
  if n > 256:
    return -(-n // 256) * 256
  return max(8, 1 << (n - 1).bit_length())


def left_pad(prompts: list, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Prompts (lists of token ids, at least one each) -> (tokens ``[batch, P]`` int32
  left-padded with ``pad_id`` to ``P = prompt_bucket(longest)``, padding ``[batch]`` int32)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (and there must be one prompt)")
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = prompt_bucket(int(lengths.max()))
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
  return tokens, width - lengths


class Generator:
  """Generates from a Transformer with a KV cache; compiled once per (batch, prompt bucket,
  max_new_tokens).

  ``gen = Generator(model); rows = gen.generate([[ids...], ...], max_new_tokens=200)``.
  ``gen.traces`` counts how often the decode loop was traced (tests: once per shape).
  """

  def __init__(self, model: Transformer, *, mesh=None, rules=None):
    self.graphdef, self.state = nnx.split(prepare(model))
    self.mesh, self.rules = mesh, rules
    self.traces = 0
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("max_new",))
    self._first = jax.jit(self._first_fn, static_argnames=("max_new",))
    # the cache and the carry are updated in place from chunk to chunk
    self._decode = jax.jit(self._decode_fn, static_argnames=("max_new",),
                           donate_argnames=("cache", "carry"))

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _prefill_fn(self, state, tokens, padding, *, max_new):
    """tokens ``[b, P]`` left-padded by ``padding [b]`` -> (last logits ``[b, vocab]``, the
    cache of ``P + max_new`` slots, kv_valid ``[b, P + max_new]``)."""
    model = self._model(state)
    b, width = tokens.shape
    cache = model.init_cache(b, width + max_new)
    kv_valid = jnp.arange(width + max_new)[None, :] >= padding[:, None]
    positions = jnp.maximum(jnp.arange(width)[None, :] - padding[:, None], 0)
    logits, cache = model.decode(tokens, cache, jnp.int32(0), positions=positions,
                                 kv_valid=kv_valid, last_only=True)
    return logits[:, 0], cache, kv_valid

  def _first_fn(self, logits, rng, temperature, top_k, top_p, eos_ids, pad_id, *, max_new):
    """The prefill's last logits -> the decode loop's carry ``(i, out [b, max_new], rng,
    done [b], last [b])`` with the first new token in ``out[:, 0]``."""
    b = logits.shape[0]
    first, rng, done = _sample(logits, rng, jnp.zeros((b,), bool), temperature, top_k, top_p,
                               eos_ids, pad_id)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    return jnp.int32(1), out, rng, done, first

  def _decode_fn(self, state, cache, carry, kv_valid, padding, stop_at, temperature, top_k,
                 top_p, eos_ids, pad_id, *, max_new):
    """One-token steps from ``carry`` (:meth:`_first_fn`) until ``stop_at`` tokens or every
    row is done -> (cache, carry); ``out`` holds ``pad_id`` after a row's end id."""
    self.traces += 1
    model = self._model(state)
    width = kv_valid.shape[1] - max_new

    def cond(loop):
      (i, _, _, done, _), _ = loop
      return (i < stop_at) & ~jnp.all(done)

    def body(loop):
      (i, out, rng, done, last), cache = loop
      slot = width + i - 1                                   # where ``last`` sits
      logits, cache = model.decode(last[:, None], cache, slot,
                                   positions=(slot - padding)[:, None], kv_valid=kv_valid)
      nxt, rng, done = _sample(logits[:, 0], rng, done, temperature, top_k, top_p, eos_ids,
                               pad_id)
      out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
      return (i + 1, out, rng, done, nxt), cache

    carry, cache = jax.lax.while_loop(cond, body, (carry, cache))
    return cache, carry

  def prefill(self, tokens: np.ndarray, padding: np.ndarray, max_new_tokens: int):
    """The prefill alone (benchmarks): -> (last logits, cache, kv_valid), device arrays."""
    return self._call(self._prefill, (self.state, jnp.asarray(tokens), jnp.asarray(padding)),
                      max_new=max_new_tokens)

  def generate(self, prompts: list, max_new_tokens: int, *, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_id: int | Sequence[int] = -1, pad_id: int = 0, batch_size: int | None = None,
               stop: Callable[[int, np.ndarray], bool] | None = None,
               check_every: int = 16) -> list[np.ndarray]:
    """New tokens of each prompt (a list of token ids, at least one each): up to
    ``max_new_tokens``, ending at the first ``eos_id`` (included; one id or several, e.g.
    :func:`end_ids`; -1: none). Prompts are decoded
    together, ``batch_size`` at a time (None: all). Same ``seed``, same prompts and
    settings: same tokens.

    ``stop(i, new_tokens)``: True when prompt ``i``'s new tokens so far (int32 ``[n]``)
    end its row (e.g. :func:`stop_at_strings`); it must stay True for longer rows. It is
    asked between chunks of ``check_every`` decoding steps, and a row it stops ends at its
    shortest stopping length (its later tokens are dropped); the batch stops early once
    every row has ended.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if check_every < 1:
      raise ValueError(f"check_every={check_every}: must be >= 1")
    step = batch_size or max(len(prompts), 1)
    rows = []
    for n, at in enumerate(range(0, len(prompts), step)):
      row_stop = None if stop is None else (lambda i, new, at=at: stop(at + i, new))
      rows += self._generate_batch(prompts[at:at + step], max_new_tokens,
                                   jax.random.fold_in(jax.random.key(seed), n), temperature,
                                   top_k, top_p, eos_id, pad_id, row_stop, check_every)
    return rows

  def _generate_batch(self, prompts, max_new, rng, temperature, top_k, top_p, eos_id, pad_id,
                      stop, check_every):
    tokens, padding = left_pad(prompts, pad_id)
    logits, cache, kv_valid = self.prefill(tokens, padding, max_new)
    settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                jnp.asarray(_id_array(eos_id)), jnp.int32(pad_id))
    carry = self._call(self._first, (logits, rng, *settings), max_new=max_new)
    padding = jnp.asarray(padding)
    chunk = max_new if stop is None else check_every
    ends = {}                             # row -> its length, where ``stop`` ended it
    while True:
      i = int(carry[0])
      if i >= max_new or bool(jnp.all(carry[3])):
        break
      stop_at = jnp.int32(min(i + chunk, max_new))
      cache, carry = self._call(self._decode, (self.state, cache, carry, kv_valid, padding,
                                               stop_at, *settings), max_new=max_new)
      if stop is not None:
        carry = self._stop_rows(carry, stop, ends, i)
    out = np.asarray(carry[1])
    rows = []
    for r, new in enumerate(out):
      if r in ends:
        rows.append(new[:ends[r]])
        continue
      end = np.flatnonzero(np.isin(new, _id_array(eos_id)))
      rows.append(new[:end[0] + 1] if len(end) else new)
    return rows

  @staticmethod
  def _stop_rows(carry, stop, ends, checked):
    """Asks ``stop`` of each running row's new tokens after a chunk (it saw ``checked`` of
    them before); a row it stops is marked done, and its length kept in ``ends``."""
    i, out, rng, done, last = carry
    n, out_h, done_h = int(i), np.array(out), np.array(done)   # copies: out, done are donated
    for r in np.flatnonzero(~done_h):
      if stop(int(r), out_h[r, :n]):
        ends[int(r)] = next(m for m in range(max(checked, 1), n + 1) if stop(int(r), out_h[r, :m]))
        done_h[r] = True
    return i, out, rng, jnp.asarray(done_h), last

  def _call(self, fn, args, **static):
    if self.mesh is None:
      return fn(*args, **static)
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return fn(*args, **static)


def generate(model: Transformer | Generator, prompts: list[list[int]], max_new_tokens: int,
             eos_id: int | Sequence[int] = -1, *, batch_size: int | None = None,
             temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, pad_id: int = 0,
             stop: Callable[[int, np.ndarray], bool] | None = None, check_every: int = 16
             ) -> list[list[int]]:
  """New token ids of each prompt (greedy by default), prompts decoded together
  ``batch_size`` at a time (None: all at once); each row stops after its first ``eos_id``
  (included; -1: never) or where ``stop`` ends it (:meth:`Generator.generate`). ``model``:
  a Transformer (compiled anew on each call) or a :class:`Generator` (keeps its
  compilations: pass one when calling repeatedly)."""
  gen = model if isinstance(model, Generator) else Generator(model)
  rows = gen.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, eos_id=eos_id, pad_id=pad_id,
                      batch_size=batch_size, stop=stop, check_every=check_every)
  return [[int(t) for t in r] for r in rows]
