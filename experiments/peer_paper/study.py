"""Runs the PEER-paper study: trains every arm through train.py, evaluates it, reports.

    python experiments/peer_paper/study.py --scale cpu                 # everything, hours
    python experiments/peer_paper/study.py --scale tiny                # end to end, minutes
    python experiments/peer_paper/study.py --scale cpu --study usage   # one study
    python experiments/peer_paper/study.py --scale cpu --report_only   # tables and figures

Each (arm, seed) trains in its own workdir ``RUNS/SCALE/ARM/seedS`` with ``train.py`` and
is evaluated with ``eval.py`` on its export (the whole validation split at the cpu scale).
Re-running the same command continues: finished runs are skipped, an interrupted one resumes
from its last checkpoint (train.py's own resume), and its training wall time is summed over
the attempts. A run whose workdir was made with other flags is refused, never mixed. One
run that fails is reported and the others go on (exit code 1 at the end).

Then ``results/SCALE/``: ``results.json`` and ``results.csv`` (one row per run), a
``summary.md`` of tables, and PNG figures (:mod:`report`). Nothing there is typed in by hand:
it is all read back from the workdirs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import arms as arms_lib  # noqa: E402

BASE_CONFIG = HERE / "base_config.py"
SPEC = "study_arm.json"          # what a workdir was trained with
TIMES = "study_times.json"       # wall seconds of train.py / eval.py, summed over attempts


def plan(studies: list[str], scale: str, seeds: tuple[int, ...] | None = None
         ) -> list[tuple[str, arms_lib.Arm, int]]:
  """``(study, arm, seed)`` in the order to run: the main study's first seed, then the other
  studies, then the main study's other seeds (the first picture of every question early);
  an arm that two studies share runs once (listed under the first)."""
  seeds = seeds or arms_lib.TRUNKS[scale]["seeds"]
  out, seen = [], set()

  def add(study, arm, seed):
    if (arm.name, seed) not in seen:
      seen.add((arm.name, seed))
      out.append((study, arm, seed))

  if "main" in studies:
    for arm in arms_lib.study("main", scale):
      add("main", arm, seeds[0])
  for name in studies:
    if name != "main":
      for arm in arms_lib.study(name, scale):
        add(name, arm, seeds[0])
  if "main" in studies:
    for seed in seeds[1:]:
      for arm in arms_lib.study("main", scale):
        add("main", arm, seed)
  return out


def workdir(runs: Path, scale: str, arm: arms_lib.Arm, seed: int) -> Path:
  return runs / scale / arm.name / f"seed{seed}"


# What a finished run's report needs (no checkpoints or exports): committed to git under
# runs/ so that a fresh checkout reports and resumes without training it again.
RECORD_FILES = (SPEC, TIMES, "metrics.jsonl", "eval/eval.json", "eval/counts.npz")


def records(runs: Path, scale: str, todo) -> list[Path]:
  """The record files of the finished runs of ``todo`` (those that exist)."""
  out = []
  for _, arm, seed in todo:
    wd = workdir(runs, scale, arm, seed)
    if _read_json(wd / TIMES, {}).get("evaluated") and (wd / "eval" / "eval.json").exists():
      out += [wd / f for f in RECORD_FILES if (wd / f).exists()]
  return out


def _read_json(path: Path, default):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return default


def _check_spec(wd: Path, spec: dict) -> None:
  saved = _read_json(wd / SPEC, None)
  if saved is not None and saved != spec:
    raise SystemExit(f"error: {wd} was trained with other flags than arm {spec['arm']} now has "
                     f"({sorted(set(saved['flags']) ^ set(spec['flags']))[:4]}); pass another "
                     "--runs directory, or delete that workdir to train it again")


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
  t = time.perf_counter()
  with open(log, "a") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
  return rc, time.perf_counter() - t


def _subprocess_steps(wd: Path, flags: list[str], final_eval_batches: int):
  """train.py, then eval.py on the export, each a process of its own."""
  yield [sys.executable, "train.py", f"--config={BASE_CONFIG}", f"--workdir={wd}",
         "--config.train.progress_bar=false", *flags]
  yield [sys.executable, "eval.py", f"--checkpoint={wd / 'export'}", f"--out={wd / 'eval'}",
         f"--max_batches={final_eval_batches}"]


def _in_process(fn, log: Path) -> tuple[int, float]:
  """Runs ``fn()`` here (what train.py / eval.py call after parsing flags)."""
  import contextlib
  import traceback
  t = time.perf_counter()
  with open(log, "a") as f, contextlib.redirect_stdout(f):
    try:
      fn()
      rc = 0
    except Exception:  # noqa: BLE001 -- one failed run must not end the study
      traceback.print_exc(file=f)
      rc = 1
  return rc, time.perf_counter() - t


def run_one(runs: Path, scale: str, arm: arms_lib.Arm, seed: int, in_process: bool = False) -> str:
  """Trains and evaluates one run unless already done; returns 'done', 'ran' or 'failed'.

  ``in_process``: call the library functions train.py and eval.py call, in this process
  (no interpreter start and imports per run: the tiny scale's tests)."""
  wd = workdir(runs, scale, arm, seed)
  flags = arm.flags(scale, seed)
  spec = {"arm": arm.name, "kind": arm.kind, "scale": scale, "seed": seed, "flags": flags}
  _check_spec(wd, spec)
  times = _read_json(wd / TIMES, {"train_seconds": 0.0, "eval_seconds": 0.0, "attempts": 0})
  if (wd / "eval" / "eval.json").exists() and times.get("evaluated"):
    return "done"
  wd.mkdir(parents=True, exist_ok=True)
  (wd / SPEC).write_text(json.dumps(spec, indent=1))
  final = arms_lib.TRUNKS[scale]["final_eval_batches"]
  if in_process:
    import report
    from moejax.evaluation import run as eval_lib
    from moejax.training import loop
    config = report.arm_config(arm, scale, seed)
    config.train.progress_bar = False
    train = lambda: _in_process(lambda: loop.train(config, str(wd)), wd / "study.log")
    evaluate = lambda: _in_process(lambda: eval_lib.evaluate(
        str(wd / "export"), max_batches=final, out_dir=str(wd / "eval")), wd / "study.log")
  else:
    cmd_train, cmd_eval = _subprocess_steps(wd, flags, final)
    train = lambda: _run(cmd_train, wd / "study.log")
    evaluate = lambda: _run(cmd_eval, wd / "study.log")
  rc, secs = train()
  times["train_seconds"] += secs
  times["attempts"] += 1
  (wd / TIMES).write_text(json.dumps(times, indent=1))
  if rc != 0:
    return "failed"
  rc, secs = evaluate()
  times["eval_seconds"] += secs
  times["evaluated"] = rc == 0
  (wd / TIMES).write_text(json.dumps(times, indent=1))
  return "ran" if rc == 0 else "failed"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", choices=sorted(arms_lib.TRUNKS), required=True)
  p.add_argument("--study", default="all",
                 help=f"comma list of {','.join(arms_lib.STUDIES)}, or all")
  p.add_argument("--seeds", default="", help="comma list of seeds of the main study ('' = the scale's)")
  p.add_argument("--runs", default=str(HERE / "runs"), help="where the workdirs go")
  p.add_argument("--results", default=str(HERE / "results"), help="where results/SCALE goes")
  p.add_argument("--report_only", action="store_true", help="only write results and figures")
  p.add_argument("--records", action="store_true",
                 help="print the record files of the finished runs (to git add -f) and stop")
  p.add_argument("--in_process", action="store_true",
                 help="train and evaluate in this process instead of train.py / eval.py processes")
  args = p.parse_args(argv)
  studies = list(arms_lib.STUDIES) if args.study == "all" else args.study.split(",")
  bad = [s for s in studies if s not in arms_lib.STUDIES]
  if bad:
    p.exit(2, f"error: --study={args.study}: unknown study {bad[0]!r} (one of "
              f"{','.join(arms_lib.STUDIES)}, or all)\n")
  try:
    seeds = tuple(int(s) for s in args.seeds.split(",") if s) or None
  except ValueError:
    p.exit(2, f"error: --seeds={args.seeds}: must be a comma list of ints, e.g. 0,1,2\n")
  runs = Path(args.runs).resolve()
  todo = plan(studies, args.scale, seeds)
  if args.records:
    print("\n".join(str(f.relative_to(ROOT)) for f in records(runs, args.scale, todo)))
    return 0
  failed = []
  if not args.report_only:
    for i, (study, arm, seed) in enumerate(todo, 1):
      t = time.strftime("%H:%M:%S")
      print(f"[{t}] {i}/{len(todo)} {study}: {arm.name} seed {seed} ...", flush=True)
      status = run_one(runs, args.scale, arm, seed, args.in_process)
      print(f"           {status}" + (f" (see {workdir(runs, args.scale, arm, seed)}/study.log)"
                                       if status == "failed" else ""), flush=True)
      if status == "failed":
        failed.append(f"{arm.name}/seed{seed}")
  import report
  out = report.write(runs, args.scale, todo, Path(args.results).resolve() / args.scale)
  print(f"results: {out}")
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  sys.exit(main())
