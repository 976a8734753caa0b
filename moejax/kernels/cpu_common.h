// What the CPU kernels' sources share (cpu_kernels.cc, cpu_attention.cc): the thread-pool
// loop.

#ifndef MOEJAX_KERNELS_CPU_COMMON_H_
#define MOEJAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace moejax_cpu {

namespace ffi = xla::ffi;

// Parts per pool thread that ParallelFor cuts a loop into. XLA:CPU runs independent ops
// at once on the same pool, so a call's pool tasks may start late, after its own thread
// has claimed most of the work: with one part per thread, the row-sparse PEER step at
// N = 1024² had one of two threads idle ~a third of the time, waiting on a lazy Adam
// that the other ran alone (perf samples). Smaller parts let a thread that frees up
// take the rest.
constexpr int64_t kPartsPerThread = 8;

// Runs body(begin, end) over [0, count) in up to kPartsPerThread * pool.num_threads()
// parts of at least min_part items, on up to pool.num_threads() threads. Parts are claimed
// from a shared counter by this thread and by pool tasks alike, and this thread waits only
// for parts another thread has claimed (so are running): a pool whose threads are all busy
// (e.g. in other calls like this one) cannot deadlock it; tasks that start late find
// nothing left and touch nothing but the counters. Bodies must not depend on where the
// parts are cut.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t min_part, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(kPartsPerThread * threads,
                           count / std::max<int64_t>(min_part, 1)));
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
  for (int64_t p = 1; p < std::min(parts, threads); ++p) {
    auto task = work;   // Schedule takes its own copy (an rvalue)
    pool.Schedule(std::move(task));
  }
  work();
  while (counters->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

}  // namespace moejax_cpu

#endif  // MOEJAX_KERNELS_CPU_COMMON_H_
