// C++ kernels for XLA:CPU, XLA FFI custom calls (see cpu_kernels.py).
//
// MoejaxTopKF32: the same result as jax.lax.top_k: per row of x [rows, n], the k largest values in
// descending order and their indices, equal values in index order, in the total order
// -NaN < -inf < ... < -0 < +0 < ... < inf < NaN.
//
// Why: XLA:CPU's TopK sorts partially per row, ~4.6 us for k = 16 of n = 1024 on a Xeon
// core, ~57% of the PEER layer's forward at N = 1024². Here, per row:
//   1. the maximum of each group of 16 entries (a vectorised pass over the row);
//   2. tau = the k-th largest group maximum, by counting (vectorised, no branches). The k
//      largest maxima are k distinct entries, so tau <= the row's k-th largest entry, and
//      every top-k entry lies in a group whose maximum is >= tau;
//   3. the entries >= tau of those groups (about k + 2 for k = 16 of 1024, in index order)
//      go through a sorted k-buffer by insertion.
// 0.66 us per row for k = 16 of 1024 on the same core (rows in cache; 0.9 us without
// -march=native), against 1.3 us for a threshold-free insertion pass.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace moejax_cpu;

namespace {

// Float bits -> int32 whose signed order is the total order above.
inline int32_t Key(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b ^ ((b >> 31) & 0x7fffffff);
}

// Top k of one row x [n] into values / indices [k]. scratch: groups + n + k int32.
void TopKRow(const float* x, int64_t n, int64_t k, float* values, int32_t* indices,
             int32_t* scratch) {
  constexpr int64_t kGroup = 16;
  const int64_t groups = (n + kGroup - 1) / kGroup, full = n / kGroup;
  int32_t* maxima = scratch;                  // [groups]
  int32_t* cand = scratch + groups;           // [n] candidate indices, in index order
  int32_t* keys = scratch + groups + n;       // [k] keys of the sorted k-buffer
  for (int64_t g = 0; g < full; ++g) {
    int32_t best = std::numeric_limits<int32_t>::min();
    const float* xg = x + g * kGroup;
    for (int64_t i = 0; i < kGroup; ++i) best = std::max(best, Key(xg[i]));
    maxima[g] = best;
  }
  if (full < groups) {
    int32_t best = std::numeric_limits<int32_t>::min();
    for (int64_t i = full * kGroup; i < n; ++i) best = std::max(best, Key(x[i]));
    maxima[full] = best;
  }
  // tau: the smallest maximum with fewer than k larger ones (with fewer than k groups,
  // no bound: every entry is a candidate).
  int32_t tau = std::numeric_limits<int32_t>::min();
  if (groups >= k) {
    tau = std::numeric_limits<int32_t>::max();
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t mg = maxima[g];
      int64_t larger = 0;
      for (int64_t j = 0; j < groups; ++j) larger += maxima[j] > mg;
      tau = larger < k ? std::min(tau, mg) : tau;
    }
  }
  int64_t c = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (maxima[g] < tau) continue;
    const int64_t lo = g * kGroup, hi = std::min(n, lo + kGroup);
    for (int64_t i = lo; i < hi; ++i) {   // branch-free compaction
      cand[c] = static_cast<int32_t>(i);
      c += Key(x[i]) >= tau;
    }
  }
  // Candidates arrive in index order: an equal key never passes an earlier one.
  int64_t m = 0;
  for (int64_t j = 0; j < c; ++j) {
    const int32_t i = cand[j], key = Key(x[i]);
    int64_t p;
    if (m < k) {
      p = m++;
    } else if (key > keys[k - 1]) {
      p = k - 1;
    } else {
      continue;
    }
    while (p > 0 && keys[p - 1] < key) {
      keys[p] = keys[p - 1];
      indices[p] = indices[p - 1];
      --p;
    }
    keys[p] = key;
    indices[p] = i;
  }
  for (int64_t j = 0; j < k; ++j) values[j] = x[indices[j]];
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices) {
  auto dims = x.dimensions();
  if (dims.size() < 1) {
    return ffi::Error::InvalidArgument("top_k: x must have at least one dimension");
  }
  const int64_t n = dims.back();
  const int64_t k = values->dimensions().back();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("top_k: k must be in [1, n]");
  }
  const int64_t rows = n ? static_cast<int64_t>(x.element_count()) / n : 0;
  const float* xs = x.typed_data();
  float* vs = values->typed_data();
  int32_t* is = indices->typed_data();
  ParallelFor(pool, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> scratch((n + 15) / 16 + n + k);
    for (int64_t r = begin; r < end; ++r) {
      TopKRow(xs + r * n, n, k, vs + r * k, is + r * k, scratch.data());
    }
  });
  return ffi::Error::Success();
}

// How many retrievals ahead the row kernels prefetch. A 1 KiB row is 16 cache lines
// that the hardware prefetcher, which does not cross 4 KiB pages or guess random jumps,
// would fetch one miss at a time.
constexpr int64_t kAhead = 16;

// Asks for the cache lines of row [d] (a hint: no fault, no effect on results), into L2
// (locality 1): 16 rows ahead into L2 kept more misses in flight than 8 into L1, whose
// few fill buffers the prefetches then held. Random 1 KiB rows of 1 GiB tables, 4096 x 128
// retrievals, two threads: gather_dot / gather_weighted_sum 81-93 -> 61-68 ms, adam_rows
// (412K rows) 135-140 -> 130-132 ms; unchanged on cache-resident tables.
inline void PrefetchRow(const float* row, int64_t d) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t l = 0; l < d; l += kLine) __builtin_prefetch(row + l, 0, 1);
}

