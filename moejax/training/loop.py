"""The training loop: data -> sharded batch -> step -> metrics, checkpoints, export.

Re-running with the same workdir resumes from the newest checkpoint that restores
(model, optimizer, step and data-iterator position); re-running a finished run is a
no-op. SIGTERM (preemption) saves a checkpoint at the next step boundary and exits
cleanly. A non-finite loss or gradient norm is caught inside the step (no update
applied) and stops the run or is skipped (``train.on_nonfinite``).
"""

from __future__ import annotations

import collections
import logging
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moejax import config as config_lib
from moejax import data, paths, sharding
from moejax.errors import CheckpointError, ConfigError, NonFiniteError, config_error
from moejax.evaluation import perplexity
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib
from moejax.training.writers import MetricWriter, Progress

log = logging.getLogger(__name__)


def prepare_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, object]:
  """Validates the config and fills the vocab size from the tokenizer."""
  config_lib.validate(config)
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  if config.model.vocab_size == 0:
    config.model.vocab_size = tokenizer.vocab_size
  elif config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model.vocab_size={config.model.vocab_size}: smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} (set --config.model.vocab_size=0 to take it from the tokenizer)")
  return config, tokenizer


def check_mesh(config) -> None:
  """The mesh must fit the devices (one line naming the axis, before anything is built)."""
  m, n = config.mesh, jax.device_count()
  shape = (m.data, m.expert, m.model)
  try:
    resolved = sharding.resolve_mesh_shape(shape, n)
  except ValueError:
    axis = next((a for a, v in zip(("data", "expert", "model"), shape) if v > 0 and n % v), None)
    axis = axis or next((a for a, v in zip(("data", "expert", "model"), shape) if v > 1), "data")
    known = int(np.prod([v for v in shape if v != -1]))
    raise config_error(f"mesh.{axis}", m[axis],
                       f"mesh data x expert x model = {m.data} x {m.expert} x {m.model} needs "
                       f"{known} devices{' (times the rest)' if -1 in shape else ''}, which does not "
                       f"divide the {n} devices here",
                       f"set --config.mesh.{axis} to a divisor of {n}, or -1 for the rest") from None
  config_lib.check_mesh_shape(config, dict(zip(sharding.MESH_AXES, resolved)))


def _check_workdir_path(workdir: str) -> bool:
  """Refuses a workdir that cannot be one (nothing is written); True if it holds a run."""
  if paths.is_remote(workdir):
    return paths.isdir(paths.join(workdir, "checkpoints"))
  import os
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: exists and is not a directory (pass a directory)")
  for name in ("checkpoints", "export", "tensorboard"):
    sub = os.path.join(workdir, name)
    if os.path.exists(sub) and not os.path.isdir(sub):
      raise ConfigError(f"--workdir={workdir}: {name} is a file, not a directory (move it away or "
                        "pass another --workdir)")
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir}: {parent} is not writable (pass a --workdir you can "
                      "write to)")
  return os.path.isdir(os.path.join(workdir, "checkpoints"))


def _saved_config(workdir: str) -> dict | None:
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    return None
  try:
    saved = paths.read_json(path)
  except (ValueError, OSError) as e:
    raise CheckpointError(f"--workdir={workdir}: config.json is not valid JSON "
                          f"({str(e).splitlines()[0][:100]}); restore it, or delete it to resume "
                          "by the checkpoints alone") from None
  if not isinstance(saved, dict):
    raise CheckpointError(f"--workdir={workdir}: config.json is not a config; restore it, or "
                          "delete it to resume by the checkpoints alone")
  return saved


def _finished(workdir: str, step: int) -> bool:
  """The run reached ``step``, evaluated there and exported (what its last act writes)."""
  from moejax.training.writers import read_metrics
  export = paths.join(workdir, "export")
  return (paths.exists(paths.join(export, "config.json")) and paths.isdir(paths.join(export, "model"))
          and any(r["step"] == step and r.get("split") == "eval" for r in read_metrics(workdir)))


