"""The PEER / PKM lookup as Pallas kernels for GPUs (Triton backend).

The three :class:`~moejax.kernels.lookup_vjp.LookupKernels` pieces (token-flattened, see
:mod:`~moejax.kernels.lookup_vjp` for the contract, :data:`~moejax.kernels.reference.LOOKUP_PIECES` for the
exact semantics) as ``pallas_call`` s lowered by Triton (``compiler_params`` =
``jax.experimental.pallas.triton.CompilerParams``, so a GPU never picks Mosaic GPU):

* **forward** — one program per token. Gathers the token's ``H = h·k`` rows as
  ``[BH, BD]`` tiles (``table[idx_vec, cols]`` vector loads, masked to ``H`` and ``d``),
  PEER: ``a = x · down rows`` (f32), ``w = σ(a) · score``; then ``y = Σ_j w_j · up rows``
  chunk by chunk over ``d``. Only ``y [T, d]`` is written.
* **token_backward** (pass 1) — one program per token: regathers up (and down) rows,
  ``dw = dy · up rows``; PKM: ``dscores = dw``; PEER: ``a`` again, ``da = dw·score·σ'(a)``,
  ``dscores = dw·σ(a)``, ``alpha = da``, ``beta = score·σ(a)`` and ``dx = Σ_j da_j · down
  rows``. Writes ``[T, d]`` and ``[T, H]`` arrays only.
* **row_backward** (pass 2) — one program per block of ``BU`` consecutive unique rows of
  the :class:`~moejax.kernels.row_plan.RowPlan` (and a block of ``BD`` columns). Their runs
  are one contiguous range of the sorted retrievals; the program walks it ``BE`` entries at
  a time, gathers ``vectors[order // H]`` rows and adds ``onehot(slot of entry) · coef @
  rows`` (bf16 tensor-core dots on an exact three-way bf16 split of the f32 factor, so the
  sums are f32-accurate; see :func:`_segment_dot`). Each row is one fixed-order sum:
  deterministic, no atomics. ``dense=True`` writes the rows at ``plan.unique`` into a
  zero ``[N, d]`` buffer aliased to the output (``input_output_aliases``); ``dense=False``
  writes the compact ``[U, d]`` rows (padding slots get zeros).

Triton tiles must have power-of-two sizes: ``H`` and ``d`` are padded up to the block
sizes and masked (masked lanes are not read). Nothing of size ``[T, H, d]`` is
materialised. Accumulation is f32; tables may be f32 or bf16. Row ids are clipped to
``[0, N)`` in the token kernels (the reference gathers with ``mode="clip"``). Triton has no
``erf``: ``activation="gelu"`` uses :func:`_erf` (|error| < 4e-7). A row retrieved R times
is summed by one program in R / BE sequential steps (a very hot row is a serial tail).

``make_pieces(config, interpret=True)`` runs the same kernels in Pallas interpret mode
(CPU; used by tests), ``lower``-ing for CUDA works on any machine, running needs a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from moejax.kernels import activations
from moejax.kernels.lookup_vjp import LookupKernels, make_lookup
from moejax.kernels.row_plan import RowPlan

# ------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Block sizes and Triton launch parameters (all block sizes powers of two).

  token_tile:  elements of one gathered ``[BH, BD]`` tile of a 2-byte table in the token
               kernels (half as many for 4-byte tables); ``BD`` is ``token_tile // BH``
               clamped to ``[16, next_pow2(d)]``.
  rows_block:  ``BU``, unique rows per row_backward program (≥ 16: a dot dimension).
  entries_block: ``BE``, sorted retrievals gathered per row_backward step for 2-byte
               vectors (half as many for 4-byte vectors; ≥ 16).
  cols_block:  ``BD`` of row_backward (clamped to ``[16, next_pow2(d)]``).

  The defaults keep every kernel at ≤ 128 registers a thread without spills (ptxas,
  sm_90, Triton 3.6) for H = 128, d = 1024.
  """

  token_tile: int = 8192
  token_warps: int = 4
  token_stages: int = 1
  rows_block: int = 32
  entries_block: int = 64
  cols_block: int = 64
  row_warps: int = 4
  row_stages: int = 1


