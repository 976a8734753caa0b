"""Input pipeline: TFDS (array_record) sources, tokenizers, packing, grain loaders.

  tokenizers.py  Tokenizer protocol, ByteTokenizer (default), SentencePieceTokenizer
  local_text.py  the ``local_text`` TFDS builder over a directory of text files
  pipeline.py    make_source, make_train_iterator, make_eval_iterator
  eval_sets.py   the split and text feature of named evaluation sets (LAMBADA: test, passage)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import ml_collections

if TYPE_CHECKING:
  from moejax.data.pipeline import make_eval_iterator, make_source, make_train_iterator
  from moejax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                      load_tokenizer)

# Loaded on first use: grain + TFDS are slow to import, and the config module
# imports this package only for default_config/validate.
_LAZY = {
    "make_eval_iterator": "pipeline", "make_source": "pipeline", "make_train_iterator": "pipeline",
    "ByteTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
    "Tokenizer": "tokenizers", "load_tokenizer": "tokenizers",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"moejax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'moejax.data' has no attribute {name!r}")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "dataset": "local_text",   # any TFDS text dataset name (e.g. "c4/en:3.1.0", "lm1b"), read by tfds.data_source
      "data_dir": "",            # TFDS data_dir; "": ~/tensorflow_datasets (or $TFDS_DATA_DIR)
      "text_dir": "",            # local_text only: directory of text files; "": the Python standard library sources
      "text_glob": "",           # local_text only: file name pattern; "": *.py for the stdlib, * elsewhere
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
  from moejax.errors import config_error
  if cfg.seq_len < 2:
    raise config_error("data.seq_len", cfg.seq_len, "must be >= 2", "set --config.data.seq_len=128")
  if cfg.batch_size < 1:
    raise config_error("data.batch_size", cfg.batch_size, "must be >= 1",
                       "set --config.data.batch_size=16")
  if cfg.worker_count < 0:
    raise config_error("data.worker_count", cfg.worker_count, "must be >= 0",
                       "set --config.data.worker_count=0")
  if not cfg.dataset.strip():
    raise config_error("data.dataset", cfg.dataset, "must name a TFDS dataset",
                       "set --config.data.dataset=local_text")
  if not cfg.tokenizer.strip():
    raise config_error("data.tokenizer", cfg.tokenizer,
                       'must be "byte" or a SentencePiece .model path',
                       "set --config.data.tokenizer=byte")
  if not cfg.text_key.strip():
    raise config_error("data.text_key", cfg.text_key, "must name the text feature",
                       "set --config.data.text_key=text")
  if not 0 <= cfg.seed < 2**32:
    raise config_error("data.seed", cfg.seed, "must be in [0, 2**32)", "set --config.data.seed=0")
  if cfg.text_dir and cfg.dataset != "local_text":
    raise config_error("data.text_dir", cfg.text_dir,
                       f"only used by dataset local_text, not {cfg.dataset!r}",
                       "unset it or set --config.data.dataset=local_text")


def check_split(cfg: ml_collections.ConfigDict, split: str, dataset: str | None = None,
                samples: int = 64) -> None:
  """Raises DataError (one line) unless ``split`` exists and holds usable text.

  Looks at up to ``samples`` records spread over the split: if none has a non-blank text
  (a directory of empty files, records of only whitespace), training would learn
  end-of-sequence tokens alone, so it is refused before it starts.
  """
  from moejax.data.pipeline import make_source
  from moejax.errors import DataError
  name = dataset or cfg.dataset
  src = make_source(cfg, split, name)
  n = len(src)
  if n == 0:
    raise DataError(f"config.data.dataset={name!r}: split {split!r} has no records (point "
                    "--config.data.dataset / text_dir at data with text)")
  for i in sorted({int(k * n / min(n, samples)) for k in range(min(n, samples))}):
    record = src[i]
    if cfg.text_key not in record:
      raise DataError(f"config.data.text_key={cfg.text_key!r}: not a feature of {name!r} "
                      f"(it has {sorted(record)}; set --config.data.text_key)")
    text = record[cfg.text_key]
    if isinstance(text, (bytes, bytearray)) or type(text).__name__ == "bytes_":
      text = bytes(text).decode("utf-8", errors="replace")
    if str(text).strip():
      return
  where = f"config.data.text_dir={cfg.text_dir!r}" if name == "local_text" else f"config.data.dataset={name!r}"
  raise DataError(f"{where}: no usable text in split {split!r} ({min(n, samples)} of {n} records "
                  "looked at, all empty or blank); point it at data with text")


__all__ = [
    "ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "check_split", "default_config",
    "load_tokenizer",
    "make_eval_iterator", "make_source", "make_train_iterator", "validate",
]
