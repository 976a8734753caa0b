"""The PEER paper's Table 1 on a TPU slice: dense, expert-choice MoE, PKM and PEER on C4 at one
FLOP budget, then perplexity on the paper's eval sets that TFDS has (C4, LAMBADA).

Every arm is a config of ``configs/`` on the same trunk (12 x 768, batch 128 x 2048) whose
steps spend the budget (``configs/dense_c4_tpu.py``: model FLOPs from ``moejax.flops``):

    # the plan: steps, compiled memory, estimated wall time, the commands
    python experiments/peer_paper/tpu_table.py --bucket gs://B --budget 6e18
    # on the slice (a v5p-8 TPU VM): train every arm, then evaluate it; rerun to resume
    python experiments/peer_paper/tpu_table.py --bucket gs://B --budget 6e18 --run
    # on any machine with libtpu: compile each arm for its slice, write results/tpu/ARM.json
    python experiments/peer_paper/tpu_table.py --compile

The bucket holds TFDS ``c4/en:3.1.0`` and ``lambada`` prepared as array_record
(``tfds build c4/en:3.1.0 lambada --file_format=array_record --data_dir gs://B/tensorflow_datasets``)
and a 32k SentencePiece model at ``gs://B/spm/c4_32k.model``. ``train.py`` resumes an
interrupted arm and leaves a finished one alone; an arm with ``eval/eval.json`` is not
evaluated again.

Wall time is an estimate, never a measurement: the arm's model FLOPs (``moejax.flops``, the
count ``tests/test_flops.py`` checks against XLA's) over the slice's bf16 peak at the stated
MFU (``--mfu``). The compiled step's own FLOP count is no better here: with ``scan_layers`` XLA
counts the scanned blocks' loop body once, and Pallas kernels count zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from moejax.aot import chips as chip_table  # noqa: E402
from moejax import flops  # noqa: E402
from moejax.config import C4_VOCAB  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu")
EVAL_SETS = "c4/en:3.1.0,lambada"


@dataclasses.dataclass(frozen=True)
class TableArm:
  name: str          # the paper's row
  config: str        # configs/<config>.py


ARMS = (TableArm("Dense", "dense_c4_tpu"), TableArm("MoE (expert choice, 128)", "moe_ec_c4_tpu"),
        TableArm("PKM (1024², h8 k32)", "pkm_c4_tpu"), TableArm("PEER (1024², h8 k16)", "peer_c4_tpu"))


def load_config_module(name: str):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"table1_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@dataclasses.dataclass(frozen=True)
class Plan:
  arm: TableArm
  topology: str
  steps: int
  model_flops_per_step: float      # train, all devices
  chips: int
  peak_flops_per_chip: float
  compiled: dict | None            # results/tpu/<config>.json, if compiled

  def wall_seconds(self, mfu: float) -> float:
    return self.steps * self.model_flops_per_step / (self.chips * self.peak_flops_per_chip * mfu)


def budget_name(budget: float) -> str:
  """6e18 -> "6e18" (the config parameter and the workdir name)."""
  return f"{budget:g}".replace("e+", "e")


def plan(budget: float) -> list[Plan]:
  out = []
  for arm in ARMS:
    mod = load_config_module(arm.config)
    c = mod.get_config(budget_name(budget))
    c.model.vocab_size = C4_VOCAB
    per_step = flops.count(c).train * c.data.batch_size * c.data.seq_len
    chip = chip_table.chip_of(mod.TOPOLOGY)
    path = os.path.join(RESULTS, f"{arm.config}.json")
    compiled = json.load(open(path)) if os.path.exists(path) else None
    out.append(Plan(arm, mod.TOPOLOGY, c.train.steps, per_step, chip_table.num_chips(mod.TOPOLOGY),
                    chip.peak_flops, compiled))
  return out


def commands(p: Plan, budget: float, bucket: str) -> tuple[list[str], list[str], str]:
  """(train.py argv, eval.py argv, workdir) of one arm."""
  workdir = f"{bucket}/runs/peer_table1_{budget_name(budget)}/{p.arm.config}"
  data = [f"--config.data.data_dir={bucket}/tensorflow_datasets",
          f"--config.data.tokenizer={bucket}/spm/c4_32k.model"]
  train = ["python", "train.py", f"--config=configs/{p.arm.config}.py:{budget_name(budget)}",
           f"--workdir={workdir}", *data]
  evaluate = ["python", "eval.py", f"--checkpoint={workdir}", f"--dataset={EVAL_SETS}",
              f"--data_dir={bucket}/tensorflow_datasets"]
  return train, evaluate, workdir


def table(plans: list[Plan], budget: float, mfu: float) -> str:
  head = ("| arm | config | slice | steps | train TFLOPs/step | memory/device (train, eval) | "
          f"headroom | est. wall time at {mfu:.0%} MFU |")
  total = sum(p.wall_seconds(mfu) for p in plans) / 3600
  lines = [f"Budget {budget_name(budget)} FLOPs per arm, batch 128 x 2048 tokens, vocab {C4_VOCAB:,}; "
           f"the table takes ~{total:.0f} h of its slice at {mfu:.0%} MFU (an estimate).", "",
           head, "|---" * (head.count("|") - 1) + "|"]
  for p in plans:
    if p.compiled:
      mem = (f"{p.compiled['train']['total_bytes'] / 2**30:.1f} / "
             f"{p.compiled['eval']['total_bytes'] / 2**30:.1f} GiB")
      room = f"{100 * p.compiled['headroom']:.1f} %"
    else:
      mem, room = "not compiled (--compile)", "-"
    lines.append(f"| {p.arm.name} | configs/{p.arm.config}.py | {p.topology} | {p.steps:,} | "
                 f"{p.model_flops_per_step / 1e12:,.0f} | {mem} | {room} | "
                 f"{p.wall_seconds(mfu) / 3600:.1f} h |")
  return "\n".join(lines)


def _compile(plans: list[Plan]) -> int:
  os.makedirs(RESULTS, exist_ok=True)
  for p in plans:
    out = os.path.join(RESULTS, f"{p.arm.config}.json")
    argv = [sys.executable, "-m", "moejax.compile", f"--config=configs/{p.arm.config}.py",
            f"--topology={p.topology}", f"--json={out}"]
    print("$ " + shlex.join(argv[1:]), flush=True)
    rc = subprocess.call(argv, cwd=ROOT)
    if rc:
      return rc
  return 0


def _run(plans: list[Plan], budget: float, bucket: str) -> int:
  from moejax import paths
  for p in plans:
    train, evaluate, workdir = commands(p, budget, bucket)
    for argv, done in ((train, None), (evaluate, paths.join(workdir, "eval", "eval.json"))):
      if done and paths.exists(done):
        print(f"{p.arm.config}: {done} exists, not evaluated again", flush=True)
        continue
      print("$ " + shlex.join(argv), flush=True)
      rc = subprocess.call([sys.executable, *argv[1:]], cwd=ROOT)
      if rc:
        print(f"error: {p.arm.config}: {argv[1]} exited {rc}; fix it and rerun (finished arms are kept)",
              file=sys.stderr)
        return rc
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--budget", type=float, default=6e18, help="training FLOPs per arm (paper: 6e18, 2e19)")
  ap.add_argument("--bucket", default="gs://YOUR_BUCKET", help="holds tensorflow_datasets/, spm/, runs/")
  ap.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation of the wall-time estimate")
  mode = ap.add_mutually_exclusive_group()
  mode.add_argument("--run", action="store_true", help="train and evaluate every arm, in order")
  mode.add_argument("--compile", action="store_true", help="compile every arm for its slice (libtpu)")
  a = ap.parse_args(argv)
  if a.budget <= 0:
    ap.error(f"--budget={a.budget:g}: must be > 0 (the paper's are 6e18 and 2e19)")
  if not 0 < a.mfu <= 1:
    ap.error(f"--mfu={a.mfu}: must be in (0, 1], e.g. 0.4")
  if a.run and a.bucket == "gs://YOUR_BUCKET":
    ap.error("--bucket: set it to the bucket that holds the data (e.g. --bucket=gs://my-bucket)")
  plans = plan(a.budget)
  if a.compile:
    return _compile(plans)
  if a.run:
    return _run(plans, a.budget, a.bucket.rstrip("/"))
  print(table(plans, a.budget, a.mfu))
  print()
  for p in plans:
    train, evaluate, _ = commands(p, a.budget, a.bucket.rstrip("/"))
    print(shlex.join(train))
    print(shlex.join(evaluate))
  return 0


if __name__ == "__main__":
  sys.exit(main())
