"""The shipped TPU configs compiled for their target slices: memory, headroom, FLOPs, estimate.

    python benchmarks/tpu_compile.py [--quick] [--configs peer_c4_tpu,pkm_c4_tpu] \
        [--variants shipped,remat] [--topology v5p:2x2x2] [--eval_step] [--json out.json]

Needs libtpu (``pip install -e '.[tpu]'``); nothing runs, XLA's TPU compiler only compiles
(``moejax.aot.compile``). Rows: config x slice x variant, where the variants switch the memory
knobs that exist in this moejax's ``default_config()`` (``model.remat``, ``model.scan_layers``,
``model.loss_chunk``):

  shipped             the config file as it is
  plain               remat none, no scan, plain loss (what the knobs save is against this)
  remat               model.remat=full
  scan                model.scan_layers=True
  remat+scan          both
  remat+scan+chunk    both and model.loss_chunk=4096
  reference-kernels   PEER / PKM lookups in plain JAX instead of the Pallas TPU kernels
  no-remat-scan       remat none and no scan (the loss chunk and the kernels as shipped)
  no-remat, no-scan, no-chunk   the config without that one knob
  plain+reference     no knob and the plain-JAX lookups (how the TPU configs first shipped)

Variants change only feed-forward sections the model uses (``reference-kernels`` is the
shipped config again for a Switch model, so it is skipped there).

Variants equal to an earlier one (e.g. ``plain`` when the config ships with no knobs) are
skipped. Vocabulary: 32,000 (the c4 SentencePiece model) when the config leaves it to the
tokenizer. The target slice of a config is its module constant ``TOPOLOGY`` (else the
``Target slice: vX:AxB...`` named in its docstring, else the one below). The step-time
column is a roofline ESTIMATE from the compiled cost (max(FLOPs / peak, bytes accessed /
HBM bandwidth) per device), not a measurement. Rows marked ">=" have XLA while loops (scan_layers, loss_chunk): XLA's cost analysis counts a
loop body once, so their FLOPs and estimate are lower bounds (memory is exact); read FLOPs
from an unscanned row.

A whole-config compile takes minutes on 2 CPU cores (the 12 x 768 PEER config: ~6 min);
``--quick`` compiles only the PEER config, shipped and with every knob, train step only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from moejax.aot import chips  # noqa: E402
from moejax.aot.compile import compile_config  # noqa: E402
from moejax.aot.report import OutOfMemory  # noqa: E402
from moejax.errors import ConfigError  # noqa: E402

CONFIGS = ("peer_c4_tpu", "pkm_c4_tpu", "switch_base_c4_tpu")
# Fallback targets (the issue's): PEER and PKM at the paper's batch on 4 v5p chips; Switch on
# the 16 chips its 16-wide expert axis needs.
DEFAULT_SLICE = {"peer_c4_tpu": "v5p:2x2x1", "pkm_c4_tpu": "v5p:2x2x1", "switch_base_c4_tpu": "v5p:2x2x4"}

VARIANTS = {
    "shipped": {},
    "plain": {"model.remat": "none", "model.scan_layers": False, "model.loss_chunk": 0},
    "remat": {"model.remat": "full"},
    "scan": {"model.scan_layers": True},
    "remat+scan": {"model.remat": "full", "model.scan_layers": True},
    "remat+scan+chunk": {"model.remat": "full", "model.scan_layers": True, "model.loss_chunk": 4096},
    "reference-kernels": {"peer.kernel": "reference", "pkm.kernel": "reference"},
    "no-remat-scan": {"model.remat": "none", "model.scan_layers": False},
    "no-remat": {"model.remat": "none"},
    "no-scan": {"model.scan_layers": False},
    "no-chunk": {"model.loss_chunk": 0},
    "plain+reference": {"model.remat": "none", "model.scan_layers": False, "model.loss_chunk": 0,
                        "peer.kernel": "reference", "pkm.kernel": "reference"},
}


def load(name: str):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if getattr(mod, "TOPOLOGY", ""):          # the config's module constant names its slice
    return mod.get_config(), mod.TOPOLOGY
  m = re.search(r"[Tt]arget slice\W+(v\d\w*:\d+(?:x\d+)+)", mod.__doc__ or "")
  return mod.get_config(), (m.group(1) if m else DEFAULT_SLICE.get(name, "v5p:2x2x1"))


def apply(config, overrides: dict):
  """A copy with ``overrides`` applied, or None if one names a field this moejax lacks."""
  from moejax.config import default_config
  ref = default_config()
  c = config.copy_and_resolve_references()
  used = {config.model.ffn, config.model.sparse_ffn}
  for key, value in overrides.items():
    section, field = key.split(".")
    if field not in ref[section]:
      return None
    if section in ("peer", "pkm", "moe", "dense") and section not in used:
      continue   # a feed-forward kind this model does not use: no change (deduplicated)
    c[section][field] = value
  return c


def run_row(name, config, topology, variant, eval_step):
  t0 = time.perf_counter()
  row = {"config": name, "topology": topology, "variant": variant}
  try:
    r = compile_config(config, topology, config_name=name, eval_step=eval_step)
  except OutOfMemory as e:
    m = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", e.xla_line)
    row.update(fits=False, need_gib=float(m.group(1)) if m else None, step=e.step,
               error=e.xla_line.strip()[:300], seconds=time.perf_counter() - t0)
    return row
  except (ConfigError, ValueError) as e:
    row.update(fits=None, error=f"{type(e).__name__}: {str(e).splitlines()[0]}",
               seconds=time.perf_counter() - t0)
    return row
  t = r.train
  row.update(fits=r.fits, mesh=r.mesh, devices=r.mesh_devices, batch=r.batch_size, seq_len=r.seq_len,
             vocab=r.vocab_size, params=r.num_params, hbm_gib=r.hbm_bytes / 2**30,
             argument_gib=t.argument_bytes / 2**30, temp_gib=t.temp_bytes / 2**30,
             total_gib=t.total_bytes / 2**30, headroom=r.headroom(t), flops=t.flops,
             flops_all=t.flops * r.mesh_devices, bytes_accessed=t.bytes_accessed,
             estimate_s=t.estimate_seconds, bound=t.bound, compile_s=t.compile_seconds,
             while_loops=t.while_loops,
             seconds=time.perf_counter() - t0)
  if r.eval is not None:
    row.update(eval_total_gib=r.eval.total_bytes / 2**30, eval_headroom=r.headroom(r.eval),
               eval_compile_s=r.eval.compile_seconds)
  return row


HEADER = ("| config | slice | variant | train: args / temp / total GiB per device | headroom "
          "| eval: total GiB, headroom | FLOPs/device/step | step ESTIMATE | compile |\n"
          "|---|---|---|---|---|---|---|---|---|")


def fmt(row) -> str:
  lead = f"| {row['config']} | {row['topology']} | {row['variant']} |"
  if row.get("fits") is None:
    return f"{lead} error: {row['error']} | | | | | |"
  if row.get("total_gib") is None:
    need = f"{row['need_gib']:.1f} GiB" if row.get("need_gib") else "?"
    return (f"{lead} **does not fit** ({row['step']} step: HLO temporaries need {need} of "
            f"{chips.CHIPS[row['topology'].split(':')[0]].hbm_usable / 2**30:.2f}) | < 0 "
            f"| | | | {row['seconds']:.0f} s |")
  lb = ">= " if row.get("while_loops") else ""   # loop bodies counted once: lower bounds
  ev = (f"{row['eval_total_gib']:.2f}, {100 * row['eval_headroom']:.1f} %"
        if row.get("eval_total_gib") is not None else "-")
  return (f"{lead} {row['argument_gib']:.2f} / {row['temp_gib']:.2f} / {row['total_gib']:.2f} "
          f"of {row['hbm_gib']:.2f} | {100 * row['headroom']:.1f} % | {ev} | {lb}{row['flops']:.3e} "
          f"| {lb}{row['estimate_s'] * 1e3:.1f} ms ({row['bound']}) | {row['compile_s']:.0f} s |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="PEER config only: shipped and every knob.")
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--topology", default="", help="Compile every config for this slice instead.")
  p.add_argument("--eval_step", action="store_true", help="Also compile the eval steps.")
  p.add_argument("--json", default="", help="Write the rows here.")
  args = p.parse_args()
  from moejax.aot.targets import libtpu_available
  if not libtpu_available():
    sys.exit("error: needs libtpu (pip install -e '.[tpu]')")

  names = ["peer_c4_tpu"] if args.quick else [s for s in args.configs.split(",") if s]
  variants = ["shipped", "remat+scan+chunk"] if args.quick else [v for v in args.variants.split(",") if v]
  import jax
  print(f"# jax {jax.__version__}, libtpu compile on {os.cpu_count()} CPU cores; "
        "memory per device, train step", flush=True)
  print(HEADER, flush=True)
  rows = []
  for name in names:
    base, target = load(name)
    topology = args.topology or target
    if base.model.vocab_size == 0:
      base.model.vocab_size = 32000
    seen = []
    for variant in variants:
      c = apply(base, VARIANTS[variant])
      if c is None:
        print(f"| {name} | {topology} | {variant} | (fields not in this moejax) | | | | |", flush=True)
        continue
      if c.to_dict() in seen:
        continue
      seen.append(c.to_dict())
      row = run_row(name, c, topology, variant, args.eval_step)
      rows.append(row)
      print(fmt(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
