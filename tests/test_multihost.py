"""Multi-host: train.py as 2 processes x 4 CPU devices (gloo), then resume."""

import json
import os
import subprocess
import sys

import portpicker

from cli_env import cli_env
from moejax.data import local_text
from test_end_to_end import ROOT, TINY


def _launch(workdir, text_dir, data_dir, steps):
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(2):
    env = cli_env(4)
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--workdir={workdir}",
            f"--config.data.text_dir={text_dir}", f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={steps}", "--config.train.checkpoint_every=4",
            "--config.mesh.data=4", "--config.mesh.model=2",
            f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def test_two_processes_train_and_resume(tmp_path):
  text_dir = tmp_path / "text"
  text_dir.mkdir()
  for i in range(8):
    (text_dir / f"d{i}.txt").write_text(f"document {i} says hello to the world. " * 60)
  data_dir = tmp_path / "tfds"
  # Build the dataset once before the hosts start (they would race on a first build).
  local_text.prepare(local_text.builder(text_dir=str(text_dir), data_dir=str(data_dir)))
  workdir = tmp_path / "wd"
  outs = _launch(workdir, text_dir, data_dir, steps=4)
  assert "8 devices" in outs[0][0]
  ckpt = workdir / "checkpoints" / "4"
  data_state = json.load(open(next(ckpt.glob("data/*"))))
  assert sorted(data_state) == ["0", "1"] and data_state["0"] != data_state["1"]
  outs = _launch(workdir, text_dir, data_dir, steps=8)
  assert "steps 4->8" in outs[0][0]
