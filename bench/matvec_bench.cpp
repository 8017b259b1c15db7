// Decode matrix-vector throughput of the runtime's kernels on TinyLlama-1.1B-shaped linears (random codes,
// finite fp16 headers), without a model file: the seven linears of one layer (q/k/v grouped, o, gate/up
// grouped, down) for L layers, per "decode step", as Context::forward calls them. Reports ms per step,
// weight bytes per step, GB/s and process CPU ms per step (best of R each; on a shared machine the CPU time
// of a 1-thread run is the robust figure). Issue 12's kernel measurements.
//
//   g++ -O2 -std=c++17 -Icpp/src bench/matvec_bench.cpp cpp/build-perf/libwqedge.a -lpthread -o /tmp/matvec_bench
//   /tmp/matvec_bench -t 2 -a q8 -l 4 -r 20 q4 q3 q2 ternary q1 mix:q4,q3,q2,ternary
//   /tmp/matvec_bench -t 2 -triad          (DRAM bandwidth, same threads; give -t before -triad)
//   -p 0|1: the file's row layout or row tiles (default: as the model loader, repack_wanted())
//   -n N: prefill instead: matmul of N tokens through the same linears (ms per N-token step, tok/s and GMAC/s of the
//         linears alone); -a f32 is the float prefill (dequantize + float GEMM), -a q8 (default) the int8 tile GEMM
//   -d D,KV,F: hidden, k/v and feed-forward widths (default TinyLlama's 2048,256,5632); -r 0 builds and times nothing
//
// A kind list "mix:a,b,c" assigns kinds to chunks round-robin (a mixed plan's worst case for dispatch). "head": the dense
// F16 output head instead (V x D, -V vocabulary, default TinyLlama's 32000; float activations, as decode runs it);
// "head:q8" / "head:q4": the head as a quantized linear (wqedge convert --head), through the linear kernels.
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "blocks.h"
#include "linear.h"
#include "threadpool.h"
#include "bench_kinds.h"

using namespace wqe;

struct Owned {
    Linear L;
    std::vector<uint8_t> buf;
};

static Owned make_linear(int N, int K, const std::vector<int>& kinds, std::mt19937& rng) {
    const int G = 128, nc = (K + G - 1) / G;
    std::vector<int64_t> act(nc), prot(nc, 0);
    for (int c = 0; c < nc; ++c) act[c] = kinds[c % kinds.size()];
    Owned o;
    o.L = chunked_layout("w", N, K, G, act, prot);
    o.buf.resize((size_t)N * o.L.row_bytes + 64);
    for (size_t i = 0; i + 4 <= o.buf.size(); i += 4) {  // 4 random bytes per draw
        const uint32_t v = (uint32_t)rng();
        memcpy(&o.buf[i], &v, 4);
    }
    // finite fp16 headers (0x3000 ~ 0.125) so no NaN/Inf arithmetic skews timings
    for (int r = 0; r < N; ++r)
        for (const Chunk& ch : o.L.chunks) {
            uint8_t* h = o.buf.data() + (size_t)r * o.L.row_bytes + ch.off;
            for (int i = 0; i < ch.bt->header_bytes; i += 2) { h[i] = 0; h[i + 1] = 0x30; }
            if (ch.bt->id == 0)
                for (int i = 0; i < 2 * ch.g_pad; i += 2) { h[i] = 0; h[i + 1] = 0x30; }
            if (ch.bt->id == 5)  // ternary bytes must be < 243
                for (size_t i = 0; i < ch.bt->code_bytes(ch.g_pad); ++i) h[2 + i] %= 243;
        }
    o.L.data = o.buf.data();
    return o;
}

