"""optax optimizer: schedule, clipping, weight-decay mask, a separate group for tables.

Parameters held as :class:`~moejax.layers.base.TableParam` (PEER expert tables,
PKM values) form their own group: their own learning rate (``optim.table_lr``,
PKM and memory-layer work use ~10x the base LR) and no weight decay. Weight decay
also skips vectors (norm scales, biases).
"""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from moejax.layers.base import TableParam


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _decays(path, v) -> bool:
  """Weight decay for weight matrices only: not vectors, norm parameters or biases."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  in_norm = any("norm" in n.lower() for n in names)
  ndim = v.ndim - (tuple(v.get_metadata().get("out_sharding") or ())[:1] == ("layers",))  # scan_layers
  return ndim >= 2 and not in_norm and names[-1] not in ("bias", "scale")


def learning_rate(o: ml_collections.ConfigDict, peak: float, steps: int) -> optax.Schedule:
  warmup = min(o.warmup_steps, max(steps - 1, 0))
  if o.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif o.schedule == "linear":
    main = optax.linear_schedule(peak, peak * o.min_lr_ratio, max(steps - warmup, 1))
  else:
    main = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=o.min_lr_ratio)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _base(o, lr, weight_decay, decay_mask):
  if o.name == "sgd":
    return optax.sgd(lr)
  if o.name == "adam" or weight_decay == 0:
    return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay, mask=decay_mask)


def trained_by_optax(config: ml_collections.ConfigDict):
  """Filter of the variables optax updates (row-sparse tables are updated by TableAdam)."""
  if config.optim.table_update == "row_sparse":
    return nnx.All(nnx.Param, nnx.Not(TableParam))
  return nnx.Param


def make_tx(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
  """The optimizer for ``params`` (``nnx.state(model, filter)``, Variables as leaves)."""
  o, steps = config.optim, config.train.steps
  # Static label / mask trees: inside tx.update optax sees bare arrays, not Variable types.
  labels = jax.tree.map(lambda v: "table" if isinstance(v, TableParam) else "default", params,
                        is_leaf=_is_var)
  decay_mask = jax.tree_util.tree_map_with_path(_decays, params, is_leaf=_is_var)
  table_peak = o.table_lr or o.lr
  tx = optax.multi_transform({
      "default": _base(o, learning_rate(o, o.lr, steps), o.weight_decay, decay_mask),
      "table": _base(o, learning_rate(o, table_peak, steps), 0.0, None),
  }, labels)
  if o.grad_clip > 0 and o.table_update != "row_sparse":   # row-sparse: clipped in the step
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx


def make_optimizer(config: ml_collections.ConfigDict, model: nnx.Module) -> nnx.Optimizer:
  wrt = trained_by_optax(config)
  return nnx.Optimizer(model, make_tx(config, nnx.state(model, wrt)), wrt=wrt)


def make_table_adam(config: ml_collections.ConfigDict, model: nnx.Module):
  """Lazy Adam for row-sparse tables, or None when tables are trained densely."""
  if config.optim.table_update != "row_sparse":
    return None
  from moejax.training.row_sparse import TableAdam
  o = config.optim
  return TableAdam(model, lr_schedule=learning_rate(o, o.table_lr or o.lr, config.train.steps),
                   b1=o.b1, b2=o.b2, eps=o.eps)
