"""moejax.data: tokenizers, the local_text builder, packing and grain iterators."""

import io
import json
import os
import pickle
import re
import types

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
from etils import epath

from moejax import data
from moejax.config import default_config, validate
from moejax.data import local_text, tokenizers
from moejax.data.tokenizers import ByteTokenizer
from moejax.errors import ConfigError, DataError

NUM_DOCS = 12


@pytest.fixture
def text_dir(tmp_path):
  """12 small text files "docNN ..." (one Latin-1, one nested) plus files to skip."""
  d = tmp_path / "texts"
  (d / "sub").mkdir(parents=True)
  (d / "tests").mkdir()
  (d / ".git").mkdir()
  for i in range(NUM_DOCS - 1):
    words = " ".join(f"w{i}x{j}" for j in range(3 + 4 * i))
    where = d / "sub" if i % 4 == 0 else d
    (where / f"f{i:02d}.txt").write_text(f"doc{i:02d} {words}\n")
  (d / f"f{NUM_DOCS - 1:02d}.txt").write_bytes(b"doc11 caf\xe9 latin-1\n")  # not UTF-8
  (d / "blob.bin").write_bytes(b"\x00\x01\x02 binary")                      # skipped: NUL
  (d / ".hidden.txt").write_text("hidden\n")                                # skipped: hidden
  (d / "tests" / "t.txt").write_text("test dir\n")                          # skipped: test dir
  (d / ".git" / "HEAD").write_text("ref\n")                                 # skipped: hidden dir
  return str(d)


def make_cfg(tmp_path, text_dir, **kw):
  cfg = default_config().data
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.text_dir = text_dir
  cfg.seq_len = 16
  cfg.batch_size = 4
  cfg.update(kw)
  return cfg


def docs_of(batch, key="inputs"):
  """The docNN markers seen in a batch (byte tokenizer)."""
  tok = ByteTokenizer()
  return {int(m) for row in batch[key] for m in re.findall(r"doc(\d\d)", tok.decode(row))}


def stream_tokens(cfg, split, tok):
  """The packed token stream of a split in record order: docs + EOS, concatenated."""
  src = data.make_source(cfg, split)
  return np.concatenate([np.append(tok.encode(src[i]["text"].decode("utf-8", "replace")),
                                   tok.eos_id) for i in range(len(src))])


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_bytes():
  tok = data.load_tokenizer("byte")
  assert isinstance(tok, data.Tokenizer)
  text = "héllo ✓ world"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 2 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([ids, [tok.eos_id, tok.pad_id]])) == text
  assert tok.token_bytes(ids).sum() == len(text.encode("utf-8"))
  np.testing.assert_array_equal(tok.token_bytes([[0, 1], [2, 257]]), [[0, 0], [1, 1]])
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 258)


def write_spm_model(path):
  lines = [f"The quick brown fox {i} jumps over the lazy dog; judge my vow {7 * i}."
           for i in range(200)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=300, pad_id=0, unk_id=1,
      bos_id=-1, eos_id=2, byte_fallback=True, add_dummy_prefix=False,
      normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return path


def test_sentencepiece_tokenizer(tmp_path):
  path = write_spm_model(tmp_path / "spm.model")
  tok = data.load_tokenizer(str(path))
  assert isinstance(tok, data.SentencePieceTokenizer) and isinstance(tok, data.Tokenizer)
  assert (tok.pad_id, tok.eos_id) == (0, 2) and tok.vocab_size >= 259
  text = "The lazy fox, héllo ✓"  # é and ✓ go through byte fallback
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert tok.decode(ids) == text
  assert tok.token_bytes(ids).sum() == len(text.encode("utf-8"))
  np.testing.assert_array_equal(tok.token_bytes([0, 1, 2]), [0, 0, 0])
  clone = pickle.loads(pickle.dumps(tok))  # grain workers get a copy; the file need not exist
  path.unlink()
  np.testing.assert_array_equal(clone.encode(text), ids)


def test_load_tokenizer_missing_file(tmp_path):
  with pytest.raises(DataError, match=r"config\.data\.tokenizer=.*no such file") as e:
    data.load_tokenizer(str(tmp_path / "nope.model"))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"not a sentencepiece model\n", b"", b"\x0a\x00"])
def test_load_tokenizer_corrupt_file_is_one_line_data_error(tmp_path, content):
  path = tmp_path / "bad.model"
  path.write_bytes(content)
  with pytest.raises(DataError, match=r"^config\.data\.tokenizer='.*bad\.model': (empty file, )?not a "
                                      r"SentencePiece model.*set --config\.data\.tokenizer") as e:
    data.load_tokenizer(str(path))
  assert "\n" not in str(e.value)


