// AArch64 Advanced SIMD (NEON) kernels: the twins of kernels_avx2.cpp, registered in the traits
// table (blocks.cpp) as kernel set K_NEON. NEON (with fp16<->fp32 conversion) is part of the
// AArch64 base ISA, so the float kernels need no target attribute or run-time check.
// The int8-activation kernels (dot8_*, activation mode ACT_Q8) come in two builds: SDOT (the
// dot-product extension, compiled with WQE_DOTPROD below and called only when neon_dotprod() says
// the CPU has it) and plain NEON (vmull_s8 + vpadalq_s16), for ARMv8.0 cores such as Cortex-A53.
// Dequantization is bit-identical to the scalar reference (separate multiply and add, never a
// fused multiply-add); dots agree with it within the tolerances of tests/test_kernels.cpp.
#if defined(__aarch64__)

#include <arm_neon.h>
#include <algorithm>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // XQ8, neon_dotprod()
#include "kvcache.h"  // kv_group, kv_group_bytes

namespace wqe {
namespace neon {
namespace {

inline float half(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

// 16 codes (uint8) -> 4 float vectors.
inline void widen16(uint8x16_t c, float32x4_t v[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(c)), hi = vmovl_high_u8(c);
    v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

// Codes of one 32-column sub-block as two byte vectors: columns 0-15 and 16-31.
inline void codes_q8(const uint8_t* q, uint8x16_t c[2]) {
    c[0] = vld1q_u8(q);
    c[1] = vld1q_u8(q + 16);
}
inline void codes_q4(const uint8_t* q, uint8x16_t c[2]) {
    const uint8x16_t b = vld1q_u8(q);
    c[0] = vandq_u8(b, vdupq_n_u8(0x0F));
    c[1] = vshrq_n_u8(b, 4);
}
inline void codes_q2(const uint8_t* q, uint8x16_t c[2]) {
    const uint8x8_t b = vld1_u8(q), m = vdup_n_u8(3);
    c[0] = vcombine_u8(vand_u8(b, m), vand_u8(vshr_n_u8(b, 2), m));
    c[1] = vcombine_u8(vand_u8(vshr_n_u8(b, 4), m), vshr_n_u8(b, 6));
}
// q1: byte k holds columns 8k..8k+7 (bit j = column 8k + j); result is 0 or 1 per column.
inline void codes_q1(const uint8_t* q, uint8x16_t c[2]) {
    uint32_t bits;
    memcpy(&bits, q, 4);
    const uint8x16_t b = vreinterpretq_u8_u32(vdupq_n_u32(bits));
    static const uint8_t idx0[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    static const uint8_t idx1[16] = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bv = vld1q_u8(bit), one = vdupq_n_u8(1);
    c[0] = vandq_u8(vtstq_u8(vqtbl1q_u8(b, vld1q_u8(idx0)), bv), one);
    c[1] = vandq_u8(vtstq_u8(vqtbl1q_u8(b, vld1q_u8(idx1)), bv), one);
}
inline void codes_q3(const uint8_t* q, uint8x16_t c[2]) {
    uint8x16_t hi[2];
    codes_q2(q, c);
    codes_q1(q + 8, hi);
    c[0] = vorrq_u8(c[0], vshlq_n_u8(hi[0], 2));
    c[1] = vorrq_u8(c[1], vshlq_n_u8(hi[1], 2));
}

typedef void (*codes_fn)(const uint8_t*, uint8x16_t c[2]);

inline float hsum4(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
    return vaddvq_f32(vaddq_f32(vaddq_f32(a, b), vaddq_f32(c, d)));
}

// Affine dot: d * sum q x + m * xsum; 32 columns per step, eight accumulators (4-wide each).
template <codes_fn CODES, int SUB>
inline float dot_affine(const uint8_t* rb, const float* x, float xsum, int g_pad) {
    const float d = half(rb), m = half(rb + 2);
    const uint8_t* q = rb + 4;
    float32x4_t acc[8];
    #pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) acc[k] = vdupq_n_f32(0.0f);
    for (int c = 0; c < g_pad; c += 32, q += SUB) {
        uint8x16_t cb[2];
        CODES(q, cb);
        float32x4_t v[8];
        widen16(cb[0], v);
        widen16(cb[1], v + 4);
        #pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) acc[k] = vfmaq_f32(acc[k], v[k], vld1q_f32(x + c + 4 * k));
    }
    const float s = hsum4(vaddq_f32(acc[0], acc[4]), vaddq_f32(acc[1], acc[5]), vaddq_f32(acc[2], acc[6]),
                          vaddq_f32(acc[3], acc[7]));
    return d * s + m * xsum;
}

template <codes_fn CODES, int SUB>
inline void dequant_affine(const uint8_t* rb, int g_pad, float* out) {
    const float32x4_t d = vdupq_n_f32(half(rb)), m = vdupq_n_f32(half(rb + 2));
    const uint8_t* q = rb + 4;
    for (int c = 0; c < g_pad; c += 32, q += SUB) {
        uint8x16_t cb[2];
        CODES(q, cb);
        float32x4_t v[8];
        widen16(cb[0], v);
        widen16(cb[1], v + 4);
        // two roundings, like the scalar reference (no vfmaq here)
        #pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) vst1q_f32(out + c + 4 * k, vaddq_f32(vmulq_f32(d, v[k]), m));
    }
}

// q1: sum of x over set bits, with bit-test masks instead of conversions.
inline float dot_q1_impl(const uint8_t* rb, const float* x, float xsum, int g_pad) {
    const float d = half(rb), m = half(rb + 2);
    const uint8_t* q = rb + 4;
    static const uint32_t sh[32] = {1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
                                    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
                                    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
                                    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
    uint32x4_t bit[8];
    #pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) bit[k] = vld1q_u32(sh + 4 * k);
    float32x4_t acc[4];
    #pragma GCC unroll 8
    for (int k = 0; k < 4; ++k) acc[k] = vdupq_n_f32(0.0f);
    for (int c = 0; c < g_pad; c += 32, q += 4) {
        uint32_t bits;
        memcpy(&bits, q, 4);
        const uint32x4_t b = vdupq_n_u32(bits);
        #pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
            const uint32x4_t msk = vtstq_u32(b, bit[k]);
            acc[k & 3] = vaddq_f32(acc[k & 3], vreinterpretq_f32_u32(vandq_u32(msk, vreinterpretq_u32_f32(vld1q_f32(x + c + 4 * k)))));
        }
    }
    return d * hsum4(acc[0], acc[1], acc[2], acc[3]) + m * xsum;
}

// Ternary: byte j carries trits i = 0..4 of columns i*B + j; x is prepared as 5 planes of stride
// S = round8(B). Trit i: p_0 = byte, t_i = (3 p_i) >> 8, p_{i+1} = (3 p_i) & 0xFF (16-bit lanes).
inline uint8x8_t load8(const uint8_t* p, int n) {  // n bytes (8, or the even tail 2/4/6), rest zero; never reads past p + n
    if (n >= 8) return vld1_u8(p);
    uint64_t v = 0;
    memcpy(&v, p, (size_t)n);  // little-endian
    return vcreate_u8(v);
}

inline float dot_ternary_impl(const uint8_t* rb, const float* x, float xsum, int g_pad) {
    const float a = half(rb);
    const uint8_t* q = rb + 2;
    const int B = 2 * ((g_pad + 9) / 10), S = (B + 7) & ~7;
    const uint16x8_t ff = vdupq_n_u16(0xFF);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0;
    for (int j = 0; j < B; j += 8) {
        uint16x8_t p = vmovl_u8(load8(q + j, B - j));
        #pragma GCC unroll 8
        for (int i = 0; i < 5; ++i) {
            const uint16x8_t p3 = vmulq_n_u16(p, 3);
            const uint16x8_t t = vshrq_n_u16(p3, 8);
            p = vandq_u16(p3, ff);
            const float* xp = x + i * S + j;
            acc0 = vfmaq_f32(acc0, vcvtq_f32_u32(vmovl_u16(vget_low_u16(t))), vld1q_f32(xp));
            acc1 = vfmaq_f32(acc1, vcvtq_f32_u32(vmovl_high_u16(t)), vld1q_f32(xp + 4));
        }
    }
    return a * (vaddvq_f32(vaddq_f32(acc0, acc1)) - xsum);
}

inline void dequant_ternary_impl(const uint8_t* rb, int g_pad, float* out) {
    // Writes planes at out + i*B (+ up to 8 past each plane): callers give dequant_floats(g_pad).
    const float32x4_t a = vdupq_n_f32(half(rb)), one = vdupq_n_f32(1.0f);
    const uint8_t* q = rb + 2;
    const int B = 2 * ((g_pad + 9) / 10);
    const uint16x8_t ff = vdupq_n_u16(0xFF);
    #pragma GCC unroll 8
    for (int i = 0; i < 5; ++i)  // ascending, so a plane's spill past B is overwritten by the next
        for (int j = 0; j < B; j += 8) {
            uint16x8_t p = vmovl_u8(load8(q + j, B - j));
            uint16x8_t p3 = vmulq_n_u16(p, 3);
            #pragma GCC unroll 8
            for (int s = 0; s < i; ++s) {
                p = vandq_u16(p3, ff);
                p3 = vmulq_n_u16(p, 3);
            }
            const uint16x8_t t = vshrq_n_u16(p3, 8);
            float* o = out + i * B + j;
            vst1q_f32(o, vmulq_f32(a, vsubq_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(t))), one)));
            vst1q_f32(o + 4, vmulq_f32(a, vsubq_f32(vcvtq_f32_u32(vmovl_high_u16(t)), one)));
        }
}

inline float32x4_t h4(const uint8_t* p) { return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p))); }

