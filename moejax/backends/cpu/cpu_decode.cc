// Kernels for decoding, XLA FFI custom calls (see native.py: routed_ffn, few_row_matmul,
// cached_attention).
//
// MoejaxRoutedFfnF32: y[t] = sum_j w[t, j] * FFN_{expert[t, j]}(x[t]), j ascending, where
// FFN_e(x) = (act(x wi[e]) * (x wg[e])) wo[e] (no gate: act(x wi[e]) wo[e]), for
// x [T, D], expert [T, K] (an index outside [0, E): no expert), w [T, K], wi, wg [E, D, F],
// wo [E, F, D].
//
// Why: with a few tokens (decoding) each chosen expert sees a few rows, so its FFN is a
// stream over its weights, and the step's time is the time to read the chosen experts'
// weights once. XLA:CPU picks an expert's matrices out of the stacked weights as a copy
// (dynamic-slice) before each matmul, and its matmul of a few rows does not stream at
// the memory's rate. Here each chosen expert's weights are read once, in place, in
// contiguous runs of whole rows: the chosen experts' rows (of wi and wg, then of wo) are
// cut into a few parts that the threads claim, each part adds its rows' products into its
// own accumulators, and the parts' sums are added in a fixed order (the result does not
// depend on which thread ran what). Each step reads kRows consecutive rows of a column
// block into registers once and adds them into every pair of that expert: several
// streams of memory in flight per thread, which a single row's stream does not keep busy.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace moejax_cpu;

namespace {

// Weight rows read together per step (registers: kRows x matrices vectors).
constexpr int64_t kRows = 8;
// Parts per pool thread that the rows are cut into (each with its own accumulators).
constexpr int64_t kPartsPerThread = 2;
// Groups of kRows rows prefetched ahead of the group being read.
constexpr int64_t kAheadGroups = 1;
// Columns per unit of the parallel sum of the parts.
constexpr int64_t kSumCols = 512;

typedef float Vec __attribute__((vector_size(64)));
constexpr int64_t kLanes = sizeof(Vec) / sizeof(float);
inline Vec Load(const float* p) { Vec v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof v); }

enum Activation : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

inline float Act(int64_t kind, float a) {
  switch (kind) {
    case kRelu: return a > 0.f ? a : 0.f;
    case kGelu: return 0.5f * a * (1.f + std::erf(a * 0.70710678118654752f));
    case kGeluTanh:
      return 0.5f * a * (1.f + std::tanh(0.79788456080286536f * (a + 0.044715f * a * a * a)));
    default: return a / (1.f + std::exp(-a));
  }
}

