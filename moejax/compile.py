"""Check that a config fits a TPU slice before renting one: compile it there from any machine.

    python -m moejax.compile --config configs/X.py --topology v5p:2x2x1 [--config.FIELD=VALUE ...]
    python -m moejax.compile --list_topologies

(or ``moejax-compile ...`` once installed with ``pip install -e '.[tpu]'``). With libtpu
installed, XLA's real TPU compiler runs on this (CPU) machine for a slice that is not there
(``shared/reference/tpu_aot.md``): the train state is built abstractly on the topology's
devices (``nnx.eval_shape``, nothing allocated), the train step and the eval step are compiled
exactly as ``train.py`` / ``eval.py`` build them, and one table reports per-device memory
against the chip's HBM, FLOPs per step, compile times, the mesh and a roofline step-time
*estimate*. Nothing runs and nothing is timed on a TPU.

Exit codes: 0 fits; 1 out of memory (one line on stderr naming the knobs to turn);
2 a bad config field, mesh or topology name (one line); 3 the compile failed otherwise
(traceback, then one line).

API: :func:`compile_config` ``(config, topology) -> CompileReport`` (used by the CLI, the
tests and ``benchmarks/tpu_compile.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import ml_collections

from moejax.errors import ConfigError, config_error

GiB = 1 << 30

# ---------------------------------------------------------------------------------------------
# Chips and topologies


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures (bf16 peak, HBM bandwidth, nominal HBM) and what XLA lets a device use."""

  family: str
  peak_flops: float          # bf16 FLOP/s per chip
  hbm_bandwidth: float       # bytes/s per chip
  hbm_nominal: int           # bytes per chip (spec sheet)
  hbm_usable: int            # bytes per *device* that libtpu's compiler allows a program
  devices_per_chip: int      # JAX devices per chip in these topologies (v4: one per TensorCore)


# hbm_usable: the largest program libtpu 0.0.42.1 accepted per device, found by bisection
# (equal to the "available HBM" of its RESOURCE_EXHAUSTED message). v4 topologies here have
# one device per TensorCore (2 per chip, 16 GiB each), not megacore.
CHIPS = {
    "v4": Chip("v4", 275e12, 1.2e12, 32 * GiB, 16372678656, 2),
    "v5e": Chip("v5e", 197e12, 0.82e12, 16 * GiB, 16909017088, 1),
    "v5p": Chip("v5p", 459e12, 2.76e12, 95 * GiB, 102803046400, 1),
    "v6e": Chip("v6e", 918e12, 1.64e12, 32 * GiB, 33548550144, 1),
}

# Topology names libtpu accepts here (all checked to compile); single chips (v5e:1x1) are not
# accepted by libtpu (host bounds 2x2x1).
TOPOLOGIES = (
    "v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4",
    "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16",
    "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8",
    "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16",
)


def _aliases() -> dict[str, str]:
  """Cloud accelerator-type names -> topologies (v4/v5p count TensorCores: 2 per chip)."""
  out = {}
  for topo in TOPOLOGIES:
    family, shape = topo.split(":")
    chips = math.prod(int(s) for s in shape.split("x"))
    if family in ("v4", "v5p"):
      out[f"{family}-{2 * chips}"] = topo
    elif family == "v5e":
      out[f"v5litepod-{chips}"] = topo
    else:
      out[f"{family}-{chips}"] = topo
  return out


ALIASES = _aliases()


class TopologyError(ValueError):
  """An unknown topology name (one-line message listing the accepted ones)."""


def resolve_topology(name: str) -> str:
  """A topology name (``v5p:2x2x1``) or a cloud accelerator type (``v5p-8``) -> topology."""
  name = name.strip()
  if name in TOPOLOGIES:
    return name
  if name in ALIASES:
    return ALIASES[name]
  raise TopologyError(f"unknown topology {name!r}: use one of {', '.join(TOPOLOGIES)} "
                      "(or a cloud name such as v5p-8, v5litepod-4, v6e-4, v4-8)")


def chip_of(topology: str) -> Chip:
  return CHIPS[resolve_topology(topology).split(":")[0]]


def num_chips(topology: str) -> int:
  return math.prod(int(s) for s in resolve_topology(topology).split(":")[1].split("x"))


def larger_slices(topology: str) -> list[str]:
  """Topologies of the same family with more chips, smallest first."""
  topology = resolve_topology(topology)
  family, n = topology.split(":")[0], num_chips(topology)
  return [t for t in TOPOLOGIES if t.startswith(family + ":") and num_chips(t) > n]


