"""Row-sparse training on CPU: the lazy-Adam update, the clip norm and the row plan with
the native kernels (``native``), registered as the ``row_sparse.*`` and
``row_plan.sort_free`` operations of :mod:`moejax.kernels.registry`.
"""

from __future__ import annotations

from moejax.backends.cpu import native

# Above this N / M, the O(N) passes of the sort-free paths cost more than a sort of M.
_SORT_FREE_MAX_RATIO = 64


def sort_free(num_rows: int, num_entries: int) -> bool:
  """The O(N) mark-and-cumsum passes replace the sort of ``row_plan.unique_rows`` (measured
  on CPU only; on TPU / GPU the sort stays: their scatters into ``[N]`` are not known to be
  cheaper)."""
  return num_rows <= _SORT_FREE_MAX_RATIO * num_entries


sum_squares_rows = native.sum_squares_rows


def adam_rows(table, mu, nu, rows, g, **hyper):
  """One pass in place, skipping padding slots; None (XLA's chunked update) where the
  kernel does not run for these operands."""
  if not native.usable("adam_rows", table, mu, nu, g):
    return None
  return native.adam_rows(table, mu, nu, rows, g, **hyper)

