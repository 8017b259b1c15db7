// The x86-64 kernel sets' declarations (kernels_avx2.cpp, kernels_vnni.cpp with kernels_vnni_pairs.inc,
// kernels_avx512_att.cpp), in one place for blocks.cpp's dispatch tables and the kernel tests.
// Every function here is compiled for its instruction set alone (a per-function target); call one only where
// blocks.cpp's CPU checks say the CPU has it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "blocks.h"

namespace wqe {
// The pair kernels of kernels_vnni_pairs.inc, declared in each namespace that builds them.
#define WQE_TILE16_DECLS(K)                                                                                                   \
    void tile16_##K(const uint8_t*, std::ptrdiff_t, size_t, int, const XQ8*, const float*, int, float*, std::ptrdiff_t);
#define WQE_TILE16_ALL                                                                                                     \
    WQE_TILE16_DECLS(q8) WQE_TILE16_DECLS(q4) WQE_TILE16_DECLS(q3) WQE_TILE16_DECLS(q2) WQE_TILE16_DECLS(q1) WQE_TILE16_DECLS(q4s)              \
    WQE_TILE16_DECLS(q3s) WQE_TILE16_DECLS(q2s)                                                                            \
    void tile16_mix(const uint8_t*, std::ptrdiff_t, const TileDesc*, int, const XQ8*, const int*, const float*, float*,     \
                    std::ptrdiff_t);
namespace avx2 {
#include "kernel_set.inc"
#include "tile_set.inc"
namespace vnni512 {  // kernels_vnni.cpp: AVX512-VNNI + AVX512VL
void dot8_rows_q8(const uint8_t*, size_t, int, const XQ8*, float, int, float*);  // q8 row-blocks, bit-identical to AVX2's
#include "tile_set.inc"
WQE_TILE16_ALL
namespace gf {  // the same with GFNI (kernels_vnni_pairs.inc): bit-identical
WQE_TILE16_ALL
}  // namespace gf
}  // namespace vnni512
namespace vnni256 {  // kernels_vnni.cpp: AVX-VNNI
void dot8_rows_q8(const uint8_t*, size_t, int, const XQ8*, float, int, float*);  // q8 row-blocks, bit-identical to AVX2's
#include "tile_set.inc"
}  // namespace vnni256
void att_scores_kv(const float*, int, int, const uint8_t*, size_t, int, int, float, float*, size_t);  // quantized KV
void att_values_kv(const float*, size_t, int, int, const uint8_t*, size_t, int, int, float*);              // cache rows
namespace z512 {  // kernels_avx512_att.cpp: attention kernels on AVX-512, bit-identical to AVX2's
void att_scores_kv(const float*, int, int, const uint8_t*, size_t, int, int, float, float*, size_t);
void att_values_kv(const float*, size_t, int, int, const uint8_t*, size_t, int, int, float*);
void att_scores(const float*, int, int, const float*, size_t, int, float, float*, size_t);
void att_scores_h(const float*, int, int, const uint16_t*, size_t, int, float, float*, size_t);
void att_values(const float*, size_t, int, int, const float*, size_t, int, float*);
void att_values_h(const float*, size_t, int, int, const uint16_t*, size_t, int, float*);
}  // namespace z512
}  // namespace avx2
}  // namespace wqe
