// A small fork-join pool: run(n_tasks, fn) calls fn(task, thread) for every task, handing tasks
// out dynamically, the calling thread taking part. The caller waits only for tasks, never for a
// worker to wake up: a worker that the OS schedules late (the cores may be shared) finds the job's
// tasks all claimed and goes back to sleep, so a busy machine slows a job down only by the work
// actually done elsewhere.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace wqe {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }
    void run(int n_tasks, const std::function<void(int task, int thread)>& fn);

private:
    void worker(int id);
    bool work(int id, uint64_t gen);  // claims and runs tasks of generation gen

    int n_threads_;
    std::vector<std::thread> threads_;
    // state_ = generation (24 bits) | n_tasks (20 bits) | next task (20 bits): a worker can only
    // claim a task of the generation it saw, so a late worker never touches a finished job.
    std::atomic<uint64_t> state_{0};
    std::atomic<int> done_{0};
    const std::function<void(int, int)>* fn_ = nullptr;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    uint64_t gen_ = 0;
};

int default_thread_count();

}  // namespace wqe
