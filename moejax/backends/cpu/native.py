"""C++ kernels for XLA:CPU, called through the XLA FFI; built from ``cpu_kernels.cc`` on first use.

* :func:`top_k` is ``jax.lax.top_k`` (same values, indices, order and ties). XLA:CPU's TopK
  sorts each row partially, and at product-key sizes (k = 16 of n = 1024) that sort is most
  of the PEER layer's forward. The kernel bounds the k-th entry by group maxima and sorts
  only the few entries above the bound.
* :func:`gather_dot`, :func:`gather_weighted_sum` and :func:`scatter_outer_add`: the
  product-key lookup's contractions with gathered rows (``x · table[i]``, ``Σ w ·
  table[i]``, ``acc[i] += c · v``), each random row read once and used in place. XLA's
  gather + einsum writes the ``[T, H, d]`` rows out and reads them back (or runs over
  small chunks of tokens to keep them in cache). The contractions prefetch the rows a few
  retrievals ahead. The scatter groups its ``(t, j)`` pairs by target first (a counting
  sort) and writes each output row once, from a buffer in cache, past the cache when the
  output is large: adding pair by pair is a read-modify-write of random 1 KiB rows.
* :func:`adam_rows`: the lazy-Adam update of distinct table rows and their moments, in
  place, one vectorised pass per row (XLA gathers each row of three tables, updates,
  scatters back, three more passes over random rows).
* :func:`attention` is masked softmax attention with its rotary positions
  (``cpu_attention.cc``; its XLA form ``attention_xla.attention``): per (batch, head) in
  cache, a block of queries at a time over only the keys it may see, the small matmuls in
  registers, the backward from the saved log-sum-exp. XLA ran the default LM's attention
  as a dozen passes over the ``[batch, heads, L, L]`` scores and their gradients, each a
  loop over a buffer larger than the cache.

* :func:`routed_ffn` (``cpu_decode.cc``): the top-k experts' FFN of a few tokens, combined
  (the CPU dropless path's, up to ``moe_dispatch.ROUTED_FFN_MAX_PAIRS`` token-choice pairs:
  decoding). Each chosen expert's weights are read once, in place, on all threads; XLA
  copies an expert's matrices out of the stacked weights before each matmul (a
  dynamic-slice fusion): a read and a write of each matrix before the matmul reads it again.
* :func:`few_row_matmul` (``cpu_decode.cc``): ``x @ w`` for a few rows of ``x`` (the CPU
  projections' of up to ``projection.FEW_ROWS`` tokens: decoding), a stream over ``w``'s
  rows, several at a time, on all threads. XLA's matmul of a few rows reads the weight well
  below the memory's rate, and a decode step is the time to read its weights.
* :func:`cached_attention` (``cpu_decode.cc``): a few new queries' attention over the KV
  cache in its ``[B, T, KV, Dh]`` layout, each (row, KV head)'s slots read once, in place;
  XLA transposes a copy of the whole cache every step before its batched matmuls.

Each is the XLA op instead (:func:`usable` is False) on TPU / GPU (the target platform,
:func:`moejax.kernels.current_platform`), for other dtypes, with ``MOEJAX_CPU_KERNELS=0``,
for a group of kernels named in ``MOEJAX_CPU_KERNELS_OFF`` (comma-separated names of
:data:`GROUPS`, e.g. ``topk,attention``: to measure what each group buys), and under a
mesh (``jax.set_mesh``) with an axis of several devices that is not manual here: XLA
cannot partition a custom call, so it would all-gather the operands (a whole table) onto
every device. Inside ``shard_map`` over those axes each device has its own
rows, and the kernels run.

Every handler checks each operand's rank and shape against the others (the FFI bindings
check the dtypes) and returns an error, which JAX raises, rather than reading or writing
out of bounds; the Adam kernels also reject repeated rows (``cpu_common.h``'s ``Checks``).

Build: the first use compiles ``cpu_kernels.cc``, ``cpu_attention.cc`` and ``cpu_decode.cc``
(sharing ``cpu_common.h``) into one library with the C++ compiler (``$CXX``, else ``c++``) against
the XLA FFI headers that ship with jaxlib (``jax.ffi.include_dir()``) into
``$MOEJAX_CACHE_DIR`` (default ``~/.cache/moejax``), and says so in one line on stderr. The
file is named by a hash of the sources, the FFI headers' contents, the jax and jaxlib
versions, the compiler (``$CXX --version``), the flags and this CPU's features, so that
every virtual environment with the same jax, jaxlib and compiler shares it; later processes
load it. Without a compiler (or where the build fails) one warning line on stderr says what
that costs and how to fix it, and the XLA ops run; with ``MOEJAX_CPU_KERNELS=1`` set it is
a :class:`KernelBuildError` instead. No network is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from moejax import kernels, sharding
from moejax.backends.cpu import attention_xla
from moejax.kernels import row_ops

TOPK = "moejax_topk_f32"
GATHER_DOT = "moejax_gather_dot_f32"
GATHER_WEIGHTED_SUM = "moejax_gather_weighted_sum_f32"
SCATTER_OUTER = "moejax_scatter_outer_f32"
SCATTER_OUTER_PAIR = "moejax_scatter_outer_pair_f32"
ADAM_ROWS = "moejax_adam_rows_f32"
SUM_SQUARES_ROWS = "moejax_sum_squares_rows_f32"
ATTENTION_FWD = "moejax_attention_fwd_f32"
ATTENTION_BWD = "moejax_attention_bwd_f32"
ROUTED_FFN = "moejax_routed_ffn_f32"
FEW_ROW_MATMUL = "moejax_few_row_matmul_f32"
CACHED_ATTENTION = "moejax_cached_attention_f32"
_SYMBOLS = {TOPK: "MoejaxTopKF32",
            GATHER_DOT: "MoejaxGatherDotF32", GATHER_WEIGHTED_SUM: "MoejaxGatherWeightedSumF32",
            SCATTER_OUTER: "MoejaxScatterOuterF32", SCATTER_OUTER_PAIR: "MoejaxScatterOuterPairF32",
            ADAM_ROWS: "MoejaxAdamRowsF32", SUM_SQUARES_ROWS: "MoejaxSumSquaresRowsF32",
            ATTENTION_FWD: "MoejaxAttentionFwdF32", ATTENTION_BWD: "MoejaxAttentionBwdF32",
            ROUTED_FFN: "MoejaxRoutedFfnF32", FEW_ROW_MATMUL: "MoejaxFewRowMatmulF32",
            CACHED_ATTENTION: "MoejaxCachedAttentionF32"}
_SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_kernels.cc", "cpu_attention.cc",
                                                         "cpu_decode.cc"))
_HEADERS = (Path(__file__).with_name("cpu_common.h"),)
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
# Tried first, for this CPU's vector units (the group-maximum and counting passes of top_k
# vectorise to its widest registers); dropped where the compiler refuses it. The cache
# name includes the CPU's feature flags, so a cache shared
# between machines never loads code built for another CPU.
_NATIVE = ("-march=native",)


def enabled() -> bool:
  """False when ``MOEJAX_CPU_KERNELS=0`` (then the XLA ops run)."""
  return os.environ.get("MOEJAX_CPU_KERNELS", "1") != "0"


# The kernels by what they replace, the names of ``MOEJAX_CPU_KERNELS_OFF``: a group is on or
# off as a whole (its kernels share their callers' code paths). With "lookup" off the lookup
# runs over chunks of tokens, and its backward's scatter is then XLA's too (the scatter
# kernel writes a whole accumulator from zeros: :func:`lookup_fused`).
GROUPS = {
    "topk": (TOPK,),
    "lookup": (GATHER_DOT, GATHER_WEIGHTED_SUM),
    "scatter": (SCATTER_OUTER, SCATTER_OUTER_PAIR),
    "adam_rows": (ADAM_ROWS, SUM_SQUARES_ROWS),
    "attention": (ATTENTION_FWD, ATTENTION_BWD),
    "routed_ffn": (ROUTED_FFN,),
    "few_row_matmul": (FEW_ROW_MATMUL,),
    "cached_attention": (CACHED_ATTENTION,),
}
OFF_VARIABLE = "MOEJAX_CPU_KERNELS_OFF"


class KernelSwitchError(ValueError):
  """``MOEJAX_CPU_KERNELS_OFF`` names a group that does not exist; the message is one line."""


def parse_groups_off(value: str) -> frozenset[str]:
  """The groups a ``MOEJAX_CPU_KERNELS_OFF`` value turns off: comma-separated names of
  :data:`GROUPS` (spaces and empty items ignored); :class:`KernelSwitchError` for any other
  name."""
  names = frozenset(n.strip() for n in value.split(",") if n.strip())
  unknown = sorted(names - GROUPS.keys())
  if unknown:
    raise KernelSwitchError(f"{OFF_VARIABLE}={value!r}: unknown kernel group "
                            f"{', '.join(map(repr, unknown))} (valid: {', '.join(GROUPS)})")
  return names


def group_on(group: str) -> bool:
  """False where ``MOEJAX_CPU_KERNELS_OFF`` names ``group`` (then its XLA form runs); read
  when a computation is traced, like ``MOEJAX_CPU_KERNELS``."""
  assert group in GROUPS, group
  return group not in parse_groups_off(os.environ.get(OFF_VARIABLE, ""))


def required() -> bool:
  """True when ``MOEJAX_CPU_KERNELS=1`` is set: a failed build is then an error, not a
  warning (e.g. for benchmarks, where a silent XLA fallback reads as a slower host)."""
  return os.environ.get("MOEJAX_CPU_KERNELS") == "1"


def cache_dir() -> Path:
  return Path(os.environ.get("MOEJAX_CACHE_DIR", "~/.cache/moejax")).expanduser()


def _cpu_features() -> bytes:
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
  except OSError:
    return platform.processor().encode()


class KernelBuildError(RuntimeError):
  """The CPU kernels could not be built and ``MOEJAX_CPU_KERNELS=1`` requires them; the
  message is one line."""


def _announce(line: str) -> None:
  """One line on stderr: first-use work and a failed build are shown whatever the host's
  logging level (the entry points quiet absl logging to ERROR). Through ``tqdm.write``, so
  that a progress bar on screen (the first step traces the kernels) is cleared for the
  line and drawn again below it."""
  from tqdm import tqdm
  tqdm.write(line, file=sys.stderr)


def _compiler() -> tuple[list[str], str]:
  """The compiler's command (``$CXX``, else ``c++``) and the first line of its
  ``--version``; OSError where it does not run."""
  cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
  try:
    done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
  except FileNotFoundError as e:
    raise OSError(f"no C++ compiler: {' '.join(cxx)} not found") from e
  if done.returncode != 0:
    raise OSError(f"{' '.join(cxx)} --version failed")
  return cxx, (done.stdout.strip().splitlines() or [""])[0]


def _header_bytes(include: Path):
  """Each file under the FFI include directory, by relative path, and its contents: the
  headers, not where this virtual environment keeps them, key the cache."""
  for f in sorted(p for p in include.rglob("*") if p.is_file()):
    yield str(f.relative_to(include)).encode()
    yield f.read_bytes()


def _cached_path(compiler: str, include: Path) -> Path:
  """Where the library built by ``compiler`` (its ``--version`` line) against the FFI
  headers in ``include`` is cached: named by a hash of everything that changes the built
  code, and of nothing that differs between virtual environments."""
  digest = hashlib.sha256()
  for part in (*(f.read_bytes() for f in _SOURCES + _HEADERS), *_header_bytes(include),
               jax.__version__.encode(), jaxlib.__version__.encode(), compiler.encode(),
               platform.machine().encode(), _cpu_features(), " ".join(_FLAGS).encode()):
    digest.update(part)
  return cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"


def _build() -> Path:
  """The shared library's path, compiled now unless already in the cache."""
  cxx, identity = _compiler()
  include = Path(jax.ffi.include_dir())
  lib = _cached_path(identity, include)
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  _announce(f"moejax: building CPU kernels into {lib.parent} (once per jax / compiler "
            "version, ~20 s)")
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = Path(tmp) / lib.name
    logs = []
    for extra in (_NATIVE, ()):
      cmd = [*cxx, *_FLAGS, *extra, f"-I{include}", *map(str, _SOURCES), "-o", str(out)]
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if done.returncode == 0:
        break
      logs.append(f"$ {shlex.join(cmd)}\n{done.stderr}")
    else:
      log_file = lib.with_suffix(".log")
      log_file.write_text("\n".join(logs))
      first = next((line for line in done.stderr.splitlines() if "error" in line),
                   (done.stderr.strip().splitlines() or ["no output"])[-1])
      raise RuntimeError(f"{identity or cxx[0]} failed: {first.strip()[:200]} (all of it in "
                         f"{log_file})")
    os.replace(out, lib)   # atomic: processes building at once each leave a whole file
  return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The built kernels with their FFI targets registered; None, with one warning line,
  where that fails (e.g. no C++ compiler)."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    if required():
      raise KernelBuildError(f"moejax's CPU kernels could not be built ({e}) and "
                             "MOEJAX_CPU_KERNELS=1 requires them: install a C++17 compiler "
                             "or set CXX to one, or unset MOEJAX_CPU_KERNELS to run XLA's "
                             "ops instead") from e
    _announce(f"moejax: warning: CPU kernels not built ({e}); XLA's ops run instead, and CPU "
              "steps are slower (PEER / product-key layers most). Install a C++17 compiler "
              "or set CXX to one; MOEJAX_CPU_KERNELS=0 skips the kernels without this line.")
    return None
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def available() -> bool:
  """Builds (or loads) the kernels and registers their FFI targets; False where that fails."""
  return _library() is not None