// STREAM triad a = b + s c over 3 x 64 MiB, split over `threads` threads: GB/s counted as 3 arrays moved
// (as wqedge.bench.measure.triad_bandwidth does), best of 5.
static double triad(int threads) {
    const size_t n = (64u << 20) / sizeof(double);
    std::vector<double> a(n, 0.0), b(n, 1.0), c(n, 2.0);
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
            ts.emplace_back([&, t] {
                const size_t i0 = n * t / threads, i1 = n * (t + 1) / threads;
                for (size_t i = i0; i < i1; ++i) a[i] = b[i] + 3.0 * c[i];
            });
        for (auto& t : ts) t.join();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return 3.0 * n * sizeof(double) / best / 1e9;
}

int main(int argc, char** argv) {
    int threads = 2, layers = 4, reps = 20;
    int act = ACT_Q8;
    int repack = -1;  // -1: as the model loader decides (repack_wanted), 0/1 forced by -p
    int n_tok = 1;    // > 1: prefill (matmul) of n_tok tokens
    int D = 2048, KV = 256, F = 5632, vocab = 32000;  // -d D,KV,F: other shapes (small ones for instruction counts under qemu)
    std::vector<std::string> specs;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-t") threads = atoi(argv[++i]);
        else if (a == "-l") layers = atoi(argv[++i]);
        else if (a == "-r") reps = atoi(argv[++i]);
        else if (a == "-p") repack = atoi(argv[++i]);
        else if (a == "-a") act = std::string(argv[++i]) == "f32" ? ACT_F32 : ACT_Q8;
        else if (a == "-n") n_tok = atoi(argv[++i]);
        else if (a == "-d") sscanf(argv[++i], "%d,%d,%d", &D, &KV, &F);
        else if (a == "-V") vocab = atoi(argv[++i]);
        else if (a == "-triad") { printf("triad %d threads: %.1f GB/s\n", threads, triad(threads)); return 0; }
        else specs.push_back(a);
    }

    ThreadPool pool(threads);
    const int kernels = best_kernels();
#ifdef WQE_HAVE_TILES
    if (repack < 0) repack = repack_wanted(kernels) ? 1 : 0;
#else
    repack = 0;
