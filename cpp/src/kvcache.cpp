// Quantized KV cache rows (kvcache.h): quantization, the Walsh-Hadamard transform, and the rows' values for the
// attention kernels (a scalar reference and AVX2/NEON paths) (tests: cpp/tests/test_kvcache.cpp,
// tests/test_kv_cache.py).
#include "kvcache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "blocks.h"
#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define WQE_KV_AVX2 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define WQE_KV_NEON 1
#endif

namespace wqe {

KvFormat KvFormat::make(int bits, bool rotate, int head_dim) {
    KvFormat f;
    f.bits = bits;
    f.head_dim = head_dim;
    if (bits == 16) {  // fp16 values, no scales: the rows' bytes halved, exact to fp16 rounding (no rotation needed)
        f.group = f.hblock = head_dim;
        f.row_bytes = 2 * (size_t)head_dim;
        return f;
    }
    f.rotate = bits != 0 && rotate;
    f.hblock = head_dim & -head_dim;
    const int g = kv_group(bits);  // 4 bits: groups of 16 (bench/results/kv_cache.md: +0.1% vs +1.0% at 32)
    f.group = head_dim % g == 0 ? g : head_dim;
    f.row_bytes = bits == 0 ? sizeof(float) * (size_t)head_dim
                            : (size_t)(head_dim / f.group) * 4 + (size_t)head_dim * bits / 8;
    return f;
}

static inline size_t group_bytes(const KvFormat& f) { return (size_t)kv_group_bytes(f.group, f.bits); }

// The attention loop's prefetch: while row i of rows[0, avail) is converted, the bytes KV_PREFETCH_BYTES further on
// (the hardware prefetchers alone left decode at 2000 tokens latency-bound: 8-bit rows, 2.8 ms a token on llama-s
// with 8 rows ahead, 2.5 ms with 32 rows = 2304 bytes).
constexpr size_t KV_PREFETCH_BYTES = 2304;
static inline void prefetch_ahead(const KvFormat& f, const uint8_t* rows, int i, int avail) {
    const size_t at = (size_t)i * f.row_bytes + KV_PREFETCH_BYTES;
    if (at + f.row_bytes <= (size_t)avail * f.row_bytes)
        for (size_t b = 0; b < f.row_bytes; b += 64) prefetch_read(rows + at + b);
}

// Code j of a group (4 bits: byte j holds codes j and j + g/2).
static inline int code_at(const KvFormat& f, const uint8_t* codes, int j) {
    if (f.bits == 8) return codes[j];
    const int h = f.group / 2;
    return j < h ? codes[j] & 0xF : codes[j - h] >> 4;
}

void kv_quantize(const KvFormat& f, const float* x, uint8_t* dst, int kernels) {
    if (f.bits == 16) {
        vec_ops(kernels).f32_to_f16(x, dst, f.head_dim);
        return;
    }
    const int g = f.group, qmax = (1 << f.bits) - 1;
    for (int g0 = 0; g0 < f.head_dim; g0 += g, dst += group_bytes(f)) {
        const float* v = x + g0;
        float mn = v[0], mx = v[0];
        for (int j = 1; j < g; ++j) {
            mn = std::min(mn, v[j]);
            mx = std::max(mx, v[j]);
        }
        const uint16_t mh = fp32_to_fp16(mn);
        const float m = fp16_to_fp32(mh);
        const uint16_t dh = fp32_to_fp16((mx - m) / (float)qmax);
        const float d = fp16_to_fp32(dh);
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        std::memcpy(dst, &dh, 2);
        std::memcpy(dst + 2, &mh, 2);
        uint8_t* codes = dst + 4;
        if (f.bits == 4) std::memset(codes, 0, (size_t)g / 2);
        for (int j = 0; j < g; ++j) {
            const float r = std::nearbyint((v[j] - m) * inv);  // round half to even (the default rounding mode)
            const int c = (int)std::min((float)qmax, std::max(0.0f, r));
            if (f.bits == 8) codes[j] = (uint8_t)c;
            else if (j < g / 2) codes[j] |= (uint8_t)c;
            else codes[j - g / 2] |= (uint8_t)(c << 4);
        }
    }
}

void kv_dequantize(const KvFormat& f, const uint8_t* src, float* dst) {
    if (f.bits == 16) {
        for (int j = 0; j < f.head_dim; ++j) dst[j] = load_h(src + 2 * j);
        return;
    }
    for (int g0 = 0; g0 < f.head_dim; g0 += f.group, src += group_bytes(f)) {
        const float d = load_h(src), m = load_h(src + 2);
        for (int j = 0; j < f.group; ++j) dst[g0 + j] = (float)code_at(f, src + 4, j) * d + m;
    }
}

void kv_hadamard(float* x, int n, int block) {
    const float scale = 1.0f / std::sqrt((float)block);
    for (int b0 = 0; b0 < n; b0 += block) {
        float* p = x + b0;
        for (int h = 1; h < block; h *= 2)
            for (int i = 0; i < block; i += 2 * h)
                for (int j = i; j < i + h; ++j) {
                    const float a = p[j], b = p[j + h];
                    p[j] = a + b;
                    p[j + h] = a - b;
                }
        for (int i = 0; i < block; ++i) p[i] *= scale;
    }
}

// ------------------------------------------------------------------ AVX2 (groups of a multiple of 16 values; 8 bits: 32)
#ifdef WQE_KV_AVX2
namespace avx2 {  // only functions in wqe::avx2 may hold AVX instructions (tests/test_cpp_clang.py)
// A group's fp16 scale and min (4 bytes at p), exactly converted (F16C), broadcast.
__attribute__((target("avx2,fma,f16c"))) static inline void scale_min(const uint8_t* p, __m256* d, __m256* m) {
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)load_u32(p)));
    *d = _mm256_broadcastss_ps(dm);
    *m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
}
// 8 codes (bytes) -> floats d * c + m.
__attribute__((target("avx2,fma,f16c"))) static inline __m256 deq8(__m128i bytes8, __m256 d, __m256 m) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)), d, m);
}

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void values(const KvFormat& f, const uint8_t* row,
                                                                                   float* out) {
    const int g = f.group, h = g / 2;
    const __m128i nib = _mm_set1_epi8(0x0F);
    for (int g0 = 0; g0 < f.head_dim; g0 += g, row += group_bytes(f)) {
        __m256 d, m;
        scale_min(row, &d, &m);
        const uint8_t* c = row + 4;
        float* o = out + g0;
        if (f.bits == 8) {
            for (int j = 0; j < g; j += 8) _mm256_storeu_ps(o + j, deq8(_mm_loadl_epi64((const __m128i*)(c + j)), d, m));
        } else {
            for (int j = 0; j < h; j += 8) {
                const __m128i b = _mm_loadl_epi64((const __m128i*)(c + j));
                _mm256_storeu_ps(o + j, deq8(_mm_and_si128(b, nib), d, m));
                _mm256_storeu_ps(o + h + j, deq8(_mm_and_si128(_mm_srli_epi16(b, 4), nib), d, m));
            }
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void rows_values(const KvFormat& f, const uint8_t* rows, int n, int avail,
                                                                 float* out) {
    for (int i = 0; i < n; ++i) {
        prefetch_ahead(f, rows, i, avail);
        values(f, rows + (size_t)i * f.row_bytes, out + (size_t)i * f.head_dim);
    }
}

}  // namespace avx2
#endif

// ------------------------------------------------------------------ NEON (groups of a multiple of 16 values; 8 bits: 32)
#ifdef WQE_KV_NEON
namespace neon {
// 8 codes (u16 lanes) -> two float vectors d * c + m.
static inline void deq8(uint16x8_t c, float32x4_t d, float32x4_t m, float32x4_t* w0, float32x4_t* w1) {
    *w0 = vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_low_u16(c))), d);
    *w1 = vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_high_u16(c))), d);
}
__attribute__((always_inline)) static inline void values(const KvFormat& f, const uint8_t* row, float* out) {
    const int g = f.group, h = g / 2;
    for (int g0 = 0; g0 < f.head_dim; g0 += g, row += group_bytes(f)) {
        const float32x4_t dm = vcvt_f32_f16(vreinterpret_f16_u16(vcreate_u16((uint64_t)load_u32(row))));
        const float32x4_t d = vdupq_laneq_f32(dm, 0), m = vdupq_laneq_f32(dm, 1);
        const uint8_t* c = row + 4;
        float* o = out + g0;
        float32x4_t w0, w1;
        if (f.bits == 8) {
            for (int j = 0; j < g; j += 8) {
                deq8(vmovl_u8(vld1_u8(c + j)), d, m, &w0, &w1);
                vst1q_f32(o + j, w0);
                vst1q_f32(o + j + 4, w1);
            }
        } else {
            for (int j = 0; j < h; j += 8) {
                const uint8x8_t b = vld1_u8(c + j);
                deq8(vmovl_u8(vand_u8(b, vdup_n_u8(0x0F))), d, m, &w0, &w1);
                vst1q_f32(o + j, w0);
                vst1q_f32(o + j + 4, w1);
                deq8(vmovl_u8(vshr_n_u8(b, 4)), d, m, &w0, &w1);
                vst1q_f32(o + h + j, w0);
                vst1q_f32(o + h + j + 4, w1);
            }
        }
    }
}

