// A small persistent thread pool for the forest's batch calls.
//
// parallel_for splits [0, n) into blocks and runs them on the pool's workers and on the calling
// thread. Several threads may call parallel_for at once (Python threads with the GIL released):
// each call is a job in a shared queue, and every caller works on its own job, so no call
// waits on a worker that is busy elsewhere for longer than one block.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace rstar {

class ThreadPool {
 public:
  // num_threads counts the caller: num_threads - 1 workers are started (0: all cores).
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }

  // Runs fn(begin, end) over [0, n). Blocks hold at least `grain` items; below 2 * grain the
  // caller runs everything inline, and so does a forked child (the workers stayed in the
  // parent). Returns when all blocks are done; rethrows the first exception a block threw.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  struct Job;
  // What the workers share. On the heap: a forked child, which has none of the parent's
  // threads, leaves it as it is (joining them, or destroying a condition variable they were
  // waiting on, would block for ever).
  struct Shared {
    std::vector<std::thread> workers;
    std::mutex mutex;                        // guards queue and stop
    std::condition_variable wake;            // signalled when a job is queued or on stop
    std::deque<std::shared_ptr<Job>> queue;  // jobs with blocks left to claim
    bool stop = false;
  };
  void worker_loop();
  void stop_workers();  // sets stop, wakes every worker and joins it
  static void run_blocks(Job& job);

  int num_threads_;
  pid_t owner_;  // the process whose threads the workers are
  std::unique_ptr<Shared> shared_;
};

}  // namespace rstar
