// Masked softmax attention with rotary positions, forward and backward, for XLA:CPU (XLA
// FFI; cpu_kernels.py's attention): o = softmax(rot(q) rot(k)ᵀ / √d + mask) v per (batch,
// head), the flash-attention backward from the saved log-sum-exp.
//
// Why: XLA:CPU runs attention as separate passes over the [batch, heads, Lq, Lk] scores
// (mask, max, exp, sum, and as many again backward), each a loop over a buffer far larger
// than the core's cache, plus the rotations of q and k and of their gradients, and it
// computes the masked half of causal scores. Here one (batch, head) at
// a time stays in cache: per block of kQueryBlock queries, only the keys some query of the
// block may see (causal: the block's prefix), scores and softmax in a [queries, keys]
// buffer, the products as small matmuls in registers (SmallGemm) reading q, k, v in their
// [batch, length, heads, head_dim] layout; (batch, head) pairs go to the pool threads.
//
// Layout: q [B, Lq, H, D], k and v [B, Lk, H, D], bias [Bm, Lq, Lk] with Bm = 1 or B:
// 0 where the query may see the key, -inf where not (the mask as a float: the row passes
// vectorise where a bool operand kept them scalar); sin, cos [Bs, L, D/2] (Rope, below).
// Forward -> o [B, Lq, H, D], lse [B, H, Lq] (log Σ exp of each query's scores). A query
// that may see no key gets o = 0 and lse = +inf (its probabilities 0, so no gradient).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace moejax_cpu;

namespace {

constexpr int64_t kQueryBlock = 32;

// exp(x) for float, vectorisable (libm's expf is a call per element): 2^n · p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, p the degree-6 Taylor polynomial (relative error < 2e-7);
// 0 below -87.3 (and for -inf), NaN for NaN. Arguments here are <= 0 (scores minus their
// maximum or log-sum-exp). n is rounded by the 1.5·2²³ trick: nearbyint would not inline.
// The clamp is written so that NaN clamps to a number (-87.3): no float-to-int conversion
// of NaN.
inline float FastExp(float x) {
  const float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.f;
  const float xc = x > -87.3f ? (x < 0.f ? x : 0.f) : -87.3f;
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : (x != x ? x : p * scale);
}

constexpr int64_t kLanes = 16;   // lanes of the row reductions (vectorised, fixed order)

// row[j] += bias[j] (-inf where masked).
inline void MaskRow(float* __restrict row, const float* __restrict bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
}

inline float RowMax(const float* __restrict row, int64_t n) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], row[j + l]);
  }
  for (; j < n; ++j) lanes[0] = std::max(lanes[0], row[j]);
  return *std::max_element(lanes, lanes + kLanes);
}

// row[j] = exp(row[j] - shift); returns their sum.
inline float ExpRow(float* __restrict row, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      row[j + l] = FastExp(row[j + l] - shift);
      lanes[l] += row[j + l];
    }
  }
  for (; j < n; ++j) {
    row[j] = FastExp(row[j] - shift);
    lanes[0] += row[j];
  }
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// ------------------------------------------------------------------ small matmuls
//
// c[i, j] (+)= alpha · Σ_p a[i·ars + p·acs] · b[p·ldb + j]   (i < m, j < n, p < k)
//
// The products here are small (k = head_dim or a block of 32 queries, n = head_dim or the
// block's keys): a BLAS sgemm spends as long packing its operands as multiplying them
// (packing pays only when each packed panel is reused many times). This reads a and b in
// place, a tile of 4 rows × 32 columns of c in registers over all of p. Strided a covers
// the transposed products (dk += dsᵀ q: ars = 1, acs = the row length of ds).

typedef float V16 __attribute__((vector_size(64)));   // 16 lanes (one AVX-512 register or two AVX)

inline V16 Load16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store16(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }

// One tile: R rows, NV × 16 columns. Multiply-adds contract to FMAs (fp-contract: ISO
// C++ mode otherwise keeps them apart, at half the speed).
template <int R, int NV>
[[gnu::always_inline, gnu::optimize("fp-contract=fast")]] inline void GemmTile(
    int64_t k, float alpha, const float* a, int64_t ars, int64_t acs, const float* b,
    int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  V16 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = V16{};
  }
  for (int64_t p = 0; p < k; ++p) {
    V16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Load16(b + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float av = a[r * ars + p * acs];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      V16 out = acc[r][v] * alpha;
      if (accumulate) out += Load16(c + r * ldc + 16 * v);
      Store16(c + r * ldc + 16 * v, out);
    }
  }
}

