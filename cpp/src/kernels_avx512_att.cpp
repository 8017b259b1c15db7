// AVX-512 attention value kernels (VecOps::att_values and its fp16-row form) for the AVX2 column on CPUs with AVX-512
// (F, VL, DQ, BW): at long context attention is most of a decode (bench/results/decode_depth.md). 16 columns a
// register instead of AVX2's 8, every column's FMA chain over the positions in the same order, so every output has
// the bits of the AVX2 kernel's (cpp/tests/test_kernels.cpp checks), whichever of the two a CPU runs. The scores stay
// AVX2's: their 512-bit form (two keys a register, hsum4x8 on both halves; bit-identical) measured slower on a Xeon,
// bound by the fp16 conversions and the row inserts, not the FMAs. As kernels_avx2.cpp, the target is given per
// function (GCC pragma / clang attribute), never for the file; blocks.cpp calls these only after CPUID and XGETBV said
// yes (cpu_has_avx512), and WQEDGE_AVX512_ATTENTION=0 (set_avx512_attention(false)) keeps the AVX2 ones.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // ATT_PREFETCH_ROWS only: no inline function of it is called here

#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512dq,avx512bw"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512dq,avx512bw")
#endif

namespace wqe {
namespace avx2 {
// kernels_avx2.cpp's value kernels, for the columns past the last multiple of 64 (each column's arithmetic does not
// depend on the others, so a column range of them gives the bits of the whole row's)
void att_values(const float* P, size_t ldp, int nq, int hd, const float* V, size_t vs, int n, float* O);
void att_values_h(const float* P, size_t ldp, int nq, int hd, const uint16_t* V, size_t vs, int n, float* O);
namespace z512 {
namespace {

inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// NH heads' outputs over columns [d, d + 64) in registers while every position's row streams past: one FMA per
// element and position, in order of position (kernels_avx2.cpp's values_heads, 16 columns a register).
template <int NH, typename T>
void values_heads(const float* const* p, const T* V, size_t vs, int n, float* const* o, int d) {
    __m512 acc[NH][4];
    for (int h = 0; h < NH; ++h)
        for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_loadu_ps(o[h] + d + 16 * c);
    for (int s = 0; s < n; ++s) {
        const T* v = V + (size_t)s * vs + d;
        if (s + ATT_PREFETCH_ROWS < n)
            for (int c = 0; c < 64; c += 64 / (int)sizeof(T)) _mm_prefetch((const char*)(v + ATT_PREFETCH_ROWS * vs + c), _MM_HINT_T0);
        const __m512 v0 = ld16(v), v1 = ld16(v + 16), v2 = ld16(v + 32), v3 = ld16(v + 48);
        for (int h = 0; h < NH; ++h) {
            const __m512 ph = _mm512_set1_ps(p[h][s]);
            acc[h][0] = _mm512_fmadd_ps(ph, v0, acc[h][0]);
            acc[h][1] = _mm512_fmadd_ps(ph, v1, acc[h][1]);
            acc[h][2] = _mm512_fmadd_ps(ph, v2, acc[h][2]);
            acc[h][3] = _mm512_fmadd_ps(ph, v3, acc[h][3]);
        }
    }
    for (int h = 0; h < NH; ++h)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o[h] + d + 16 * c, acc[h][c]);
}

template <typename T>
void values(const float* P, size_t ldp, int nq, int hd, const T* V, size_t vs, int n, float* O,
            void (*avx2_values)(const float*, size_t, int, int, const T*, size_t, int, float*)) {  // nq 1 or 2
    const float* p[2] = {P, P + ldp};
    float* o[2] = {O, O + hd};
    int d = 0;
    for (; d + 64 <= hd; d += 64) {
        if (nq == 2) values_heads<2>(p, V, vs, n, o, d);
        else values_heads<1>(p, V, vs, n, o, d);
    }
    if (d < hd)  // the last hd % 64 columns, head by head (the AVX2 kernel's heads are independent too)
        for (int j = 0; j < nq; ++j) avx2_values(p[j], ldp, 1, hd - d, V + d, vs, n, o[j] + d);
}

}  // namespace

void att_values(const float* P, size_t ldp, int nq, int hd, const float* V, size_t vs, int n, float* O) {
    values(P, ldp, nq, hd, V, vs, n, O, avx2::att_values);
}
void att_values_h(const float* P, size_t ldp, int nq, int hd, const uint16_t* V, size_t vs, int n, float* O) {
    values(P, ldp, nq, hd, V, vs, n, O, avx2::att_values_h);
}

}  // namespace z512
}  // namespace avx2
}  // namespace wqe

#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

#endif