// out[i] = table[clip(indices[i], 0, N - 1)] for table [N, d], out [..., d]. Rows are
// whole-row copies, and the rows kAhead retrievals on are prefetched: on random 1 KiB rows
// of a 1 GiB table one core copied 3.2 GB/s this way, against 2.2 without prefetching
// and 1.6 for XLA's gather.
ffi::Error TakeRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                        ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> out) {
  auto dims = table.dimensions();
  if (dims.size() != 2 || dims[0] < 1) {
    return ffi::Error::InvalidArgument("take_rows: table must be [N >= 1, d]");
  }
  const int64_t n = dims[0], d = dims[1];
  const int64_t m = static_cast<int64_t>(indices.element_count());
  const float* rows = table.typed_data();
  const int32_t* idx = indices.typed_data();
  float* o = out->typed_data();
  auto row = [&](int64_t i) {
    const int64_t r = std::min<int64_t>(std::max<int64_t>(idx[i], 0), n - 1);
    return rows + r * d;
  };
  ParallelFor(pool, m, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kAhead < end) PrefetchRow(row(i + kAhead), d);
      std::memcpy(o + i * d, row(i), static_cast<size_t>(d) * sizeof(float));
    }
  });
  return ffi::Error::Success();
}


// The gathered-row contractions of the PEER / PKM lookup (lookup_reference.py), on rows
// read once and never written out: XLA's gather + einsum writes the [T, H, d] rows and
// reads them back, twice the traffic of the random row reads themselves.

// Row r of table [n, d], the index clipped into [0, n) (jnp.take's mode="clip").
inline const float* ClippedRow(const float* table, int64_t n, int64_t d, int32_t r) {
  return table + std::min<int64_t>(std::max<int32_t>(r, 0), n - 1) * d;
}

// sum_i a[i] * b[i] in 16 lanes (vectorised without reassociation flags), lanes summed in
// a fixed order.
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  constexpr int64_t kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (int64_t l = 0; i < d; ++i, ++l) acc[l] += a[i] * b[i];
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

bool LookupShapes(ffi::Buffer<ffi::F32>& table, ffi::Buffer<ffi::S32>& indices, int64_t& n,
                  int64_t& d, int64_t& t, int64_t& h) {
  auto td = table.dimensions(), id = indices.dimensions();
  if (td.size() != 2 || td[0] < 1 || id.size() != 2) return false;
  n = td[0], d = td[1], t = id[0], h = id[1];
  return true;
}

// out[t, j] = x[t] . table[indices[t, j]]   (table [N, d], indices [T, H], x [T, d]).
ffi::Error GatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                         ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, d, t, h;
  if (!LookupShapes(table, indices, n, d, t, h)) {
    return ffi::Error::InvalidArgument("gather_dot: table [N >= 1, d], indices [T, H]");
  }
  const float* rows = table.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* xs = x.typed_data();
  float* o = out->typed_data();
  ParallelFor(pool, t, 16, [&](int64_t begin, int64_t end) {
    const int64_t last = end * h;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < h; ++j) {
        const int64_t p = i * h + j;
        if (p + kAhead < last) PrefetchRow(ClippedRow(rows, n, d, idx[p + kAhead]), d);
        o[p] = Dot(xs + i * d, ClippedRow(rows, n, d, idx[p]), d);
      }
    }
  });
  return ffi::Error::Success();
}

// out[t] = sum_j w[t, j] * table[indices[t, j]], j ascending   (w [T, H], out [T, d]).
ffi::Error GatherWeightedSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                                 ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> w,
                                 ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, d, t, h;
  if (!LookupShapes(table, indices, n, d, t, h)) {
    return ffi::Error::InvalidArgument(
        "gather_weighted_sum: table [N >= 1, d], indices [T, H]");
  }
  const float* rows = table.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* ws = w.typed_data();
  float* o = out->typed_data();
  ParallelFor(pool, t, 16, [&](int64_t begin, int64_t end) {
    const int64_t last = end * h;
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict y = o + i * d;
      std::fill(y, y + d, 0.f);
      for (int64_t j = 0; j < h; ++j) {
        const int64_t p = i * h + j;
        if (p + kAhead < last) PrefetchRow(ClippedRow(rows, n, d, idx[p + kAhead]), d);
        const float c = ws[p];
        const float* __restrict r = ClippedRow(rows, n, d, idx[p]);
        for (int64_t l = 0; l < d; ++l) y[l] += c * r[l];
      }
    }
  });
  return ffi::Error::Success();
}

// Outputs larger than this are written with non-temporal stores: they cannot stay in
// cache for their reader anyway, and a plain store first reads each line it writes (half
// the traffic: 100 vs 56 ms for the 512 MiB scatter below on one Xeon core).
constexpr int64_t kStreamBytes = int64_t{64} << 20;

#if defined(__AVX512F__)
constexpr int64_t kStreamLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kStreamLanes = 8;
#else
constexpr int64_t kStreamLanes = 0;   // no streaming stores: plain copies
#endif

