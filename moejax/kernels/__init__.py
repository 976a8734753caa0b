"""Pallas kernels for product-key layers, each beside the plain-JAX reference it must equal.

Imports only jax (no Flax): layers call these through :func:`get`.

Modules:
  activations          named activations with derivatives (shared by kernels and references)
  cpu_kernels          C++ kernels on CPU (XLA FFI): top_k, row gathers and contractions,
                       lazy Adam (cpu_kernels.cc), attention with rotary positions
                       (cpu_attention.cc)
  attention_reference  CPU attention and rotary positions in XLA (the attention kernel's reference)
  retrieval_reference  product-key top-k in plain JAX (``product_key_topk``)
  lookup_reference     the PEER / PKM lookup in plain JAX (dense and row-sparse gradients)
  row_plan             retrievals sorted by row: the deterministic backward's plan
  retrieval_tpu / retrieval_gpu, lookup_tpu / lookup_gpu   the Pallas kernels

Selection (``peer.kernel`` / ``pkm.kernel``):
  auto       Pallas on TPU and GPU, the reference on CPU (and on TPU for table widths that
             are not a multiple of 128)
  reference  plain JAX everywhere
  pallas     Pallas for the target platform (TPU: Mosaic, GPU: Triton); an error on CPU
  interpret  the TPU kernels in Pallas interpret mode (runs on CPU; tests, debugging)

The *target* platform is the default backend, or the one set by :func:`target_platform`
while compiling ahead of time for a TPU from a CPU machine (``moejax.compile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax

CHOICES = ("auto", "reference", "pallas", "interpret")

_TARGET: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str):
  """Within this context, kernels are chosen for ``platform`` ('tpu', 'gpu', 'cpu')."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def current_platform() -> str:
  if _TARGET:
    return _TARGET[-1]
  backend = jax.default_backend()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def mesh_is_local() -> bool:
  """No axis of several devices of the current (abstract) mesh is left to XLA's
  partitioner: no mesh, or every such axis is manual here (inside ``shard_map``)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or all(size == 1 or name in mesh.manual_axes
                           for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def cache_chunk(total: int, item_bytes: int, budget_bytes: int) -> int:
  """Items (tokens, rows) per chunk of a plain-JAX loop that keeps one chunk's temporaries
  in a core's cache: ``budget_bytes // item_bytes`` (in ``[1, total]``) on CPU, where the
  references are memory-bound and chunking is what makes them fast; ``total`` (one chunk,
  no loop: callers then run the unchunked code) on TPU / GPU, whose programs the chunking
  would only serialise."""
  if current_platform() != "cpu":
    return total
  return max(1, min(total, budget_bytes // max(item_bytes, 1)))


def varying(a) -> set:
  """Mesh axes over which ``a`` varies inside ``shard_map`` (empty outside)."""
  aval = jax.typeof(a)    # jax 0.10: aval.mat.varying (older: aval.vma)
  mat = getattr(aval, "mat", None)
  return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))


def match_vma(ct, like):
  """Inside ``shard_map``: a cotangent with the device-variance type of its primal.

  A table replicated over (say) 'data' gets row-gradients that differ per data shard: its
  cotangent is their sum (psum). Outside shard_map this is the identity.
  """
  have, want = varying(ct), varying(like)
  if have - want:
    ct = jax.lax.psum(ct, tuple(sorted(have - want)))
  if want - have:
    ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to="varying")
  return ct


@dataclasses.dataclass(frozen=True)
class Ops:
  """One implementation of the product-key ops (same signatures as the references).

  topk(queries [..., h, d_key], keys1, keys2 [h|1, n, d_key/2], k) -> (scores, indices) [..., h, k]
  lookup(x, indices, scores, up, down=None, *, activation) -> y
  lookup_sparse(x, indices, scores, up, down, taps, *, activation) -> y
  """

  name: str
  topk: Callable
  lookup: Callable
  lookup_sparse: Callable


# impl name -> (module of topk, module of lookup, extra kwargs)
_IMPLS = {
    "reference": ("retrieval_reference", "lookup_reference", {}),
    "tpu": ("retrieval_tpu", "lookup_tpu", {}),
    "gpu": ("retrieval_gpu", "lookup_gpu", {}),
    "interpret": ("retrieval_tpu", "lookup_tpu", {"interpret": True}),
}


# Table widths the TPU lookup kernel takes (rows are DMA'd into lane-aligned VMEM tiles).
TPU_WIDTH_MULTIPLE = 128


def resolve(choice: str, platform: str | None = None, *, width: int | None = None) -> str:
  """Config choice -> implementation name (``reference`` | ``tpu`` | ``gpu`` | ``interpret``).

  ``width``: the table row length (d_model); ``auto`` falls back to the reference where the
  kernel cannot take it. Raises ValueError (one line, with the fix) for a choice that cannot
  run on ``platform`` or at that width.
  """
  platform = platform or current_platform()
  if choice not in CHOICES:
    raise ValueError(f"kernel={choice!r} is not one of {list(CHOICES)}")
  if choice == "reference":
    return choice
  if choice == "auto":
    impl = platform if platform in ("tpu", "gpu") else "reference"
  elif choice == "interpret":
    impl = "interpret"
  elif platform not in ("tpu", "gpu"):
    raise ValueError(f"kernel={choice!r} needs a TPU or GPU, but the platform is {platform!r} "
                     "(use kernel=auto or reference, or kernel=interpret to run the TPU "
                     "kernels in interpret mode)")
  else:
    impl = platform
  if impl in ("tpu", "interpret") and width is not None and width % TPU_WIDTH_MULTIPLE:
    if choice == "auto":
      return "reference"
    raise ValueError(f"kernel={choice!r} needs a table width (d_model) that is a multiple of "
                     f"{TPU_WIDTH_MULTIPLE} on TPU, got {width} (use kernel=auto, which falls "
                     "back to the reference, or pad d_model)")
  return impl


@functools.lru_cache(maxsize=None)
def get(impl: str) -> Ops:
  """The :class:`Ops` of an implementation name from :func:`resolve`."""
  topk_mod, lookup_mod, kwargs = _IMPLS[impl]
  r = importlib.import_module(f"{__name__}.{topk_mod}")
  lk = importlib.import_module(f"{__name__}.{lookup_mod}")
  bind = (lambda f: functools.partial(f, **kwargs)) if kwargs else (lambda f: f)
  return Ops(impl, bind(r.product_key_topk), bind(lk.lookup), bind(lk.lookup_sparse))
