"""The PEER / PKM expert lookup in XLA ops, tuned: the ``reference`` kernel choice.

Tuned, not an oracle (that is :func:`moejax.kernels.reference.lookup`): it runs over chunks
of tokens sized to a core's cache where the platform's backend chunks, and its row gathers
and contractions are the backend's (``row_ops``; the CPU's native kernels).

PEER: ``y = Σ_{h,k} score · σ(x · down[i]) · up[i]``; PKM: ``y = Σ_{h,k} score · up[i]``
(the same lookup without ``down``), with ``i = indices[..., h, k]``.

Shapes: x ``[..., d]`` (any leading token dims), indices / scores ``[..., h, k]``, tables
``[N, d]`` -> y ``[..., d]`` in ``scores.dtype``.

Two gradient forms of the tables:

* :func:`lookup` — dense ``[N, d]`` table gradients (what optax over a dense table wants).
* :func:`lookup_sparse` — row-sparse: the tables get no gradient; each table has a *tap*
  ``[U, d]`` (zeros) on its rows ``unique_rows(indices, N)``, and the tap's gradient is
  the table gradient of exactly those rows, summed over repeats. Lazy Adam
  (``moejax.training.row_sparse``) consumes (unique rows, tap gradients) as they are.

Both run over chunks of tokens (``lax.map`` / ``lax.scan``, :data:`CHUNK_BYTES` of
gathered rows ``[c, h·k, d]`` per chunk): a chunk's rows are contracted while in cache, so
nothing of size ``[..., h, k, d]`` reaches memory (on CPU the lookup is memory-bound, and
writing and re-reading two such tensors cost twice the table reads themselves). The
backward regathers the rows (none are saved) and scatter-adds each chunk's row gradients
into the ``[N, d]`` gradient or the ``[U, d]`` tap gradients, in token order
(deterministic).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moejax import kernels
from moejax.kernels import activations, match_vma, row_ops
from moejax.kernels.row_plan import row_slots, unique_rows

# The row gathers and contractions: XLA's, or the platform backend's (row_ops).
_rows = row_ops.implementation

# Gathered rows per chunk of tokens (bytes): stays in a core's cache.
CHUNK_BYTES = 4 << 20


# ------------------------------------------------------------- gathered-row contractions
#
# ``_after`` (an optimization barrier) orders each gather after the value it needs, so the
# program holds one [..., h, k, d] tensor at a time and the backward regather is not CSE'd
# with the forward gather.


def _after(indices, *deps):
  """``indices``, but only available once ``deps`` are computed."""
  return jax.lax.optimization_barrier((indices, *deps))[0]


def _gather(table, indices, dtype):
  # Gather first, then cast: casting the whole [N, d] table would cost O(N·d) per step.
  # (= jnp.take(mode="clip"); on CPU a prefetching C++ row copy.)
  return _rows().take_rows(table, indices).astype(dtype)


def _scatter_rows(table, indices, rows):
  d = table.shape[-1]
  return jnp.zeros_like(table).at[indices.reshape(-1)].add(
      rows.reshape(-1, d).astype(table.dtype), mode="drop")


@jax.custom_vjp
def gather_dot(table: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """``einsum('...d,...hkd->...hk', x, table[indices])`` (PEER down-projection)."""
  return jnp.einsum("...d,...hkd->...hk", x, _gather(table, indices, x.dtype))


def _gather_dot_fwd(table, indices, x):
  return gather_dot(table, indices, x), (table, indices, x)


def _gather_dot_bwd(res, da):
  table, indices, x = res
  da = da.astype(x.dtype)
  drows = jnp.einsum("...hk,...d->...hkd", da, x)
  dtable = _scatter_rows(table, _after(indices, da), drows)
  rows = _gather(table, _after(indices, dtable), x.dtype)
  dx = jnp.einsum("...hk,...hkd->...d", da, rows)
  return match_vma(dtable, table), None, match_vma(dx, x)


gather_dot.defvjp(_gather_dot_fwd, _gather_dot_bwd)


@jax.custom_vjp
def gather_weighted_sum(table: jax.Array, indices: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum('...hk,...hkd->...d', w, table[indices])`` (PEER up-projection, PKM read)."""
  return jnp.einsum("...hk,...hkd->...d", w, _gather(table, _after(indices, w), w.dtype))


def _gather_weighted_sum_fwd(table, indices, w):
  return gather_weighted_sum(table, indices, w), (table, indices, w)


def _gather_weighted_sum_bwd(res, dy):
  table, indices, w = res
  dy = dy.astype(w.dtype)
  drows = jnp.einsum("...hk,...d->...hkd", w, dy)
  dtable = _scatter_rows(table, _after(indices, dy), drows)
  rows = _gather(table, _after(indices, dtable), w.dtype)
  dw = jnp.einsum("...d,...hkd->...hk", dy, rows)
  return match_vma(dtable, table), None, match_vma(dw, w)


gather_weighted_sum.defvjp(_gather_weighted_sum_fwd, _gather_weighted_sum_bwd)


