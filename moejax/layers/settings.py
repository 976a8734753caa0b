"""Settings of a feed-forward kind: one frozen dataclass per kind, its config section's schema.

A kind's settings class holds every field of its ``config.<kind>`` section with its default,
in one place: ``default_config()`` is made from the class and the layer is built from
``Settings.from_config(config.<kind>)``. Layers read their settings; they never read a
ConfigDict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

S = TypeVar("S", bound="Settings")


class Settings:
  """Mixin of a frozen dataclass of layer settings (scalars only, so it is hashable and can
  be a static attribute of an ``nnx.Module``)."""

  @classmethod
  def from_config(cls: type[S], section: Mapping[str, Any]) -> S:
    """The settings in ``section`` (a ConfigDict or dict); absent fields take their defaults.

    Raises ValueError for a field the class does not have.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section.keys()) - names)
    if unknown:
      raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)} "
                       f"(its fields: {', '.join(sorted(names))})")
    return cls(**{k: section[k] for k in section.keys()})

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The config section of the defaults, fields in declaration order."""
    return ml_collections.ConfigDict(dataclasses.asdict(cls()))

  def replace(self: S, **changes) -> S:
    return dataclasses.replace(self, **changes)