static void rows_values(const KvFormat& f, const uint8_t* rows, int n, int avail, float* out) {
    for (int i = 0; i < n; ++i) {
        prefetch_ahead(f, rows, i, avail);
        values(f, rows + (size_t)i * f.row_bytes, out + (size_t)i * f.head_dim);
    }
}

}  // namespace neon
#endif

// The SIMD set's row dequantization, or nullptr: it takes groups of a multiple of 16 values (8 bits: 32); other groups,
// and the scalar set, run the reference.
using RowValues = void (*)(const KvFormat&, const uint8_t*, int, int, float*);
static RowValues simd_values(const KvFormat& f, int kernels) {
    if (f.group % (f.bits == 8 ? 32 : 16) != 0) return nullptr;
#ifdef WQE_KV_AVX2
    if (kernels == K_AVX2) return avx2::rows_values;
#endif
#ifdef WQE_KV_NEON
    if (kernels == K_NEON) return neon::rows_values;
#endif
    (void)kernels;
    return nullptr;
}

void kv_rows_values(const KvFormat& f, const uint8_t* rows, int n, int avail, float* dst, int kernels) {
    if (RowValues v = f.bits == 16 ? nullptr : simd_values(f, kernels)) return v(f, rows, n, avail, dst);
    const VecOps& ops = vec_ops(kernels);
    for (int i = 0; i < n; ++i) {
        prefetch_ahead(f, rows, i, avail);
        if (f.bits == 16) ops.f16_to_f32(rows + (size_t)i * f.row_bytes, dst + (size_t)i * f.head_dim, f.head_dim);  // exact
        else kv_dequantize(f, rows + (size_t)i * f.row_bytes, dst + (size_t)i * f.head_dim);
    }
}

}  // namespace wqe

