// RUQuant input transforms and per-token activation quantization (rotation.h). The block product has a
// scalar reference and AVX2/NEON paths (tests: cpp/tests/test_rotation.cpp, tests/test_ruquant_runtime.py).
#include "rotation.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "blocks.h"
#include "common.h"
#include "gguf.h"
#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define WQE_ROT_AVX2 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define WQE_ROT_NEON 1
#endif

namespace wqe {

// ------------------------------------------------------------------ block product: reference and SIMD
static void block_matvec_scalar(const float* R, int n, const float* x, float* y) {
    for (int i = 0; i < n; ++i) {
        const float* r = R + (size_t)i * n;
        float s = 0.0f;
        for (int j = 0; j < n; ++j) s += r[j] * x[j];
        y[i] = s;
    }
}

#ifdef WQE_ROT_AVX2
namespace avx2 {  // only functions in wqe::avx2 may hold AVX instructions (tests/test_cpp_clang.py)
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Four rows at a time share each load of x; n % 8 columns are finished in scalar.
__attribute__((target("avx2,fma"))) static void block_matvec_avx2(const float* R, int n, const float* x, float* y) {
    const int n8 = n & ~7;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float* r0 = R + (size_t)i * n;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n8; j += 8) {
            const __m256 xv = _mm256_loadu_ps(x + j);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + j), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + n + j), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + 2 * n + j), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + 3 * n + j), xv, a3);
        }
        float s[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
        for (int k = 0; k < 4; ++k)
            for (int j = n8; j < n; ++j) s[k] += r0[(size_t)k * n + j] * x[j];
        std::memcpy(y + i, s, sizeof s);
    }
    for (; i < n; ++i) {
        const float* r = R + (size_t)i * n;
        __m256 a = _mm256_setzero_ps();
        for (int j = 0; j < n8; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(r + j), _mm256_loadu_ps(x + j), a);
        float s = hsum256(a);
        for (int j = n8; j < n; ++j) s += r[j] * x[j];
        y[i] = s;
    }
}
}  // namespace avx2
#endif

static void block_matmul_p_scalar(const float* P, int n, const float* X, int nx, float* Y, int i0, int i1) {
    for (int b = 0; b < nx; ++b)
        for (int i = i0; i < i1; ++i) {
            const float* p = P + (size_t)(i / 16) * n * 16 + i % 16;
            float s = 0.0f;
            for (int j = 0; j < n; ++j) s += p[(size_t)j * 16] * X[(size_t)b * n + j];
            Y[(size_t)b * n + i] = s;
        }
}

#ifdef WQE_ROT_AVX2
namespace avx2 {
// One column of a strip's 16 rows as two float vectors: float32 matrices (format 2) load them, int8 codes (format 3)
// are sign-extended and converted.
__attribute__((target("avx2,fma"))) static inline void strip_column(const float* p, __m256& r0, __m256& r1) {
    r0 = _mm256_loadu_ps(p);
    r1 = _mm256_loadu_ps(p + 8);
}
__attribute__((target("avx2,fma"))) static inline void strip_column(const int8_t* p, __m256& r0, __m256& r1) {
    r0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    r1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
}

// NB blocks x one strip of 16 rows (p: the strip, 16 values per column): 2 NB accumulators, per column one strip_column
// and NB broadcasts of x_j; then the rows' scales s when given (int8 codes). (Named accumulators: GCC kept an
// accumulator array in memory, storing all 2 NB every column.)
template <int NB, typename T>
__attribute__((target("avx2,fma"))) static inline void matmul_16(const T* p, const float* s, int n, const float* X, float* Y) {
    const __m256 z = _mm256_setzero_ps();
    __m256 a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z;
    const float *x0 = X, *x1 = X + (NB > 1 ? n : 0), *x2 = X + (NB > 2 ? 2 * n : 0), *x3 = X + (NB > 3 ? 3 * n : 0);
    for (int j = 0; j < n; ++j, p += 16) {
        __m256 r0, r1;
        strip_column(p, r0, r1);
        __m256 xv = _mm256_broadcast_ss(x0 + j);
        a0 = _mm256_fmadd_ps(r0, xv, a0);
        b0 = _mm256_fmadd_ps(r1, xv, b0);
        if (NB > 1) {
            xv = _mm256_broadcast_ss(x1 + j);
            a1 = _mm256_fmadd_ps(r0, xv, a1);
            b1 = _mm256_fmadd_ps(r1, xv, b1);
        }
        if (NB > 2) {
            xv = _mm256_broadcast_ss(x2 + j);
            a2 = _mm256_fmadd_ps(r0, xv, a2);
            b2 = _mm256_fmadd_ps(r1, xv, b2);
        }
        if (NB > 3) {
            xv = _mm256_broadcast_ss(x3 + j);
            a3 = _mm256_fmadd_ps(r0, xv, a3);
            b3 = _mm256_fmadd_ps(r1, xv, b3);
        }
    }
    __m256 acc[4][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}};
    if (s) {
        const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
        for (int k = 0; k < NB; ++k) {
            acc[k][0] = _mm256_mul_ps(acc[k][0], s0);
            acc[k][1] = _mm256_mul_ps(acc[k][1], s1);
        }
    }
    for (int k = 0; k < NB; ++k) {
        _mm256_storeu_ps(Y + (size_t)k * n, acc[k][0]);
        _mm256_storeu_ps(Y + (size_t)k * n + 8, acc[k][1]);
    }
}

