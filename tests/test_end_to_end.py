"""train.py then eval.py as a user runs them (subprocesses, tiny model, tiny text dir)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_env import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.train.log_every=5", "--config.train.eval_batches=2",
        "--config.train.progress_bar=false",
        # These tests are about the command line and the loop: one dense block (a second
        # block, or the sparse default's PEER block, would only add to every run's compile;
        # tests/test_eval_outputs.py and test_checkpoint_sparse.py train sparse ones).
        "--config.model.sparse_layers=none"]


def _run(script, *args, env_devices=8, check=True, timeout=300):
  env = cli_env(env_devices)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _data_flags(tmp_path, text_dir):
  return [f"--config.data.text_dir={text_dir}", f"--config.data.data_dir={tmp_path / 'tfds'}"]


def test_train_resume_then_eval(tmp_path, text_dir):
  workdir = str(tmp_path / "wd")
  common = [*TINY, *_data_flags(tmp_path, text_dir), f"--workdir={workdir}",
            "--config.mesh.data=4", "--config.mesh.model=2", "--config.train.checkpoint_every=10",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=5"]  # not train.steps-dependent
  _run("train.py", *common, "--config.train.steps=20", "--config.train.eval_every=10")
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r["loss"] for r in rows if r["split"] == "train"]
  assert train[-1] < train[0]
  assert {"config.json", "checkpoints", "export", "tensorboard"} <= set(os.listdir(workdir))

  # Same command with more steps resumes at 20 (model, optimizer and data position) and
  # logs the same losses as one uninterrupted 30-step run.
  out = _run("train.py", *common, "--config.train.steps=30").stdout
  assert "steps 20->30" in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "30"]
  straight = str(tmp_path / "straight")
  _run("train.py", *[a for a in common if not a.startswith("--workdir")], f"--workdir={straight}",
       "--config.train.steps=30", "--config.train.eval_every=10")
  def train_losses(wd):
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  resumed, uninterrupted = train_losses(workdir), train_losses(straight)
  assert sorted(resumed) == sorted(uninterrupted) == [5, 10, 15, 20, 25, 30]
  for step in (25, 30):
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4)

  # Evaluate the export on a different device count.
  proc = _run("eval.py", f"--checkpoint={workdir}/export", "--max_batches=3", "--json", env_devices=2)
  report = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
  result = report["datasets"]["local_text"]
  assert result["loss"] > 0 and abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-3 * result["perplexity"]
  assert 0 < result["bits_per_byte"] < 8
  assert os.path.exists(os.path.join(workdir, "eval", "loss_curve.png"))

  # A training checkpoint evaluates too, and gives the same numbers as the export of that step
  # (on the export's 2 devices: its eval programs come from the compilation cache).
  proc = _run("eval.py", f"--checkpoint={workdir}", "--max_batches=3", "--json", env_devices=2)
  again = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])["datasets"]["local_text"]
  assert again["loss"] == pytest.approx(result["loss"], rel=1e-4)


def test_changed_model_does_not_resume(tmp_path, text_dir):
  workdir = str(tmp_path / "wd")
  common = [*_data_flags(tmp_path, text_dir), f"--workdir={workdir}", "--config.train.steps=2"]
  _run("train.py", *TINY, *common)
  proc = _run("train.py", *TINY, *common, "--config.model.d_model=48", check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --workdir=") and "config.model.d_model=32" in last
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]   # nothing lost


def test_sigterm_saves_and_resumes(tmp_path, text_dir):
  workdir = str(tmp_path / "wd")
  args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, *_data_flags(tmp_path, text_dir),
          f"--workdir={workdir}", "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
          "--config.train.log_every=1"]
  env = cli_env()
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted" in out
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(steps) == 1 and int(steps[0]) >= 1
  saved = int(steps[0])
  # The same command, now with an end in sight, continues from the saved step.
  out = _run("train.py", *args[2:], "--config.train.steps=" + str(saved + 2)).stdout
  assert f"steps {saved}->{saved + 2}" in out


@pytest.mark.parametrize("flag,field", [("--config.model.num_heads=0", "config.model.num_heads"),
                                        ("--config.modle.d_model=3", "config.modle"),
                                        ("--config.data.tokenizer=/no/such.model", "config.data.tokenizer")])
def test_bad_config_is_one_line(tmp_path, flag, field):
  proc = _run("train.py", flag, f"--workdir={tmp_path}", check=False, timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), proc.stderr[-2000:]


def test_profile_trace_on_request(tmp_path, text_dir):
  workdir = tmp_path / "wd"
  _run("train.py", *TINY, *_data_flags(tmp_path, text_dir), f"--workdir={workdir}",
       "--config.train.steps=4", "--config.train.profile=true", "--config.train.profile_start=1",
       "--config.train.profile_steps=2")
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0