# ---------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass
class StepReport:
  """One compiled step: per-device memory (bytes), cost and compile time."""

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float               # per device, from cost_analysis (Pallas kernels count 0)
  bytes_accessed: float      # per device, from cost_analysis (gathers are over-counted)
  compile_seconds: float
  estimate_seconds: float    # roofline estimate, see CompileReport
  bound: str                 # "compute" | "memory"
  while_loops: int = 0       # XLA while loops (scan_layers, loss_chunk): cost counts each body
                             # once, so flops / bytes_accessed / estimate are lower bounds

  @property
  def total_bytes(self) -> int:
    """What the step holds on a device at once: arguments + outputs not aliased to them +
    temporaries + code (the sum XLA checks against HBM)."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


@dataclasses.dataclass
class CompileReport:
  """What compiling a config's train and eval steps for a TPU topology said."""

  config_name: str
  topology: str
  device_kind: str
  num_devices: int
  num_chips: int
  mesh: dict[str, int]
  mesh_devices: int          # devices the mesh uses (may be fewer than num_devices)
  hbm_bytes: int             # usable per device
  hbm_nominal_chip_bytes: int
  peak_flops: float          # per device
  hbm_bandwidth: float       # per device
  batch_size: int
  seq_len: int
  vocab_size: int
  num_params: int
  train: StepReport
  eval: StepReport | None    # None: not compiled (eval_step=False)

  @property
  def steps(self) -> tuple[StepReport, ...]:
    return (self.train,) if self.eval is None else (self.train, self.eval)

  def headroom(self, step: StepReport | None = None) -> float:
    """1 - total / usable HBM, of the given step or the larger of the two."""
    total = step.total_bytes if step else max(s.total_bytes for s in self.steps)
    return 1.0 - total / self.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.headroom() >= 0

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for s, key in zip(self.steps, ("train", "eval")):
      d[key]["total_bytes"] = s.total_bytes
      d[key]["headroom"] = self.headroom(s)
      d[key]["flops_all_devices"] = s.flops * self.mesh_devices
    d["headroom"] = self.headroom()
    d["fits"] = self.fits
    d["estimate_note"] = ("estimate_seconds = max(flops / peak_flops, bytes_accessed / hbm_bandwidth) "
                          "per device from the compiled cost analysis; not a measurement")
    return d

  def table(self) -> str:
    """The one table the CLI prints."""
    chip = CHIPS[self.topology.split(":")[0]]
    mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
    used = ("" if self.mesh_devices == self.num_devices
            else f"; uses {self.mesh_devices} of {self.num_devices} devices")
    per_chip = ("" if chip.devices_per_chip == 1
                else f", {chip.devices_per_chip} devices (TensorCores) per chip")
    head = [
        f"moejax compile check: {self.config_name} on {self.topology} "
        f"({self.num_chips} chips, {self.num_devices} x {self.device_kind}{per_chip})",
        f"mesh {mesh}{used} | batch {self.batch_size} x {self.seq_len} tokens | "
        f"vocab {self.vocab_size} | {_count(self.num_params)} params",
    ]
    steps = (self.train, self.eval)
    col = lambda fn: tuple("-" if s is None else fn(s) for s in steps)
    rows = [
        ("per device", "train step", "eval step" if self.eval else "eval (skipped)"),
        ("argument", *col(lambda s: _gib(s.argument_bytes))),
        ("output (not aliased)", *col(lambda s: _gib(s.output_bytes - s.alias_bytes))),
        ("temporary", *col(lambda s: _gib(s.temp_bytes))),
        ("total", *col(lambda s: _gib(s.total_bytes))),
        ("HBM (usable)", *col(lambda s: _gib(self.hbm_bytes))),
        ("headroom", *col(lambda s: f"{100 * self.headroom(s):.1f} %")),
        ("FLOPs / step", *col(lambda s: f"{_lb(s)}{s.flops:.3e}")),
        ("FLOPs / step, all devices", *col(lambda s: f"{_lb(s)}{s.flops * self.mesh_devices:.3e}")),
        ("bytes accessed / step", *col(lambda s: f"{_lb(s)}{s.bytes_accessed:.3e}")),
        ("step time (ESTIMATE*)", *col(lambda s: f"{_lb(s)}{_secs(s.estimate_seconds)} ({s.bound})")),
        ("compile time", *col(lambda s: f"{s.compile_seconds:.1f} s")),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(c) for r in rows for c in r[1:])
    lines = head + [""] + [f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w1}}" for r in rows]
    lines.insert(len(head) + 2, "  " + "-" * (w0 + 2 * w1 + 4))
    verdict = (f"fits: {100 * self.headroom():.1f} % HBM headroom per device" if self.fits
               else "does NOT fit")
    lines += [
        "",
        f"* roofline ESTIMATE, not a measurement: max(FLOPs / {self.peak_flops / 1e12:.0f} TFLOP/s, "
        f"bytes accessed / {self.hbm_bandwidth / 1e12:.2f} TB/s) per device from the compiled cost "
        "(no communication, overlap or kernel efficiency; Pallas kernels count 0 FLOPs).",
        f"HBM: {chip.hbm_nominal / GiB:.0f} GiB per {chip.family} chip; usable per device is "
        "the limit of libtpu's compiler.",
    ]
    loops = max(s.while_loops for s in self.steps)
    if loops:
      lines.append(f">= : the program has {loops} XLA while loop(s) (scan_layers, loss_chunk); the "
                   "compiled cost counts each loop body once, so FLOPs, bytes and the estimate are "
                   "lower bounds (memory is exact). Compile without scan_layers for the FLOPs.")
    lines += [
        f"verdict: {verdict}",
    ]
    return "\n".join(lines)


