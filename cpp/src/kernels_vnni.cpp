// Row-tile int8 kernels (blocks.h, TILE_ROWS) with VNNI dot products: `vpdpbusd` adds four u8 x s8 products into
// an int32 lane in one instruction, where AVX2 needs `vpmaddubsw` + `vpaddw` (+ one `vpmaddwd` per block). The sums
// are exact either way, so the results are bit-identical to wqe::avx2::tile8_* (tests/test_kernels.cpp checks).
// Two builds of the same code: AVX512-VNNI with AVX512VL (wqe::avx2::vnni512; the EVEX form on 256-bit registers: Ice Lake and later
// Xeons, AMD Zen 4) and AVX-VNNI (wqe::avx2::vnni256; the VEX form: Alder Lake and later client CPUs, Zen 5). As kernels_avx2.cpp,
// the target is given per function (GCC pragma / clang attribute), never for the file; blocks.cpp calls these
// only after CPUID (and XGETBV) said yes.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // XQ8 only: no inline function of it is called here

#include "kernels_vnni_tiles.inc"  // WQE_TILE_KERNELS(NS, DPBUSD, NT_MAX)

// The target of the functions up to the next WQE_TARGET_POP (GCC push_options + target / clang attribute push).
#define WQE_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#  define WQE_TARGET_PUSH(T) WQE_PRAGMA(clang attribute push(__attribute__((target(T))), apply_to = function))
#  define WQE_TARGET_POP() WQE_PRAGMA(clang attribute pop)
#else
#  define WQE_TARGET_PUSH(T) WQE_PRAGMA(GCC push_options) WQE_PRAGMA(GCC target(T))
#  define WQE_TARGET_POP() WQE_PRAGMA(GCC pop_options)
#endif

// AVX512-VNNI + AVX512VL (EVEX vpdpbusd on ymm registers)
WQE_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
WQE_TILE_KERNELS(vnni512, _mm256_dpbusd_epi32, 8)
WQE_TARGET_POP()

// Two adjacent row tiles in one call, 16 rows in the lanes of 512-bit registers (tile A's 8 rows in the low half,
// tile B = A + ts bytes in the high half): the same integer sums (exact) and the same float operations per lane as
// tile8_* on each tile, so the results are bit-identical (cpp/tests/test_kernels.cpp checks), with half the
// instructions per row: one broadcast of 4 activation bytes and one vpdpbusd serve 16 rows. Measured on Zen 4, whose
// 256-bit units run 512-bit operations in two halves, the tile kernels are bound by vector instructions issued
// (bench/results/tile16.md), so the pair is faster there as well as on Intel's 512-bit units. AVX512BW for the
// byte/word operations on zmm.
WQE_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq")
namespace wqe {
namespace avx2 {
namespace vnni512 {
#define WQE_PAIR_GFNI 0
#include "kernels_vnni_pairs.inc"
#undef WQE_PAIR_GFNI
}  // namespace vnni512
}  // namespace avx2
}  // namespace wqe
WQE_TARGET_POP()

// The same pair kernels with GFNI (Zen 4, Ice Lake and later; not Cascade Lake, which has AVX512-VNNI without it):
// blocks.cpp picks them where CPUID says GFNI, unless WQEDGE_GFNI=0 (bench/results/tile16.md, "GFNI").
WQE_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq,gfni")
namespace wqe {
namespace avx2 {
namespace vnni512 {
namespace gf {
#define WQE_PAIR_GFNI 1
#include "kernels_vnni_pairs.inc"
#undef WQE_PAIR_GFNI
}  // namespace gf
}  // namespace vnni512
}  // namespace avx2
}  // namespace wqe
WQE_TARGET_POP()

// AVX-VNNI (VEX vpdpbusd)
WQE_TARGET_PUSH("avx2,fma,f16c,avxvnni")
WQE_TILE_KERNELS(vnni256, _mm256_dpbusd_avx_epi32, 4)
WQE_TARGET_POP()

#endif
