"""The train state as (graphdef, sharded state) and the jitted steps over it.

``nnx.split`` turns (model, optimizer) into a static graphdef and a pytree of
arrays; the steps are ``jax.jit`` functions of that pytree with explicit
shardings (``nnx.get_named_sharding`` of the logical names), so one compiled step
serves 1 device or a pod slice alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from moejax import sharding
from moejax.config import parse_rules
from moejax.model import Transformer
from moejax.layers.base import RowDelta
from moejax.training import row_sparse
from moejax.training.optimizer import make_optimizer, make_table_adam, trained_by_optax

def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  m = config.mesh
  return sharding.make_mesh(m.data, m.expert, m.model)


def axis_rules(config: ml_collections.ConfigDict):
  return sharding.logical_rules(parse_rules(config.mesh.rules))


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropies (nats) and the sum of weights.

  logits: [batch, length, vocab] f32; targets: [batch, length] int; weights: [batch, length].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(ce * weights), jnp.sum(weights)


def _packing(batch: dict) -> dict:
  """Document segment ids and positions of packed rows (attention stays in a document)."""
  return {k: batch.get(k) for k in ("segment_ids", "positions")}


def model_lm_loss(model: Transformer, batch: dict, mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """(loss sum, weight sum, auxes) of ``model`` on ``batch``.

  With ``model.loss_chunk > 0`` the vocabulary loss is chunked over tokens with its own
  backward (``moejax.layers.vocab_loss``): the full [batch, length, vocab] f32 logits never
  exist. Otherwise the plain :func:`lm_loss` of the logits.
  """
  if model.loss_chunk:
    from moejax.layers.vocab_loss import chunked_cross_entropy
    x, auxes = model.hidden(batch["inputs"], mask=mask, **_packing(batch))
    loss_sum = chunked_cross_entropy(x, model.output_projection(), batch["targets"],
                                     batch["weights"], chunk_tokens=model.loss_chunk)
    return loss_sum, jnp.sum(batch["weights"]), auxes
  logits, auxes = model(batch["inputs"], mask=mask, **_packing(batch))
  return (*lm_loss(logits, batch["targets"], batch["weights"]), auxes)


def flatten_aux(auxes: dict[str, Any], field: str) -> dict[str, jax.Array]:
  return {f"{block}/{k}": v for block, aux in auxes.items() for k, v in getattr(aux, field).items()}


@dataclasses.dataclass
class TrainState:
  """Everything a train step needs: static graphdefs, sharded arrays, compiled steps."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: Any
  graphdef: Any                 # of (model, optimizer), train mode
  eval_graphdef: Any            # of the model alone, eval mode
  state: nnx.State              # arrays of (model, optimizer)
  shardings: Any

  @property
  def step(self) -> int:
    return int(self.state[1]["step"][...])

  def model_state(self) -> nnx.State:
    return self.state[0]

  def model(self) -> Transformer:
    """The model in eval mode, sharing arrays with the state."""
    return nnx.merge(self.eval_graphdef, self.state[0])


def _create(config: ml_collections.ConfigDict):
  """(model, optimizer) or, with row-sparse tables, (model, optimizer, table_adam)."""
  model = Transformer(config, rngs=nnx.Rngs(params=config.seed, router=config.seed + 1,
                                            dropout=config.seed + 2))
  table_adam = make_table_adam(config, model)
  optimizer = make_optimizer(config, model)
  return (model, optimizer) if table_adam is None else (model, optimizer, table_adam)


def _check_tables_unsharded() -> None:
  """Row-sparse updates gather/scatter whole rows on every device: tables must be unsharded."""
  from moejax.errors import config_error
  for name in ("table_rows", "table_embed"):
    if sharding.mesh_axes(name):
      raise config_error("optim.table_update", "row_sparse",
                         f"needs unsharded tables, but {name} maps to mesh axes "
                         f"{sharding.mesh_axes(name)}",
                         "set --config.mesh.rules=table_rows=,table_embed= or "
                         "--config.optim.table_update=dense")


def create_train_state(config: ml_collections.ConfigDict, mesh=None) -> TrainState:
  """Initialises (model, optimizer) directly sharded on ``mesh``."""
  mesh = mesh or make_mesh(config)
  rules = axis_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    if config.optim.table_update == "row_sparse":
      _check_tables_unsharded()
    abstract = nnx.eval_shape(lambda: _create(config))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(_create(config))[1], out_shardings=shardings)()
    model = abstract[0]
    model.eval()
    eval_graphdef = nnx.split(model)[0]
  return TrainState(config, mesh, rules, graphdef, eval_graphdef, state, shardings)


