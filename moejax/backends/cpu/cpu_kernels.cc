// C++ kernels for XLA:CPU, XLA FFI custom calls (see cpu_kernels.py).
//
// MoejaxTopKF32: the same result as jax.lax.top_k: per row of x [rows, n], the k largest values in
// descending order and their indices, equal values in index order, in the total order
// -NaN < -inf < ... < -0 < +0 < ... < inf < NaN.
//
// Why: XLA:CPU's TopK sorts each row partially, and at k = 16 of n = 1024 that sort is most
// of the PEER layer's forward. Here, per row:
//   1. the maximum of each group of 16 entries (a vectorised pass over the row);
//   2. tau = the k-th largest group maximum, by counting (vectorised, no branches). The k
//      largest maxima are k distinct entries, so tau <= the row's k-th largest entry, and
//      every top-k entry lies in a group whose maximum is >= tau;
//   3. the entries >= tau of those groups (about k + 2 for k = 16 of 1024, in index order)
//      go through a sorted k-buffer by insertion.
// Steps 1 and 2 are branch-free vector passes; only the few entries above tau take the
// branchy insertion, which a threshold-free insertion pass would run over the whole row.

#include <algorithm>
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
  // x [..., n] -> values, indices [..., k]
  auto xd = x.dimensions(), vd = values->dimensions();
  Checks c("top_k");
  c.That(xd.size() >= 1, "x must have at least one dimension");
  c.Rank("values", *values, static_cast<int64_t>(xd.size()));
  if (!c.ok()) return c.error();
  const int64_t n = xd.back();
  const int64_t k = vd.back();
  c.That(std::equal(xd.begin(), xd.end() - 1, vd.begin()),
         "values must have x's leading dimensions ([..., k] of x [..., n])");
  c.SameShape("indices", *indices, "values", *values);
  c.That(k >= 1 && k <= n, "k (values' last dimension) must be in [1, n]");
  if (!c.ok()) return c.error();
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
// few fill buffers the prefetches then held. It pays on random rows of tables far larger
// than the caches; on cache-resident tables the hints cost nothing measurable.
inline void PrefetchRow(const float* row, int64_t d) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t l = 0; l < d; l += kLine) __builtin_prefetch(row + l, 0, 1);
}

// The gathered-row contractions of the PEER / PKM lookup (lookup_xla.py), on rows
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

// Checks table [N >= 1, d], indices [T, H], and the other operand and out of a row
// contraction: [T, d] and [T, H] (gather_dot) or [T, H] and [T, d] (gather_weighted_sum).
ffi::Error LookupShapes(const char* kernel, ffi::Buffer<ffi::F32>& table,
                        ffi::Buffer<ffi::S32>& indices, ffi::Buffer<ffi::F32>& operand,
                        ffi::ResultBuffer<ffi::F32>& out, bool operand_is_x, int64_t& n,
                        int64_t& d, int64_t& t, int64_t& h) {
  Checks c(kernel);
  c.Rank("table", table, 2).Rank("indices", indices, 2);
  if (!c.ok()) return c.error();
  n = table.dimensions()[0], d = table.dimensions()[1];
  t = indices.dimensions()[0], h = indices.dimensions()[1];
  c.That(n >= 1, "table must have a row ([N >= 1, d])");
  if (operand_is_x) {
    c.Shape("x", operand, {t, d}).Shape("out", *out, {t, h});
  } else {
    c.Shape("w", operand, {t, h}).Shape("out", *out, {t, d});
  }
  return c.error();
}