def _lb(s: StepReport) -> str:
  return ">= " if s.while_loops else ""


def _gib(b: float) -> str:
  return f"{b / GiB:.2f} GiB" if abs(b) >= GiB else f"{b / (1 << 20):.1f} MiB"


def _secs(s: float) -> str:
  return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _count(n: int) -> str:
  for unit, v in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= v:
      return f"{n / v:.2f}{unit}"
  return str(n)


class OutOfMemory(Exception):
  """A step does not fit the topology's HBM (the compiler said RESOURCE_EXHAUSTED)."""

  def __init__(self, step: str, topology: str, xla_line: str, config):
    self.step, self.topology, self.xla_line, self.config = step, topology, xla_line, config
    super().__init__(self.one_line())

  def one_line(self) -> str:
    m = re.search(r"required for (.+?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", self.xla_line)
    need = (f"{m.group(1)} need {m.group(2)} GiB of {m.group(3)} GiB per device"
            if m else self.xla_line.strip()[:200])
    return (f"{self.step} step does not fit {self.topology}: {need} "
            f"(turn: {', '.join(oom_knobs(self.config, self.topology))})")


def oom_knobs(config, topology: str) -> list[str]:
  """What to turn when a config does not fit: only fields that exist in this moejax."""
  from moejax.config import default_config
  ref = default_config()
  knobs = []
  m = ref.get("model", {})
  if "remat" in m and config.model.get("remat", "none") != "full":
    knobs.append("--config.model.remat=full")
  if "loss_chunk" in m and not config.model.get("loss_chunk", 0):
    knobs.append("--config.model.loss_chunk=4096")
  b = config.data.batch_size
  knobs.append(f"--config.data.batch_size={max(1, b // 2)} (now {b})")
  mesh = config.mesh
  knobs.append(f"--config.mesh.data/expert/model (now {mesh.data}/{mesh.expert}/{mesh.model})")
  bigger = larger_slices(topology)
  knobs.append(f"a larger slice (--topology={bigger[0]})" if bigger else "a larger slice")
  return knobs


# ---------------------------------------------------------------------------------------------
# Building and compiling


BYTE_VOCAB = 258


def resolve_vocab(config: ml_collections.ConfigDict, vocab_size: int = 32000) -> int:
  """config.model.vocab_size, else the byte tokenizer's 258, else ``vocab_size`` (the
  tokenizer is a SentencePiece file; it is not read)."""
  v = config.model.vocab_size
  tok = config.data.tokenizer
  if v == 0:
    return BYTE_VOCAB if tok == "byte" else int(vocab_size)
  if tok == "byte" and v < BYTE_VOCAB:
    raise ConfigError(f"config.model.vocab_size={v}: smaller than the tokenizer's {BYTE_VOCAB} "
                      "(set --config.model.vocab_size=0 to take it from the tokenizer)")
  return v


def make_topology_mesh(config: ml_collections.ConfigDict, topology: str):
  """The config's ('data', 'expert', 'model') mesh over the topology's devices."""
  from moejax import sharding
  from moejax.kernels.aot import topology_devices
  devices = topology_devices(topology)
  m = config.mesh
  try:
    mesh = sharding.make_mesh(m.data, m.expert, m.model, devices=devices)
  except ValueError:
    raise config_error("mesh", f"data={m.data} expert={m.expert} model={m.model}",
                       f"does not divide the {len(devices)} devices of {topology}",
                       "set --config.mesh.data/expert/model so their product divides "
                       f"{len(devices)}, -1 = the rest") from None
  from moejax import config as config_lib
  config_lib.check_kv_heads(config, mesh.shape["model"])
  return mesh


