"""Command-line helpers shared by train.py and eval.py."""

from __future__ import annotations

import sys

import ml_collections

from moejax.errors import ConfigError


def check_config_overrides(argv: list[str]) -> None:
  """Exits with a one-line error for ``--config.FIELD=...`` naming an unknown field.

  absl's config flags would raise a multi-line traceback for these.
  """
  from moejax.config import default_config
  ref = default_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = ref, []
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        where = "config." + ".".join(walked + [part])
        sys.exit(f"error: {ConfigError(f'{where}: unknown field (known here: {known})')}")
      node, walked = node[part], walked + [part]