// R rows of c: tiles of 32 and 16 columns, then the last < 16 columns one by one.
template <int R>
[[gnu::optimize("fp-contract=fast")]] void GemmRows(int64_t n, int64_t k, float alpha,
                                                    const float* a, int64_t ars, int64_t acs,
                                                    const float* b, int64_t ldb, bool accumulate,
                                                    float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    GemmTile<R, 2>(k, alpha, a, ars, acs, b + j, ldb, accumulate, c + j, ldc);
  }
  for (; j + 16 <= n; j += 16) {
    GemmTile<R, 1>(k, alpha, a, ars, acs, b + j, ldb, accumulate, c + j, ldc);
  }
  for (; j < n; ++j) {
    for (int64_t r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t p = 0; p < k; ++p) sum += a[r * ars + p * acs] * b[p * ldb + j];
      c[r * ldc + j] = alpha * sum + (accumulate ? c[r * ldc + j] : 0.f);
    }
  }
}

void SmallGemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t ars,
               int64_t acs, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    GemmRows<4>(n, k, alpha, a + i * ars, ars, acs, b, ldb, accumulate, c + i * ldc, ldc);
  }
  for (; i < m; ++i) {
    GemmRows<1>(n, k, alpha, a + i * ars, ars, acs, b, ldb, accumulate, c + i * ldc, ldc);
  }
}

struct Shapes {
  int64_t b, lq, lk, h, d, mask_batch;
};

// Checks q [B, Lq, H, D], k, v [B, Lk, H, D], bias [1 | B, Lq, Lk]; fills s.
void AttentionShapes(Checks& c, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                     ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& bias, Shapes& s) {
  c.Rank("q", q, 4).Rank("k", k, 4).Rank("bias", bias, 3);
  if (!c.ok()) return;
  auto qd = q.dimensions(), kd = k.dimensions(), md = bias.dimensions();
  s = {qd[0], qd[1], kd[1], qd[2], qd[3], md[0]};
  c.Shape("k", k, {s.b, s.lk, s.h, s.d}).SameShape("v", v, "k", k);
  c.That(s.d > 0 && s.lk > 0, "q and k must have a head dimension and a key (D, Lk > 0)");
  c.That(s.mask_batch == 1 || s.mask_batch == s.b, "bias must be [1 | B, Lq, Lk]");
  c.Shape("bias", bias, {s.mask_batch, s.lq, s.lk});
}

// Per mask batch and block of kQueryBlock queries, the keys [first, last) that some query
// of the block may see (first = last when none): [Bm · blocks] pairs, found once per call
// rather than per head.
std::vector<std::pair<int64_t, int64_t>> KeyRanges(const float* bias, const Shapes& s) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t blocks = (s.lq + kQueryBlock - 1) / kQueryBlock;
  std::vector<std::pair<int64_t, int64_t>> ranges(s.mask_batch * blocks);
  for (int64_t mb = 0; mb < s.mask_batch; ++mb) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      int64_t first = s.lk, last = 0;
      for (int64_t i = blk * kQueryBlock; i < std::min(s.lq, (blk + 1) * kQueryBlock); ++i) {
        const float* row = bias + (mb * s.lq + i) * s.lk;
        int64_t lo = 0, hi = s.lk;
        while (lo < std::min(first, s.lk) && row[lo] == kNegInf) ++lo;   // only what can widen
        while (hi > std::max(last, lo) && row[hi - 1] == kNegInf) --hi;
        if (lo < s.lk && row[lo] != kNegInf) first = std::min(first, lo);
        if (hi > lo && row[hi - 1] != kNegInf) last = std::max(last, hi);
      }
      ranges[mb * blocks + blk] = first < last ? std::make_pair(first, last)
                                               : std::make_pair(int64_t{0}, int64_t{0});
    }
  }
  return ranges;
}

// p[i, j] = exp(s[i, j] - lse[i]) where the mask allows, else 0 (in place over s).
void Probabilities(float* s, const float* mask_rows, int64_t lk, int64_t first, int64_t nq,
                   int64_t nk, const float* lse) {
  for (int64_t i = 0; i < nq; ++i) {
    MaskRow(s + i * nk, mask_rows + i * lk + first, nk);
    ExpRow(s + i * nk, nk, lse[i]);
  }
}

// Rotary positions applied inside the kernel (rotate-half, as layers.attention.rotary):
// sin, cos [Bs, L, D/2] with Bs = 1 or B, for queries and keys alike (self-attention,
// Lq = Lk = L); off: rows are copied as they are.
struct Rope {
  const float* sin;
  const float* cos;
  int64_t batch, length, half;
  bool on;
};

