"""Tokenizers: a byte-level default (no files) and SentencePiece models.

Every tokenizer reserves id 0 for padding and has an end-of-sequence id that
the packer appends to each document. ``token_bytes`` says how many UTF-8 bytes
each id stands for, so that losses can be reported in bits per byte, a unit
that does not depend on the tokenizer.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np
from etils import epath

from moejax.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
  """What the input pipeline needs from a tokenizer."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  def encode(self, text: str) -> np.ndarray:
    """``text`` -> int32 [T] ids, without EOS."""

  def decode(self, ids) -> str:
    """int [T] ids -> text; special ids are dropped."""

  def token_bytes(self, ids) -> np.ndarray:
    """int [...] ids -> int32 [...] UTF-8 bytes per id (0 for special ids)."""


class ByteTokenizer:
  """UTF-8 bytes as tokens: id = byte + 2, with 0 = pad and 1 = eos (vocab 258)."""

  OFFSET = 2

  vocab_size = 256 + OFFSET
  pad_id = 0
  eos_id = 1

  def encode(self, text: str) -> np.ndarray:
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return raw.astype(np.int32) + self.OFFSET

  def decode(self, ids) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.OFFSET) & (ids < self.vocab_size)]
    return (ids - self.OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def token_bytes(self, ids) -> np.ndarray:
    return (np.asarray(ids) >= self.OFFSET).astype(np.int32)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """A SentencePiece ``.model`` file.

  The model must have been trained with ``pad_id=0`` (SentencePiece's default
  pad id is -1 = none, which we reject) so that padding never collides with a
  real piece. The pickled form carries the serialized model, not the path, so
  grain worker processes and other hosts need no access to the file.
  """

  def __init__(self, path: str):
    self._path = str(path)
    try:
      proto = epath.Path(self._path).read_bytes()  # local or gs://
    except OSError as e:
      raise DataError(f"config.data.tokenizer={self._path!r}: cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:100] if str(e) else ''}); check its permissions or "
                      "set --config.data.tokenizer to another .model file, or \"byte\"") from None
    if not proto:
      raise DataError(f"config.data.tokenizer={self._path!r}: empty file, not a SentencePiece "
                      "model; set --config.data.tokenizer to a .model file written by spm_train, "
                      "or \"byte\"")
    self._load(proto)

  def _load(self, proto: bytes) -> None:
    import sentencepiece as spm
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
      if self._sp.get_piece_size() < 3:
        raise RuntimeError(f"{self._sp.get_piece_size()} pieces")
    except (RuntimeError, OSError, ValueError, TypeError) as e:
      cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(
          f"config.data.tokenizer={self._path!r}: not a SentencePiece model ({cause[:120]}); "
          "set --config.data.tokenizer to a .model file written by spm_train, or \"byte\"") from None
    if self._sp.pad_id() != 0 or self._sp.eos_id() < 0:
      raise DataError(
          f"config.data.tokenizer={self._path!r}: SentencePiece model has pad_id="
          f"{self._sp.pad_id()}, eos_id={self._sp.eos_id()}; need pad_id=0 and an eos "
          "(train it with --pad_id=0 --unk_id=1 --bos_id=-1 --eos_id=2)")
    # Bytes per id, computed once: pieces use U+2581 for a space; byte-fallback
    # pieces "<0xAB>" are one byte; control and unknown pieces count 0. With
    # add_dummy_prefix (SentencePiece's default) the first piece of a document
    # counts the one space SentencePiece prepended: +1 byte per document.
    n = self._sp.get_piece_size()
    nbytes = np.zeros(n, np.int32)
    for i in range(n):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        nbytes[i] = 1
      else:
        nbytes[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self._nbytes = nbytes

  def __getstate__(self):
    return {"path": self._path, "proto": self._proto}

  def __setstate__(self, state):
    self._path = state["path"]
    self._load(state["proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode([i for i in ids if i != self.pad_id])

  def token_bytes(self, ids) -> np.ndarray:
    return self._nbytes[np.asarray(ids)]

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._path!r})"


def load_tokenizer(spec: str) -> Tokenizer:
  """``config.data.tokenizer`` -> a tokenizer: "byte" or a SentencePiece ``.model`` path
  (local, or any ``etils.epath`` URL such as ``gs://bucket/spm.model``)."""
  if spec == "byte":
    return ByteTokenizer()
  path = spec if "://" in spec else os.path.expanduser(spec)
  if epath.Path(path).is_dir():
    raise DataError(
        f"config.data.tokenizer={spec!r}: a directory, not a file (use \"byte\" or the path of "
        "a SentencePiece .model file in it, e.g. --config.data.tokenizer=DIR/spm.model)")
  if not epath.Path(path).is_file():
    raise DataError(
        f"config.data.tokenizer={spec!r}: no such file (use \"byte\" or the path of a "
        "SentencePiece .model file, e.g. --config.data.tokenizer=/path/spm.model)")
  return SentencePieceTokenizer(path)
