// Instructions per dot product, counted under qemu-user (docs/neon.md, cpp/scripts/neon_insn_count.sh).
//   insn_count KERNELS TYPE ITERS [G]   KERNELS: 1 scalar, 2 avx2, 3 neon; TYPE: block id 0..6
// Makes one random row-block of width G (default 128), prepares x, calls the dot kernel once
// (warm-up: tables, page faults), then ITERS more times. The counter script runs it with ITERS = 0
// and ITERS = N and divides the difference of executed instructions by N; `dot_rows` (RT = 16 rows,
// as the matrix-vector product calls it) is measured with TYPE + 10, the int8-activation kernels with
// TYPE + 20 (dot8) and TYPE + 30 (dot8_rows, 16 rows), the row-tile kernels with TYPE + 40 (BlockTraits::tile8 on
// two tiles of one chunk each, 16 rows, as the tiled matrix-vector product calls it; tile kinds 2-6, random code bytes);
// NEON's SDOT or plain build follows the CPU (qemu -cpu max / cortex-a53).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "blocks.h"
#include "common.h"

using namespace wqe;

int main(int argc, char** argv) {
    if (argc < 4) { std::fprintf(stderr, "usage: insn_count KERNELS TYPE ITERS [G]\n"); return 2; }
    const int k = std::atoi(argv[1]), type = std::atoi(argv[2]), iters = std::atoi(argv[3]);
    const int g = argc > 4 ? std::atoi(argv[4]) : 128;
    const bool q8 = type >= 20, tiles = type >= 40;
    const bool rows = type % 20 >= 10;
    const BlockTraits& bt = *block_traits(type % 10);
    if (q8 && !bt.dot8[k]) { std::fprintf(stderr, "no int8 kernel for %s\n", bt.name); return 2; }
    if (tiles && !bt.tile8[k]) { std::fprintf(stderr, "no tile kernel for %s\n", bt.name); return 2; }
    const int g_pad = padded(g);
    const size_t rb_n = row_bytes(bt, g, 0);
    const int R = rows ? 16 : 1;
    std::vector<uint8_t> rb(rb_n * R);
    uint32_t s = 12345;
    for (auto& b : rb) { s = s * 1664525u + 1013904223u; b = (uint8_t)(s >> 24); }
    for (int r = 0; r < R; ++r) {  // sane fp16 parameters / values
        uint8_t* p = &rb[r * rb_n];
        const int nh = bt.id == 0 ? g_pad : bt.header_bytes / 2;
        for (int i = 0; i < nh; ++i) { uint16_t h = fp32_to_fp16(0.01f * (i % 7 + 1)); std::memcpy(p + 2 * i, &h, 2); }
    }
    std::vector<float> x(g), xc(x_floats(bt, g_pad) + 8);
    for (int i = 0; i < g; ++i) x[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
    std::vector<XQ8> xq(x8_blocks(bt, g_pad));
    const float xsum = q8 ? prepare_x8(bt, x.data(), g, xq.data()) : prepare_x(bt, x.data(), g, xc.data());
    volatile float sink = 0;
    float out[16] = {0};
    // two tiles of one chunk (parts of 8 rows), random bytes: the kernels have no data-dependent branches
    const size_t part = tiles ? TILE_ROWS * tile_row_bytes(bt, g, 0) : 0;
    std::vector<uint8_t> tb(2 * part + 64);
    for (auto& b : tb) { s = s * 1664525u + 1013904223u; b = (uint8_t)(s >> 24); }
    for (int it = 0; it <= iters; ++it) {
        if (tiles) {
            for (int t = 0; t < 2; ++t) bt.tile8[k](tb.data() + t * part, part, 1, xq.data(), &xsum, g_pad, out + 8 * t, 0);
            sink = sink + out[0];
        } else if (q8 && rows) {
            bt.dot8_rows[k](rb.data(), rb_n, R, xq.data(), xsum, g_pad, out);
            sink = sink + out[0];
        } else if (q8) {
            sink = sink + bt.dot8[k](rb.data(), xq.data(), xsum, g_pad);
        } else if (rows) {
            bt.dot_rows[k](rb.data(), rb_n, R, xc.data(), xsum, g_pad, out);
            sink = sink + out[0];
        } else {
            sink = sink + bt.dot[k](rb.data(), xc.data(), xsum, g_pad);
        }
    }
    std::printf("%g\n", (double)sink);
    return 0;
}
