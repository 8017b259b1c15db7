// A small fork-join pool: run(n_tasks, fn) calls fn(task, thread) for every task, the calling thread
// taking part. The tasks are cut into one contiguous span per thread, which its thread runs in order
// (a matrix-vector product's tasks are consecutive rows, so each thread streams one contiguous range of
// weights, which the hardware prefetchers follow: measured faster than handing out tasks one by one,
// issue 12). A thread that finishes its span takes the back half of what remains of another's as its
// own, again run in order, and the caller waits only for tasks, never for a worker to wake up: a worker
// that the OS schedules late (the cores may be shared) finds its span taken by the others, so a busy
// machine slows a job down only by the work actually done elsewhere.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
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
    bool work(int id, uint64_t gen);  // claims and runs tasks of generation gen: its own span, then stolen halves

    int n_threads_;
    std::vector<std::thread> threads_;
    // state_ = generation << 40 (the job a worker wakes for). Span i's state = generation (24 bits) | end
    // (20 bits) | next (20 bits): its owner claims `next`, a thief moves `end` back to the middle, by
    // compare-exchange, and only for the generation they saw, so a late worker never touches a finished job.
    // state_ and fn_ share a cache line, written by the caller only, read by waking workers; done_ has its own, which
    // the workers add to and the caller polls: on one line, each add invalidated the line the idle workers spin on.
    alignas(64) std::atomic<uint64_t> state_{0};
    const std::function<void(int, int)>* fn_ = nullptr;
    struct alignas(64) Span {
        std::atomic<uint64_t> s{0};
    };
    std::unique_ptr<Span[]> spans_;
    alignas(64) std::atomic<int> done_{0};
    alignas(64) uint64_t gen_ = 0;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
};

int default_thread_count();

}  // namespace wqe