def test_load_tokenizer_reads_through_epath(tmp_path, monkeypatch):
  """A gs:// model path reaches etils.epath unchanged (no os.path / open on it)."""
  local = write_spm_model(tmp_path / "spm.model")
  url = "gs://bucket/tok/spm.model"
  seen = []

  def fake_path(p):
    seen.append(str(p))
    return epath.Path(local if str(p) == url else p)

  monkeypatch.setattr(tokenizers, "epath", types.SimpleNamespace(Path=fake_path))
  tok = data.load_tokenizer(url)
  assert seen and set(seen) == {url}
  assert repr(tok) == f"SentencePieceTokenizer({url!r})" and tok.eos_id == 2
  # A local path is an epath-compatible string too (read through the same code).
  assert data.load_tokenizer(str(local)).vocab_size == tok.vocab_size
  assert seen[-1] == str(local)


# ---------------------------------------------------------------- local_text


def test_local_text_split_is_deterministic(text_dir):
  cfg = local_text.make_config(text_dir)
  assert cfg == local_text.make_config(text_dir) and cfg.name == local_text.make_config(text_dir).name
  files = list(cfg.files)
  assert len(files) == NUM_DOCS + 1  # the 12 docs + blob.bin (skipped at build time)
  assert not any(f.startswith((".", "tests/")) or "/." in f for f in files)
  split = local_text.split_files(files)
  assert split == local_text.split_files(list(reversed(files)))
  train, val = set(split["train"]), set(split["validation"])
  assert train and val and not train & val and train | val == set(files)
  with pytest.raises(DataError, match="config.data.text_dir"):
    local_text.split_files(["only.txt"])


def test_local_text_config_tracks_directory_and_edits(tmp_path, text_dir):
  name = local_text.make_config(text_dir).name
  other = tmp_path / "other"
  other.mkdir()
  (other / "a.txt").write_text("a")
  (other / "b.txt").write_text("b")
  assert local_text.make_config(str(other)).name[:11] != name[:11]  # directory hash differs
  with open(os.path.join(text_dir, "f01.txt"), "a") as f:
    f.write("an edit\n")
  edited = local_text.make_config(text_dir).name
  assert edited[:11] == name[:11] and edited != name  # same dir, new listing: rebuilt
  with pytest.raises(DataError, match="config.data.text_dir"):
    local_text.make_config(str(tmp_path / "missing"))
  with pytest.raises(DataError, match=r"config.data.text_dir=.*1 file\(s\) match 'f00.txt'"):
    local_text.make_config(text_dir, "f00.txt")


def test_local_text_build_contents(tmp_path, text_dir):
  cfg = make_cfg(tmp_path, text_dir)
  got = {}
  for split in ("train", "validation"):
    src = data.make_source(cfg, split)
    for i in range(len(src)):
      got[src[i]["path"].decode()] = src[i]["text"].decode()
  assert len(got) == NUM_DOCS  # blob.bin skipped
  assert got["sub/f00.txt"].startswith("doc00 w0x0 ")
  assert got["f11.txt"] == "doc11 caf\ufffd latin-1\n"  # invalid UTF-8 replaced, not dropped
  for rel, text in got.items():
    if rel != "f11.txt":
      assert text == open(os.path.join(text_dir, rel)).read()
  with pytest.raises(DataError, match="no split 'test'"):
    data.make_source(cfg, "test")


def test_local_text_first_build_is_one_line(tmp_path, text_dir, capfd):
  """The first build says what it prepares and where, in one line; TFDS's download talk and
  progress bars are kept back. A second prepare says nothing."""
  data_dir = str(tmp_path / "tfds")
  local_text.prepare(local_text.builder(str(text_dir), "", data_dir))
  out, err = capfd.readouterr()
  assert out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"moejax: preparing the local_text dataset from {text_dir}")
  assert data_dir in lines[0]
  local_text.prepare(local_text.builder(str(text_dir), "", data_dir))
  assert capfd.readouterr() == ("", "")


def test_local_text_default_dir_is_stdlib(tmp_path):
  cfg = local_text.make_config("")
  assert cfg.text_dir == os.path.abspath(local_text.default_text_dir())
  assert cfg.pattern == "*.py" and "os.py" in cfg.files
  assert not any("site-packages" in f or "/test/" in f or f.startswith("test/") for f in cfg.files)
  # Building all of it takes ~0.3 s here (~730 files, ~12 MB of text).
  b = local_text.prepare(local_text.builder("", "", str(tmp_path / "tfds")))
  splits = {k: v.num_examples for k, v in b.info.splits.items()}
  assert splits["validation"] >= 1 and 0.01 < splits["validation"] / sum(splits.values()) < 0.06