def check_batch_layout(config: ml_collections.ConfigDict, mesh) -> None:
  """As the training loop checks on a real slice: whole batch shards, each within one host."""
  import numpy as np
  shards = mesh.shape["data"] * mesh.shape["expert"]
  b = config.data.batch_size
  if b % shards:
    raise config_error("data.batch_size", b, f"must be a multiple of mesh data x expert = {shards}",
                       f"set --config.data.batch_size={max(shards, b - b % shards)}")
  devs = np.asarray(mesh.devices)   # [data, expert, model]
  for row in devs.reshape(shards, -1):
    if len({d.process_index for d in row}) > 1:
      raise config_error("mesh", dict(mesh.shape), "a batch shard spans several hosts",
                         "put the model axis within a host: mesh.model <= devices per host")


def abstract_train_state(config: ml_collections.ConfigDict, mesh):
  """A TrainState whose ``state`` is ShapeDtypeStructs carrying their shardings on ``mesh``.

  Built with ``nnx.eval_shape``: nothing is allocated or run (topology devices run nothing).
  """
  import jax
  from flax import nnx
  from moejax.training import state as state_lib
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


def _batch(config, mesh):
  import jax
  import jax.numpy as jnp
  from moejax import sharding
  shape = (config.data.batch_size, config.data.seq_len)
  sh = sharding.batch_sharding(mesh)
  sds = lambda dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  return {"inputs": sds(jnp.int32), "targets": sds(jnp.int32), "weights": sds(jnp.float32),
          "num_bytes": sds(jnp.float32)}


