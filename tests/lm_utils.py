"""Train the tiny LM on a fixed synthetic stream (no files): for layer tests."""

from __future__ import annotations

import numpy as np

from moejax import config as config_lib
from moejax.training import state as state_lib


def tiny_config(**model_overrides):
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=32, d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64))
  c.model.update(model_overrides)
  c.data.seq_len, c.data.batch_size = 16, 8
  c.optim.warmup_steps, c.optim.lr = 2, 1e-2
  c.mesh.data = 1
  return c


def synthetic_batches(config, seed: int = 0):
  """Sequences of a fixed noisy repeating pattern, so loss can fall fast."""
  rng = np.random.default_rng(seed)
  b, l, v = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  pattern = rng.integers(2, v, size=7)
  while True:
    start = rng.integers(0, 7, size=(b, 1))
    seq = pattern[(start + np.arange(l + 1)) % 7]
    noise = rng.random((b, l + 1)) < 0.05
    seq = np.where(noise, rng.integers(2, v, size=(b, l + 1)), seq).astype(np.int32)
    yield {"inputs": seq[:, :-1], "targets": seq[:, 1:],
           "weights": np.ones((b, l), np.float32), "num_bytes": np.ones((b, l), np.float32)}


def train_losses(config, steps: int, mesh=None) -> list[float]:
  """Per-step training losses of ``config`` on the synthetic stream."""
  config.train.steps = steps
  config_lib.validate(config)
  ts = state_lib.create_train_state(config, mesh)
  step = state_lib.make_train_step(ts)
  losses = []
  for _, batch in zip(range(steps), synthetic_batches(config)):
    ts.state, metrics = step(ts.state, state_lib.device_batch(batch, ts.mesh))
    losses.append(float(metrics["loss"]))
  return losses
