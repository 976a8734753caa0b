"""grain pipelines: TFDS source -> tokens -> packed windows -> numpy batches.

Packing: each document is tokenized and gets EOS appended; the token stream is
cut into windows of ``L + 1`` tokens (grain's concat-then-split), and a window
``w`` gives ``inputs = w[:-1]``, ``targets = w[1:]``. A batch is a dict

  inputs     int32   [B_local, L]  token ids (pad 0)
  targets    int32   [B_local, L]  next token ids
  weights    float32 [B_local, L]  1 where the target is a real token, else 0
  num_bytes  float32 [B_local, L]  UTF-8 bytes of each target x weights (bits/byte)
  segment_ids int32  [B_local, L]  document of each input token within its row (1, 2, ...;
                                   0 = padding): attention stays inside a document
  positions  int32   [B_local, L]  position of each input token in its document (RoPE),
                                   restarting at 0 where a document starts in the window

with ``L = seq_len`` and ``B_local = batch_size // process_count``.

Training: each process reads the records ``process_index::process_count``.
Within a process, batch row ``r`` is fed by its own stream of records
(``r::B_local`` of the process's records, or fewer streams when there are fewer
records), so one long document does not fill a whole batch with its
neighbouring windows. Each stream is shuffled from ``seed`` with a new order
every epoch and repeats forever. The iterator is grain's: ``get_state()`` (a
small JSON-able dict) and ``set_state()`` resume it exactly.

Evaluation: one pass, in record order, no shuffle. Every process packs the
whole split and takes its rows of each global batch, so all processes yield
the same number of batches (no host waits on another at the last step) and
each token is scored exactly once over all processes; the last batch is
padded with ``weights = 0`` rows.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Iterator

from absl import flags
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain import experimental as gx

from moejax.data import local_text
from moejax.data.tokenizers import Tokenizer
from moejax.errors import DataError

Batch = dict[str, np.ndarray]

# Batches produced ahead in a background thread, overlapping the train step.
_PREFETCH_BATCHES = 2


def _section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Accepts the whole config or its ``data`` section."""
  return cfg.data if "data" in cfg and "seq_len" not in cfg else cfg


# ---------------------------------------------------------------- sources


def make_source(cfg, split: str, dataset: str | None = None):
  """A random-access source (``len``, ``[i]`` -> feature dict) of one split.

  ``dataset`` defaults to ``cfg.dataset``. ``local_text`` is built on first use
  (offline, into ``cfg.data_dir`` or the TFDS default); any other TFDS name is
  read with ``tfds.data_source`` and must already be prepared as array_record:
  nothing is ever downloaded. Raises DataError (one line) otherwise.

  Multi-host: with a shared ``data_dir``, build ``local_text`` once before
  starting the hosts (e.g. run one process first); concurrent first builds of
  the same directory race on the final rename.
  """
  cfg = _section(cfg)
  name = dataset or cfg.dataset
  data_dir = cfg.data_dir or None
  if name == "local_text":
    b = local_text.prepare(local_text.builder(cfg.text_dir, cfg.text_glob, data_dir))
    _check_split(split, list(b.info.splits), name)
    return b.as_data_source(split=split)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            try_gcs=False)
  except ValueError as e:
    if "Unknown split" in str(e):
      raise DataError(f"config.data.dataset={name!r} has no split {split!r} "
                      f"({str(e).splitlines()[0]}; set --config.data.train_split / "
                      "eval_split)") from None
    cause = str(e).splitlines()[0]
  except (NotImplementedError, AssertionError, FileNotFoundError, KeyError) as e:
    cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  where = f"config.data.data_dir={cfg.data_dir!r}" + (
      "" if data_dir else " (= $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  raise DataError(
      f"config.data.dataset={name!r}: not prepared as array_record in {where} "
      f"({cause[:120]}); prepare it with `tfds build {name.split(':')[0]} "
      f"--data_dir=DIR --file_format=array_record` on a machine with network, or point "
      f"--config.data.data_dir at a copy (e.g. a GCS bucket); moejax never downloads") from None


def _check_split(split: str, splits: list[str], name: str) -> None:
  base = split.split("[")[0]
  if base not in splits:
    raise DataError(f"config.data.dataset={name!r} has no split {split!r} (it has {sorted(splits)}; "
                    "set --config.data.train_split / eval_split)")


# ---------------------------------------------------------------- transforms


class _Tokenize(grain.transforms.Map):
  """record -> {"tokens": int32 [T + 1]}: the text's ids followed by EOS."""

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self._tok = tokenizer
    self._key = text_key

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    text = record[self._key]
    if isinstance(text, (bytes, np.bytes_)):
      text = bytes(text).decode("utf-8", errors="replace")
    ids = self._tok.encode(str(text))
    return {"tokens": np.append(ids, np.int32(self._tok.eos_id)).astype(np.int32)}


