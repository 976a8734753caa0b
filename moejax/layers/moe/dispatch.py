"""Dispatchers: apply a routing plan, run the experts, combine.

* :func:`einsum_dispatch` -- GShard: dispatch / combine masks ``[groups, tokens, experts,
  capacity]``, capacity-padded expert buffers ``[experts, groups, capacity, embed]``.
  Under a mesh the buffer is constrained to ``expert`` on its first axis, so GSPMD
  inserts the all-to-all (the "GSPMD einsum path"). A platform backend may move the same
  values as rows instead (registry operation ``moe.capacity_moves``, the CPU's).
* :func:`dropless_dispatch` -- no capacity: sort the (token, choice) rows by expert and
  run a grouped matmul (:data:`GROUPED_FFNS`): ``jax.lax.ragged_dot``, megablox ``gmm``
  (TPU), or one a backend registers (``blocked``, the CPU's). ``auto`` is the platform's
  choice (``moe.dropless_default``; ``ragged_dot`` without one).
* :func:`expert_parallel_dispatch` -- experts sharded over the ``expert`` mesh axis;
  capacity buffers travel by ``jax.lax.all_to_all`` inside ``jax.shard_map``.
* :func:`dropless_ep_dispatch` -- the same sharding without capacity: each device sorts its
  rows by expert and sends exactly them with ``jax.lax.ragged_all_to_all`` (TPU/GPU; XLA:CPU
  cannot run it, so ``dispatch='dropless_ep'`` runs ``expert_parallel`` there), then a
  grouped matmul over its local experts, and the reverse exchange.

``DISPATCH_MODES`` maps each ``moe.dispatch`` value to its function and properties;
:func:`resolve_dispatch` picks the one that runs on the target platform.

Activations are in the layer's compute dtype; the masks are built in float32 and cast.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.kernels import activations as act_lib
from moejax.kernels import platform as platform_lib
from moejax.kernels import registry
from moejax.layers.moe.experts import expert_mlp
from moejax.layers.moe.routing import TokenChoicePlan

log = logging.getLogger(__name__)


def _buffer_spec() -> P:
  """PartitionSpec of an expert buffer ``[experts, groups, capacity, embed]``: experts on
  their mesh axes, groups on whatever of the ``groups`` axes the experts do not use."""
  e_ax, g_ax, c_ax, d_ax = sharding.logical_to_spec(("expert", "groups", "capacity", "embed"))
  g_rest = tuple(a for a in sharding.as_axes(g_ax) if a not in sharding.as_axes(e_ax))
  return P(e_ax, g_rest or None, c_ax, d_ax)


def dispatch_experts_combine(x: jax.Array, plan, weights, activation: str, *,
                             to_experts=None, from_experts=None, reduce=None) -> jax.Array:
  """The capacity-buffer computation of both the einsum and the expert-parallel paths.

  ``x [groups, tokens, embed]`` --dispatch mask--> ``[experts, groups, capacity, embed]``
  --``to_experts``--> expert FFNs on ``[experts', groups', capacity, embed]`` --``reduce``-->
  --``from_experts``--> ``[experts, groups, capacity, embed]`` --combine--> ``[groups,
  tokens, embed]``. The hooks (identity by default) are where a path moves the buffers:
  sharding constraints (einsum / GSPMD) or ``all_to_all`` and ``psum`` inside
  ``shard_map`` (expert parallel).
  """
  ident = lambda a: a
  to_experts, from_experts, reduce = (to_experts or ident, from_experts or ident,
                                      reduce or ident)
  moves = registry.call("moe.capacity_moves", x, plan)   # a backend's row moves, or None
  if moves is not None:
    gather, scatter = moves
  else:
    dispatch, combine = plan.masks()                                   # [G,S,E,C]
    gather = lambda x: jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
    scatter = lambda ye: jnp.einsum("gsec,egcd->gsd", combine.astype(ye.dtype), ye)
  xe = to_experts(gather(x))
  e, g, c, d = xe.shape
  ye = reduce(expert_mlp(xe.reshape(e, g * c, d), *weights, activation))
  return scatter(from_experts(ye.reshape(e, g, c, -1)))


def einsum_dispatch(x: jax.Array, plan, weights, activation: str) -> jax.Array:
  """GShard einsum dispatch.

  Args:
    x: ``[groups, tokens, embed]`` in compute dtype.
    plan: a plan with ``masks()`` (token choice with a capacity, or expert choice).
    weights: ``(wi, wg | None, wo)`` stacked expert weights in compute dtype.

  Returns:
    ``[groups, tokens, embed]``; dropped tokens get 0.
  """
  constrain = None
  if not jax.sharding.get_abstract_mesh().empty:
    constrain = lambda a: jax.lax.with_sharding_constraint(a, _buffer_spec())
  return dispatch_experts_combine(x, plan, weights, activation, to_experts=constrain,
                                  from_experts=constrain)


# ----------------------------------------------------------------------------- dropless


class GroupedFFN(NamedTuple):
  """One grouped-matmul implementation of the dropless paths (``moe.dropless_impl``).

  combine(xt [t, D], expert [t, k] (E: none), weight [t, k], weights, activation, options)
    -> ``[t, D]``: ``sum_j weight[t, j] * FFN_{expert[t, j]}(xt[t])``.
  grouped(xs [m, D], group_sizes [E], weights, activation, options) -> ``[m, D]``: the FFN
    of rows already grouped by expert (rows past ``sum(group_sizes)``: 0).
  """
  combine: Callable
  grouped: Callable


def _ragged_grouped_mlp(xs, counts, weights, activation, impl, interpret=False):
  """Grouped FFN with ``jax.lax.ragged_dot`` or megablox ``gmm`` on rows ``xs [n, embed]``
  sorted by expert, ``counts [experts]``.

  Rows past ``sum(counts)`` are zeroed on the way in and out (``gmm`` leaves them
  uninitialised), with ``where`` so that nothing from them reaches a gradient.
  """
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
  h = act_lib.fn(activation)(mm(xs, wi))
  if wg is not None:
    h = h * mm(xs, wg)
  return jnp.where(valid, mm(h, wo)[:n], 0)


def _ragged_combine(impl):
  def combine(xt, expert, weight, weights, activation, options):
    t, k = expert.shape
    e = weights[0].shape[0]
    flat = expert.reshape(t * k)
    order = jnp.argsort(flat, stable=True)                          # [n], unrouted last
    counts = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)  # [E]
    ys = _ragged_grouped_mlp(xt[order // k], counts, weights, activation, impl,
                             options.interpret)
    y = jnp.zeros_like(ys).at[order].set(ys)                          # unsort: [n, D]
    w = weight.reshape(t, k, 1).astype(y.dtype)
    return jnp.sum(y.reshape(t, k, -1) * w, axis=1)
  return combine


def _ragged_grouped(impl):
  return lambda xs, sizes, weights, activation, options: _ragged_grouped_mlp(
      xs, sizes, weights, activation, impl, options.interpret)


# The portable grouped matmuls; a backend adds its own (``moe.grouped_ffn.<name>``).
GROUPED_FFNS = {impl: GroupedFFN(_ragged_combine(impl), _ragged_grouped(impl))
                for impl in ("ragged_dot", "gmm")}


def resolve_dropless_impl(impl: str) -> str:
  """``auto`` -> the target platform's choice (registry ``moe.dropless_default``, e.g. the
  CPU backend's ``blocked``), else ``ragged_dot`` (the target is the TPU while compiling
  for one from a CPU host, see :func:`moejax.kernels.target_platform`)."""
  if impl != "auto":
    return impl
  return registry.find("moe.dropless_default") or "ragged_dot"


def grouped_ffn(impl: str) -> GroupedFFN:
  """The :class:`GroupedFFN` of a dropless impl name (``auto`` resolved)."""
  impl = resolve_dropless_impl(impl)
  if impl in GROUPED_FFNS:
    return GROUPED_FFNS[impl]
  name = f"moe.grouped_ffn.{impl}"
  ffn = registry.find(name) if name in registry.OPS else None
  if ffn is None:
    raise ValueError(f"dropless_impl={impl!r} is a backend's grouped matmul, and no backend "
                     f"registers it here (use dropless_impl=auto, ragged_dot or gmm)")
  return ffn


def dropless_dispatch(x: jax.Array, plan: TokenChoicePlan, weights, activation: str, *,
                      impl: str = "auto", block: int = 0, interpret: bool = False) -> jax.Array:
  """Dropless token-choice dispatch: sort by expert, grouped matmul, unsort.

  Args:
    x: ``[groups, tokens, embed]``.
    plan: a :class:`TokenChoicePlan` (its capacity, if any, is ignored: every routed
      slot is processed).
    impl: ``auto`` (:func:`resolve_dropless_impl`), ``blocked``, ``ragged_dot``, ``gmm``
      (megablox, TPU).
    block: largest block of ``blocked`` (a power of two); 0 = :func:`default_block`.
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
  xt = x.reshape(g * s, d)
  expert = jnp.where(plan.routed, plan.expert_index, e).reshape(g * s, k)  # unrouted: none
  weight = (plan.weight * plan.routed).reshape(g * s, k)
  options = DispatchOptions(impl=impl, block=block, interpret=interpret)
  y = grouped_ffn(impl).combine(xt, expert, weight, weights, activation, options)
  return y.reshape(g, s, d)


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
  mesh, e_ax, g_ax, spec_in, spec_out, mlp_axes = _ep_axes()
  wi, wg, wo = weights
  gated = wg is not None

  def local(x, plan, wi, wg, wo):
    return dispatch_experts_combine(
        x, plan, (wi, wg if gated else None, wo), activation,
        to_experts=lambda a: jax.lax.all_to_all(a, e_ax, 0, 1, tiled=True),   # [E/n, n*g, C, D]
        from_experts=lambda a: jax.lax.all_to_all(a, e_ax, 1, 0, tiled=True),  # [E, g, C, D]
        reduce=(lambda a: jax.lax.psum(a, mlp_axes)) if mlp_axes else None)

  gspec = P(g_ax)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(gspec, gspec, spec_in, spec_in, spec_out),
                     out_specs=gspec, check_vma=False)
  # Without a gate, wi stands in for wg (same shape and spec, unused).
  return fn(x, plan, wi, wg if gated else wi, wo)