// Rows [i0, i1) of nx blocks from a packed matrix (pack_rows16 of float32 or int8): one strip of 16 rows and up to
// G blocks per call of strip(nb, strip's values, its rows' scales or null, n, the blocks' x, their y).
template <int G, typename T>
static void for_strips(void (*strip)(int, const T*, const float*, int, const float*, float*), const T* P, const float* s,
                       int n, const float* X, int nx, float* Y, int i0, int i1) {
    for (int i = i0; i < i1; i += 16)
        for (int b = 0; b < nx; b += G)
            strip(std::min(G, nx - b), P + (size_t)(i / 16) * n * 16, s ? s + i : nullptr, n, X + (size_t)b * n,
                  Y + (size_t)b * n + i);
}

template <typename T>
__attribute__((target("avx2,fma"))) static void strip_avx2(int nb, const T* p, const float* s, int n, const float* x, float* y) {
    switch (nb) {
        case 4: matmul_16<4>(p, s, n, x, y); break;
        case 3: matmul_16<3>(p, s, n, x, y); break;
        case 2: matmul_16<2>(p, s, n, x, y); break;
        default: matmul_16<1>(p, s, n, x, y); break;
    }
}

// The same product with AVX-512 (x86_vnni() == 1: AVX512-VNNI + VL, hence AVX512F): a strip's 16 rows are one zmm
// register, so each column is one conversion and one FMA per block (AVX2: two of each), and up to 8 blocks share a
// column. Every lane runs the AVX2 kernel's operations in the same order (fused multiply-add per column, then the row
// scale), so the results are bit-identical to it (cpp/tests/test_rotation.cpp). On llama-s (issue 15, 1 thread) the
// rotated decode went from 0.92 to 0.88 ms CPU per token (the unrotated file: 0.73).
__attribute__((target("avx512f,avx512vl,fma"))) static inline __m512 strip_column16(const float* p) {
    return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f,avx512vl,fma"))) static inline __m512 strip_column16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
template <int NB, typename T>
__attribute__((target("avx512f,avx512vl,fma"))) static inline void matmul_16_512(const T* p, const float* s, int n, const float* X,
                                                                                 float* Y) {
    __m512 a[NB];
    for (int k = 0; k < NB; ++k) a[k] = _mm512_setzero_ps();
    for (int j = 0; j < n; ++j, p += 16) {
        const __m512 r = strip_column16(p);
        for (int k = 0; k < NB; ++k) a[k] = _mm512_fmadd_ps(r, _mm512_set1_ps(X[(size_t)k * n + j]), a[k]);
    }
    if (s) {
        const __m512 sv = _mm512_loadu_ps(s);
        for (int k = 0; k < NB; ++k) a[k] = _mm512_mul_ps(a[k], sv);
    }
    for (int k = 0; k < NB; ++k) _mm512_storeu_ps(Y + (size_t)k * n, a[k]);
}
template <typename T>
__attribute__((target("avx512f,avx512vl,fma"))) static void strip_512(int nb, const T* p, const float* s, int n, const float* x,
                                                                      float* y) {
    switch (nb) {
        case 8: matmul_16_512<8>(p, s, n, x, y); break;
        case 7: matmul_16_512<7>(p, s, n, x, y); break;
        case 6: matmul_16_512<6>(p, s, n, x, y); break;
        case 5: matmul_16_512<5>(p, s, n, x, y); break;
        case 4: matmul_16_512<4>(p, s, n, x, y); break;
        case 3: matmul_16_512<3>(p, s, n, x, y); break;
        case 2: matmul_16_512<2>(p, s, n, x, y); break;
        default: matmul_16_512<1>(p, s, n, x, y); break;
    }
}
// The AVX2 set's packed product: AVX-512 where the AVX2 set runs its AVX-512 VNNI kernels (x86_vnni() == 1, so
// WQEDGE_NO_VNNI=1 / set_x86_vnni(0) selects the AVX2 code for tests and A/B runs), else AVX2.
template <typename T>
static void matmul_packed(const T* P, const float* s, int n, const float* X, int nx, float* Y, int i0, int i1) {
    if (x86_vnni() == 1) for_strips<8, T>(strip_512<T>, P, s, n, X, nx, Y, i0, i1);
    else for_strips<4, T>(strip_avx2<T>, P, s, n, X, nx, Y, i0, i1);
}

__attribute__((target("avx2,fma"))) static void block_matmul_p_avx2(const float* P, int n, const float* X, int nx, float* Y, int i0,
                                                                    int i1) {
    matmul_packed(P, nullptr, n, X, nx, Y, i0, i1);
}
}  // namespace avx2
#endif

#ifdef WQE_ROT_NEON
static void block_matvec_neon(const float* R, int n, const float* x, float* y) {
    const int n4 = n & ~3;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float* r0 = R + (size_t)i * n;
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n4; j += 4) {
            const float32x4_t xv = vld1q_f32(x + j);
            a0 = vfmaq_f32(a0, vld1q_f32(r0 + j), xv);
            a1 = vfmaq_f32(a1, vld1q_f32(r0 + n + j), xv);
            a2 = vfmaq_f32(a2, vld1q_f32(r0 + 2 * n + j), xv);
            a3 = vfmaq_f32(a3, vld1q_f32(r0 + 3 * n + j), xv);
        }
        float s[4] = {vaddvq_f32(a0), vaddvq_f32(a1), vaddvq_f32(a2), vaddvq_f32(a3)};
        for (int k = 0; k < 4; ++k)
            for (int j = n4; j < n; ++j) s[k] += r0[(size_t)k * n + j] * x[j];
        std::memcpy(y + i, s, sizeof s);
    }
    for (; i < n; ++i) {
        const float* r = R + (size_t)i * n;
        float32x4_t a = vdupq_n_f32(0.0f);
        for (int j = 0; j < n4; j += 4) a = vfmaq_f32(a, vld1q_f32(r + j), vld1q_f32(x + j));
        float s = vaddvq_f32(a);
        for (int j = n4; j < n; ++j) s += r[j] * x[j];
        y[i] = s;
    }
}
#endif

