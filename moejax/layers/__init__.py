"""Layers. Importing this package registers every feed-forward kind."""

from moejax.layers import dense  # noqa: F401  (registers 'dense')
from moejax.layers import moe  # noqa: F401  (registers 'moe')
from moejax.layers.base import Aux, FFN_REGISTRY, TableParam, build_ffn, register_ffn  # noqa: F401
