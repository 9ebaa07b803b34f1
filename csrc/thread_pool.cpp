#include "thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>

namespace rstar {

struct ThreadPool::Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0;
  int64_t block = 0;    // items per block
  int64_t nblocks = 0;
  std::atomic<int64_t> next{0};  // next block to claim
  std::atomic<int64_t> done{0};  // blocks finished
  std::mutex mutex;              // guards error; with done_cv, wakes the caller
  std::condition_variable done_cv;
  std::exception_ptr error;
};

ThreadPool::ThreadPool(int num_threads) : owner_(getpid()), shared_(std::make_unique<Shared>()) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  num_threads_ = num_threads;
  shared_->workers.reserve(static_cast<size_t>(num_threads - 1));
  try {
    for (int i = 0; i + 1 < num_threads; ++i) shared_->workers.emplace_back([this] { worker_loop(); });
  } catch (...) {
    // No thread to be had (a pids limit, memory): stop the ones started before the error
    // leaves, or destroying the condition variable they wait on would block forever.
    stop_workers();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  if (getpid() != owner_) {
    (void)shared_.release();  // a forked child's copy: left for the process's end to reclaim
    return;
  }
  stop_workers();
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    shared_->stop = true;
  }
  shared_->wake.notify_all();
  for (auto& t : shared_->workers) t.join();
}

void ThreadPool::run_blocks(Job& job) {
  for (;;) {
    const int64_t b = job.next.fetch_add(1, std::memory_order_relaxed);
    if (b >= job.nblocks) return;
    const int64_t begin = b * job.block;
    const int64_t end = std::min(job.n, begin + job.block);
    try {
      (*job.fn)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.mutex);
      if (!job.error) job.error = std::current_exception();
    }
    // acq_rel: the caller that sees the last block done also sees every block's writes.
    if (job.done.fetch_add(1, std::memory_order_acq_rel) + 1 == job.nblocks) {
      std::lock_guard<std::mutex> lock(job.mutex);
      job.done_cv.notify_all();
    }
  }
}

void ThreadPool::worker_loop() {
  Shared& sh = *shared_;
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(sh.mutex);
      sh.wake.wait(lock, [&sh] { return sh.stop || !sh.queue.empty(); });
      if (sh.stop) return;
      job = sh.queue.front();
      // A job whose blocks are all claimed leaves the queue; its caller waits for the rest.
      if (job->next.load(std::memory_order_relaxed) >= job->nblocks) {
        sh.queue.pop_front();
        continue;
      }
    }
    run_blocks(*job);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (shared_->workers.empty() || n < 2 * grain || getpid() != owner_) {
    fn(0, n);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  const int64_t max_blocks = static_cast<int64_t>(num_threads_) * 4;
  job->nblocks = std::min(max_blocks, n / grain);
  job->block = (n + job->nblocks - 1) / job->nblocks;
  job->nblocks = (n + job->block - 1) / job->block;
  Shared& sh = *shared_;
  {
    std::lock_guard<std::mutex> lock(sh.mutex);
    sh.queue.push_back(job);
  }
  sh.wake.notify_all();
  run_blocks(*job);
  {
    std::unique_lock<std::mutex> lock(job->mutex);
    job->done_cv.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == job->nblocks; });
  }
  {
    // Drop the job from the queue if no worker did (workers may still hold a copy; that is
    // harmless: they find no block left to claim).
    std::lock_guard<std::mutex> lock(sh.mutex);
    auto it = std::find(sh.queue.begin(), sh.queue.end(), job);
    if (it != sh.queue.end()) sh.queue.erase(it);
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace rstar
