"""Device meshes and the logical-axis-name -> mesh-axis rules.

Every parameter and key activation is annotated with logical names (``embed``,
``mlp``, ``expert``...). This module is the only place that says which mesh axis
each name lands on. The mesh has three axes:

* ``data``   -- batch parallelism;
* ``expert`` -- experts of MoE layers (and rows of PEER/PKM tables) are split over it;
  outside MoE layers it is a second data axis, so the batch is sharded over both;
* ``model``  -- tensor parallelism (hidden ``mlp``, attention ``heads``, ``vocab``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")

# Logical name -> mesh axis (or axes, or None = replicated). Every logical name
# used anywhere in moejax must appear here (unknown names are an error in flax).
BASE_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "expert")),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("norm", None),
    ("layers", None),             # leading axis of blocks stacked by model.scan_layers
    # MoE
    ("expert", "expert"),
    ("expert_mlp", "model"),
    ("capacity", None),
    ("groups", ("data", "expert")),
    # Product-key layers (PEER / PKM)
    ("table_rows", "expert"),     # rows of expert / value tables
    ("table_embed", None),        # feature dim of tables
    ("subkeys", None),
    ("key_heads", None),
    ("key_dim", None),
)


def logical_rules(overrides: dict[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
  """Returns BASE_RULES with ``overrides`` (logical name -> mesh axes) applied."""
  overrides = dict(overrides or {})
  rules = []
  for name, axes in BASE_RULES:
    rules.append((name, overrides.pop(name, axes)))
  rules.extend(overrides.items())
  return tuple(rules)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 in ``shape`` by the number of devices left over."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or num_devices % known:
    raise ValueError(
        f"mesh shape {tuple(shape)} does not divide {num_devices} devices "
        "(set --config.mesh.data/expert/model so their product is the device count, -1 = the rest)")
  return tuple(num_devices // known if s == -1 else s for s in shape)


def make_mesh(data: int = -1, expert: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'expert', 'model') mesh with Auto axes (GSPMD propagation).

  Without a -1 the mesh may use fewer than all devices (the first ones), e.g. a
  1-device reference run on an 8-device host.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape((data, expert, model), len(devices))
  devices = devices[:math.prod(shape)]
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def param(value: jax.Array, names: Sequence[str | None], kind: type = nnx.Param) -> nnx.Variable:
  """A parameter annotated with logical axis ``names``.

  Under ``jax.set_mesh`` (with ``nnx.logical_axis_rules``) it is placed sharded at
  creation; without a mesh it is created unsharded but keeps its names, so
  ``nnx.get_named_sharding`` can place it later.
  """
  if len(names) != np.ndim(value):
    raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{np.ndim(value)} array")
  eager = not jax.sharding.get_abstract_mesh().empty
  return kind(value, out_sharding=tuple(names), eager_sharding=eager)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names.

  A no-op without a mesh, and for mesh axes that are manual (inside ``shard_map``, e.g. a
  layer compiled per device around a Pallas kernel) or absent from the mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  usable = set(mesh.axis_names) - set(mesh.manual_axes)

  def keep(entry):
    axes = tuple(a for a in as_axes(entry) if a in usable)
    return None if not axes else axes[0] if len(axes) == 1 else axes

  full = logical_to_spec(names)
  spec = P(*(keep(e) for e in full))
  if spec != full and all(e is None for e in spec):
    return x      # nothing left to constrain over (all manual or absent)
  return jax.lax.with_sharding_constraint(x, spec)


def logical_to_spec(names: Sequence[str | None]) -> P:
  """Maps logical names to a PartitionSpec with the active ``nnx.logical_axis_rules``."""
  rules = dict(flax_spmd.get_logical_axis_rules() or BASE_RULES)
  return P(*(None if n is None else rules[n] for n in names))


def as_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, 'axis' or a tuple of axes) as a tuple of axis names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axes(name: str) -> tuple[str, ...]:
  """Mesh axes of size > 1 that logical ``name`` maps to, under the active mesh and rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a in as_axes(logical_to_spec((name,))[0]) if mesh.shape.get(a, 1) > 1)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a ``[batch, ...]`` input: batch over (data, expert)."""
  return NamedSharding(mesh, P(("data", "expert"), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --------------------------------------------------------------- inside and outside shard_map


def mesh_is_local() -> bool:
  """No axis of several devices of the current (abstract) mesh is left to XLA's
  partitioner: no mesh, or every such axis is manual here (inside ``shard_map``)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or all(size == 1 or name in mesh.manual_axes
                           for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def varying(a) -> set:
  """Mesh axes over which ``a`` varies inside ``shard_map`` (empty outside)."""
  aval = jax.typeof(a)    # jax 0.10: aval.mat.varying (older: aval.vma)
  mat = getattr(aval, "mat", None)
  return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))


def match_vma(ct, like):
  """Inside ``shard_map``: a cotangent with the device-variance type of its primal.

  A table replicated over (say) 'data' gets row-gradients that differ per data shard: its
  cotangent is their sum (psum). Outside shard_map this is the identity.
  """
  have, want = varying(ct), varying(like)
  if have - want:
    ct = jax.lax.psum(ct, tuple(sorted(have - want)))
  if want - have:
    ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to="varying")
  return ct
