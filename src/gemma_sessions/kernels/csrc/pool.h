// The kernels' thread pool (par_for).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "common.h"

namespace {

// ---------------------------------------------------------------------------------------------------- thread pool
// The kernels' parallel loops run on this pool, not at::parallel_for (OpenMP). libgomp keeps one team of workers per
// thread that starts parallel regions, and once it manages more threads than there are CPUs (the main thread's team,
// made while the model loaded, plus the engine loop thread's team) it cuts its workers' spinning to ~100 iterations:
// every region then wakes them from a futex. A decode step is ~150 regions, and those wake-ups made a step on the
// engine's thread markedly slower than the same step on the main thread. This pool's workers spin for SPIN_US after
// each job (a step's next kernel comes within that), then sleep. One job runs at a time; a caller that finds the pool
// busy (another thread's kernel) runs its loop on its own thread. Chunks as at::parallel_for makes them:
// min(threads, ceil(n / grain)) contiguous ranges; torch.set_num_threads sets the thread count.
constexpr int64_t SPIN_US = 300;

class Pool {
 public:
  // Runs task(i) for i in [0, ntasks), task(0) on the caller; returns when all are done (rethrows the first error).
  void run(const std::function<void(int)>& task, int ntasks) {
    ensure(ntasks - 1);
    job_ = &task;
    error_ = nullptr;
    remaining_.store(ntasks - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(sleep_mu_);
      state_.store(((state_.load(std::memory_order_relaxed) >> 16) + 1) << 16 | static_cast<uint64_t>(ntasks),
                   std::memory_order_release);
      if (sleepers_ > 0) cv_.notify_all();
    }
    try {
      task(0);
    } catch (...) {
      record(std::current_exception());
    }
    while (remaining_.load(std::memory_order_acquire) != 0) pause();
    if (error_) std::rethrow_exception(error_);
  }

  std::mutex busy;  // held by the caller whose job runs

 private:
  static inline void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }

  void ensure(int n) {
    while (workers_ < n) {
      ++workers_;
      std::thread(&Pool::work, this, workers_, state_.load(std::memory_order_relaxed)).detach();
    }
  }

  void record(std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(error_mu_);
    if (!error_) error_ = e;
  }

  // state_ = (epoch << 16) | ntasks, one word, so a worker never pairs one job's epoch with another's task count.
  void work(int idx, uint64_t seen) {
    using clock = std::chrono::steady_clock;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if (s >> 16 == seen >> 16) {
        const auto t0 = clock::now();
        for (int spins = 0; (s = state_.load(std::memory_order_acquire)) >> 16 == seen >> 16; ++spins) {
          pause();
          if ((spins & 255) == 255 && clock::now() - t0 > std::chrono::microseconds(SPIN_US)) {
            std::unique_lock<std::mutex> lk(sleep_mu_);
            ++sleepers_;
            cv_.wait(lk, [&] { return state_.load(std::memory_order_acquire) >> 16 != seen >> 16; });
            --sleepers_;
            spins = 0;
          }
        }
      }
      seen = s;
      if (idx < static_cast<int>(s & 0xffff)) {
        try {
          (*job_)(idx);
        } catch (...) {
          record(std::current_exception());
        }
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  int workers_ = 0;  // guarded by busy
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> remaining_{0};
  std::mutex sleep_mu_, error_mu_;
  std::condition_variable cv_;
  int sleepers_ = 0;  // guarded by sleep_mu_
  std::exception_ptr error_;
};

// One pool per process, never destroyed (its detached workers may outlive static destructors). A forked child has
// none of its parent's threads: it starts a new pool (the parent's is leaked in the child).
static std::atomic<Pool*> g_pool{nullptr};
static std::once_flag g_atfork;

static Pool& pool() {
  std::call_once(g_atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
    delete fresh;
  }
  return *p;
}

thread_local bool t_in_job = false;

// f(b, e) over [begin, end) in chunks, as at::parallel_for(begin, end, grain, f) would split it.
template <typename F>
static void par_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), (n + std::max<int64_t>(grain, 1) - 1) /
                                             std::max<int64_t>(grain, 1), 0xffff});
  if (threads <= 1 || t_in_job) return f(begin, end);
  Pool& p = pool();
  std::unique_lock<std::mutex> lk(p.busy, std::try_to_lock);
  if (!lk.owns_lock()) return f(begin, end);
  const int64_t chunk = (n + threads - 1) / threads;
  const int ntasks = static_cast<int>((n + chunk - 1) / chunk);
  const std::function<void(int)> task = [&](int i) {
    struct InJob {  // a loop inside the job (none today) runs inline, even if the job throws
      bool outer = t_in_job;
      InJob() { t_in_job = true; }
      ~InJob() { t_in_job = outer; }
    } in_job;
    const int64_t b = begin + i * chunk;
    f(b, std::min(end, b + chunk));
  };
  p.run(task, ntasks);
}

}  // namespace
