"""What compiling a config for a TPU slice said, as a table, a JSON dict and OOM advice.

Memory is exact (the compiled memory analysis); FLOPs and bytes come from the compiled cost
analysis, and the step time is a roofline *estimate* from them, never a measurement.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from moejax.aot.chips import CHIPS, GiB, larger_slices
from moejax.config import default_config


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