// For each of M matrices w[m] (rows of `ld` floats) sharing the row index, over columns
// [c0, c1): acc[m][r * ldacc + c] += sum_{k < R} x[r * ldx + i + k] * w[m][(i + k) * ld + c],
// r < n. One pass over R rows: each column block of the R rows is loaded once and added
// into all n accumulator rows. `ahead`: rows ahead to prefetch (0: none).
template <int M, int R>
inline void AddRows(const float* const* w, int64_t ld, int64_t c0, int64_t c1, int64_t i,
                    const float* x, int64_t ldx, int64_t n, float* const* acc, int64_t ldacc,
                    int64_t ahead) {
  int64_t c = c0;
  for (; c + kLanes <= c1; c += kLanes) {
    Vec wv[M][R];
    for (int m = 0; m < M; ++m) {
      for (int k = 0; k < R; ++k) {
        const float* p = w[m] + (i + k) * ld + c;
        if (ahead) __builtin_prefetch(p + ahead * ld);
        wv[m][k] = Load(p);
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const float* xr = x + r * ldx + i;
      for (int m = 0; m < M; ++m) {
        float* a = acc[m] + r * ldacc + c;
        Vec s = Load(a);
        for (int k = 0; k < R; ++k) s += xr[k] * wv[m][k];
        Store(a, s);
      }
    }
  }
  for (; c < c1; ++c) {
    for (int64_t r = 0; r < n; ++r) {
      for (int m = 0; m < M; ++m) {
        float s = acc[m][r * ldacc + c];
        for (int k = 0; k < R; ++k) s += x[r * ldx + i + k] * w[m][(i + k) * ld + c];
        acc[m][r * ldacc + c] = s;
      }
    }
  }
}

// AddRows over rows [i0, i1): kRows at a time, then one at a time.
template <int M>
inline void AddRowRange(const float* const* w, int64_t ld, int64_t c0, int64_t c1, int64_t i0,
                        int64_t i1, const float* x, int64_t ldx, int64_t n, float* const* acc,
                        int64_t ldacc) {
  int64_t i = i0;
  for (; i + kRows <= i1; i += kRows) {
    const int64_t ahead = i + (kAheadGroups + 1) * kRows <= i1 ? kAheadGroups * kRows : 0;
    AddRows<M, kRows>(w, ld, c0, c1, i, x, ldx, n, acc, ldacc, ahead);
  }
  for (; i < i1; ++i) AddRows<M, 1>(w, ld, c0, c1, i, x, ldx, n, acc, ldacc, 0);
}

// The pairs of the chosen experts, grouped by expert, and the parts their weight rows are
// cut into.
struct Routing {
  int64_t experts = 0;                 // E
  std::vector<int64_t> start;          // [E + 1]: expert i's pairs are [start[i], start[i+1])
  std::vector<int32_t> token, pair_of; // [pairs]: a pair's token; [T * K]: a choice's pair
  std::vector<int64_t> used;           // the experts with pairs, ascending
  int64_t pairs() const { return start[experts]; }
};

Routing Route(const int32_t* ex, int64_t t, int64_t k, int64_t e) {
  Routing g;
  g.experts = e;
  g.start.assign(e + 1, 0);
  for (int64_t p = 0; p < t * k; ++p) {
    if (ex[p] >= 0 && ex[p] < e) ++g.start[ex[p] + 1];
  }
  for (int64_t i = 0; i < e; ++i) {
    if (g.start[i + 1] > 0) g.used.push_back(i);
    g.start[i + 1] += g.start[i];
  }
  g.token.resize(g.pairs());
  g.pair_of.assign(t * k, -1);
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t p = 0; p < t * k; ++p) {
    if (ex[p] < 0 || ex[p] >= e) continue;
    const int64_t q = fill[ex[p]]++;
    g.token[q] = static_cast<int32_t>(p / k);
    g.pair_of[p] = static_cast<int32_t>(q);
  }
  return g;
}

// Adds, for every used expert u and every part p, the products of the part's rows (of the
// concatenation over used experts of `rows` rows each) into part_acc[m][p] [pairs, cols]:
// part_acc[m][p][q, :] += sum_i x[q, i] * w[m][expert, i, :] over the part's rows i of
// pair q's expert, into part_acc as the caller allocated it (zeros). Rows are cut into
// `parts` equal runs of whole kRows groups; `first_used[p]`..`last_used[p]` say which used
// experts part p touched (-1: none).
template <int M>
void AddPartRows(ffi::ThreadPool& pool, const Routing& g, const float* const* w, int64_t rows,
                 int64_t cols, const float* x, int64_t ldx, int64_t parts,
                 std::vector<std::vector<float>>* part_acc, std::vector<int64_t>* first_used,
                 std::vector<int64_t>* last_used) {
  const int64_t used = static_cast<int64_t>(g.used.size());
  const int64_t groups_per_expert = (rows + kRows - 1) / kRows;
  const int64_t groups = used * groups_per_expert;
  first_used->assign(parts, -1);
  last_used->assign(parts, -1);
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t lo = groups * p / parts, hi = groups * (p + 1) / parts;
    if (lo < hi) {
      (*first_used)[p] = lo / groups_per_expert;
      (*last_used)[p] = (hi - 1) / groups_per_expert;
    }
  }
  const int64_t pairs = g.pairs();
  ParallelFor(pool, parts, 1, [&](int64_t p_lo, int64_t p_hi) {
    for (int64_t p = p_lo; p < p_hi; ++p) {
      const int64_t lo = groups * p / parts, hi = groups * (p + 1) / parts;
      if (lo >= hi) continue;
      for (int64_t gi = lo; gi < hi;) {
        const int64_t u = gi / groups_per_expert, ex = g.used[u];
        const int64_t g_end = std::min(hi, (u + 1) * groups_per_expert);
        const int64_t q = g.start[ex], n = g.start[ex + 1] - q;
        const float* we[M];
        float* acc[M];
        for (int m = 0; m < M; ++m) {
          we[m] = w[m] + ex * rows * cols;
          acc[m] = (*part_acc)[m].data() + (p * pairs + q) * cols;
        }
        const float* xq = x + q * ldx;
        const int64_t i0 = (gi - u * groups_per_expert) * kRows;
        const int64_t i1 = std::min(rows, (g_end - u * groups_per_expert) * kRows);
        AddRowRange<M>(we, cols, 0, cols, i0, i1, xq, ldx, n, acc, cols);
        gi = g_end;
      }
    }
  });
}

