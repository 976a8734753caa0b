"""Product-key top-k retrieval in XLA, tuned: the ``reference`` kernel choice (what runs where
no Pallas kernel does) and the structure the Pallas kernels share with it (the candidate
pairs, the rescoring and its VJP). Tuned, so not an oracle: it selects from ~k·ln k
candidate pairs, chunks tokens on CPU and takes top-k and row ops from the platform backend
(``row_ops``); it is tested against the brute-force
:func:`moejax.kernels.reference.product_key_topk`.

Product keys (Lample et al. 2019). Sub-key sets ``keys1``, ``keys2`` of shape
``[hk, n, d_key/2]`` (``hk`` = number of heads when each head has its own keys, else 1).
Product key ``i = i1·n + i2`` is ``concat(keys1[i1], keys2[i2])``, so for a query
``q = concat(q1, q2)`` its score is ``q1·keys1[i1] + q2·keys2[i2]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax import kernels
from moejax.kernels import row_ops

# top_k and the row contractions: XLA's, or the platform backend's (row_ops).
_rows = row_ops.implementation


def half_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
  """``q [..., h, dh]`` · ``keys [h|1, n, dh]`` -> ``[..., h, n]``."""
  if keys.shape[0] == 1:
    return jnp.einsum("...hd,nd->...hn", q, keys[0])
  return jnp.einsum("...hd,hnd->...hn", q, keys)


@functools.lru_cache(maxsize=None)
def candidate_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
  """Rank pairs ``(a, b)`` (0-based) with ``(a+1)·(b+1) <= k``.

  If the candidate at ranks (a, b) of the two sorted half-lists is among the top k of
  all N keys, every pair (a', b') with a' <= a, b' <= b scores at least as high, and there
  are (a+1)(b+1) of them; so only these pairs can be in the top k (ties aside: for an
  order that breaks ties by a + b the top k lies entirely in this down-set). That is
  ~k·ln k candidates instead of k² (50 instead of 256 for k = 16) with the same result.
  """
  pa, pb = [], []
  for a in range(k):
    for b in range(k // (a + 1)):
      pa.append(a)
      pb.append(b)
  return np.asarray(pa, np.int32), np.asarray(pb, np.int32)


def check_shapes(queries: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int) -> None:
  d = queries.shape[-1]
  n = keys1.shape[1]
  if d % 2 or keys1.shape[-1] != d // 2 or keys2.shape != keys1.shape:
    raise ValueError(f"queries [..., {d}] need two sub-key sets [h|1, n, {d // 2}], got "
                     f"{keys1.shape} and {keys2.shape}")
  if keys1.shape[0] not in (1, queries.shape[-2]):
    raise ValueError(f"sub-keys {keys1.shape}: first dim must be 1 or heads={queries.shape[-2]}")
  if not 1 <= k <= n:
    raise ValueError(f"top_k={k} must be in [1, n={n}]")


# Half-scores held per chunk of tokens (bytes) on CPU. Chunking keeps a chunk's [h, c, n]
# scores near the cores between the matmul and the top-k instead of in memory; bigger
# chunks make the matmuls efficient; much larger ones spill the scores past the last-level
# cache again. 8 MiB was the best of the sizes tried (benchmarks/RESULTS.md).
CHUNK_BYTES = 8 << 20


def _select(s1: jax.Array, s2: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top k of ``s1[..., i1] + s2[..., i2]`` over all ``(i1, i2)``, from half-scores
  ``s1, s2 [..., n]``: scores and indices ``i1·n + i2``, ``[..., k]``."""
  n = s1.shape[-1]
  v1, i1 = _rows().top_k(s1, k)                         # [..., k], sorted descending
  v2, i2 = _rows().top_k(s2, k)
  pa, pb = candidate_pairs(k)
  cand = v1[..., pa] + v2[..., pb]                       # [..., C], C ~ k ln k
  cidx = i1[..., pa] * n + i2[..., pb]
  scores, pos = _rows().top_k(cand, k)
  return scores, jnp.take_along_axis(cidx, pos, axis=-1).astype(jnp.int32)