#endif
    std::mt19937 rng(1);
    std::vector<float> x((size_t)F * n_tok), y((size_t)std::max(F, vocab) * n_tok), y2(F), y3(F);
    for (auto& v : x) v = std::normal_distribution<float>()(rng);
    if (n_tok > 1)
        printf("%-28s %8s %10s %8s %10s  (prefill %d tokens, threads %d, act %s, %d layers, %s)\n", "kinds", "ms/step",
               "tok/s", "GMAC/s", "cpu ms", n_tok, threads, act == ACT_Q8 ? "q8" : "f32", layers, repack ? "row tiles" : "row layout");
    else
        printf("%-28s %8s %10s %8s %10s  (threads %d, act %s, %d layers, %s)\n", "kinds", "ms/step", "MB/step", "GB/s", "cpu ms", threads,
               act == ACT_Q8 ? "q8" : "f32", layers, repack ? "row tiles" : "row layout");
    for (const std::string& spec : specs) {
        if (spec == "head") {  // dense F16 V x D, random finite halves
            Owned h;
            h.L.kind = Linear::DENSE_F16;
            h.L.N = vocab;
            h.L.K = D;
            h.L.row_bytes = 2 * (size_t)D;
            h.buf.resize((size_t)vocab * h.L.row_bytes);
            for (size_t i = 0; i < h.buf.size(); i += 2) {
                const uint16_t v = (uint16_t)(0x2000 + rng() % 0x1000) | (uint16_t)(rng() & 1) << 15;
                memcpy(&h.buf[i], &v, 2);
            }
            h.L.data = h.buf.data();
            MatScratch s;
            s.reserve(threads, D, 128, 8, 1);
            std::vector<float> yh(vocab);
            double best = 1e30, best_cpu = 1e30;
            for (int r = 0; r < reps; ++r) {
                auto t0 = std::chrono::steady_clock::now();
                timespec c0, c1;
                clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
                matvec(h.L, x.data(), yh.data(), pool, s, kernels, act);
                const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
                best = std::min(best, dt);
                best_cpu = std::min(best_cpu, (c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec));
            }
            printf("%-28s %8.3f %10.2f %8.2f %10.3f\n", spec.c_str(), best * 1e3, h.buf.size() / 1e6, h.buf.size() / best / 1e9,
                   best_cpu * 1e3);
            fflush(stdout);
            continue;
        }
        // "head:KIND": the output head as a quantized linear (V x D, docs/format.md "Output head") instead of the layers
        const bool qhead = spec.rfind("head:", 0) == 0;
        const std::vector<int> kinds = parse_kinds(qhead ? spec.substr(5) : spec);
        std::vector<Owned> ws;
        if (qhead) ws.push_back(make_linear(vocab, D, kinds, rng));
        for (int l = 0; l < layers && !qhead; ++l) {
            ws.push_back(make_linear(D, D, kinds, rng));
            ws.push_back(make_linear(KV, D, kinds, rng));
            ws.push_back(make_linear(KV, D, kinds, rng));
            ws.push_back(make_linear(D, D, kinds, rng));
            ws.push_back(make_linear(F, D, kinds, rng));
            ws.push_back(make_linear(F, D, kinds, rng));
            ws.push_back(make_linear(D, F, kinds, rng));
        }
#ifdef WQE_HAVE_TILES
        if (repack)
            for (auto& w : ws) {
                repack_tiles(w.L);
                std::vector<uint8_t>().swap(w.buf);  // as the loader releases the mapped pages
                w.L.data = nullptr;
            }
#endif
        size_t bytes = 0;
        int maxc = 0, maxx = 0;
        for (auto& w : ws) {
            bytes += (size_t)w.L.N * w.L.row_bytes;  // the file's bytes (a repacked copy pads N to 8 rows)
            maxc = std::max(maxc, (int)w.L.chunks.size());
            maxx = std::max(maxx, w.L.x_floats);
        }
        MatScratch s;
        s.reserve(threads, F, 128, maxx, maxc);
        double best = 1e30, best_cpu = 1e30;
        for (int r = 0; r < reps; ++r) {
            auto t0 = std::chrono::steady_clock::now();
            timespec c0, c1;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
            if (n_tok > 1)  // prefill: every linear of every layer on n_tok tokens (as Context::forward's batch)
                for (auto& w : ws) matmul(w.L, x.data(), n_tok, y.data(), pool, s, kernels, act);
            if (qhead && n_tok == 1) matvec(ws[0].L, x.data(), y.data(), pool, s, kernels, act);
            for (int l = 0; l < layers && n_tok == 1 && !qhead; ++l) {
                const Linear* qkv[3] = {&ws[7 * l].L, &ws[7 * l + 1].L, &ws[7 * l + 2].L};
                float* yq[3] = {y.data(), y2.data(), y3.data()};
                matvec_group(3, qkv, x.data(), yq, pool, s, kernels, act);
                matvec(ws[7 * l + 3].L, x.data(), y.data(), pool, s, kernels, act);
                const Linear* gu[2] = {&ws[7 * l + 4].L, &ws[7 * l + 5].L};
                float* yg[2] = {y.data(), y2.data()};
                matvec_group(2, gu, x.data(), yg, pool, s, kernels, act);
                matvec(ws[7 * l + 6].L, x.data(), y.data(), pool, s, kernels, act);
            }
            const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
            best = std::min(best, dt);
            best_cpu = std::min(best_cpu, (c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec));
        }
        if (n_tok > 1) {
            double macs = 0;
            for (auto& w : ws) macs += (double)w.L.N * w.L.K * n_tok;
            printf("%-28s %8.3f %10.1f %8.2f %10.3f\n", spec.c_str(), best * 1e3, n_tok / best, macs / best / 1e9, best_cpu * 1e3);
        } else {
            printf("%-28s %8.3f %10.2f %8.2f %10.3f\n", spec.c_str(), best * 1e3, bytes / 1e6, bytes / best / 1e9,
                   best_cpu * 1e3);
        }
        fflush(stdout);
    }
    return 0;
}