def _in_context(mesh, rules):
  """Traces ``fn`` under ``mesh`` and the logical rules, whoever calls it and from where."""

  def wrap(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
        return fn(*args)
    return wrapped

  return wrap


@dataclasses.dataclass
class ModelState:
  """An eval-mode model alone (no optimizer): what evaluating an export needs."""

  mesh: jax.sharding.Mesh
  rules: Any
  graphdef: Any
  state: nnx.State
  shardings: Any


def create_model_state(config: ml_collections.ConfigDict, mesh=None) -> ModelState:
  mesh = mesh or make_mesh(config)
  rules = axis_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    make = lambda: Transformer(config, rngs=nnx.Rngs(params=config.seed, router=config.seed + 1))
    abstract = nnx.eval_shape(make)
    abstract.eval()
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return ModelState(mesh, rules, graphdef, state, shardings)


def make_train_step(ts: TrainState):
  """jit(state, batch) -> (state, metrics). batch: dict of [batch, length] arrays."""
  graphdef = ts.graphdef

  @_in_context(ts.mesh, ts.rules)
  def step(state, batch):
    model, optimizer, *table_adam = nnx.merge(graphdef, state)
    mask = batch["weights"] > 0
    wrt = trained_by_optax(ts.config)
    if table_adam:
      row_sparse.attach(model, *batch["inputs"].shape)
      wrt = nnx.Any(wrt, RowDelta)

    def loss_fn(model):
      loss_sum, weight_sum, auxes = model_lm_loss(model, batch, mask)
      loss = loss_sum / jnp.maximum(weight_sum, 1.0)
      aux_loss = sum((a.total_loss() for a in auxes.values()), jnp.zeros((), jnp.float32))
      metrics = {"loss": loss, "aux_loss": aux_loss, **flatten_aux(auxes, "metrics"),
                 **{f"{k}_loss": v for k, v in flatten_aux(auxes, "losses").items()}}
      return loss + aux_loss, metrics

    (total, metrics), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt),
                                                 has_aux=True)(model)
    rows, scale = None, 1.0
    if table_adam:
      grads, delta_grads = nnx.split_state(grads, nnx.Not(RowDelta), RowDelta)
      rows = table_adam[0].row_grads(model, delta_grads)
      # One global norm over all gradients, tables' (row sums) included, as dense clipping.
      sq = optax.tree.norm(grads, squared=True) + table_adam[0].squared_norm(model, rows)
      metrics["grad_norm"] = jnp.sqrt(sq)
      clip = ts.config.optim.grad_clip
      scale = jnp.minimum(1.0, clip / (metrics["grad_norm"] + 1e-12)) if clip > 0 else 1.0
      grads = jax.tree.map(lambda g: g * scale, grads)
      row_sparse.detach(model)
    else:
      metrics["grad_norm"] = optax.tree.norm(grads)

    # Non-finite guard (train.on_nonfinite): a NaN/inf loss or gradient norm applies no
    # update -- params, optimizer state and the forward's statistics (BatchNorm) stay as
    # they were, only the step counter moves on (checkpoints, data position and logs keep
    # counting steps). The loop reads metrics["nonfinite"] without an extra host sync.
    # A conditional, not a select over the whole state: the update stays in place (a
    # select would hold the old and the new state, tables and their moments included).
    finite = jnp.isfinite(total) & jnp.isfinite(metrics["grad_norm"])
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)

    def update(forward_state, _):
      model, optimizer, *ta = nnx.merge(graphdef, forward_state)
      if ta:
        ta[0].apply(model, rows, optimizer.step[...] + 1, scale)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer, *ta))

    def skip(forward_state, old_state):
      model, optimizer, *ta = nnx.merge(graphdef, old_state)
      optimizer.step[...] = optimizer.step[...] + 1
      return nnx.state((model, optimizer, *ta))

    new_state = jax.lax.cond(finite, update, skip, nnx.state((model, optimizer, *table_adam)),
                             state)
    return new_state, metrics

  batch_sh = sharding.batch_sharding(ts.mesh)
  return jax.jit(step, in_shardings=(ts.shardings, batch_sh),
                 out_shardings=(ts.shardings, sharding.replicated(ts.mesh)), donate_argnums=0)


def make_eval_step(graphdef, model_shardings, mesh, rules):
  """jit(model_state, batch) -> sums: loss/weight/bytes sums and per-block expert counts."""

  @_in_context(mesh, rules)
  def step(model_state, batch):
    model = nnx.merge(graphdef, model_state)
    loss_sum, weight_sum, auxes = model_lm_loss(model, batch, batch["weights"] > 0)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum,
            "bytes_sum": jnp.sum(batch["num_bytes"] * batch["weights"]),
            "counts": flatten_aux(auxes, "counts"), "metrics": flatten_aux(auxes, "metrics")}

  return jax.jit(step, in_shardings=(model_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def device_batch(batch: dict, mesh) -> dict:
  """This process's numpy batch -> global jax arrays sharded over (data, expert)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}
