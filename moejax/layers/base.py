"""The seam between the Transformer and its feed-forward layers.

A feed-forward layer is an ``nnx.Module`` called as ::

    y, aux = ffn(x, mask=mask)      # x, y: [batch, length, embed]; mask: [batch, length] bool

``mask`` marks real (non-padding) tokens; layers that compute statistics over the
batch (query BatchNorm, expert load) must ignore the rest. Train / eval behaviour
follows ``model.train()`` / ``model.eval()`` (nnx attributes such as
``deterministic`` and ``use_running_average``).

``aux`` is an :class:`Aux` record. The model collects one per block; the training
step adds ``aux.losses`` to the loss and logs ``aux.metrics``; evaluation sums
``aux.counts`` over a dataset (on device) to get per-expert statistics.

Kinds are registered by name with :func:`register_ffn`, each with a config
section (an ``ml_collections.ConfigDict`` of defaults, placed at ``config.<name>``)
and an optional validator. The model picks a kind per block from the config, so
a new kind plugs in without touching the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax.kernels.row_plan import unique_rows


@flax.struct.dataclass
class Aux:
  """What a layer reports besides its output.

  Attributes:
    losses: scalar losses, already multiplied by their config weights; the
      training step adds them to the LM loss. E.g. ``{'load_balance': ..., 'z_loss': ...}``.
    metrics: scalar statistics of this batch, logged as they are (means over tokens).
    counts: per-expert arrays (e.g. ``load`` ``[experts]``, ``score_sum`` ``[N]``) that
      evaluation sums over many batches; keep them small in number, not in size.
  """

  losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  counts: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  def total_loss(self) -> jax.Array:
    return sum(self.losses.values(), jnp.zeros((), jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of ``x [b, l, ...]`` over real tokens (``mask [b, l]``) and all trailing axes."""
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.mean(x)
  m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape)
  m = m.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


class TableParam(nnx.Param):
  """A large row-addressed table (PEER expert tables, PKM values).

  The optimizer gives these their own learning rate and no weight decay
  (``config.optim.table_lr``), as PKM and memory-layer implementations do.

  A layer whose tables support row-sparse updates names them in a class attribute
  ``row_tables`` (e.g. ``('u', 'v')``), gives the shape ``(U,)`` of the distinct rows a
  step can retrieve by ``row_index_shape(batch, length)``, and, when ``self.row_deltas`` is
  attached, calls :func:`row_taps` with the indices it retrieved and hands the taps to its
  lookup.
  """


class RowDelta(nnx.Variable):
  """A zero tap ``[U, d]`` on the distinct rows a layer retrieves from one of its tables.

  Row-sparse training attaches these before the forward pass and differentiates
  with respect to them instead of the table: the gradient of slot ``s`` is the
  gradient of table row ``row_index[s]``, summed over all its retrievals (see
  ``moejax.training.row_sparse``).
  """


class RowIndex(nnx.Variable):
  """The distinct table rows a layer retrieved in its last forward pass ``[U]`` (int32,
  ascending, padded with the table's row count)."""


def row_taps(layer: nnx.Module, indices: jax.Array, num_rows: int):
  """In a row-sparse step (``layer.row_deltas`` attached): records the distinct rows
  ``indices [..., h, k]`` retrieves in ``layer.row_index``; returns ``({table: tap}, rows
  [U])`` for the lookup. Elsewhere ``(None, None)``."""
  if getattr(layer, "row_deltas", None) is None:
    return None, None
  layer.row_index[...] = rows = unique_rows(indices, num_rows)
  taps = {name: delta[...] for name, delta in layer.row_deltas.items()}
  return taps, rows


@dataclasses.dataclass(frozen=True)
class FFNKind:
  name: str
  build: Callable[..., nnx.Module]
  default_config: Callable[[], ml_collections.ConfigDict]
  validate: Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict], None] | None = None
  check_mesh: Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict, dict[str, int]],
                       None] | None = None


FFN_REGISTRY: dict[str, FFNKind] = {}


def register_ffn(name: str, *, default_config: Callable[[], ml_collections.ConfigDict],
                 validate: Callable[[Any, Any], None] | None = None,
                 check_mesh: Callable[[Any, Any, dict[str, int]], None] | None = None):
  """Decorator registering ``build(cfg, *, d_model, d_ff, dtype, rngs) -> nnx.Module``.

  ``cfg`` is ``config.<name>`` (the section made by ``default_config``); ``validate(cfg,
  config)`` gets that section and the whole config and raises ``ConfigError``;
  ``check_mesh(cfg, config, mesh_shape)`` does the checks that need the resolved mesh
  (``{'data': 4, 'expert': 2, 'model': 1}``) and raises ``ConfigError`` too. Layers themselves
  raise ``ValueError`` in plain words; field advice is for these two.
  """

  def decorator(build):
    FFN_REGISTRY[name] = FFNKind(name, build, default_config, validate, check_mesh)
    return build

  return decorator


def build_ffn(name: str, cfg: ml_collections.ConfigDict, *, d_model: int, d_ff: int,
              dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
  return FFN_REGISTRY[name].build(cfg, d_model=d_model, d_ff=d_ff, dtype=dtype, rngs=rngs)
