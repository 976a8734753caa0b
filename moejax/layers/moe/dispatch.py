"""Dispatchers: apply a routing plan, run the experts, combine.

* :func:`einsum_dispatch` -- GShard: dispatch / combine masks ``[groups, tokens, experts,
  capacity]``, capacity-padded expert buffers ``[experts, groups, capacity, embed]``.
  Under a mesh the buffer is constrained to ``expert`` on its first axis, so GSPMD
  inserts the all-to-all (the "GSPMD einsum path").
* :func:`dropless_dispatch` -- no capacity: sort the (token, choice) rows by expert and
  run a grouped matmul: ``jax.lax.ragged_dot`` (TPU/GPU), megablox ``gmm`` (TPU), or on
  CPU ``blocked``: pad each expert's rows to a multiple of a block, gather one weight
  matrix per block and run one batched einsum (ragged_dot is a masked dense dot over all
  experts on XLA:CPU, about E times the FLOPs).
* :func:`expert_parallel_dispatch` -- experts sharded over the ``expert`` mesh axis;
  capacity buffers travel by ``jax.lax.all_to_all`` inside ``jax.shard_map``.

Activations are in the layer's compute dtype; the masks are built in float32 and cast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.layers.moe.experts import expert_mlp
from moejax.layers.moe.routing import TokenChoicePlan


def _buffer_spec() -> P:
  """PartitionSpec of an expert buffer ``[experts, groups, capacity, embed]``: experts on
  their mesh axes, groups on whatever of the ``groups`` axes the experts do not use."""
  e_ax, g_ax, c_ax, d_ax = sharding.logical_to_spec(("expert", "groups", "capacity", "embed"))
  g_rest = tuple(a for a in sharding.as_axes(g_ax) if a not in sharding.as_axes(e_ax))
  return P(e_ax, g_rest or None, c_ax, d_ax)


def einsum_dispatch(x: jax.Array, plan, weights, activation: str) -> jax.Array:
  """GShard einsum dispatch.

  Args:
    x: ``[groups, tokens, embed]`` in compute dtype.
    plan: a plan with ``masks()`` (token choice with a capacity, or expert choice).
    weights: ``(wi, wg | None, wo)`` stacked expert weights in compute dtype.

  Returns:
    ``[groups, tokens, embed]``; dropped tokens get 0.
  """
  dispatch, combine = plan.masks()                                   # [G,S,E,C]
  g, _, e, c = dispatch.shape
  xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
  if not jax.sharding.get_abstract_mesh().empty:
    xe = jax.lax.with_sharding_constraint(xe, _buffer_spec())
  ye = expert_mlp(xe.reshape(e, g * c, -1), *weights, activation).reshape(xe.shape)
  if not jax.sharding.get_abstract_mesh().empty:
    ye = jax.lax.with_sharding_constraint(ye, _buffer_spec())
  return jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), ye)


# ----------------------------------------------------------------------------- dropless


def default_block(rows: int, num_experts: int) -> int:
  """Rows per block of the blocked grouped matmul: about a quarter of the rows per expert,
  a power of two in [8, 512]. Static buffer = rows + experts * block (~1.25x rows)."""
  b = max(rows // (4 * num_experts), 1)
  return int(min(max(1 << (b - 1).bit_length(), 8), 512))


def _blocked_grouped_mlp(xs, counts, weights, activation, block):
  """Grouped FFN on rows ``xs [n, embed]`` sorted by expert with ``counts [experts]``.

  Each expert's rows are padded to a multiple of ``block``; the static buffer has
  ``cdiv(n, block) + experts`` blocks; every block belongs to one expert, whose weights are
  gathered per block and applied by one batched einsum. Rows past ``sum(counts)`` give 0.
  """
  wi, wg, wo = weights
  n, d = xs.shape
  e = wi.shape[0]
  n_blocks = -(-n // block) + e
  padded = -(-counts // block) * block
  pad_end = jnp.cumsum(padded)
  pad_start = pad_end - padded
  start = jnp.cumsum(counts) - counts
  row = jnp.arange(n)
  row_expert = jnp.searchsorted(jnp.cumsum(counts), row, side="right")         # E for tail rows
  safe = jnp.minimum(row_expert, e - 1)
  dest = jnp.where(row_expert < e, pad_start[safe] + row - start[safe], n_blocks * block)
  xb = jnp.zeros((n_blocks * block, d), xs.dtype).at[dest].set(xs, mode="drop")
  block_expert = jnp.minimum(
      jnp.searchsorted(pad_end, jnp.arange(n_blocks) * block, side="right"), e - 1)
  gw = tuple(None if w is None else w[block_expert] for w in (wi, wg, wo))
  yb = expert_mlp(xb.reshape(n_blocks, block, d), *gw, activation).reshape(-1, d)
  return yb.at[dest].get(mode="fill", fill_value=0)


def _ragged_grouped_mlp(xs, counts, weights, activation, impl, interpret=False):
  """Grouped FFN with ``jax.lax.ragged_dot`` or megablox ``gmm``.

  Rows past ``sum(counts)`` are zeroed on the way in and out (``gmm`` leaves them
  uninitialised), with ``where`` so that nothing from them reaches a gradient.
  """
  from moejax.layers.dense import ACTIVATIONS
  wi, wg, wo = weights
  n = xs.shape[0]
  valid = (jnp.arange(n) < counts.sum())[:, None]
  xs = jnp.where(valid, xs, 0)
  if impl == "gmm":
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # TPU (or interpret)
    pad = -n % 128
    xs = jnp.pad(xs, ((0, pad), (0, 0)))
    tile = lambda dim: 128 if dim % 128 == 0 else dim
    mm = lambda a, w: megablox.gmm(a, w, counts, a.dtype, (128, tile(w.shape[1]), tile(w.shape[2])),
                                   None, None, False, interpret)
  else:
    mm = lambda a, w: jax.lax.ragged_dot(a, w, counts)
  h = ACTIVATIONS[activation](mm(xs, wi))
  if wg is not None:
    h = h * mm(xs, wg)
  return jnp.where(valid, mm(h, wo)[:n], 0)


def resolve_dropless_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def dropless_dispatch(x: jax.Array, plan: TokenChoicePlan, weights, activation: str, *,
                      impl: str = "auto", block: int = 0, interpret: bool = False) -> jax.Array:
  """Dropless token-choice dispatch: sort by expert, grouped matmul, unsort.

  Args:
    x: ``[groups, tokens, embed]``.
    plan: a :class:`TokenChoicePlan` (its capacity, if any, is ignored: every routed
      slot is processed).
    impl: ``auto`` (blocked on CPU, ragged_dot elsewhere), ``blocked``, ``ragged_dot``,
      ``gmm`` (megablox, TPU).
    block: rows per block of ``blocked``; 0 = :func:`default_block`.
    interpret: run ``gmm`` in Pallas interpret mode (tests on CPU).

  Returns:
    ``[groups, tokens, embed]``.
  """
  if not isinstance(plan, TokenChoicePlan):
    raise TypeError(f"dropless dispatch needs a token-choice plan, got {type(plan).__name__} "
                    "(expert choice is capacity-based: use dispatch='einsum')")
  g, s, d = x.shape
  k = plan.expert_index.shape[-1]
  e = weights[0].shape[0]
  n = g * s * k
  xt = x.reshape(g * s, d)
  expert = jnp.where(plan.routed, plan.expert_index, e).reshape(n)  # unrouted rows sort last
  order = jnp.argsort(expert, stable=True)                          # [n]
  counts = jnp.bincount(expert, length=e + 1)[:e].astype(jnp.int32)  # [E]
  xs = xt[order // k]                                               # [n, D] sorted by expert
  impl = resolve_dropless_impl(impl)
  if impl == "blocked":
    ys = _blocked_grouped_mlp(xs, counts, weights, activation, block or default_block(n, e))
  else:
    ys = _ragged_grouped_mlp(xs, counts, weights, activation, impl, interpret)
  y = jnp.zeros_like(ys).at[order].set(ys)                          # unsort: [n, D]
  w = (plan.weight * plan.routed).reshape(g * s, k, 1).astype(y.dtype)
  return jnp.sum(y.reshape(g * s, k, d) * w, axis=1).reshape(g, s, d)


# ----------------------------------------------------------------------------- expert parallel


def expert_parallel_dispatch(x: jax.Array, plan, weights, activation: str) -> jax.Array:
  """Expert parallelism with explicit all-to-all inside ``jax.shard_map``.

  The mesh comes from ``jax.sharding.get_abstract_mesh()`` (the caller runs under
  ``jax.set_mesh``), the specs from the active logical rules: groups over the ``groups``
  axes (which must include the experts' axis), experts over the ``expert`` axis,
  expert_mlp over its axis (partial outputs are summed over it). Per device::

    local groups [g, S, D] --dispatch mask--> [E, g, C, D]
      --all_to_all(split experts, concat groups)--> [E/n, n*g, C, D]
      --local experts--> --all_to_all back--> [E, g, C, D] --combine--> [g, S, D]

  Without a mesh, or with a single expert shard, this is :func:`einsum_dispatch`
  (same result).
  """
  if not sharding.mesh_axes("expert"):
    return einsum_dispatch(x, plan, weights, activation)
  mesh = jax.sharding.get_abstract_mesh()
  e_ax = sharding.logical_to_spec(("expert",))[0]
  g_ax = sharding.logical_to_spec(("groups",))[0]
  if not set(sharding.as_axes(e_ax)) <= set(sharding.as_axes(g_ax)):
    raise ValueError(f"expert parallelism needs the 'groups' rule ({g_ax}) to include the "
                     f"'expert' rule's mesh axes ({e_ax})")
  wi, wg, wo = weights
  spec_in = sharding.logical_to_spec(("expert", "embed", "expert_mlp"))
  spec_out = sharding.logical_to_spec(("expert", "expert_mlp", "embed"))
  mlp_axes = sharding.as_axes(spec_in[2])
  gated = wg is not None

  def local(x, plan, wi, wg, wo):
    dispatch, combine = plan.masks()                               # [g,S,E,C]
    xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)  # [E,g,C,D]
    xe = jax.lax.all_to_all(xe, e_ax, 0, 1, tiled=True)            # [E/n, n*g, C, D]
    el, ng, c, d = xe.shape
    ye = expert_mlp(xe.reshape(el, ng * c, d), wi, wg if gated else None, wo, activation)
    if mlp_axes:
      ye = jax.lax.psum(ye, mlp_axes)
    ye = jax.lax.all_to_all(ye.reshape(el, ng, c, d), e_ax, 1, 0, tiled=True)  # [E,g,C,D]
    return jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), ye)

  gspec = P(g_ax)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(gspec, gspec, spec_in, spec_in, spec_out),
                     out_specs=gspec, check_vma=False)
  # Without a gate, wi stands in for wg (same shape and spec, unused).
  return fn(x, plan, wi, wg if gated else wi, wo)
