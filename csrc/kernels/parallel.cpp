#include "kernels/parallel.h"
#include "kernels/isa.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#ifdef ONEBIT_OPENMP
// Parallel regions run on the OpenMP runtime that torch itself uses: libgomp.so.1 is
// loaded by torch before onebit._C (onebit imports torch first), and the dynamic
// loader binds our references to that same copy. So onebit's kernels and torch's ops
// share one team of threads: no second set of threads spinning against torch's (a
// separate pool lost its second core for milliseconds after every parallel torch op,
// while torch's OpenMP threads spun), and a binary layer right after a float one
// starts on threads that are already awake.
#include <omp.h>

#include <atomic>
#include <mutex>

namespace onebit {
namespace {

std::mutex busy;          // one of our regions at a time; another caller runs serially
bool forked_child = false;  // OpenMP's threads do not survive fork(): stay serial there

// Beside other busy processes (more runnable threads than cores), a helper thread may
// not be scheduled for a whole time slice (milliseconds), and an OpenMP region ends
// with a barrier that waits for it, even when the caller has done all the chunks
// itself (and libgomp's region start waits for the previous region's threads to dock).
// So every region measures how long its calling thread waited at both ends; when the
// wait was long (over kLateWait and over a quarter of its own
// work: the helper made the call slower than one thread would have been), regions run
// on the caller alone for a back-off period, doubling (kMinBackoff .. kMaxBackoff)
// while the waits stay long and halving when a region's helpers come in time. On a
// quiet machine the wait is the helper's last chunk: microseconds, never a back-off.
// A region that starts long after the previous one (kWarm) finds its helpers asleep in
// the kernel, and waking a sleeping vCPU takes from tens of microseconds to several
// milliseconds on a quiet virtual machine too: outside a back-off, such a region's wait
// says nothing about other processes and changes nothing. The regions of one model's
// forward pass follow each other closely, so a busy neighbour is still noticed at the next.
constexpr int64_t kLateWait = 100'000;            // ns
constexpr int64_t kWarm = 1'000'000;              // ns since the previous region ended
constexpr int64_t kMinBackoff = 20'000'000;       // ns
constexpr int64_t kMaxBackoff = 1'000'000'000;    // ns
std::atomic<int64_t> serial_until{0}, backoff{0}, last_end{0};  // steady-clock ns; ns; steady-clock ns

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void record_wait(int64_t start, int64_t own_start, int64_t own_done, int64_t end) {
  const int64_t wait = (own_start - start) + (end - own_done), work = own_done - own_start;
  const int64_t b = backoff.load(std::memory_order_relaxed);
  const bool warm = start - last_end.exchange(end, std::memory_order_relaxed) < kWarm;
  if (!warm && b == 0) return;  // during a back-off every region counts: the neighbour may still be busy
  if (wait > kLateWait && 4 * wait > work) {
    const int64_t next = std::min(kMaxBackoff, std::max(kMinBackoff, 2 * b));
    backoff.store(next, std::memory_order_relaxed);
    serial_until.store(end + next, std::memory_order_relaxed);
  } else if (b > 0) {
    backoff.store(b / 2 < kMinBackoff ? 0 : b / 2, std::memory_order_relaxed);
  }
}

}  // namespace

void parallel_chunks(int threads, int chunks, const std::function<void(int)>& fn) {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { forked_child = true; });
    return true;
  }();
  (void)registered;
  if (threads > chunks) threads = chunks;
  std::unique_lock<std::mutex> lock(busy, std::defer_lock);
  const int64_t start = threads > 1 ? now_ns() : 0;
  if (threads <= 1 || forked_child || start < serial_until.load(std::memory_order_relaxed) || omp_in_parallel() ||
      !lock.try_lock()) {
    for (int i = 0; i < chunks; ++i) fn(i);
    return;
  }
  // Chunks are claimed dynamically, so a thread that starts late takes fewer.
  std::atomic<int> next{0};
  int64_t own_start = 0, own_done = 0;
#pragma omp parallel num_threads(threads)
  {
    if (omp_get_thread_num() == 0) own_start = now_ns();
    for (int c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(c);
    if (omp_get_thread_num() == 0) own_done = now_ns();
  }
  record_wait(start, own_start, own_done, now_ns());
}

}  // namespace onebit

#else  // a small std::thread pool, for builds without OpenMP