// ------------------------------------------------------------------ int8 activations
// Codes are made int8 (q8: code - 128, restored with 128 * sum(xq) = 128 * XQ8::ds / d) so that one
// signed product serves every kind: |code x xq| <= 128 * 127 fits int16 (plain NEON) and SDOT takes
// int8 x int8.
// GCC 12 + binutils 2.40 reject "+dotprod" alone (the assembler wants an ARMv8.2 base for SDOT);
// any core with the extension is ARMv8.2 or later.
#if defined(__clang__)
#  define WQE_DOTPROD __attribute__((target("dotprod")))
#else
#  define WQE_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

// 4 int32 partial sums of c . x over 32 slots (c: two int8x16, x: 32 int8).
inline int32x4_t isum32_plain(int8x16_t c0, int8x16_t c1, const int8_t* xq) {
    const int8x16_t x0 = vld1q_s8(xq), x1 = vld1q_s8(xq + 16);
    int32x4_t a = vpaddlq_s16(vmull_s8(vget_low_s8(c0), vget_low_s8(x0)));
    a = vpadalq_s16(a, vmull_high_s8(c0, x0));
    a = vpadalq_s16(a, vmull_s8(vget_low_s8(c1), vget_low_s8(x1)));
    return vpadalq_s16(a, vmull_high_s8(c1, x1));
}
WQE_DOTPROD inline int32x4_t isum32_dot(int8x16_t c0, int8x16_t c1, const int8_t* xq) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), c0, vld1q_s8(xq)), c1, vld1q_s8(xq + 16));
}

template <bool Q8>
inline void signed_codes(const uint8x16_t cb[2], int8x16_t c[2]) {
    if (Q8) {
        c[0] = vreinterpretq_s8_u8(veorq_u8(cb[0], vdupq_n_u8(0x80)));
        c[1] = vreinterpretq_s8_u8(veorq_u8(cb[1], vdupq_n_u8(0x80)));
    } else {
        c[0] = vreinterpretq_s8_u8(cb[0]);
        c[1] = vreinterpretq_s8_u8(cb[1]);
    }
}

// The affine kernel body, once per build (ISUM = isum32_dot or isum32_plain); two accumulators.
#define WQE_DOT8_AFFINE(ISUM)                                                                          \
    const uint8_t* q = rb + 4;                                                                         \
    const int nb = g_pad / 32;                                                                         \
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0;                                                 \
    float corr = 0.0f;                                                                                 \
    for (int b = 0; b < nb; ++b, q += SUB) {                                                           \
        uint8x16_t cb[2];                                                                              \
        int8x16_t c[2];                                                                                \
        CODES(q, cb);                                                                                  \
        signed_codes<Q8>(cb, c);                                                                       \
        const float32x4_t v = vcvtq_f32_s32(ISUM(c[0], c[1], x[b].q));                                 \
        if (b & 1) acc1 = vfmaq_n_f32(acc1, v, x[b].d);                                                \
        else acc0 = vfmaq_n_f32(acc0, v, x[b].d);                                                      \
        if (Q8) corr += x[b].ds;                                                                       \
    }                                                                                                  \
    return half(rb) * (vaddvq_f32(vaddq_f32(acc0, acc1)) + 128.0f * corr) + half(rb + 2) * xsum;