class _Cleanup:
  """Leaves a workdir that held no run as it was when the run fails before its first step."""

  def __init__(self, workdir: str, holds_run: bool):
    import os
    self.workdir = workdir
    self.active = (not holds_run and not paths.is_remote(workdir) and jax.process_index() == 0)
    self.existed = os.path.isdir(workdir)
    self.before = set(os.listdir(workdir)) if self.existed else set()

  def undo(self) -> None:
    import os
    import shutil
    if not self.active:
      return
    if not self.existed:
      shutil.rmtree(self.workdir, ignore_errors=True)
      return
    for name in set(os.listdir(self.workdir)) - self.before:
      full = os.path.join(self.workdir, name)
      shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)


def check_batch_layout(config, mesh) -> None:
  """The global batch must split evenly over the batch shards (mesh data x expert), and each
  process must own whole shards, as many as every other process (its rows are read from its
  own part of the data).

  Reads the processes of the mesh's devices, so it checks the devices of a TPU topology
  compiled for from another machine (``moejax.aot``) as it checks those of a real run.
  """
  shards = mesh.shape["data"] * mesh.shape["expert"]
  b = config.data.batch_size
  if b % shards:
    raise config_error("data.batch_size", b, f"must be a multiple of mesh data x expert = {shards}",
                       f"set --config.data.batch_size={max(shards, b - b % shards)}")
  devices = np.asarray(mesh.devices).transpose([mesh.axis_names.index(a) for a in sharding.MESH_AXES])
  owners = [{d.process_index for d in row} for row in devices.reshape(shards, -1)]  # [data x expert]
  per_process = collections.Counter(next(iter(o)) for o in owners)
  if any(len(o) > 1 for o in owners) or len(set(per_process.values())) > 1:
    raise config_error("mesh", dict(mesh.shape), "a batch shard spans several processes",
                       "put the model axis within a host: mesh.model <= devices per host")


def _hosts_agree(flag: bool) -> bool:
  """True on every process if it is True on any (e.g. SIGTERM seen by one host)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class _Preemption:
  """Turns SIGTERM into a flag checked between steps."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:   # not the main thread (e.g. under some test runners)
      pass

  def _handle(self, signum, frame):
    self.requested = True


@jax.jit
def _count_nonfinite(guard, nonfinite):
  """(skipped count, first non-finite step or -1, step counter) after one step: on device."""
  count, first, step = guard
  step = step + 1
  bad = nonfinite > 0
  return count + bad.astype(jnp.int32), jnp.where((first < 0) & bad, step, first), step


