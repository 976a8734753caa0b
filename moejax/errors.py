"""Errors that carry a one-line, user-facing message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
  """A config field is unknown, ill-typed or out of range.

  The message names the field and says how to fix it, on one line, e.g.
  ``config.model.num_heads=3: must divide model.d_model=64 (set --config.model.num_heads=4)``.
  """


class DataError(ValueError):
  """The input data (dataset name, directory, tokenizer file) cannot be used."""


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not match the model."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient norm (``train.on_nonfinite=stop``)."""


# Exit codes of train.py / eval.py: a bad input (config, flag, data, checkpoint, workdir)
# is 2, like a usage error; a run stopped by a non-finite loss is 1.
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 1


def config_error(field: str, value, why: str, fix: str) -> ConfigError:
  """``config.FIELD=VALUE: WHY (FIX)`` -- the one shape of every config error."""
  return ConfigError(f"config.{field}={value!r}: {why} ({fix})")


def nearest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
  """The choice closest to a mistyped ``name`` (for "did you mean"), or None."""
  choices = list(choices)
  lower = {c.lower(): c for c in choices}
  if name.lower() in lower:
    return lower[name.lower()]
  found = difflib.get_close_matches(name, choices, n=1, cutoff=cutoff)
  if found:
    return found[0]
  # Words in another order or partly kept (lr_warmup -> warmup_steps): the most shared letters
  # in whole words of three or more.
  words = {w for w in name.lower().replace("-", "_").split("_") if len(w) >= 3}
  scores = {c: sum(len(w) for w in words & set(c.lower().split("_"))) for c in choices}
  best = max(scores.values(), default=0)
  top = [c for c, v in scores.items() if v == best]
  return top[0] if best and len(top) == 1 else None