// out[t, j] = x[t] . table[indices[t, j]]   (table [N, d], indices [T, H], x [T, d]).
ffi::Error GatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                         ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, d, t, h;
  if (auto e = LookupShapes("gather_dot", table, indices, x, out, true, n, d, t, h); e.failure()) {
    return e;
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
  if (auto e = LookupShapes("gather_weighted_sum", table, indices, w, out, false, n, d, t, h);
      e.failure()) {
    return e;
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
// cache for their reader anyway, and a plain store first reads each line it writes (a
// non-temporal store skips that read: half the memory traffic).
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
// L3 reads, each a stall unless requested ahead; 2 and 8 did as well as 4).
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
// write, plus a zero-fill pass), while vec [T, d] is small and stays cached. (No
// accumulator operand: one aliased to the output made XLA copy a whole table the lookup
// reads, before the optimizer's in-place update of it.)
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

// Checks one scatter's coef [T, H], vec [T, d] and out [R, d] against targets [T, H] and
// R; fills sc.
void OuterOperands(Checks& c, const char* coef_name, ffi::Buffer<ffi::F32>& coef,
                   const char* vec_name, ffi::Buffer<ffi::F32>& vec, const char* out_name,
                   ffi::ResultBuffer<ffi::F32>& out, int64_t t, int64_t h, int64_t r,
                   OuterScatter& sc) {
  c.Shape(coef_name, coef, {t, h}).Rank(vec_name, vec, 2).Rank(out_name, *out, 2);
  if (!c.ok()) return;
  const int64_t d = vec.dimensions()[1];
  c.Shape(vec_name, vec, {t, d}).Shape(out_name, *out, {r, d});
  sc = {coef.typed_data(), vec.typed_data(), out->typed_data(), d, false};
  sc.stream = CanStream(sc.out, sc.d) && r * sc.d * int64_t{sizeof(float)} > kStreamBytes;
}

// out [R, d]: see ScatterOuterRows.
ffi::Error ScatterOuterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> targets,
                            ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> vec,
                            ffi::ResultBuffer<ffi::F32> out) {
  auto td = targets.dimensions();
  std::vector<OuterScatter> scatters(1);
  Checks c("scatter_outer");   // targets, coef [T, H], vec [T, d] -> out [R, d]
  c.Rank("targets", targets, 2).Rank("out", *out, 2);
  if (!c.ok()) return c.error();
  OuterOperands(c, "coef", coef, "vec", vec, "out", out, td[0], td[1], out->dimensions()[0],
                scatters[0]);
  if (!c.ok()) return c.error();
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
  Checks c("scatter_outer_pair");   // targets, coefs [T, H], vecs [T, d_i] -> outs [R, d_i]
  c.Rank("targets", targets, 2).Rank("out1", *out1, 2);
  if (!c.ok()) return c.error();
  const int64_t r = out1->dimensions()[0];
  OuterOperands(c, "coef1", coef1, "vec1", vec1, "out1", out1, td[0], td[1], r, scatters[0]);
  OuterOperands(c, "coef2", coef2, "vec2", vec2, "out2", out2, td[0], td[1], r, scatters[1]);
  if (!c.ok()) return c.error();
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

// Checks the operands the Adam kernels share: table, mu, nu [N, d], the outputs aliasing
// them (in place), rows [U] and hyper [9]; and that the rows in [0, N) are distinct. Slots
// run in parallel, so a repeated row would be updated by two threads at once (a data race,
// and not the XLA form's result either): it is an error, found in one pass over a bitmap of
// N bits before anything is written (callers pass row_plan's distinct rows).
void AdamOperands(Checks& c, ffi::Buffer<ffi::F32>& table, ffi::Buffer<ffi::F32>& mu,
                  ffi::Buffer<ffi::F32>& nu, ffi::Buffer<ffi::S32>& rows,
                  ffi::Buffer<ffi::F32>& hyper, ffi::ResultBuffer<ffi::F32>& table_out,
                  ffi::ResultBuffer<ffi::F32>& mu_out, ffi::ResultBuffer<ffi::F32>& nu_out) {
  c.Rank("table", table, 2)
      .SameShape("mu", mu, "table", table)
      .SameShape("nu", nu, "table", table)
      .Rank("rows", rows, 1)
      .Shape("hyper", hyper, {9});
  c.That(table_out->typed_data() == table.typed_data() &&
             mu_out->typed_data() == mu.typed_data() && nu_out->typed_data() == nu.typed_data(),
         "the outputs must alias table, mu, nu (input_output_aliases={0: 0, 1: 1, 2: 2})");
  if (!c.ok()) return;
  const int64_t n = table.dimensions()[0];
  const int32_t* rs = rows.typed_data();
  std::vector<uint64_t> seen((n + 63) / 64, 0);
  for (int64_t s = 0, u = static_cast<int64_t>(rows.element_count()); s < u; ++s) {
    const int64_t r = rs[s];
    if (r < 0 || r >= n) continue;   // padding: skipped
    const uint64_t bit = uint64_t{1} << (r % 64);
    if (seen[r / 64] & bit) {
      c.That(false, "rows must be distinct (row " + std::to_string(r) + " repeats)");
      return;
    }
    seen[r / 64] |= bit;
  }
}

// Lazy Adam on the rows of a table and its moments (moejax.training.row_sparse), in place
// (outputs alias inputs 0-2): for each slot s with row = rows[s] in [0, N) (others skipped):
//   g = grads[s] * scale;  m = b1·mu[row] + (1-b1)·g;  v = b2·nu[row] + (1-b2)·g²;
//   table[row] -= lr · (m / c1) / (sqrt(v / c2) + eps)
// with hyper = [lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, scale]. Rows must be distinct
// (AdamOperands). Each row is read and written once, nothing else is touched: XLA's
// gather-update-scatter form moves every row through two temporaries.
ffi::Error AdamRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                        ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                        ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> grads,
                        ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> table_out,
                        ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out) {
  Checks c("adam_rows");   // table, mu, nu [N, d], rows [M], grads [M, d], hyper [9]
  AdamOperands(c, table, mu, nu, rows, hyper, table_out, mu_out, nu_out);
  if (!c.ok()) return c.error();
  const int64_t d = table.dimensions()[1];
  c.Shape("grads", grads, {static_cast<int64_t>(rows.element_count()), d});
  if (!c.ok()) return c.error();
  const float* gs = grads.typed_data();
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
  Checks c("sum_squares_rows");   // rows [U], g [U, d] -> out []
  c.Rank("g", g, 2);
  if (!c.ok()) return c.error();
  const int64_t u = g.dimensions()[0], d = g.dimensions()[1];
  c.Shape("rows", rows, {u}).Shape("out", *out, {});
  if (!c.ok()) return c.error();
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

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
