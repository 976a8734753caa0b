"""TPU chips and the topology names libtpu compiles for (plain data: no JAX, no libtpu)."""

from __future__ import annotations

import dataclasses
import math

GiB = 1 << 30


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


def topology_table() -> str:
  """One line per accepted topology: chips, HBM per chip, its cloud name."""
  by_topology = {v: k for k, v in ALIASES.items()}
  return "\n".join(f"{t:<11} {num_chips(t):>3} chips  {chip_of(t).hbm_nominal // GiB:>3} GiB HBM/chip"
                   f"  (= {by_topology[t]})" for t in TOPOLOGIES)
