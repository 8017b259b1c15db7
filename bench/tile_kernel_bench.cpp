// Compute throughput of the row-tile int8 kernels alone (issue 12): two tiles of 8 rows x K columns per kind, resident
// in L1/L2, run over and over through BlockTraits::tile8 (and VecOps::tile8_mix for a mix), so memory never limits:
// ns and cycles (rdtsc: the TSC rate, not the core clock) per 32-column block of 8 rows (ternary too: its chunks
// hold G columns as the others do), and GB/s of codes + headers.
// A kernel that streams from DRAM at B GB/s is compute-bound when its figure here is not well above B.
//
//   g++ -O2 -std=c++17 -Icpp/src bench/tile_kernel_bench.cpp cpp/build/libwqedge.a -lpthread -o /tmp/tile_kernel_bench
//   /tmp/tile_kernel_bench [-k 2048] [-r 20000] [-g 128|256] [-v 0|1|2|-1] q4 q3 q2 ternary q1 mix:q3,q2 mix:q4,ternary
//   -g: chunk width G (columns); -v: VNNI level (0 none = AVX2 vpmaddubsw, -1 the CPU's); -s: the scalar kernels;
//   -2: two tiles per call through the pair kernels (tile16_kernel, AVX-512: 16 rows per register) instead of tile8 on
//   each (the figures are per 8-row block either way, so the two modes compare directly)
#include <x86intrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "blocks.h"
#include "bench_kinds.h"

using namespace wqe;

int main(int argc, char** argv) {
    int K = 2048, reps = 20000, vnni = -1, kernels = K_AVX2, G = 128;
    bool pair = false;
    std::vector<std::string> specs;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-k") K = atoi(argv[++i]);
        else if (a == "-r") reps = atoi(argv[++i]);
        else if (a == "-g") G = atoi(argv[++i]);
        else if (a == "-v") vnni = atoi(argv[++i]);
        else if (a == "-s") kernels = K_SCALAR;
        else if (a == "-2") pair = true;
        else specs.push_back(a);
    }
    if (!set_x86_vnni(vnni)) fprintf(stderr, "VNNI level %d not available; using %d\n", vnni, x86_vnni());
    printf("%-20s %10s %10s %10s  (K %d, G %d, %s of 8 rows, vnni %d, %s; per 32 columns x 8 rows)\n", "kinds", "ns/block", "tsc/block",
           "GB/s", K, G, "two tiles", x86_vnni(), kernels == K_SCALAR ? "scalar" : pair ? "tile16 pairs" : "tile8");
    std::mt19937 rng(1);
    const int nch = K / G, nb = G / 32;
    for (const std::string& spec : specs) {
        const std::vector<int> kinds = parse_kinds(spec);
        std::vector<TileDesc> d;
        std::vector<int> x8off(nch);
        size_t off = 0;
        int n8 = 0;
        for (int c = 0; c < nch; ++c) {
            const BlockTraits& bt = *block_traits(kinds[c % kinds.size()]);
            d.push_back({off, c, bt.id, nb, 0});
            off += TILE_ROWS * tile_row_bytes(bt, G, 0);  // ternary: its own 1.6-bit codes (4-byte groups per row)
            x8off[c] = n8;
            n8 += x8_blocks(bt, G);  // ternary: 5 planes of 32-slot blocks
        }
        std::vector<uint8_t> tile(2 * off + 64);  // two tiles: the pair kernels (-2) take both
        for (auto& b : tile) b = (uint8_t)rng();
        for (const TileDesc& t : d)
            for (int i = 0; i < 4 * block_traits(t.kind)->header_bytes; ++i)  // finite header fields (d, m; a)
                for (size_t o : {t.off, off + t.off}) {
                    tile[o + 2 * i] = 0;
                    tile[o + 2 * i + 1] = 0x30;
                }
        std::vector<XQ8> xq(n8);
        std::vector<float> xsum(nch, 0.5f);
        for (auto& x : xq) {
            x.d = 0.01f;
            x.ds = 0.0f;
            for (auto& q : x.q) q = (int8_t)((int)(rng() % 255) - 127);
        }
        float acc[2 * TILE_ROWS] = {0};
        const bool uniform = kinds.size() == 1;
        const BlockTraits& bt0 = *block_traits(kinds[0]);
        const size_t pb = d.size() > 1 ? d[1].off : 0;
        const tile16_fn t16 = pair ? tile16_kernel(bt0.id, kernels) : nullptr;
        const tile16_mix_fn t16m = pair ? tile16_mix_kernel(kernels) : nullptr;
        if (pair && !(uniform ? t16 != nullptr : t16m != nullptr)) {
            fprintf(stderr, "%s: no pair kernel on this CPU\n", spec.c_str());
            continue;
        }
        auto one = [&](const uint8_t* t, float* a) {
            if (uniform) bt0.tile8[kernels](t, pb, nch, xq.data(), xsum.data(), G, a, 0);
            else vec_ops(kernels).tile8_mix(t, d.data(), nch, xq.data(), x8off.data(), xsum.data(), a, 0);
        };
        auto once = [&] {  // two tiles: the pair kernel, or tile8 on each
            if (!pair) {
                one(tile.data(), acc);
                one(tile.data() + off, acc + TILE_ROWS);
            } else if (uniform) {
                t16(tile.data(), (std::ptrdiff_t)off, pb, nch, xq.data(), xsum.data(), G, acc, 0);
            } else {
                t16m(tile.data(), (std::ptrdiff_t)off, d.data(), nch, xq.data(), x8off.data(), xsum.data(), acc, 0);
            }
        };
        for (int r = 0; r < 100; ++r) once();
        double best = 1e30, best_tsc = 1e30;
        for (int round = 0; round < 5; ++round) {
            const int n = kernels == K_SCALAR ? reps / 50 : reps;
            auto t0 = std::chrono::steady_clock::now();
            const unsigned long long c0 = __rdtsc();
            for (int r = 0; r < n; ++r) once();
            const unsigned long long c1 = __rdtsc();
            const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            best = std::min(best, dt / n);
            best_tsc = std::min(best_tsc, (double)(c1 - c0) / n);
        }
        const double blocks = 2.0 * nch * nb;
        printf("%-20s %10.3f %10.2f %10.2f   (acc %g %g)\n", spec.c_str(), best / blocks * 1e9, best_tsc / blocks, 2 * off / best / 1e9,
               acc[0], acc[TILE_ROWS]);
    }
    return 0;
}
