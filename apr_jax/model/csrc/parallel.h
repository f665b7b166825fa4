// Work sharing over XLA's intra-op thread pool, shared by the CPU kernels.

#ifndef APR_JAX_PARALLEL_H_
#define APR_JAX_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace apr_parallel {

// Runs fn(unit) for every unit in [0, units): the calling thread and, when `parallel`, up to
// num_threads - 1 pool tasks take units from one counter. The caller then waits only for units already
// taken (their takers are running), so a task the pool starts late finds nothing left, touches only the
// counters it co-owns and never calls fn (which may refer to the caller's stack).
template <typename Fn>
void ForEachUnit(xla::ffi::ThreadPool& pool, int64_t units, bool parallel, Fn fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, units, fn] {
    for (int64_t u = shared->next.fetch_add(1); u < units; u = shared->next.fetch_add(1)) {
      fn(u);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  if (parallel) {
    const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, units - 1);
    for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  }
  work();
  while (shared->done.load(std::memory_order_acquire) < units) {
    std::this_thread::yield();  // a helper may be waiting for this core
  }
}

}  // namespace apr_parallel

#endif  // APR_JAX_PARALLEL_H_