DEFAULT_CONFIG = GpuConfig()

_MIN_BLOCK = 16


def _pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _block(n: int, cap: int) -> int:
  """A power-of-two block ≥ n-ish: ``next_pow2(n)`` clamped to ``[16, cap]``."""
  return max(_MIN_BLOCK, min(_pow2(n), _pow2(cap)))


# ---------------------------------------------------------------------- activations


_A1, _A2, _A3, _A4, _A5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429
_P = 0.3275911
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
# erf(z) = 2/sqrt(pi) · Σ_n (-1)^n z^(2n+1) / (n! (2n+1))
_C0, _C1, _C2, _C3, _C4, _C5 = (_TWO_OVER_SQRT_PI * (-1) ** n / (math.factorial(n) * (2 * n + 1))
                                for n in range(6))


def _erf(a):
  """erf for kernels (Triton has no erf lowering), |error| < 3e-7.

  |a| < 0.5: Maclaurin series to a^11 (accurate relative to erf near 0); otherwise
  Abramowitz–Stegun 7.1.26 (absolute error 1.5e-7).
  """
  z = jnp.abs(a)
  t = 1.0 / (1.0 + _P * z)
  poly = t * (_A1 + t * (_A2 + t * (_A3 + t * (_A4 + t * _A5))))
  tail = 1.0 - poly * jnp.exp(-z * z)
  z2 = z * z
  series = z * (_C0 + z2 * (_C1 + z2 * (_C2 + z2 * (_C3 + z2 * (_C4 + z2 * _C5)))))
  r = jnp.where(z < 0.5, series, tail)
  return jnp.where(a < 0, -r, r)


def _gelu(a):
  return 0.5 * a * (1.0 + _erf(a * (1.0 / math.sqrt(2.0))))