// y[0, D) = row x of (batch b, position pos) rotated by its angles, or by their negatives
// (inverse: the rotation's transpose, for gradients).
inline void RotateRow(const float* __restrict x, float* __restrict y, const Rope& r, int64_t d,
                      int64_t b, int64_t pos, bool inverse) {
  if (!r.on) {
    std::memcpy(y, x, static_cast<size_t>(d) * sizeof(float));
    return;
  }
  const int64_t off = ((r.batch == 1 ? 0 : b) * r.length + pos) * r.half;
  const float* sn = r.sin + off;
  const float* cs = r.cos + off;
  const float sign = inverse ? -1.f : 1.f;
  for (int64_t c = 0; c < r.half; ++c) {
    const float x1 = x[c], x2 = x[c + r.half], sc = sign * sn[c];
    y[c] = x1 * cs[c] - x2 * sc;
    y[c + r.half] = x2 * cs[c] + x1 * sc;
  }
}

// Per-thread buffers, reused across the (batch, head) pairs a thread runs; vt, kr, dkr,
// dqr and ds only for the backward.
struct Scratch {
  Scratch(const Shapes& s, bool backward)
      : kt(new float[s.d * s.lk]), qr(new float[kQueryBlock * s.d]),
        p(new float[kQueryBlock * s.lk]), row(new float[s.d]) {
    if (backward) {
      vt.reset(new float[s.d * s.lk]);
      kr.reset(new float[s.lk * s.d]);
      dkr.reset(new float[s.lk * s.d]);
      dqr.reset(new float[kQueryBlock * s.d]);
      ds.reset(new float[kQueryBlock * s.lk]);
    }
  }
  std::unique_ptr<float[]> kt, qr, p, row;   // [D, Lk] rotated keys transposed; [kQueryBlock,
                                             // D] rotated queries; [kQueryBlock, Lk] scores /
                                             // probabilities; [D]
  std::unique_ptr<float[]> vt, kr, dkr;      // [D, Lk] values transposed; [Lk, D] rotated
                                             // keys, their gradient
  std::unique_ptr<float[]> dqr, ds;          // gradients of qr and of the scores
};

// One (batch, head) of q [B, Lq, H, D] or k, v [B, Lk, H, D]: row i at base + i · ld.
struct HeadRows {
  const float* base;
  int64_t ld;
  const float* operator[](int64_t i) const { return base + i * ld; }
};

// dst [D, Lk] = rows [0, Lk) of x (rotated if rope.on), transposed.
void Transposed(HeadRows x, const Shapes& s, const Rope& rope, int64_t b, float* row,
                float* dst) {
  for (int64_t j = 0; j < s.lk; ++j) {
    RotateRow(x[j], row, rope, s.d, b, j, false);
    for (int64_t c = 0; c < s.d; ++c) dst[c * s.lk + j] = row[c];
  }
}

// Runs body(b, h, scratch) over every (batch, head) pair on the pool.
template <typename Body>
void ForHeads(ffi::ThreadPool& pool, const Shapes& s, bool backward, const Body& body) {
  ParallelFor(pool, s.b * s.h, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(s, backward);
    for (int64_t p = begin; p < end; ++p) body(p / s.h, p % s.h, scratch);
  });
}