// Rows [d] at dst can take aligned vector stores.
inline bool CanStream(const float* dst, int64_t d) {
  return kStreamLanes > 0 && reinterpret_cast<uintptr_t>(dst) % (kStreamLanes * 4) == 0 &&
         d % std::max<int64_t>(kStreamLanes, 1) == 0;
}

// dst[0, d) = src[0, d), bypassing the cache when stream (CanStream(dst, d) must hold).
inline void StoreRow(float* dst, const float* src, int64_t d, bool stream) {
#if defined(__AVX512F__)
  if (stream) {
    for (int64_t l = 0; l < d; l += 16) _mm512_stream_ps(dst + l, _mm512_loadu_ps(src + l));
    return;
  }
#elif defined(__AVX__)
  if (stream) {
    for (int64_t l = 0; l < d; l += 8) _mm256_stream_ps(dst + l, _mm256_loadu_ps(src + l));
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(float));
}

// Orders this thread's streaming stores before what follows (the part's completion, which
// other threads wait on).
inline void StreamFence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// One scatter of scatter_outer: out [R, d] from coef [T, H] and vec [T, d].
struct OuterScatter {
  const float* coef;
  const float* vec;
  float* out;
  int64_t d;
  bool stream;   // non-temporal stores (see kStreamBytes)
};

// Runs of a stable counting sort of ids [M] into r buckets (ids outside [0, r) dropped):
// run b is order[start[b] .. start[b + 1]), the positions e of ids[e] == b, ascending.
struct Runs {
  std::vector<int64_t> start;   // [r + 1]
  std::vector<int32_t> order;   // [start[r]]
};

Runs CountingSort(const int32_t* ids, int64_t m, int64_t r) {
  Runs runs{std::vector<int64_t>(r + 1, 0), {}};
  auto& start = runs.start;
  for (int64_t e = 0; e < m; ++e) {
    if (ids[e] >= 0 && ids[e] < r) ++start[ids[e] + 1];
  }
  for (int64_t b = 0; b < r; ++b) start[b + 1] += start[b];
  runs.order.resize(start[r]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < m; ++e) {
    if (ids[e] >= 0 && ids[e] < r) runs.order[fill[ids[e]]++] = static_cast<int32_t>(e);
  }
  return runs;
}

// How many retrievals ahead in a run RunSum prefetches its token row (vec rows are random
// L3 reads: 35 -> 20 ms for factored_adam_rows at N = 128², runs of ~32; 2 and 8 the same).
constexpr int64_t kRunAhead = 4;

// y[0, d) = sum over q in [begin, end), in order, of coef[order[q]] * vec[order[q] / h]:
// one row's gradient from the lookup's factors (coef per retrieval, vec [T, d] per token).
inline void RunSum(const int32_t* order, int64_t begin, int64_t end, const float* coef,
                   const float* vec, int64_t h, int64_t d, float* __restrict y) {
  std::fill(y, y + d, 0.f);
  for (int64_t q = begin; q < end; ++q) {
    if (q + kRunAhead < end) PrefetchRow(vec + (order[q + kRunAhead] / h) * d, d);
    const int64_t p = order[q];
    const float c = coef[p];
    const float* __restrict v = vec + (p / h) * d;
    for (int64_t l = 0; l < d; ++l) y[l] += c * v[l];
  }
}

// Each out [R, d] = 0, then out[targets[t, j]] += coef[t, j] * vec[t] in (t, j) order,
// targets outside [0, R) dropped (scatter-add's mode="drop"). The (t, j) pairs are first
// grouped by target (a stable counting sort, so each group stays in (t, j) order, shared by
// every scatter of the call); then each output row is summed in a local buffer from its
// group's rows of vec and written once, rows in order. Deterministic, the same sums in the
// same order as one serial pass, whatever the thread count. Scattering pair by pair
// instead writes random 1 KiB rows of a buffer far larger than the caches (read-modify-
// write, plus a zero-fill pass), while vec [T, d] is small and stays cached: 2-3x slower
// at R = 512K, d = 256. (No accumulator operand: one aliased to the output made XLA copy a
// whole table the lookup reads, before the optimizer's in-place update of it.)
void ScatterOuterRows(ffi::ThreadPool& pool, const int32_t* tg, int64_t t, int64_t h,
                      int64_t r, const std::vector<OuterScatter>& scatters) {
  const Runs runs = CountingSort(tg, t * h, r);
  int64_t width = 0;
  bool stream = false;
  for (const auto& sc : scatters) width = std::max(width, sc.d), stream |= sc.stream;
  ParallelFor(pool, r, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(width);
    for (int64_t row = begin; row < end; ++row) {
      for (const OuterScatter& sc : scatters) {
        RunSum(runs.order.data(), runs.start[row], runs.start[row + 1], sc.coef, sc.vec, h,
               sc.d, acc.data());
        StoreRow(sc.out + row * sc.d, acc.data(), sc.d, sc.stream);
      }
    }
    if (stream) StreamFence();
  });
}

// Checks one scatter's operands against targets [T, H] and R; fills sc.
bool OuterOperands(ffi::Buffer<ffi::F32>& coef, ffi::Buffer<ffi::F32>& vec,
                   ffi::ResultBuffer<ffi::F32>& out, int64_t t, int64_t h, int64_t r,
                   OuterScatter& sc) {
  auto od = out->dimensions(), vd = vec.dimensions();
  if (od.size() != 2 || od[0] != r || vd.size() != 2 || vd[0] != t || vd[1] != od[1] ||
      coef.element_count() != static_cast<size_t>(t * h)) {
    return false;
  }
  sc = {coef.typed_data(), vec.typed_data(), out->typed_data(), od[1], false};
  sc.stream = CanStream(sc.out, sc.d) && r * sc.d * int64_t{sizeof(float)} > kStreamBytes;
  return true;
}

