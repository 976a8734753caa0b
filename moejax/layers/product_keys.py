"""Product-key retrieval (Lample et al. 2019) shared by PEER and PKM.

Two parts:

* Pure functions (no Flax): :func:`product_key_topk` (the fast retrieval),
  :func:`brute_force_topk` (an exhaustive reference over all N = n² keys, for tests
  and the benchmark), and the gathered-row contractions :func:`gather_dot` /
  :func:`gather_weighted_sum` whose custom VJPs keep memory at one
  ``[batch, length, heads, k, d]`` tensor at a time.
* :class:`ProductKeyQuery`: the small query network both layers use (per-head query
  projection, query normalisation BatchNorm / LayerNorm / none, sub-keys), returning raw
  scores and indices of the k best product keys per head.

Product keys. Sub-key sets ``keys1``, ``keys2`` of shape ``[hk, n, d_key/2]`` (``hk`` is
the number of heads when each head has its own keys, else 1). Product key ``i = i1·n + i2``
is ``concat(keys1[i1], keys2[i2])``, so for a query ``q = concat(q1, q2)`` its score is
``q1·keys1[i1] + q2·keys2[i2]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.layers import base

QUERY_NORMS = ("batch", "layer", "none")


# ----------------------------------------------------------------------------- retrieval


def _half_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
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
  """
  d = queries.shape[-1]
  n = keys1.shape[1]
  if d % 2 or keys1.shape[-1] != d // 2 or keys2.shape != keys1.shape:
    raise ValueError(f"queries [..., {d}] need two sub-key sets [h|1, n, {d // 2}], got "
                     f"{keys1.shape} and {keys2.shape}")
  if not 1 <= k <= n:
    raise ValueError(f"top_k={k} must be in [1, n={n}]")
  dt = jnp.promote_types(queries.dtype, jnp.float32)
  q = queries.astype(dt)
  s1 = _half_scores(q[..., : d // 2], keys1.astype(dt))  # [..., h, n]
  s2 = _half_scores(q[..., d // 2:], keys2.astype(dt))
  v1, i1 = jax.lax.top_k(s1, k)                           # [..., h, k], sorted descending
  v2, i2 = jax.lax.top_k(s2, k)
  pa, pb = candidate_pairs(k)
  cand = v1[..., pa] + v2[..., pb]                        # [..., h, C], C ~ k ln k
  cidx = i1[..., pa] * n + i2[..., pb]
  scores, pos = jax.lax.top_k(cand, k)
  return scores, jnp.take_along_axis(cidx, pos, axis=-1).astype(jnp.int32)


def full_product_keys(keys1: jax.Array, keys2: jax.Array) -> jax.Array:
  """All n² product keys ``[h|1, n², d_key]``; row ``i1·n + i2`` = concat(keys1[i1], keys2[i2])."""
  n = keys1.shape[1]
  return jnp.concatenate([jnp.repeat(keys1, n, axis=1), jnp.tile(keys2, (1, n, 1))], axis=-1)


def brute_force_topk(queries: jax.Array, keys1: jax.Array, keys2: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
  """Reference: materialises all N product keys and takes the top k of N scores.

  O(N·d_key) per query-head; only for tests and the benchmark.
  """
  keys = full_product_keys(keys1, keys2)
  dt = jnp.promote_types(queries.dtype, jnp.float32)
  scores = _half_scores(queries.astype(dt), keys.astype(dt))   # [..., h, N]
  s, i = jax.lax.top_k(scores, k)
  return s, i.astype(jnp.int32)


# ------------------------------------------------------------ gathered-row contractions
#
# Both contract rows of a big table picked by ``indices [b, l, h, k]``. Their VJPs
# regather the rows instead of saving them, so the forward keeps no [b, l, h, k, d]
# residual; the backward builds one [b, l, h, k, d] row-gradient and scatter-adds it
# into a dense table-shaped gradient (what any optimizer over a dense table needs).
# ``_after`` (an optimization barrier) orders each gather after the value it needs, so
# the program needs only one [b, l, h, k, d] tensor live at a time and the backward
# regather is not CSE'd with the forward gather. (XLA:CPU's buffer assignment still
# reported 2 such tensors of temp memory in the forward and ~4 in fwd+bwd, the same as
# plain autodiff of the einsums; the gain of the custom VJP is that no gathered tensor is a
# residual, which matters under rematerialisation / scan over layers.)


def _after(indices, *deps):
  """``indices``, but only available once ``deps`` are computed."""
  return jax.lax.optimization_barrier((indices, *deps))[0]


def _gather(table, indices, dtype):
  # Gather first, then cast: casting the whole [N, d] table would cost O(N·d) per step.
  return jnp.take(table, indices, axis=0, mode="clip").astype(dtype)


def _match_vma(ct, like):
  """Inside ``shard_map``: a cotangent with the device-variance type of its primal.

  A table replicated over (say) 'data' gets row-gradients that differ per data shard: its
  cotangent is their sum (psum). Outside shard_map this is the identity.
  """
  def varying(a):   # jax 0.10: aval.mat.varying (older: aval.vma)
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))
  have, want = varying(ct), varying(like)
  if have - want:
    ct = jax.lax.psum(ct, tuple(sorted(have - want)))
  if want - have:
    ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to="varying")
  return ct


def _scatter_rows(table, indices, rows):
  d = table.shape[-1]
  return jnp.zeros_like(table).at[indices.reshape(-1)].add(
      rows.reshape(-1, d).astype(table.dtype), mode="drop")


@jax.custom_vjp
def gather_dot(table: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """``einsum('bld,blhkd->blhk', x, table[indices])`` (PEER down-projection)."""
  return jnp.einsum("bld,blhkd->blhk", x, _gather(table, indices, x.dtype))


def _gather_dot_fwd(table, indices, x):
  return gather_dot(table, indices, x), (table, indices, x)


def _gather_dot_bwd(res, da):
  table, indices, x = res
  da = da.astype(x.dtype)
  drows = jnp.einsum("blhk,bld->blhkd", da, x)
  dtable = _scatter_rows(table, _after(indices, da), drows)
  rows = _gather(table, _after(indices, dtable), x.dtype)
  dx = jnp.einsum("blhk,blhkd->bld", da, rows)
  return _match_vma(dtable, table), None, _match_vma(dx, x)


gather_dot.defvjp(_gather_dot_fwd, _gather_dot_bwd)


@jax.custom_vjp
def gather_weighted_sum(table: jax.Array, indices: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum('blhk,blhkd->bld', w, table[indices])`` (PEER up-projection, PKM read)."""
  return jnp.einsum("blhk,blhkd->bld", w, _gather(table, _after(indices, w), w.dtype))


def _gather_weighted_sum_fwd(table, indices, w):
  return gather_weighted_sum(table, indices, w), (table, indices, w)


def _gather_weighted_sum_bwd(res, dy):
  table, indices, w = res
  dy = dy.astype(w.dtype)
  drows = jnp.einsum("blhk,bld->blhkd", w, dy)
  dtable = _scatter_rows(table, _after(indices, dy), drows)
  rows = _gather(table, _after(indices, dtable), w.dtype)
  dw = jnp.einsum("bld,blhkd->blhk", dy, rows)
  return _match_vma(dtable, table), None, _match_vma(dw, w)


gather_weighted_sum.defvjp(_gather_weighted_sum_fwd, _gather_weighted_sum_bwd)


# ------------------------------------------------------------------- the expert / value mix


def _divides(size: int, axes: tuple[str, ...]) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return size % math.prod(mesh.shape[a] for a in axes) == 0


def _local_mix(x, indices, scores, down, up, activation):
  if down is None:
    w = scores
  else:
    w = activation(gather_dot(down, indices, x)) * scores
  return gather_weighted_sum(up, indices, w)


def _row_sparse_mix(x, indices, scores, down, up, activation, deltas):
  """``_local_mix`` for row-sparse training: rows = stop_gradient(table)[indices] + delta.

  The tables get no gradient; each delta's gradient is the gradient of the retrieved rows
  ``[b, l, h, k, d]`` (plain autodiff: the gathered rows are kept for the backward pass).
  """
  d_down, d_up = deltas
  if down is None:
    w = scores
  else:
    rows = _gather(jax.lax.stop_gradient(down), indices, x.dtype) + d_down.astype(x.dtype)
    w = activation(jnp.einsum("bld,blhkd->blhk", x, rows)) * scores
  rows = _gather(jax.lax.stop_gradient(up), indices, w.dtype) + d_up.astype(w.dtype)
  return jnp.einsum("blhk,blhkd->bld", w, rows)


def table_mix(x: jax.Array | None, indices: jax.Array, scores: jax.Array, *, up: jax.Array,
              down: jax.Array | None = None, activation=None,
              deltas: tuple[jax.Array | None, jax.Array] | None = None) -> jax.Array:
  """``y = Σ_{h,k} w · up[i]`` with ``w = σ(x·down[i]) · score`` (PEER) or ``w = score`` (PKM).

  x ``[b, l, d]``, indices / scores ``[b, l, h, k]``, tables ``[R, d]`` -> y ``[b, l, d]``
  in ``scores.dtype``.

  Without a mesh (or with tables and batch unsharded) this is two gathered contractions.
  Under a mesh it runs in ``jax.shard_map`` so that no device ever holds a whole table
  (GSPMD alone all-gathers row-sharded tables and replicates the gathered rows):

  * rows sharded over axes R ('table_rows'): tokens are all-gathered over the batch axes
    shared with R (small: activations of one layer), each device computes the retrieved
    rows it owns (others masked to zero; a PEER expert's u and v rows live on the same
    device, so the whole expert is local) and the outputs are summed back with
    ``psum_scatter`` (or ``psum`` over row axes that do not shard the batch). Every device
    gathers ``[tokens·|R∩batch|, h, k, d]`` rows, most of them masked: simple, exact, E×
    redundant gather work; sorting tokens by owner (a capacity-bounded dispatch) would
    remove it.
  * features sharded over axes F ('table_embed', the Meta memory-layer layout): each
    device contracts its feature slice, ``psum`` over F gives the PEER pre-activation, and
    the output slices are all-gathered over F: equal work on every shard whatever rows
    are picked.

  ``deltas`` (``(delta_down or None, delta_up)``, each ``[b, l, h, k, d]``): row-sparse
  training, see :func:`_row_sparse_mix`; tables must then be unsharded.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if deltas is not None:
    if not mesh.empty and (sharding.mesh_axes("table_rows") or sharding.mesh_axes("table_embed")):
      raise ValueError("row-sparse table updates need unsharded tables (table_rows and "
                       "table_embed on mesh axes of size 1)")
    return _row_sparse_mix(x, indices, scores, down, up, activation, deltas)
  if mesh.empty:
    return _local_mix(x, indices, scores, down, up, activation)
  rows_ax, feat_ax = sharding.mesh_axes("table_rows"), sharding.mesh_axes("table_embed")
  batch_ax = sharding.mesh_axes("batch")
  if (not rows_ax and not feat_ax) or not _divides(indices.shape[0], batch_ax) or not (
      _divides(up.shape[0], rows_ax) and _divides(up.shape[1], feat_ax)):
    return _local_mix(x, indices, scores, down, up, activation)   # GSPMD handles (or pads) it
  gather_ax = tuple(a for a in batch_ax if a in rows_ax)    # rows over a batch axis
  sum_ax = tuple(a for a in rows_ax if a not in batch_ax)
  num_rows = up.shape[0]
  rows_per = num_rows // math.prod(mesh.shape[a] for a in rows_ax) if rows_ax else num_rows
  up_dim = up.shape[1]
  d_per = up.shape[1] // math.prod(mesh.shape[a] for a in feat_ax) if feat_ax else up.shape[1]
  bspec = batch_ax if batch_ax else None
  tspec = P(rows_ax or None, feat_ax or None)
  has_x = down is not None

  def body(x, indices, scores, down, up):
    if gather_ax:
      indices = jax.lax.all_gather(indices, gather_ax, axis=0, tiled=True)
      scores = jax.lax.all_gather(scores, gather_ax, axis=0, tiled=True)
      if has_x:
        x = jax.lax.all_gather(x, gather_ax, axis=0, tiled=True)
    if rows_ax:
      local = indices - jax.lax.axis_index(rows_ax) * rows_per
      own = (local >= 0) & (local < rows_per)
      indices = jnp.where(own, local, 0)
      scores = scores * own.astype(scores.dtype)
    if has_x:
      if feat_ax:
        x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(feat_ax) * d_per, d_per, axis=-1)
      a = gather_dot(down, indices, x)
      if feat_ax:
        a = jax.lax.psum(a, feat_ax)
      w = activation(a) * scores
    else:
      w = scores
    y = gather_weighted_sum(up, indices, w)
    if gather_ax:
      y = jax.lax.psum_scatter(y, gather_ax, scatter_dimension=0, tiled=True)
    if sum_ax:
      y = jax.lax.psum(y, sum_ax)
    if feat_ax:   # all-gather of the feature slices, as a psum (its result is replicated)
      full = jnp.zeros(y.shape[:-1] + (up_dim,), y.dtype)
      y = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(
          full, y, jax.lax.axis_index(feat_ax) * d_per, axis=-1), feat_ax)
    return y

  act_spec = P(bspec)
  if not has_x:
    x = jnp.zeros((), scores.dtype)
    down = jnp.zeros((), up.dtype)
  fn = jax.shard_map(
      body,
      in_specs=(act_spec if has_x else P(), act_spec, act_spec, tspec if has_x else P(), tspec),
      out_specs=act_spec)
  return fn(x, indices, scores, down, up)


def topk_batch_parallel(queries: jax.Array, keys1: jax.Array, keys2: jax.Array,
                        k: int) -> tuple[jax.Array, jax.Array]:
  """:func:`product_key_topk` run per batch shard under a mesh (GSPMD would otherwise
  all-gather the half-scores and candidates of the whole batch around the top-k sorts)."""
  mesh = jax.sharding.get_abstract_mesh()
  batch_ax = () if mesh.empty else sharding.mesh_axes("batch")
  if not batch_ax or not _divides(queries.shape[0], batch_ax):
    return product_key_topk(queries, keys1, keys2, k)
  spec = P(batch_ax)
  return jax.shard_map(lambda q, a, b: product_key_topk(q, a, b, k),
                       in_specs=(spec, P(), P()), out_specs=(spec, spec))(queries, keys1, keys2)


def score_sum(indices: jax.Array, scores: jax.Array, num_rows: int,
              mask: jax.Array | None = None) -> jax.Array:
  """Router scores accumulated per table row: ``[num_rows]`` float32 (no gradient).

  A scatter-add of the ``b·l·h·k`` scores (padding masked out) into zeros: O(N + tokens·h·k).
  """
  s = jax.lax.stop_gradient(scores).astype(jnp.float32)
  if mask is not None:
    s = s * mask[:, :, None, None].astype(jnp.float32)
  return jnp.zeros((num_rows,), jnp.float32).at[indices.reshape(-1)].add(s.reshape(-1),
                                                                         mode="drop")


masked_mean = base.masked_mean


# ------------------------------------------------------------------ query normalisation


class MaskedBatchNorm(nnx.Module):
  """BatchNorm over the query features ``[h, d_key]``; statistics over real tokens only.

  Training (``use_running_average=False``): mean / variance over every unmasked token of
  the batch. Under jit + GSPMD these sums over the (sharded) batch axes are global, i.e.
  the statistics are those of the whole data-parallel batch, like a synchronised BN.
  Running statistics (``nnx.BatchStat``) are updated with ``momentum`` (flax convention:
  ``ra = momentum·ra + (1-momentum)·batch``) and used after ``model.eval()``.
  A batch with no real token leaves the running statistics unchanged.
  """

  def __init__(self, heads: int, d_key: int, *, momentum: float = 0.99, epsilon: float = 1e-5,
               use_running_average: bool = False):
    names = ("key_heads", "key_dim")
    self.scale = sharding.param(jnp.ones((heads, d_key), jnp.float32), names)
    self.bias = sharding.param(jnp.zeros((heads, d_key), jnp.float32), names)
    self.mean = sharding.param(jnp.zeros((heads, d_key), jnp.float32), names, kind=nnx.BatchStat)
    self.var = sharding.param(jnp.ones((heads, d_key), jnp.float32), names, kind=nnx.BatchStat)
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average

  def __call__(self, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``q [b, l, h, d]`` float32 -> normalised ``q``."""
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      w = (jnp.ones(q.shape[:2], q.dtype) if mask is None else mask.astype(q.dtype))[..., None, None]
      count = jnp.sum(w)
      denom = jnp.maximum(count, 1.0)
      mean = jnp.sum(q * w, axis=(0, 1)) / denom
      var = jnp.sum(jnp.square(q - mean) * w, axis=(0, 1)) / denom
      keep = count > 0
      m = self.momentum
      for stat, batch in ((self.mean, mean), (self.var, var)):
        old = stat[...]
        new = m * old + (1 - m) * jax.lax.stop_gradient(batch).astype(old.dtype)
        stat[...] = jnp.where(keep, new, old)
    return (q - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


class HeadLayerNorm(nnx.Module):
  """LayerNorm of each head's query over d_key (per-token, so causal-safe)."""

  def __init__(self, heads: int, d_key: int, *, epsilon: float = 1e-5):
    names = ("key_heads", "key_dim")
    self.scale = sharding.param(jnp.ones((heads, d_key), jnp.float32), names)
    self.bias = sharding.param(jnp.zeros((heads, d_key), jnp.float32), names)
    self.epsilon = epsilon

  def __call__(self, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    del mask
    mean = jnp.mean(q, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(q - mean), axis=-1, keepdims=True)
    return (q - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


# ------------------------------------------------------------------------ query network


class ProductKeyQuery(nnx.Module):
  """Per-head queries -> top-k product keys. Shared by PEER and PKM.

  Parameters (all ordinary ``nnx.Param``, not tables):
    ``query``  ``[d_model, h, d_key]`` ('embed', 'key_heads', 'key_dim'),
      init N(0, (query_init_scale)² / d_model): unit-variance queries for unit-variance x
      (LeCun); with BatchNorm the scale only matters for the first step.
    ``keys1``, ``keys2`` ``[h or 1, n, d_key/2]`` ('key_heads', 'subkeys', 'key_dim'),
      init N(0, (key_init_scale)² / (d_key/2)): every sub-key has expected unit norm, so for
      unit-variance query halves each half-score is ~N(0, 1) and the full score ~N(0, 2):
      softmax over the top k is neither one-hot nor flat at the start. (XLM uses
      U(±1/√(d_key/2)), i.e. the same up to a factor √3; PEER-pytorch uses N(0, 1).)
    ``norm``: :class:`MaskedBatchNorm` ('batch'), :class:`HeadLayerNorm` ('layer') or None.

  Returns raw scores ``[b, l, h, k]`` (float32, sorted descending) and int32 indices
  ``[b, l, h, k]`` into the n² product keys.
  """

  def __init__(self, d_model: int, *, num_keys_sqrt: int, heads: int, top_k: int, d_key: int,
               per_head_keys: bool = False, query_norm: str = "batch", bn_momentum: float = 0.99,
               norm_epsilon: float = 1e-5, query_init_scale: float = 1.0,
               key_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    if d_key % 2:
      raise ValueError(f"d_key={d_key} must be even")
    if query_norm not in QUERY_NORMS:
      raise ValueError(f"query_norm={query_norm!r} not in {QUERY_NORMS}")
    self.n, self.heads, self.top_k, self.d_key = num_keys_sqrt, heads, top_k, d_key
    self.dtype = dtype
    q_std = query_init_scale / math.sqrt(d_model)
    self.query = sharding.param(
        q_std * jax.random.normal(rngs.params(), (d_model, heads, d_key), jnp.float32),
        ("embed", "key_heads", "key_dim"))
    hk = heads if per_head_keys else 1
    k_std = key_init_scale / math.sqrt(d_key // 2)
    names = ("key_heads", "subkeys", "key_dim")
    self.keys1 = sharding.param(
        k_std * jax.random.normal(rngs.params(), (hk, num_keys_sqrt, d_key // 2), jnp.float32), names)
    self.keys2 = sharding.param(
        k_std * jax.random.normal(rngs.params(), (hk, num_keys_sqrt, d_key // 2), jnp.float32), names)
    if query_norm == "batch":
      self.norm = MaskedBatchNorm(heads, d_key, momentum=bn_momentum, epsilon=norm_epsilon)
    elif query_norm == "layer":
      self.norm = HeadLayerNorm(heads, d_key, epsilon=norm_epsilon)
    else:
      self.norm = None

  def queries(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalised queries ``[b, l, h, d_key]`` in float32 (or wider)."""
    q = jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), self.query[...].astype(self.dtype))
    q = q.astype(jnp.promote_types(q.dtype, jnp.float32))
    if self.norm is not None:
      q = self.norm(q, mask)
    return q

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    q = self.queries(x, mask)
    scores, indices = topk_batch_parallel(q, self.keys1[...], self.keys2[...], self.top_k)
    names = ("batch", "length", "key_heads", None)
    return sharding.constrain(scores, names), sharding.constrain(indices, names)


# ---------------------------------------------------------------- shared config checking


def validate_common(section: str, cfg, *, n_field: str) -> None:
  """Checks the fields PEER and PKM share; raises ConfigError (one line)."""
  from moejax.errors import config_error

  def fail(field, why, fix):
    return config_error(f"{section}.{field}", cfg[field], why, fix)

  n = cfg[n_field]
  if n < 1:
    raise fail(n_field, "must be >= 1", f"set --config.{section}.{n_field}=128")
  if cfg.heads < 1:
    raise fail("heads", "must be >= 1", f"set --config.{section}.heads=8")
  if cfg.top_k < 1 or cfg.top_k > n:
    raise fail("top_k", f"must be in [1, {section}.{n_field}={n}]",
               f"set --config.{section}.top_k={min(max(cfg.top_k, 1), n)}")
  if cfg.d_key < 2 or cfg.d_key % 2:
    raise fail("d_key", "must be even and >= 2 (it is split into two sub-key halves)",
               f"set --config.{section}.d_key={max(2, cfg.d_key + cfg.d_key % 2)}")
  if cfg.query_norm not in QUERY_NORMS:
    raise fail("query_norm", f"must be one of {list(QUERY_NORMS)}",
               f"set --config.{section}.query_norm=batch")
  if not 0.0 <= cfg.bn_momentum < 1.0:
    raise fail("bn_momentum", "must be in [0, 1)", f"set --config.{section}.bn_momentum=0.99")
  if cfg.norm_epsilon <= 0:
    raise fail("norm_epsilon", "must be > 0", f"set --config.{section}.norm_epsilon=1e-5")
  for f in [f for f in cfg.keys() if f.endswith("init_scale")]:
    if cfg[f] <= 0:
      raise fail(f, "must be > 0", f"set --config.{section}.{f}=1.0")
