"""Faults provoked for real: divergence, corrupted checkpoints, bad inputs, workdir bookkeeping.

Subprocess runs of train.py / eval.py are shared through module fixtures (one diverging run,
its resume) and the one-line-error cases run a few at a time.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from cli_env import cli_env
from lm_utils import synthetic_batches, tiny_config
from moejax import config as config_lib
from moejax.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib
from moejax.training.writers import MetricWriter, read_metrics
from test_end_to_end import ROOT, TINY

# A real divergence: no clipping, no warmup, a learning rate of 10^4.
ABSURD_LR = ["--config.optim.lr=1e4", "--config.optim.grad_clip=0.0",
             "--config.optim.warmup_steps=0", "--config.optim.schedule=constant"]


def _env(devices=8):
  # PYTHONPATH: worker scripts written to tmp_path import this checkout's moejax whether or
  # not (and wherever) it is pip-installed.
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
  return cli_env(devices, PYTHONPATH=path)


def _run(script, *args, devices=8, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                        env=_env(devices), capture_output=True, text=True, timeout=timeout)


def _one_line(proc, code=2) -> str:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (
      proc.returncode, proc.stderr[-3000:])
  return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, text_dir):
  """Built once here: concurrent first builds would race, and TFDS draws progress bars."""
  from moejax.data import local_text
  d = str(tmp_path_factory.mktemp("tfds"))
  local_text.prepare(local_text.builder(text_dir=text_dir, data_dir=d))
  return d


def _common(workdir, text_dir, data_dir):
  return [*TINY, f"--config.data.text_dir={text_dir}", f"--config.data.data_dir={data_dir}",
          f"--workdir={workdir}", "--config.train.log_every=2", "--config.train.eval_batches=1",
          "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2",
          "--config.mesh.data=1"]


def _restore_all_finite(workdir, step):
  config = ckpt_lib.read_config(workdir)
  config.mesh.update(data=1, expert=1, model=1)
  ts = state_lib.create_train_state(config)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=100, create=False)
  state, _ = ckpt.restore(ts.state, ts.shardings, step=step)
  ckpt.close()
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, text_dir, data_dir):
  """train.py with an absurd LR: first stop (exit 1), then the same workdir with skip."""
  workdir = str(tmp_path_factory.mktemp("diverged") / "wd")
  common = _common(workdir, text_dir, data_dir)
  # A checkpoint every step: an absurd LR may overflow as early as step 2 (when exactly
  # depends on rounding), and the test needs a saved step before the bad one.
  stop = _run("train.py", *common, *ABSURD_LR, "--config.train.steps=16",
              "--config.train.checkpoint_every=1")
  after_stop = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  finite_after_stop = {s: _restore_all_finite(workdir, s) for s in after_stop}
  export_after_stop = os.path.exists(os.path.join(workdir, "export"))
  skip = _run("train.py", *common, *ABSURD_LR, "--config.train.steps=16",
              "--config.train.on_nonfinite=skip")
  return dict(workdir=workdir, common=common, stop=stop, skip=skip, after_stop=after_stop,
              finite_after_stop=finite_after_stop, export_after_stop=export_after_stop)


# ---------------------------------------------------------------- 1. divergence


def test_nonfinite_step_applies_no_update():
  """A real NaN gradient from a real step: params and optimizer state stay, the step counts."""
  config = tiny_config()
  config.optim.update(lr=1e4, grad_clip=0.0, warmup_steps=0, schedule="constant")
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  flagged = 0
  for i, b in zip(range(10), synthetic_batches(config)):
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.to_pure_dict(ts.state)[0])]
    ts.state, metrics = step(ts.state, state_lib.device_batch(b, ts.mesh))
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(ts.state)[0])]
    assert ts.step == i + 1
    bad = not (np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"])))
    assert float(metrics["nonfinite"]) == float(bad)
    if bad:
      flagged += 1
      assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert all(np.isfinite(x).all() for x in after)
  assert flagged > 0   # the LR really diverges


def test_nonfinite_state_is_never_saved(tmp_path):
  ts = state_lib.create_train_state(tiny_config())
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(1, ts.state, {})
  ckpt.save(2, ts.state, {})
  poisoned = jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, ts.state)
  with pytest.raises(NonFiniteError, match="step 3"):
    ckpt.save(3, poisoned, {})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]   # keep-N deleted nothing for it
  ckpt.close()
  with pytest.raises(NonFiniteError):
    ckpt_lib.export(str(tmp_path / "export"), poisoned[0], tiny_config())
  assert not (tmp_path / "export").exists()


def test_nonfinite_stop_names_the_step_and_saves_nothing_after(diverged):
  line = _one_line(diverged["stop"], code=1)
  assert "non-finite" in line and "on_nonfinite=stop" in line
  bad_step = int(line.split("step ")[1].split(":")[0])
  assert diverged["after_stop"] and max(diverged["after_stop"]) < bad_step
  assert all(diverged["finite_after_stop"].values())
  assert not diverged["export_after_stop"]


def test_nonfinite_skip_counts_and_finishes_finite(diverged):
  proc, workdir = diverged["skip"], diverged["workdir"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped" in proc.stdout and "on_nonfinite=skip" in proc.stdout
  rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
  assert rows[-1]["step"] == 16 and rows[-1]["nonfinite_total"] > 0
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps == [14, 16]
  assert all(_restore_all_finite(workdir, s) for s in steps)
  assert os.path.isdir(os.path.join(workdir, "export", "model"))


# ---------------------------------------------------------------- 5. workdir bookkeeping


def test_finished_rerun_is_a_noop_unless_asked(diverged):
  workdir, common = diverged["workdir"], diverged["common"]
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  export_mtime = os.path.getmtime(os.path.join(workdir, "export", "config.json"))
  args = [*common, *ABSURD_LR, "--config.train.steps=16", "--config.train.on_nonfinite=skip"]
  proc = _run("train.py", *args)
  assert proc.returncode == 0 and "already finished at step 16" in proc.stdout, proc.stderr[-2000:]
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
  assert os.path.getmtime(os.path.join(workdir, "export", "config.json")) == export_mtime
  proc = _run("train.py", *args, "--reevaluate")
  assert proc.returncode == 0 and "eval loss" in proc.stdout, proc.stderr[-2000:]
  evals = [r for r in read_metrics(workdir) if r["split"] == "eval" and r["step"] == 16]
  assert len(evals) == 1   # replaced, not duplicated


def test_torn_metrics_line_and_harmless_change_resume(diverged, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(diverged["workdir"], workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 17, "split": "tra')   # a write cut by a kill
  common = [a if not a.startswith("--workdir") else f"--workdir={workdir}" for a in diverged["common"]]
  proc = _run("train.py", *common, *ABSURD_LR, "--config.train.steps=18",
              "--config.train.on_nonfinite=skip", "--config.model.dtype=bfloat16",
              "--config.optim.weight_decay=0.05")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming with config.model.dtype='bfloat16'" in proc.stdout
  assert "steps 16->18" in proc.stdout
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  assert all(json.loads(l)["step"] <= 18 for l in lines)


def test_changed_fields_decided_by_the_abstract_state():
  saved = tiny_config()
  saved.model.vocab_size = 32
  harmless = config_lib.from_dict(saved.to_dict())
  harmless.model.dtype = "bfloat16"
  harmless.optim.weight_decay = 0.1
  harmless.moe.balance_loss_weight = 0.5
  harmless.train.steps = 999
  changes = ckpt_lib.check_compatible(saved.to_dict(), harmless, "w")
  assert {f for f, _, _ in changes} == {"model.dtype", "optim.weight_decay", "moe.balance_loss_weight"}
  for field, value in (("optim.name", "sgd"), ("optim.grad_clip", 0.0), ("model.d_ff", 48)):
    other = config_lib.from_dict(saved.to_dict())
    section, key = field.split(".")
    other[section][key] = value
    other.model.dtype = "bfloat16"   # a harmless change beside it is not the one named
    with pytest.raises(CheckpointError, match=rf"config\.{field}=.*changes the state: array "):
      ckpt_lib.check_compatible(saved.to_dict(), other, "w")
  stream = config_lib.from_dict(saved.to_dict())
  stream.data.batch_size = 16
  with pytest.raises(CheckpointError, match=r"config\.data\.batch_size=8.*data stream"):
    ckpt_lib.check_compatible(saved.to_dict(), stream, "w")


def test_torn_metrics_line_is_dropped(tmp_path):
  rows = [{"step": s, "split": "train", "loss": 1.0} for s in (1, 2, 3)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "spl')
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
  writer = MetricWriter(str(tmp_path), resume_step=2, tensorboard=False)
  writer.write(3, {"loss": 0.5})
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
  assert read_metrics(str(tmp_path))[-1]["loss"] == 0.5


def test_fresh_workdir_failing_before_first_step_is_left_as_it_was(tmp_path, text_dir, data_dir,
                                                                   monkeypatch):
  from moejax.training import loop
  config = tiny_config()
  config.model.vocab_size = 0
  config.data.update(text_dir=text_dir, data_dir=data_dir)
  config.train.update(steps=2, progress_bar=False)

  def broken(ts):
    raise RuntimeError("compile failed")
  monkeypatch.setattr(state_lib, "make_train_step", broken)
  workdir = tmp_path / "new"
  with pytest.raises(RuntimeError, match="compile failed"):
    loop.train(config, str(workdir))
  assert not workdir.exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(RuntimeError):
    loop.train(config, str(existing))
  assert sorted(os.listdir(existing)) == ["notes.txt"]


# ---------------------------------------------------------------- 2. corrupted checkpoints


@pytest.fixture(scope="module")
def two_checkpoints_dir(tmp_path_factory):
  """A workdir with checkpoints 1 and 2 of two real steps (copied by each test that damages it)."""
  workdir = tmp_path_factory.mktemp("two")
  config = tiny_config()
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=5, async_save=False)
  for i, b in zip(range(2), synthetic_batches(config)):
    ts.state, _ = step(ts.state, state_lib.device_batch(b, ts.mesh))
    ckpt.save(i + 1, ts.state, {"pos": i + 1})
  ckpt.close()
  return workdir


def _two_checkpoints(tmp_path, two_checkpoints_dir):
  shutil.rmtree(tmp_path)
  shutil.copytree(two_checkpoints_dir, tmp_path)
  return tiny_config()


@pytest.mark.parametrize("damage", ["truncate", "delete_metadata"])
def test_restore_walks_back_past_a_broken_checkpoint(tmp_path, damage, two_checkpoints_dir):
  config = _two_checkpoints(tmp_path, two_checkpoints_dir)
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  if damage == "truncate":   # every array file cut short, as by a full disk
    files = glob.glob(str(state_dir / "ocdbt.process_0" / "d" / "*"))
    assert files
    for f in files:
      os.truncate(f, 10)
  else:
    os.remove(state_dir / "_METADATA")
  ts = state_lib.create_train_state(config)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=5, create=False)
  _, data_state = ckpt.restore(ts.state, ts.shardings)
  assert data_state == {"pos": 1} and ckpt.restored_step == 1
  [(step, kind, _)] = ckpt.skipped
  assert (step, kind) == (2, "unreadable")
  [warning] = ckpt.skipped_warnings()
  assert "checkpoints/2 is unreadable" in warning and "resuming from step 1" in warning
  moved = ckpt.set_aside_skipped()
  assert moved and ckpt.all_steps() == [1]
  ckpt.close()


def test_checkpoint_of_another_model_names_the_array(tmp_path, two_checkpoints_dir):
  _two_checkpoints(tmp_path, two_checkpoints_dir)
  other = state_lib.create_train_state(tiny_config(d_ff=48))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=5, create=False)
  with pytest.raises(CheckpointError, match=r"does not match this model \(array model/blocks/0/ffn/"):
    ckpt.restore(other.state, other.shardings)
  assert [k for _, k, _ in ckpt.skipped] == ["mismatch", "mismatch"]
  ckpt.close()


def test_train_resumes_from_previous_checkpoint_and_eval_fails_in_one_line(diverged, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(diverged["workdir"], workdir)
  for f in glob.glob(os.path.join(workdir, "checkpoints", "16", "state", "ocdbt.process_0", "d", "*")):
    os.truncate(f, 10)
  common = [a if not a.startswith("--workdir") else f"--workdir={workdir}" for a in diverged["common"]]
  proc = _run("train.py", *common, *ABSURD_LR, "--config.train.steps=18",
              "--config.train.on_nonfinite=skip")
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and "checkpoints/16 is unreadable" in warnings[0]
  assert "Traceback" not in proc.stderr
  assert "steps 14->18" in proc.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unrestorable", "16"))
  # Every checkpoint broken: eval.py says so in one line (no asyncio tracebacks).
  for f in glob.glob(os.path.join(workdir, "checkpoints", "*", "state", "manifest.ocdbt")):
    os.remove(f)
  line = _one_line(_run("eval.py", f"--checkpoint={workdir}", "--max_batches=1", devices=1))
  assert "no checkpoint in" in line and "restores" in line
  shutil.rmtree(os.path.join(workdir, "export", "model", "d"), ignore_errors=True)
  for f in glob.glob(os.path.join(workdir, "export", "model", "**", "*"), recursive=True):
    if os.path.isfile(f) and "ocdbt.process" in f:
      os.truncate(f, 5)
  line = _one_line(_run("eval.py", f"--checkpoint={workdir}/export", "--max_batches=1", devices=1))
  assert line.startswith(f"error: export {workdir}/export is unreadable")


# ---------------------------------------------------------------- 3./4. bad inputs


def _bad_inputs(tmp):
  """(name, args, text that the one line must contain)."""
  (tmp / "syntax.py").write_text("def get_config(:\n")
  (tmp / "noget.py").write_text("x = 1\n")
  (tmp / "returns_dict.py").write_text("def get_config():\n  return {'model': {}}\n")
  for name, write in (("empty", lambda p: p.write_bytes(b"")),
                      ("binary", lambda p: p.write_bytes(b"\0\x01\x02" * 500)),
                      ("utf16", lambda p: p.write_text("some text " * 80, encoding="utf-16"))):
    d = tmp / name
    d.mkdir()
    for i in range(3):
      write(d / f"f{i}.txt")
  (tmp / "garbage.model").write_bytes(b"not a sentencepiece model")
  (tmp / "afile").write_text("x")
  return [
      ("missing config", ["--config=/no/such/config.py"], "--config=/no/such/config.py: no such file"),
      ("syntax error", [f"--config={tmp}/syntax.py"], "syntax error at line 1"),
      ("no get_config", [f"--config={tmp}/noget.py"], "has no get_config()"),
      ("get_config returns dict", [f"--config={tmp}/returns_dict.py"], "returned a dict"),
      ("flag type", ["--config.train.steps=ten"], "config.train.steps='ten': must be int"),
      ("bool flag", ["--config.train.profile=maybe"], "must be true or false"),
      ("plain flag type", ["--num_processes=two"], "--num_processes='two': must be int"),
      ("unknown flag", ["--workdri=x"], "did you mean --workdir?"),
      ("mistyped field", ["--config.optim.lr_warmup=3"], "did you mean config.optim."),
      ("field in wrong section", ["--config.train.lr=0.1"], "did you mean config.optim.lr?"),
      ("stray argument", ["oops"], "unexpected argument 'oops'"),
      ("mesh", ["--config.mesh.data=3"], "config.mesh.data=3"),
      ("mesh too big", ["--config.mesh.model=16"], "does not divide the 8 devices"),
      ("on_nonfinite", ["--config.train.on_nonfinite=ignore"], "must be stop or skip"),
      ("empty files", [f"--config.data.text_dir={tmp}/empty"], "no usable text"),
      ("binary files", [f"--config.data.text_dir={tmp}/binary"], "3 binary"),
      ("utf-16 files", [f"--config.data.text_dir={tmp}/utf16"], "UTF-16"),
      ("tokenizer dir", [f"--config.data.tokenizer={tmp}"], "a directory, not a file"),
      ("tokenizer garbage", [f"--config.data.tokenizer={tmp}/garbage.model"], "not a SentencePiece model"),
      ("workdir is a file", [f"--workdir={tmp}/afile"], "exists and is not a directory"),
      ("eval split", ["--config.data.eval_split=test"], "no split 'test'"),
  ]


# The classes handled before jax starts (flags, config files), plus one from the training
# loop (mesh): the exit-2 one-line path of each; the others are checked in-process below.
_FAST = ("missing config", "syntax error", "no get_config", "flag type", "unknown flag",
         "field in wrong section", "stray argument", "mesh")


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, text_dir, data_dir):
  _check_bad_inputs(tmp_path, text_dir, data_dir, _FAST)


@pytest.mark.slow
def test_every_bad_input_through_train_py(tmp_path, text_dir, data_dir):
  _check_bad_inputs(tmp_path, text_dir, data_dir, None)


def test_bad_inputs_in_the_loop_raise_one_line_before_writing(tmp_path, text_dir, data_dir):
  from moejax.training import loop
  every = _bad_inputs(tmp_path)
  cases = [c for c in every if c[1][0].startswith("--config.")
           and c[1][0].split("=")[0].count(".") == 2 and c[0] not in _FAST
           and c[0] not in ("flag type", "bool flag", "mistyped field")] + [
      c for c in every if c[0] == "workdir is a file"]
  assert len(cases) >= 9
  for name, args, want in cases:
    config = config_lib.default_config()
    config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64)
    config.data.update(seq_len=32, batch_size=8, text_dir=text_dir, data_dir=data_dir)
    config.train.progress_bar = False
    workdir = tmp_path / f"in_{name.replace(' ', '_')}"
    for arg in args:
      key, value = arg[2:].split("=", 1)
      if key == "workdir":
        workdir = value
        continue
      section, field = key.split(".")[1:]
      default = config[section][field]
      config[section][field] = type(default)(value) if not isinstance(default, str) else value
    with pytest.raises((ConfigError, DataError, CheckpointError)) as e:
      loop.train(config, str(workdir))
    assert want in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert name == "workdir is a file" or not os.path.exists(workdir), name


def _check_bad_inputs(tmp_path, text_dir, data_dir, only):
  cases = [c for c in _bad_inputs(tmp_path) if only is None or c[0] in only]
  procs = []
  for i, (name, args, _) in enumerate(cases):
    workdir = tmp_path / f"wd{i}"
    base = [*TINY, f"--config.data.text_dir={text_dir}", f"--config.data.data_dir={data_dir}",
            f"--workdir={workdir}"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, *base, *args]
    if args[0].startswith("--config="):
      cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, *base]
    procs.append((name, workdir, subprocess.Popen(cmd, cwd=ROOT, env=_env(), text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    if len([p for *_, p in procs if p.poll() is None]) >= 4:
      procs[-4][2].wait(timeout=300)
  failures = []
  for (name, workdir, proc), (_, _, want) in zip(procs, cases):
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    if not (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and want in lines[0]):
      failures.append(f"{name}: rc={proc.returncode} stderr={err[-1500:]!r}")
    elif workdir.exists() and name != "workdir is a file":
      failures.append(f"{name}: wrote {os.listdir(workdir)}")
  assert not failures, "\n".join(failures)


def test_unknown_field_suggests_the_nearest():
  c = config_lib.default_config()
  c.optim.weight_decy = 0.1
  with pytest.raises(ConfigError, match=r"^config\.optim\.weight_decy: unknown field \(did you mean "
                                        r"config\.optim\.weight_decay\?\)$"):
    config_lib.validate(c)


def test_local_text_without_usable_text_is_refused(tmp_path):
  from moejax.data import local_text
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("   \n\n")
  (tmp_path / "c.bin").write_bytes(b"\x7fELF\0\0\0" * 100)
  with pytest.raises(DataError, match=r"no usable text in its 3 file\(s\) \(2 empty, 1 binary\)"):
    local_text.make_config(str(tmp_path))
  (tmp_path / "d.txt").write_text("real text " * 20)
  (tmp_path / "e.txt").write_text("more text " * 20)
  local_text.make_config(str(tmp_path))   # usable now


def test_blank_records_are_refused_before_training(tmp_path):
  """Any dataset: a split whose records are all blank is refused (not trained on EOS)."""
  from moejax import data
  cfg = data.default_config()
  cfg.data_dir = str(tmp_path / "tfds")

  class Blank:
    def __len__(self):
      return 5

    def __getitem__(self, i):
      return {"text": b"  \n"}

  import moejax.data.pipeline as pipeline
  original = pipeline.make_source
  pipeline.make_source = lambda *a, **k: Blank()
  try:
    with pytest.raises(DataError, match="no usable text"):
      data.check_split(cfg, "train")
  finally:
    pipeline.make_source = original


# ---------------------------------------------------------------- multi-host


_WORKER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[4])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from cli_env import cli_env
from lm_utils import synthetic_batches, tiny_config
from moejax.training import state as state_lib
config = tiny_config()
config.mesh.data = 8
ts = state_lib.create_train_state(config)
step = state_lib.make_train_step(ts)
pid, losses = jax.process_index(), []
for _, batch in zip(range(int(sys.argv[3])), synthetic_batches(config)):
  local = {k: v[pid * 4:(pid + 1) * 4] for k, v in batch.items()}
  ts.state, metrics = step(ts.state, state_lib.device_batch(local, ts.mesh))
  losses.append([float(metrics["loss"]), float(metrics["nonfinite"])])
print("LOSSES " + json.dumps(losses))
'''


def test_two_processes_match_one_process_losses(tmp_path):
  """2 processes x 4 devices (gloo) and 1 x 8 take the same steps on the same global batches."""
  import portpicker
  steps = 4
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(pid), str(steps),
                             os.path.join(ROOT, "tests")], cwd=ROOT, env=_env(4), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in range(2)]
  config = tiny_config()
  config.mesh.data = 8
  ts = state_lib.create_train_state(config)
  step = state_lib.make_train_step(ts)
  single = []
  for _, batch in zip(range(steps), synthetic_batches(config)):
    ts.state, metrics = step(ts.state, state_lib.device_batch(batch, ts.mesh))
    single.append([float(metrics["loss"]), float(metrics["nonfinite"])])
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    multi = json.loads(out.split("LOSSES ")[1].splitlines()[0])
    np.testing.assert_allclose(multi, single, rtol=1e-5)