// out [R, d]: see ScatterOuterRows.
ffi::Error ScatterOuterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> targets,
                            ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> vec,
                            ffi::ResultBuffer<ffi::F32> out) {
  auto td = targets.dimensions();
  std::vector<OuterScatter> scatters(1);
  if (td.size() != 2 || out->dimensions().size() != 2 ||
      !OuterOperands(coef, vec, out, td[0], td[1], out->dimensions()[0], scatters[0])) {
    return ffi::Error::InvalidArgument("scatter_outer: targets, coef [T, H], vec [T, d], out [R, d]");
  }
  ScatterOuterRows(pool, targets.typed_data(), td[0], td[1], out->dimensions()[0], scatters);
  return ffi::Error::Success();
}

// Two scatters with the same targets (out1 from coef1, vec1; out2 from coef2, vec2) in one
// pass: one counting sort, and one call that has the whole thread pool (XLA would run two
// calls side by side, each on one thread).
ffi::Error ScatterOuterPairImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> targets,
                                ffi::Buffer<ffi::F32> coef1, ffi::Buffer<ffi::F32> vec1,
                                ffi::Buffer<ffi::F32> coef2, ffi::Buffer<ffi::F32> vec2,
                                ffi::ResultBuffer<ffi::F32> out1,
                                ffi::ResultBuffer<ffi::F32> out2) {
  auto td = targets.dimensions();
  std::vector<OuterScatter> scatters(2);
  if (td.size() != 2 || out1->dimensions().size() != 2 ||
      !OuterOperands(coef1, vec1, out1, td[0], td[1], out1->dimensions()[0], scatters[0]) ||
      !OuterOperands(coef2, vec2, out2, td[0], td[1], out1->dimensions()[0], scatters[1])) {
    return ffi::Error::InvalidArgument(
        "scatter_outer_pair: targets, coefs [T, H], vecs [T, d_i], outs [R, d_i]");
  }
  ScatterOuterRows(pool, targets.typed_data(), td[0], td[1], out1->dimensions()[0], scatters);
  return ffi::Error::Success();
}

// adam_rows' hyperparameters by value: read through the lambda's captures, the compiler
// must assume a store to a row could change them, and leaves the row loop scalar.
struct AdamHyper {
  explicit AdamHyper(const float* h)
      : lr(h[0]), b1(h[1]), one_b1(h[2]), b2(h[3]), one_b2(h[4]), eps(h[5]), c1(h[6]),
        c2(h[7]), scale(h[8]) {}
  float lr, b1, one_b1, b2, one_b2, eps, c1, c2, scale;
};

inline void AdamRow(const AdamHyper hy, const float* __restrict g, float* __restrict pr,
                    float* __restrict mr, float* __restrict vr, int64_t d) {
  for (int64_t l = 0; l < d; ++l) {
    const float gl = g[l] * hy.scale;
    const float ml = hy.b1 * mr[l] + hy.one_b1 * gl;
    const float vl = hy.b2 * vr[l] + hy.one_b2 * gl * gl;
    mr[l] = ml;
    vr[l] = vl;
    pr[l] = pr[l] - hy.lr * (ml / hy.c1) / (std::sqrt(vl / hy.c2) + hy.eps);
  }
}

// For each slot s with row = rows[s] in [0, N) (others skipped), the Adam update of
// table[row], mu[row], nu[row] in place with gradient grad(s, scratch) (a pointer to d
// floats; scratch is this thread's [d] buffer). The rows kAhead slots on are prefetched.
template <typename Grad>
void AdamOnRows(ffi::ThreadPool& pool, ffi::ResultBuffer<ffi::F32>& table,
                ffi::ResultBuffer<ffi::F32>& mu, ffi::ResultBuffer<ffi::F32>& nu,
                ffi::Buffer<ffi::S32>& rows, const AdamHyper hy, const Grad& grad) {
  const int64_t n = table->dimensions()[0], d = table->dimensions()[1];
  float* p = table->typed_data();
  float* mo = mu->typed_data();
  float* vo = nu->typed_data();
  const int32_t* rs = rows.typed_data();
  ParallelFor(pool, static_cast<int64_t>(rows.element_count()), 256,
              [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(d);
    for (int64_t s = begin; s < end; ++s) {
      if (s + kAhead < end && rs[s + kAhead] >= 0 && rs[s + kAhead] < n) {
        const int64_t next = rs[s + kAhead] * d;
        PrefetchRow(p + next, d);
        PrefetchRow(mo + next, d);
        PrefetchRow(vo + next, d);
      }
      const int64_t row = rs[s];
      if (row < 0 || row >= n) continue;
      AdamRow(hy, grad(s, scratch.data()), p + row * d, mo + row * d, vo + row * d, d);
    }
  });
}