template <codes_fn CODES, int SUB, bool Q8>
WQE_DOTPROD inline float dot8_affine_dot(const uint8_t* rb, const XQ8* x, float xsum, int g_pad) {
    WQE_DOT8_AFFINE(isum32_dot)
}
template <codes_fn CODES, int SUB, bool Q8>
inline float dot8_affine_plain(const uint8_t* rb, const XQ8* x, float xsum, int g_pad) {
    WQE_DOT8_AFFINE(isum32_plain)
}
#undef WQE_DOT8_AFFINE

// Four rows at once (rows rb + k * stride): the activation block is loaded once for four rows (the
// compiler merges ISUM's identical loads), four independent accumulators.
#define WQE_DOT8_AFFINE4(ISUM)                                                                         \
    const int nb = g_pad / 32;                                                                         \
    float32x4_t a[4];                                                                                  \
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k) a[k] = vdupq_n_f32(0.0f);                      \
    float corr = 0.0f;                                                                                 \
    for (int b = 0; b < nb; ++b) {                                                                     \
        const float db = x[b].d;                                                                       \
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k) {                                          \
            uint8x16_t cb[2];                                                                          \
            int8x16_t c[2];                                                                            \
            CODES(rb + k * stride + 4 + b * SUB, cb);                                                  \
            signed_codes<Q8>(cb, c);                                                                   \
            a[k] = vfmaq_n_f32(a[k], vcvtq_f32_s32(ISUM(c[0], c[1], x[b].q)), db);                     \
        }                                                                                              \
        if (Q8) corr += x[b].ds;                                                                       \
    }                                                                                                  \
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k) {                                              \
        const uint8_t* h = rb + k * stride;                                                            \
        out[k] = half(h) * (vaddvq_f32(a[k]) + 128.0f * corr) + half(h + 2) * xsum;                    \
    }

template <codes_fn CODES, int SUB, bool Q8>
WQE_DOTPROD inline void dot8_affine4_dot(const uint8_t* rb, size_t stride, const XQ8* x, float xsum, int g_pad, float* out) {
    WQE_DOT8_AFFINE4(isum32_dot)
}
template <codes_fn CODES, int SUB, bool Q8>
inline void dot8_affine4_plain(const uint8_t* rb, size_t stride, const XQ8* x, float xsum, int g_pad, float* out) {
    WQE_DOT8_AFFINE4(isum32_plain)
}
#undef WQE_DOT8_AFFINE4

// Integer prefill (linear.cpp rows4_gemm_fn): 4 rows (rb + k * stride) x NT tokens (token u's blocks at xq + u * xs, its
// sum at xsum[u * ss]); out[u * ld + k] = dot8_affine4's result for row k and token u, bit for bit (the same exact
// int32 block sums, the same float operations in the same order), each block's codes decoded once for NT tokens.
#define WQE_GEMM4(ISUM)                                                                                \
    const int nb = g_pad / 32;                                                                         \
    float32x4_t a[NT][4];                                                                              \
    float corr[NT];                                                                                    \
    for (int u = 0; u < NT; ++u) {                                                                     \
        corr[u] = 0.0f;                                                                                \
        for (int k = 0; k < 4; ++k) a[u][k] = vdupq_n_f32(0.0f);                                       \
    }                                                                                                  \
    for (int b = 0; b < nb; ++b) {                                                                     \
        int8x16_t c[4][2];                                                                             \
        for (int k = 0; k < 4; ++k) {                                                                  \
            uint8x16_t cb[2];                                                                          \
            CODES(rb + k * stride + 4 + b * SUB, cb);                                                  \
            signed_codes<Q8>(cb, c[k]);                                                                \
        }                                                                                              \
        for (int u = 0; u < NT; ++u) {                                                                 \
            const XQ8& x = xq[u * xs + b];                                                             \
            for (int k = 0; k < 4; ++k) a[u][k] = vfmaq_n_f32(a[u][k], vcvtq_f32_s32(ISUM(c[k][0], c[k][1], x.q)), x.d); \
            if (Q8) corr[u] += x.ds;                                                                   \
        }                                                                                              \
    }                                                                                                  \
    for (int u = 0; u < NT; ++u)                                                                       \
        for (int k = 0; k < 4; ++k) {                                                                  \
            const uint8_t* h = rb + k * stride;                                                        \
            out[u * ld + k] = half(h) * (vaddvq_f32(a[u][k]) + 128.0f * corr[u]) + half(h + 2) * xsum[u * ss]; \
        }

template <codes_fn CODES, int SUB, bool Q8, int NT>
WQE_DOTPROD inline void gemm4_dot(const uint8_t* rb, size_t stride, const XQ8* xq, size_t xs, const float* xsum, size_t ss,
                                  int g_pad, float* out, size_t ld) {
    WQE_GEMM4(isum32_dot)
}
template <codes_fn CODES, int SUB, bool Q8, int NT>
inline void gemm4_plain(const uint8_t* rb, size_t stride, const XQ8* xq, size_t xs, const float* xsum, size_t ss,
                        int g_pad, float* out, size_t ld) {
    WQE_GEMM4(isum32_plain)
}
#undef WQE_GEMM4

// nt tokens, 4 at a time (then 3, 2 or 1), through the SDOT or the plain build.
template <codes_fn CODES, int SUB, bool Q8>
inline void gemm4(const uint8_t* rb, size_t stride, const XQ8* xq, size_t xs, const float* xsum, size_t ss, int nt,
                  int g_pad, float* out, size_t ld) {
    const bool dot = neon_dotprod();
    for (; nt > 0; nt -= 4, xq += 4 * xs, xsum += 4 * ss, out += 4 * ld) {
        switch (nt >= 4 ? 4 : nt) {
#define WQE_GEMM4_NT(N)                                                                                 \
    case N:                                                                                             \
        if (dot) gemm4_dot<CODES, SUB, Q8, N>(rb, stride, xq, xs, xsum, ss, g_pad, out, ld);            \
        else gemm4_plain<CODES, SUB, Q8, N>(rb, stride, xq, xs, xsum, ss, g_pad, out, ld);              \
        break;
            WQE_GEMM4_NT(4)
            WQE_GEMM4_NT(3)
            WQE_GEMM4_NT(2)
            WQE_GEMM4_NT(1)
#undef WQE_GEMM4_NT
        }
    }
}

