// What the CPU kernels' sources share (cpu_kernels.cc, cpu_attention.cc): the thread-pool
// loop, and the BLAS sgemm that Python hands over (MoejaxSetSgemm, in cpu_kernels.cc).

#ifndef MOEJAX_KERNELS_CPU_COMMON_H_
#define MOEJAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace moejax_cpu {

namespace ffi = xla::ffi;

// Runs body(begin, end) over [0, count) in up to pool.num_threads() parts of at least
// min_part items. Parts are claimed from a shared counter by this thread and by pool
// tasks alike, and this thread waits only for parts another thread has claimed (so are
// running): a pool whose threads are all busy (e.g. in other calls like this one) cannot
// deadlock it; tasks that start late find nothing left and touch nothing but the counters.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t min_part, const Body& body) {
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), count / std::max<int64_t>(min_part, 1)));
  if (parts == 1) {
    body(0, count);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, parts, count, &body] {
    for (int64_t p; (p = counters->next.fetch_add(1)) < parts;) {
      body(count * p / parts, count * (p + 1) / parts);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t p = 1; p < parts; ++p) {
    auto task = work;   // Schedule takes its own copy (an rvalue)
    pool.Schedule(std::move(task));
  }
  work();
  while (counters->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// cblas_sgemm with 64-bit integers (its enums stay C ints): numpy's bundled OpenBLAS, set
// from Python before first use; null where there is none (callers then fall back).
using Sgemm64 = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                         float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc);
using SetThreadsLocal = int (*)(int);
inline std::atomic<Sgemm64> g_sgemm{nullptr};
inline std::atomic<SetThreadsLocal> g_set_threads_local{nullptr};
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Makes this thread's sgemms single-threaded (see ForPieces in cpu_kernels.cc for why it
// is set and left so); false where OpenBLAS has no thread-local setting, and the caller
// should then not run sgemms on several threads at once.
inline bool SingleThreadedBlas() {
  const SetThreadsLocal set_local = g_set_threads_local.load();
  if (set_local) set_local(1);
  return set_local != nullptr;
}

}  // namespace moejax_cpu

#endif  // MOEJAX_KERNELS_CPU_COMMON_H_