def _compile(name: str, jitted, args, topology: str, config, chip: Chip) -> StepReport:
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
  SentencePiece file (it is not read); the byte tokenizer gives 258.

  Raises ConfigError (bad field, mesh or batch layout), TopologyError (unknown name),
  OutOfMemory (a step needs more HBM than a device has).
  """
  import jax
  from moejax import config as config_lib
  from moejax import kernels
  from moejax.training import state as state_lib

  topology = resolve_topology(topology)
  _share_libtpu()
  chip = CHIPS[topology.split(":")[0]]
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy

  # Kernels are chosen (and checked by validate: kernel=pallas is fine) for the TPU target.
  with kernels.target_platform("tpu"):
    config_lib.validate(config)
    config.model.vocab_size = resolve_vocab(config, vocab_size)
    mesh = make_topology_mesh(config, topology)
    check_batch_layout(config, mesh)
    ts = abstract_train_state(config, mesh)
    batch = _batch(config, mesh)
    train = _compile("train", state_lib.make_train_step(ts), (ts.state, batch), topology, config, chip)
    if eval_step:
      ev = _compile("eval", state_lib.make_eval_step(ts.eval_graphdef, ts.shardings[0], mesh, ts.rules),
                    (ts.state[0], batch), topology, config, chip)
    else:
      ev = None

  devices = mesh.devices.reshape(-1)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(ts.state[0]))
  return CompileReport(
      config_name=config_name, topology=topology, device_kind=devices[0].device_kind,
      num_devices=len(_all_devices(topology)), num_chips=num_chips(topology),
      mesh={k: int(v) for k, v in mesh.shape.items()}, mesh_devices=int(devices.size),
      hbm_bytes=chip.hbm_usable, hbm_nominal_chip_bytes=chip.hbm_nominal,
      peak_flops=chip.peak_flops / chip.devices_per_chip,
      hbm_bandwidth=chip.hbm_bandwidth / chip.devices_per_chip,
      batch_size=config.data.batch_size, seq_len=config.data.seq_len,
      vocab_size=config.model.vocab_size, num_params=int(num_params), train=train, eval=ev)


def _share_libtpu() -> None:
  """Lets several compile checks on one CPU machine load libtpu at once (its lockfile
  otherwise refuses a second process: "Internal error when accessing libtpu multi-process
  lockfile"). Only where the TPU is a compile target (JAX_PLATFORMS=cpu), never on a TPU VM
  that may be training."""
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _all_devices(topology: str):
  from moejax.kernels.aot import topology_devices
  return topology_devices(topology)


# ---------------------------------------------------------------------------------------------
# Command line


def _quiet_libtpu() -> None:
  # libtpu logs warnings about TPU_ACCELERATOR_TYPE / worker hostnames on a machine without TPUs.
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the TPU is only a compile target
  _share_libtpu()


def main(argv=None) -> int:
  """The CLI; returns the exit code."""
  _quiet_libtpu()
  from absl import flags
  from ml_collections import config_flags
  from moejax.cli import _check_config_file, _config_file, _flag_error, check_config_overrides

  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--list_topologies", "--list_topologies=true", "--list_topologies=True") for a in argv[1:]):
    print("\n".join(f"{t:<11} {num_chips(t):>3} chips  {CHIPS[t.split(':')[0]].hbm_nominal // GiB:>3} GiB HBM/chip"
                    f"  (= {next(k for k, v in ALIASES.items() if v == t)})" for t in TOPOLOGIES))
    return 0
  try:
    check_config_overrides(argv)   # one line for an unknown --config.FIELD
  except SystemExit as e:
    print(e.code, file=sys.stderr)
    return 2

  fv = flags.FlagValues()
  # Default: this file's get_config() (the default config), so overrides work without --config.
  config_flags.DEFINE_config_file("config", os.path.abspath(__file__), "Config file "
                                  "(ml_collections); default: the default config.",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:2x2x1 or v5p-8 "
                      "(--list_topologies).", flag_values=fv)
  flags.DEFINE_boolean("list_topologies", False, "Print the accepted topology names.", flag_values=fv)
  flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size when config.model.vocab_size is 0 and "
                       "the tokenizer is a SentencePiece file (not read); byte tokenizer: 258.",
                       flag_values=fv)
  flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.", flag_values=fv)
  flags.DEFINE_boolean("eval_step", True, "Also compile the eval step.", flag_values=fv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__.split("\n\nAPI:")[0].strip() + "\n\nflags:\n" + fv.get_help())
    return 0
  spec = _config_file(argv)
  if spec is not None:
    try:
      _check_config_file(spec)   # missing or not Python: one line naming --config
    except SystemExit as e:
      return e.code
  try:
    rest = fv(argv)
  except flags.Error as e:
    print(f"error: {_flag_error(e, fv)}", file=sys.stderr)
    return 2
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f"error: unexpected argument {rest[1]!r} (flags are --name=value; see --help)",
          file=sys.stderr)
    return 2
  if fv.json and os.path.isdir(fv.json):
    print(f"error: --json={fv.json}: is a directory (pass a file path, e.g. {fv.json.rstrip('/')}/report.json)",
          file=sys.stderr)
    return 2
  if fv.json and not os.path.isdir(os.path.dirname(os.path.abspath(fv.json))):
    print(f"error: --json={fv.json}: its directory does not exist (create it or pass another "
          "path)", file=sys.stderr)
    return 2

  from moejax.kernels.aot import libtpu_available
  if not libtpu_available():
    print("error: libtpu is not installed (pip install -e '.[tpu]' or pip install 'jax[tpu]')",
          file=sys.stderr)
    return 2
  try:
    topology = resolve_topology(fv.topology)
  except TopologyError as e:
    print(f"error: --topology={fv.topology}: {e}", file=sys.stderr)
    return 2

  try:
    _silently(lambda: _all_devices(topology))   # libtpu's init warnings about the absent TPU
  except Exception as e:
    print(f"error: libtpu cannot describe {topology}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  name = config_flags.get_config_filename(fv["config"])
  try:
    config = fv.config
    config.to_dict()   # a config file that failed to load raises here
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    why = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    print(f"error: cannot load --config {name}: {why}", file=sys.stderr)
    return 2
  if os.path.abspath(name) == os.path.abspath(__file__):
    name = "default_config()"
  try:
    report = compile_config(config, topology, vocab_size=fv.vocab_size, config_name=name,
                            eval_step=fv.eval_step)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OutOfMemory as e:
    print(f"error: {e.one_line()}", file=sys.stderr)
    if fv.json:
      _write_json(fv.json, {"config_name": name, "topology": topology, "fits": False,
                            "error": e.one_line(), "step": e.step})
    return 1
  except Exception as e:  # a compile that failed for another reason: show it whole
    import traceback
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"error: compiling for {topology} failed: {type(e).__name__}: {first}", file=sys.stderr)
    return 3
  print(report.table())
  if fv.json:
    _write_json(fv.json, report.to_dict())
  return 0 if report.fits else 1


def _silently(fn):
  """Runs ``fn`` with the process's stderr (fd 2) sent to /dev/null: libtpu prints warnings
  about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES from C++ when it first loads on a machine
  without TPUs. Exceptions still propagate with their messages."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    return fn()
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _write_json(path: str, d: dict) -> None:
  with open(path, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
    f.write("\n")


def get_config() -> ml_collections.ConfigDict:
  """The default config: what ``--config`` loads when it is not given."""
  from moejax.config import default_config
  return default_config()


def cli() -> None:
  """Console entry point (``moejax-compile``)."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
