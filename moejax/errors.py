"""Errors that carry a one-line, user-facing message."""


class ConfigError(ValueError):
  """A config field is unknown, ill-typed or out of range.

  The message names the field and says how to fix it, on one line, e.g.
  ``config.model.num_heads=3: must divide model.d_model=64 (set --config.model.num_heads=4)``.
  """


class DataError(ValueError):
  """The input data (dataset name, directory, tokenizer file) cannot be used."""


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not match the model."""


def config_error(field: str, value, why: str, fix: str) -> ConfigError:
  """``config.FIELD=VALUE: WHY (FIX)`` -- the one shape of every config error."""
  return ConfigError(f"config.{field}={value!r}: {why} ({fix})")
