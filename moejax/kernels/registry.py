"""The registries through which layers get a platform's implementation.

Two kinds of entry:

* **Product-key kernels** (``peer.kernel`` / ``pkm.kernel``): :func:`resolve` turns the
  config choice into an implementation name and :func:`get` into its :class:`Ops`.

  ========== ===========================================================================
  auto       Pallas on TPU and GPU, the XLA lookup elsewhere (and on TPU for table widths
             that are not a multiple of 128)
  reference  the XLA lookup everywhere
  pallas     Pallas for the target platform (TPU: Mosaic, GPU: Triton); an error on CPU
  interpret  the TPU kernels in Pallas interpret mode (runs on CPU; tests, debugging)
  ========== ===========================================================================

* **Operations a backend may override**, by name: a layer asks :func:`find` for, e.g.,
  ``"attention.rotary"`` and gets the target platform's implementation, or None: then it
  runs its own portable XLA program (what TPU and GPU run). An implementation may also
  decline a call by returning None (e.g. operands its kernel does not take); the caller
  then runs the portable program too. :data:`OPS` lists every name and its contract.

Backends (``moejax.backends``) register with :func:`register` when first needed: the first
:func:`find` loads them. Layers never import a backend.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

from moejax.kernels.platform import current_platform

CHOICES = ("auto", "reference", "pallas", "interpret")


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
    "reference": ("retrieval_xla", "lookup_xla", {}),
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
  r = importlib.import_module(f"moejax.kernels.{topk_mod}")
  lk = importlib.import_module(f"moejax.kernels.{lookup_mod}")
  bind = (lambda f: functools.partial(f, **kwargs)) if kwargs else (lambda f: f)
  return Ops(impl, bind(r.product_key_topk), bind(lk.lookup), bind(lk.lookup_sparse))


# ------------------------------------------------------------------ overridable operations
#
# Every operation a backend may implement, and the contract it keeps. Without an
# implementation (or when it returns None) the caller runs its own portable program.

OPS: dict[str, str] = {
    "cache_chunk": "(total, item_bytes, budget_bytes) -> items per chunk of a plain-JAX "
                   "loop, in [1, total] (portable: total, no loop)",
    "row_ops": "a namespace like moejax.kernels.row_ops (top_k, take_rows, gather_dot, "
               "gather_weighted_sum, scatter_outer_add, scatter_outer_add_pair, fused): "
               "the same values",
    "row_plan.sort_free": "(num_rows, num_entries) -> bool: distinct rows by marks and a "
                          "cumsum instead of a sort (portable: the sort)",
    "projection": "a namespace of project, project_back, weight_grad with the signatures "
                  "and values of moejax.layers.projection's portable ones",
    "ffn.hidden": "(x [..., d], wi, wg | None, activation) -> act(x·wi) [* x·wg] "
                  "[..., d_ff] in x.dtype",
    "attention.rotary": "(q [B, L, H, D], k, v [B, L, Hkv, D], positions [B, L], theta, "
                        "segment_ids [B, L] | None) -> causal attention [B, L, H, D] of q, "
                        "k rotated (rotate-half) at positions, within each segment",
    "argmax": "(x [..., n]) -> int32 [...], the index of the first maximum along the last "
              "axis (a row holding NaN: any index in range; portable: jnp.argmax)",
    "attention.cached": "(q [B, N, H, D], k, v [B, T, Hkv, D], mask [B|1, 1, N, T], "
                        "portable) -> the attention of a few queries over a KV cache, "
                        "portable(q, k, v, mask)'s values, or None to run portable",
    "moe.capacity_moves": "(x [G, S, D], plan) -> (gather: x -> [E, G, C, D], scatter: "
                          "[E, G, C, D'] -> [G, S, D']) with the values of the dispatch and "
                          "combine mask einsums (portable: the einsums)",
    "moe.dropless_default": "the dropless grouped matmul that dropless_impl='auto' names "
                            "(portable: 'ragged_dot')",
    "moe.grouped_ffn.blocked": "a namespace with the combine and grouped functions of "
                               "moejax.layers.moe.dispatch.GroupedFFN: the blocked grouped "
                               "matmul (dropless_impl='blocked')",
    "row_sparse.sum_squares_rows": "(rows [U], g [U, d], num_rows) -> sum(g * g)",
    "row_sparse.adam_rows": "(table, mu, nu, rows, g, *, lr, b1, b2, eps, c1, c2, scale) "
                            "-> (table, mu, nu) lazy Adam on distinct rows",
}

ANY = "*"   # registered for every platform

_IMPLEMENTATIONS: dict[tuple[str, str], Any] = {}
_LOADED = False


def _known(name: str) -> str:
  if name not in OPS:
    raise KeyError(f"no registry operation {name!r} (known: {sorted(OPS)})")
  return name


def register(name: str, fn: Any, *, platform: str) -> None:
  """``fn`` implements ``name`` on ``platform`` (:data:`ANY`: on every platform)."""
  _IMPLEMENTATIONS[(_known(name), platform)] = fn


def find(name: str, platform: str | None = None) -> Any | None:
  """The implementation of ``name`` for ``platform`` (default: the target platform), or
  None where no backend gives one."""
  _known(name)
  _load_backends()
  platform = platform or current_platform()
  impl = _IMPLEMENTATIONS.get((name, platform))
  return impl if impl is not None else _IMPLEMENTATIONS.get((name, ANY))


def call(name: str, *args, **kwargs) -> Any | None:
  """``find(name)(*args, **kwargs)``; None where there is no implementation or it declines."""
  impl = find(name)
  return None if impl is None else impl(*args, **kwargs)


def registered(platform: str) -> list[str]:
  """The operation names implemented for ``platform`` (its own, not :data:`ANY`)."""
  _load_backends()
  return sorted(name for name, p in _IMPLEMENTATIONS if p == platform)


def _load_backends() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    importlib.import_module("moejax.backends").load()