void block_matvec(const float* R, int n, const float* x, float* y, int kernels) {
#ifdef WQE_ROT_AVX2
    if (kernels == K_AVX2) return avx2::block_matvec_avx2(R, n, x, y);
#endif
#ifdef WQE_ROT_NEON
    if (kernels == K_NEON) return block_matvec_neon(R, n, x, y);
#endif
    (void)kernels;
    block_matvec_scalar(R, n, x, y);
}

void block_matmul_p(const float* P, int n, const float* X, int nx, float* Y, int i0, int i1, int kernels) {
#ifdef WQE_ROT_AVX2
    if (kernels == K_AVX2) return avx2::block_matmul_p_avx2(P, n, X, nx, Y, i0, i1);
#endif
    (void)kernels;
    block_matmul_p_scalar(P, n, X, nx, Y, i0, i1);
}

// ------------------------------------------------------------------ format 3: int8 matrices with row scales
static void block_matvec_q_scalar(const int8_t* Q, const float* s, int n, const float* x, float* y) {
    for (int i = 0; i < n; ++i) {
        const int8_t* r = Q + (size_t)i * n;
        float a = 0.0f;
        for (int j = 0; j < n; ++j) a += (float)r[j] * x[j];
        y[i] = a * s[i];
    }
}

#ifdef WQE_ROT_NEON
static void block_matvec_q_neon(const int8_t* Q, const float* s, int n, const float* x, float* y) {
    const int n8 = n & ~7;
    for (int i = 0; i < n; ++i) {
        const int8_t* r = Q + (size_t)i * n;
        float32x4_t a = vdupq_n_f32(0.0f), b = a;
        for (int j = 0; j < n8; j += 8) {
            const int16x8_t c = vmovl_s8(vld1_s8(r + j));
            a = vfmaq_f32(a, vcvtq_f32_s32(vmovl_s16(vget_low_s16(c))), vld1q_f32(x + j));
            b = vfmaq_f32(b, vcvtq_f32_s32(vmovl_high_s16(c)), vld1q_f32(x + j + 4));
        }
        float t = vaddvq_f32(vaddq_f32(a, b));
        for (int j = n8; j < n; ++j) t += (float)r[j] * x[j];
        y[i] = t * s[i];
    }
}
#endif

void block_matvec_q(const int8_t* Q, const float* s, int n, const float* x, float* y, int kernels) {
#ifdef WQE_ROT_NEON
    if (kernels == K_NEON) return block_matvec_q_neon(Q, s, n, x, y);
#endif
    (void)kernels;
    block_matvec_q_scalar(Q, s, n, x, y);
}

static void block_matmul_q_scalar(const int8_t* P, const float* s, int n, const float* X, int nx, float* Y, int i0, int i1) {
    for (int b = 0; b < nx; ++b)
        for (int i = i0; i < i1; ++i) {
            const int8_t* p = P + (size_t)(i / 16) * n * 16 + i % 16;
            float a = 0.0f;
            for (int j = 0; j < n; ++j) a += (float)p[(size_t)j * 16] * X[(size_t)b * n + j];
            Y[(size_t)b * n + i] = a * s[i];
        }
}

void block_matmul_q(const int8_t* P, const float* s, int n, const float* X, int nx, float* Y, int i0, int i1, int kernels) {
#ifdef WQE_ROT_AVX2
    if (kernels == K_AVX2) return avx2::matmul_packed(P, s, n, X, nx, Y, i0, i1);
#endif
    (void)kernels;
    block_matmul_q_scalar(P, s, n, X, nx, Y, i0, i1);
}

// ------------------------------------------------------------------ format 3 with int8 activations
std::vector<int8_t> pack_quads16(const std::vector<int8_t>& Q, int n) {
    std::vector<int8_t> P((size_t)n * n);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) P[((size_t)(i / 16) * (n / 4) + j / 4) * 64 + (i % 16) * 4 + j % 4] = Q[(size_t)i * n + j];
    return P;
}

std::vector<int32_t> quad_row_sums(const std::vector<int8_t>& Q, int n) {
    const int nk = n / 32;
    std::vector<int32_t> S((size_t)n * nk);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < nk; ++k) {
            int32_t a = 0;
            for (int j = 0; j < 32; ++j) a += Q[(size_t)i * n + 32 * k + j];
            S[((size_t)(i / 16) * nk + k) * 16 + i % 16] = 128 * a;
        }
    return S;
}

static void block_matmul_q8_scalar(const int8_t* Q, const float* s, int n, const XQ8* X, int nx, float* Y, int i0, int i1) {
    const int nk = n / 32;
    for (int b = 0; b < nx; ++b)
        for (int i = i0; i < i1; ++i) {
            float acc = 0.0f;
            for (int k = 0; k < nk; ++k) {
                const XQ8& xk = X[(size_t)b * nk + k];
                int32_t isum = 0;
                for (int j = 0; j < 32; ++j) isum += (int32_t)Q[(size_t)i * n + 32 * k + j] * xk.q[j];
                const float p = (float)isum * xk.d;
                acc = acc + p;
            }
            Y[(size_t)b * n + i] = acc * s[i];
        }
}

