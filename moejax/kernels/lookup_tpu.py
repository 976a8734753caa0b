"""PEER / PKM lookup as TPU TensorCore Pallas (Mosaic) kernels.

The three :class:`~moejax.kernels.lookup_vjp.LookupKernels` pieces, equal to
:data:`~moejax.kernels.reference.LOOKUP_PIECES`, glued by :func:`make_lookup` into
:func:`lookup` (dense table gradients) and :func:`lookup_sparse` (row taps):

* ``forward`` / ``token_backward`` (token-major). The tables stay in HBM
  (``memory_space=pl.ANY``); the retrieved rows are fetched by one-row manual DMAs into a
  double-buffered VMEM buffer. Tokens are handled in groups of 8 (one per sublane): a
  *stage* is ``C`` slots ``j`` of one group, i.e. ``8·C`` rows per table; the rows of the
  next stage are in flight while the current stage is computed. The index block of a
  grid step sits in SMEM (a pipelined ``[tb, H]`` SMEM block, so SMEM never holds all of
  ``indices``). Per slot ``j`` the math is elementwise on ``[8 tokens, d]`` tiles (VPU, f32):
  ``a = Σ_d x·down_j``, ``w = σ(a)·s_j``, ``y += w·up_j`` — rank-1 experts give
  matrix-vector products that an MXU cannot fill, and the kernel is bound by the row
  gathers anyway. Per-retrieval scalars live in ``[8, H]`` tiles (slot ``j`` = lane ``j``).
  Nothing of size ``[T, H, d]`` (or ``[T, H, ·]`` beyond the ``[T, H]`` scalars) exists.
* ``row_backward`` (row-major, deterministic, no atomics). The retrievals sorted by row
  (:class:`~moejax.kernels.row_plan.RowPlan`) are streamed in blocks of ``P`` entries
  through SMEM (vector id, coefficient, destination, end-of-run flag); the token vectors
  ``vectors[order[e] // H]`` are fetched by one-row DMAs (a ring of ``R`` in flight) and
  summed in sorted order into one f32 accumulator; at the end of each run the row is
  DMA'd into an HBM output that aliases a zero-initialised ``[N, d]`` (dense) or
  ``[U, d]`` (compact) array. No ``[M, d]`` or (dense) ``[U, d]`` temporary exists.

Constraints: ``d`` (the table width) must be a multiple of 128 (a ``ValueError`` says so;
padding the tables would copy ``O(N·d)`` per step); indices must lie in ``[0, N)``
(forward / token pass clip them like the reference's ``mode="clip"`` gathers; the row
pass drops out-of-range rows of dense gradients). Tables may be f32 or bf16 (rows are
accumulated in f32); x / dy are cast to f32 (``[T, d]``, cheap). ``interpret=True`` (or a
``pltpu.InterpretParams``) runs the same kernels on CPU in TPU interpret mode.

bf16 tables: Mosaic cannot DMA one row of a packed bf16 HBM array (its (16, 128) tiles
hold row pairs in 32-bit words), so the kernels bitcast the HBM ref to uint32 row pairs
``[N/2, d]`` (no copy; N must be even), fetch the pair and keep the low (even row) or high
(odd row) half — the convention of ``pltpu.bitcast``. Interpret mode cannot DMA from a
bitcast ref, so there the same uint32 view is built outside the kernel (an O(N·d) copy,
tests only); only the placement of that bitcast differs between the two modes. Table
gradients come out of the row pass in f32 (the glue casts them to the table dtype).

Parallelism: the token-major kernels' grid is ``parallel`` (megacore splits it); the row
pass is one sequential (``arbitrary``) sweep over the sorted retrievals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels import activations
from moejax.kernels.lookup_vjp import LookupKernels, make_lookup
from moejax.kernels.row_plan import RowPlan

F32 = jnp.float32
SUB = 8                 # tokens per group (one per sublane)
MAX_CHUNK = 8           # slots per stage: 8·C rows per table in flight
TOKEN_BLOCK = 64        # tokens per grid step (forward / token pass)
ROW_BLOCK = 1024        # sorted entries per grid step (row pass)
RING = 16               # token-vector DMAs in flight (row pass)
EMIT = 8                # finished-row write-back buffers (row pass)


# --------------------------------------------------------------------------- helpers


def _interpret(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def _check_width(d):
  if d % 128:
    raise ValueError(f"lookup_tpu needs the table width d={d} to be a multiple of 128 (TPU "
                     "lanes); pad the model width or use kernel='reference'")


def _round_up(a, b):
  return -(-a // b) * b


def _chunk(h):
  """Slots per stage: the largest divisor of ``h`` up to MAX_CHUNK."""
  return max(c for c in range(1, min(h, MAX_CHUNK) + 1) if h % c == 0)


def _lane_col(mat, j):
  """Column ``j`` (dynamic) of an ``[8, H]`` tile as ``[8, 1]``."""
  lane = lax.broadcasted_iota(jnp.int32, mat.shape, 1)
  return jnp.sum(jnp.where(lane == j, mat, 0.0), axis=1, keepdims=True)


def _set_col(mat, j, col):
  lane = lax.broadcasted_iota(jnp.int32, mat.shape, 1)
  return jnp.where(lane == j, col, mat)


def _token_layout(t, h):
  tb = min(TOKEN_BLOCK, _round_up(max(t, 1), SUB))
  return tb, _round_up(t, tb)


def _pad_rows(a, tp, value=0):
  if a.shape[0] == tp:
    return a
  pad = [(0, tp - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
  return jnp.pad(a, pad, constant_values=value)



def _u32_pairs(table):
  """``bf16 [N, d] -> uint32 [N/2, d]``: rows ``2i`` (low half) and ``2i+1`` (high half).

  The layout of a bf16 table in TPU HBM ((8,128)(2,1) tiles) and the semantics of
  ``pltpu.bitcast``; interpret mode cannot DMA from a bitcast ref, so there the view is
  materialised (a copy; tests only). On TPU the kernels bitcast the HBM ref (no copy).
  """
  n, d = table.shape
  pairs = jnp.swapaxes(table.reshape(n // 2, 2, d), 1, 2)
  return lax.bitcast_convert_type(pairs, jnp.uint32)


def _tables(tables, interpret):
  """-> (kernel args, packed flags, buffer dtypes). bf16 rows travel as row pairs (u32)."""
  args, packed, dtypes = [], [], []
  for tab in tables:
    if tab.dtype == F32:
      args.append(tab), packed.append(False), dtypes.append(F32)
    elif tab.dtype == jnp.bfloat16:
      if tab.shape[0] % 2:
        raise ValueError(f"lookup_tpu: a bf16 table needs an even number of rows, got "
                         f"{tab.shape[0]} (bf16 rows are fetched as 32-bit row pairs)")
      args.append(_u32_pairs(tab) if interpret else tab)
      packed.append(True), dtypes.append(jnp.uint32)
    else:
      raise ValueError(f"lookup_tpu: tables must be float32 or bfloat16, got {tab.dtype}")
  return args, tuple(packed), dtypes


class _Gather:
  """Double-buffered one-row DMAs of the rows of stage ``s`` (group ``g``, chunk ``c``)."""

  def __init__(self, idx_ref, tables, packed, bitcast, bufs, sem, chunk, n_chunks):
    self.tables = [t.bitcast(jnp.uint32) if p and bitcast else t
                   for t, p in zip(tables, packed)]
    self.idx_ref, self.packed, self.bufs, self.sem = idx_ref, packed, bufs, sem
    self.chunk, self.n_chunks = chunk, n_chunks

  def start(self, s, slot):
    g, c = lax.div(s, self.n_chunks), lax.rem(s, self.n_chunks)

    def issue(jj, carry):   # the 8 tokens of slot jj (unrolled), slots in a loop
      for t in range(SUB):
        row = self.idx_ref[g * SUB + t, c * self.chunk + jj]
        pair = lax.shift_right_logical(row, 1)
        for ti, (tab, buf) in enumerate(zip(self.tables, self.bufs)):
          src = pair if self.packed[ti] else row
          pltpu.make_async_copy(tab.at[pl.ds(src, 1)], buf.at[slot, pl.ds(jj * SUB + t, 1)],
                                self.sem.at[ti, slot]).start()
      return carry

    lax.fori_loop(0, self.chunk, issue, 0)

  def wait(self, slot):
    # DMA semaphores count bytes: one wait for the whole stage (all 8·C rows of a table).
    for ti, buf in enumerate(self.bufs):
      pltpu.make_async_copy(buf.at[slot], buf.at[slot], self.sem.at[ti, slot]).wait()

  def rows(self, ti, slot, jj, odd):
    """Rows of table ``ti`` for slot ``jj`` of the stage in ``slot``: ``[8, d]`` f32."""
    v = self.bufs[ti][slot, pl.ds(jj * SUB, SUB)]
    if not self.packed[ti]:
      return v.astype(F32)
    v = jnp.where(odd, v & jnp.uint32(0xFFFF0000), v << 16)
    return pltpu.bitcast(v, F32)

  def run(self, num_stages, compute):
    """start(0); for each stage s: start(s+1), wait(s), compute(g, c, slot)."""
    self.start(0, 0)

    def body(s, carry):
      slot = lax.rem(s, 2)

      @pl.when(s + 1 < num_stages)
      def _():
        self.start(s + 1, 1 - slot)

      self.wait(slot)
      compute(lax.div(s, self.n_chunks), lax.rem(s, self.n_chunks), slot)
      return carry

    lax.fori_loop(0, num_stages, body, 0)


# ----------------------------------------------- forward and token pass (token-major)


def _token_kernel(*refs, backward, peer, packed, bitcast, activation, chunk, h, tb):
  it = iter(refs)
  idx_ref = next(it)
  x_ref = next(it) if peer else None
  s_ref = next(it)
  dy_ref = next(it) if backward else None
  par_ref = next(it) if any(packed) else None
  tables = [next(it) for _ in range(1 + peer)]
  if not backward:
    acc_ref, col_refs = next(it), {}
  elif peer:
    acc_ref = next(it)
    col_refs = {"dsc": next(it), "alpha": next(it), "beta": next(it)}
  else:
    acc_ref, col_refs = None, {"dsc": next(it)}
  bufs = [next(it) for _ in tables]
  sem = next(it)
  act, dact = activations.get(activation)
  n_chunks = h // chunk
  gather = _Gather(idx_ref, tables, packed, bitcast, bufs, sem, chunk, n_chunks)

  def compute(g, c, slot):
    rows = pl.ds(pl.multiple_of(g * SUB, SUB), SUB)
    sg = s_ref[rows, :]
    pg = par_ref[rows, :] if par_ref is not None else None
    xg = x_ref[rows, :] if peer else None
    dyg = dy_ref[rows, :] if backward else None
    cols = {k: r[rows, :] for k, r in col_refs.items()}
    acc = None
    for jj in range(chunk):
      j = c * chunk + jj
      s_col = _lane_col(sg, j)
      odd = None if pg is None else _lane_col(pg, j) > 0.5
      up_r = gather.rows(0, slot, jj, odd)
      if peer:
        dn_r = gather.rows(1, slot, jj, odd)
        a = jnp.sum(xg * dn_r, axis=1, keepdims=True)
      if not backward:
        w = act(a) * s_col if peer else s_col
        term = w * up_r
      else:
        dw = jnp.sum(dyg * up_r, axis=1, keepdims=True)
        if peer:
          sa = act(a)
          da = dw * s_col * dact(a)
          term = da * dn_r
          new = {"dsc": dw * sa, "alpha": da, "beta": s_col * sa}
        else:
          term, new = None, {"dsc": dw}
        cols = {k: _set_col(v, j, new[k]) for k, v in cols.items()}
      if term is not None:
        acc = term if acc is None else acc + term
    for k, r in col_refs.items():
      r[rows, :] = cols[k]
    if acc is not None:
      @pl.when(c == 0)
      def _():
        acc_ref[rows, :] = acc

      @pl.when(c > 0)
      def _():
        acc_ref[rows, :] += acc

  gather.run((tb // SUB) * n_chunks, compute)


def _token_call(x, idx, scores, up, down, dy, activation, interpret):
  """Forward (``dy`` None) -> y [T, d] f32; token pass -> (dx, dscores, alpha, beta) f32."""
  t, h = idx.shape
  n, d = up.shape
  _check_width(d)
  activations.get(activation)
  peer, backward = down is not None, dy is not None
  interp = _interpret(interpret)
  tb, tp = _token_layout(t, h)
  chunk = _chunk(h)
  idx = _pad_rows(jnp.clip(idx.astype(jnp.int32), 0, n - 1), tp)
  tabs, packed, buf_dtypes = _tables([up, down] if peer else [up], interp)
  tok = lambda i: (i, 0)
  blk_h, blk_d = pl.BlockSpec((tb, h), tok), pl.BlockSpec((tb, d), tok)
  in_specs, args = [pl.BlockSpec((tb, h), tok, memory_space=pltpu.SMEM)], [idx]
  if peer:
    in_specs.append(blk_d), args.append(_pad_rows(x.astype(F32), tp))
  in_specs.append(blk_h), args.append(_pad_rows(scores.astype(F32), tp))
  if backward:
    in_specs.append(blk_d), args.append(_pad_rows(dy.astype(F32), tp))
  if any(packed):
    in_specs.append(blk_h), args.append((idx % 2).astype(F32))
  in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * len(tabs)
  args += tabs
  if not backward:
    out = [(blk_d, d)]
  elif peer:
    out = [(blk_d, d), (blk_h, h), (blk_h, h), (blk_h, h)]
  else:
    out = [(blk_h, h)]
  scratch = [pltpu.VMEM((2, chunk * SUB, d), dt) for dt in buf_dtypes]
  scratch.append(pltpu.SemaphoreType.DMA((len(tabs), 2)))
  kernel = functools.partial(
      _token_kernel, backward=backward, peer=peer, packed=packed,
      bitcast=not interp, activation=activation, chunk=chunk, h=h, tb=tb)
  res = pl.pallas_call(
      kernel,
      grid=(tp // tb,),
      in_specs=in_specs,
      out_specs=[spec for spec, _ in out],
      out_shape=[jax.ShapeDtypeStruct((tp, w), F32) for _, w in out],
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interp,
      name="lookup_token_backward" if backward else "lookup_forward",
  )(*args)
  return [r[:t] for r in res]


def _forward(x, idx, scores, up, down, activation, *, interpret=False):
  (y,) = _token_call(x, idx, scores, up, down, None, activation, interpret)
  return y.astype(scores.dtype)


def _token_backward(x, idx, scores, up, down, dy, activation, *, interpret=False):
  res = _token_call(x, idx, scores, up, down, dy, activation, interpret)
  if down is None:
    (dsc,) = res
    return None, dsc.astype(scores.dtype), None, scores.astype(F32)
  dx, dsc, alpha, beta = res
  return dx.astype(x.dtype), dsc.astype(scores.dtype), alpha, beta


# ------------------------------------------------------------ row pass (row-major)


def _row_kernel(vid_ref, coef_ref, dest_ref, last_ref, vec_hbm, zeros_hbm, out_hbm,
                vbuf, acc_ref, ebuf, vsem, esem, state, *, block, ring, emit, m):
  del zeros_hbm   # aliased to out_hbm: rows never written stay zero
  i = pl.program_id(0)
  nv = jnp.minimum(block, m - i * block)    # real entries of this block (the rest is padding)

  @pl.when(i == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
    for k in range(emit + 1):
      state[k] = 0

  def fetch(p, slot):
    pltpu.make_async_copy(vec_hbm.at[pl.ds(vid_ref[p], 1)], vbuf.at[slot],
                          vsem.at[slot]).start()

  def emit_wait(k):
    pltpu.make_async_copy(ebuf.at[0], out_hbm.at[pl.ds(0, 1)], esem.at[k]).wait()

  for q in range(ring):
    @pl.when(q < nv)
    def _():
      fetch(q, q)

  def body(p, acc):
    slot = lax.rem(p, ring)
    pltpu.make_async_copy(vec_hbm.at[pl.ds(0, 1)], vbuf.at[slot], vsem.at[slot]).wait()
    v = vbuf[slot]

    @pl.when(p + ring < nv)
    def _():
      fetch(p + ring, slot)

    acc = acc + coef_ref[p] * v
    is_last = last_ref[p] == 1

    @pl.when(is_last)
    def _():
      k = state[0]

      @pl.when(state[1 + k] == 1)
      def _():
        emit_wait(k)

      ebuf[k] = acc
      pltpu.make_async_copy(ebuf.at[k], out_hbm.at[pl.ds(dest_ref[p], 1)], esem.at[k]).start()
      state[1 + k] = 1
      state[0] = lax.rem(k + 1, emit)

    return jnp.where(is_last, 0.0, acc)

  acc_ref[...] = lax.fori_loop(0, nv, body, acc_ref[...])

  @pl.when(i == pl.num_programs(0) - 1)
  def _():
    for k in range(emit):
      @pl.when(state[1 + k] == 1)
      def _():
        emit_wait(k)


def _row_backward(plan: RowPlan, vectors, coefs, num_rows, dense, out_dtype=None, *,
                  interpret=False):
  # Rows are written as f32 (one-row DMAs of bf16 would need row pairs); ``out_dtype`` is
  # left to the caller's cast.
  del out_dtype
  m = plan.order.shape[0]
  t, d = vectors.shape
  _check_width(d)
  h = m // t
  rows = plan.rows
  order = plan.order
  new = jnp.concatenate([jnp.ones((1,), bool), rows[1:] != rows[:-1]])
  last = jnp.concatenate([rows[1:] != rows[:-1], jnp.ones((1,), bool)])
  coef = coefs.astype(F32)[order]
  if dense:
    valid = (rows >= 0) & (rows < num_rows)
    coef, last, dest, out_rows = jnp.where(valid, coef, 0.0), last & valid, rows, num_rows
  else:
    dest, out_rows = jnp.cumsum(new.astype(jnp.int32)) - 1, plan.unique.shape[0]
  block = min(ROW_BLOCK, _round_up(max(m, 1), 128))
  mp = _round_up(max(m, 1), block)
  pad = lambda a: jnp.pad(a, (0, mp - m))
  ints = [pad(lax.div(order, jnp.int32(h))), pad(coef), pad(dest.astype(jnp.int32)),
          pad(last.astype(jnp.int32))]
  smem = pl.BlockSpec((block,), lambda i: (i,), memory_space=pltpu.SMEM)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  kernel = functools.partial(_row_kernel, block=block, ring=min(RING, block), emit=EMIT, m=m)
  return pl.pallas_call(
      kernel,
      grid=(mp // block,),
      in_specs=[smem] * 4 + [hbm, hbm],
      out_specs=hbm,
      out_shape=jax.ShapeDtypeStruct((out_rows, d), F32),
      scratch_shapes=[pltpu.VMEM((min(RING, block), 1, d), F32), pltpu.VMEM((1, d), F32),
                      pltpu.VMEM((EMIT, 1, d), F32),
                      pltpu.SemaphoreType.DMA((min(RING, block),)),
                      pltpu.SemaphoreType.DMA((EMIT,)), pltpu.SMEM((EMIT + 1,), jnp.int32)],
      input_output_aliases={5: 0},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=_interpret(interpret),
      name="lookup_row_backward",
  )(*ints, vectors.astype(F32), jnp.zeros((out_rows, d), F32))


# ----------------------------------------------------------------------- public API


def kernels(interpret=False) -> LookupKernels:
  """The three pieces (``interpret``: False, True or a ``pltpu.InterpretParams``)."""
  p = functools.partial
  return LookupKernels(p(_forward, interpret=interpret), p(_token_backward, interpret=interpret),
                       p(_row_backward, interpret=interpret))


@functools.lru_cache(maxsize=None)
def _ops(interpret):
  return make_lookup(kernels(interpret))


def lookup(x, indices, scores, up, down=None, *, activation="gelu_tanh", interpret=False):
  """:func:`moejax.kernels.lookup_xla.lookup` with TPU kernels (dense table grads)."""
  return _ops(interpret)[0](x, indices, scores, up, down, activation=activation)


def lookup_sparse(x, indices, scores, up, down, taps, *, activation="gelu_tanh", rows=None,
                  interpret=False):
  """:func:`moejax.kernels.lookup_xla.lookup_sparse` with TPU kernels (tap grads)."""
  return _ops(interpret)[1](x, indices, scores, up, down, taps, activation=activation,
                            rows=rows)
