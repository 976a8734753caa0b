"""The PEER-paper study runner end to end at --scale tiny, and its arms' matched FLOPs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY_DIR = Path(__file__).resolve().parents[1] / "experiments" / "peer_paper"
sys.path.insert(0, str(STUDY_DIR))

import arms  # noqa: E402
import report  # noqa: E402
import study  # noqa: E402

from moejax import flops  # noqa: E402


def test_main_arms_match_training_flops_within_5_percent():
  for scale in ("cpu", "gpu"):
    counts = {a.name: flops.count(report.arm_config(a, scale, 0)).train
              for a in arms.study("main", scale)}
    assert set(a.kind for a in arms.study("main", scale)) == {"dense", "moe", "pkm", "peer"}
    dense = counts["dense"]
    for name, c in counts.items():
      assert abs(c / dense - 1) < 0.05, (scale, name, c / dense)


def test_plan_runs_shared_arms_once_main_first_seed_first():
  todo = study.plan(list(arms.STUDIES), "cpu")
  keys = [(a.name, s) for _, a, s in todo]
  assert len(keys) == len(set(keys))
  assert [s for _, _, s in todo[:5]] == [0] * 5 and todo[0][0] == "main"
  assert todo[-1][2] == 2                     # the main study's last seed goes last
  assert ("peer_n128_h8k16_bn", 0) in keys    # main, usage and ablation share it


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  """Every study at --scale tiny, trained and evaluated in this process: (tmp, runs, base flags)."""
  tmp = tmp_path_factory.mktemp("study")
  runs = tmp / "runs"
  base = ["--scale", "tiny", f"--runs={runs}", f"--results={tmp / 'results'}"]
  assert study.main(base + ["--in_process"]) == 0
  return tmp, runs, base


def _reevaluate_dense(runs, base, capsys, *flags):
  """Deletes the dense run's evaluation and runs the main study again: only it runs (train
  finds it finished and does nothing, eval runs again), one attempt more."""
  dense = study.workdir(runs, "tiny", arms.dense(), 0)
  times = json.loads((dense / study.TIMES).read_text())
  (dense / "eval" / "eval.json").unlink()
  capsys.readouterr()
  assert study.main(base + ["--study=main", *flags]) == 0
  log = capsys.readouterr().out
  assert log.count("done") == len(arms.study("main", "tiny")) - 1 and log.count(" ran") == 1
  assert json.loads((dense / study.TIMES).read_text())["attempts"] == times["attempts"] + 1
  assert (dense / "eval" / "eval.json").exists()


def test_tiny_study_end_to_end_and_resume(tiny_study, capsys):
  tmp_path, runs, base = tiny_study
  out = tmp_path / "results" / "tiny"
  res = json.loads((out / "results.json").read_text())
  todo = study.plan(list(arms.STUDIES), "tiny")
  assert res["missing"] == [] and len(res["runs"]) == len(todo)
  for r in res["runs"]:
    assert np.isfinite(r["eval_loss"]) and r["eval_loss"] < 6.0   # below uniform over 258 tokens
    assert r["train_flops"] == pytest.approx(r["train_flops_per_token"] * r["tokens"])
    assert r["curve"] and r["curve"][-1]["step"] == r["steps"]
    if r["kind"] != "dense":
      assert 0 < r["usage"] <= 1 and r["kl_uniform"] >= 0
  for png in ("loss_vs_flops", "usage_kl", "usage_hist", "usage_over_steps", "ablation"):
    assert (out / f"{png}.png").stat().st_size > 1000, png
  assert len((out / "results.csv").read_text().splitlines()) == len(todo) + 1
  summary = (out / "summary.md").read_text()
  assert "## Main study" in summary and "## Expert usage" in summary and "## Heads × top-k" in summary

  # A checkout holding only the finished runs' records (what git keeps of runs/) reports
  # the same and trains nothing.
  fresh = tmp_path / "fresh_runs"
  for f in study.records(runs, "tiny", todo):
    dest = fresh / f.relative_to(runs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(f.read_bytes())
  capsys.readouterr()
  assert study.main(["--scale", "tiny", f"--runs={fresh}", f"--results={tmp_path / 'again'}"]) == 0
  assert capsys.readouterr().out.count("done") == len(todo)
  again = json.loads((tmp_path / "again" / "tiny" / "results.json").read_text())
  assert [r["eval_loss"] for r in again["runs"]] == [r["eval_loss"] for r in res["runs"]]

  # Finished runs are skipped; a run missing its evaluation is evaluated again (here in this
  # process; through the train.py / eval.py processes in the slow test below).
  _reevaluate_dense(runs, base, capsys, "--in_process")

  # A workdir trained with other flags is refused, never mixed.
  dense = study.workdir(fresh, "tiny", arms.dense(), 0)
  spec = json.loads((dense / study.SPEC).read_text())
  spec["flags"] = spec["flags"][:-1] + ["--config.model.sparse_ffn=peer"]
  (dense / study.SPEC).write_text(json.dumps(spec))
  with pytest.raises(SystemExit, match="trained with other flags"):
    study.main(["--scale", "tiny", f"--runs={fresh}", "--study=main",
                f"--results={tmp_path / 'again'}"])


@pytest.mark.slow
def test_tiny_study_reevaluates_through_train_and_eval_processes(tiny_study, capsys):
  """The study's own train.py / eval.py command lines (the default suite runs the same
  re-evaluation in process above; train.py and eval.py's flags in test_end_to_end.py)."""
  _, runs, base = tiny_study
  _reevaluate_dense(runs, base, capsys)


def test_bad_study_name_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    study.main(["--scale", "tiny", "--study", "mian"])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().startswith("error: --study=mian: unknown study 'mian'")