// Ternary: 16 code bytes per step (tail through a zeroed buffer: nothing past the row-block is
// read), trits in 8-bit lanes: t = (3p) >> 8 via a 16-bit multiply, p = 3p mod 256.
inline void trits16(uint8x16_t& p, int8x16_t& t) {
    const uint16x8_t lo = vmull_u8(vget_low_u8(p), vdup_n_u8(3)), hi = vmull_high_u8(p, vdupq_n_u8(3));
    t = vreinterpretq_s8_u8(vcombine_u8(vshrn_n_u16(lo, 8), vshrn_n_u16(hi, 8)));
    p = vcombine_u8(vmovn_u16(lo), vmovn_u16(hi));
}

#define WQE_DOT8_TERNARY(ISUM)                                                                         \
    const uint8_t* q = rb + 2;                                                                         \
    const int B = 2 * ((g_pad + 9) / 10), nb = (B + 31) / 32;                                         \
    float32x4_t acc = vdupq_n_f32(0.0f);                                                               \
    for (int b = 0; b < nb; ++b) {                                                                     \
        uint8_t tmp[32] = {0};                                                                         \
        const int n = B - 32 * b;                                                                      \
        memcpy(tmp, q + 32 * b, (size_t)(n < 32 ? n : 32));                                            \
        uint8x16_t p0 = vld1q_u8(tmp), p1 = vld1q_u8(tmp + 16);                                        \
        for (int i = 0; i < 5; ++i) {                                                                  \
            int8x16_t t0, t1;                                                                          \
            trits16(p0, t0);                                                                           \
            trits16(p1, t1);                                                                           \
            const XQ8& xb = x[i * nb + b];                                                             \
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(ISUM(t0, t1, xb.q)), xb.d);                           \
        }                                                                                              \
    }                                                                                                  \
    return half(rb) * (vaddvq_f32(acc) - xsum);

WQE_DOTPROD inline float dot8_ternary_dot(const uint8_t* rb, const XQ8* x, float xsum, int g_pad) {
    WQE_DOT8_TERNARY(isum32_dot)
}
inline float dot8_ternary_plain(const uint8_t* rb, const XQ8* x, float xsum, int g_pad) {
    WQE_DOT8_TERNARY(isum32_plain)
}
#undef WQE_DOT8_TERNARY

}  // namespace

float dot_fp16(const uint8_t* rb, const float* x, float, int g_pad) {
    float32x4_t acc[8];
    #pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) acc[k] = vdupq_n_f32(0.0f);
    for (int c = 0; c < g_pad; c += 32)
        #pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) acc[k] = vfmaq_f32(acc[k], h4(rb + 2 * (c + 4 * k)), vld1q_f32(x + c + 4 * k));
    return hsum4(vaddq_f32(acc[0], acc[4]), vaddq_f32(acc[1], acc[5]), vaddq_f32(acc[2], acc[6]), vaddq_f32(acc[3], acc[7]));
}
float dot_q8(const uint8_t* rb, const float* x, float s, int g) { return dot_affine<codes_q8, 32>(rb, x, s, g); }
float dot_q4(const uint8_t* rb, const float* x, float s, int g) { return dot_affine<codes_q4, 16>(rb, x, s, g); }
float dot_q3(const uint8_t* rb, const float* x, float s, int g) { return dot_affine<codes_q3, 12>(rb, x, s, g); }
float dot_q2(const uint8_t* rb, const float* x, float s, int g) { return dot_affine<codes_q2, 8>(rb, x, s, g); }
float dot_q1(const uint8_t* rb, const float* x, float s, int g) { return dot_q1_impl(rb, x, s, g); }
float dot_ternary(const uint8_t* rb, const float* x, float s, int g) { return dot_ternary_impl(rb, x, s, g); }

#define WQE_ROWS(name)                                                                                         \
    void dot_rows_##name(const uint8_t* rb, size_t stride, int n, const float* x, float s, int g, float* out) { \
        for (int r = 0; r < n; ++r) out[r] = dot_##name(rb + r * stride, x, s, g);                            \
    }
WQE_ROWS(fp16)
WQE_ROWS(q8)
WQE_ROWS(q4)
WQE_ROWS(q3)
WQE_ROWS(q2)
WQE_ROWS(q1)
WQE_ROWS(ternary)
#undef WQE_ROWS

// Int8 activations: the build is chosen per call (one predictable branch per row tile).
#define WQE_DOT8(name, CODES, SUB, Q8)                                                                   \
    float dot8_##name(const uint8_t* rb, const XQ8* x, float s, int g) {                                \
        return neon_dotprod() ? dot8_affine_dot<CODES, SUB, Q8>(rb, x, s, g)                            \
                              : dot8_affine_plain<CODES, SUB, Q8>(rb, x, s, g);                         \
    }                                                                                                   \
    void dot8_rows_##name(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) { \
        int r = 0;                                                                                      \
        if (neon_dotprod()) {                                                                           \
            for (; r + 4 <= n; r += 4) dot8_affine4_dot<CODES, SUB, Q8>(rb + r * st, st, x, s, g, out + r); \
            for (; r < n; ++r) out[r] = dot8_affine_dot<CODES, SUB, Q8>(rb + r * st, x, s, g);          \
        } else {                                                                                        \
            for (; r + 4 <= n; r += 4) dot8_affine4_plain<CODES, SUB, Q8>(rb + r * st, st, x, s, g, out + r); \
            for (; r < n; ++r) out[r] = dot8_affine_plain<CODES, SUB, Q8>(rb + r * st, x, s, g);        \
        }                                                                                               \
    }
// the affine kinds: name, code reader, code bytes per 32 columns, whether codes need the 0x80 flip to int8 (q8)
#define WQE_AFFINE_KINDS(X) X(q8, codes_q8, 32, true) X(q4, codes_q4, 16, false) X(q3, codes_q3, 12, false) \
    X(q2, codes_q2, 8, false) X(q1, codes_q1, 4, false)
WQE_AFFINE_KINDS(WQE_DOT8)
#undef WQE_DOT8
#define WQE_GEMM(name, CODES, SUB, Q8)                                                                   \
    void gemm4_##name(const uint8_t* rb, size_t st, const XQ8* xq, size_t xs, const float* xsum, size_t ss, int nt, \
                      int g, float* out, size_t ld) {                                                   \
        gemm4<CODES, SUB, Q8>(rb, st, xq, xs, xsum, ss, nt, g, out, ld);                                \
    }