// Lazy Adam on the rows of a table and its moments (moejax.training.row_sparse), in place
// (outputs alias inputs 0-2): for each slot s with row = rows[s] in [0, N) (others skipped):
//   g = grads[s] * scale;  m = b1·mu[row] + (1-b1)·g;  v = b2·nu[row] + (1-b2)·g²;
//   table[row] -= lr · (m / c1) / (sqrt(v / c2) + eps)
// with hyper = [lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, scale]. Rows must be distinct (slots
// run in parallel). Each row is read and written once, nothing else is touched: XLA's
// gather-update-scatter form moves every row through two temporaries.
ffi::Error AdamRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                        ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                        ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> grads,
                        ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> table_out,
                        ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out) {
  auto td = table.dimensions();
  if (td.size() != 2 || grads.dimensions().size() != 2 || hyper.element_count() != 9) {
    return ffi::Error::InvalidArgument("adam_rows: table [N, d], grads [M, d], hyper [9]");
  }
  if (table_out->typed_data() != table.typed_data() || mu_out->typed_data() != mu.typed_data() ||
      nu_out->typed_data() != nu.typed_data()) {
    return ffi::Error::InvalidArgument("adam_rows: outputs must alias table, mu, nu");
  }
  const float* gs = grads.typed_data();
  const int64_t d = td[1];
  AdamOnRows(pool, table_out, mu_out, nu_out, rows, AdamHyper(hyper.typed_data()),
             [&](int64_t s, float*) { return gs + s * d; });
  return ffi::Error::Success();
}

// sum over slots s with 0 <= rows[s] < num_rows of |g[s]|^2, for g [U, d]: the row-sparse
// tables' share of the global clip norm. Only the slots in use are read (padding, ~20% of
// the slots at N = 1024², holds zeros), on all pool threads: XLA's reduce read all of a
// 512 MiB tap gradient on one. Blocks of kSumBlock slots are summed in double, then in
// block order: the same bits whatever the thread count.
constexpr int64_t kSumBlock = 2048;