#ifdef WQE_ROT_AVX2
namespace avx2 {
// NB blocks x one strip of 16 rows: per 32 columns, 8 vpdpbusd per block (activations as unsigned q + 128, one
// broadcast of 4 codes each; the strip's 64-byte vectors shared by the NB blocks), minus 128 * the rows' code sums,
// then acc + (float)sum * d (NB independent chains; a second chain per block measured no faster).
// U: the blocks' codes as unsigned q + 128, 32 per 32 columns (u32 words: one broadcast operand per 4 codes); D: their d.
template <int NB>
__attribute__((target("avx512f,avx512vl,avx512vnni,avx512bw"))) static void q8_strip_vnni(const int8_t* w, const int32_t* rs,
                                                                                         const float* s, int n,
                                                                                         const uint32_t* U, const float* D,
                                                                                         float* Y) {
    const int nk = n / 32;
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    for (int k = 0; k < nk; ++k, w += 8 * 64) {
        __m512i isum[NB];
        for (int b = 0; b < NB; ++b) isum[b] = _mm512_setzero_si512();
        for (int c = 0; c < 8; ++c) {
            const __m512i wv = _mm512_loadu_si512((const void*)(w + 64 * c));
            for (int b = 0; b < NB; ++b)
                isum[b] = _mm512_dpbusd_epi32(isum[b], _mm512_set1_epi32((int)U[((size_t)b * nk + k) * 8 + c]), wv);
        }
        const __m512i r = _mm512_loadu_si512((const void*)(rs + (size_t)k * 16));
        for (int b = 0; b < NB; ++b)
            acc[b] = _mm512_add_ps(acc[b], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[b], r)),
                                                         _mm512_set1_ps(D[(size_t)b * nk + k])));
    }
    const __m512 sv = _mm512_loadu_ps(s);
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(Y + (size_t)b * n, _mm512_mul_ps(acc[b], sv));
}

static void block_matmul_u8_vnni(const int8_t* QV, const int32_t* RS, const float* s, int n, const uint32_t* U,
                                 const float* D, int nx, float* Y, int i0, int i1) {
    const int nk = n / 32;
    for (int i = i0; i < i1; i += 16) {
        const int8_t* w = QV + (size_t)(i / 16) * n * 16;
        const int32_t* rs = RS + (size_t)(i / 16) * nk * 16;
        for (int b = 0; b < nx; b += 4) {
            const uint32_t* u = U + (size_t)b * nk * 8;
            const float* d = D + (size_t)b * nk;
            float* y = Y + (size_t)b * n + i;
            switch (std::min(4, nx - b)) {
                case 4: q8_strip_vnni<4>(w, rs, s + i, n, u, d, y); break;
                case 3: q8_strip_vnni<3>(w, rs, s + i, n, u, d, y); break;
                case 2: q8_strip_vnni<2>(w, rs, s + i, n, u, d, y); break;
                default: q8_strip_vnni<1>(w, rs, s + i, n, u, d, y); break;
            }
        }
    }
}

// The VNNI product's operand (stage_input_u8) of x[idx[j]], j < g, or of x[j] when idx is null: VecOps::quant_x8's
// codes (the same max|x|, scale, rounding and clamp) + 128 and d per 32 values, in one pass. Why: at llama-s's widths
// the stage inputs' quantization was the transform's second cost after its products; quant_x8 also sums the values
// (a double-precision chain, ~1.6x its time here) and each code block (ds), which the products never read, and its
// codes were then copied into this layout per product; stage 2 gathers its input (the permutation P) here too
// instead of writing and re-reading it (the separate scalar gather was 2.7% of a B = 64 decode).
__attribute__((target("avx2,fma"))) static void quant_u8(const float* x, const int32_t* idx, int g, uint32_t* U, float* D) {
    const __m256 sign = _mm256_set1_ps(-0.0f), magic = _mm256_set1_ps(12582912.0f);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), bias = _mm256_set1_epi8((char)0x80);
    for (int b = 0; b < g / 32; ++b) {
        alignas(32) float gathered[32];  // scalar loads: 0.8 ns a value against vgatherdps's 1.1 (Zen 4, llama-s's widths)
        const float* src = x + 32 * b;
        if (idx) {
            for (int j = 0; j < 32; ++j) gathered[j] = x[idx[32 * b + j]];
            src = gathered;
        }
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(src + 8 * k);
            amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), amax);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float am = _mm_cvtss_f32(m4);
        const __m256 vid = _mm256_set1_ps(am > 0.0f ? 127.0f / am : 0.0f);
        __m256i q[4];
        for (int k = 0; k < 4; ++k) {
            __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v[k], vid), magic), magic);
            q[k] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i*)(U + (size_t)8 * b), _mm256_xor_si256(_mm256_permutevar8x32_epi32(p, order), bias));
        D[b] = am / 127.0f;
    }
}
}  // namespace avx2
#endif

// XQ8 blocks as block_matmul_u8's operand: codes + 128 (the unsigned operand of vpdpbusd) and the scales, contiguous.
static void to_u8(const XQ8* X, int nblk, uint32_t* U, float* D) {
    for (int k = 0; k < nblk; ++k) {
        for (int c = 0; c < 8; ++c) {
            uint32_t v;
            std::memcpy(&v, X[k].q + 4 * c, 4);
            U[(size_t)k * 8 + c] = v ^ 0x80808080u;
        }
        D[k] = X[k].d;
    }
}