WQE_AFFINE_KINDS(WQE_GEMM)
#undef WQE_GEMM
#undef WQE_AFFINE_KINDS
float dot8_ternary(const uint8_t* rb, const XQ8* x, float s, int g) {
    return neon_dotprod() ? dot8_ternary_dot(rb, x, s, g) : dot8_ternary_plain(rb, x, s, g);
}
void dot8_rows_ternary(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) {
    for (int r = 0; r < n; ++r) out[r] = dot8_ternary(rb + r * st, x, s, g);
}

void dequant_fp16(const uint8_t* rb, int g_pad, float* out) {
    for (int c = 0; c < g_pad; c += 4) vst1q_f32(out + c, h4(rb + 2 * c));
}
void dequant_q8(const uint8_t* rb, int g, float* out) { dequant_affine<codes_q8, 32>(rb, g, out); }
void dequant_q4(const uint8_t* rb, int g, float* out) { dequant_affine<codes_q4, 16>(rb, g, out); }
void dequant_q3(const uint8_t* rb, int g, float* out) { dequant_affine<codes_q3, 12>(rb, g, out); }
void dequant_q2(const uint8_t* rb, int g, float* out) { dequant_affine<codes_q2, 8>(rb, g, out); }
void dequant_q1(const uint8_t* rb, int g, float* out) { dequant_affine<codes_q1, 4>(rb, g, out); }
void dequant_ternary(const uint8_t* rb, int g, float* out) { dequant_ternary_impl(rb, g, out); }

// ------------------------------------------------------------------ dense primitives
float vdot_f32(const float* a, const float* b, int n) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        acc2 = vfmaq_f32(acc2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        acc3 = vfmaq_f32(acc3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = hsum4(acc0, acc1, acc2, acc3);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

float vdot_f16(const uint8_t* h, const float* x, int n) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = vfmaq_f32(acc0, h4(h + 2 * i), vld1q_f32(x + i));
        acc1 = vfmaq_f32(acc1, h4(h + 2 * i + 8), vld1q_f32(x + i + 4));
        acc2 = vfmaq_f32(acc2, h4(h + 2 * i + 16), vld1q_f32(x + i + 8));
        acc3 = vfmaq_f32(acc3, h4(h + 2 * i + 24), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, h4(h + 2 * i), vld1q_f32(x + i));
    float s = hsum4(acc0, acc1, acc2, acc3);
    for (; i < n; ++i) s += half(h + 2 * i) * x[i];
    return s;
}

void vdot_f16_rows(const uint8_t* h, size_t stride, int nr, const float* x, int n, float* out) {
    for (int r = 0; r < nr; ++r) out[r] = vdot_f16(h + r * stride, x, n);
}

void vaxpy(float a, const float* x, float* y, int n) {
    const float32x4_t va = vdupq_n_f32(a);
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, vld1q_f32(x + i)));
    for (; i < n; ++i) y[i] += a * x[i];
}

void vf16_to_f32(const uint8_t* h, float* out, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, h4(h + 2 * i));
    for (; i < n; ++i) out[i] = half(h + 2 * i);
}

// vcvt_f16_f32 rounds as the FPCR says: to nearest even by default, as fp32_to_fp16.
void vf32_to_f16(const float* x, uint8_t* h, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16((uint16_t*)(h + 2 * i), vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; ++i) {
        const uint16_t v = vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(x[i]))), 0);
        memcpy(h + 2 * i, &v, 2);
    }
}

// 4 rows x up to 3 tokens per step, 12 accumulators (K % 8 == 0, so K % 4 == 0).
void vgemm4(const float* W, int ldw, const float* X, int ldx, int nt, int K, float* Y, int ldy, int nr) {
    const float* w[4] = {W, W + ldw, W + 2 * (size_t)ldw, W + 3 * (size_t)ldw};
    int t = 0;
    for (; t + 3 <= nt; t += 3) {
        const float* x0 = X + (size_t)t * ldx;
        const float* x1 = x0 + ldx;
        const float* x2 = x1 + ldx;
        float32x4_t a[4][3];
        #pragma GCC unroll 8
        for (int i = 0; i < 4; ++i)
            #pragma GCC unroll 8
            for (int j = 0; j < 3; ++j) a[i][j] = vdupq_n_f32(0.0f);
        for (int k = 0; k < K; k += 4) {
            const float32x4_t v0 = vld1q_f32(x0 + k), v1 = vld1q_f32(x1 + k), v2 = vld1q_f32(x2 + k);
            #pragma GCC unroll 8
            for (int i = 0; i < 4; ++i) {
                const float32x4_t wv = vld1q_f32(w[i] + k);
                a[i][0] = vfmaq_f32(a[i][0], wv, v0);
                a[i][1] = vfmaq_f32(a[i][1], wv, v1);
                a[i][2] = vfmaq_f32(a[i][2], wv, v2);
            }
        }
        #pragma GCC unroll 8
        for (int j = 0; j < 3; ++j)
            for (int i = 0; i < nr; ++i) Y[(size_t)(t + j) * ldy + i] = vaddvq_f32(a[i][j]);
    }
    for (; t < nt; ++t) {
        const float* x0 = X + (size_t)t * ldx;
        float32x4_t a[4];
        #pragma GCC unroll 8
        for (int i = 0; i < 4; ++i) a[i] = vdupq_n_f32(0.0f);
        for (int k = 0; k < K; k += 4) {
            const float32x4_t v = vld1q_f32(x0 + k);
            #pragma GCC unroll 8
            for (int i = 0; i < 4; ++i) a[i] = vfmaq_f32(a[i], vld1q_f32(w[i] + k), v);
        }
        for (int i = 0; i < nr; ++i) Y[(size_t)t * ldy + i] = vaddvq_f32(a[i]);
    }
}