// With rotate: checks sin, cos [1 | B, L, D / 2] with Lq = Lk = L; fills rope. Without,
// they are not read.
void RopeShapes(Checks& c, ffi::Buffer<ffi::F32>& sin, ffi::Buffer<ffi::F32>& cos, bool on,
                const Shapes& s, Rope& rope) {
  rope = {nullptr, nullptr, 1, 0, 0, false};
  if (!on || !c.ok()) return;
  c.Rank("sin", sin, 3).SameShape("cos", cos, "sin", sin);
  c.That(s.lq == s.lk && s.d % 2 == 0,
         "rotary positions need Lq = Lk (self-attention) and an even head dimension");
  if (!c.ok()) return;
  const int64_t sb = sin.dimensions()[0];
  c.That(sb == 1 || sb == s.b, "sin, cos must be [1 | B, L, D / 2]");
  c.Shape("sin", sin, {sb, s.lq, s.d / 2});
  if (c.ok()) rope = {sin.typed_data(), cos.typed_data(), sb, s.lq, s.d / 2, true};
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> sin,
                            ffi::Buffer<ffi::F32> cos, ffi::ResultBuffer<ffi::F32> o,
                            ffi::ResultBuffer<ffi::F32> lse, bool rotate) {
  // q [B, Lq, H, D], k, v [B, Lk, H, D], bias [1 | B, Lq, Lk], with rotate sin, cos
  // [1 | B, L, D / 2] (Lq = Lk = L) -> o [B, Lq, H, D], lse [B, H, Lq]
  Shapes s;
  Rope rope;
  Checks c("attention");
  AttentionShapes(c, q, k, v, bias, s);
  RopeShapes(c, sin, cos, rotate, s, rope);
  if (!c.ok()) return c.error();
  c.SameShape("o", *o, "q", q).Shape("lse", *lse, {s.b, s.h, s.lq});
  if (!c.ok()) return c.error();
  const int64_t ld = s.h * s.d;   // between rows of one head
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
  const auto ranges = KeyRanges(bias.typed_data(), s);
  const int64_t blocks = (s.lq + kQueryBlock - 1) / kQueryBlock;
  float *os = o->typed_data(), *lses = lse->typed_data();
  ForHeads(pool, s, false, [&](int64_t b, int64_t h, Scratch& w) {
    const HeadRows qh{q.typed_data() + b * s.lq * ld + h * s.d, ld};
    const HeadRows kh{k.typed_data() + b * s.lk * ld + h * s.d, ld};
    const HeadRows vh{v.typed_data() + b * s.lk * ld + h * s.d, ld};
    const float* bias_b = bias.typed_data() + (s.mask_batch == 1 ? 0 : b) * s.lq * s.lk;
    Transposed(kh, s, rope, b, w.row.get(), w.kt.get());
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t q0 = blk * kQueryBlock, nq = std::min(kQueryBlock, s.lq - q0);
      float* ob = os + (b * s.lq + q0) * ld + h * s.d;
      float* lb = lses + (b * s.h + h) * s.lq + q0;
      const auto [first, last] = ranges[(s.mask_batch == 1 ? 0 : b) * blocks + blk];
      const int64_t nk = last - first;
      if (nk == 0) {   // the block sees no key
        for (int64_t i = 0; i < nq; ++i) {
          std::fill(ob + i * ld, ob + i * ld + s.d, 0.f);
          lb[i] = std::numeric_limits<float>::infinity();
        }
        continue;
      }
      float *qr = w.qr.get(), *sc = w.p.get();   // sc [nq, nk]: scores, then exp
      for (int64_t i = 0; i < nq; ++i) {
        RotateRow(qh[q0 + i], qr + i * s.d, rope, s.d, b, q0 + i, false);
      }
      SmallGemm(nq, nk, s.d, scale, qr, s.d, 1, w.kt.get() + first, s.lk, false, sc, nk);
      float inv[kQueryBlock];
      for (int64_t i = 0; i < nq; ++i) {
        float* row = sc + i * nk;
        MaskRow(row, bias_b + (q0 + i) * s.lk + first, nk);
        const float m = RowMax(row, nk);
        if (m == -std::numeric_limits<float>::infinity()) {   // sees no key
          std::fill(row, row + nk, 0.f);
          inv[i] = 0.f;
          lb[i] = std::numeric_limits<float>::infinity();
          continue;
        }
        const float sum = ExpRow(row, nk, m);
        inv[i] = 1.f / sum;
        lb[i] = m + std::log(sum);
      }
      SmallGemm(nq, s.d, nk, 1.f, sc, nk, 1, vh[first], ld, false, ob, ld);
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t c = 0; c < s.d; ++c) ob[i * ld + c] *= inv[i];
      }
    }
  });
  return ffi::Error::Success();
}

