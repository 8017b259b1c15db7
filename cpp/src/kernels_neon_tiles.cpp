// Row-tile int8 kernels for AArch64 (issue 12): BlockTraits::tile8[K_NEON], VecOps::tile8_mix of the NEON set and the
// integer prefill's tile GEMM (linear.cpp tile8_gemm_of). The code is kernels_neon_tiles.inc, built twice: with the
// dot-product extension (SDOT by element: 16 code bytes = 4 rows x 4 columns against one 4-byte activation group) and
// for plain ARMv8.0 NEON (vmull_s8 / vmlal_s8); each exported function picks one per call through neon_dotprod(), as
// the row-layout dot8 kernels of kernels_neon.cpp do. Both give exact int32 block sums and then the same float
// operations, so their results are identical to each other and within tests/test_kernels.cpp's tolerance of the
// scalar tile reference (blocks.cpp tile8_affine_scalar / tile8_ternary_scalar).
#if defined(__aarch64__)

#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>

#include "blocks.h"  // XQ8, TileDesc, neon_dotprod(): no inline function of it is called inside the builds

namespace wqe {
namespace neon {

// Both builds without GCC's pre-register-allocation scheduler: it interleaved the unrolled block pair and both halves
// until the code vectors spilled (plain q4: ~15 stack accesses per block). Without it, per 32-column block of 8 rows:
// plain q4 102 -> 84 executed instructions, ternary 269 -> 202, SDOT q1 51 -> 45 (the post-allocation scheduler still
// runs; counted under qemu, bench/results/neon_tiles.md: in-order cores such as Cortex-A53 are to be timed).
#if !defined(__clang__)
#  pragma GCC push_options
#  pragma GCC optimize("no-schedule-insns")
#endif
namespace tiles_plain {
namespace {
#define WQE_TILE_SDOT 0
#include "kernels_neon_tiles.inc"
#undef WQE_TILE_SDOT
}  // namespace
}  // namespace tiles_plain
#if !defined(__clang__)
#  pragma GCC pop_options
#endif

// The SDOT build: every function from here to pop_options is compiled for ARMv8.2 + dotprod (GCC 12 with binutils
// 2.40 wants the v8.2 base for SDOT, see kernels_neon.cpp), and only called after neon_dotprod() said yes.
#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("arch=armv8.2-a+dotprod")
#  pragma GCC optimize("no-schedule-insns")
#endif
namespace tiles_sdot {
namespace {
#define WQE_TILE_SDOT 1
#include "kernels_neon_tiles.inc"
#undef WQE_TILE_SDOT
}  // namespace
}  // namespace tiles_sdot
#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

#define WQE_TILE8(K)                                                                                                 \
    void tile8_##K(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { \
        (neon_dotprod() ? tiles_sdot::tile8_##K : tiles_plain::tile8_##K)(p, pb, n, x, s, g, acc, pf);               \
    }
WQE_TILE8(q8)
WQE_TILE8(q4)
WQE_TILE8(q3)
WQE_TILE8(q2)
WQE_TILE8(q1)
WQE_TILE8(ternary)
WQE_TILE8(q4s)
WQE_TILE8(q3s)
WQE_TILE8(q2s)
#undef WQE_TILE8

void tile8_mix(const uint8_t* t, const TileDesc* d, int n, const XQ8* x, const int* x8off, const float* s, float* acc,
               ptrdiff_t pf) {
    (neon_dotprod() ? tiles_sdot::tile8_mix : tiles_plain::tile8_mix)(t, d, n, x, x8off, s, acc, pf);
}

void tile8_gemm(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xs, const int* x8off,
                const float* xsum, size_t ss, int nt, float* acc) {
    (neon_dotprod() ? tiles_sdot::tile8_gemm : tiles_plain::tile8_gemm)(tile, d, n, xq, xs, x8off, xsum, ss, nt, acc);
}

}  // namespace neon
}  // namespace wqe

#endif