def train(config: ml_collections.ConfigDict, workdir: str, *, reevaluate: bool = False) -> dict:
  """Trains ``config`` in ``workdir``; returns the last train and eval metrics.

  Every bad input (config, mesh, data, tokenizer, workdir, checkpoints) raises a one-line
  ConfigError / DataError / CheckpointError before anything is written. A workdir whose run
  already reached ``train.steps`` (evaluated and exported) is left alone, unless
  ``reevaluate`` (then the final eval runs again and replaces its row).
  """
  workdir = paths.absolute(workdir)
  config, tokenizer = prepare_config(config)
  t = config.train
  check_mesh(config)
  holds_run = _check_workdir_path(workdir)
  reader = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, create=False) if holds_run else None
  steps = reader.all_steps() if reader else []
  changes = []
  if steps:
    saved = _saved_config(workdir)
    if saved is not None:
      changes = ckpt_lib.check_compatible(saved, config, f"--workdir={workdir}")
    if steps[-1] >= t.steps and not reevaluate and _finished(workdir, steps[-1]):
      reader.close()
      msg = (f"{workdir} already finished at step {steps[-1]} (train.steps={t.steps}): nothing to "
             "do; raise --config.train.steps to train on, or pass --reevaluate to evaluate again")
      if jax.process_index() == 0:
        print(msg, flush=True)
      return {"train": {}, "eval": {}, "step": steps[-1], "preempted": False, "finished": True,
              "message": msg}

  if not steps and t.init_from and not paths.isdir(paths.join(t.init_from, "model")):
    raise CheckpointError(f"config.train.init_from={t.init_from!r}: not a moejax export "
                          "(config.json + model/); pass an export directory or \"\"")
  ts = state_lib.create_train_state(config)
  check_batch_layout(config, ts.mesh)
  for split in (config.data.train_split, config.data.eval_split):
    data.check_split(config.data, split)   # no usable text: refused before training
  train_iter = data.make_train_iterator(config.data, tokenizer, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  start = 0
  if steps:
    ts.state, data_state = reader.restore(ts.state, ts.shardings)
    train_iter.set_state(data_state)
    start = ts.step
    log.info("resumed from step %d", start)
  elif t.init_from:
    ckpt_lib.load_model_state(t.init_from, ts.state[0], ts.shardings[0])
    log.info("model variables from %s", t.init_from)

  cleanup = _Cleanup(workdir, holds_run=bool(steps))
  done = [0]   # steps run, for the cleanup
  try:
    return _run(config, workdir, tokenizer, ts, train_iter, reader, start, changes, reevaluate, done)
  except BaseException:
    if done[0] == 0:
      cleanup.undo()
    raise


def _run(config, workdir, tokenizer, ts, train_iter, reader, start, changes, reevaluate, done) -> dict:
  t = config.train
  try:
    paths.makedirs(workdir)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot be created ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:100] if str(e) else ''}); pass a --workdir you "
                      "can write to") from None
  if reader is not None:
    for line in reader.skipped_warnings():
      if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)
    reader.set_aside_skipped()
    reader.close()
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  if jax.process_index() == 0:
    for field, old, new in changes:
      print(f"resuming with config.{field}={new!r} (was {old!r}; no array of the state changes)",
            flush=True)
    paths.write_json(paths.join(workdir, "config.json"), config.to_dict())

  train_step = state_lib.make_train_step(ts)
  eval_step = state_lib.make_eval_step(ts.eval_graphdef, ts.shardings[0], ts.mesh, ts.rules)
  writer = MetricWriter(workdir, resume_step=start)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.state[0]))
  tokens_per_step = config.data.batch_size * config.data.seq_len
  if jax.process_index() == 0:
    print(f"moejax: {n_params / 1e6:.2f}M model variables, mesh {dict(ts.mesh.shape)}, "
          f"{jax.device_count()} devices, steps {start}->{t.steps}, workdir {workdir}", flush=True)
  progress = Progress(t.steps, start, t.progress_bar)
  preempt = _Preemption()

  def run_eval(step, replace=False):
    batches = data.make_eval_iterator(config.data, tokenizer, max_batches=t.eval_batches,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    result = perplexity.evaluate(eval_step, ts.state[0], batches, ts.mesh)
    writer.write(step, perplexity.scalars(result), split="eval", replace=replace)
    return result

  def eval_extent(result) -> str:
    """What an eval line's numbers cover: eval.py evaluates the whole split, so a run whose
    train.eval_batches stops short of it prints other numbers than eval.py does."""
    what = (f"({result['batches']} batches, {result['tokens']:,.0f} tokens of "
            f"{config.data.eval_split}")
    if result["batches"] < t.eval_batches:
      return what + ": the whole split, as eval.py evaluates it)"
    return what + f": train.eval_batches={t.eval_batches}; eval.py evaluates the whole split)"

  # Non-finite steps (train.on_nonfinite): counted on device, read where the loop syncs
  # anyway (log steps, checkpoints, the end), so no step waits for the host.
  replicated = sharding.replicated(ts.mesh)
  prev = writer.last("train") or {}
  skipped_before = int(prev.get("nonfinite_total", 0))
  guard = tuple(jax.device_put(np.int32(v), replicated) for v in (0, -1, start))
  seen = 0   # skipped steps already reported

  def check_nonfinite(step) -> int:
    """Stops (train.on_nonfinite=stop) or reports newly skipped steps; returns the count."""
    nonlocal seen
    count, first, _ = (int(v) for v in jax.device_get(guard))
    if count and t.on_nonfinite == "stop":
      ckpt.wait()
      raise NonFiniteError(
          f"step {first}: non-finite loss or gradient norm (train.on_nonfinite=stop); no update "
          f"was applied and nothing after step {ckpt.latest_step() or 0} saved -- lower "
          "--config.optim.lr or set --config.optim.grad_clip, or --config.train.on_nonfinite=skip "
          "to drop such steps")
    if count > seen:
      progress.write(f"step {step}: skipped {count - seen} non-finite step(s) since the last "
                     f"report, first at step {first} ({count + skipped_before} in all; "
                     "train.on_nonfinite=skip)")
      seen = count
    return count

  last, window_start, window_steps = {}, time.perf_counter(), 0
  eval_result = None
  step = start
  with jax.set_mesh(ts.mesh), nnx.logical_axis_rules(ts.rules):
    while step < t.steps:
      if t.profile and step == t.profile_start:
        jax.profiler.start_trace(paths.join(workdir, "profile"))
      batch = state_lib.device_batch(next(train_iter), ts.mesh)
      ts.state, metrics = train_step(ts.state, batch)
      guard = _count_nonfinite(guard, metrics["nonfinite"])
      step += 1
      done[0] += 1
      window_steps += 1
      if t.profile and step == t.profile_start + t.profile_steps:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      if step % t.log_every == 0 or step == t.steps:
        count = check_nonfinite(step)
        last = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}
        elapsed = time.perf_counter() - window_start
        last["tokens_per_sec"] = window_steps * tokens_per_step / elapsed
        last["nonfinite_total"] = count + skipped_before
        writer.write(step, last)
        progress.update(window_steps, loss=last["loss"], tok_s=f"{last['tokens_per_sec']:.0f}")
        window_start, window_steps = time.perf_counter(), 0
      if step == start + 1:
        # The first step compiled (and built the CPU kernels): the rate and tokens/s start
        # after it, so they say what the remaining steps take.
        jax.block_until_ready(metrics)
        progress.started(step)
        window_start, window_steps = time.perf_counter(), 0
      if t.eval_every and step % t.eval_every == 0 and step < t.steps:
        eval_result = run_eval(step)
        progress.write(f"step {step}: eval loss {eval_result['loss']:.4f} {eval_extent(eval_result)}")
      # Hosts agree on a SIGTERM (the save is collective); multi-host, only at log steps,
      # since agreeing costs a host sync.
      if jax.process_count() == 1 or step % t.log_every == 0:
        stop = _hosts_agree(preempt.requested) or ckpt.reached_preemption(step)
      else:
        stop = False
      if step % t.checkpoint_every == 0 or step == t.steps or stop:
        check_nonfinite(step)
        ckpt.save(step, ts.state, train_iter.get_state(), force=stop)
      if stop:
        progress.write(f"preemption at step {step}: checkpoint saved, exiting")
        break
    progress.close()   # before the final eval and export (a preempted run's bar ends here)
    ckpt.wait()
    if step >= t.steps:
      check_nonfinite(step)
      eval_result = run_eval(step, replace=True)
      progress.write(f"step {step}: eval loss {eval_result['loss']:.4f} "
                     f"ppl {eval_result['perplexity']:.3f} bpb {eval_result['bits_per_byte']:.4f} "
                     f"{eval_extent(eval_result)}")
      export_dir = paths.join(workdir, "export")
      if not (reevaluate and start >= t.steps and paths.isdir(paths.join(export_dir, "model"))):
        ckpt_lib.export(export_dir, ts.state[0], config, step=step)
  progress.close()
  ckpt.close()
  writer.close()
  return {"train": last, "eval": perplexity.scalars(eval_result) if eval_result else {},
          "step": step, "preempted": step < t.steps, "finished": False}
