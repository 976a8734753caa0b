// What the CPU kernels' sources share (cpu_kernels.cc, cpu_attention.cc): the operand
// checks and the thread-pool loop.

#ifndef MOEJAX_KERNELS_CPU_COMMON_H_
#define MOEJAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace moejax_cpu {

namespace ffi = xla::ffi;

// The operand checks of every handler: each operand's rank and shape against the others
// (the bindings check the dtypes), so that a wrong call is an error, which JAX raises as
// an exception, and never a read or write out of bounds. A handler checks the ranks, reads
// the sizes from its leading operands, checks every other operand's shape against them,
// and returns error() before it touches any data:
//
//   Checks c("gather_dot");
//   c.Rank("table", table, 2).Rank("indices", indices, 2);
//   if (!c.ok()) return c.error();
//   c.Shape("x", x, {t, d}).Shape("out", *out, {t, h});
//
// The first failed check is kept; later ones are no-ops.
class Checks {
 public:
  explicit Checks(const char* kernel) : kernel_(kernel) {}

  bool ok() const { return message_.empty(); }

  ffi::Error error() const {
    return ok() ? ffi::Error::Success()
                : ffi::Error::InvalidArgument("moejax " + kernel_ + ": " + message_);
  }

  // `name` has `rank` dimensions.
  template <typename B>
  Checks& Rank(const char* name, const B& buffer, int64_t rank) {
    auto dims = buffer.dimensions();
    if (ok() && static_cast<int64_t>(dims.size()) != rank) {
      message_ = std::string(name) + " has shape " + Format(dims) + ", expected rank " +
                 std::to_string(rank);
    }
    return *this;
  }

  // `name` has exactly the dimensions `want`.
  template <typename B>
  Checks& Shape(const char* name, const B& buffer, std::initializer_list<int64_t> want) {
    auto dims = buffer.dimensions();
    if (ok() && !std::equal(dims.begin(), dims.end(), want.begin(), want.end())) {
      message_ = std::string(name) + " has shape " + Format(dims) + ", expected " +
                 Format(want);
    }
    return *this;
  }

  // `name`'s dimensions are those of `other` (named `other_name`).
  template <typename B, typename C>
  Checks& SameShape(const char* name, const B& buffer, const char* other_name, const C& other) {
    auto dims = buffer.dimensions(), want = other.dimensions();
    if (ok() && !std::equal(dims.begin(), dims.end(), want.begin(), want.end())) {
      message_ = std::string(name) + " has shape " + Format(dims) + ", expected " +
                 Format(want) + " (as " + other_name + ")";
    }
    return *this;
  }

  // Any other condition; `what` says what must hold.
  Checks& That(bool condition, const std::string& what) {
    if (ok() && !condition) message_ = what;
    return *this;
  }

 private:
  template <typename Dims>
  static std::string Format(const Dims& dims) {
    std::string s = "[";
    for (auto it = dims.begin(); it != dims.end(); ++it) {
      s += (it == dims.begin() ? "" : ", ") + std::to_string(*it);
    }
    return s + "]";
  }

  std::string kernel_, message_;
};

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