// VecOps::fake_quant, bit-identical to the scalar sfake_quant (see the AVX2 one): vminq / vmaxq would return a NaN
// value, so each comparison is std::min / std::max's own, selected with vbslq; vdivq is IEEE division, vrndnq rounds to
// nearest even as nearbyint does in the default mode.
float fake_quant(float* x, int n, int bits) {
    const float hc = (float)((1 << bits) - 1);
    const int n4 = n & ~3;
    float lo = x[0], hi = x[0];
    if (n4) {
        float32x4_t vlo = vdupq_n_f32(x[0]), vhi = vlo;
        for (int i = 0; i < n4; i += 4) {
            const float32x4_t v = vld1q_f32(x + i);
            vlo = vbslq_f32(vcltq_f32(v, vlo), v, vlo);
            vhi = vbslq_f32(vcltq_f32(vhi, v), v, vhi);
        }
        float l[4], h[4];
        vst1q_f32(l, vlo);
        vst1q_f32(h, vhi);
        for (int k = 0; k < 4; ++k) {
            lo = l[k] < lo ? l[k] : lo;
            hi = hi < h[k] ? h[k] : hi;
        }
    }
    for (int i = n4; i < n; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = hi < x[i] ? x[i] : hi;
    }
    const float v = (hi - lo) / hc;
    const float s = v < 1e-8f ? 1e-8f : v;
    const float z = vgetq_lane_f32(vrndnq_f32(vdupq_n_f32(-lo / s)), 0);
    const float32x4_t vs = vdupq_n_f32(s), vz = vdupq_n_f32(z), vhc = vdupq_n_f32(hc), zero = vdupq_n_f32(0.0f);
    for (int i = 0; i < n4; i += 4) {
        const float32x4_t t = vaddq_f32(vrndnq_f32(vdivq_f32(vld1q_f32(x + i), vs)), vz);
        const float32x4_t m = vbslq_f32(vcltq_f32(t, zero), zero, t);
        const float32x4_t q = vbslq_f32(vcltq_f32(vhc, m), vhc, m);
        vst1q_f32(x + i, vmulq_f32(vs, vsubq_f32(q, vz)));
    }
    for (int i = n4; i < n; ++i) {
        const float t = vgetq_lane_f32(vrndnq_f32(vdupq_n_f32(x[i] / s)), 0) + z, m = t < 0.0f ? 0.0f : t, q = hc < m ? hc : m;
        x[i] = s * (q - z);
    }
    return s;
}

// prepare_x8's plain layout (VecOps::quant_x8), bit-identical to the scalar squant_x8 (see the AVX2 one):
// vmaxnmq (IEEE maxNum) keeps amax and gives -127 where a value is NaN, as std::max does (vmaxq would return the
// NaN); the 1.5 * 2^23 rounding add and subtract without fusing; the double sum in lanes (0,1) (2,3) (4,5) (6,7)
// reduced as sum_lanes8. g % 32 == 0 (blocks.cpp's quant_x8_any pads a ragged chunk with zeros first).
float quant_x8(const float* x, int g, XQ8* xq, float step) {
    const float32x4_t magic = vdupq_n_f32(12582912.0f), lo = vdupq_n_f32(-127.0f), hi = vdupq_n_f32(127.0f);
    float64x2_t s[4] = {vdupq_n_f64(0.0), vdupq_n_f64(0.0), vdupq_n_f64(0.0), vdupq_n_f64(0.0)};
    for (int b = 0; b < g / 32; ++b) {
        const float* src = x + 32 * b;
        float32x4_t v[8];
        float32x4_t amax = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; ++k) {
            v[k] = vld1q_f32(src + 4 * k);
            amax = vmaxnmq_f32(amax, vabsq_f32(v[k]));
            s[k % 2 * 2] = vaddq_f64(s[k % 2 * 2], vcvt_f64_f32(vget_low_f32(v[k])));
            s[k % 2 * 2 + 1] = vaddq_f64(s[k % 2 * 2 + 1], vcvt_high_f64_f32(v[k]));
        }
        const float am = vmaxnmvq_f32(amax);
        const float d = step > 0.0f ? step : am / 127.0f;
        const float id = step > 0.0f ? 1.0f / step : am > 0.0f ? 127.0f / am : 0.0f;
        const float32x4_t vid = vdupq_n_f32(id);
        int32x4_t sum = vdupq_n_s32(0);
        int16x4_t h[8];
        for (int k = 0; k < 8; ++k) {
            float32x4_t r = vsubq_f32(vaddq_f32(vmulq_f32(v[k], vid), magic), magic);
            r = vminnmq_f32(vmaxnmq_f32(r, lo), hi);
            const int32x4_t qi = vcvtq_s32_f32(r);
            sum = vaddq_s32(sum, qi);
            h[k] = vmovn_s32(qi);
        }
        for (int k = 0; k < 4; ++k) vst1_s8(xq[b].q + 8 * k, vmovn_s16(vcombine_s16(h[2 * k], h[2 * k + 1])));
        xq[b].d = d;
        xq[b].ds = d * (float)vaddvq_s32(sum);
    }
    // s[0] = (l0, l1), s[1] = (l2, l3), s[2] = (l4, l5), s[3] = (l6, l7)
    const float64x2_t a = vaddq_f64(s[0], s[2]), c = vaddq_f64(s[1], s[3]);  // (l0 + l4, l1 + l5), (l2 + l6, l3 + l7)
    const float64x2_t t = vaddq_f64(a, c);  // ((l0 + l4) + (l2 + l6), (l1 + l5) + (l3 + l7))
    return (float)(vgetq_lane_f64(t, 0) + vgetq_lane_f64(t, 1));
}

// exp(x) for 4 floats, the AVX2 set's exp8 (Cephes' expf) with NEON operations: vmaxq / vminq propagate NaN.
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    const float32x4_t y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

void silu_mul(float* g, const float* u, int n) {  // n % 8 == 0 (blocks.cpp's silu_mul_any runs the tail)
    const float32x4_t one = vdupq_n_f32(1.0f);
    for (int i = 0; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(g + i);
        const float32x4_t s = vdivq_f32(v, vaddq_f32(one, exp4(vnegq_f32(v))));
        vst1q_f32(g + i, vmulq_f32(s, vld1q_f32(u + i)));
    }
}

// ------------------------------------------------------------------ attention (VecOps::att_scores, exp_sum, att_values)
// K and V rows are float32 or fp16 (the 16-bit cache read as stored); each element's float is exact either way, so both
// give the same bits for the same values.
static inline float32x4_t ld4(const float* p) { return vld1q_f32(p); }
static inline float32x4_t ld4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static inline float el(const float* p) { return *p; }
static inline float el(const uint16_t* p) { return half((const uint8_t*)p); }

