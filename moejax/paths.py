"""Paths that may be local or on a bucket (``gs://...``): workdirs, exports, plots.

``os.path.abspath('gs://b/run')`` would silently turn a bucket into a local folder,
so every workdir path goes through here and then ``etils.epath``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or a remote URL unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  return str(epath.Path(absolute(path)).joinpath(*parts))


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(absolute(path)).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(absolute(path)).is_dir()


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(absolute(path)).mkdir(parents=True, exist_ok=True)


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(epath.Path(absolute(path)).read_text())


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes via a temporary file and a rename, so readers never see half a file."""
  target = epath.Path(absolute(path))
  tmp = target.parent / (target.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(target)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  epath.Path(absolute(path)).write_bytes(data)