ffi::Error SumSquaresRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> rows,
                              ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> out,
                              int64_t num_rows) {
  auto gd = g.dimensions();
  if (gd.size() != 2 || static_cast<int64_t>(rows.element_count()) != gd[0]) {
    return ffi::Error::InvalidArgument("sum_squares_rows: rows [U], g [U, d]");
  }
  const int64_t u = gd[0], d = gd[1];
  const int32_t* rs = rows.typed_data();
  const float* gs = g.typed_data();
  const int64_t blocks = (u + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(blocks, 0.0);
  ParallelFor(pool, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double acc = 0.0;
      for (int64_t s = b * kSumBlock; s < std::min(u, (b + 1) * kSumBlock); ++s) {
        if (rs[s] < 0 || rs[s] >= num_rows) continue;
        acc += Dot(gs + s * d, gs + s * d, d);
      }
      partial[b] = acc;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  *out->typed_data() = static_cast<float>(total);
  return ffi::Error::Success();
}

// ------------------------------------------------- row gradients as the lookup's factors
//
// Row-sparse training on CPU (training/row_sparse.py) keeps a table's row gradients as the
// lookup's factors instead of writing them out: slot s (a distinct retrieved row) has
//   g[s] = sum over retrievals e with slots[e] == s, in retrieval order, of coefs[e] * vec[e / H]
// (coefs, slots [T, H]; vec [T, d]: the tokens' inputs or output gradients, a few MiB that
// stay in cache). slot_runs groups the retrievals by slot once; the clip norm and lazy Adam
// then each rebuild g[s] in a local buffer from its run. Written out, the [U, d] gradients
// were 512 MiB per table at N = 1024², 4096 tokens: written by the scatter, read for the
// norm and read again by Adam, ~40% of the row-sparse step's DRAM traffic.

// order [M] and starts [U + 1] (int32) of CountingSort(slots, M, U) as XLA buffers.
ffi::Error SlotRunsImpl(ffi::Buffer<ffi::S32> slots, ffi::ResultBuffer<ffi::S32> order,
                        ffi::ResultBuffer<ffi::S32> starts) {
  const int64_t m = static_cast<int64_t>(slots.element_count());
  const int64_t u = static_cast<int64_t>(starts->element_count()) - 1;
  if (u < 0 || static_cast<int64_t>(order->element_count()) != m ||
      m > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("slot_runs: slots [M < 2^31], order [M], starts [U + 1]");
  }
  const int32_t* ids = slots.typed_data();
  // Every retrieval has a slot (row_slots): the factored norm's diagonal sums them all.
  if (std::any_of(ids, ids + m, [u](int32_t s) { return s < 0 || s >= u; })) {
    return ffi::Error::InvalidArgument("slot_runs: every slot must be in [0, U)");
  }
  const Runs runs = CountingSort(ids, m, u);
  std::copy(runs.order.begin(), runs.order.end(), order->typed_data());
  int32_t* st = starts->typed_data();
  for (int64_t b = 0; b <= u; ++b) st[b] = static_cast<int32_t>(runs.start[b]);
  return ffi::Error::Success();
}

// The operands shared by the factored kernels: runs (order [M], starts [U + 1]) over
// coefs [T, H] and vec [T, d].
struct Factors {
  const int32_t* order;
  const int32_t* starts;
  const float* coefs;
  const float* vec;
  int64_t u, h, d;

  void Row(int64_t s, float* y) const {
    RunSum(order, starts[s], starts[s + 1], coefs, vec, h, d, y);
  }
  bool Empty(int64_t s) const { return starts[s] == starts[s + 1]; }
};

bool FactorOperands(ffi::Buffer<ffi::S32>& order, ffi::Buffer<ffi::S32>& starts,
                    ffi::Buffer<ffi::F32>& coefs, ffi::Buffer<ffi::F32>& vec, Factors& f) {
  auto cd = coefs.dimensions(), vd = vec.dimensions();
  if (cd.size() != 2 || vd.size() != 2 || cd[0] != vd[0] ||
      order.element_count() != coefs.element_count() || starts.element_count() < 1) {
    return false;
  }
  f = {order.typed_data(), starts.typed_data(), coefs.typed_data(), vec.typed_data(),
       static_cast<int64_t>(starts.element_count()) - 1, cd[1], vd[1]};
  return true;
}

// sum over slots of |g[s]|^2 = sum_e c_e^2 |v_e|^2 + 2 sum_{e < e' in a run} c_e c_e' (v_e . v_e'):
// the first sum over all retrievals e in order (coefs read once, with the tokens' squared
// norms), the cross terms only for slots retrieved more than once (~1/3 of them at N =
// 1024², 4096 tokens, most twice or three times). Rebuilding every g[s] instead read a
// random 1 KiB row of vec per retrieval: 2x the time (212 vs ~105 ms of thread time). Equal to
// sum_squares_rows of the written-out gradients up to rounding (double sums over fixed
// blocks, then in block order: the same bits whatever the thread count).
// Runs up to this long take their cross terms pair by pair; longer ones rebuild g[s].
constexpr int64_t kPairwiseRun = 8;

ffi::Error FactoredSumSquaresImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> order,
                                  ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::F32> coefs,
                                  ffi::Buffer<ffi::F32> vec, ffi::ResultBuffer<ffi::F32> out) {
  Factors f;
  if (!FactorOperands(order, starts, coefs, vec, f)) {
    return ffi::Error::InvalidArgument(
        "factored_sum_squares: order [M], starts [U + 1], coefs [T, H], vec [T, d]");
  }
  const int64_t tokens = static_cast<int64_t>(vec.dimensions()[0]);
  const int64_t token_blocks = (tokens + kSumBlock - 1) / kSumBlock;
  const int64_t slot_blocks = (f.u + kSumBlock - 1) / kSumBlock;
  std::vector<double> norms(tokens), partial(token_blocks + slot_blocks, 0.0);
  ParallelFor(pool, token_blocks, 1, [&](int64_t begin, int64_t end) {   // the diagonal
    for (int64_t b = begin; b < end; ++b) {
      double acc = 0.0;
      for (int64_t t = b * kSumBlock; t < std::min(tokens, (b + 1) * kSumBlock); ++t) {
        norms[t] = Dot(f.vec + t * f.d, f.vec + t * f.d, f.d);
        double c2 = 0.0;
        for (int64_t j = 0; j < f.h; ++j) c2 += double{f.coefs[t * f.h + j]} * f.coefs[t * f.h + j];
        acc += c2 * norms[t];
      }
      partial[b] = acc;
    }
  });
  ParallelFor(pool, slot_blocks, 1, [&](int64_t begin, int64_t end) {   // repeated rows
    std::vector<float> g(f.d);
    for (int64_t b = begin; b < end; ++b) {
      double acc = 0.0;
      for (int64_t s = b * kSumBlock; s < std::min(f.u, (b + 1) * kSumBlock); ++s) {
        const int64_t first = f.starts[s], last = f.starts[s + 1];
        if (last - first < 2) continue;
        if (last - first <= kPairwiseRun) {   // the cross terms 2 c c' (v . v')
          for (int64_t q = first; q + 1 < last; ++q) {
            const int64_t p = f.order[q], t = p / f.h;
            for (int64_t q2 = q + 1; q2 < last; ++q2) {
              const int64_t p2 = f.order[q2], t2 = p2 / f.h;
              const double dot = t == t2 ? norms[t] : Dot(f.vec + t * f.d, f.vec + t2 * f.d, f.d);
              acc += 2.0 * f.coefs[p] * f.coefs[p2] * dot;
            }
          }
          continue;
        }
        // A long run (a row many tokens retrieve): |g|^2 minus its diagonal terms, linear
        // in the run's length where the pairs are quadratic.
        f.Row(s, g.data());
        double diag = 0.0;
        for (int64_t q = first; q < last; ++q) {
          const double c = f.coefs[f.order[q]];
          diag += c * c * norms[f.order[q] / f.h];
        }
        acc += Dot(g.data(), g.data(), f.d) - diag;
      }
      partial[token_blocks + b] = acc;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  // (Rounding in a long run's |g|^2 - diag could take a sum of squares below zero.)
  *out->typed_data() = static_cast<float>(std::max(total, 0.0));
  return ffi::Error::Success();
}

// adam_rows with g[s] rebuilt from the factors (rows [U]: the table row of each slot, N
// for padding): the same update, bit for bit, without reading a [U, d] gradient.
ffi::Error FactoredAdamRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                                ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                                ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> order,
                                ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::F32> coefs,
                                ffi::Buffer<ffi::F32> vec, ffi::Buffer<ffi::F32> hyper,
                                ffi::ResultBuffer<ffi::F32> table_out,
                                ffi::ResultBuffer<ffi::F32> mu_out,
                                ffi::ResultBuffer<ffi::F32> nu_out) {
  auto td = table.dimensions();
  Factors f;
  if (td.size() != 2 || hyper.element_count() != 9 ||
      !FactorOperands(order, starts, coefs, vec, f) || f.d != td[1] ||
      static_cast<int64_t>(rows.element_count()) != f.u) {
    return ffi::Error::InvalidArgument(
        "factored_adam_rows: table [N, d], rows [U], order [M], starts [U + 1], coefs [T, H], "
        "vec [T, d], hyper [9]");
  }
  if (table_out->typed_data() != table.typed_data() || mu_out->typed_data() != mu.typed_data() ||
      nu_out->typed_data() != nu.typed_data()) {
    return ffi::Error::InvalidArgument("factored_adam_rows: outputs must alias table, mu, nu");
  }
  const int64_t d = td[1];
  AdamOnRows(pool, table_out, mu_out, nu_out, rows, AdamHyper(hyper.typed_data()),
             [&](int64_t s, float* g) {
               // the next slot's first token row of vec, from L3
               if (s + 1 < f.u && !f.Empty(s + 1)) {
                 PrefetchRow(f.vec + f.order[f.starts[s + 1]] / f.h * d, d);
               }
               f.Row(s, g);
               return static_cast<const float*>(g);
             });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- grouped matmul (BLAS)
//
// jax.lax.ragged_dot and its two transposes on XLA:CPU, BLAS sgemms on each group's rows in
// place: XLA:CPU's ragged_dot is a masked dense dot (E times the FLOPs), and a loop of
// per-block dots copies every block, weight slice and result. The sgemm is the
// cblas_sgemm of the OpenBLAS that numpy's wheels bundle (64-bit integers; its enums stay
// C ints), handed over by MoejaxSetSgemm before first use.
//
// Threads: the work is shared out over XLA's pool threads (see ForPieces), each sgemm
// single-threaded. Left to its own threads, OpenBLAS shared the cores with XLA's pool:
// 1024 x 512 x 1024 per group ran at 143 GFLOP/s, against 327 in a process of its own.

using Sgemm64 = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                         float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc);
using SetThreadsLocal = int (*)(int);
std::atomic<Sgemm64> g_sgemm{nullptr};
std::atomic<SetThreadsLocal> g_set_threads_local{nullptr};
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Each kernel thread sets OpenBLAS to one thread (openblas_set_num_threads_local(1)) and
// leaves it so. That function is thread-local in some builds and sets the process-wide
// count in others (numpy's 0.3.31): there numpy's BLAS stays single-threaded afterwards.
// Restoring the count after each call instead woke OpenBLAS's threads, whose spinning
// then slowed the next call's sgemms by 1.7x (131 vs 228 GFLOP/s).

// First row of each group [E + 1], sizes clipped so that no group passes `rows`
// (ragged_dot leaves larger sums undefined; here the groups stop at the last row).
std::vector<int64_t> GroupStarts(const int32_t* sizes, int64_t groups, int64_t rows) {
  std::vector<int64_t> start(groups + 1, 0);
  for (int64_t e = 0; e < groups; ++e) {
    start[e + 1] = start[e] + std::min<int64_t>(std::max<int32_t>(sizes[e], 0), rows - start[e]);
  }
  return start;
}

// Runs piece(e, p, pieces) over every group e, each thread's sgemms single-threaded (or
// one piece per group, pieces = 1, without a thread-local BLAS setting). With enough
// groups to balance (2 per thread), whole groups go to threads, longest first onto the
// least loaded: no two threads pack the same operand (the weight gradients ran ~10%
// faster than cut in halves). Otherwise thread t runs piece t of every group.
template <typename Piece>
void ForPieces(ffi::ThreadPool& pool, const std::vector<int64_t>& start, const Piece& piece) {
  const int64_t groups = static_cast<int64_t>(start.size()) - 1;
  const SetThreadsLocal set_local = g_set_threads_local.load();
  const int64_t threads = set_local ? std::max<int64_t>(pool.num_threads(), 1) : 1;
  auto single = [&](auto&& run) {
    if (set_local) set_local(1);
    run();
  };
  if (threads > 1 && groups >= 2 * threads) {
    std::vector<int64_t> order(groups);
    for (int64_t e = 0; e < groups; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return start[a + 1] - start[a] > start[b + 1] - start[b];
    });
    std::vector<std::vector<int64_t>> mine(threads);
    std::vector<int64_t> load(threads, 0);
    for (int64_t e : order) {
      const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
      mine[t].push_back(e);
      load[t] += start[e + 1] - start[e] + 1;   // + 1: empty groups (zero fills) spread too
    }
    ParallelFor(pool, threads, 1, [&](int64_t begin, int64_t end) {
      single([&] {
        for (int64_t t = begin; t < end; ++t) {
          for (int64_t e : mine[t]) piece(e, 0, 1);
        }
      });
    });
    return;
  }
  ParallelFor(pool, threads, 1, [&](int64_t begin, int64_t end) {
    single([&] {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t e = 0; e < groups; ++e) piece(e, p, threads);
      }
    });
  });
}

