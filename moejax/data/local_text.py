"""``local_text``: a TFDS dataset over a local directory of text files.

One example per file: ``{"text": file contents, "path": path relative to the
directory}``. Built offline into array_record files, read with
``tfds.data_source`` like any other TFDS dataset.

* Default directory: the Python standard library sources (``*.py`` under
  ``sysconfig.get_paths()['stdlib']``, without ``test``/``tests``/``idle_test``
  dirs and ``site-packages``): real text on every machine that runs moejax.
  On CPython 3.11: 734 files, 12.1 MB (716 train / 18 validation); the build
  is one pass over a few MB of text, a small part of any run, so no cap.
* Each directory gets its own BuilderConfig named ``d<hash of abs path>_<hash
  of listing>``, where the listing is (relative path, size, mtime) of every
  selected file. Two directories never share files in one ``data_dir``, and
  editing, adding or removing a file gives a new name, hence a rebuild (the
  old build is left on disk, unused).
* Split: a file goes to ``validation`` when the hash of its relative path falls
  in the lowest 3% (stable when other files are added), clamped so that each
  split has at least one file.
* Files with a NUL byte in their first 8 KiB are skipped as binary (UTF-16 too);
  other non-UTF-8 bytes are decoded with ``errors="replace"`` (U+FFFD), so a stray
  Latin-1 file still contributes its text. A directory in which a split gets no
  file with text (only empty, binary or UTF-16 files) is refused (DataError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import os
import sys
import sysconfig

import tensorflow_datasets as tfds
from etils import epath

from moejax.errors import DataError

VALIDATION_FRACTION = 0.03
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})
_BINARY_PROBE = 8192


def default_text_dir() -> str:
  """The Python standard library sources: the text used when ``text_dir`` is ""."""
  return sysconfig.get_paths()["stdlib"]


def list_files(text_dir: str, pattern: str = "*") -> list[str]:
  """Sorted relative paths of the files under ``text_dir`` matching ``pattern``.

  Hidden files/dirs and test / site-packages / __pycache__ dirs are skipped.
  Symlinked dirs are not followed (the stdlib has none; it avoids cycles).
  """
  out = []
  for dirpath, dirnames, filenames in os.walk(text_dir):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
    for name in filenames:
      if name.startswith(".") or not fnmatch.fnmatch(name, pattern):
        continue
      full = os.path.join(dirpath, name)
      if os.path.isfile(full):
        out.append(os.path.relpath(full, text_dir))
  return sorted(out)


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def split_files(files: list[str]) -> dict[str, list[str]]:
  """Deterministic train/validation split of relative paths by their hash."""
  if len(files) < 2:
    raise DataError(
        f"config.data.text_dir: found {len(files)} text file(s), need at least 2 "
        "(one for train, one for validation); point --config.data.text_dir at a bigger directory")
  by_hash = sorted(files, key=_hash)
  threshold = VALIDATION_FRACTION * 2**64
  k = sum(_hash(f) < threshold for f in files)
  k = min(max(k, 1), len(files) - 1)
  return {"train": sorted(by_hash[k:]), "validation": sorted(by_hash[:k])}


@dataclasses.dataclass(kw_only=True)
class LocalTextConfig(tfds.core.BuilderConfig):
  text_dir: str = ""
  pattern: str = "*"
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)


def make_config(text_dir: str = "", pattern: str = "") -> LocalTextConfig:
  """The BuilderConfig of a directory ("" = stdlib; pattern "" = *.py there, * elsewhere)."""
  if not text_dir:
    text_dir, pattern = default_text_dir(), pattern or "*.py"
  text_dir = os.path.abspath(os.path.expanduser(text_dir))
  pattern = pattern or "*"
  if not os.path.isdir(text_dir):
    raise DataError(
        f"config.data.text_dir={text_dir!r}: not a directory "
        "(set --config.data.text_dir to a directory of text files, or \"\" for the Python stdlib)")
  files = list_files(text_dir, pattern)
  if len(files) < 2:
    raise DataError(
        f"config.data.text_dir={text_dir!r}: {len(files)} file(s) match {pattern!r}, need at "
        "least 2 (one per split); add files or change --config.data.text_glob")
  _check_usable(text_dir, files)
  listing = hashlib.sha1()
  for rel in files:
    st = os.stat(os.path.join(text_dir, rel))
    listing.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  name = f"d{hashlib.sha1(f'{text_dir}|{pattern}'.encode()).hexdigest()[:10]}_{listing.hexdigest()[:10]}"
  return LocalTextConfig(name=name, text_dir=text_dir, pattern=pattern, files=tuple(files),
                         description=f"{len(files)} files {pattern} under {text_dir}")


def probe(path: str) -> str:
  """"text", "empty" (no non-blank character), "utf16", "binary" or "unreadable", from the first 8 KiB."""
  try:
    with open(path, "rb") as f:
      head = f.read(_BINARY_PROBE)
  except OSError:
    return "unreadable"
  even, odd, half = head[0::2].count(0), head[1::2].count(0), max(len(head) // 2, 1)
  if head[:2] in (b"\xff\xfe", b"\xfe\xff") or (
      len(head) >= 4 and max(even, odd) >= half // 2 and min(even, odd) <= half // 10):
    return "utf16"
  if b"\0" in head:
    return "binary"
  if not head.strip() and os.path.getsize(path) <= _BINARY_PROBE:
    return "empty"
  return "text"


def _check_usable(text_dir: str, files: list[str]) -> None:
  """Refuses a directory whose files give no text in a split (empty, binary, UTF-16)."""
  kinds = {rel: probe(os.path.join(text_dir, rel)) for rel in files}
  counts = {k: sum(v == k for v in kinds.values()) for k in ("empty", "binary", "utf16", "unreadable")}
  unusable = ", ".join(f"{n} {k if k != 'utf16' else 'UTF-16'}" for k, n in counts.items() if n)
  fix = ("convert UTF-16 files to UTF-8 (iconv -f UTF-16 -t UTF-8)" if counts["utf16"] else
         "point --config.data.text_dir at a directory of UTF-8 text files (or narrow "
         "--config.data.text_glob)")
  if not any(v == "text" for v in kinds.values()):
    raise DataError(f"config.data.text_dir={text_dir!r}: no usable text in its {len(files)} "
                    f"file(s) ({unusable}); {fix}")
  for split, members in split_files(files).items():
    if not any(kinds[rel] == "text" for rel in members):
      raise DataError(f"config.data.text_dir={text_dir!r}: the {split} split ({len(members)} "
                      f"file(s)) has no usable text ({unusable} in the directory); add UTF-8 text "
                      f"files or {fix}")


def read_text(path: str) -> str | None:
  """File contents as text; None for a binary file (NUL byte near the start)."""
  with open(path, "rb") as f:
    raw = f.read()
  if b"\0" in raw[:_BINARY_PROBE]:
    return None
  return raw.decode("utf-8", errors="replace")


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Text files of a local directory, one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Configs are made per directory at run time (make_config); this one is
  # only a placeholder so that TFDS accepts the class.
  BUILDER_CONFIGS = [LocalTextConfig(name="stdlib", description="see make_config")]

  # TFDS derives this from the module via importlib_resources (not installed);
  # it only serves to find a checksums file, which this dataset has none of.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg.text_dir:
      raise DataError(
          "local_text: build it through moejax.data.make_source (the config names a directory)")
    return {split: self._generate_examples(cfg.text_dir, files)
            for split, files in split_files(list(cfg.files)).items()}

  def _generate_examples(self, text_dir, files):
    for rel in files:
      text = read_text(os.path.join(text_dir, rel))
      if text is not None:
        yield rel, {"text": text, "path": rel}


def builder(text_dir: str = "", pattern: str = "", data_dir: str | None = None) -> LocalText:
  """The ``local_text`` builder of a directory (not yet built)."""
  return LocalText(config=make_config(text_dir, pattern), data_dir=data_dir or None)


def prepare(b: LocalText) -> LocalText:
  """Builds ``b`` into its data_dir unless already there. Never touches the network.

  The first build says so in one line on stderr (what, where); TFDS's own "Downloading
  and preparing" lines and progress bars, which speak of downloads that do not happen, are
  kept back and shown only if the build fails.
  """
  if not b.is_prepared():
    source = b.builder_config.text_dir or default_text_dir()
    print(f"moejax: preparing the local_text dataset from {source} into {b.data_dir} (once)",
          file=sys.stderr, flush=True)
    chatter = io.StringIO()
    try:
      with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except BaseException:
      sys.stderr.write(chatter.getvalue())
      raise
  return b
