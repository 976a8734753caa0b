"""Where a ``--checkpoint`` path points: an export or a training workdir (no JAX imported).

eval.py and generate.py call :func:`locate` before importing JAX, so a wrong path is one line
at once rather than after seconds of imports.
"""

from __future__ import annotations

from moejax import paths
from moejax.errors import CheckpointError


def locate(path: str) -> tuple[str, str]:
  """-> ('export', dir) or ('train', workdir) for an export dir, a workdir or its checkpoints/.

  Raises CheckpointError naming ``--checkpoint`` when the path does not exist or holds neither.
  """
  given = path
  path = paths.absolute(path).rstrip("/")
  if not paths.exists(path):
    raise CheckpointError(f"--checkpoint={given}: does not exist (pass a training workdir or its "
                          "export/ dir)")
  if paths.isdir(paths.join(path, "model")) and paths.exists(paths.join(path, "config.json")):
    return "export", path
  if path.endswith("/checkpoints"):
    path = path[:-len("/checkpoints")]
  if paths.isdir(paths.join(path, "checkpoints")):
    return "train", path
  if paths.isdir(paths.join(path, "export", "model")):
    return "export", paths.join(path, "export")
  raise CheckpointError(f"--checkpoint={path}: neither an export (config.json + model/) "
                        "nor a workdir with checkpoints/ (pass WORKDIR or WORKDIR/export)")