def _topk_dense(q: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int):
  """The algorithm on ``q [..., h, d_key]`` (no custom VJP, no chunking)."""
  d = q.shape[-1]
  return _select(half_scores(q[..., : d // 2], keys1), half_scores(q[..., d // 2:], keys2), k)


def _topk_head_major(q: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int):
  """The algorithm on head-major ``q [h, c, d_key]`` -> ``[h, c, k]``: the half-scores are
  batched matmuls' natural ``[h, c, n]`` (a chunk of :func:`_topk_dense` would transpose
  them to ``[c, h, n]``, one more pass over every score)."""
  d = q.shape[-1]

  def half(qh, keys):
    if keys.shape[0] == 1:
      return jnp.einsum("hcd,nd->hcn", qh, keys[0])
    return jnp.einsum("hcd,hnd->hcn", qh, keys)

  return _select(half(q[..., : d // 2], keys1), half(q[..., d // 2:], keys2), k)


def _topk_chunked(queries: jax.Array, keys1: jax.Array, keys2: jax.Array, k: int):
  """:func:`_topk_dense` (over chunks of tokens on CPU, ``lax.map``), in at least float32."""
  dt = jnp.promote_types(queries.dtype, jnp.float32)
  lead, (h, d) = queries.shape[:-2], queries.shape[-2:]
  t = math.prod(lead)
  keys1, keys2 = keys1.astype(dt), keys2.astype(dt)
  q = queries.reshape(t, h, d).astype(dt)
  c = kernels.cache_chunk(t, h * keys1.shape[1] * jnp.dtype(dt).itemsize, CHUNK_BYTES)
  if c == t:   # one chunk (TPU / GPU, or few tokens): no loop
    s, i = _topk_dense(q, keys1, keys2, k)
    return s.reshape(lead + (h, k)), i.reshape(lead + (h, k))
  pad = -t % c
  if pad:   # padded tokens: their results are dropped
    q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
  chunks = q.reshape(-1, c, h, d).transpose(0, 2, 1, 3)     # [steps, h, c, d]
  s, i = jax.lax.map(lambda qc: _topk_head_major(qc, keys1, keys2, k), chunks)

  def tokens_major(a):   # [steps, h, c, k] -> [..., h, k]
    return a.transpose(0, 2, 1, 3).reshape(-1, h, k)[:t].reshape(lead + (h, k))

  return tokens_major(s), tokens_major(i)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _topk(queries, keys1, keys2, k):
  return _topk_chunked(queries, keys1, keys2, k)


def _topk_fwd(queries, keys1, keys2, k):
  scores, idx = _topk_chunked(queries, keys1, keys2, k)
  return (scores, idx), (queries, keys1, keys2, idx)


def _topk_bwd(k, res, cts):
  del k
  queries, keys1, keys2, idx = res
  return rescore_vjp(queries, keys1, keys2, idx, cts[0], row_kernels=True)


_topk.defvjp(_topk_fwd, _topk_bwd)


def product_key_topk(queries: jax.Array, keys1: jax.Array, keys2: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the n² product keys in O((n + k log k)·d_key) per query-head.

  Args:
    queries: ``[..., h, d_key]`` (d_key even).
    keys1, keys2: sub-keys ``[h or 1, n, d_key/2]``.
    k: keys to return, ``k <= n``.

  Returns:
    ``(scores, indices)``, both ``[..., h, k]``, sorted by descending score; ``indices``
    are int32 in ``[0, n²)`` with ``index = i1·n + i2``. Scores are computed in at least
    float32 and are differentiable w.r.t. queries and keys (indices are not).

  Runs over chunks of tokens (``[c, h, n]`` half-scores of :data:`CHUNK_BYTES` each); the
  gradient is that of :func:`rescore` at the selected indices (:func:`rescore_vjp`, as
  the Pallas kernels), O(k·d_key) per query-head instead of the dense ``[..., h, n]``
  half-score cotangents that autodiff through ``top_k`` would build.
  """
  check_shapes(queries, keys1, keys2, k)
  return _topk(queries, keys1, keys2, k)


def rescore(queries: jax.Array, keys1: jax.Array, keys2: jax.Array,
            indices: jax.Array) -> jax.Array:
  """Scores ``[..., h, k]`` of given product-key ``indices [..., h, k]`` (differentiable).

  The gradient of a retrieval w.r.t. queries and sub-keys flows only through the selected
  scores; a kernel that returns indices can use this for its backward pass.
  """
  n = keys1.shape[1]
  d = queries.shape[-1]
  dt = jnp.promote_types(queries.dtype, jnp.float32)
  q = queries.astype(dt)
  i1, i2 = indices // n, indices % n

  def part(qh, keys, i):
    if keys.shape[0] == 1:
      rows = jnp.take(keys[0].astype(dt), i, axis=0)                 # [..., h, k, dh]
    else:
      h = keys.shape[0]
      flat = keys.astype(dt).reshape(h * n, -1)
      rows = jnp.take(flat, i + (jnp.arange(h) * n)[:, None], axis=0)
    return jnp.einsum("...hd,...hkd->...hk", qh, rows)

  return part(q[..., : d // 2], keys1, i1) + part(q[..., d // 2:], keys2, i2)


def rescore_vjp(queries: jax.Array, keys1: jax.Array, keys2: jax.Array, indices: jax.Array,
                g_scores: jax.Array, *, chunk_tokens: int = 1024, row_kernels: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of ``Σ g_scores · rescore(queries, keys1, keys2, indices)`` w.r.t. queries
  and sub-keys, over chunks of ``chunk_tokens`` tokens; with ``row_kernels`` (the
  reference's own backward) the CPU row kernels where they run, unchunked.

  The plain VJP gathers ``[T, h, k, d_key/2]`` sub-key rows twice (268 MB at T = 8192,
  h = 8, k = 16, d_key = 128); chunked, one chunk's rows are live at a time and the sub-key
  gradients (``[hk, n, d_key/2]``, small) are summed over chunks in a fixed order.
  """
  lead = queries.shape[:-2]
  h, d = queries.shape[-2:]
  k = indices.shape[-1]
  t = math.prod(lead)
  q = queries.reshape(t, h, d)
  idx = indices.reshape(t, h, k)
  g = g_scores.reshape(t, h, k).astype(jnp.promote_types(queries.dtype, jnp.float32))
  if row_kernels and _rows().fused(q, keys1, keys2, g):
    dq, d1, d2 = _rescore_vjp_rows(q, keys1, keys2, idx, g)
    return dq.reshape(queries.shape), d1, d2
  c = max(1, min(chunk_tokens, t))
  pad = -t % c
  if pad:   # padded tokens: index 0 with zero cotangent contribute nothing
    q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    idx = jnp.pad(idx, ((0, pad), (0, 0), (0, 0)))
    g = jnp.pad(g, ((0, pad), (0, 0), (0, 0)))
  steps = (t + pad) // c

  def body(acc, xs):
    qc, ic, gc = xs
    _, vjp = jax.vjp(lambda q_, a, b: rescore(q_, a, b, ic), qc, keys1, keys2)
    dq, d1, d2 = vjp(gc)
    return (acc[0] + d1, acc[1] + d2), dq

  zeros = (jnp.zeros(keys1.shape, keys1.dtype), jnp.zeros(keys2.shape, keys2.dtype))
  (d1, d2), dq = jax.lax.scan(
      body, zeros, (q.reshape(steps, c, h, d), idx.reshape(steps, c, h, k),
                    g.reshape(steps, c, h, k)))
  dq = dq.reshape(steps * c, h, d)[:t].reshape(queries.shape).astype(queries.dtype)
  return dq, d1, d2


def _rescore_vjp_rows(q, keys1, keys2, idx, g):
  """:func:`rescore_vjp` with the CPU row kernels, all tokens at once: per half,
  ``dq = Σ_j g · keys[i]`` (``gather_weighted_sum``) and ``dkeys[i] += g · q``
  (``scatter_outer_add``), each sub-key row read or written in place, so no
  ``[T, h, k, d_key/2]`` rows exist and no chunks are needed. ``q [t, h, d]``, ``idx, g
  [t, h, k]``; float32 operands (where the backend's row ops are ``fused``).

  Why: the chunked scan gathered the rows, contracted, and scatter-added them back with
  XLA's ops, ~0.1 of the row-sparse PEER LM step at N = 1024², 4096 tokens on 2 cores.
  """
  t, h, d = q.shape
  k = idx.shape[-1]
  n = keys1.shape[1]

  def half(qh, keys, i):
    flat = keys.reshape(-1, keys.shape[-1])                           # [h|1 · n, d/2]
    rows = (i if keys.shape[0] == 1 else i + (jnp.arange(h) * n)[:, None]).reshape(t * h, k)
    gh = g.reshape(t * h, k)
    dq = _rows().gather_weighted_sum(flat, rows, gh)              # [t·h, d/2]
    dk = _rows().scatter_outer_add(jax.ShapeDtypeStruct(flat.shape, jnp.float32), rows, gh,
                                       qh.reshape(t * h, -1))
    return dq.reshape(t, h, -1), kernels.match_vma(dk.reshape(keys.shape), keys)

  dq1, d1 = half(q[..., : d // 2], keys1, idx // n)
  dq2, d2 = half(q[..., d // 2:], keys2, idx % n)
  return jnp.concatenate([dq1, dq2], axis=-1), d1, d2