// A lone head (an odd nq's last, or MHA's only one): eight keys per pass, each key's arithmetic that of the pairs below,
// so its scores are the same bits as when it is paired (and no duplicate head's multiply-adds).
template <typename T>
static void scores_one(const float* q0, int hd, const T* K, size_t ks, int n, float scale, float* S) {
    const int h4 = hd & ~3;
    for (int s = 0; s < n; s += 8) {
        const T* kr[8];
        for (int u = 0; u < 8; ++u) kr[u] = K + (size_t)std::min(s + u, n - 1) * ks;
        float32x4_t a[8];
        for (int u = 0; u < 8; ++u) a[u] = vdupq_n_f32(0.0f);
        for (int d = 0; d < h4; d += 4) {
            const float32x4_t x0 = vld1q_f32(q0 + d);
            for (int u = 0; u < 8; ++u) a[u] = vfmaq_f32(a[u], x0, ld4(kr[u] + d));
        }
        for (int u = 0; u < 8 && s + u < n; ++u) {
            float x = vaddvq_f32(a[u]);
            for (int d = h4; d < hd; ++d) x += q0[d] * el(kr[u] + d);
            S[s + u] = scale * x;
        }
    }
}

// The AVX2 set's structure with 4 lanes: four keys x two heads per pass, a 4-lane accumulator per (head, key) over the
// columns in steps of 4, then each one's lane sum and the columns past the last multiple of 4 (a lone head: scores_one).
template <typename T>
static void scores(const float* q, int nq, int hd, const T* K, size_t ks, int n, float scale, float* S, size_t lds) {
    const int h4 = hd & ~3;
    for (int j = 0; j < nq; j += 2) {
        const float* q0 = q + (size_t)j * hd;
        if (j + 1 == nq) {
            scores_one(q0, hd, K, ks, n, scale, S + (size_t)j * lds);
            break;
        }
        const float* q1 = q0 + hd;
        for (int s = 0; s < n; s += 4) {
            const T* kr[4];
            for (int u = 0; u < 4; ++u) kr[u] = K + (size_t)std::min(s + u, n - 1) * ks;
            float32x4_t a[4], b[4];
            for (int u = 0; u < 4; ++u) a[u] = b[u] = vdupq_n_f32(0.0f);
            for (int d = 0; d < h4; d += 4) {
                const float32x4_t x0 = vld1q_f32(q0 + d), x1 = vld1q_f32(q1 + d);
                for (int u = 0; u < 4; ++u) {
                    const float32x4_t v = ld4(kr[u] + d);
                    a[u] = vfmaq_f32(a[u], x0, v);
                    b[u] = vfmaq_f32(b[u], x1, v);
                }
            }
            for (int u = 0; u < 4 && s + u < n; ++u) {
                float x = vaddvq_f32(a[u]), y = vaddvq_f32(b[u]);
                for (int d = h4; d < hd; ++d) {
                    x += q0[d] * el(kr[u] + d);
                    y += q1[d] * el(kr[u] + d);
                }
                S[(size_t)j * lds + s + u] = scale * x;
                S[(size_t)(j + 1) * lds + s + u] = scale * y;
            }
        }
    }
}
void att_scores(const float* q, int nq, int hd, const float* K, size_t ks, int n, float scale, float* S, size_t lds) {
    scores(q, nq, hd, K, ks, n, scale, S, lds);
}
void att_scores_h(const float* q, int nq, int hd, const uint16_t* K, size_t ks, int n, float scale, float* S, size_t lds) {
    scores(q, nq, hd, K, ks, n, scale, S, lds);
}

float exp_sum(float* e, int n, float mx) {  // n % 8 == 0 (blocks.cpp's exp_sum_any runs the tail)
    const float32x4_t m = vdupq_n_f32(mx);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int s = 0; s + 4 <= n; s += 4) {
        const float32x4_t v = exp4(vsubq_f32(vld1q_f32(e + s), m));
        vst1q_f32(e + s, v);
        acc = vaddq_f32(acc, v);
    }
    return vaddvq_f32(acc);
}

// NH heads' outputs over 16 (then 4) columns at a time in registers while every position's row streams past.
template <int NH, typename T>
static void values_heads(const float* const* p, int hd, const T* V, size_t vs, int n, float* const* o) {
    int d = 0;
    for (; d + 16 <= hd; d += 16) {
        float32x4_t acc[NH][4];
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = vld1q_f32(o[h] + d + 4 * c);
        for (int s = 0; s < n; ++s) {
            const T* v = V + (size_t)s * vs + d;
            const float32x4_t v0 = ld4(v), v1 = ld4(v + 4), v2 = ld4(v + 8), v3 = ld4(v + 12);
            for (int h = 0; h < NH; ++h) {
                const float32x4_t ph = vdupq_n_f32(p[h][s]);
                acc[h][0] = vfmaq_f32(acc[h][0], ph, v0);
                acc[h][1] = vfmaq_f32(acc[h][1], ph, v1);
                acc[h][2] = vfmaq_f32(acc[h][2], ph, v2);
                acc[h][3] = vfmaq_f32(acc[h][3], ph, v3);
            }
        }
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) vst1q_f32(o[h] + d + 4 * c, acc[h][c]);
    }
    for (; d + 4 <= hd; d += 4) {
        float32x4_t acc[NH];
        for (int h = 0; h < NH; ++h) acc[h] = vld1q_f32(o[h] + d);
        for (int s = 0; s < n; ++s) {
            const float32x4_t v = ld4(V + (size_t)s * vs + d);
            for (int h = 0; h < NH; ++h) acc[h] = vfmaq_f32(acc[h], vdupq_n_f32(p[h][s]), v);
        }
        for (int h = 0; h < NH; ++h) vst1q_f32(o[h] + d, acc[h]);
    }
    for (; d < hd; ++d)
        for (int h = 0; h < NH; ++h) {
            float a = o[h][d];
            for (int s = 0; s < n; ++s) a += p[h][s] * el(V + (size_t)s * vs + d);
            o[h][d] = a;
        }
}

template <typename T>
static void values(const float* P, size_t ldp, int nq, int hd, const T* V, size_t vs, int n, float* O) {  // nq 1 or 2
    const float* p[2] = {P, P + ldp};
    float* o[2] = {O, O + hd};
    if (nq == 2) values_heads<2>(p, hd, V, vs, n, o);
    else values_heads<1>(p, hd, V, vs, n, o);
}
void att_values(const float* P, size_t ldp, int nq, int hd, const float* V, size_t vs, int n, float* O) {
    values(P, ldp, nq, hd, V, vs, n, O);
}
void att_values_h(const float* P, size_t ldp, int nq, int hd, const uint16_t* V, size_t vs, int n, float* O) {
    values(P, ldp, nq, hd, V, vs, n, O);
}