void block_matmul_q8(const int8_t* Q, const int8_t* QV, const int32_t* RS, const float* s, int n, const XQ8* X, int nx,
                     float* Y, int i0, int i1, int kernels) {
#ifdef WQE_ROT_AVX2
    if (kernels == K_AVX2 && x86_vnni() == 1 && QV && RS) {
        thread_local std::vector<uint32_t> U;
        thread_local std::vector<float> D;
        U.resize((size_t)nx * n / 4);
        D.resize((size_t)nx * n / 32);
        to_u8(X, nx * n / 32, U.data(), D.data());
        return avx2::block_matmul_u8_vnni(QV, RS, s, n, U.data(), D.data(), nx, Y, i0, i1);
    }
#endif
    (void)QV;
    (void)RS;
    (void)kernels;
    block_matmul_q8_scalar(Q, s, n, X, nx, Y, i0, i1);
}

void block_matmul_u8(const int8_t* QV, const int32_t* RS, const float* s, int n, const uint32_t* U, const float* D, int nx,
                     float* Y, int i0, int i1) {
#ifdef WQE_ROT_AVX2
    return avx2::block_matmul_u8_vnni(QV, RS, s, n, U, D, nx, Y, i0, i1);
#else
    (void)QV, (void)RS, (void)s, (void)n, (void)U, (void)D, (void)nx, (void)Y, (void)i0, (void)i1;
    throw Error(WQE_ERR_INTERNAL, "block_matmul_u8: AVX-512 VNNI products on a build without them");
#endif
}

void stage_input_u8(const float* x, const int32_t* idx, int g, uint32_t* U, float* D, int kernels) {
#ifdef WQE_ROT_AVX2
    if (kernels == K_AVX2) return avx2::quant_u8(x, idx, g, U, D);
#endif
    thread_local std::vector<float> v;
    thread_local std::vector<XQ8> q;
    if (idx) {
        v.resize(g);
        for (int j = 0; j < g; ++j) v[j] = x[idx[j]];
        x = v.data();
    }
    q.resize(g / 32);
    vec_ops(kernels).quant_x8(x, g, q.data(), 0.0f);
    to_u8(q.data(), g / 32, U, D);
}

// ------------------------------------------------------------------ the transform
// Smoothing, then stage 1 (R1 on every block: x -> t), the gather P (t -> g), stage 2 (R2 on every block: g -> y),
// then the Householder reflection y + c v with c = -2 * (the blocks' shares of v . y summed in block order). Each
// stage is one set of tasks: with AVX2 and packed strips every whole block in one multi-block product over row tasks of
// 32 (one more task for the tail block), else one task per block. Over the pool's threads when one is given (decode);
// every output is computed by the same operations either way, so all paths and thread counts agree bit for bit.
static int n_blocks(const Rotation& r) { return (r.dim + r.block - 1) / r.block; }

static float hh_share(const Rotation& r, const float* y, int s, int n, int kernels) {
    return r.hh.empty() ? 0.0f : vec_ops(kernels).dot_f32(r.hh.data() + s, y + s, n);
}

void Rotation::pack_blocks() {
    if (block % 16) return;  // (the per-block path then)
    if (integer()) {
        q1p = pack_rows16(q1, block);
        q2p = pack_rows16(q2, block);
        if (block % 32 == 0 && x86_vnni() == 1) {  // int8 activations' products (block_matmul_q8)
            q1v = pack_quads16(q1, block);
            q2v = pack_quads16(q2, block);
            q1rs = quad_row_sums(q1, block);
            q2rs = quad_row_sums(q2, block);
        }
        return;
    }
    r1p = pack_rows16(r1, block);
    r2p = pack_rows16(r2, block);
}

// Block b's (whole blocks: rows [i0, i1) of all of them, packed) product of stage 1 or 2, float32 or int8 matrices.
static void stage_task(const Rotation& r, bool second, bool packed, int k, int rt, const float* in, const uint32_t* u8,
                       const float* d8, float* out, int kernels) {
    const int B = r.block, nf = r.dim / B, n_rt = (B + rt - 1) / rt;
    if (packed && k < n_rt) {
        const int i0 = k * rt, i1 = std::min(B, i0 + rt);
        if (u8)
            block_matmul_u8((second ? r.q2v : r.q1v).data(), (second ? r.q2rs : r.q1rs).data(), (second ? r.s2 : r.s1).data(),
                            B, u8, d8, nf, out, i0, i1);
        else if (r.integer()) block_matmul_q((second ? r.q2p : r.q1p).data(), (second ? r.s2 : r.s1).data(), B, in, nf, out, i0, i1, kernels);
        else block_matmul_p((second ? r.r2p : r.r1p).data(), B, in, nf, out, i0, i1, kernels);
        return;
    }
    const int b = packed ? nf : k, s = b * B, n = std::min(B, r.dim - s);
    const bool full = n == B;
    if (r.integer()) {
        const std::vector<int8_t>& q = second ? (full ? r.q2 : r.q2_tail) : (full ? r.q1 : r.q1_tail);
        const std::vector<float>& sc = second ? (full ? r.s2 : r.s2_tail) : (full ? r.s1 : r.s1_tail);
        block_matvec_q(q.data(), sc.data(), n, in + s, out + s, kernels);
    } else {
        const std::vector<float>& m = second ? (full ? r.r2 : r.r2_tail) : (full ? r.r1 : r.r1_tail);
        block_matvec(m.data(), n, in + s, out + s, kernels);
    }
}

bool Rotation::int8_ready(int kernels) const {
    static const bool on = env_switch("WQEDGE_INT8_TRANSFORM", true);  // =0: float block products (A/B runs)
    return on && kernels == K_AVX2 && x86_vnni() == 1 && !q1v.empty() && dim >= block;
}

static void fwht(float* v, int n);

