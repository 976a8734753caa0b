"""A config's train and eval steps compiled for a TPU topology from any machine (libtpu).

The train state is built abstractly on the topology's devices (``nnx.eval_shape``: nothing is
allocated), the steps are compiled exactly as ``train.py`` / ``eval.py`` build them, and the
compiled executables' memory and cost analyses become a :class:`~moejax.aot.report.CompileReport`.
Nothing runs and nothing is timed on a TPU.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import config as config_lib
from moejax import kernels, sharding
from moejax.aot import targets
from moejax.aot.chips import CHIPS, Chip, num_chips, resolve_topology
from moejax.aot.report import CompileReport, OutOfMemory, StepReport
from moejax.data.tokenizers import ByteTokenizer
from moejax.errors import ConfigError, config_error
from moejax.training import loop
from moejax.training import state as state_lib

BYTE_VOCAB = ByteTokenizer.vocab_size


def resolve_vocab(config: ml_collections.ConfigDict, vocab_size: int = 32000) -> int:
  """config.model.vocab_size, else the byte tokenizer's, else ``vocab_size`` (the tokenizer
  is a SentencePiece file; it is not read)."""
  v = config.model.vocab_size
  tok = config.data.tokenizer
  if v == 0:
    return BYTE_VOCAB if tok == "byte" else int(vocab_size)
  if tok == "byte" and v < BYTE_VOCAB:
    raise ConfigError(f"config.model.vocab_size={v}: smaller than the tokenizer's {BYTE_VOCAB} "
                      "(set --config.model.vocab_size=0 to take it from the tokenizer)")
  return v


def make_topology_mesh(config: ml_collections.ConfigDict, topology: str) -> jax.sharding.Mesh:
  """The config's ('data', 'expert', 'model') mesh over the topology's devices."""
  devices = targets.topology_devices(topology)
  m = config.mesh
  try:
    mesh = sharding.make_mesh(m.data, m.expert, m.model, devices=devices)
  except ValueError:
    raise config_error("mesh", f"data={m.data} expert={m.expert} model={m.model}",
                       f"does not divide the {len(devices)} devices of {topology}",
                       "set --config.mesh.data/expert/model so their product divides "
                       f"{len(devices)}, -1 = the rest") from None
  config_lib.check_mesh_shape(config, dict(mesh.shape))
  return mesh


def abstract_train_state(config: ml_collections.ConfigDict, mesh) -> state_lib.TrainState:
  """A TrainState whose ``state`` is ShapeDtypeStructs carrying their shardings on ``mesh``.

  Built with ``nnx.eval_shape``: nothing is allocated or run (topology devices run nothing).
  """
  rules = state_lib.axis_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    if config.optim.table_update == "row_sparse":
      state_lib._check_tables_unsharded()
    abstract = nnx.eval_shape(lambda: state_lib._create(config))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    model = abstract[0]
    model.eval()
    eval_graphdef = nnx.split(model)[0]
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, shardings)
  return state_lib.TrainState(config, mesh, rules, graphdef, eval_graphdef, state, shardings)


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train/eval batch as ShapeDtypeStructs ``[batch_size, seq_len]`` sharded over the batch axes."""
  shape = (config.data.batch_size, config.data.seq_len)
  sh = sharding.batch_sharding(mesh)
  sds = lambda dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  return {"inputs": sds(jnp.int32), "targets": sds(jnp.int32), "weights": sds(jnp.float32),
          "num_bytes": sds(jnp.float32)}


def compile_step(name: str, jitted, args, topology: str, config, chip: Chip) -> StepReport:
  """Lowers and compiles ``jitted(*args)``; its memory, cost and a roofline estimate.

  Raises OutOfMemory when the compiler says RESOURCE_EXHAUSTED.
  """
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax.errors.JaxRuntimeError
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg:
      line = next((l for l in msg.splitlines() if "RESOURCE_EXHAUSTED" in l), msg)
      raise OutOfMemory(name, topology, line, config) from None
    raise
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops = float(cost.get("flops", 0.0))
  nbytes = float(cost.get("bytes accessed", 0.0))
  peak = chip.peak_flops / chip.devices_per_chip
  bw = chip.hbm_bandwidth / chip.devices_per_chip
  t_compute, t_memory = flops / peak, nbytes / bw
  loops = compiled.as_text().count(" while(")
  return StepReport(
      name=name, argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
      alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
      code_bytes=int(m.generated_code_size_in_bytes), flops=flops, bytes_accessed=nbytes,
      compile_seconds=seconds, estimate_seconds=max(t_compute, t_memory),
      bound="compute" if t_compute >= t_memory else "memory", while_loops=loops)


def compile_config(config: ml_collections.ConfigDict, topology: str, *, vocab_size: int = 32000,
                   config_name: str = "config", eval_step: bool = True) -> CompileReport:
  """Compiles ``config``'s train and eval steps for a TPU ``topology`` (e.g. ``'v5p:2x2x1'``).

  ``vocab_size`` is used only when ``config.model.vocab_size`` is 0 and the tokenizer is a
  SentencePiece file (it is not read); the byte tokenizer gives its own size.

  Raises ConfigError (bad field, mesh or batch layout), TopologyError (unknown name),
  OutOfMemory (a step needs more HBM than a device has).
  """
  topology = resolve_topology(topology)
  targets.share_libtpu()
  chip = CHIPS[topology.split(":")[0]]
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy

  # Kernels are chosen (and checked by validate: kernel=pallas is fine) for the TPU target.
  with kernels.target_platform("tpu"):
    config_lib.validate(config)
    config.model.vocab_size = resolve_vocab(config, vocab_size)
    mesh = make_topology_mesh(config, topology)
    loop.check_batch_layout(config, mesh)
    ts = abstract_train_state(config, mesh)
    batch = abstract_batch(config, mesh)
    train = compile_step("train", state_lib.make_train_step(ts), (ts.state, batch), topology,
                         config, chip)
    if eval_step:
      ev = compile_step("eval", state_lib.make_eval_step(ts.eval_graphdef, ts.shardings[0], mesh,
                                                         ts.rules),
                        (ts.state[0], batch), topology, config, chip)
    else:
      ev = None

  devices = mesh.devices.reshape(-1)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(ts.state[0]))
  return CompileReport(
      config_name=config_name, topology=topology, device_kind=devices[0].device_kind,
      num_devices=len(targets.topology_devices(topology)), num_chips=num_chips(topology),
      mesh={k: int(v) for k, v in mesh.shape.items()}, mesh_devices=int(devices.size),
      hbm_bytes=chip.hbm_usable, hbm_nominal_chip_bytes=chip.hbm_nominal,
      peak_flops=chip.peak_flops / chip.devices_per_chip,
      hbm_bandwidth=chip.hbm_bandwidth / chip.devices_per_chip,
      batch_size=config.data.batch_size, seq_len=config.data.seq_len,
      vocab_size=config.model.vocab_size, num_params=int(num_params), train=train, eval=ev)

