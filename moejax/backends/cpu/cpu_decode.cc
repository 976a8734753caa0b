// Kernels for decoding, XLA FFI custom calls (see native.py, routed_ffn).
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
// the memory's rate. Here each chosen expert's weights are read in place, once, by both
// threads: the first phase splits the F columns of wi / wg into chunks, the second the D
// columns of wo, each chunk's few rows of accumulators in L1.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace moejax_cpu;

namespace {

// Columns per work unit, and rows per pass over a unit's weights (accumulators in L1).
constexpr int64_t kColsIn = 512, kColsOut = 512, kRowTile = 8;
// Weight rows prefetched ahead of the one being read.
constexpr int64_t kAheadRows = 8;

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

// acc[r, c] = sum_d xs[rows[r], d] * w[d, c0 + c] for c < cols, r < n (n <= kRowTile):
// one pass over the weight rows' column chunk, the few rows' sums in L1.
inline void RowsTimesChunk(const float* x, const int32_t* rows, int64_t n, const float* w,
                           int64_t d, int64_t ld, int64_t c0, int64_t cols, float* acc) {
  std::fill(acc, acc + n * cols, 0.f);
  for (int64_t i = 0; i < d; ++i) {
    const float* __restrict wr = w + i * ld + c0;
    if (i + kAheadRows < d) {   // the hardware prefetcher does not follow the row stride
      const char* next = reinterpret_cast<const char*>(wr + kAheadRows * ld);
      for (int64_t b = 0; b < cols * 4; b += 64) __builtin_prefetch(next + b);
    }
    for (int64_t r = 0; r < n; ++r) {
      const float xv = x[rows[r] * d + i];
      float* __restrict a = acc + r * cols;
      for (int64_t c = 0; c < cols; ++c) a[c] += xv * wr[c];
    }
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

  // The (token, choice) pairs grouped by expert, tokens ascending within each expert.
  const int32_t* ex = expert.typed_data();
  std::vector<int64_t> start(e + 1, 0);
  for (int64_t p = 0; p < t * k; ++p) {
    if (ex[p] >= 0 && ex[p] < e) ++start[ex[p] + 1];
  }
  for (int64_t i = 0; i < e; ++i) start[i + 1] += start[i];
  const int64_t pairs = start[e];
  std::vector<int32_t> token(pairs), pair_of(t * k, -1);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < t * k; ++p) {
      if (ex[p] < 0 || ex[p] >= e) continue;
      const int64_t q = fill[ex[p]]++;
      token[q] = static_cast<int32_t>(p / k);
      pair_of[p] = static_cast<int32_t>(q);
    }
  }
  // Work units: (expert, first pair of a row tile, column chunk).
  struct Unit { int64_t expert, first, n, c0; };
  auto units = [&](int64_t cols, int64_t chunk) {
    std::vector<Unit> u;
    for (int64_t i = 0; i < e; ++i) {
      for (int64_t p = start[i]; p < start[i + 1]; p += kRowTile) {
        for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
          u.push_back({i, p, std::min(kRowTile, start[i + 1] - p), c0});
        }
      }
    }
    return u;
  };
  const float* xs = x.typed_data();
  std::vector<float> h(pairs * f), out(pairs * d);
  // Phase 1: h[pair] = act(x wi[e]) (* x wg[e]), F in column chunks.
  const auto in_units = units(f, kColsIn);
  ParallelFor(pool, static_cast<int64_t>(in_units.size()), 1, [&](int64_t lo, int64_t hi) {
    float a[kRowTile * kColsIn], b[kRowTile * kColsIn];
    for (int64_t u = lo; u < hi; ++u) {
      const Unit& un = in_units[u];
      const int64_t cols = std::min(kColsIn, f - un.c0);
      const int32_t* rows = token.data() + un.first;
      RowsTimesChunk(xs, rows, un.n, wi.typed_data() + un.expert * d * f, d, f, un.c0, cols, a);
      if (gated) {
        RowsTimesChunk(xs, rows, un.n, wg.typed_data() + un.expert * d * f, d, f, un.c0, cols, b);
      }
      for (int64_t r = 0; r < un.n; ++r) {
        float* hr = h.data() + (un.first + r) * f + un.c0;
        for (int64_t cc = 0; cc < cols; ++cc) {
          const float v = Act(activation, a[r * cols + cc]);
          hr[cc] = gated ? v * b[r * cols + cc] : v;
        }
      }
    }
  });
  // Phase 2: out[pair] = h[pair] wo[e], D in column chunks (h's rows are the "tokens").
  std::vector<int32_t> ident(pairs);
  for (int64_t p = 0; p < pairs; ++p) ident[p] = static_cast<int32_t>(p);
  const auto out_units = units(d, kColsOut);
  ParallelFor(pool, static_cast<int64_t>(out_units.size()), 1, [&](int64_t lo, int64_t hi) {
    float a[kRowTile * kColsOut];
    for (int64_t u = lo; u < hi; ++u) {
      const Unit& un = out_units[u];
      const int64_t cols = std::min(kColsOut, d - un.c0);
      RowsTimesChunk(h.data(), ident.data() + un.first, un.n, wo.typed_data() + un.expert * f * d,
                     f, d, un.c0, cols, a);
      for (int64_t r = 0; r < un.n; ++r) {
        std::copy(a + r * cols, a + (r + 1) * cols, out.data() + (un.first + r) * d + un.c0);
      }
    }
  });
  // Combine: y[t] = sum_j w[t, j] out[pair(t, j)], j ascending.
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  std::fill(ys, ys + t * d, 0.f);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t q = pair_of[i * k + j];
      if (q < 0) continue;
      const float wv = ws[i * k + j];
      const float* o = out.data() + static_cast<int64_t>(q) * d;
      for (int64_t cc = 0; cc < d; ++cc) ys[i * d + cc] += wv * o[cc];
    }
  }
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
