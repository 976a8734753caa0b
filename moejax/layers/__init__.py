"""Layers. Importing this package registers every feed-forward kind."""

from moejax.layers import dense, moe, peer, pkm  # noqa: F401  (each registers its kind)
from moejax.layers.base import Aux, FFN_REGISTRY, TableParam, build_ffn, register_ffn  # noqa: F401