// out [m, n] = lhs [m, k] @ rhs[e] per group of rows; rhs [E, k, n], or [E, n, k] used
// transposed (kTransposeRhs: the lhs gradient, dy @ rhs[e]^T). Rows past the groups: 0.
template <bool kTransposeRhs>
ffi::Error GroupedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                             ffi::Buffer<ffi::F32> rhs, ffi::Buffer<ffi::S32> group_sizes,
                             ffi::ResultBuffer<ffi::F32> out) {
  const Sgemm64 sgemm = g_sgemm.load();
  auto ld = lhs.dimensions(), rd = rhs.dimensions();
  if (!sgemm || ld.size() != 2 || rd.size() != 3 ||
      static_cast<int64_t>(group_sizes.element_count()) != rd[0]) {
    return ffi::Error::InvalidArgument(
        "grouped_matmul: lhs [m, k], rhs [E, k, n], group_sizes [E], and a BLAS sgemm");
  }
  const int64_t m = ld[0], k = ld[1], groups = rd[0];
  const int64_t n = kTransposeRhs ? rd[1] : rd[2];
  auto od = out->dimensions();
  if ((kTransposeRhs ? rd[2] : rd[1]) != k || od.size() != 2 || od[0] != m || od[1] != n) {
    return ffi::Error::InvalidArgument("grouped_matmul: shapes [m, k] @ [E, k, n] -> [m, n]");
  }
  const float* a = lhs.typed_data();
  const float* b = rhs.typed_data();
  float* o = out->typed_data();
  if (k == 0 || n == 0) {   // BLAS rejects leading dimensions of 0
    std::fill(o, o + m * n, 0.f);
    return ffi::Error::Success();
  }
  const std::vector<int64_t> start = GroupStarts(group_sizes.typed_data(), groups, m);
  ForPieces(pool, start, [&](int64_t e, int64_t p, int64_t pieces) {
    const int64_t rows = start[e + 1] - start[e];
    const int64_t lo = start[e] + rows * p / pieces, hi = start[e] + rows * (p + 1) / pieces;
    if (hi > lo) {
      sgemm(kRowMajor, kNoTrans, kTransposeRhs ? kTrans : kNoTrans, hi - lo, n, k, 1.f,
            a + lo * k, k, b + e * k * n, kTransposeRhs ? k : n, 0.f, o + lo * n, n);
    }
  });
  std::fill(o + start[groups] * n, o + m * n, 0.f);
  return ffi::Error::Success();
}