class _Shift(grain.transforms.Map):
  """A packed window (tokens + segment ids, [L + 1]) -> one example of [L] arrays."""

  def __init__(self, tokenizer: Tokenizer):
    self._tok = tokenizer

  def map(self, packed: dict[str, np.ndarray]) -> Batch:
    w, seg = packed["tokens"], packed["tokens_segment_ids"]
    targets = w[1:]
    weights = (seg[1:] > 0).astype(np.float32)  # segment id 0 = padding
    return {
        "inputs": w[:-1],
        "targets": targets,
        "weights": weights,
        "num_bytes": self._tok.token_bytes(targets).astype(np.float32) * weights,
        # The model masks attention to the input token's own document and restarts RoPE
        # positions there (the target of a document's EOS is the next document's first
        # token: predicted from the EOS alone, as a document start).
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": packed["tokens_positions"][:-1].astype(np.int32),
    }


def _pack(ds: grain.MapDataset, tokenizer: Tokenizer, cfg) -> grain.IterDataset:
  """Records -> examples of [L] arrays (see module doc)."""
  ds = ds.map(_Tokenize(tokenizer, cfg.text_key))
  # Threads here would be one pool per stream; the batch-level thread below
  # does the overlapping, and worker_count > 0 the parallel tokenizing.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it = gx.ConcatThenSplitIterDataset(it, length_struct={"tokens": cfg.seq_len + 1})
  return it.map(_Shift(tokenizer))


def _derive_seed(*parts: int) -> int:
  digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:4], "little")


def _local_batch(cfg, process_count: int) -> int:
  if process_count < 1 or cfg.batch_size % process_count:
    raise DataError(
        f"config.data.batch_size={cfg.batch_size}: must be divisible by the process count "
        f"{process_count} (set --config.data.batch_size to a multiple of {process_count})")
  return cfg.batch_size // process_count


def _records(cfg, src, split: str, dataset: str) -> grain.MapDataset:
  if len(src) == 0:
    raise DataError(f"config.data.dataset={dataset!r}: split {split!r} is empty")
  first = src[0]
  if cfg.text_key not in first:
    raise DataError(f"config.data.text_key={cfg.text_key!r}: not a feature of {dataset!r} "
                    f"(it has {sorted(first)}; set --config.data.text_key)")
  return grain.MapDataset.source(src)


def _finish(it: grain.IterDataset, cfg) -> grain.IterDataset:
  if cfg.worker_count > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks)
    # they are unparsed, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return gx.ThreadPrefetchIterDataset(it, prefetch_buffer_size=_PREFETCH_BATCHES)


# ---------------------------------------------------------------- iterators


def make_train_iterator(cfg, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this process's training batches (see module doc).

  Deterministic from ``cfg.seed`` (and ``worker_count``); ``get_state()`` is a
  JSON-serialisable dict and ``set_state(state)`` on a fresh iterator resumes
  with exactly the batches the original would have yielded next.
  """
  cfg = _section(cfg)
  b_local = _local_batch(cfg, process_count)
  name = cfg.dataset
  records = _records(cfg, make_source(cfg, cfg.train_split), cfg.train_split, name)
  records = records[process_index::process_count]
  if len(records) == 0:
    raise DataError(f"config.data.dataset={name!r}: split {cfg.train_split!r} has fewer records "
                    f"than the {process_count} processes; use a bigger dataset")
  num_streams = min(b_local, len(records))
  streams = []
  for k in range(num_streams):
    ds = records[k::num_streams]
    if cfg.shuffle:
      ds = ds.shuffle(seed=_derive_seed(cfg.seed, process_index, k))
    streams.append(_pack(ds.repeat(), tokenizer, cfg))
  it = gx.InterleaveIterDataset(streams, cycle_length=num_streams)
  it = it.batch(b_local, drop_remainder=True)
  return iter(_finish(it, cfg))


def make_eval_iterator(cfg, tokenizer: Tokenizer, *, dataset: str | None = None,
                       split: str | None = None, max_batches: int = 0,
                       process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """One pass over a split (default ``cfg.eval_split``) in fixed-shape batches.

  The last batch is padded with ``weights = num_bytes = 0`` rows;
  ``max_batches > 0`` stops after that many batches.
  """
  cfg = _section(cfg)
  b_local = _local_batch(cfg, process_count)
  name, split = dataset or cfg.dataset, split or cfg.eval_split
  records = _records(cfg, make_source(cfg, split, name), split, name)
  it = _pack(records, tokenizer, cfg)
  lo = process_index * b_local
  it = it.batch(cfg.batch_size, drop_remainder=False,
                batch_fn=functools.partial(_pad_batch, size=cfg.batch_size, lo=lo, n=b_local))
  if max_batches > 0:
    it = gx.LimitIterDataset(it, count=max_batches)
  return iter(_finish(it, cfg))


def _pad_batch(rows: list[Batch], size: int, lo: int, n: int) -> Batch:
  """Stacks ``rows`` into a [size, L] global batch padded with zeros; keeps rows [lo, lo+n)."""
  out = {}
  for key in rows[0]:
    stacked = np.zeros((size,) + rows[0][key].shape, rows[0][key].dtype)
    stacked[:len(rows)] = np.stack([r[key] for r in rows])
    out[key] = stacked[lo:lo + n]
  return out
