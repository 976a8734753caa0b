"""Row-sparse ("lazy") Adam for big row-addressed tables (PEER experts, PKM values).

A step of a PEER layer touches at most ``tokens · h · k`` of its N table rows. Dense
Adam still reads and writes all N rows of the table and of both moments every step
(and the gradient arrives as a dense ``[N, d]`` scatter), so its cost grows with N.
Lazy Adam — as in XLM's sparse PKM values and ``torch.optim.SparseAdam`` — updates
only the rows retrieved in the step:

* gradients arrive as ``(unique rows [U], row_grads [U, d])``: each distinct row retrieved
  in the step once, its gradient summed over every retrieval (the layer's lookup computes
  these directly, see ``moejax.kernels.lookup_xla.lookup_sparse``; the Pallas kernels
  never build a per-retrieval ``[tokens, h, k, d]`` gradient). Where the platform's backend
  says so (``row_sparse.factored``, the CPU's) they stay as the lookup's factors
  (:class:`FactoredRowGrads`): the clip norm and the update rebuild each row in cache, and
  no ``[U, d]`` gradient is written or read;
* for those rows only: ``m = b1·m + (1-b1)·g``, ``v = b2·v + (1-b2)·g²``,
  ``row -= lr · m̂ / (√v̂ + eps)`` with the bias correction of the global step;
* every other row, and its moments, is left as it is.

How it differs from dense Adam: an untouched row's moments do not decay and it
does not keep moving on its old momentum; when it is next retrieved its moments
pick up where they were. After the first step the two agree only on rows that
were touched every step. Cost: O(M·d + M log M) per table, independent of N
(the table and moments are updated in place when donated); U = min(M, N) with
M = tokens · h · k.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels, sharding
from moejax.kernels import registry, row_plan
from moejax.layers.base import RowDelta, RowIndex


# Rows per chunk of the lazy-Adam update: the chunk's rows of the table, both moments and
# the gradient (4 × 2048 × d floats, 8 MB at d = 256) stay in cache.
ADAM_CHUNK_ROWS = 2048


class FactoredRowGrads(NamedTuple):
  """Row gradients ``g [U, d]`` as the lookup's factors (see :func:`factored_taps`):
  ``g[s] = Σ coefs[e] · vectors[e // H]`` over the retrievals ``e`` of slot ``s``, which are
  ``order[starts[s]:starts[s+1]]`` (``row_plan.slot_runs``). ``coefs [T, H]``,
  ``vectors [T, d]``."""

  order: jax.Array
  starts: jax.Array
  coefs: jax.Array
  vectors: jax.Array

  def squared_norm(self) -> jax.Array:
    norm = registry.call("row_sparse.factored_sum_squares", *self)
    if norm is None:
      g = row_plan.run_sums(*self)
      norm = jnp.sum(g * g)
    return norm


def adam_on_unique_rows(table, mu, nu, unique, g, *, count, lr, b1, b2, eps, scale=None):
  """Lazy Adam given deduplicated ``unique [M]`` row ids (N = padding) and gradients ``g [M, d]``
  (or :class:`FactoredRowGrads`: the backend's kernel rebuilds each row's gradient in
  cache; without one they are summed into ``[U, d]`` rows first).

  Returns the new ``(table, mu, nu)`` ``[N, d]``. Over chunks of :data:`ADAM_CHUNK_ROWS`
  rows (``lax.scan``, the tables as its carry): each chunk is gathered, updated and
  scattered back while in cache, with no ``[M, d]`` temporaries; with the tables donated
  the scatters update them in place. ``scale`` (e.g. a clip factor) multiplies ``g`` one
  chunk at a time (``g * scale`` up front would write and re-read a whole ``[M, d]`` copy).
  """
  count = count.astype(jnp.float32)
  c1, c2 = 1 - b1 ** count, 1 - b2 ** count
  hyper = dict(lr=lr, b1=b1, b2=b2, eps=eps, c1=c1, c2=c2, scale=1.0 if scale is None else scale)
  if isinstance(g, FactoredRowGrads):
    new = registry.call("row_sparse.factored_adam_rows", table, mu, nu, unique, *g, **hyper)
    if new is not None:
      return new
    g = row_plan.run_sums(*g)
  # The platform backend's update (the CPU's: one pass in place, skipping padding slots).
  new = registry.call("row_sparse.adam_rows", table, mu, nu, unique, g, **hyper)
  if new is not None:
    return new

  def update(tables, args):
    table, mu, nu = tables
    u, gc = args
    gc = gc.astype(jnp.float32)
    if scale is not None:
      gc = gc * scale
    m_rows = b1 * mu.at[u].get(mode="fill", fill_value=0) + (1 - b1) * gc
    v_rows = b2 * nu.at[u].get(mode="fill", fill_value=0) + (1 - b2) * gc * gc
    rows = table.at[u].get(mode="fill", fill_value=0)
    new_rows = rows - lr * (m_rows / c1) / (jnp.sqrt(v_rows / c2) + eps)
    return (table.at[u].set(new_rows.astype(table.dtype), mode="drop"),
            mu.at[u].set(m_rows.astype(mu.dtype), mode="drop"),
            nu.at[u].set(v_rows.astype(nu.dtype), mode="drop")), None

  m = unique.shape[0]
  c = kernels.cache_chunk(m, 1, ADAM_CHUNK_ROWS)
  if c == m:   # one chunk (TPU / GPU, or few rows): no loop
    return update((table, mu, nu), (unique, g))[0]
  pad = -m % c
  if pad:   # padding slots: row N, dropped on write
    unique = jnp.pad(unique, (0, pad), constant_values=table.shape[0])
    g = jnp.pad(g, ((0, pad), (0, 0)))
  (table, mu, nu), _ = jax.lax.scan(
      update, (table, mu, nu), (unique.reshape(-1, c), g.reshape(-1, c, g.shape[-1])))
  return table, mu, nu


# ----------------------------------------------------------------- wiring into a train step
#
# A train step with row-sparse tables (config.optim.table_update='row_sparse'):
#   1. attach(model, b, l): every layer with ``row_tables`` gets zero RowDeltas ("taps")
#      [U, d] and a RowIndex [U]; its forward stores the distinct rows it retrieved in the
#      RowIndex and hands the taps to its lookup, whose gradient w.r.t. a tap is the
#      summed gradient of row RowIndex[s] of the table. Where the backend takes factors
#      (factored_taps) the taps are instead the lookup's factors, coefs [T, H] and vectors
#      [T, d], plus the slot of each retrieval [T, H]: nothing [U, d] is written, the
#      backend's optimizer kernels rebuild each row;
#   2. differentiate w.r.t. non-table Params and RowDeltas (tables get no gradient);
#   3. TableAdam.row_grads pairs each table's rows with its tap gradients; the global norm
#      for clipping covers them and the other gradients; TableAdam.apply does lazy Adam;
#   4. detach(model), then the usual optax update of every other parameter.


def _slot_runs(slots, num_slots):
  runs = registry.call("row_sparse.slot_runs", slots, num_slots)
  return row_plan.slot_runs(slots, num_slots) if runs is None else runs


def _sum_squares_rows(rows, g, num_rows):
  total = registry.call("row_sparse.sum_squares_rows", rows, g, num_rows)
  return jnp.sum(g * g) if total is None else total


class TableMoment(nnx.Variable):
  """First or second Adam moment of a TableParam, sharded like it."""


def row_layers(model: nnx.Module):
  """(path, layer) of every layer that declares ``row_tables``."""
  return [(path, m) for path, m in nnx.iter_modules(model) if getattr(m, "row_tables", ())]


def _key(path, name: str) -> str:
  return "/".join(str(p) for p in path) + "/" + name


def factored_taps(layer: nnx.Module) -> bool:
  """Whether ``layer``'s row gradients stay as the lookup's factors (:class:`RowFactors
  <moejax.kernels.row_plan.RowFactors>`): where its lookup is the reference one, its
  compute dtype float32, and the platform's backend takes factors for its tables
  (``row_sparse.factored``: the CPU's, on a local mesh; it saves writing and re-reading the
  ``[U, d]`` row gradients). Elsewhere (TPU / GPU kernels, a sharded batch) ``[U, d]``
  taps."""
  tables = [getattr(layer, name)[...] for name in layer.row_tables]
  if not (kernels.resolve(getattr(layer, "kernel", "reference"), width=tables[0].shape[-1])
          == "reference" and jnp.dtype(getattr(layer, "dtype", jnp.float32)) == jnp.float32
          and not sharding.mesh_axes("batch")):   # table_mix's batch-parallel lookup: [U, d]
    return False
  return bool(registry.call("row_sparse.factored", tables))


def attach(model: nnx.Module, batch: int, length: int) -> None:
  for _, layer in row_layers(model):
    shape = layer.row_index_shape(batch, length)
    width = lambda name: getattr(layer, name).shape[-1]
    if factored_taps(layer):
      t, h = layer.retrieval_shape(batch, length)
      layer.row_deltas = nnx.Dict({
          name: nnx.Dict({"coefs": RowDelta(jnp.zeros((t, h), jnp.float32)),
                          "vectors": RowDelta(jnp.zeros((t, width(name)), jnp.float32))})
          for name in layer.row_tables})
      layer.row_slots = RowIndex(jnp.zeros((t, h), jnp.int32))
    else:
      layer.row_deltas = nnx.Dict({
          name: RowDelta(jnp.zeros(shape + (width(name),), jnp.float32))
          for name in layer.row_tables})
    layer.row_index = RowIndex(jnp.zeros(shape, jnp.int32))


def detach(model: nnx.Module) -> None:
  for _, layer in row_layers(model):
    del layer.row_deltas
    del layer.row_index
    if getattr(layer, "row_slots", None) is not None:
      del layer.row_slots


class TableAdam(nnx.Object):
  """Lazy-Adam moments of every row-sparse table of ``model``, keyed by path."""

  def __init__(self, model: nnx.Module, *, lr_schedule, b1: float, b2: float, eps: float):
    moments = {}
    for path, layer in row_layers(model):
      for name in layer.row_tables:
        table = getattr(layer, name)
        names = table.get_metadata().get("out_sharding")
        zeros = jnp.zeros(table.shape, jnp.float32)
        moments[_key(path, name)] = (sharding.param(zeros, names, kind=TableMoment) if names
                                     else TableMoment(zeros))
    self.mu = nnx.Dict({k: v for k, v in moments.items()})
    self.nu = nnx.Dict({k: TableMoment(jnp.zeros_like(v[...]), **v.get_metadata())
                        for k, v in moments.items()})
    self.lr_schedule = lr_schedule
    self.b1, self.b2, self.eps = b1, b2, eps

  def row_grads(self, model: nnx.Module, delta_grads: nnx.State) -> dict[str, tuple]:
    """{table key: (unique row ids [U] (N = padding), summed row gradients [U, d] or their
    :class:`FactoredRowGrads`)}."""
    nnx.update(model, delta_grads)          # RowDeltas now hold the row gradients
    out = {}
    for path, layer in row_layers(model):
      rows = layer.row_index[...]
      slots = getattr(layer, "row_slots", None)
      runs = None if slots is None else _slot_runs(slots[...], rows.shape[0])
      for name in layer.row_tables:
        delta = layer.row_deltas[name]
        out[_key(path, name)] = (rows, delta[...].astype(jnp.float32) if runs is None else
                                 FactoredRowGrads(*runs, delta["coefs"][...],
                                                  delta["vectors"][...]))
    return out

  def squared_norm(self, model: nnx.Module, rows: dict[str, tuple]) -> jax.Array:
    """Σ of every table's squared row gradients (from ``row_grads``): their share of the
    global clip norm; the platform backend's (the CPU's skips the padding slots, or
    rebuilds each row from its factors) where it has one."""
    total = jnp.zeros((), jnp.float32)
    for path, layer in row_layers(model):
      for name in layer.row_tables:
        unique, g = rows[_key(path, name)]
        total += (g.squared_norm() if isinstance(g, FactoredRowGrads) else
                  _sum_squares_rows(unique, g, getattr(layer, name).shape[0]))
    return total

  def apply(self, model: nnx.Module, rows: dict[str, tuple], count: jax.Array,
            scale: jax.Array | float = 1.0) -> None:
    """Lazy Adam on each table from ``row_grads`` (times ``scale``, e.g. a clip factor).

    ``count``: the 1-based global step.
    """
    lr = self.lr_schedule(count - 1)
    for path, layer in row_layers(model):
      for name in layer.row_tables:
        key, table = _key(path, name), getattr(layer, name)
        unique, g = rows[key]
        table[...], self.mu[key][...], self.nu[key][...] = adam_on_unique_rows(
            table[...], self.mu[key][...], self.nu[key][...], unique, g, count=count, lr=lr,
            b1=self.b1, b2=self.b2, eps=self.eps, scale=scale)