// out [E, k, n]: out[e] = lhs[rows of e]^T @ dy[rows of e] (the rhs gradient), pieces
// by columns; 0 for empty groups.
ffi::Error GroupedTMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                              ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::S32> group_sizes,
                              ffi::ResultBuffer<ffi::F32> out) {
  const Sgemm64 sgemm = g_sgemm.load();
  auto ld = lhs.dimensions(), dd = dy.dimensions(), od = out->dimensions();
  if (!sgemm || ld.size() != 2 || dd.size() != 2 || od.size() != 3 || dd[0] != ld[0] ||
      od[1] != ld[1] || od[2] != dd[1] ||
      static_cast<int64_t>(group_sizes.element_count()) != od[0]) {
    return ffi::Error::InvalidArgument(
        "grouped_tmatmul: lhs [m, k], dy [m, n], group_sizes [E] -> [E, k, n], and a BLAS sgemm");
  }
  const int64_t m = ld[0], k = ld[1], n = dd[1], groups = od[0];
  const float* a = lhs.typed_data();
  const float* g = dy.typed_data();
  float* o = out->typed_data();
  if (k == 0 || n == 0) {   // BLAS rejects leading dimensions of 0
    std::fill(o, o + groups * k * n, 0.f);
    return ffi::Error::Success();
  }
  const std::vector<int64_t> start = GroupStarts(group_sizes.typed_data(), groups, m);
  ForPieces(pool, start, [&](int64_t e, int64_t p, int64_t pieces) {
    const int64_t rows = start[e + 1] - start[e];
    const int64_t lo = n * p / pieces, hi = n * (p + 1) / pieces;
    float* oe = o + e * k * n;
    if (rows == 0) {
      for (int64_t i = 0; i < k; ++i) std::fill(oe + i * n + lo, oe + i * n + hi, 0.f);
    } else if (hi > lo) {
      sgemm(kRowMajor, kTrans, kNoTrans, k, hi - lo, rows, 1.f, a + start[e] * k, k,
            g + start[e] * n + lo, n, 0.f, oe + lo, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxTakeRowsF32, TakeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The row contractions' signature: (pool; table [N, d], indices [T, H], operand) -> out.
static auto RowContractionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGatherDotF32, GatherDotImpl, RowContractionBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGatherWeightedSumF32, GatherWeightedSumImpl,
                              RowContractionBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxScatterOuterF32, ScatterOuterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxScatterOuterPairF32, ScatterOuterPairImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxAdamRowsF32, AdamRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxSumSquaresRowsF32, SumSquaresRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxSlotRunsS32, SlotRunsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxFactoredSumSquaresF32, FactoredSumSquaresImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxFactoredAdamRowsF32, FactoredAdamRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The grouped matmuls' signature: (pool; lhs, rhs or dy, group sizes) -> out.
static auto GroupedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedMatmulF32, GroupedMatmulImpl<false>, GroupedBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedMatmulTF32, GroupedMatmulImpl<true>, GroupedBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedTMatmulF32, GroupedTMatmulImpl, GroupedBinding());

// The grouped matmuls' BLAS (see above), from Python (ctypes) before first use:
// cblas_sgemm, and openblas_set_num_threads_local (may be null: then one piece per group).
extern "C" void MoejaxSetSgemm(void* sgemm, void* set_threads_local) {
  g_set_threads_local.store(reinterpret_cast<SetThreadsLocal>(set_threads_local));
  g_sgemm.store(reinterpret_cast<Sgemm64>(sgemm));
}
