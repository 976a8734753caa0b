"""The training loop: data -> sharded batch -> step -> metrics, checkpoints, export.

Re-running with the same workdir resumes from the latest checkpoint (model,
optimizer, step and data-iterator position). SIGTERM (preemption) saves a
checkpoint at the next step boundary and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from moejax import config as config_lib
from moejax import data, paths, sharding
from moejax.errors import ConfigError, config_error
from moejax.evaluation import perplexity
from moejax.training import checkpoint as ckpt_lib
from moejax.training import state as state_lib
from moejax.training.writers import MetricWriter, Progress

log = logging.getLogger(__name__)


def model_flops_per_token(config: ml_collections.ConfigDict, num_params_active: int) -> float:
  """Forward+backward FLOPs per token: 6 * active params + attention (6 * L * T * d)."""
  m = config.model
  attn = 6 * m.num_layers * config.data.seq_len * m.num_heads * m.head_dim
  return 6.0 * num_params_active + attn


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


def _check_workdir(workdir: str, config, has_checkpoint: bool) -> None:
  """Refuses to resume a workdir whose model or data config differs (nothing is touched)."""
  path = paths.join(workdir, "config.json")
  if has_checkpoint and paths.exists(path):
    ckpt_lib.check_compatible(paths.read_json(path), config, f"--workdir={workdir}")


def _check_batch_layout(config, mesh) -> None:
  """The global batch must split evenly over the batch shards, and each process must own
  whole shards (its rows are read from its own part of the data)."""
  sh = sharding.batch_sharding(mesh)
  shards = mesh.shape["data"] * mesh.shape["expert"]
  b = config.data.batch_size
  if b % shards:
    raise config_error("data.batch_size", b, f"must be a multiple of mesh data x expert = {shards}",
                       f"set --config.data.batch_size={max(shards, b - b % shards)}")
  local = {idx[0].start for idx in sh.addressable_devices_indices_map((b, 1)).values()}
  if len(local) * jax.process_count() != shards:
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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``; returns the last train and eval metrics."""
  workdir = paths.absolute(workdir)
  config, tokenizer = prepare_config(config)
  t = config.train

  ts = state_lib.create_train_state(config)
  _check_batch_layout(config, ts.mesh)
  paths.makedirs(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  _check_workdir(workdir, config, ckpt.latest_step() is not None)
  train_iter = data.make_train_iterator(config.data, tokenizer, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  start = 0
  if ckpt.latest_step() is not None:
    ts.state, data_state = ckpt.restore(ts.state, ts.shardings)
    train_iter.set_state(data_state)
    start = ts.step
    log.info("resumed from step %d", start)
  if jax.process_index() == 0:
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

  def run_eval(step):
    batches = data.make_eval_iterator(config.data, tokenizer, max_batches=t.eval_batches,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    result = perplexity.evaluate(eval_step, ts.state[0], batches, ts.mesh)
    writer.write(step, perplexity.scalars(result), split="eval")
    return result

  last, window_start, window_steps = {}, time.perf_counter(), 0
  eval_result = None
  step = start
  with jax.set_mesh(ts.mesh), nnx.logical_axis_rules(ts.rules):
    while step < t.steps:
      if t.profile and step == t.profile_start:
        jax.profiler.start_trace(paths.join(workdir, "profile"))
      batch = state_lib.device_batch(next(train_iter), ts.mesh)
      ts.state, metrics = train_step(ts.state, batch)
      step += 1
      window_steps += 1
      if t.profile and step == t.profile_start + t.profile_steps:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      if step % t.log_every == 0 or step == t.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        last["tokens_per_sec"] = window_steps * tokens_per_step / elapsed
        writer.write(step, last)
        progress.update(window_steps, loss=last["loss"], tok_s=f"{last['tokens_per_sec']:.0f}")
        window_start, window_steps = time.perf_counter(), 0
      if t.eval_every and step % t.eval_every == 0 and step < t.steps:
        eval_result = run_eval(step)
        progress.write(f"step {step}: eval loss {eval_result['loss']:.4f}")
      # Hosts agree on a SIGTERM (the save is collective); multi-host, only at log steps,
      # since agreeing costs a host sync.
      if jax.process_count() == 1 or step % t.log_every == 0:
        stop = _hosts_agree(preempt.requested) or ckpt.reached_preemption(step)
      else:
        stop = False
      if step % t.checkpoint_every == 0 or step == t.steps or stop:
        ckpt.save(step, ts.state, train_iter.get_state(), force=stop)
      if stop:
        progress.write(f"preemption at step {step}: checkpoint saved, exiting")
        break
    ckpt.wait()
    if step >= t.steps:
      eval_result = run_eval(step)
      progress.write(f"step {step}: eval loss {eval_result['loss']:.4f} "
                     f"ppl {eval_result['perplexity']:.3f} bpb {eval_result['bits_per_byte']:.4f}")
      ckpt_lib.export(paths.join(workdir, "export"), ts.state[0], config)
  progress.close()
  ckpt.close()
  writer.close()
  return {"train": last, "eval": perplexity.scalars(eval_result) if eval_result else {},
          "step": step, "preempted": step < t.steps}
