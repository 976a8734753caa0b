"""The table contraction of PEER and PKM and its sharded layouts.

``y = Σ_{h,k} w · up[i]`` with ``w = σ(x·down[i]) · score`` (PEER) or ``w = score`` (PKM).
The contraction itself is a kernel (:mod:`moejax.kernels`: a fused Pallas lookup on
TPU/GPU, custom-VJP gathered contractions in plain JAX elsewhere); this module runs it per
shard under a mesh so that no device ever holds a whole table, and accumulates router
scores per table row for the usage statistics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import kernels, sharding
from moejax.kernels import lookup_xla


def _divides(size: int, axes: tuple[str, ...]) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return size % math.prod(mesh.shape[a] for a in axes) == 0


def _reference_split_mix(x, indices, scores, down, up, activation, feat_ax):
  """Feature-sharded PEER: the pre-activation is a sum over feature shards (a psum between
  the two contractions), so the fused lookup does not apply; the reference contractions do."""
  act, _ = kernels.activations.get(activation)
  a = jax.lax.psum(lookup_xla.gather_dot(down, indices, x), feat_ax)
  return lookup_xla.gather_weighted_sum(up, indices, act(a) * scores)


def table_mix(x: jax.Array | None, indices: jax.Array, scores: jax.Array, *, up: jax.Array,
              down: jax.Array | None = None, activation: str = "gelu_tanh",
              ops: kernels.Ops | None = None,
              taps: tuple[jax.Array | None, jax.Array] | None = None,
              rows: jax.Array | None = None) -> jax.Array:
  """``y = Σ_{h,k} w · up[i]`` with ``w = σ(x·down[i]) · score`` (PEER) or ``w = score`` (PKM).

  x ``[b, l, d]``, indices / scores ``[b, l, h, k]``, tables ``[R, d]`` -> y ``[b, l, d]``
  in ``scores.dtype``. ``ops``: the kernels to use (default: the reference);
  ``activation``: a name in :mod:`moejax.kernels.activations`.

  Without a mesh (or with tables and batch unsharded) this is one ``ops.lookup``.
  Under a mesh it runs in ``jax.shard_map`` so that no device ever holds a whole table
  (GSPMD alone all-gathers row-sharded tables and replicates the gathered rows; a Pallas
  kernel cannot be partitioned by GSPMD at all):

  * rows sharded over axes R ('table_rows'): tokens are all-gathered over the batch axes
    shared with R (small: activations of one layer), each device looks up the retrieved
    rows it owns (others masked to score zero; a PEER expert's u and v rows live on the
    same device, so the whole expert is local) and the outputs are summed back with
    ``psum_scatter`` (or ``psum`` over row axes that do not shard the batch). Every device
    visits ``[tokens·|R∩batch|, h, k]`` retrievals, most of them masked: simple, exact, E×
    redundant work; sorting tokens by owner (a capacity-bounded dispatch) would remove it.
  * features sharded over axes F ('table_embed', the Meta memory-layer layout): each
    device contracts its feature slice, ``psum`` over F gives the PEER pre-activation, and
    the output slices are all-gathered over F: equal work on every shard whatever rows
    are picked. (The reference contractions: the psum sits inside the PEER lookup.)

  ``taps`` (``(tap_down or None, tap_up)``, each ``[U, d]``) on table ``rows [U]`` (the
  distinct rows of ``indices``): row-sparse training, see
  :func:`moejax.kernels.lookup_xla.lookup_sparse`; tables must then be unsharded.
  """
  ops = ops or kernels.get("reference")
  mesh = jax.sharding.get_abstract_mesh()
  if taps is not None:
    if not mesh.empty and (sharding.mesh_axes("table_rows") or sharding.mesh_axes("table_embed")):
      raise ValueError("row-sparse table updates need unsharded tables (table_rows and "
                       "table_embed on mesh axes of size 1)")
    tap_down, tap_up = taps
    batch_ax = () if mesh.empty else sharding.mesh_axes("batch")
    if not batch_ax or not _divides(indices.shape[0], batch_ax):
      return ops.lookup_sparse(x, indices, scores, up, down, taps, activation=activation)
    return _batch_parallel(
        lambda x, i, s, up, down, t_down, t_up, rows: ops.lookup_sparse(
            x, i, s, up, down, (t_down, t_up), activation=activation, rows=rows),
        (x, indices, scores), (up, down, tap_down, tap_up, rows),
        check_vma=ops.name == "reference")
  local = lambda x, i, s, up, down: ops.lookup(x, i, s, up, down, activation=activation)
  if mesh.empty:
    return local(x, indices, scores, up, down)
  rows_ax, feat_ax = sharding.mesh_axes("table_rows"), sharding.mesh_axes("table_embed")
  batch_ax = sharding.mesh_axes("batch")
  if (not rows_ax and not feat_ax) or not _divides(indices.shape[0], batch_ax) or not (
      _divides(up.shape[0], rows_ax) and _divides(up.shape[1], feat_ax)):
    if ops.name == "reference":
      return local(x, indices, scores, up, down)   # GSPMD handles (or pads) it
    return _batch_parallel(local, (x, indices, scores), (up, down), check_vma=False)
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
      local_idx = indices - jax.lax.axis_index(rows_ax) * rows_per
      own = (local_idx >= 0) & (local_idx < rows_per)
      indices = jnp.where(own, local_idx, 0)
      scores = scores * own.astype(scores.dtype)
    if has_x and feat_ax:
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(feat_ax) * d_per, d_per, axis=-1)
      y = _reference_split_mix(x, indices, scores, down, up, activation, feat_ax)
    else:
      y = local(x if has_x else None, indices, scores, up, down if has_x else None)
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
      out_specs=act_spec, check_vma=ops.name == "reference")
  return fn(x, indices, scores, down, up)


def _batch_parallel(fn, sharded, replicated, *, check_vma: bool):
  """``fn(*sharded, *replicated)`` per batch shard under a mesh, or as is without one.

  ``sharded``: ``(x or None, indices, scores)`` split over the batch axes; ``replicated``:
  tables (and taps), whole on every device (their cotangents are summed over the shards).
  A Pallas kernel is opaque to GSPMD, so it is handed one batch shard at a time.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch_ax = () if mesh.empty else sharding.mesh_axes("batch")
  if not batch_ax or not _divides(sharded[1].shape[0], batch_ax):
    return fn(*sharded, *replicated)
  present = [a is not None for a in sharded + replicated]
  args = [a for a in sharded + replicated if a is not None]
  specs = [P(batch_ax)] * sum(present[:len(sharded)]) + [P()] * sum(present[len(sharded):])

  def body(*args):
    it = iter(args)
    return fn(*[next(it) if p else None for p in present])

  return jax.shard_map(body, in_specs=tuple(specs), out_specs=P(batch_ax),
                       check_vma=check_vma)(*args)


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