static void apply_blocks(const Rotation& r, float* x, ThreadPool* pool, int kernels, bool int8) {
    const int B = r.block, nf = r.dim / B, tl = r.dim - nf * B, nb = n_blocks(r);
    const bool packed = kernels == K_AVX2 && nf > 0 && !(r.integer() ? r.q1p.empty() : r.r1p.empty());
    int8 = int8 && packed && r.int8_ready(kernels);
    // Row tasks of 32 when split over threads; on one thread one task for all rows of the whole blocks (each output
    // is the same operations either way), so a stage converts its int8 input for the VNNI kernel once, not per task.
    const bool split = pool && pool->size() > 1;
    const int RT = split ? 32 : B;
    const int n_tasks = packed ? (B + RT - 1) / RT + (tl ? 1 : 0) : nb;
    thread_local std::vector<float> buf;
    thread_local std::vector<uint32_t> bufu;   // int8 stage input (stage_input_u8): codes + 128, 8 words per 32
    thread_local std::vector<float> bufd;      // and their d
    if (buf.size() < (size_t)3 * r.dim + nb) buf.resize((size_t)3 * r.dim + nb);
    if (int8 && bufd.size() < (size_t)nf * B / 32) {
        bufu.resize((size_t)nf * B / 4);
        bufd.resize((size_t)nf * B / 32);
    }
    float *t = buf.data(), *g = t + r.dim, *y = g + r.dim, *part = y + r.dim;
    // in8_ready: bufu / bufd already hold the whole blocks' int8 input (stage 2's, quantized straight from t through P).
    auto stage = [&](bool second, const float* in, float* out, bool in8_ready = false) {
        if (second ? r.id2 : r.id1) {
            std::memcpy(out, in, sizeof(float) * r.dim);
            return;
        }
        if (!second && !r.had_signs.empty()) {  // R1 a randomized Hadamard matrix: the fast transform, in float
            for (int b = 0; b < nf; ++b) {
                float* o = out + (size_t)b * B;
                const float* xi = in + (size_t)b * B;
                for (int i = 0; i < B; ++i) o[i] = xi[i] * r.had_signs[i];
                fwht(o, B);
                for (int i = 0; i < B; ++i) o[i] *= r.had_gain[i];
            }
            if (tl) stage_task(r, false, false, nf, RT, in, nullptr, nullptr, out, kernels);  // the ragged tail: its product
            return;
        }
        const uint32_t* u8 = nullptr;
        if (int8) {  // the whole blocks' input, per 32 columns (the tail block stays float)
            if (!in8_ready) stage_input_u8(in, nullptr, nf * B, bufu.data(), bufd.data(), kernels);
            u8 = bufu.data();
        }
        const float* d8 = bufd.data();
        if (split) pool->run(n_tasks, [&](int k, int) { stage_task(r, second, packed, k, RT, in, u8, d8, out, kernels); });
        else for (int k = 0; k < n_tasks; ++k) stage_task(r, second, packed, k, RT, in, u8, d8, out, kernels);
    };
    if (!r.smooth.empty())
        for (int i = 0; i < r.dim; ++i) x[i] /= r.smooth[i];
    stage(false, x, t);
    if (r.id2 && r.perm_id && r.hh.empty()) {  // one stage only (method "hadamard"): no more copies
        std::memcpy(x, t, sizeof(float) * r.dim);
        return;
    }
    if (r.perm_id) {
        std::memcpy(g, t, sizeof(float) * r.dim);
        stage(true, g, y);
    } else if (int8 && !r.id2) {  // the whole blocks gathered into their int8 codes in one pass; the tail as floats
        stage_input_u8(t, r.perm.data(), nf * B, bufu.data(), bufd.data(), kernels);
        for (int i = nf * B; i < r.dim; ++i) g[i] = t[r.perm[i]];
        stage(true, g, y, true);
    } else {
        for (int i = 0; i < r.dim; ++i) g[i] = t[r.perm[i]];
        stage(true, g, y);
    }
    std::memcpy(x, y, sizeof(float) * r.dim);
    if (r.hh.empty()) return;
    for (int b = 0; b < nb; ++b) part[b] = hh_share(r, y, b * B, std::min(B, r.dim - b * B), kernels);
    float d = 0.0f;
    for (int b = 0; b < nb; ++b) d += part[b];
    vec_ops(kernels).axpy(-2.0f * d, r.hh.data(), x, r.dim);
}

void Rotation::apply(float* x, int kernels, bool int8) const { apply_blocks(*this, x, nullptr, kernels, int8); }

static int parity(unsigned v) {
    int p = 0;
    for (; v; v &= v - 1) p ^= 1;
    return p;
}

void Rotation::find_hadamard() {
    had_signs.clear();
    had_gain.clear();
    const int n = block;
    if (!integer() || n < 2 || (n & (n - 1)) || dim < n) return;
    std::vector<float> sg(n);
    for (int j = 0; j < n; ++j) {
        if (q1[j] != 127 && q1[j] != -127) return;
        sg[j] = q1[j] > 0 ? 1.0f : -1.0f;
    }
    for (int i = 1; i < n; ++i)
        for (int j = 0; j < n; ++j)
            if (q1[(size_t)i * n + j] != (parity((unsigned)(i & j)) ? -q1[j] : q1[j])) return;
    had_gain.resize(n);
    for (int i = 0; i < n; ++i) had_gain[i] = 127.0f * s1[i];
    had_signs = std::move(sg);
}

