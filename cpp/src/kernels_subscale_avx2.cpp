// AVX2 + FMA + F16C kernels of the two-level kinds q4s, q3s, q2s (blocks.h, sub_bytes; docs/format.md), apart from
// kernels_avx2.cpp so that the one-scale kernels and these evolve separately. Compiled for that target by the
// pragma below, like kernels_avx2.cpp (same rules: no inline function of a shared header is instantiated here),
// and called only after cpu_has_avx2(). Per 32-column sub-block the codes are widened to 32 bytes in column order:
// the float dot multiplies them with x, the int8 dot feeds them to maddubs with the XQ8 block of the same columns.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // XQ8 only: no inline function of it is called here

#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c")
#endif

namespace wqe {
namespace avx2 {
namespace {

float half_at(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

uint64_t u64_at(const uint8_t* p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

// 32 codes of one sub-block, byte c = code of column c.
typedef __m256i Codes;
void codes32_q4(const uint8_t* q, Codes* c) {  // byte j: column j low nibble, column j + 16 high nibble
    const __m128i v = _mm_loadu_si128((const __m128i*)q), m = _mm_set1_epi8(0x0F);
    *c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
void codes32_q2(const uint8_t* q, Codes* c) {  // byte j bits 2k..2k+1: column 8k + j
    const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)u64_at(q)), _mm256_setr_epi64x(0, 2, 4, 6));
    *c = _mm256_and_si256(v, _mm256_set1_epi8(0x03));
}
void codes32_q3(const uint8_t* q, Codes* c) {  // q2 of the low bits, then bit c of a u32: the third bit of column c
    uint32_t bits;
    memcpy(&bits, q + 8, 4);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i hi = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit), _mm256_set1_epi8(4));
    codes32_q2(q, c);
    *c = _mm256_or_si256(*c, hi);
}

// Columns 8k..8k+7 of a 32-byte code vector as floats.
__m256 cols_ps(__m256i c, int k) {
    const __m128i h = k < 2 ? _mm256_castsi256_si128(c) : _mm256_extracti128_si256(c, 1);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(k % 2 ? _mm_srli_si128(h, 8) : h));
}

#include "kernels_subscale.inc"

template <void (*CODES)(const uint8_t*, Codes*), int SUB_BYTES>
float dot_sub(const uint8_t* rb, const float* xc, float, int g_pad) {
    __m256 acc = _mm256_setzero_ps();
    each_sub<CODES, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, Codes c) {
        const float* x = xc + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8), x2 = _mm256_loadu_ps(x + 16),
                     x3 = _mm256_loadu_ps(x + 24);
        __m256 sq = _mm256_mul_ps(cols_ps(c, 0), x0);
        sq = _mm256_fmadd_ps(cols_ps(c, 1), x1, sq);
        sq = _mm256_fmadd_ps(cols_ps(c, 2), x2, sq);
        sq = _mm256_fmadd_ps(cols_ps(c, 3), x3, sq);
        const __m256 sx = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(D), sq, acc);
        acc = _mm256_fnmadd_ps(_mm256_set1_ps(M), sx, acc);
    });
    return hsum8(acc);
}

template <void (*CODES)(const uint8_t*, Codes*), int SUB_BYTES>
void dequant_sub(const uint8_t* rb, int g_pad, float* out) {
    each_sub<CODES, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, Codes c) {
        const __m256 vd = _mm256_set1_ps(D), vm = _mm256_set1_ps(M);
        for (int k = 0; k < 4; ++k)  // D q exact: mul then sub rounds once, as the scalar reference
            _mm256_storeu_ps(out + 32 * b + 8 * k, _mm256_sub_ps(_mm256_mul_ps(vd, cols_ps(c, k)), vm));
    });
}

template <void (*CODES)(const uint8_t*, Codes*), int SUB_BYTES>
float dot8_sub(const uint8_t* rb, const XQ8* xq, float, int g_pad) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    each_sub<CODES, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, Codes c) {
        const __m256i p = _mm256_maddubs_epi16(c, _mm256_loadu_si256((const __m256i*)xq[b].q));  // |.| <= 2*15*127
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d * D), _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc);
        mins += M * xq[b].ds;
    });
    return hsum8(acc) - mins;
}

}  // namespace

WQE_SUB_KERNELS(q4s, codes32_q4, 16)
WQE_SUB_KERNELS(q3s, codes32_q3, 12)
WQE_SUB_KERNELS(q2s, codes32_q2, 8)

}  // namespace avx2
}  // namespace wqe

#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

#endif  // x86