// sum[c] = sum of part_acc[p][q, c0 + c] (c < cols) over the parts p that touched used
// expert u (pair q's), p ascending.
inline void SumPartsRow(const std::vector<float>& part_acc, const std::vector<int64_t>& first_used,
                        const std::vector<int64_t>& last_used, int64_t u, int64_t pairs,
                        int64_t row, int64_t q, int64_t c0, int64_t cols, float* sum) {
  bool first = true;
  for (int64_t p = 0; p < static_cast<int64_t>(first_used.size()); ++p) {
    if (first_used[p] < 0 || first_used[p] > u || u > last_used[p]) continue;
    const float* src = part_acc.data() + (p * pairs + q) * row + c0;
    if (first) {
      std::copy(src, src + cols, sum);
    } else {
      for (int64_t c = 0; c < cols; ++c) sum[c] += src[c];
    }
    first = false;
  }
}

ffi::Error RoutedFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::S32> expert, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> wi, ffi::Buffer<ffi::F32> wg,
                         ffi::Buffer<ffi::F32> wo, ffi::ResultBuffer<ffi::F32> y,
                         int64_t activation, bool gated) {
  Checks c("routed_ffn");
  c.Rank("x", x, 2).Rank("expert", expert, 2).Rank("wi", wi, 3).Rank("wo", wo, 3);
  if (!c.ok()) return c.error();
  const int64_t t = x.dimensions()[0], d = x.dimensions()[1], k = expert.dimensions()[1];
  const int64_t e = wi.dimensions()[0], f = wi.dimensions()[2];
  c.Shape("expert", expert, {t, k}).Shape("w", w, {t, k}).Shape("wi", wi, {e, d, f})
      .Shape("wo", wo, {e, f, d}).Shape("y", *y, {t, d})
      .That(activation >= kRelu && activation <= kSilu, "unknown activation code");
  if (gated) c.Shape("wg", wg, {e, d, f});
  if (!c.ok()) return c.error();

  const Routing g = Route(expert.typed_data(), t, k, e);
  const int64_t pairs = g.pairs();
  float* ys = y->typed_data();
  std::fill(ys, ys + t * d, 0.f);
  if (pairs == 0) return ffi::Error::Success();
  const int64_t parts = kPartsPerThread * std::max<int64_t>(1, pool.num_threads());
  // Each pair's input row, grouped by expert.
  std::vector<float> xp(pairs * d);
  for (int64_t q = 0; q < pairs; ++q) {
    std::copy(x.typed_data() + g.token[q] * d, x.typed_data() + (g.token[q] + 1) * d,
              xp.data() + q * d);
  }
  std::vector<int64_t> first_used, last_used;
  // Phase 1: h[q] = act(xp[q] wi[e]) (* xp[q] wg[e]), over the rows of wi (and wg).
  std::vector<std::vector<float>> acc1(gated ? 2 : 1, std::vector<float>(parts * pairs * f));
  if (gated) {
    const float* ws[2] = {wi.typed_data(), wg.typed_data()};
    AddPartRows<2>(pool, g, ws, d, f, xp.data(), d, parts, &acc1, &first_used, &last_used);
  } else {
    const float* ws[1] = {wi.typed_data()};
    AddPartRows<1>(pool, g, ws, d, f, xp.data(), d, parts, &acc1, &first_used, &last_used);
  }
  // h = act(sum of the parts of x wi) (* sum of the parts of x wg), on all threads.
  std::vector<float> h(pairs * f);
  std::vector<int64_t> used_of(pairs);
  for (int64_t u = 0; u < static_cast<int64_t>(g.used.size()); ++u) {
    for (int64_t q = g.start[g.used[u]]; q < g.start[g.used[u] + 1]; ++q) used_of[q] = u;
  }
  const int64_t chunks = (f + kSumCols - 1) / kSumCols;
  ParallelFor(pool, pairs * chunks, 1, [&](int64_t lo, int64_t hi) {
    float a[kSumCols], b[kSumCols];
    for (int64_t un = lo; un < hi; ++un) {
      const int64_t q = un / chunks, c0 = (un % chunks) * kSumCols;
      const int64_t cols = std::min(kSumCols, f - c0), u = used_of[q];
      SumPartsRow(acc1[0], first_used, last_used, u, pairs, f, q, c0, cols, a);
      if (gated) SumPartsRow(acc1[1], first_used, last_used, u, pairs, f, q, c0, cols, b);
      float* hr = h.data() + q * f + c0;
      for (int64_t cc = 0; cc < cols; ++cc) {
        const float v = Act(activation, a[cc]);
        hr[cc] = gated ? v * b[cc] : v;
      }
    }
  });
  // Phase 2: out[q] = h[q] wo[e], over the rows of wo.
  std::vector<std::vector<float>> acc2(1, std::vector<float>(parts * pairs * d));
  const float* wos[1] = {wo.typed_data()};
  AddPartRows<1>(pool, g, wos, f, d, h.data(), f, parts, &acc2, &first_used, &last_used);
  std::vector<float> out(pairs * d);
  for (int64_t q = 0; q < pairs; ++q) {
    SumPartsRow(acc2[0], first_used, last_used, used_of[q], pairs, d, q, 0, d, out.data() + q * d);
  }
  // Combine: y[t] = sum_j w[t, j] out[pair(t, j)], j ascending.
  const float* ws = w.typed_data();
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t q = g.pair_of[i * k + j];
      if (q < 0) continue;
      const float wv = ws[i * k + j];
      const float* o = out.data() + static_cast<int64_t>(q) * d;
      for (int64_t cc = 0; cc < d; ++cc) ys[i * d + cc] += wv * o[cc];
    }
  }
  return ffi::Error::Success();
}

