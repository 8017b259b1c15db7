// The fork-join cost of the runtime's ThreadPool (cpp/src/threadpool.h) against its floor on this machine: one
// run() of N tasks of W multiply-adds each, µs per job, against (a) the same tasks on the calling thread alone and
// (b) the cheapest two-thread handoff (static halves, a generation flag out and a done flag back, no stealing).
// Decode makes about 5 joins per layer plus the head (model.cpp forward), so on a small model at 2 threads the
// join's cost is a visible share of a token (bench/results/issue12_xeon_amx.md, "With the compact-header default").
//
//   g++ -O2 -std=c++17 -pthread -Icpp/src bench/threadpool_bench.cpp cpp/src/threadpool.cpp -o /tmp/threadpool_bench
//   /tmp/threadpool_bench [N tasks, default 32] [W multiply-adds per task, default 0 50 200]
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "threadpool.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int JOBS = 100000;

double us_per(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::micro>(b - a).count() / JOBS; }

// Static halves: the caller runs tasks [0, n/2), one worker [n/2, n); the floor a pool with stealing pays more than.
double handoff_floor(int n, const std::function<void(int, int)>& fn) {
    alignas(64) std::atomic<unsigned> gen{0};   // per call: a worker of an earlier call's generations never sees them
    alignas(64) std::atomic<unsigned> done{0};
    std::atomic<bool> stop{false};
    std::thread w([&] {
        unsigned seen = 0;
        for (;;) {
            unsigned g;
            while ((g = gen.load(std::memory_order_acquire)) == seen) {
                if (stop.load(std::memory_order_relaxed)) return;
                _mm_pause();
            }
            seen = g;
            for (int t = n / 2; t < n; ++t) fn(t, 1);
            done.store(g, std::memory_order_release);
        }
    });
    auto job = [&] {
        const unsigned g = gen.load(std::memory_order_relaxed) + 1;
        gen.store(g, std::memory_order_release);
        for (int t = 0; t < n / 2; ++t) fn(t, 0);
        while (done.load(std::memory_order_acquire) != g) _mm_pause();
    };
    for (int i = 0; i < 1000; ++i) job();
    const auto t0 = Clock::now();
    for (int i = 0; i < JOBS; ++i) job();
    const auto t1 = Clock::now();
    stop = true;
    w.join();
    return us_per(t0, t1);
}

}  // namespace

int main(int argc, char** argv) {
    const int n = argc > 1 ? std::atoi(argv[1]) : 32;
    std::vector<int> works;
    for (int i = 2; i < argc; ++i) works.push_back(std::atoi(argv[i]));
    if (works.empty()) works = {0, 50, 200};
    std::vector<float> out(n);
    wqe::ThreadPool pool(2);
    for (const int w : works) {
        const std::function<void(int, int)> fn = [&](int t, int) {
            float a = (float)t;
            for (int i = 0; i < w; ++i) a = a * 1.0000001f + 1e-7f;
            out[t] = a;
        };
        for (int i = 0; i < 1000; ++i) pool.run(n, fn);
        auto t0 = Clock::now();
        for (int i = 0; i < JOBS; ++i) pool.run(n, fn);
        const double par = us_per(t0, Clock::now());
        t0 = Clock::now();
        for (int i = 0; i < JOBS; ++i)
            for (int t = 0; t < n; ++t) fn(t, 0);
        const double half = us_per(t0, Clock::now()) / 2;
        const double floor = handoff_floor(n, fn);
        std::printf("%d tasks x %d multiply-adds: ThreadPool(2) %.3f µs a job (%.3f over half the serial time), "
                    "static handoff %.3f µs (%.3f over)\n", n, w, par, par - half, floor, floor - half);
    }
}