// Test hooks (tests/test_kv_cache.py through ctypes). Quantize n rows of head_dim floats (rotated first when
// rotate) into rows; returns the row bytes, or -1 on bad arguments.
extern "C" WQE_API int64_t wqe_test_kv_quantize(int bits, int rotate, int head_dim, const float* x, int n, uint8_t* rows) {
    if ((bits != 8 && bits != 4 && bits != 16) || head_dim < 2 || head_dim % 2 || n < 0) return -1;
    const wqe::KvFormat f = wqe::KvFormat::make(bits, rotate != 0, head_dim);
    if (!x || !rows) return (int64_t)f.row_bytes;
    float* tmp = new float[head_dim];
    for (int i = 0; i < n; ++i) {
        std::memcpy(tmp, x + (size_t)i * head_dim, sizeof(float) * head_dim);
        if (f.rotate) wqe::kv_hadamard(tmp, head_dim, f.hblock);
        wqe::kv_quantize(f, tmp, rows + (size_t)i * f.row_bytes, wqe::K_SCALAR);
    }
    delete[] tmp;
    return (int64_t)f.row_bytes;
}
// scores[i] = q . row i and out = sum_i p[i] row i with kernel set k, as the runtime's attention computes them (the
// rows' values by kv_rows_values, then VecOps::att_scores / att_values); -1 when the set is not built here or on bad
// arguments. Rows are in the rotated space (q is taken as given).
extern "C" WQE_API int wqe_test_kv_attend(int bits, int head_dim, const uint8_t* rows, int n, const float* q, const float* p,
                                          int kernels, float* scores, float* out) {
    if ((bits != 8 && bits != 4 && bits != 16) || head_dim < 2 || head_dim % 2 || n < 0) return -1;
    if (kernels == wqe::K_AVX2 && !wqe::cpu_has_avx2()) return -1;
    if (kernels == wqe::K_NEON && !wqe::cpu_has_neon()) return -1;
    const wqe::KvFormat f = wqe::KvFormat::make(bits, false, head_dim);
    float* vals = new float[(size_t)n * head_dim + 1];
    wqe::kv_rows_values(f, rows, n, n, vals, kernels);
    const wqe::VecOps& ops = wqe::vec_ops(kernels);
    std::memset(out, 0, sizeof(float) * head_dim);
    ops.att_scores(q, 1, head_dim, vals, head_dim, n, 1.0f, scores, n);
    ops.att_values(p, n, 1, head_dim, vals, head_dim, n, out);
    delete[] vals;
    return 0;
}