# ---------------------------------------------------------------- pipeline


def test_eval_batches_pack_and_cover_every_token(tmp_path, text_dir):
  cfg = make_cfg(tmp_path, text_dir, eval_split="train")
  tok = ByteTokenizer()
  batches = list(data.make_eval_iterator(cfg, tok))
  for b in batches:
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((4, 16), "int32"), "targets": ((4, 16), "int32"),
        "weights": ((4, 16), "float32"), "num_bytes": ((4, 16), "float32"),
        "segment_ids": ((4, 16), "int32"), "positions": ((4, 16), "int32")}
    # positions count up inside a document and restart where the next one starts
    starts = np.diff(b["segment_ids"], axis=1) != 0
    inside = ~starts & (b["segment_ids"][:, 1:] > 0)          # padding (segment 0) excluded
    np.testing.assert_array_equal(b["positions"][:, 1:][inside], b["positions"][:, :-1][inside] + 1)
    assert (b["positions"][:, 1:][starts & (b["segment_ids"][:, 1:] > 0)] == 0).all()
    # targets are inputs shifted by one inside each window
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["num_bytes"], tok.token_bytes(b["targets"]) * b["weights"])
  assert batches[-1]["weights"][-1].sum() == 0  # the last batch is padded
  # every token but each window's first is a weighted target exactly once, in order
  stream = stream_tokens(cfg, "train", tok)
  expected = stream[np.arange(len(stream)) % (cfg.seq_len + 1) != 0]
  got = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(got, expected)
  assert sum(b["num_bytes"].sum() for b in batches) == tok.token_bytes(expected).sum()
  # two processes: same number of batches, each takes its half of every global batch
  parts = [list(data.make_eval_iterator(cfg, tok, process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(batches)
  for b, b0, b1 in zip(batches, *parts):
    np.testing.assert_array_equal(np.concatenate([b0["targets"], b1["targets"]]), b["targets"])
    np.testing.assert_array_equal(np.concatenate([b0["weights"], b1["weights"]]), b["weights"])
  assert len(list(data.make_eval_iterator(cfg, tok, max_batches=2))) == 2


def test_train_batches_are_full_and_deterministic(tmp_path, text_dir):
  cfg = make_cfg(tmp_path, text_dir)
  tok = ByteTokenizer()
  first = take(data.make_train_iterator(cfg, tok), 4)
  for b in first:
    assert b["inputs"].shape == b["weights"].shape == (4, 16)
    assert b["weights"].min() == 1  # training windows are always full
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  assert_batches_equal(first, take(data.make_train_iterator(cfg, tok), 4))
  other = take(data.make_train_iterator(make_cfg(tmp_path, text_dir, seed=1), tok), 4)
  assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))
  train_files = local_text.split_files(list(local_text.make_config(text_dir).files))["train"]
  train_docs = {int(os.path.basename(f)[1:3]) for f in train_files if f.endswith(".txt")}
  assert set().union(*map(docs_of, first)) <= train_docs


def test_train_reshuffles_each_epoch(tmp_path, text_dir):
  # batch_size=1: one stream, so the token stream is the records in shuffled order.
  cfg = make_cfg(tmp_path, text_dir, batch_size=1, seq_len=64)
  tok = ByteTokenizer()
  n_train = len(data.make_source(cfg, "train"))
  batches = take(data.make_train_iterator(cfg, tok), 100)  # ~3.5 epochs of ~1.9k tokens
  stream = np.concatenate([np.append(b["inputs"][0], b["targets"][0, -1]) for b in batches])
  docs = [int(m) for m in re.findall(r"^doc(\d\d)", tok.decode(stream), flags=re.M)]
  epochs = [docs[i:i + n_train] for i in range(0, 3 * n_train, n_train)]
  assert len(epochs[2]) == n_train
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch: every record once
  assert len({tuple(e) for e in epochs}) == 3                # in a new order each time


def test_train_state_round_trip(tmp_path, text_dir):
  cfg = make_cfg(tmp_path, text_dir)
  tok = ByteTokenizer()
  it = data.make_train_iterator(cfg, tok)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable, as a checkpoint stores it
  expected = take(it, 6)
  resumed = data.make_train_iterator(cfg, tok)
  take(resumed, 2)  # position must not matter
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)