// y = H v in place (H the n x n Sylvester matrix, n a power of two): the butterflies of the fast Walsh-Hadamard
// transform, plain C++ for every kernel set. The first three stages as one 8-point transform per 8 values; then
// stages of h >= 8, whose halves never overlap (restrict), which compilers vectorize.
static void fwht(float* v, int n) {
    int h = 1;
    if (n >= 8) {
        for (int i = 0; i < n; i += 8) {
            float* p = v + i;
            const float a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
            const float a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
            const float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
            const float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
            p[0] = b0 + b4, p[1] = b1 + b5, p[2] = b2 + b6, p[3] = b3 + b7;
            p[4] = b0 - b4, p[5] = b1 - b5, p[6] = b2 - b6, p[7] = b3 - b7;
        }
        h = 8;
    }
    for (; h < n; h <<= 1)
        for (int i = 0; i < n; i += 2 * h) {
            float* __restrict a = v + i;
            float* __restrict b = v + i + h;
            for (int j = 0; j < h; ++j) {
                const float x = a[j], y = b[j];
                a[j] = x + y;
                b[j] = x - y;
            }
        }
}

float act_fake_quant(float* x, int n, int bits) { return vec_ops(K_SCALAR).fake_quant(x, n, bits); }

void group_input(const Rotation* r, int bits, float* x, int n, int dim, ThreadPool& pool, int kernels, float* steps) {
    if (r && r->identity()) r = nullptr;
    if (steps)
        for (int t = 0; t < n; ++t) steps[t] = 0.0f;
    if (!r && bits >= 8) return;
    // At act bits 8 with int8 activations the linears quantize the transform's output per 32 columns anyway: its
    // block products then take int8 inputs too (Rotation::int8_ready: AVX-512 VNNI), 4x the float products' rate.
    const bool int8 = bits >= 8 && active_act() == ACT_Q8;
    auto act_quant = [&](float* xt, int t) {  // token t's activations at act bits < 8, its grid step recorded
        if (bits >= 8) return;
        const float s = vec_ops(kernels).fake_quant(xt, dim, bits);
        if (steps) steps[t] = s;
    };
    auto one = [&](int t) {
        float* xt = x + (size_t)t * dim;
        if (r) r->apply(xt, kernels, int8);
        act_quant(xt, t);
    };
    // Decode splits a token's blocks over the threads (two fork-joins per group), except int8 products on 2 threads or
    // of groups narrower than INT8_SPLIT_COLUMNS = 2048. Measured on 2 threads, the calling thread alone was faster at
    // both widths: llama-s (512 and 1408 columns) 1867-1915 tok/s against 1610-1668 split (bench/results/ruquant_speed.md
    // run 7), the TinyLlama shape (2048 and 5632) 63.1-65.3 against 58.2-60.4 in the rounds where memory was fast, equal
    // in the others (run 10). From 3 threads the wide groups split (the device's 4-thread runs: +10%); llama-s's stayed
    // faster unsplit at 8 threads (run 13). Those runs had B = 128 (a bound of 16 blocks); it is a width, whatever B.
    // Float products always split. WQEDGE_INT8_SPLIT_BLOCKS=N moves the bound to N blocks of the group's B (A/B runs
    // on other CPUs and thread counts; read once).
    constexpr int INT8_SPLIT_COLUMNS = 2048;
    static const int INT8_SPLIT_BLOCKS = [] {  // 0: not set (or not a positive number)
        const char* e = std::getenv("WQEDGE_INT8_SPLIT_BLOCKS");
        return std::max(0, e && *e ? std::atoi(e) : 0);
    }();
    const int split_columns = r && INT8_SPLIT_BLOCKS ? INT8_SPLIT_BLOCKS * r->block : INT8_SPLIT_COLUMNS;
    const bool int8_alone = int8 && r && r->int8_ready(kernels) && (r->dim < split_columns || pool.size() <= 2);
    const bool split = r && n_blocks(*r) > 1 && !int8_alone;
    if (n == 1 && split && pool.size() > 1) {
        apply_blocks(*r, x, &pool, kernels, int8);
        act_quant(x, 0);
    } else if (n == 1) {
        one(0);
    } else {
        pool.run(n, [&](int t, int) { one(t); });
    }
}

// ------------------------------------------------------------------ loading
static const char* const GROUPS[4] = {"attn_in", "attn_out", "ffn_in", "ffn_down"};

static std::vector<float> f32_tensor(const GGUFFile& f, const std::string& name, uint64_t d0, uint64_t d1, bool need) {
    const GGUFTensor* t = f.tensor(name);
    if (!t) {
        if (need) f.format_error("rotated file lacks tensor '%s'", name.c_str());
        return {};
    }
    const uint32_t nd = d1 > 1 ? 2 : 1;
    if (t->type != GGML_F32 || t->n_dims != nd || t->dims[0] != d0 || (nd == 2 && t->dims[1] != d1))
        f.format_error("tensor '%s' must be F32 of shape [%llu, %llu]", name.c_str(), (unsigned long long)d0,
                       (unsigned long long)d1);
    std::vector<float> v(d0 * d1);
    std::memcpy(v.data(), t->data, sizeof(float) * v.size());
    for (size_t i = 0; i < v.size(); ++i)
        if (!std::isfinite(v[i])) f.format_error("tensor '%s' holds a non-finite value at %zu", name.c_str(), i);
    return v;
}