// MoejaxFewRowMatmulF32: y = x w for x [N, D], w [D, C], N a few rows (decoding's tokens).
// The columns are cut into a few parts that the threads claim; each part streams its
// columns of every weight row once, kRows rows at a time, into its columns of y.
ffi::Error FewRowMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  Checks c("few_row_matmul");
  c.Rank("x", x, 2).Rank("w", w, 2);
  if (!c.ok()) return c.error();
  const int64_t n = x.dimensions()[0], d = x.dimensions()[1], cols = w.dimensions()[1];
  c.Shape("w", w, {d, cols}).Shape("y", *y, {n, cols});
  if (!c.ok()) return c.error();
  float* ys = y->typed_data();
  std::fill(ys, ys + n * cols, 0.f);
  const int64_t blocks = (cols + kLanes - 1) / kLanes;
  const int64_t parts = std::min<int64_t>(
      blocks, kPartsPerThread * std::max<int64_t>(1, pool.num_threads()));
  const float* ws[1] = {w.typed_data()};
  ParallelFor(pool, parts, 1, [&](int64_t p_lo, int64_t p_hi) {
    for (int64_t p = p_lo; p < p_hi; ++p) {
      const int64_t c0 = blocks * p / parts * kLanes;
      const int64_t c1 = std::min(cols, blocks * (p + 1) / parts * kLanes);
      float* acc[1] = {ys};
      AddRowRange<1>(ws, cols, c0, c1, 0, d, x.typed_data(), d, n, acc, cols);
    }
  });
  return ffi::Error::Success();
}

// MoejaxCachedAttentionF32: attention of a few new queries over a KV cache, in the cache's
// layout. q [B, N, H, Dh], k, v [B, T, KV, Dh] (query head h reads KV head h / (H / KV)),
// mask [B, N, T] (nonzero: attend) -> out [B, N, H, Dh]: softmax over t of q.k[t] / sqrt(Dh)
// at the attended slots (a query that attends to none: equal weights on every slot, as the
// softmax of equally masked logits gives), weighting v[t].
//
// Why: XLA:CPU runs this as batched matmuls of a few rows and, first, a transposed copy of
// the whole cache each step. Here each (batch row, KV head) reads its cache slots in place,
// once, for all the query heads that share them.
// The sum of a vector's lanes, as a tree of halves (a lane-by-lane sum is a chain of
// dependent adds, the longest part of a short dot product).
typedef float Half __attribute__((vector_size(32)));
typedef float Quarter __attribute__((vector_size(16)));
inline float LaneSum(Vec v) {
  Half lo, hi;
  __builtin_memcpy(&lo, &v, sizeof lo);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const Half h = lo + hi;
  Quarter a, b;
  __builtin_memcpy(&a, &h, sizeof a);
  __builtin_memcpy(&b, reinterpret_cast<const char*>(&h) + sizeof a, sizeof b);
  const Quarter r = a + b;
  return (r[0] + r[2]) + (r[1] + r[3]);
}