# ---------------------------------------------------------------------------- the lookup
#
# On flat arrays: x [T, d] (None for PKM), idx / scores [T, H] (H = h·k), tables [R, d].


def _chunk_size(t: int, h: int, d: int, dtype, fused: bool) -> int:
  """Tokens per chunk: ``CHUNK_BYTES`` of gathered rows on CPU, all ``t`` elsewhere and
  where the C++ row contractions run (``fused``: they hold no gathered rows)."""
  if fused:
    return t
  return kernels.cache_chunk(t, h * d * jnp.dtype(dtype).itemsize, CHUNK_BYTES)


def _chunks(t: int, c: int, arrays):
  """Arrays ``[t, ...]`` (None passes) -> ``[ceil(t/c), c, ...]``, zero-padded: a padded
  token has index 0 and score and cotangent 0, so it adds nothing anywhere."""
  pad = -t % c

  def one(a):
    if a is None:
      return None
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a
    return a.reshape((t + pad) // c, c, *a.shape[1:])

  return tuple(one(a) for a in arrays)


def _unchunk(a, t: int):
  return None if a is None else a.reshape(-1, *a.shape[2:])[:t]


def _fused(scores, up, down) -> bool:
  """Whether the backend's row contractions (``row_ops``) hold no gathered rows here."""
  return _rows().fused(*((scores, up) if down is None else (scores, up, down)))


def _forward(x, idx, scores, up, down, activation):
  """``(y [T, d] in scores.dtype, a [T, H] = x · down rows or None)``, one chunk of tokens
  at a time."""
  t, hh = idx.shape
  dt = scores.dtype
  act, _ = activations.get(activation)

  def chunk(args):
    xc, ic, sc = args
    w, a = sc, None
    if down is not None:
      a = _rows().gather_dot(down, ic, xc.astype(dt))
      w = act(a) * sc
    return _rows().gather_weighted_sum(up, ic, w), a

  c = _chunk_size(t, hh, up.shape[-1], dt, _fused(scores, up, down))
  if c == t:   # one chunk (TPU / GPU, the C++ kernels, or a small batch): no loop
    return chunk((x, idx, scores))
  y, a = jax.lax.map(chunk, _chunks(t, c, (x, idx, scores)))
  return _unchunk(y, t), _unchunk(a, t)


def _residual_a(a, scores, up, down):
  """The forward's ``a`` where the C++ backward takes it (it saves a third random read of
  ``down``'s rows); elsewhere None: the backward gathers those rows for ``dx`` anyway and
  recomputes ``a`` from them, holding no ``[T, H]`` residual."""
  return a if a is not None and _fused(scores, up, down) else None


def _backward(x, idx, scores, up, down, dy, activation, targets, num_targets, acc_dtypes,
              saved_a=None):
  """The lookup's VJP, one chunk of tokens at a time (rows regathered per chunk; ``a`` from
  ``saved_a [T, H]`` if given, else recomputed).

  The row gradients of retrieval ``(t, j)`` (``alpha·x_t`` for down, ``beta·dy_t`` for up)
  are scatter-added at ``targets[t, j]`` of ``[num_targets, d]`` accumulators of
  ``acc_dtypes`` (up, down): the table rows (dense) or the tap slots (row-sparse).
  Returns ``(dx [T, d] or None, dscores [T, H], grad_up, grad_down or None)``.
  """
  t, hh = idx.shape
  d = up.shape[-1]
  dt = scores.dtype
  act, dact = activations.get(activation)
  # Inside shard_map the accumulators vary like everything summed into them (scan carry).
  vary = tuple(sorted(set().union(*(kernels.varying(a) for a in (x, idx, scores, up, down, dy, targets)
                                    if a is not None))))

  fused = _fused(scores, up, down)

  def zeros(dtype):
    if fused:   # the C++ scatter writes its accumulator whole, from zeros (no loop here)
      return jax.ShapeDtypeStruct((num_targets, d), dtype)
    z = jnp.zeros((num_targets, d), dtype)
    return jax.lax.pcast(z, vary, to="varying") if vary else z

  def chunk(acc, args):
    g_up, g_down = acc
    xc, ic, sc, dyc, tc, ac = args
    dyc = dyc.astype(dt)
    dw = _rows().gather_dot(up, ic, dyc)
    if down is None:
      dx, dsc, beta = None, dw, sc
    else:
      xc = xc.astype(dt)
      a = _rows().gather_dot(down, ic, xc) if ac is None else ac
      s = act(a)
      da = dw * sc * dact(a)
      # (elsewhere one gather of down's rows: XLA merges the two identical takes)
      dx = _rows().gather_weighted_sum(down, ic, da)
      dsc, beta = dw * s, sc * s
      # g_up[tc] += beta · dy and g_down[tc] += da · x (one kernel call where it runs)
      return _rows().scatter_outer_add_pair(g_up, g_down, tc, beta, dyc, da, xc), (dx, dsc)
    return (_rows().scatter_outer_add(g_up, tc, beta, dyc), g_down), (dx, dsc)

  init = (zeros(acc_dtypes[0]), None if down is None else zeros(acc_dtypes[1]))
  c = _chunk_size(t, hh, d, dt, fused)
  args = (x if down is not None else None, idx, scores, dy, targets, saved_a)
  if c == t:   # one chunk (TPU / GPU, the C++ kernels, or a small batch): no loop
    (g_up, g_down), out = chunk(init, args)
  else:
    (g_up, g_down), out = jax.lax.scan(chunk, init, _chunks(t, c, args))
    out = tuple(_unchunk(a, t) for a in out)
  dx, dsc = out
  dx = None if down is None else dx.astype(x.dtype)
  return dx, dsc, g_up, g_down


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lookup(x, idx, scores, up, down, activation):
  return _forward(x, idx, scores, up, down, activation)[0]


def _lookup_fwd(x, idx, scores, up, down, activation):
  y, a = _forward(x, idx, scores, up, down, activation)
  return y, (x, idx, scores, up, down, _residual_a(a, scores, up, down))


def _lookup_bwd(activation, res, dy):
  x, idx, scores, up, down, a = res
  dx, dsc, g_up, g_down = _backward(x, idx, scores, up, down, dy, activation, idx, up.shape[0],
                                    (up.dtype, None if down is None else down.dtype), a)
  return (None if x is None else match_vma(dx, x), None, match_vma(dsc, scores),
          match_vma(g_up, up), None if down is None else match_vma(g_down, down))


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _lookup_sparse(x, idx, scores, up, down, tap_up, tap_down, rows, activation):
  del tap_up, tap_down, rows   # gradient sinks
  return _forward(x, idx, scores, up, down, activation)[0]


def _lookup_sparse_fwd(x, idx, scores, up, down, tap_up, tap_down, rows, activation):
  y, a = _forward(x, idx, scores, up, down, activation)
  return y, (x, idx, scores, up, down, tap_up, tap_down, rows, _residual_a(a, scores, up, down))


def _lookup_sparse_bwd(activation, res, dy):
  x, idx, scores, up, down, tap_up, tap_down, rows, a = res
  slots = row_slots(idx, rows, up.shape[0])
  dx, dsc, g_up, g_down = _backward(
      x, idx, scores, up, down, dy, activation, slots, rows.shape[0],
      (tap_up.dtype, None if tap_down is None else tap_down.dtype), a)
  # (each cotangent in its tap's dtype)
  like = lambda g, tap: match_vma(g.astype(tap.dtype), tap)
  return (None if x is None else match_vma(dx, x), None, match_vma(dsc, scores), None, None,
          like(g_up, tap_up), None if tap_down is None else like(g_down, tap_down), None)


_lookup_sparse.defvjp(_lookup_sparse_fwd, _lookup_sparse_bwd)


def _flat(x, indices, scores, down):
  t = math.prod(indices.shape[:-2])
  hh = indices.shape[-2] * indices.shape[-1]
  xf = None if down is None else x.reshape(t, x.shape[-1])
  return xf, indices.reshape(t, hh), scores.reshape(t, hh)


def lookup(x: jax.Array | None, indices: jax.Array, scores: jax.Array, up: jax.Array,
           down: jax.Array | None = None, *, activation: str = "gelu_tanh") -> jax.Array:
  """PEER (``down`` given) or PKM (``down=None``, ``x`` unused) lookup; dense table grads.

  Returns ``y [..., d]`` in ``scores.dtype``; differentiable w.r.t. x, scores and tables.
  """
  y = _lookup(*_flat(x, indices, scores, down), up, down, activation)
  return y.reshape(indices.shape[:-2] + (up.shape[-1],))


def lookup_sparse(x: jax.Array | None, indices: jax.Array, scores: jax.Array, up: jax.Array,
                  down: jax.Array | None, taps: tuple[jax.Array | None, jax.Array], *,
                  activation: str = "gelu_tanh", rows: jax.Array | None = None) -> jax.Array:
  """:func:`lookup` with row taps instead of table gradients (row-sparse training).

  ``taps = (tap_down or None, tap_up)``, each ``[U, d]`` with ``U = num_unique_slots``:
  gradient sinks on the rows ``rows [U]`` (distinct, ascending, padded with N, a superset
  of ``indices``; default ``unique_rows(indices, N)``; a batch shard passes the rows of
  the whole batch). The gradient of ``tap[s]`` is the table gradient of row ``rows[s]``
  (summed over every retrieval); tables are not differentiated. Taps are zeros (row-sparse
  training attaches fresh ones each step): like the Pallas kernels, their values are not
  read.
  """
  tap_down, tap_up = taps
  if rows is None:
    rows = unique_rows(indices, up.shape[0])
  y = _lookup_sparse(*_flat(x, indices, scores, down), up, down, tap_up, tap_down, rows,
                     activation)
  return y.reshape(indices.shape[:-2] + (up.shape[-1],))