def _dgelu(a):
  cdf = 0.5 * (1.0 + _erf(a * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
  return cdf + a * pdf


def kernel_activation(name: str):
  """``(f, df)`` of :mod:`activations` usable inside a Triton kernel (erf replaced)."""
  f, df = activations.get(name)   # validates the name
  if name == "gelu":
    return _gelu, _dgelu
  return f, df


# -------------------------------------------------------------------------- helpers


def _compiler_params(warps, stages):
  return plt.CompilerParams(num_warps=warps, num_stages=stages)


def _ld(ref, rows, cols, mask, other=0):
  """Masked load of ``ref[rows, cols]`` (index arrays broadcast to the mask's shape)."""
  shape = mask.shape
  return plt.load(ref.at[jnp.broadcast_to(rows, shape), jnp.broadcast_to(cols, shape)],
                  mask=mask, other=other)


def _st(ref, rows, cols, val, mask):
  shape = mask.shape
  plt.store(ref.at[jnp.broadcast_to(rows, shape), jnp.broadcast_to(cols, shape)],
            val.astype(ref.dtype), mask=mask)


def _ld1(ref, pos, mask, other=0):
  return plt.load(ref.at[pos], mask=mask, other=other)


def _token_blocks(h: int, d: int, itemsize: int, config: GpuConfig):
  bh = _block(h, max(h, _MIN_BLOCK))
  tile = config.token_tile * 2 // max(2, itemsize)
  bd = _block(d, max(_MIN_BLOCK, tile // bh))
  return bh, bd


def _split3(v):
  """f32 ``v`` as three bf16 parts whose f32 sum is ``v`` to ~2^-24 (relative)."""
  hi = v.astype(jnp.bfloat16)
  r = v - hi.astype(jnp.float32)
  mid = r.astype(jnp.bfloat16)
  lo = (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)
  return hi, mid, lo


def _segment_dot(onehot, coef, rows):
  """``Σ_e onehot[u, e] · coef[e] · rows[e, :]`` -> ``[BU, BD]`` f32, by bf16 tensor-core dots.

  bf16 ``rows``: the f32 weights ``onehot·coef`` are split into three bf16 parts (products
  with bf16 rows are exact in the f32 accumulator). Other ``rows``: the f32 products
  ``coef·rows`` are split, the exact bf16 one-hot picks them. Either way the result equals
  the f32 sum to ~2^-24 relative.
  """
  if rows.dtype == jnp.bfloat16:
    lhs = _split3(jnp.where(onehot, coef[None, :], 0.0))
    rhs = (rows,) * 3
  else:
    lhs = (onehot.astype(jnp.bfloat16),) * 3
    rhs = _split3(rows.astype(jnp.float32) * coef[:, None])
  acc = None
  for a, b in zip(lhs, rhs):
    p = jnp.dot(a, b, preferred_element_type=jnp.float32)
    acc = p if acc is None else acc + p
  return acc


# -------------------------------------------------------------------------- forward


def _forward_kernel(*refs, h, d_in, d_out, n, bh, bd_in, bd_out, act, peer):
  if peer:
    idx_ref, sc_ref, x_ref, up_ref, down_ref, y_ref = refs
  else:
    idx_ref, sc_ref, up_ref, y_ref = refs
  f32 = jnp.float32
  t = pl.program_id(0)
  j = jnp.arange(bh, dtype=jnp.int32)
  jm = j < h
  idx = jnp.clip(_ld1(idx_ref, (t, j), jm, 0), 0, n - 1)
  g = _ld1(sc_ref, (t, j), jm, 0).astype(f32)
  rows = idx[:, None]

  if peer:
    def down_body(c, a):
      cols = c * bd_in + jnp.arange(bd_in, dtype=jnp.int32)
      cm = cols < d_in
      xv = _ld1(x_ref, (t, cols), cm, 0).astype(f32)
      tile = _ld(down_ref, rows, cols[None, :], jm[:, None] & cm[None, :], 0).astype(f32)
      return a + jnp.sum(tile * xv[None, :], axis=1)

    a = jax.lax.fori_loop(0, pl.cdiv(d_in, bd_in), down_body, jnp.zeros((bh,), f32))
    w = act(a) * g
  else:
    w = g
  w = jnp.where(jm, w, 0.0)

  def up_body(c, carry):
    cols = c * bd_out + jnp.arange(bd_out, dtype=jnp.int32)
    cm = cols < d_out
    tile = _ld(up_ref, rows, cols[None, :], jm[:, None] & cm[None, :], 0).astype(f32)
    yc = jnp.sum(tile * w[:, None], axis=0)
    plt.store(y_ref.at[t, cols], yc.astype(y_ref.dtype), mask=cm)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(d_out, bd_out), up_body, jnp.int32(0))


def _gpu_forward(x, idx, scores, up, down, activation, *, config, interpret):
  t, h = idx.shape
  n, d_out = up.shape
  peer = down is not None
  d_in = down.shape[1] if peer else d_out
  bh, bd_in = _token_blocks(h, d_in, (down if peer else up).dtype.itemsize, config)
  _, bd_out = _token_blocks(h, d_out, up.dtype.itemsize, config)
  act, _ = kernel_activation(activation)
  kernel = functools.partial(_forward_kernel, h=h, d_in=d_in, d_out=d_out, n=n, bh=bh,
                             bd_in=bd_in, bd_out=bd_out, act=act, peer=peer)
  args = (idx, scores, x, up, down) if peer else (idx, scores, up)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((t, d_out), scores.dtype),
      grid=(t,),
      compiler_params=_compiler_params(config.token_warps, config.token_stages),
      interpret=interpret,
      name="peer_lookup_fwd" if peer else "pkm_lookup_fwd",
  )(*args)


# ------------------------------------------------------------------- token backward


def _token_backward_kernel(*refs, h, d_in, d_out, n, bh, bd_in, bd_out, act, dact, peer):
  if peer:
    (idx_ref, sc_ref, x_ref, up_ref, down_ref, dy_ref,
     dx_ref, dsc_ref, alpha_ref, beta_ref) = refs
  else:
    idx_ref, sc_ref, up_ref, dy_ref, dsc_ref = refs
  f32 = jnp.float32
  t = pl.program_id(0)
  j = jnp.arange(bh, dtype=jnp.int32)
  jm = j < h
  idx = jnp.clip(_ld1(idx_ref, (t, j), jm, 0), 0, n - 1)
  g = _ld1(sc_ref, (t, j), jm, 0).astype(f32)
  rows = idx[:, None]

  def up_body(c, dw):
    cols = c * bd_out + jnp.arange(bd_out, dtype=jnp.int32)
    cm = cols < d_out
    dyv = _ld1(dy_ref, (t, cols), cm, 0).astype(f32)
    tile = _ld(up_ref, rows, cols[None, :], jm[:, None] & cm[None, :], 0).astype(f32)
    return dw + jnp.sum(tile * dyv[None, :], axis=1)

  dw = jax.lax.fori_loop(0, pl.cdiv(d_out, bd_out), up_body, jnp.zeros((bh,), f32))
  if not peer:
    plt.store(dsc_ref.at[t, j], dw.astype(dsc_ref.dtype), mask=jm)
    return

  def down_body(c, a):
    cols = c * bd_in + jnp.arange(bd_in, dtype=jnp.int32)
    cm = cols < d_in
    xv = _ld1(x_ref, (t, cols), cm, 0).astype(f32)
    tile = _ld(down_ref, rows, cols[None, :], jm[:, None] & cm[None, :], 0).astype(f32)
    return a + jnp.sum(tile * xv[None, :], axis=1)

  a = jax.lax.fori_loop(0, pl.cdiv(d_in, bd_in), down_body, jnp.zeros((bh,), f32))
  s = act(a)
  da = jnp.where(jm, dw * g * dact(a), 0.0)
  plt.store(dsc_ref.at[t, j], (dw * s).astype(dsc_ref.dtype), mask=jm)
  plt.store(alpha_ref.at[t, j], da, mask=jm)
  plt.store(beta_ref.at[t, j], g * s, mask=jm)

  def dx_body(c, carry):
    cols = c * bd_in + jnp.arange(bd_in, dtype=jnp.int32)
    cm = cols < d_in
    tile = _ld(down_ref, rows, cols[None, :], jm[:, None] & cm[None, :], 0).astype(f32)
    dxc = jnp.sum(tile * da[:, None], axis=0)
    plt.store(dx_ref.at[t, cols], dxc.astype(dx_ref.dtype), mask=cm)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(d_in, bd_in), dx_body, jnp.int32(0))


def _gpu_token_backward(x, idx, scores, up, down, dy, activation, *, config, interpret):
  t, h = idx.shape
  n, d_out = up.shape
  peer = down is not None
  d_in = down.shape[1] if peer else d_out
  bh, bd_in = _token_blocks(h, d_in, (down if peer else up).dtype.itemsize, config)
  _, bd_out = _token_blocks(h, d_out, up.dtype.itemsize, config)
  act, dact = kernel_activation(activation)
  kernel = functools.partial(_token_backward_kernel, h=h, d_in=d_in, d_out=d_out, n=n,
                             bh=bh, bd_in=bd_in, bd_out=bd_out, act=act, dact=dact,
                             peer=peer)
  f32 = jnp.float32
  if peer:
    args = (idx, scores, x, up, down, dy)
    out_shape = (jax.ShapeDtypeStruct((t, d_in), x.dtype),
                 jax.ShapeDtypeStruct((t, h), scores.dtype),
                 jax.ShapeDtypeStruct((t, h), f32),
                 jax.ShapeDtypeStruct((t, h), f32))
  else:
    args = (idx, scores, up, dy)
    out_shape = jax.ShapeDtypeStruct((t, h), scores.dtype)
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(t,),
      compiler_params=_compiler_params(config.token_warps, config.token_stages),
      interpret=interpret,
      name="peer_lookup_bwd_tokens" if peer else "pkm_lookup_bwd_tokens",
  )(*args)
  if peer:
    return out
  return None, out, None, scores.astype(f32)