inline float Dot(const float* a, const float* b, int64_t n) {
  Vec acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 += Load(a + i) * Load(b + i);
    acc1 += Load(a + i + kLanes) * Load(b + i + kLanes);
  }
  if (i + kLanes <= n) {
    acc0 += Load(a + i) * Load(b + i);
    i += kLanes;
  }
  float s = LaneSum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One query's attention over one KV head's slots (k, v: slot s at k + s * stride), into
// o [dh]; p [t] is scratch. NV > 0: dh = NV * kLanes, the query and the output in
// registers; NV = 0: any dh.
template <int NV>
void AttendOne(const float* qr, const float* k, const float* v, int64_t stride, int64_t dh,
               const uint8_t* m, bool any, int64_t t, float scale, float* p, float* o) {
  Vec qv[NV > 0 ? NV : 1];
  for (int c = 0; c < NV; ++c) qv[c] = Load(qr + c * kLanes);
  float mx = -INFINITY;
  for (int64_t s = 0; s < t; ++s) {
    if (any && !m[s]) continue;
    float sc = 0.f;
    if (any) {
      if constexpr (NV > 0) {
        Vec acc = qv[0] * Load(k + s * stride);
        for (int c = 1; c < NV; ++c) acc += qv[c] * Load(k + s * stride + c * kLanes);
        sc = LaneSum(acc) * scale;
      } else {
        sc = Dot(qr, k + s * stride, dh) * scale;
      }
    }
    p[s] = sc;
    mx = std::max(mx, sc);
  }
  float sum = 0.f;
  for (int64_t s = 0; s < t; ++s) {
    if (any && !m[s]) continue;
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  const float inv = 1.f / sum;
  if constexpr (NV > 0) {
    Vec ov[NV] = {};
    for (int64_t s = 0; s < t; ++s) {
      if (any && !m[s]) continue;
      for (int c = 0; c < NV; ++c) ov[c] += p[s] * Load(v + s * stride + c * kLanes);
    }
    for (int c = 0; c < NV; ++c) Store(o + c * kLanes, ov[c] * inv);
  } else {
    std::fill(o, o + dh, 0.f);
    for (int64_t s = 0; s < t; ++s) {
      if (any && !m[s]) continue;
      const float w = p[s];
      for (int64_t l = 0; l < dh; ++l) o[l] += w * v[s * stride + l];
    }
    for (int64_t l = 0; l < dh; ++l) o[l] *= inv;
  }
}

ffi::Error CachedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> out) {
  Checks c("cached_attention");
  c.Rank("q", q, 4).Rank("k", k, 4);
  if (!c.ok()) return c.error();
  const int64_t b = q.dimensions()[0], n = q.dimensions()[1], h = q.dimensions()[2];
  const int64_t dh = q.dimensions()[3], t = k.dimensions()[1], kv = k.dimensions()[2];
  c.Shape("k", k, {b, t, kv, dh}).Shape("v", v, {b, t, kv, dh}).Shape("mask", mask, {b, n, t})
      .Shape("out", *out, {b, n, h, dh})
      .That(kv > 0 && h % kv == 0, "the query heads must be a multiple of the KV heads");
  if (!c.ok()) return c.error();
  const int64_t g = h / kv;
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const uint8_t* ms = mask.typed_data();
  float* os = out->typed_data();
  // The query and output in registers for head widths of up to 8 vectors.
  auto attend = AttendOne<0>;
  if (dh % kLanes == 0) {
    switch (dh / kLanes) {
      case 1: attend = AttendOne<1>; break;
      case 2: attend = AttendOne<2>; break;
      case 4: attend = AttendOne<4>; break;
      case 8: attend = AttendOne<8>; break;
      default: break;
    }
  }
  ParallelFor(pool, b * kv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(t);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t bi = u / kv, hk = u % kv;
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* m = ms + (bi * n + i) * t;
        bool any = false;
        for (int64_t s = 0; s < t; ++s) any |= m[s] != 0;
        for (int64_t j = 0; j < g; ++j) {
          const int64_t head = hk * g + j;
          const float* qr = qs + ((bi * n + i) * h + head) * dh;
          const float* kr = ks + (bi * t * kv + hk) * dh;
          const float* vr = vs + (bi * t * kv + hk) * dh;
          float* o = os + ((bi * n + i) * h + head) * dh;
          const int64_t stride = kv * dh;
          attend(qr, kr, vr, stride, dh, m, any, t, scale, p.data(), o);
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxRoutedFfnF32, RoutedFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("activation")
                                  .Attr<bool>("gated"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxFewRowMatmulF32, FewRowMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxCachedAttentionF32, CachedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
