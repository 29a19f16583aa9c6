#include "kernels/parallel.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace onebit {
namespace {

inline void cpu_relax() { __builtin_ia32_pause(); }

// How long an idle worker keeps polling for the next job before it sleeps.
constexpr auto kSpin = std::chrono::microseconds(200);

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

  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1 || n > 1024) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      const uint64_t seen = generation_.load(std::memory_order_relaxed);  // the job below is news to it
      workers_.emplace_back([this, id, seen] { work(id, seen); });
      workers_.back().detach();
    }
    job_ = &fn;
    pending_.store(n - 1, std::memory_order_relaxed);
    // The job's thread count travels in the same word as its generation, so a worker
    // never pairs one job's generation with another job's count.
    const uint64_t next = ((generation_.load(std::memory_order_relaxed) >> 16) + 1) << 16 | static_cast<uint64_t>(n);
    generation_.store(next, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      sleep_cv_.notify_all();
    }
    fn(0);
    for (uint64_t spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < (1u << 20)) cpu_relax();
      else std::this_thread::yield();
    }
    job_ = nullptr;
  }

 private:
  void work(int id, uint64_t seen) {
    for (;;) {
      uint64_t now = wait_for_job(seen);
      seen = now;
      if (id < static_cast<int>(now & 0xffff)) {
        (*job_)(id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      cpu_relax();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    sleep_cv_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return generation_.load(std::memory_order_acquire);
  }

  std::mutex use_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int)>* job_ = nullptr;
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
};

}  // namespace

void parallel_run(int n, const std::function<void(int)>& fn) { Pool::instance()->run(n, fn); }

}  // namespace onebit