# --------------------------------------------------------------------- row backward


def _row_backward_kernel(*refs, h, m, u_slots, n, d, bu, be, bd, dense):
  if dense:
    order_ref, starts_ref, unique_ref, vec_ref, coef_ref, _zeros_ref, out_ref = refs
  else:
    order_ref, starts_ref, vec_ref, coef_ref, out_ref = refs
  f32 = jnp.float32
  p = pl.program_id(0)
  q = pl.program_id(1)
  ui = p * bu + jnp.arange(bu, dtype=jnp.int32)
  um = ui < u_slots
  st = _ld1(starts_ref, ui, um, m)          # run of slot ui: [st, en)
  en = _ld1(starts_ref, ui + 1, um, m)
  lo = jnp.min(st)                          # this block's runs: one range [lo, hi)
  hi = jnp.max(en)
  cols = q * bd + jnp.arange(bd, dtype=jnp.int32)
  cm = cols < d

  def body(c, acc):
    e = lo + c * be + jnp.arange(be, dtype=jnp.int32)
    em = e < hi
    ordv = _ld1(order_ref, e, em, 0)
    coef = _ld1(coef_ref, ordv, em, 0).astype(f32)
    tok = jax.lax.div(ordv, jnp.int32(h))
    tile = _ld(vec_ref, tok[:, None], cols[None, :], em[:, None] & cm[None, :], 0)
    onehot = (st[:, None] <= e[None, :]) & (e[None, :] < en[:, None])
    return acc + _segment_dot(onehot, coef, tile)

  nchunks = pl.cdiv(hi - lo, be)
  acc = jax.lax.fori_loop(0, nchunks, body, jnp.zeros((bu, bd), f32))
  if dense:
    rows = _ld1(unique_ref, ui, um, n)
    rm = um & (rows >= 0) & (rows < n)
    _st(out_ref, rows[:, None], cols[None, :], acc.astype(out_ref.dtype),
        rm[:, None] & cm[None, :])
  else:
    _st(out_ref, ui[:, None], cols[None, :], acc.astype(out_ref.dtype),
        um[:, None] & cm[None, :])


