"""Input pipeline: TFDS (array_record) sources, tokenizers, packing, grain loaders."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "dataset": "local_text",   # any TFDS text dataset name (e.g. "c4/en:3.1.0", "lm1b"), read by tfds.data_source
      "data_dir": "",            # TFDS data_dir; "": ~/tensorflow_datasets (or $TFDS_DATA_DIR)
      "text_dir": "",            # local_text only: directory of text files; "": the Python standard library sources
      "text_key": "text",        # feature holding the text
      "train_split": "train",
      "eval_split": "validation",
      "tokenizer": "byte",       # "byte" or a path to a SentencePiece .model file
      "seq_len": 128,
      "batch_size": 16,          # global batch (sequences per step, over all processes)
      "shuffle": True,
      "seed": 0,
      "worker_count": 0,         # grain worker processes; 0: in the main process
  })


def validate(cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  from moejax.errors import ConfigError
  if cfg.seq_len < 2:
    raise ConfigError(f"config.data.seq_len={cfg.seq_len!r}: must be >= 2 (set --config.data.seq_len=128)")
  if cfg.batch_size < 1:
    raise ConfigError(f"config.data.batch_size={cfg.batch_size!r}: must be >= 1 (set --config.data.batch_size=16)")
  if cfg.worker_count < 0:
    raise ConfigError(f"config.data.worker_count={cfg.worker_count!r}: must be >= 0 (set --config.data.worker_count=0)")