// Matrix `name` of n x n: F32 (format 2) into fl, or I8 codes (format 3) into q with its F32 row scales `name`_scale.
static void load_matrix(const GGUFFile& f, const std::string& name, int n, std::vector<float>& fl, std::vector<int8_t>& q,
                        std::vector<float>& s) {
    const GGUFTensor* t = f.tensor(name);
    if (!t) f.format_error("rotated file lacks tensor '%s'", name.c_str());
    if (t->type != GGML_I8) {
        fl = f32_tensor(f, name, n, n, true);
        return;
    }
    if (t->n_dims != 2 || t->dims[0] != (uint64_t)n || t->dims[1] != (uint64_t)n)
        f.format_error("tensor '%s' must be I8 of shape [%d, %d]", name.c_str(), n, n);
    if (n > 512) f.format_error("tensor '%s': int8 block matrices need a block of at most 512, got %d", name.c_str(), n);
    q.resize((size_t)n * n);
    std::memcpy(q.data(), t->data, q.size());
    for (int8_t c : q)
        if (c < -127) f.format_error("tensor '%s' holds the code -128 (codes lie in [-127, 127])", name.c_str());
    s = f32_tensor(f, name + "_scale", n, 1, true);
}

static bool is_identity(const std::vector<float>& m, int n) {
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j)
            if (m[(size_t)i * n + j] != (i == j ? 1.0f : 0.0f)) return false;
    return true;
}

// int8 codes 127·I with row scales 1/127 (wqedge.rotation.BlockRotation.is_identity): the identity as stored by a
// group whose matrices are int8.
static bool is_identity_q(const std::vector<int8_t>& q, const std::vector<float>& s, int n) {
    for (int i = 0; i < n; ++i) {
        if (std::fabs((double)s[i] * 127.0 - 1.0) >= 1e-6) return false;
        for (int j = 0; j < n; ++j)
            if (q[(size_t)i * n + j] != (i == j ? 127 : 0)) return false;
    }
    return true;
}

std::vector<Rotation> load_rotations(const GGUFFile& f, int layer, int block, const int widths[4]) {
    std::vector<Rotation> out(4);
    for (int g = 0; g < 4; ++g) {
        Rotation& r = out[g];
        const int d = widths[g];
        const std::string p = "blk." + std::to_string(layer) + ".rot_" + GROUPS[g] + ".";
        r.dim = d;
        r.block = block;
        const int t = d >= block ? d % block : d;
        load_matrix(f, p + "r1", block, r.r1, r.q1, r.s1);
        load_matrix(f, p + "r2", block, r.r2, r.q2, r.s2);
        if (t) {
            load_matrix(f, p + "r1_tail", t, r.r1_tail, r.q1_tail, r.s1_tail);
            load_matrix(f, p + "r2_tail", t, r.r2_tail, r.q2_tail, r.s2_tail);
        } else if (f.tensor(p + "r1_tail") || f.tensor(p + "r2_tail")) {
            f.format_error("'%sr1_tail'/'r2_tail' present but width %d is a multiple of %d", p.c_str(), d, block);
        }
        const bool ints = r.integer();
        if (r.q2.empty() == ints || (t && (r.q1_tail.empty() == ints || r.q2_tail.empty() == ints)))
            f.format_error("'%s*': the block matrices must be all I8 or all F32", p.c_str());
        std::vector<float> hh = f32_tensor(f, p + "householder", d, 1, true);
        double nn = 0.0;
        for (float v : hh) nn += (double)v * v;
        if (nn != 0.0) {
            if (std::fabs(nn - 1.0) > 1e-3) f.format_error("tensor '%shouseholder' is not a unit vector", p.c_str());
            r.hh = std::move(hh);
        }
        r.smooth = f32_tensor(f, p + "smooth", d, 1, false);
        for (float s : r.smooth)
            if (!(s > 0.0f)) f.format_error("tensor '%ssmooth' holds a non-positive divisor", p.c_str());
        r.pack_blocks();
        r.find_hadamard();
        if (!ints) {
            r.id1 = is_identity(r.r1, block) && (!t || is_identity(r.r1_tail, t));
            r.id2 = is_identity(r.r2, block) && (!t || is_identity(r.r2_tail, t));
        } else {
            r.id1 = is_identity_q(r.q1, r.s1, block) && (!t || is_identity_q(r.q1_tail, r.s1_tail, t));
            r.id2 = is_identity_q(r.q2, r.s2, block) && (!t || is_identity_q(r.q2_tail, r.s2_tail, t));
        }
        const GGUFTensor* pt = f.tensor(p + "perm");
        if (!pt) f.format_error("rotated file lacks tensor '%sperm'", p.c_str());
        if (pt->type != GGML_I32 || pt->n_dims != 1 || pt->dims[0] != (uint64_t)d)
            f.format_error("tensor '%sperm' must be I32 of %d values", p.c_str(), d);
        r.perm.resize(d);
        std::memcpy(r.perm.data(), pt->data, sizeof(int32_t) * d);
        std::vector<char> seen(d, 0);
        for (int i = 0; i < d; ++i) {
            const int32_t v = r.perm[i];
            if (v < 0 || v >= d || seen[v]) f.format_error("tensor '%sperm' is not a permutation of 0..%d", p.c_str(), d - 1);
            seen[v] = 1;
        }
        r.perm_id = true;
        for (int i = 0; i < d && r.perm_id; ++i) r.perm_id = r.perm[i] == i;
    }
    return out;
}

}  // namespace wqe

// Test hook (tests/test_ruquant_runtime.py through ctypes): y = R x of one n x n block with kernel set k;
// returns -1 when the set is not built here.
extern "C" WQE_API int wqe_rotation_block_matvec(const float* R, int n, const float* x, float* y, int kernels) {
    if (kernels == wqe::K_AVX2 && !wqe::cpu_has_avx2()) return -1;
    if (kernels == wqe::K_NEON && !wqe::cpu_has_neon()) return -1;
    wqe::block_matvec(R, n, x, y, kernels);
    return 0;
}