def _gpu_row_backward(plan: RowPlan, vectors, coefs, num_rows, dense, out_dtype=jnp.float32, *,
                      config, interpret):
  m = plan.order.shape[0]
  u_slots = plan.unique.shape[0]
  t, d = vectors.shape
  h = m // t
  bu = max(_MIN_BLOCK, _pow2(config.rows_block))
  be = max(_MIN_BLOCK, _pow2(config.entries_block) * 2 // max(2, vectors.dtype.itemsize))
  bd = _block(d, config.cols_block)
  kernel = functools.partial(_row_backward_kernel, h=h, m=m, u_slots=u_slots, n=num_rows,
                             d=d, bu=bu, be=be, bd=bd, dense=dense)
  coefs = coefs.reshape(m).astype(jnp.float32)
  order = plan.order.astype(jnp.int32)
  starts = plan.starts.astype(jnp.int32)
  if dense:
    # Rows are summed in f32 and stored once in the table's dtype (no f32 [N, d] + cast).
    zeros = jnp.zeros((num_rows, d), out_dtype)
    args = (order, starts, plan.unique.astype(jnp.int32), vectors, coefs, zeros)
    out_shape = jax.ShapeDtypeStruct((num_rows, d), out_dtype)
    aliases = {5: 0}
  else:
    args = (order, starts, vectors, coefs)
    out_shape = jax.ShapeDtypeStruct((u_slots, d), out_dtype)
    aliases = {}
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(u_slots, bu), pl.cdiv(d, bd)),
      input_output_aliases=aliases,
      compiler_params=_compiler_params(config.row_warps, config.row_stages),
      interpret=interpret,
      name="lookup_bwd_rows_dense" if dense else "lookup_bwd_rows_compact",
  )(*args)


# ------------------------------------------------------------------------ the pieces


def make_pieces(config: GpuConfig = DEFAULT_CONFIG, *, interpret: bool = False
                ) -> LookupKernels:
  """The three lookup pieces as Triton Pallas kernels (``interpret=True``: on CPU)."""
  kw = dict(config=config, interpret=interpret)
  return LookupKernels(functools.partial(_gpu_forward, **kw),
                       functools.partial(_gpu_token_backward, **kw),
                       functools.partial(_gpu_row_backward, **kw))


GPU_PIECES = make_pieces()

lookup, lookup_sparse = make_lookup(GPU_PIECES)
