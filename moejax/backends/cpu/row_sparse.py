"""Row-sparse training on CPU: the lazy-Adam update, the clip norm and the row plan with
the native kernels (``native``), registered as the ``row_sparse.*`` and
``row_plan.sort_free`` operations of :mod:`moejax.kernels.registry`.

Factored row gradients: the ``[U, d]`` row gradients (1 GiB at N = 1024²) would be
written by the lookup's scatter and read by the clip norm and again by Adam, a large share
of the row-sparse PEER step's memory traffic. Where the kernels run for a layer's float32
tables, its row gradients stay as the lookup's factors
(:class:`~moejax.kernels.row_plan.RowFactors`) and the kernels rebuild each row in cache.
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


def factored(tables) -> bool:
  """Row gradients of ``tables`` stay as factors where the kernels run for them."""
  return native.usable("factored", *tables)


slot_runs = native.slot_runs
sum_squares_rows = native.sum_squares_rows
factored_sum_squares = native.factored_sum_squares


def adam_rows(table, mu, nu, rows, g, **hyper):
  """One pass in place, skipping padding slots; None (XLA's chunked update) where the
  kernel does not run for these operands."""
  if not native.usable("adam_rows", table, mu, nu, g):
    return None
  return native.adam_rows(table, mu, nu, rows, g, **hyper)


def factored_adam_rows(table, mu, nu, rows, order, starts, coefs, vectors, **hyper):
  """Each row's gradient rebuilt from the factors in cache; None where the kernel does not
  run (the caller writes the rows out and updates those)."""
  if not native.usable("factored", table, mu, nu, coefs, vectors):
    return None
  return native.factored_adam_rows(table, mu, nu, rows, order, starts, coefs, vectors, **hyper)