// The quantized KV cache's rows read as stored (kvcache.h; the AVX2 set's att_scores_kv says why): each value d * c + m
// formed in registers by kv_rows_values' NEON conversion (one multiply-add per 4 values), then the float kernels'
// accumulators, order and lane sums above, so the bits of converting the rows first.
static inline void kv_scale_min(const uint8_t* p, float32x4_t* d, float32x4_t* m) {  // kvcache.cpp's fp16 pair
    uint32_t v;
    memcpy(&v, p, 4);
    const float32x4_t dm = vcvt_f32_f16(vreinterpret_f16_u16(vcreate_u16((uint64_t)v)));
    *d = vdupq_laneq_f32(dm, 0);
    *m = vdupq_laneq_f32(dm, 1);
}
static inline void kv_deq8(uint16x8_t c, float32x4_t d, float32x4_t m, float32x4_t* w) {  // kvcache.cpp's deq8
    w[0] = vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_low_u16(c))), d);
    w[1] = vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_high_u16(c))), d);
}
// 8 columns [8 j, 8 j + 8) of a group (codes c after its scale and min) as two vectors of 4.
template <int BITS>
static inline void kv_values8(const uint8_t* c, int j, float32x4_t d, float32x4_t m, float32x4_t* w) {
    if (BITS == 8) {
        kv_deq8(vmovl_u8(vld1_u8(c + 8 * j)), d, m, w);
    } else {  // 16 codes in 8 bytes: the low nibbles are columns 0-7, the high ones 8-15
        const uint8x8_t b = vld1_u8(c);
        kv_deq8(vmovl_u8(j == 0 ? vand_u8(b, vdup_n_u8(0x0F)) : vshr_n_u8(b, 4)), d, m, w);
    }
}
template <int BITS>
struct KvGroup {
    static constexpr int G = kv_group(BITS), BYTES = kv_group_bytes(G, BITS);
};
// NK keys (4 for a pair of heads, 8 for a lone one) x NH heads: 4-lane accumulators over the columns in steps of 4,
// then each one's lane sum and the scale, as scores / scores_one do per key (hd a multiple of the group: no tail).
template <int BITS, int NH, int NK>
static void kv_scores_heads(const float* const* qh, int hd, const uint8_t* K, size_t rb, int n, float scale, float* const* S) {
    using Grp = KvGroup<BITS>;
    for (int s = 0; s < n; s += NK) {
        const uint8_t* kr[NK];
        for (int u = 0; u < NK; ++u) kr[u] = K + (size_t)std::min(s + u, n - 1) * rb;
        float32x4_t a[NH][NK];
        for (int h = 0; h < NH; ++h)
            for (int u = 0; u < NK; ++u) a[h][u] = vdupq_n_f32(0.0f);
        for (int g0 = 0, gb = 0; g0 < hd; g0 += Grp::G, gb += Grp::BYTES) {
            float32x4_t d[NK], m[NK];
            for (int u = 0; u < NK; ++u) kv_scale_min(kr[u] + gb, &d[u], &m[u]);
            for (int j = 0; j < Grp::G / 8; ++j) {
                float32x4_t x[NH][2];
                for (int h = 0; h < NH; ++h) {
                    x[h][0] = vld1q_f32(qh[h] + g0 + 8 * j);
                    x[h][1] = vld1q_f32(qh[h] + g0 + 8 * j + 4);
                }
                for (int u = 0; u < NK; ++u) {
                    float32x4_t w[2];
                    kv_values8<BITS>(kr[u] + gb + 4, j, d[u], m[u], w);
                    for (int h = 0; h < NH; ++h) {
                        a[h][u] = vfmaq_f32(a[h][u], x[h][0], w[0]);
                        a[h][u] = vfmaq_f32(a[h][u], x[h][1], w[1]);
                    }
                }
            }
        }
        for (int h = 0; h < NH; ++h)
            for (int u = 0; u < NK && s + u < n; ++u) S[h][s + u] = scale * vaddvq_f32(a[h][u]);
    }
}
// NQ heads (1-4), the same FMA per element and position as values_heads. A group's columns CH vectors at a time in
// registers: the whole group for one or two heads, four vectors a pass for three or four (whose accumulators would not
// fit the registers otherwise); each value formed once per pass for all NQ heads.
template <int BITS, int NQ>
static void kv_values(const float* P, size_t ldp, int hd, const uint8_t* V, size_t rb, int n, float* O) {
    using Grp = KvGroup<BITS>;
    constexpr int NV = Grp::G / 4, CH = NQ <= 2 || NV < 4 ? NV : 4;
    const float* p[4] = {P, P + ldp, P + 2 * ldp, P + 3 * ldp};
    float* o[4] = {O, O + hd, O + 2 * hd, O + 3 * hd};
    for (int d0 = 0, gb = 0; d0 < hd; d0 += Grp::G, gb += Grp::BYTES)
        for (int c0 = 0; c0 < NV; c0 += CH) {
            float32x4_t acc[NQ][CH];
            for (int h = 0; h < NQ; ++h)
                for (int c = 0; c < CH; ++c) acc[h][c] = vld1q_f32(o[h] + d0 + 4 * (c0 + c));
            for (int s = 0; s < n; ++s) {
                const uint8_t* r = V + (size_t)s * rb + gb;
                float32x4_t d, m, w[CH];
                kv_scale_min(r, &d, &m);
                for (int j = 0; j < CH / 2; ++j) kv_values8<BITS>(r + 4, c0 / 2 + j, d, m, w + 2 * j);
                for (int h = 0; h < NQ; ++h) {
                    const float32x4_t ph = vdupq_n_f32(p[h][s]);
                    for (int c = 0; c < CH; ++c) acc[h][c] = vfmaq_f32(acc[h][c], ph, w[c]);
                }
            }
            for (int h = 0; h < NQ; ++h)
                for (int c = 0; c < CH; ++c) vst1q_f32(o[h] + d0 + 4 * (c0 + c), acc[h][c]);
        }
}
#include "kernels_kv.inc"  // att_scores_kv / att_values_kv

}  // namespace neon
}  // namespace wqe

#endif