// dq, dk, dv from do (and the forward's o, lse). Per query block: p = exp(s - lse),
// dp = do vᵀ, ds = p (dp - rowsum(do ⊙ o)), dq = ds k / √d, dk += dsᵀ q / √d,
// dv += pᵀ do (q, k rotated; dq, dk rotated back). The blocks of one (batch, head) run in
// order on one thread: the same sums whatever the thread count.
ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> sin,
                            ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> o,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv, bool rotate) {
  // q, o, do [B, Lq, H, D], k, v [B, Lk, H, D], bias [1 | B, Lq, Lk], lse [B, H, Lq], with
  // rotate sin, cos [1 | B, L, D / 2] -> dq, dk, dv as q, k, v
  Shapes s;
  Rope rope;
  Checks c("attention_bwd");
  AttentionShapes(c, q, k, v, bias, s);
  RopeShapes(c, sin, cos, rotate, s, rope);
  if (!c.ok()) return c.error();
  c.SameShape("o", o, "q", q).SameShape("do", d_o, "q", q).Shape("lse", lse, {s.b, s.h, s.lq});
  c.SameShape("dq", *dq, "q", q).SameShape("dk", *dk, "k", k).SameShape("dv", *dv, "v", v);
  if (!c.ok()) return c.error();
  const int64_t ld = s.h * s.d;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
  const auto ranges = KeyRanges(bias.typed_data(), s);
  const int64_t blocks = (s.lq + kQueryBlock - 1) / kQueryBlock;
  const float *lses = lse.typed_data();
  float *dqs = dq->typed_data(), *dks = dk->typed_data(), *dvs = dv->typed_data();
  ForHeads(pool, s, true, [&](int64_t b, int64_t h, Scratch& w) {
    const int64_t q_off = b * s.lq * ld + h * s.d, kv_off = b * s.lk * ld + h * s.d;
    const HeadRows qh{q.typed_data() + q_off, ld}, oh{o.typed_data() + q_off, ld};
    const HeadRows doh{d_o.typed_data() + q_off, ld};
    const HeadRows kh{k.typed_data() + kv_off, ld}, vh{v.typed_data() + kv_off, ld};
    const float* bias_b = bias.typed_data() + (s.mask_batch == 1 ? 0 : b) * s.lq * s.lk;
    float *kr = w.kr.get(), *dkr = w.dkr.get(), *dvb = dvs + kv_off;
    Transposed(kh, s, rope, b, w.row.get(), w.kt.get());
    Transposed(vh, s, Rope{nullptr, nullptr, 1, 0, 0, false}, b, w.row.get(), w.vt.get());
    for (int64_t j = 0; j < s.lk; ++j) {
      RotateRow(kh[j], kr + j * s.d, rope, s.d, b, j, false);
      std::fill(dvb + j * ld, dvb + j * ld + s.d, 0.f);
    }
    std::fill(dkr, dkr + s.lk * s.d, 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t q0 = blk * kQueryBlock, nq = std::min(kQueryBlock, s.lq - q0);
      const float* lb = lses + (b * s.h + h) * s.lq + q0;
      const auto [first, last] = ranges[(s.mask_batch == 1 ? 0 : b) * blocks + blk];
      const int64_t nk = last - first;
      float* dqb = dqs + q_off + q0 * ld;
      if (nk == 0) {
        for (int64_t i = 0; i < nq; ++i) std::fill(dqb + i * ld, dqb + i * ld + s.d, 0.f);
        continue;
      }
      float *qr = w.qr.get(), *dqr = w.dqr.get(), *p = w.p.get(), *ds = w.ds.get();
      for (int64_t i = 0; i < nq; ++i) {
        RotateRow(qh[q0 + i], qr + i * s.d, rope, s.d, b, q0 + i, false);
      }
      SmallGemm(nq, nk, s.d, scale, qr, s.d, 1, w.kt.get() + first, s.lk, false, p, nk);
      Probabilities(p, bias_b + q0 * s.lk, s.lk, first, nq, nk, lb);
      SmallGemm(nq, nk, s.d, 1.f, doh[q0], ld, 1, w.vt.get() + first, s.lk, false, ds, nk);
      for (int64_t i = 0; i < nq; ++i) {
        const float* oi = oh[q0 + i];
        const float* doi = doh[q0 + i];
        float rowsum = 0.f;
        for (int64_t c = 0; c < s.d; ++c) rowsum += oi[c] * doi[c];
        float* dsi = ds + i * nk;
        const float* pi = p + i * nk;
        for (int64_t j = 0; j < nk; ++j) dsi[j] = pi[j] * (dsi[j] - rowsum);
      }
      SmallGemm(nq, s.d, nk, scale, ds, nk, 1, kr + first * s.d, s.d, false, dqr, s.d);
      for (int64_t i = 0; i < nq; ++i) {
        RotateRow(dqr + i * s.d, dqb + i * ld, rope, s.d, b, q0 + i, true);
      }
      SmallGemm(nk, s.d, nq, scale, ds, 1, nk, qr, s.d, true, dkr + first * s.d, s.d);
      SmallGemm(nk, s.d, nq, 1.f, p, 1, nk, doh[q0], ld, true, dvb + first * ld, ld);
    }
    for (int64_t j = 0; j < s.lk; ++j) {
      RotateRow(dkr + j * s.d, dks + kv_off + j * ld, rope, s.d, b, j, true);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// The attention signatures begin alike: (pool; q, k, v, bias, sin, cos).
static auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

// -> o, lse.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxAttentionFwdF32, AttentionFwdImpl,
                              AttentionBinding()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rotate"));

// (..., o, lse, do) -> dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxAttentionBwdF32, AttentionBwdImpl,
                              AttentionBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rotate"));