namespace onebit {
namespace {

// An idle worker polls for the next job, first spinning (kSpin), then yielding its CPU
// between polls (kPoll: it stays awake but lets any other runnable thread, e.g.
// torch's, have the CPU), then sleeps. Waking a sleeping thread costs tens of
// microseconds (more in a VM), most of a small layer; the yielding phase keeps the
// worker ready through the short float ops between two binary layers.
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr auto kPoll = std::chrono::microseconds(3000);
constexpr int kMaxThreads = 1024;

class Pool {
 public:
  // Never destroyed: joining threads from static destructors at interpreter exit is
  // fragile, and the sleeping workers die with the process.
  static Pool*& instance() {
    static Pool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); });  // the child has no workers
      return new Pool();
    }();
    return pool;
  }

  void run(int threads, int chunks, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
    if (!busy.owns_lock() || threads <= 1 || chunks <= 1 || threads > kMaxThreads) {
      for (int i = 0; i < chunks; ++i) fn(i);
      return;
    }
    if (threads > chunks) threads = chunks;
    while (static_cast<int>(workers_.size()) < threads - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      const uint64_t seen = wake_.load(std::memory_order_relaxed);  // the job below is news to it
      workers_.emplace_back([this, id, seen] { work(id, seen); });
      workers_.back().detach();
    }
    // Publish the job: its function and chunk count, then (generation, next chunk 0).
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    job_ = &fn;
    nchunks_.store(static_cast<uint32_t>(chunks), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32, std::memory_order_release);
    // Wake threads - 1 workers: the wake word carries a counter and the thread count.
    const uint64_t wake = ((wake_.load(std::memory_order_relaxed) >> 16) + 1) << 16 | static_cast<uint64_t>(threads);
    wake_.store(wake, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      sleep_cv_.notify_all();
    }
    work_on(gen);
    // Wait for the chunks still running on workers; yield soon, in case one of them
    // shares this CPU (then spinning here would only delay it).
    for (uint64_t spins = 0; done_.load(std::memory_order_acquire) != static_cast<uint32_t>(chunks); ++spins) {
      if (spins < (1u << 12)) cpu_relax();
      else std::this_thread::yield();
    }
  }

 private:
  // Claims and runs chunks of generation gen until there are none left.
  void work_on(uint64_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s >> 32) != (gen & 0xffffffffu)) return;
      const uint32_t next = static_cast<uint32_t>(s);
      if (next >= nchunks_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_relaxed)) continue;
      // A claimed chunk keeps its job alive: the caller waits for every chunk.
      (*job_)(static_cast<int>(next));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void work(int id, uint64_t seen) {
    cpu_set_t allowed;
    const bool have_mask = sched_getaffinity(0, sizeof(allowed), &allowed) == 0;
    for (;;) {
      seen = wait_for_job(seen);
      if (id >= static_cast<int>(seen & 0xffff)) continue;
      // A worker woken onto the caller's CPU would time-share it with the caller (the
      // scheduler places wakees near their waker): move to another allowed CPU.
      const int cpu = sched_getcpu(), caller = caller_cpu_.load(std::memory_order_relaxed);
      if (have_mask && cpu >= 0 && cpu == caller && CPU_ISSET(cpu, &allowed) && CPU_COUNT(&allowed) > 1) {
        cpu_set_t others = allowed;
        CPU_CLR(cpu, &others);
        sched_setaffinity(0, sizeof(others), &others);
      }
      work_on(state_.load(std::memory_order_acquire) >> 32);
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      const uint64_t now = wake_.load(std::memory_order_acquire);
      if (now != seen) return now;
      cpu_relax();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) break;
    }
    for (int i = 0;; ++i) {
      const uint64_t now = wake_.load(std::memory_order_acquire);
      if (now != seen) return now;
      std::this_thread::yield();
      if ((i & 15) == 15 && std::chrono::steady_clock::now() - start > kPoll) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    sleep_cv_.wait(lock, [&] { return wake_.load(std::memory_order_seq_cst) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return wake_.load(std::memory_order_acquire);
  }

  std::mutex use_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0};  // generation << 32 | next unclaimed chunk
  std::atomic<uint32_t> nchunks_{0};
  std::atomic<uint32_t> done_{0};
  std::atomic<uint64_t> wake_{0};  // wake counter << 16 | threads of the job
  std::atomic<int> sleepers_{0};
  std::atomic<int> caller_cpu_{-1};
  const std::function<void(int)>* job_ = nullptr;
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
};

}  // namespace

void parallel_chunks(int threads, int chunks, const std::function<void(int)>& fn) {
  Pool::instance()->run(threads, chunks, fn);
}

}  // namespace onebit

#endif  // ONEBIT_OPENMP

namespace onebit {

void parallel_tasks(int threads, int64_t tasks, int64_t work, int64_t min_work_per_thread, int chunks_per_thread,
                    const std::function<void(int64_t)>& fn) {
  int64_t nthreads = threads < 1 ? 1 : threads;
  const int64_t by_size = work / min_work_per_thread;
  if (nthreads > by_size) nthreads = by_size < 1 ? 1 : by_size;
  if (nthreads > tasks) nthreads = tasks;
  if (nthreads > 256) nthreads = 256;
  if (nthreads <= 1) {
    for (int64_t i = 0; i < tasks; ++i) fn(i);
    return;
  }
  const int64_t chunks = tasks < nthreads * chunks_per_thread ? tasks : nthreads * chunks_per_thread;
  parallel_chunks(static_cast<int>(nthreads), static_cast<int>(chunks), [&](int c) {
    for (int64_t i = tasks * c / chunks, end = tasks * (c + 1) / chunks; i < end; ++i) fn(i);
  });
}

}  // namespace onebit