def _ep_axes():
  """(mesh, expert axes, groups axes, wi/wg spec, wo spec, expert_mlp axes) of the active
  mesh and rules; the groups rule must include the experts' axes."""
  mesh = jax.sharding.get_abstract_mesh()
  e_ax = sharding.logical_to_spec(("expert",))[0]
  g_ax = sharding.logical_to_spec(("groups",))[0]
  if not set(sharding.as_axes(e_ax)) <= set(sharding.as_axes(g_ax)):
    raise ValueError(f"expert parallelism needs the 'groups' rule ({g_ax}) to include the "
                     f"'expert' rule's mesh axes ({e_ax})")
  spec_in = sharding.logical_to_spec(("expert", "embed", "expert_mlp"))
  spec_out = sharding.logical_to_spec(("expert", "expert_mlp", "embed"))
  return mesh, e_ax, g_ax, spec_in, spec_out, sharding.as_axes(spec_in[2])


# ----------------------------------------------------------------------------- dropless EP


def _exclusive_cumsum(a, axis=-1):
  return jnp.cumsum(a, axis=axis) - a


def ep_receive_rows(rows: int, top_k: int, num_shards: int, local_experts: int,
                    buffer_factor: float = 0.0) -> int:
  """Rows of a device's receive buffer under :func:`dropless_ep_dispatch`.

  ``rows`` = this device's routed slots ``g * S * k``. Worst case (``buffer_factor <= 0``):
  every token of every shard sends ``min(k, local_experts)`` rows (its chosen experts are
  distinct) to this device: ``num_shards * rows / k * min(k, local_experts)`` -- nothing is
  ever dropped. ``buffer_factor > 0``: ``ceil(factor * rows)`` (the balanced load is
  ``rows``), capped at the worst case, rounded up to a multiple of 8.
  """
  worst = num_shards * (rows // top_k) * min(top_k, local_experts)
  if buffer_factor <= 0:
    return worst
  return min(worst, -(-math.ceil(buffer_factor * rows) // 8) * 8)


def dropless_ep_dispatch(x: jax.Array, plan: TokenChoicePlan, weights, activation: str, *,
                         impl: str = "auto", block: int = 0, buffer_factor: float = 0.0,
                         interpret: bool = False, exchange=None):
  """Dropless expert parallelism: rows travel by ``jax.lax.ragged_all_to_all``.

  Experts are sharded over the ``expert`` mesh axis (device ``j`` of ``n`` owns experts
  ``[j*E/n, (j+1)*E/n)``), groups over the ``groups`` axes, as in
  :func:`expert_parallel_dispatch`, but with no capacity: exactly the routed rows move.
  Per device, inside ``jax.shard_map``::

    local (token, choice) rows [N = g*S*k] --sort by expert--> xs [N, D]  (so by device too)
    counts [E] --all_gather--> [n, E]: every device knows every send size, hence the
      input offsets, send sizes, output offsets and receive sizes of both exchanges
    xs --ragged_all_to_all, one slice per (device, expert)--> recv [M, D], laid out by
      (local expert, source): already grouped for the matmul
    --grouped matmul (ragged_dot | gmm | blocked)--> --ragged_all_to_all back--> ys [N, D]
    --unsort, combine with the router weights--> [g, S, D]

  ``M`` is :func:`ep_receive_rows`: the worst case by default (dropless; memory grows with
  the number of expert shards), or ``buffer_factor`` times the balanced load. Then a device
  that would receive more than ``M`` rows keeps the first ``M`` in (local expert, source
  device, token, slot) order; the rest are dropped (zero output, not in ``plan.kept``).

  Args:
    x: ``[groups, tokens, embed]``; plan: a :class:`TokenChoicePlan` (capacity ignored).
    impl: grouped matmul on each device (:func:`resolve_dropless_impl`).
    exchange: the ragged exchange, ``jax.lax.ragged_all_to_all`` by default (XLA:CPU cannot
      run it; tests pass a reference built from ``all_gather``).

  Returns:
    ``(y [groups, tokens, embed], plan)``; the plan marks rows dropped for the buffer bound
    (never with ``buffer_factor <= 0``).
  """
  if not isinstance(plan, TokenChoicePlan):
    raise TypeError(f"dropless dispatch needs a token-choice plan, got {type(plan).__name__} "
                    "(expert choice is capacity-based: use dispatch='einsum')")
  if not sharding.mesh_axes("expert"):
    return dropless_dispatch(x, plan, weights, activation, impl=impl, block=block,
                             interpret=interpret), plan
  exchange = exchange or jax.lax.ragged_all_to_all
  mesh, e_ax, g_ax, spec_in, spec_out, mlp_axes = _ep_axes()
  n = math.prod(mesh.shape[a] for a in sharding.as_axes(e_ax))
  wi, wg, wo = weights
  gated = wg is not None
  e = wi.shape[0]
  el = e // n
  ffn = grouped_ffn(impl)
  options = DispatchOptions(impl=impl, block=block, buffer_factor=buffer_factor,
                            interpret=interpret)
  n_groups = math.prod(mesh.shape[a] for a in sharding.as_axes(g_ax))
  g_loc, s, d = x.shape[0] // n_groups, x.shape[1], x.shape[2]
  k = plan.expert_index.shape[-1]
  m = ep_receive_rows(g_loc * s * k, k, n, el, buffer_factor)
  clip = m < ep_receive_rows(g_loc * s * k, k, n, el)  # a device may get more than m rows

  def local(x, plan, wi, wg, wo):
    g = x.shape[0]
    rows = g * s * k
    expert = jnp.where(plan.routed, plan.expert_index, e).reshape(rows)  # unrouted sort last
    order = jnp.argsort(expert, stable=True)
    xs = x.reshape(g * s, d)[order // k]                                  # [N, D] by expert
    counts = jnp.bincount(expert, length=e + 1)[:e].astype(jnp.int32)     # [E]
    me = jax.lax.axis_index(e_ax)
    every = jax.lax.all_gather(counts, e_ax)                              # [n src, E]
    starts = _exclusive_cumsum(every, 1)        # [src, E]: expert's rows in src's sorted xs
    # Receiver dst holds its rows in (local expert, src) order: the grouped matmul's layout.
    per_dst = every.reshape(n, n, el).transpose(1, 2, 0).reshape(n, el * n)  # [dst, (l, src)]
    if clip:   # dst keeps its first m rows in (local expert, src) order
      per_dst = jnp.diff(jnp.minimum(jnp.cumsum(per_dst, 1), m), axis=1, prepend=0)
    dest = _exclusive_cumsum(per_dst, 1)                                  # where they land
    sent = per_dst.reshape(n, el, n).transpose(2, 0, 1).reshape(n, e)     # [src, E] kept
    dest = dest.reshape(n, el, n).transpose(2, 0, 1).reshape(n, e)        # [src, E]
    mine = lambda a: a.reshape(n, n, el)[:, me].reshape(e)                # [(src, l)] to me
    # Slice i of a call goes to device i // el: one slice per (device, local expert).
    recv = exchange(xs, jnp.zeros((m, d), xs.dtype), starts[me], sent[me], dest[me],
                    mine(sent), axis_name=e_ax)                           # [M, D] by expert
    group_sizes = per_dst[me].reshape(el, n).sum(1)                       # [el]
    yg = ffn.grouped(recv, group_sizes, (wi, wg if gated else None, wo), activation, options)
    if mlp_axes:
      yg = jax.lax.psum(yg, mlp_axes)
    # Back: slice (src, l) of my buffer returns to src, where its rows came from.
    ys = exchange(yg, jnp.zeros((rows, d), yg.dtype), mine(dest), mine(sent), mine(starts),
                  sent[me], axis_name=e_ax)                               # [N, D] sorted
    y = jnp.zeros_like(ys).at[order].set(ys)
    weight = (plan.weight * plan.routed).reshape(g * s, k, 1).astype(y.dtype)
    if clip:   # row p of my sorted xs went out iff it is among its expert's first sent rows
      ex = expert[order]
      safe = jnp.minimum(ex, e - 1)
      p = jnp.arange(rows, dtype=jnp.int32)
      went = (ex < e) & (p - starts[me][safe] < sent[me][safe])
      kept = jnp.zeros((rows,), bool).at[order].set(went).reshape(g, s, k)
      weight = weight * kept.reshape(g * s, k, 1)
    else:
      kept = plan.routed
    return jnp.sum(y.reshape(g * s, k, d) * weight, axis=1).reshape(g, s, d), kept

  gspec = P(g_ax)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(gspec, gspec, spec_in, spec_in, spec_out),
                     out_specs=(gspec, gspec), check_vma=False)
  y, kept = fn(x, plan, wi, wg if gated else wi, wo)
  if clip:  # drops show in plan.kept: dropped slots get position >= capacity
    big = jnp.iinfo(jnp.int32).max // 2
    plan = plan.replace(position=jnp.where(kept, plan.position, big), capacity=big,
                        weight=plan.weight * kept)
  return y, plan


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class DispatchOptions:
  """The layer's dispatch settings (``moe.dropless_impl``, ``dropless_block``,
  ``ep_buffer_factor``)."""
  impl: str = "auto"
  block: int = 0
  buffer_factor: float = 0.0
  interpret: bool = False


@dataclasses.dataclass(frozen=True)
class DispatchMode:
  """One ``moe.dispatch`` value.

  apply: ``(x, plan, weights, activation, DispatchOptions) -> (y, plan)`` (the plan back,
    possibly marking extra drops).
  dropless: routing gives plans without capacity.
  splits_groups: shard_map splits the routing groups over the groups axes (the layer
    checks that they divide).
  needs: a collective XLA must run for this mode; where the platform's cannot,
    ``fallback`` runs instead (logged once).
  """
  apply: Callable
  dropless: bool = False
  splits_groups: bool = False
  needs: str | None = None
  fallback: str | None = None


DISPATCH_MODES: dict[str, DispatchMode] = {
    "einsum": DispatchMode(lambda x, p, w, a, o: (einsum_dispatch(x, p, w, a), p)),
    "dropless": DispatchMode(
        lambda x, p, w, a, o: (dropless_dispatch(x, p, w, a, impl=o.impl, block=o.block,
                                                 interpret=o.interpret), p),
        dropless=True),
    "expert_parallel": DispatchMode(
        lambda x, p, w, a, o: (expert_parallel_dispatch(x, p, w, a), p), splits_groups=True),
    # Where XLA has no ragged_all_to_all, the capacity all_to_all runs instead.
    "dropless_ep": DispatchMode(
        lambda x, p, w, a, o: dropless_ep_dispatch(
            x, p, w, a, impl=o.impl, block=o.block, buffer_factor=o.buffer_factor,
            interpret=o.interpret),
        dropless=True, splits_groups=True, needs="ragged_all_to_all",
        fallback="expert_parallel"),
}

_LOGGED: set[tuple[str, str]] = set()


def resolve_dispatch(name: str, platform: str | None = None) -> tuple[str, DispatchMode]:
  """``moe.dispatch`` -> (the mode that runs on ``platform``, its :class:`DispatchMode`).

  ``platform`` defaults to the target platform (the TPU while compiling for one from a
  CPU host). ``dropless_ep`` where XLA has no ``ragged_all_to_all`` (XLA:CPU) becomes
  ``expert_parallel`` (capacity all_to_all, ``moe.capacity_factor_*`` apply), with a note
  in the log.
  """
  mode = DISPATCH_MODES[name]
  where = None if mode.needs is None else platform_lib.lacking(mode.needs, platform)
  if where is None:
    return name, mode
  if (name, where) not in _LOGGED:
    _LOGGED.add((name, where))
    log.warning("moe.dispatch=%r cannot run on %s (no %s there): using the capacity "
                "all_to_all of dispatch=%r (moe.capacity_factor_* apply)",
                name, where, mode.needs, mode.fallback)
  return mode.fallback, DISPATCH_MODES[mode.fallback]
