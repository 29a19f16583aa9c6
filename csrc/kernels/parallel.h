// A small persistent thread pool for onebit's kernels.
//
// parallel_run(n, fn) calls fn(0) .. fn(n - 1) concurrently, fn(0) on the calling
// thread, and returns when all are done. Workers are created on first use, spin
// briefly after a job (so back-to-back layers do not pay a wake-up), then sleep.
// One parallel region runs at a time: a caller that finds the pool busy (another
// Python thread inside a kernel) runs its n parts itself, one after the other, so
// concurrent calls are always safe. It does not use OpenMP, so it never competes
// with the OpenMP runtime bundled with torch.
#pragma once
#include <functional>

namespace onebit {

void parallel_run(int n, const std::function<void(int)>& fn);

}  // namespace onebit
