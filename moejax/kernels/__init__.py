"""Kernels for product-key layers and attention, each tested against its plain-JAX oracle.

Imports only jax (no Flax, except ``moejax.sharding``'s shard_map helpers): layers call the
product-key ops through :func:`get` and the overridable operations through
:func:`registry.find <moejax.kernels.registry.find>`.

Modules:
  reference            the plain-JAX oracles (never tuned, never a kernel): brute-force
                       product-key top-k, the lookup and its pieces, rotary attention
  platform             the target platform (:func:`target_platform`, :func:`current_platform`)
  registry             product-key kernel selection and the operations a backend overrides
  chunking             chunk sizes of plain-JAX loops (the backend decides)
  row_ops              the row gathers / contractions of the XLA paths (a backend's, or XLA's)
  activations          named activations with derivatives (shared by kernels and references)
  rotary               rotary position embeddings (rotate-half)
  retrieval_xla        the tuned XLA product-key top-k, by candidate pairs (chunked; the
                       ``reference`` kernel choice), and the rescoring the kernels share
  lookup_xla           the tuned XLA PEER / PKM lookup (chunked; dense and row-sparse
                       gradients): the ``reference`` kernel choice
  lookup_vjp           the lookup's forward / backward structure the Pallas kernels share
  row_plan             retrievals sorted by row: the deterministic backward's plan
  retrieval_tpu / retrieval_gpu, lookup_tpu / lookup_gpu   the Pallas kernels

The CPU's native kernels are a backend (``moejax.backends.cpu``), registered here.
"""

from __future__ import annotations

from moejax.kernels.chunking import cache_chunk
from moejax.kernels.platform import current_platform, target_platform
from moejax.kernels.registry import CHOICES, TPU_WIDTH_MULTIPLE, Ops, get, resolve
from moejax.sharding import match_vma, mesh_is_local, varying

__all__ = ["CHOICES", "TPU_WIDTH_MULTIPLE", "Ops", "cache_chunk", "current_platform", "get",
           "match_vma", "mesh_is_local", "resolve", "target_platform", "varying"]
