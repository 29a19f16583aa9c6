// A small persistent thread pool for onebit's kernels.
//
// parallel_chunks(threads, chunks, fn) calls fn(0) .. fn(chunks - 1), each exactly
// once, on up to `threads` threads (the caller is one of them), and returns when all
// are done. Chunks are claimed dynamically: a worker that the OS does not schedule
// in time (a loaded machine) simply claims fewer chunks, the caller takes the rest,
// and the call never waits for a thread that has no work.
//
// Workers are created on first use, spin briefly after a job (so back-to-back layers
// do not pay a wake-up), then sleep. One parallel region runs at a time: a caller
// that finds the pool busy (another Python thread inside a kernel) runs its chunks
// itself, so concurrent calls are always safe. No OpenMP, so no second OpenMP
// runtime next to the one bundled with torch. fn must not throw.
#pragma once
#include <cstdint>
#include <functional>

namespace onebit {

void parallel_chunks(int threads, int chunks, const std::function<void(int)>& fn);

// fn(i) for i < tasks, each exactly once: on up to `threads` threads, but no more than one per
// `min_work_per_thread` of the call's `work`, nor more than `tasks` or 256; each thread's share cut into
// about `chunks_per_thread` chunks (claimed dynamically, see above). On one thread, in order, on the caller.
void parallel_tasks(int threads, int64_t tasks, int64_t work, int64_t min_work_per_thread, int chunks_per_thread,
                    const std::function<void(int64_t)>& fn);

}  // namespace onebit