def test_train_worker_process_gives_the_same_batches(tmp_path, text_dir):
  cfg = make_cfg(tmp_path, text_dir)
  tok = ByteTokenizer()
  expected = take(data.make_train_iterator(cfg, tok), 3)
  cfg.worker_count = 1  # one grain worker: the same pipeline, run in a child process
  it = data.make_train_iterator(cfg, tok)
  try:
    assert_batches_equal(take(it, 3), expected)
  finally:
    it.close()


def test_train_process_shards_are_disjoint(tmp_path, text_dir):
  cfg = make_cfg(tmp_path, text_dir)
  tok = ByteTokenizer()
  seen = []
  for p in range(2):
    batches = take(data.make_train_iterator(cfg, tok, process_index=p, process_count=2), 12)
    assert batches[0]["inputs"].shape == (2, 16)
    seen.append(set().union(*map(docs_of, batches)))
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  with pytest.raises(DataError, match=r"batch_size=4: must be divisible by the process count 3"):
    data.make_train_iterator(cfg, tok, process_count=3)


def test_generic_tfds_dataset_with_mock_data(tmp_path):
  cfg = make_cfg(tmp_path, "", dataset="lm1b", eval_split="test")
  tok = ByteTokenizer()
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    src = data.make_source(cfg, "train")
    assert len(src) == 10 and "text" in src[0]
    b = next(data.make_train_iterator(cfg, tok))
    assert b["inputs"].shape == (4, 16) and b["weights"].min() == 1
    batches = list(data.make_eval_iterator(cfg, tok))
    n_tokens = sum(len(tok.encode(str(src[i]["text"]))) + 1 for i in range(10))
    windows = -(-n_tokens // 17)
    assert sum(b["weights"].sum() for b in batches) == n_tokens - windows
    with pytest.raises(DataError, match="text_key='body'"):
      data.make_train_iterator(make_cfg(tmp_path, "", dataset="lm1b", text_key="body"), tok)


def test_gcs_data_dir_reaches_tfds_unchanged(tmp_path, monkeypatch):
  """A gs:// data_dir is handed to TFDS as is (no os.path.abspath / makedirs on it)."""
  url = "gs://bucket/tfds"
  seen = []

  def fake_data_source(name, *, split, data_dir, **kw):
    seen.append((name, split, data_dir))
    return [{"text": f"doc{i:02d} some words".encode()} for i in range(8)]

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  cfg = make_cfg(tmp_path, "", dataset="c4/en:3.1.0", data_dir=url)
  tok = ByteTokenizer()
  for p in range(2):  # two processes of a multi-host run
    assert next(data.make_train_iterator(cfg, tok, process_index=p, process_count=2))[
        "inputs"].shape == (2, 16)
  assert len(list(data.make_eval_iterator(cfg, tok))) >= 1
  assert seen == [("c4/en:3.1.0", "train", url)] * 2 + [("c4/en:3.1.0", "validation", url)]
  assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()

  # local_text passes data_dir to its builder unchanged too (text_dir stays local).
  class Stop(Exception):
    pass

  def fake_builder(text_dir, pattern, data_dir):
    seen.append(data_dir)
    raise Stop  # before TFDS would touch the bucket

  monkeypatch.setattr(local_text, "builder", fake_builder)
  with pytest.raises(Stop):
    data.make_source(make_cfg(tmp_path, "", data_dir=url), "train")
  assert seen[-1] == url


@pytest.mark.parametrize("name", ["lm1b", "no_such_dataset", "c4/en:3.1.0"])
@pytest.mark.parametrize("dir_exists", [False, True])
def test_missing_dataset_is_one_line_data_error(tmp_path, name, dir_exists):
  cfg = make_cfg(tmp_path, "", dataset=name)
  if dir_exists:
    os.makedirs(cfg.data_dir)
  with pytest.raises(DataError) as e:
    data.make_source(cfg, "train")
  msg = str(e.value)
  assert "\n" not in msg and f"config.data.dataset={name!r}" in msg
  assert "config.data.data_dir" in msg and "tfds build" in msg
  assert not os.listdir(cfg.data_dir) if dir_exists else not os.path.exists(cfg.data_dir)


def test_validate_data_section():
  cfg = default_config()
  cfg.data.dataset, cfg.data.text_dir = "lm1b", "/some/dir"
  with pytest.raises(ConfigError, match="config.data.text_dir"):
    validate(cfg)
  cfg.data.text_dir, cfg.data.tokenizer = "", ""
  with pytest.raises(ConfigError, match="config.data.tokenizer"):
    validate(cfg)