def usable(group: str, *arrays: jax.Array) -> bool:
  """The kernels of ``group`` (a name in :data:`GROUPS`) run for these float32 operands
  here (see the module doc)."""
  return (all(a.dtype == jnp.float32 for a in arrays) and kernels.current_platform() == "cpu"
          and enabled() and group_on(group) and sharding.mesh_is_local() and available())


def lookup_fused(*arrays: jax.Array) -> bool:
  """The lookup's gathered-row contractions and its scatter both run as kernels for these
  operands: then its callers hold no gathered rows and run all tokens as one chunk (``fused``
  of ``row_ops``)."""
  return usable("lookup", *arrays) and usable("scatter", *arrays)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(x, k)``: ``x [..., n]`` -> values ``[..., k]`` (descending), int32
  indices ``[..., k]``."""
  if not 1 <= k <= x.shape[-1] or not usable("topk", x):
    return row_ops.top_k(x, k)
  out = x.shape[:-1] + (k,)
  aval = jax.typeof(x)   # results vary over the same shard_map axes as x
  call = jax.ffi.ffi_call(TOPK, (aval.update(shape=out, dtype=jnp.float32),
                                 aval.update(shape=out, dtype=jnp.int32)),
                          vmap_method="broadcast_all")
  values, indices = call(x)
  return values, indices


def _same_vma(*arrays):
  """Inside ``shard_map``: the arrays, each varying over the axes any of them varies over
  (a custom call's operands and result share one type). Outside it, unchanged."""
  union = set().union(*(sharding.varying(a) for a in arrays))
  return tuple(a if sharding.varying(a) == union
               else jax.lax.pcast(a, tuple(sorted(union - sharding.varying(a))), to="varying")
               for a in arrays)


# The gathered-row contractions of the product-key lookup (lookup_xla): rows are
# read once and contracted in place; XLA's gather + einsum writes the [T, H, d] rows out
# and reads them back. Each is its einsum on take_rows elsewhere (rows cast to the other
# operand's dtype first, as the reference does). Not differentiable (the lookup's VJP
# calls them).


def _fused(table, indices, *operands) -> bool:
  return (table.ndim == 2 and table.shape[0] > 0 and indices.ndim == 2
          and usable("lookup", table, *operands))


def gather_dot(table: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
  """``out[t, j] = x[t] · table[indices[t, j]]``: ``table [N, d]``, ``indices [T, H]``,
  ``x [T, d]`` -> ``[T, H]`` in ``x.dtype``."""
  if not _fused(table, indices, x):
    return row_ops.gather_dot(table, indices, x)
  table, indices, x = _same_vma(table, indices.astype(jnp.int32), x)
  out = jax.typeof(x).update(shape=indices.shape)
  return jax.ffi.ffi_call(GATHER_DOT, out, vmap_method="sequential")(table, indices, x)


def gather_weighted_sum(table: jax.Array, indices: jax.Array, w: jax.Array) -> jax.Array:
  """``out[t] = Σ_j w[t, j] · table[indices[t, j]]``: ``table [N, d]``, ``indices, w
  [T, H]`` -> ``[T, d]`` in ``w.dtype``."""
  if not _fused(table, indices, w):
    return row_ops.gather_weighted_sum(table, indices, w)
  table, indices, w = _same_vma(table, indices.astype(jnp.int32), w)
  out = jax.typeof(w).update(shape=(w.shape[0], table.shape[1]))
  return jax.ffi.ffi_call(GATHER_WEIGHTED_SUM, out, vmap_method="sequential")(table, indices, w)


def _scatter_runs(accs, targets, *operands) -> bool:
  """The scatter kernels run: accumulators given as float32 ``[R, d]`` shapes (zeros),
  ``targets [T, H]``, and operands the kernels take here."""
  return (targets.ndim == 2 and usable("scatter", *operands)
          and all(isinstance(a, jax.ShapeDtypeStruct) and len(a.shape) == 2
                  and a.dtype == jnp.float32 for a in accs))


def scatter_outer_add(acc: jax.Array | jax.ShapeDtypeStruct, targets: jax.Array, coef: jax.Array,
                      vec: jax.Array) -> jax.Array:
  """``acc.at[targets[t, j]].add(coef[t, j] · vec[t], mode="drop")`` in ``(t, j)`` order:
  ``acc [R, d]`` (a ``ShapeDtypeStruct``: zeros), ``targets, coef [T, H]``, ``vec [T, d]``
  -> ``[R, d]``. The kernel runs from zeros only (the lookup's unchunked backward)."""
  if _scatter_runs((acc,), targets, coef, vec):
    targets, coef, vec = _same_vma(targets.astype(jnp.int32), coef, vec)
    out = jax.typeof(vec).update(shape=acc.shape)
    return jax.ffi.ffi_call(SCATTER_OUTER, out, vmap_method="sequential")(targets, coef, vec)
  return row_ops.scatter_outer_add(acc, targets, coef, vec)


def scatter_outer_add_pair(acc1: jax.Array | jax.ShapeDtypeStruct,
                           acc2: jax.Array | jax.ShapeDtypeStruct, targets: jax.Array,
                           coef1: jax.Array, vec1: jax.Array, coef2: jax.Array,
                           vec2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(scatter_outer_add(acc1, targets, coef1, vec1), scatter_outer_add(acc2, targets,
  coef2, vec2))``; from zeros, as one kernel call where it runs (one grouping of the
  targets; the whole thread pool for both)."""
  if not (_scatter_runs((acc1, acc2), targets, coef1, vec1, coef2, vec2)
          and acc1.shape[0] == acc2.shape[0]):
    return (scatter_outer_add(acc1, targets, coef1, vec1),
            scatter_outer_add(acc2, targets, coef2, vec2))
  targets, coef1, vec1, coef2, vec2 = _same_vma(targets.astype(jnp.int32), coef1, vec1, coef2,
                                                vec2)
  outs = (jax.typeof(vec1).update(shape=acc1.shape), jax.typeof(vec2).update(shape=acc2.shape))
  return tuple(jax.ffi.ffi_call(SCATTER_OUTER_PAIR, outs, vmap_method="sequential")(
      targets, coef1, vec1, coef2, vec2))


def _adam_hyper(lr, b1, b2, eps, c1, c2, scale) -> jax.Array:
  """The Adam kernels' hyperparameters ``[9]``, the constants as XLA would fold them:
  ``1 - b`` in double precision, then float32."""
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in
                    (lr, b1, 1 - b1, b2, 1 - b2, eps, c1, c2, scale)])


def adam_rows(table: jax.Array, mu: jax.Array, nu: jax.Array, rows: jax.Array, grads: jax.Array,
              *, lr, b1: float, b2: float, eps: float, c1, c2, scale=1.0):
  """Lazy Adam on ``rows [M]`` (distinct: a repeated row is an error, raised when the
  computation runs; out-of-range ones skipped) of float32 ``table,
  mu, nu [N, d]`` with gradients ``grads [M, d]``, in place (donate them): the new
  ``(table, mu, nu)``. ``c1, c2``: the bias corrections ``1 - b^count``. The kernel only
  (callers check :func:`usable`); its XLA form is ``training.row_sparse``'s chunked update.
  """
  hyper = _adam_hyper(lr, b1, b2, eps, c1, c2, scale)
  table, mu, nu, rows, grads, hyper = _same_vma(table, mu, nu, rows.astype(jnp.int32), grads,
                                                hyper)
  call = jax.ffi.ffi_call(ADAM_ROWS, (jax.typeof(table), jax.typeof(mu), jax.typeof(nu)),
                          vmap_method="sequential", input_output_aliases={0: 0, 1: 1, 2: 2})
  return call(table, mu, nu, rows, grads, hyper)


def sum_squares_rows(rows: jax.Array, g: jax.Array, num_rows: int) -> jax.Array:
  """``jnp.sum(g * g)`` (float32 scalar) of row gradients ``g [U, d]`` whose slots with
  ``rows [U]`` out of ``[0, num_rows)`` (padding) hold zeros: the kernel skips those
  slots and sums the rest on all threads, in double per block of slots."""
  if g.ndim != 2 or not usable("adam_rows", g):
    return jnp.sum(g * g)
  rows, g = _same_vma(rows.astype(jnp.int32), g)
  out = jax.typeof(g).update(shape=())
  return jax.ffi.ffi_call(SUM_SQUARES_ROWS, out, vmap_method="sequential")(
      rows, g, num_rows=np.int64(num_rows))


# ------------------------------------------------------------------------------- attention


def attention_usable(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     sin: jax.Array | None = None, cos: jax.Array | None = None) -> bool:
  """:func:`attention` runs its kernel for these operands here: float32 ``q [B, Lq, H, D]``,
  ``k, v [B, Lk, H, D]``, a bool mask ``[1 | B, 1, Lq | 1, Lk | 1]`` (the same for every
  head), rotary ``sin, cos`` (if any) ``[1 | B, L, D / 2]`` with ``Lq = Lk = L``, and
  :func:`usable`."""
  if q.ndim != 4 or k.ndim != 4 or mask.ndim != 4:
    return False
  b, lq, h, d = q.shape
  lk = k.shape[1]
  rope_ok = (sin is None and cos is None) or (
      sin is not None and cos is not None and sin.shape == cos.shape and sin.ndim == 3
      and sin.shape[0] in (1, b) and lq == lk and d % 2 == 0 and sin.shape[1:] == (lq, d // 2))
  return (k.shape == v.shape == (b, lk, h, d) and d > 0 and lk > 0 and rope_ok
          and mask.dtype == jnp.bool_ and mask.shape[0] in (1, b) and mask.shape[1] == 1
          and usable("attention", q, k, v, *(() if sin is None else (sin, cos))))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              sin: jax.Array | None = None, cos: jax.Array | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention(q, k, v, mask=mask)``, ``q`` and ``k`` first rotated by
  ``sin, cos [1 | B, L, D / 2]`` (rotary positions, rotate-half; None: not rotated):
  ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]``, bool ``mask [1 | B, 1, Lq, Lk]`` (True: the
  query may see the key) -> ``[B, Lq, H, D]``.

  Where :func:`attention_usable`, one kernel (``cpu_attention.cc``) per (batch, head) in
  cache: rotation, scores and softmax of a block of queries at a time over only the keys the
  block may see, its small matmuls in registers; the backward recomputes the probabilities
  from the saved log-sum-exp, and rotates the gradients back. Elsewhere its XLA form,
  ``attention_xla.attention``.
  """
  if (sin is None) != (cos is None):
    raise ValueError("attention: give both sin and cos (rotary positions), or neither")
  if not attention_usable(q, k, v, mask, sin, cos):
    return attention_xla.attention(q, k, v, mask, sin, cos)
  rotate = sin is not None
  lq, lk = q.shape[1], k.shape[1]
  mask = jnp.broadcast_to(mask, (mask.shape[0], 1, lq, lk))[:, 0]
  # The mask as the kernel's float32 bias [1 | B, Lq, Lk]: 0 where True, -inf where False.
  bias = jnp.where(mask, 0.0, -jnp.inf).astype(jnp.float32)
  if not rotate:   # placeholders, not read
    sin = cos = jnp.zeros((1, 1, 1), jnp.float32)
  return _attention(rotate, q, k, v, bias, sin, cos)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(rotate, q, k, v, bias, sin, cos):
  return _attention_fwd(rotate, q, k, v, bias, sin, cos)[0]


def _attention_fwd(rotate, q, k, v, bias, sin, cos):
  b, lq, h, _ = q.shape
  operands = _same_vma(q, k, v, bias, sin, cos)
  aval = jax.typeof(operands[0])
  o, lse = jax.ffi.ffi_call(ATTENTION_FWD, (aval, aval.update(shape=(b, h, lq))),
                            vmap_method="sequential")(*operands, rotate=np.bool_(rotate))
  return o, (q, k, v, bias, sin, cos, o, lse)


def _attention_bwd(rotate, res, do):
  q, k, v, bias, sin, cos, o, lse = res
  operands = _same_vma(q, k, v, bias, sin, cos, o, lse, do)
  aval = jax.typeof(operands[0])
  dq, dk, dv = jax.ffi.ffi_call(ATTENTION_BWD, (aval, aval.update(shape=k.shape),
                                                aval.update(shape=v.shape)),
                                vmap_method="sequential")(*operands, rotate=np.bool_(rotate))
  return (sharding.match_vma(dq, q), sharding.match_vma(dk, k), sharding.match_vma(dv, v),
          None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


# The activations the routed FFN kernel computes (its codes, ``cpu_decode.cc``).
_ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


def routed_ffn_usable(x: jax.Array, wi: jax.Array, wg: jax.Array | None, wo: jax.Array,
                      activation: str) -> bool:
  """:func:`routed_ffn` runs for these operands here (float32, a known activation)."""
  return activation in _ACTIVATION_CODES and usable("routed_ffn", x, wi, wo,
                                                     *(() if wg is None else (wg,)))


def routed_ffn(x: jax.Array, expert: jax.Array, weight: jax.Array, wi: jax.Array,
               wg: jax.Array | None, wo: jax.Array, activation: str) -> jax.Array:
  """``y[t] = Σ_j weight[t, j] · FFN_{expert[t, j]}(x[t])`` (``cpu_decode.cc``), no gradient.

  ``x [T, D]``, ``expert [T, K]`` int32 (outside ``[0, E)``: no expert), ``weight [T, K]``,
  ``wi, wg [E, D, F]`` (``wg`` None: no gate), ``wo [E, F, D]`` -> ``[T, D]`` float32. Each
  chosen expert's weights are read once, in place, by all threads: for a few tokens
  (decoding) the FFN then runs at about the memory's rate, where XLA copies each expert's
  matrices out of the stack first. Callers check :func:`routed_ffn_usable`.
  """
  gated = wg is not None
  operands = (x, expert.astype(jnp.int32), weight.astype(jnp.float32), wi,
              wg if gated else wi, wo)
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return jax.ffi.ffi_call(ROUTED_FFN, out, vmap_method="sequential")(
      *operands, activation=np.int64(_ACTIVATION_CODES[activation]), gated=np.bool_(gated))


def few_row_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [N, D] @ w [D, C]`` -> ``[N, C]`` float32 (``cpu_decode.cc``), no gradient: for a
  few rows (decoding's tokens) each weight row is read once, several rows at a time, by all
  threads. Callers check :func:`usable` (group ``few_row_matmul``)."""
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(FEW_ROW_MATMUL, out, vmap_method="sequential")(x, w)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """``q [B, N, H, Dh]`` over the cache ``k, v [B, T, KV, Dh]`` where ``mask [B, N, T]``
  (bool) -> ``[B, N, H, Dh]`` float32: the values of ``jax.nn.dot_product_attention(q, k, v,
  mask=mask[:, None])`` (``cpu_decode.cc``), no gradient. Callers check :func:`usable`
  (group ``cached_attention``)."""
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.ffi.ffi_call(CACHED_ATTENTION, out, vmap_method="sequential")(
      q, k, v, mask.astype(jnp.uint8))
