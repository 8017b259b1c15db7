#include "threadpool.h"

#if defined(__linux__)
#  include <sched.h>
#endif

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#  include <immintrin.h>
#  define WQE_PAUSE() _mm_pause()
#else
#  define WQE_PAUSE() std::this_thread::yield()
#endif

namespace wqe {

namespace {
constexpr int TASK_BITS = 20;
constexpr uint64_t TASK_MASK = (1u << TASK_BITS) - 1;
constexpr int MAX_TASKS = (int)TASK_MASK;
constexpr int SPIN = 4000;  // pause iterations before sleeping / yielding

inline uint64_t gen_of(uint64_t s) { return s >> (2 * TASK_BITS); }
inline int end_of(uint64_t s) { return (int)((s >> TASK_BITS) & TASK_MASK); }
inline int next_of(uint64_t s) { return (int)(s & TASK_MASK); }
inline uint64_t span_state(uint64_t gen, uint64_t end, uint64_t next) { return gen << (2 * TASK_BITS) | end << TASK_BITS | next; }
}  // namespace

int default_thread_count() {
#if defined(__linux__)
    cpu_set_t set;  // the CPUs this process may run on (containers, taskset)
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n ? (int)n : 1;
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)), spans_(new Span[std::max(1, n_threads)]) {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
}

bool ThreadPool::work(int id, uint64_t gen) {
    bool did = false;
    std::atomic<uint64_t>& mine = spans_[id].s;
    for (;;) {
        // Run the own span in order, from its start. The finished tasks are counted here and published once per
        // span (release: their results are visible to the caller that reads done_ == n_tasks): one shared atomic
        // add per task made the counter's cache line bounce between the cores on every task, and on llama-s's
        // small tasks (a few microseconds) that add was 14% of decode's CPU time at 2 threads (perf, issue 12).
        int finished = 0;
        uint64_t s = mine.load(std::memory_order_acquire);
        while (gen_of(s) == gen && next_of(s) < end_of(s)) {
            if (!mine.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
            // The task is ours: the job is live until it is done (done_ counts it only below), so fn_ is valid.
            (*fn_)(next_of(s), id);
            ++finished;
            s = mine.load(std::memory_order_acquire);
        }
        if (finished) {
            done_.fetch_add(finished, std::memory_order_acq_rel);
            did = true;
        }
        if (gen_of(s) != gen) return did;
        // Then take the back half of another thread's remaining span, as a new span of our own (run in order as
        // well, so the hardware prefetchers keep following; others may take from it in turn). Nobody touches an
        // exhausted span, so ours can be republished with a plain store.
        bool stole = false;
        for (int k = 1; k < n_threads_ && !stole; ++k) {
            std::atomic<uint64_t>& span = spans_[(id + k) % n_threads_].s;
            uint64_t v = span.load(std::memory_order_acquire);
            while (gen_of(v) == gen && next_of(v) < end_of(v)) {
                const uint64_t next = next_of(v), end = end_of(v), mid = next + (end - next) / 2;
                if (!span.compare_exchange_weak(v, span_state(gen, mid, next), std::memory_order_acq_rel,
                                                std::memory_order_acquire))
                    continue;
                mine.store(span_state(gen, end, mid), std::memory_order_release);
                stole = true;
                break;
            }
        }
        if (!stole) return did;
    }
}

void ThreadPool::worker(int id) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t s = state_.load(std::memory_order_acquire);
        for (int i = 0; gen_of(s) == seen && i < SPIN && !stop_.load(std::memory_order_relaxed); ++i) {
            WQE_PAUSE();
            s = state_.load(std::memory_order_acquire);
        }
        if (gen_of(s) == seen) {
            std::unique_lock<std::mutex> lock(mu_);
            sleepers_.fetch_add(1);
            cv_.wait(lock, [&] { return stop_.load() || gen_of(state_.load()) != seen; });
            sleepers_.fetch_sub(1);
            s = state_.load(std::memory_order_acquire);
        }
        if (stop_.load()) return;
        seen = gen_of(s);
        work(id, seen);
    }
}

void ThreadPool::run(int n_tasks, const std::function<void(int, int)>& fn) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1 || n_tasks > MAX_TASKS) {
        for (int t = 0; t < n_tasks; ++t) fn(t, 0);
        return;
    }
    gen_ = (gen_ + 1) & ((1u << 24) - 1);
    if (gen_ == 0) gen_ = 1;  // generation 0 is "nothing yet"
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    for (int i = 0; i < n_threads_; ++i) {  // span i = tasks [i n / T, (i + 1) n / T)
        const uint64_t first = (uint64_t)i * n_tasks / n_threads_, end = (uint64_t)(i + 1) * n_tasks / n_threads_;
        spans_[i].s.store(span_state(gen_, end, first), std::memory_order_release);
    }
    // seq_cst store then load, against the worker's sleepers_ increment then state_ load: either
    // the worker sees the new generation or we see it sleeping and wake it.
    state_.store(gen_ << (2 * TASK_BITS));
    if (sleepers_.load() > 0) {
        std::lock_guard<std::mutex> lock(mu_);
        cv_.notify_all();
    }
    work(0, gen_);
    for (int i = 0; done_.load(std::memory_order_acquire) < n_tasks; ++i) {
        if (i < SPIN) WQE_PAUSE();
        else std::this_thread::yield();
    }
}

}  // namespace wqe
