// AVX2 + FMA + F16C kernels. Every function defined in this file is compiled for that target through
// the pragma below (GCC: `#pragma GCC target`; clang ignores that one and needs
// `#pragma clang attribute`, which gives each function the same target attribute), so the rest of
// the library stays baseline x86-64; these functions are only called after cpu_has_avx2() said yes.
// The file is deliberately not compiled with -mavx2: headers included above the pragma (and any
// inline function they define) stay baseline. No templates or inline functions from shared headers
// are instantiated here (they could be merged with their baseline copies by the linker).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <algorithm>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // XQ8 only: no inline function of it is called here
#include "kvcache.h"  // kv_group, kv_group_bytes (constant expressions only)

#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c")
#endif

namespace wqe {
namespace avx2 {
namespace {

inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

inline float half(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// 8 bytes (unaligned) -> 8 int32 lanes
inline __m256i load8_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
}

inline __m256 to_ps(__m256i v) { return _mm256_cvtepi32_ps(v); }

// Lane constants.
inline __m256i lane_shifts(int base) {  // base + 0..7
    return _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Codes of one 32-column sub-block as 4 float vectors (columns 0-7, 8-15, 16-23, 24-31).
inline void codes_q8(const uint8_t* q, __m256 v[4]) {
    for (int k = 0; k < 4; ++k) v[k] = to_ps(load8_u8(q + 8 * k));
}
inline void codes_q4(const uint8_t* q, __m256 v[4]) {
    const __m256i m = _mm256_set1_epi32(0x0F);
    const __m256i a = load8_u8(q), b = load8_u8(q + 8);
    v[0] = to_ps(_mm256_and_si256(a, m));
    v[1] = to_ps(_mm256_and_si256(b, m));
    v[2] = to_ps(_mm256_srli_epi32(a, 4));
    v[3] = to_ps(_mm256_srli_epi32(b, 4));
}
inline void codes_q2_int(const uint8_t* q, __m256i v[4]) {
    const __m256i m = _mm256_set1_epi32(3);
    const __m256i a = load8_u8(q);
    v[0] = _mm256_and_si256(a, m);
    v[1] = _mm256_and_si256(_mm256_srli_epi32(a, 2), m);
    v[2] = _mm256_and_si256(_mm256_srli_epi32(a, 4), m);
    v[3] = _mm256_srli_epi32(a, 6);
}
inline void codes_q1_int(const uint8_t* q, __m256i v[4]) {
    uint32_t bits;
    memcpy(&bits, q, 4);
    const __m256i b = _mm256_set1_epi32((int)bits), one = _mm256_set1_epi32(1);
    for (int k = 0; k < 4; ++k) v[k] = _mm256_and_si256(_mm256_srlv_epi32(b, lane_shifts(8 * k)), one);
}
inline void codes_q2(const uint8_t* q, __m256 v[4]) {
    __m256i i[4];
    codes_q2_int(q, i);
    for (int k = 0; k < 4; ++k) v[k] = to_ps(i[k]);
}
inline void codes_q3(const uint8_t* q, __m256 v[4]) {
    __m256i lo[4], hi[4];
    codes_q2_int(q, lo);
    codes_q1_int(q + 8, hi);
    for (int k = 0; k < 4; ++k) v[k] = to_ps(_mm256_or_si256(lo[k], _mm256_slli_epi32(hi[k], 2)));
}
inline void codes_q1(const uint8_t* q, __m256 v[4]) {
    __m256i i[4];
    codes_q1_int(q, i);
    for (int k = 0; k < 4; ++k) v[k] = to_ps(i[k]);
}

typedef void (*codes_fn)(const uint8_t*, __m256 v[4]);

// Affine dot: d * sum q x + m * xsum, codes decoded 32 columns at a time; four independent
// accumulators so that FMA latency does not serialise the loop.
inline float dot_affine(codes_fn codes, int sub_bytes, const uint8_t* rb, const float* x, float xsum, int g_pad) {
    const float d = half(rb), m = half(rb + 2);
    const uint8_t* q = rb + 4;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    for (int c = 0; c < g_pad; c += 32, q += sub_bytes) {
        __m256 v[4];
        codes(q, v);
        acc0 = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(x + c), acc0);
        acc1 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + c + 8), acc1);
        acc2 = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x + c + 16), acc2);
        acc3 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + c + 24), acc3);
    }
    return d * hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) + m * xsum;
}

// Two rows at once: the x loads are shared, eight accumulators in flight.
inline void dot_affine2(codes_fn codes, int sub_bytes, const uint8_t* ra, const uint8_t* rb, const float* x, float xsum,
                        int g_pad, float* out) {
    const uint8_t* qa = ra + 4;
    const uint8_t* qb = rb + 4;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int c = 0; c < g_pad; c += 32, qa += sub_bytes, qb += sub_bytes) {
        __m256 va[4], vb[4];
        codes(qa, va);
        codes(qb, vb);
        const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
        const __m256 x2 = _mm256_loadu_ps(x + c + 16), x3 = _mm256_loadu_ps(x + c + 24);
        a0 = _mm256_fmadd_ps(va[0], x0, a0); b0 = _mm256_fmadd_ps(vb[0], x0, b0);
        a1 = _mm256_fmadd_ps(va[1], x1, a1); b1 = _mm256_fmadd_ps(vb[1], x1, b1);
        a2 = _mm256_fmadd_ps(va[2], x2, a2); b2 = _mm256_fmadd_ps(vb[2], x2, b2);
        a3 = _mm256_fmadd_ps(va[3], x3, a3); b3 = _mm256_fmadd_ps(vb[3], x3, b3);
    }
    out[0] = half(ra) * hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + half(ra + 2) * xsum;
    out[1] = half(rb) * hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3))) + half(rb + 2) * xsum;
}

inline void dot_rows_affine(codes_fn codes, int sub_bytes, const uint8_t* rb, size_t stride, int n, const float* x,
                            float s, int g, float* out) {
    int r = 0;
    for (; r + 2 <= n; r += 2) dot_affine2(codes, sub_bytes, rb + r * stride, rb + (r + 1) * stride, x, s, g, out + r);
    for (; r < n; ++r) out[r] = dot_affine(codes, sub_bytes, rb + r * stride, x, s, g);
}

inline void dequant_affine(codes_fn codes, int sub_bytes, const uint8_t* rb, int g_pad, float* out) {
    const __m256 d = _mm256_set1_ps(half(rb)), m = _mm256_set1_ps(half(rb + 2));
    const uint8_t* q = rb + 4;
    for (int c = 0; c < g_pad; c += 32, q += sub_bytes) {
        __m256 v[4];
        codes(q, v);
        for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + c + 8 * k, _mm256_add_ps(_mm256_mul_ps(d, v[k]), m));
    }
}

// q1: sum over set bits of x, with compare masks instead of conversions.
inline float dot_q1_impl(const uint8_t* rb, const float* x, float xsum, int g_pad) {
    const float d = half(rb), m = half(rb + 2);
    const uint8_t* q = rb + 4;
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int c = 0; c < g_pad; c += 32, q += 4) {
        for (int k = 0; k < 4; ++k) {
            const __m256i b = _mm256_set1_epi32(q[k]);
            const __m256 msk = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, bit), bit));
            acc[k] = _mm256_add_ps(acc[k], _mm256_and_ps(msk, _mm256_loadu_ps(x + c + 8 * k)));
        }
    }
    return d * hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + m * xsum;
}

// Ternary: byte j carries trits i = 0..4 of columns i*B + j; x is prepared as 5 planes of
// stride S = round8(B). Trit i: p_0 = byte, t_i = (3 p_i) >> 8, p_{i+1} = (3 p_i) & 0xFF.
inline __m256i load_tail(const uint8_t* p, int n) {  // n < 8 bytes (B is even: 2, 4 or 6), rest zero; no read past p + n
    uint64_t v = 0;
    uint16_t a;
    uint32_t b;
    switch (n) {
        case 2: memcpy(&a, p, 2); v = a; break;
        case 4: memcpy(&b, p, 4); v = b; break;
        case 6: memcpy(&b, p, 4); memcpy(&a, p + 4, 2); v = b | (uint64_t)a << 32; break;
        default: for (int i = 0; i < n; ++i) v |= (uint64_t)p[i] << (8 * i);
    }
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)v));
}

inline float dot_ternary_impl(const uint8_t* rb, const float* x, float xsum, int g_pad) {
    const float a = half(rb);
    const uint8_t* q = rb + 2;
    const int B = 2 * ((g_pad + 9) / 10), S = (B + 7) & ~7;
    const __m256i ff = _mm256_set1_epi32(0xFF);
    __m256 acc[5] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int j = 0; j < B; j += 8) {
        __m256i p = (j + 8 <= B) ? load8_u8(q + j) : load_tail(q + j, B - j);
        for (int i = 0; i < 5; ++i) {
            const __m256i p3 = _mm256_add_epi32(p, _mm256_slli_epi32(p, 1));
            const __m256 t = to_ps(_mm256_srli_epi32(p3, 8));
            p = _mm256_and_si256(p3, ff);
            acc[i] = _mm256_fmadd_ps(t, _mm256_loadu_ps(x + i * S + j), acc[i]);
        }
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])), acc[4]);
    return a * (hsum(sum) - xsum);
}

inline void dequant_ternary_impl(const uint8_t* rb, int g_pad, float* out) {
    // Writes planes at out + i*B (+ up to 8 past each plane): callers give dequant_floats(g_pad).
    const __m256 a = _mm256_set1_ps(half(rb)), one = _mm256_set1_ps(1.0f);
    const uint8_t* q = rb + 2;
    const int B = 2 * ((g_pad + 9) / 10);
    const __m256i ff = _mm256_set1_epi32(0xFF);
    // Planes in ascending order so that a plane's spill past B is overwritten by the next plane.
    for (int i = 0; i < 5; ++i)
        for (int j = 0; j < B; j += 8) {
            __m256i p = (j + 8 <= B) ? load8_u8(q + j) : load_tail(q + j, B - j);
            __m256i p3 = _mm256_add_epi32(p, _mm256_slli_epi32(p, 1));
            for (int s = 0; s < i; ++s) {
                p = _mm256_and_si256(p3, ff);
                p3 = _mm256_add_epi32(p, _mm256_slli_epi32(p, 1));
            }
            const __m256 t = to_ps(_mm256_srli_epi32(p3, 8));
            _mm256_storeu_ps(out + i * B + j, _mm256_mul_ps(a, _mm256_sub_ps(t, one)));
        }
}

// ------------------------------------------------------------------ int8 activations
// Codes of one 32-column sub-block as 32 bytes in column order.
inline __m256i bytes_q8(const uint8_t* q) { return _mm256_loadu_si256((const __m256i*)q); }
inline __m256i bytes_q4(const uint8_t* q) {  // low nibbles: columns 0-15, high: 16-31
    // the 16 bytes in both halves, the upper half shifted by 4: three instructions
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)q));
    return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}
inline __m256i bytes_q2(const uint8_t* q) {  // 64-bit lane k = the 8 bytes >> 2k (columns 8k..8k+7)
    uint64_t v;
    memcpy(&v, q, 8);
    return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x((long long)v), _mm256_setr_epi64x(0, 2, 4, 6)),
                            _mm256_set1_epi8(3));
}
inline __m256i q1_column_bit() { return _mm256_set1_epi64x(0x8040201008040201LL); }  // byte j: 1 << (j % 8)
inline __m256i q1_masked(const uint8_t* q) {  // byte j = (byte j/8 of the 32 bits) & (1 << j%8): non-zero iff set
    uint32_t bits;
    memcpy(&bits, q, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    return _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), q1_column_bit());
}
inline __m256i bitmask_q1(const uint8_t* q) {  // 0xFF where the column's bit is set
    return _mm256_cmpeq_epi8(q1_masked(q), q1_column_bit());
}
inline __m256i bytes_q1(const uint8_t* q) {  // 0/1 per column: min(byte & bit, 1), one op less than mask & 1
    return _mm256_min_epu8(q1_masked(q), _mm256_set1_epi8(1));
}
inline __m256i bytes_q3(const uint8_t* q) {
    return _mm256_or_si256(bytes_q2(q), _mm256_and_si256(bitmask_q1(q + 8), _mm256_set1_epi8(4)));
}

// 8 int32 partial sums of codes . xq over 32 columns. Codes <= 127 go straight into maddubs (u8 x s8,
// pair sums <= 2 * 127 * 127, no saturation). q8 codes reach 255 (2 * 255 * 127 would saturate int16):
// use code - 128 (int8) with the sign trick |c| x sign(x, c), pair sums <= 2 * 128 * 127 = 32512, and
// add 128 * sum(xq) back in float (XQ8::ds).
template <bool Q8>
inline __m256i isum32(__m256i codes, __m256i xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (Q8) {
        const __m256i c = _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(xq, c)), ones);
    }
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), ones);
}

inline float q8_correction(const XQ8* x, int nb) {  // 128 * sum_b d_b * sum(xq_b)
    float c = 0.0f;
    for (int b = 0; b < nb; ++b) c += x[b].ds;
    return 128.0f * c;
}

typedef __m256i (*bytes_fn)(const uint8_t*);

template <bytes_fn BYTES, int SUB, bool Q8>
inline float dot8_affine(const uint8_t* rb, const XQ8* x, float xsum, int g_pad) {
    const uint8_t* q = rb + 4;
    const int nb = g_pad / 32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2, q += 2 * SUB) {  // two chains, so the FMA latency overlaps
        const __m256i p0 = isum32<Q8>(BYTES(q), _mm256_loadu_si256((const __m256i*)x[b].q));
        const __m256i p1 = isum32<Q8>(BYTES(q + SUB), _mm256_loadu_si256((const __m256i*)x[b + 1].q));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(x[b].d), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(x[b + 1].d), _mm256_cvtepi32_ps(p1), acc1);
    }
    if (b < nb) {
        const __m256i p0 = isum32<Q8>(BYTES(q), _mm256_loadu_si256((const __m256i*)x[b].q));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(x[b].d), _mm256_cvtepi32_ps(p0), acc0);
    }
    float s = hsum(_mm256_add_ps(acc0, acc1));
    if (Q8) s += q8_correction(x, nb);
    return half(rb) * s + half(rb + 2) * xsum;
}

// Four rows at once: each activation block is loaded and broadcast once for four rows, four
// independent FMA chains.
template <bytes_fn BYTES, int SUB, bool Q8>
inline void dot8_affine4(const uint8_t* rb, size_t stride, const XQ8* x, float xsum, int g_pad, float* out) {
    const uint8_t* q0 = rb + 4;
    const uint8_t* q1 = q0 + stride;
    const uint8_t* q2 = q1 + stride;
    const uint8_t* q3 = q2 + stride;
    const int nb = g_pad / 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int b = 0; b < nb; ++b) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)x[b].q);
        const __m256 d = _mm256_set1_ps(x[b].d);
        const int o = b * SUB;
        a0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum32<Q8>(BYTES(q0 + o), xv)), a0);
        a1 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum32<Q8>(BYTES(q1 + o), xv)), a1);
        a2 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum32<Q8>(BYTES(q2 + o), xv)), a2);
        a3 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum32<Q8>(BYTES(q3 + o), xv)), a3);
    }
    // horizontal sums of the four accumulators at once
    const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
    const __m256 h = _mm256_hadd_ps(h01, h23);  // per 128-bit lane: (r0, r1, r2, r3) partials
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    if (Q8) s4 = _mm_add_ps(s4, _mm_set1_ps(q8_correction(x, nb)));
    // d and m of the four rows in one conversion: halves (d0, d1, d2, d3, m0, m1, m2, m3)
    uint32_t dm[4];
    for (int r = 0; r < 4; ++r) memcpy(&dm[r], rb + r * stride, 4);  // d | m << 16
    const __m128i v = _mm_setr_epi32((int)dm[0], (int)dm[1], (int)dm[2], (int)dm[3]);
    const __m128i dd = _mm_packus_epi32(_mm_and_si128(v, _mm_set1_epi32(0xFFFF)), _mm_srli_epi32(v, 16));
    const __m256 f = _mm256_cvtph_ps(dd);
    _mm_storeu_ps(out, _mm_fmadd_ps(_mm256_castps256_ps128(f), s4, _mm_mul_ps(_mm256_extractf128_ps(f, 1), _mm_set1_ps(xsum))));
}

template <bytes_fn BYTES, int SUB, bool Q8>
inline void dot8_rows_affine(const uint8_t* rb, size_t stride, int n, const XQ8* x, float xsum, int g_pad, float* out) {
    int r = 0;
    for (; r + 4 <= n; r += 4) dot8_affine4<BYTES, SUB, Q8>(rb + r * stride, stride, x, xsum, g_pad, out + r);
    for (; r < n; ++r) out[r] = dot8_affine<BYTES, SUB, Q8>(rb + r * stride, x, xsum, g_pad);
}

// Ternary: R rows (1 or 4) at once, 32 code bytes of a row per step, trits decoded in 8-bit lanes.
// With s = p ^ 0x80 (p - 128 as int8), the next byte p' = 3p mod 256 is s' = 3s (wrapping), and the trit
// floor(3p / 256) is (p >= 86) + (p >= 171) = (s > -43) + (s > 42): with masks m1 = (s > -43) and
// n2 = (43 > s) in {0, -1}, w = m1 - n2 = 1 - t, and sign(xq, w) = (1 - t) xq, summed by maddubs(1, .) +
// madd(., 1).
// So sum_j t_j xq_j = sum xq - sum (1 - t) xq, and sum_b d_b sum xq_b = sum_b ds_b (XQ8::ds): one
// constant per call. Slots past B hold xq = 0, so the code bytes there never matter: a tail of
// 16 <= n < 32 bytes is two 16-byte loads inside the row-block (the second shuffled into place); n < 16
// (chunks of <= 64 columns) is copied once into a zeroed buffer. The activation block is loaded once for
// the R rows.
inline __m256i ternary_tail(const uint8_t* q, int n) {  // bytes q[0..n) in lanes 0..n-1, n < 32; lanes >= n: anything
    if (n >= 16) {
        const __m128i lo = _mm_loadu_si128((const __m128i*)q);
        const __m128i hi = _mm_loadu_si128((const __m128i*)(q + n - 16));  // bytes n-16 .. n-1
        // lane i (< n - 16) wants byte 16 + i = hi[i + 32 - n]
        const __m128i ctl = _mm_add_epi8(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm_set1_epi8((char)(32 - n)));
        return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), _mm_shuffle_epi8(hi, ctl), 1);
    }
    uint8_t t[32] = {0};
    memcpy(t, q, (size_t)n);
    return _mm256_loadu_si256((const __m256i*)t);
}

template <int R>
inline void dot8_ternary_n(const uint8_t* rb, size_t stride, const XQ8* x, float xsum, int g_pad, float* out) {
    const int B = 2 * ((g_pad + 9) / 10), nb = (B + 31) / 32;
    const __m256i flip = _mm256_set1_epi8((char)0x80), lo_t = _mm256_set1_epi8(-43), hi_t = _mm256_set1_epi8(43);
    const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const int n = B - 32 * b;
        __m256i s[R];
        for (int r = 0; r < R; ++r) {
            const uint8_t* q = rb + r * stride + 2 + 32 * b;
            s[r] = _mm256_xor_si256(n >= 32 ? _mm256_loadu_si256((const __m256i*)q) : ternary_tail(q, n), flip);
        }
        for (int i = 0; i < 5; ++i) {
            const XQ8& xb = x[i * nb + b];
            const __m256i xv = _mm256_loadu_si256((const __m256i*)xb.q);
            const __m256 d = _mm256_set1_ps(xb.d);
            for (int r = 0; r < R; ++r) {
                // (s > -43) - (43 > s) = -[t >= 1] + 1 - [t == 2] = 1 - t
                const __m256i w = _mm256_sub_epi8(_mm256_cmpgt_epi8(s[r], lo_t), _mm256_cmpgt_epi8(hi_t, s[r]));
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(one8, _mm256_sign_epi8(xv, w)), one16);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                s[r] = _mm256_add_epi8(s[r], _mm256_add_epi8(s[r], s[r]));
            }
        }
    }
    float ds = 0.0f;
    for (int k = 0; k < 5 * nb; ++k) ds += x[k].ds;
    if (R == 4) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3 % R]));
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        const __m128 a4 = _mm_setr_ps(half(rb), half(rb + stride), half(rb + 2 * stride), half(rb + 3 * stride));
        _mm_storeu_ps(out, _mm_mul_ps(a4, _mm_sub_ps(_mm_set1_ps(ds - xsum), s4)));
    } else {
        for (int r = 0; r < R; ++r) out[r] = half(rb + r * stride) * ((ds - xsum) - hsum(acc[r]));
    }
}


// ------------------------------------------------------------------ row tiles (blocks.h, TILE_ROWS = 8)
// One tiled 32-column block of 8 rows as 8 code vectors, vector G = column group G (columns 4G..4G+3), byte
// 4r + k of it = row r's code of column 4G + k. maddubs with the group's 4 activations broadcast, then the 8
// groups' int16 pair sums added (q4: 8 x 2 x 15 x 127 = 30480 < 2^15) and one madd: lane r = row r's exact
// sum over the 32 columns. So per block and 8 rows: one int->float conversion and one FMA (the row layout
// pays them per row), and no horizontal reduction at the end.
template <int ID>
inline void tile_groups(const uint8_t* q, __m256i g[8]) {
    if (ID == 2) {  // q4: vector v, low nibbles group v, high nibbles group v + 4
        const __m256i m = _mm256_set1_epi8(0x0F);
        for (int v = 0; v < 4; ++v) {
            const __m256i w = _mm256_loadu_si256((const __m256i*)(q + 32 * v));
            g[v] = _mm256_and_si256(w, m);
            g[v + 4] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
        }
    } else if (ID == 4) {  // q2: vector v, bits 2s: group 2s + v
        const __m256i m = _mm256_set1_epi8(3);
        for (int v = 0; v < 2; ++v) {
            const __m256i w = _mm256_loadu_si256((const __m256i*)(q + 32 * v));
            g[v] = _mm256_and_si256(w, m);
            g[v + 2] = _mm256_and_si256(_mm256_srli_epi16(w, 2), m);
            g[v + 4] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
            g[v + 6] = _mm256_and_si256(_mm256_srli_epi16(w, 6), m);
        }
    } else if (ID == 3) {  // q3: 3-bit fields, A = g0 | g1 << 3 | g6 lo << 6, B = g2 | g3 << 3 | g7 lo << 6,
        // C = g4 | g5 << 3 | g6 hi << 6 | g7 hi << 7 (16-bit shifts: the masks drop what crosses from the next byte)
        const __m256i a = _mm256_loadu_si256((const __m256i*)q), b = _mm256_loadu_si256((const __m256i*)(q + 32));
        const __m256i c = _mm256_loadu_si256((const __m256i*)(q + 64));
        const __m256i m7 = _mm256_set1_epi8(7), m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
        g[0] = _mm256_and_si256(a, m7);
        g[1] = _mm256_and_si256(_mm256_srli_epi16(a, 3), m7);
        g[2] = _mm256_and_si256(b, m7);
        g[3] = _mm256_and_si256(_mm256_srli_epi16(b, 3), m7);
        g[4] = _mm256_and_si256(c, m7);
        g[5] = _mm256_and_si256(_mm256_srli_epi16(c, 3), m7);
        g[6] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), m3), _mm256_and_si256(_mm256_srli_epi16(c, 4), four));
        g[7] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 6), m3), _mm256_and_si256(_mm256_srli_epi16(c, 5), four));
    } else {  // q1: one vector, bit G = group G
        const __m256i w = _mm256_loadu_si256((const __m256i*)q), one = _mm256_set1_epi8(1);
        g[0] = _mm256_and_si256(w, one);
        for (int k = 1; k < 8; ++k) g[k] = _mm256_and_si256(_mm256_srli_epi16(w, k), one);
    }
}

inline __m256i bcast4(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// Lane r = row r's exact int32 sum over one block's 32 columns (codes g, activations x).
inline __m256i block_isum(const __m256i g[8], const int8_t* x) {
    const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(g[0], bcast4(x)), _mm256_maddubs_epi16(g[1], bcast4(x + 4)));
    const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(g[2], bcast4(x + 8)), _mm256_maddubs_epi16(g[3], bcast4(x + 12)));
    const __m256i p45 = _mm256_add_epi16(_mm256_maddubs_epi16(g[4], bcast4(x + 16)), _mm256_maddubs_epi16(g[5], bcast4(x + 20)));
    const __m256i p67 = _mm256_add_epi16(_mm256_maddubs_epi16(g[6], bcast4(x + 24)), _mm256_maddubs_epi16(g[7], bcast4(x + 28)));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(p01, p23), _mm256_add_epi16(p45, p67)), _mm256_set1_epi16(1));
}

// One chunk's part of a tile: the 8 rows' sums over its blocks (before d and m), prefetching pf further on.
template <int ID, int SUB>
inline __m256 tile_chunk(const uint8_t* part, const XQ8* xq, int nb, ptrdiff_t pf) {
    constexpr int BLK = 8 * SUB;  // bytes per 32-column block of 8 rows
    const uint8_t* q = part + 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b, q += BLK) {
        if (pf)
            for (int o = 0; o < BLK; o += 64) _mm_prefetch((const char*)(q + pf + o), _MM_HINT_T0);
        __m256i g[8];
        tile_groups<ID>(q, g);
        const __m256i s = block_isum(g, xq[b].q);
        if (b & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), _mm256_cvtepi32_ps(s), a1);
        else a0 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), _mm256_cvtepi32_ps(s), a0);
    }
    return _mm256_add_ps(a0, a1);
}

inline __m256 tile_dm(const uint8_t* part, __m256 sum, float xsum, __m256 tot) {  // tot + d * sum + m * xsum
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)part));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(part + 16)));
    return _mm256_fmadd_ps(m, _mm256_set1_ps(xsum), _mm256_fmadd_ps(d, sum, tot));
}

template <int ID, int SUB>
inline void tile8_affine(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum, int g_pad,
                         float* acc, ptrdiff_t pf) {
    const int nb = g_pad / 32;
    __m256 tot = _mm256_setzero_ps();
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb) tot = tile_dm(part, tile_chunk<ID, SUB>(part, xq, nb, pf), xsum[c], tot);
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));
}

// Ternary tiles (docs/format.md "Row tiles"): part = a of the 8 rows (fp16) | round4(B) / 4 vectors, vector v = code
// bytes 4v..4v+3 of each row = slots 4v..4v+3 of the five planes (XQ8 blocks i * nbp + v / 8). Per vector and plane
// the trits as u8 (s = byte ^ 0x80 tracks 3^i byte mod 256 as 3s; t = (s > -43) + (s > 42), as dot8_ternary_n),
// vpmaddubsw with the plane's 4 activations; per plane and 32-slot block one exact int32 sum per row (t <= 2:
// 8 vectors x 2 x 2 x 127 fit int16), minus the block's activation sum Q (so T - Q = sum (t - 1) q: small, as the
// weights a (t - 1); summing t q in float and subtracting xsum afterwards cancels badly), scaled by the block's d into
// two accumulators (even / odd planes); then a (sum + (sum of the blocks' ds - xsum)), as dot8_ternary_n. The VNNI
// builds get the same sums another way (kernels_vnni.cpp), so the float operations after them are the same.
inline __m256i qsum_all(const int8_t* q) {  // every lane = the sum of the block's 32 int8 activations
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i*)q)),
                                  _mm256_set1_epi16(1));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0x4E));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0xB1));
    return _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 1));
}

inline __m256 tile_chunk_ternary(const uint8_t* part, const XQ8* xq, int g_pad, ptrdiff_t pf) {
    const int B = 2 * ((g_pad + 9) / 10), nbp = (B + 31) / 32, nv = (B + 3) / 4;
    const uint8_t* q = part + 16;
    const __m256i flip = _mm256_set1_epi8((char)0x80), lo = _mm256_set1_epi8(-43), hi = _mm256_set1_epi8(42);
    const __m256i zero = _mm256_setzero_si256(), one16 = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int b = 0; b < nbp; ++b) {
        const int v0 = 8 * b, nvb = nv - v0 < 8 ? nv - v0 : 8;
        if (pf)
            for (int o = 0; o < 32 * nvb; o += 64) _mm_prefetch((const char*)(q + 32 * v0 + pf + o), _MM_HINT_T0);
        __m256i p[5] = {zero, zero, zero, zero, zero};
        for (int v = 0; v < nvb; ++v) {
            __m256i s = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(q + 32 * (v0 + v))), flip);
            for (int i = 0; i < 5; ++i) {
                const __m256i t = _mm256_sub_epi8(_mm256_sub_epi8(zero, _mm256_cmpgt_epi8(s, lo)), _mm256_cmpgt_epi8(s, hi));
                p[i] = _mm256_add_epi16(p[i], _mm256_maddubs_epi16(t, bcast4(xq[i * nbp + b].q + 4 * v)));
                if (i < 4) s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
            }
        }
        for (int i = 0; i < 5; ++i) {
            const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(p[i], one16), qsum_all(xq[i * nbp + b].q)));
            if (i & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(xq[i * nbp + b].d), f, a1);
            else a0 = _mm256_fmadd_ps(_mm256_set1_ps(xq[i * nbp + b].d), f, a0);
        }
    }
    return _mm256_add_ps(a0, a1);
}

// tot + a (sum + (ds - xsum)), ds = the sum of the chunk's nx blocks' XQ8::ds (in order)
inline __m256 tile_a(const uint8_t* part, __m256 sum, const XQ8* xq, int nx, float xsum, __m256 tot) {
    float ds = 0.0f;
    for (int k = 0; k < nx; ++k) ds += xq[k].ds;
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)part));
    return _mm256_fmadd_ps(a, _mm256_add_ps(sum, _mm256_set1_ps(ds - xsum)), tot);
}

inline int ternary_x8(int g_pad) { return 5 * ((2 * ((g_pad + 9) / 10) + 31) / 32); }  // XQ8 blocks of a chunk

inline void tile8_ternary_impl(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum, int g_pad,
                               float* acc, ptrdiff_t pf) {
    const int nx = ternary_x8(g_pad);
    __m256 tot = _mm256_setzero_ps();
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nx)
        tot = tile_a(part, tile_chunk_ternary(part, xq, g_pad, pf), xq, nx, xsum[c], tot);
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));
}

// Two-level tiles (blocks.cpp tile_pack_sub; docs/format.md "Row tiles"): part = d, dmin of the 8 rows (fp16) | per
// block 12 bytes of sub-scale codes (8 low bytes, a u32 of the rows' high nibbles), 8 sub_bytes(g_pad) in all | the
// codes, tiled as q4 / q3 / q2. Per block the exact int32 sums (as tile_chunk) times the rows' scale codes s_b (exact
// in float: |sum| s_b < 2^24), by the block's d into even / odd accumulators, and the min codes n_b by the block's ds
// into a third; then tot + d sum - dmin mins. The VNNI builds (kernels_vnni_tiles.inc) and NEON do the same float
// operations on the same sums.
inline void tile_sub_codes(const uint8_t* sc, __m256& s, __m256& m) {  // one block's 8 scale and 8 min codes
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)sc));
    int32_t h;
    memcpy(&h, sc + 8, 4);
    const __m256i hi = _mm256_srlv_epi32(_mm256_set1_epi32(h), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    const __m256i m15 = _mm256_set1_epi32(15), m3 = _mm256_set1_epi32(3);
    s = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(lo, m15), _mm256_slli_epi32(_mm256_and_si256(hi, m3), 4)));
    m = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(lo, 4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hi, 2), m3), 4)));
}

inline __m256 tile_dmin(const uint8_t* part, __m256 sum, __m256 mins, __m256 tot) {  // tot + d sum - dmin mins
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)part));
    const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(part + 16)));
    return _mm256_fnmadd_ps(dm, mins, _mm256_fmadd_ps(d, sum, tot));
}

// tot + one two-level part's 8 rows.
template <int ID, int SUB>
inline __m256 tile_sub_part(const uint8_t* part, const XQ8* xq, int nb, ptrdiff_t pf, __m256 tot) {
    constexpr int BLK = 8 * SUB;
    const uint8_t* sc = part + 32;
    const uint8_t* q = sc + 8 * (nb + (nb + 1) / 2);
    if (pf)
        for (int o = 0; o < 12 * nb; o += 64) _mm_prefetch((const char*)(sc + pf + o), _MM_HINT_T0);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), mn = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b, q += BLK, sc += 12) {
        if (pf)
            for (int o = 0; o < BLK; o += 64) _mm_prefetch((const char*)(q + pf + o), _MM_HINT_T0);
        __m256i g[8];
        tile_groups<ID>(q, g);
        __m256 s, m;
        tile_sub_codes(sc, s, m);
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(block_isum(g, xq[b].q)), s);
        if (b & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), f, a1);
        else a0 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), f, a0);
        mn = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].ds), m, mn);
    }
    return tile_dmin(part, _mm256_add_ps(a0, a1), mn, tot);
}

template <int ID, int SUB>
inline void tile8_sub(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float*, int g_pad, float* acc,
                      ptrdiff_t pf) {
    const int nb = g_pad / 32;
    __m256 tot = _mm256_setzero_ps();
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb) tot = tile_sub_part<ID, SUB>(part, xq, nb, pf, tot);
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));
}

inline void tile8_mix_impl(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, const int* x8off, const float* xsum,
                           float* acc, ptrdiff_t pf) {
    __m256 tot = _mm256_setzero_ps();
    for (int i = 0; i < n; ++i) {
        const uint8_t* part = tile + d[i].off;
        const XQ8* x = xq + x8off[d[i].c];
        if (d[i].kind == KIND_TERNARY) {
            tot = tile_a(part, tile_chunk_ternary(part, x, 32 * d[i].nb, pf), x, ternary_x8(32 * d[i].nb), xsum[d[i].c], tot);
            continue;
        }
        if (d[i].kind >= KIND_Q4S) {
            switch (d[i].kind) {
                case KIND_Q4S: tot = tile_sub_part<2, 16>(part, x, d[i].nb, pf, tot); break;
                case KIND_Q3S: tot = tile_sub_part<3, 12>(part, x, d[i].nb, pf, tot); break;
                default: tot = tile_sub_part<4, 8>(part, x, d[i].nb, pf, tot); break;
            }
            continue;
        }
        __m256 s;
        switch (d[i].kind) {
            case KIND_Q4: s = tile_chunk<2, 16>(part, x, d[i].nb, pf); break;
            case KIND_Q3: s = tile_chunk<3, 12>(part, x, d[i].nb, pf); break;
            case KIND_Q2: s = tile_chunk<4, 8>(part, x, d[i].nb, pf); break;
            default: s = tile_chunk<6, 4>(part, x, d[i].nb, pf); break;
        }
        tot = tile_dm(part, s, xsum[d[i].c], tot);
    }
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));
}

// q8 tiles (uniform runs only: tile8_mix and the prefill GEMM do not take q8 chunks): vector G = group G's codes, one
// byte each (up to 255). As the row kernel (isum32<true>): c - 128 as int8 with the sign trick, pair sums <= 2 x 128 x
// 127, so each group's int16 pairs go to int32 (madd) before groups are added; lane r = row r's exact int32 sum of
// (c - 128) x over the block, and 128 x the chunk's activation sum (q8_correction) is added back in float per chunk.
inline __m256i block_isum_q8(const uint8_t* q, const int8_t* x) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int G = 0; G < 8; G += 2) {
        const __m256i c0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(q + 32 * G)), flip);
        const __m256i c1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(q + 32 * G + 32)), flip);
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c0), _mm256_sign_epi8(bcast4(x + 4 * G), c0)), ones));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c1), _mm256_sign_epi8(bcast4(x + 4 * G + 4), c1)), ones));
    }
    return _mm256_add_epi32(s0, s1);
}

inline void tile8_q8_impl(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum, int g_pad,
                          float* acc, ptrdiff_t pf) {
    constexpr int BLK = 8 * 32;
    const int nb = g_pad / 32;
    __m256 tot = _mm256_setzero_ps();
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb) {
        const uint8_t* q = part + 32;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int b = 0; b < nb; ++b, q += BLK) {
            if (pf)
                for (int o = 0; o < BLK; o += 64) _mm_prefetch((const char*)(q + pf + o), _MM_HINT_T0);
            const __m256 s = _mm256_cvtepi32_ps(block_isum_q8(q, xq[b].q));
            if (b & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), s, a1);
            else a0 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), s, a0);
        }
        tot = tile_dm(part, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(q8_correction(xq, nb))), xsum[c], tot);
    }
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));
}

// Integer prefill (linear.cpp tile8_gemm_fn): NT tokens per pass over a chunk's codes, each block's codes unpacked
// once for the NT tokens; per token the float operations of tile_chunk / tile_dm in the same order (bit-identical).
template <int ID, int NT>
inline void gemm_block(const uint8_t* q, const XQ8* xq, size_t xs, __m256 a[NT]) {  // one block (q, xq at it), NT tokens
    __m256i g[8];
    tile_groups<ID>(q, g);
    for (int t = 0; t < NT; ++t) {
        const XQ8& x = xq[t * xs];
        a[t] = _mm256_fmadd_ps(_mm256_set1_ps(x.d), _mm256_cvtepi32_ps(block_isum(g, x.q)), a[t]);
    }
}

template <int ID, int SUB, int NT>
inline void gemm_chunk(const uint8_t* part, const XQ8* xq, size_t xs, int nb, __m256 out[NT]) {
    constexpr int BLK = 8 * SUB;
    const uint8_t* q = part + 32;
    __m256 a0[NT], a1[NT];  // even and odd blocks, as tile_chunk
    for (int t = 0; t < NT; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        gemm_block<ID, NT>(q + (size_t)b * BLK, xq + b, xs, a0);
        gemm_block<ID, NT>(q + (size_t)(b + 1) * BLK, xq + b + 1, xs, a1);
    }
    if (b < nb) gemm_block<ID, NT>(q + (size_t)b * BLK, xq + b, xs, a0);
    for (int t = 0; t < NT; ++t) out[t] = _mm256_add_ps(a0[t], a1[t]);
}

// Two-level parts for NT tokens: tile_sub_part's float operations per token, in its order.
template <int ID, int NT>
inline void gemm_block_sub(const uint8_t* q, const uint8_t* sc, const XQ8* xq, size_t xs, __m256 a[NT], __m256 mn[NT]) {
    __m256i g[8];
    tile_groups<ID>(q, g);
    __m256 s, m;
    tile_sub_codes(sc, s, m);
    for (int t = 0; t < NT; ++t) {
        const XQ8& x = xq[t * xs];
        a[t] = _mm256_fmadd_ps(_mm256_set1_ps(x.d), _mm256_mul_ps(_mm256_cvtepi32_ps(block_isum(g, x.q)), s), a[t]);
        mn[t] = _mm256_fmadd_ps(_mm256_set1_ps(x.ds), m, mn[t]);
    }
}

template <int ID, int SUB, int NT>
inline void gemm_sub_part(const uint8_t* part, const XQ8* xq, size_t xs, int nb, __m256 tot[NT]) {
    constexpr int BLK = 8 * SUB;
    const uint8_t* sc = part + 32;
    const uint8_t* q = sc + 8 * (nb + (nb + 1) / 2);
    __m256 a0[NT], a1[NT], mn[NT];
    for (int t = 0; t < NT; ++t) a0[t] = a1[t] = mn[t] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        gemm_block_sub<ID, NT>(q + (size_t)b * BLK, sc + 12 * b, xq + b, xs, a0, mn);
        gemm_block_sub<ID, NT>(q + (size_t)(b + 1) * BLK, sc + 12 * (b + 1), xq + b + 1, xs, a1, mn);
    }
    if (b < nb) gemm_block_sub<ID, NT>(q + (size_t)b * BLK, sc + 12 * b, xq + b, xs, a0, mn);
    for (int t = 0; t < NT; ++t) tot[t] = tile_dmin(part, _mm256_add_ps(a0[t], a1[t]), mn[t], tot[t]);
}

template <int NT>
inline void gemm_run(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xs, const int* x8off,
                     const float* xsum, size_t ss, float* acc) {
    __m256 tot[NT];
    for (int t = 0; t < NT; ++t) tot[t] = _mm256_setzero_ps();
    for (int i = 0; i < n; ++i) {
        const uint8_t* part = tile + d[i].off;
        const XQ8* x = xq + x8off[d[i].c];
        if (d[i].kind == KIND_TERNARY) {  // ternary: token by token through the decode kernel (the same operations)
            for (int t = 0; t < NT; ++t)
                tot[t] = tile_a(part, tile_chunk_ternary(part, x + t * xs, 32 * d[i].nb, 0), x + t * xs, ternary_x8(32 * d[i].nb),
                                xsum[t * ss + d[i].c], tot[t]);
            continue;
        }
        if (d[i].kind >= KIND_Q4S) {
            switch (d[i].kind) {
                case KIND_Q4S: gemm_sub_part<2, 16, NT>(part, x, xs, d[i].nb, tot); break;
                case KIND_Q3S: gemm_sub_part<3, 12, NT>(part, x, xs, d[i].nb, tot); break;
                default: gemm_sub_part<4, 8, NT>(part, x, xs, d[i].nb, tot); break;
            }
            continue;
        }
        __m256 s[NT];
        switch (d[i].kind) {
            case KIND_Q4: gemm_chunk<2, 16, NT>(part, x, xs, d[i].nb, s); break;
            case KIND_Q3: gemm_chunk<3, 12, NT>(part, x, xs, d[i].nb, s); break;
            case KIND_Q2: gemm_chunk<4, 8, NT>(part, x, xs, d[i].nb, s); break;
            default: gemm_chunk<6, 4, NT>(part, x, xs, d[i].nb, s); break;
        }
        for (int t = 0; t < NT; ++t) tot[t] = tile_dm(part, s[t], xsum[t * ss + d[i].c], tot[t]);
    }
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(acc + 8 * t, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * t), tot[t]));
}
}  // namespace

void tile8_gemm(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xs, const int* x8off, const float* xsum,
                size_t ss, int nt, float* acc) {
    for (; nt >= 4; nt -= 4, xq += 4 * xs, xsum += 4 * ss, acc += 32) gemm_run<4>(tile, d, n, xq, xs, x8off, xsum, ss, acc);
    if (nt == 3) gemm_run<3>(tile, d, n, xq, xs, x8off, xsum, ss, acc);
    else if (nt == 2) gemm_run<2>(tile, d, n, xq, xs, x8off, xsum, ss, acc);
    else if (nt == 1) gemm_run<1>(tile, d, n, xq, xs, x8off, xsum, ss, acc);
}

float dot_fp16(const uint8_t* rb, const float* x, float, int g_pad) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int c = 0; c < g_pad; c += 32)
        for (int k = 0; k < 4; ++k)
            acc[k] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rb + 2 * c + 16 * k))),
                                     _mm256_loadu_ps(x + c + 8 * k), acc[k]);
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
float dot_q8(const uint8_t* rb, const float* x, float s, int g) { return dot_affine(codes_q8, 32, rb, x, s, g); }
float dot_q4(const uint8_t* rb, const float* x, float s, int g) { return dot_affine(codes_q4, 16, rb, x, s, g); }
float dot_q3(const uint8_t* rb, const float* x, float s, int g) { return dot_affine(codes_q3, 12, rb, x, s, g); }
float dot_q2(const uint8_t* rb, const float* x, float s, int g) { return dot_affine(codes_q2, 8, rb, x, s, g); }
float dot_q1(const uint8_t* rb, const float* x, float s, int g) { return dot_q1_impl(rb, x, s, g); }
float dot_ternary(const uint8_t* rb, const float* x, float s, int g) { return dot_ternary_impl(rb, x, s, g); }

#define WQE_ROWS(name)                                                                                    \
    void dot_rows_##name(const uint8_t* rb, size_t stride, int n, const float* x, float s, int g, float* out) { \
        for (int r = 0; r < n; ++r) out[r] = dot_##name(rb + r * stride, x, s, g);                            \
    }
WQE_ROWS(fp16)
WQE_ROWS(q1)
WQE_ROWS(ternary)
void dot_rows_q8(const uint8_t* rb, size_t st, int n, const float* x, float s, int g, float* out) { dot_rows_affine(codes_q8, 32, rb, st, n, x, s, g, out); }
void dot_rows_q4(const uint8_t* rb, size_t st, int n, const float* x, float s, int g, float* out) { dot_rows_affine(codes_q4, 16, rb, st, n, x, s, g, out); }
void dot_rows_q3(const uint8_t* rb, size_t st, int n, const float* x, float s, int g, float* out) { dot_rows_affine(codes_q3, 12, rb, st, n, x, s, g, out); }
void dot_rows_q2(const uint8_t* rb, size_t st, int n, const float* x, float s, int g, float* out) { dot_rows_affine(codes_q2, 8, rb, st, n, x, s, g, out); }
#undef WQE_ROWS

float dot8_q8(const uint8_t* rb, const XQ8* x, float s, int g) { return dot8_affine<bytes_q8, 32, true>(rb, x, s, g); }
float dot8_q4(const uint8_t* rb, const XQ8* x, float s, int g) { return dot8_affine<bytes_q4, 16, false>(rb, x, s, g); }
float dot8_q3(const uint8_t* rb, const XQ8* x, float s, int g) { return dot8_affine<bytes_q3, 12, false>(rb, x, s, g); }
float dot8_q2(const uint8_t* rb, const XQ8* x, float s, int g) { return dot8_affine<bytes_q2, 8, false>(rb, x, s, g); }
float dot8_q1(const uint8_t* rb, const XQ8* x, float s, int g) { return dot8_affine<bytes_q1, 4, false>(rb, x, s, g); }
float dot8_ternary(const uint8_t* rb, const XQ8* x, float s, int g) {
    float out;
    dot8_ternary_n<1>(rb, 0, x, s, g, &out);
    return out;
}
void dot8_rows_q8(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) { dot8_rows_affine<bytes_q8, 32, true>(rb, st, n, x, s, g, out); }
void dot8_rows_q4(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) { dot8_rows_affine<bytes_q4, 16, false>(rb, st, n, x, s, g, out); }
void dot8_rows_q3(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) { dot8_rows_affine<bytes_q3, 12, false>(rb, st, n, x, s, g, out); }
void dot8_rows_q2(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) { dot8_rows_affine<bytes_q2, 8, false>(rb, st, n, x, s, g, out); }
void dot8_rows_q1(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) { dot8_rows_affine<bytes_q1, 4, false>(rb, st, n, x, s, g, out); }
void dot8_rows_ternary(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) {
    int r = 0;
    for (; r + 4 <= n; r += 4) dot8_ternary_n<4>(rb + r * st, st, x, s, g, out + r);
    for (; r < n; ++r) dot8_ternary_n<1>(rb + r * st, 0, x, s, g, out + r);
}

void dequant_fp16(const uint8_t* rb, int g_pad, float* out) {
    for (int c = 0; c < g_pad; c += 8)
        _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rb + 2 * c))));
}
void dequant_q8(const uint8_t* rb, int g, float* out) { dequant_affine(codes_q8, 32, rb, g, out); }
void dequant_q4(const uint8_t* rb, int g, float* out) { dequant_affine(codes_q4, 16, rb, g, out); }
void dequant_q3(const uint8_t* rb, int g, float* out) { dequant_affine(codes_q3, 12, rb, g, out); }
void dequant_q2(const uint8_t* rb, int g, float* out) { dequant_affine(codes_q2, 8, rb, g, out); }
void dequant_q1(const uint8_t* rb, int g, float* out) { dequant_affine(codes_q1, 4, rb, g, out); }
void dequant_ternary(const uint8_t* rb, int g, float* out) { dequant_ternary_impl(rb, g, out); }

// ------------------------------------------------------------------ dense primitives
float vdot_f32(const float* a, const float* b, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

float vdot_f16(const uint8_t* h, const float* x, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i))), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i + 16))), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i + 32))), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i + 48))), _mm256_loadu_ps(x + i + 24), acc3);
    }
    acc0 = _mm256_add_ps(acc0, acc2);
    acc1 = _mm256_add_ps(acc1, acc3);
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i))), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i + 16))), _mm256_loadu_ps(x + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i))), _mm256_loadu_ps(x + i), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; ++i) s += half(h + 2 * i) * x[i];
    return s;
}

// Four rows at once: each x load serves four rows, eight FMA chains.
void vdot_f16_rows(const uint8_t* h, size_t stride, int nr, const float* x, int n, float* out) {
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
        const uint8_t* h0 = h + r * stride;
        const uint8_t* h1 = h0 + stride;
        const uint8_t* h2 = h1 + stride;
        const uint8_t* h3 = h2 + stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
#define WQE_F16(p, o) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((p) + 2 * i + (o))))
            a0 = _mm256_fmadd_ps(WQE_F16(h0, 0), x0, a0); b0 = _mm256_fmadd_ps(WQE_F16(h0, 16), x1, b0);
            a1 = _mm256_fmadd_ps(WQE_F16(h1, 0), x0, a1); b1 = _mm256_fmadd_ps(WQE_F16(h1, 16), x1, b1);
            a2 = _mm256_fmadd_ps(WQE_F16(h2, 0), x0, a2); b2 = _mm256_fmadd_ps(WQE_F16(h2, 16), x1, b2);
            a3 = _mm256_fmadd_ps(WQE_F16(h3, 0), x0, a3); b3 = _mm256_fmadd_ps(WQE_F16(h3, 16), x1, b3);
        }
        for (; i + 8 <= n; i += 8) {
            const __m256 x0 = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(WQE_F16(h0, 0), x0, a0);
            a1 = _mm256_fmadd_ps(WQE_F16(h1, 0), x0, a1);
            a2 = _mm256_fmadd_ps(WQE_F16(h2, 0), x0, a2);
            a3 = _mm256_fmadd_ps(WQE_F16(h3, 0), x0, a3);
#undef WQE_F16
        }
        const __m256 hs = _mm256_hadd_ps(_mm256_hadd_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1)),
                                         _mm256_hadd_ps(_mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)));
        float s[4];
        _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(hs), _mm256_extractf128_ps(hs, 1)));
        for (; i < n; ++i) {
            const float xi = x[i];
            s[0] += half(h0 + 2 * i) * xi; s[1] += half(h1 + 2 * i) * xi;
            s[2] += half(h2 + 2 * i) * xi; s[3] += half(h3 + 2 * i) * xi;
        }
        memcpy(out + r, s, sizeof s);
    }
    for (; r < nr; ++r) out[r] = vdot_f16(h + r * stride, x, n);
}

void vaxpy(float a, const float* x, float* y, int n) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
}

void vf16_to_f32(const uint8_t* h, float* out, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + 2 * i))));
    for (; i < n; ++i) out[i] = half(h + 2 * i);
}

// F16C's conversion rounds to nearest even, as fp32_to_fp16 (subnormal halves and overflow to infinity included).
void vf32_to_f16(const float* x, uint8_t* h, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(h + 2 * i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) {
        const uint16_t v = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT), 0);
        memcpy(h + 2 * i, &v, 2);
    }
}

// 4 rows x up to 3 tokens per step, 12 accumulators.
void vgemm4(const float* W, int ldw, const float* X, int ldx, int nt, int K, float* Y, int ldy, int nr) {
    const float* w0 = W;
    const float* w1 = W + ldw;
    const float* w2 = W + 2 * (size_t)ldw;
    const float* w3 = W + 3 * (size_t)ldw;
    int t = 0;
    for (; t + 3 <= nt; t += 3) {
        const float* x0 = X + (size_t)t * ldx;
        const float* x1 = x0 + ldx;
        const float* x2 = x1 + ldx;
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
        __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
        for (int k = 0; k < K; k += 8) {
            const __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
            __m256 w = _mm256_loadu_ps(w0 + k);
            a00 = _mm256_fmadd_ps(w, v0, a00); a01 = _mm256_fmadd_ps(w, v1, a01); a02 = _mm256_fmadd_ps(w, v2, a02);
            w = _mm256_loadu_ps(w1 + k);
            a10 = _mm256_fmadd_ps(w, v0, a10); a11 = _mm256_fmadd_ps(w, v1, a11); a12 = _mm256_fmadd_ps(w, v2, a12);
            w = _mm256_loadu_ps(w2 + k);
            a20 = _mm256_fmadd_ps(w, v0, a20); a21 = _mm256_fmadd_ps(w, v1, a21); a22 = _mm256_fmadd_ps(w, v2, a22);
            w = _mm256_loadu_ps(w3 + k);
            a30 = _mm256_fmadd_ps(w, v0, a30); a31 = _mm256_fmadd_ps(w, v1, a31); a32 = _mm256_fmadd_ps(w, v2, a32);
        }
        const float r[3][4] = {{hsum(a00), hsum(a10), hsum(a20), hsum(a30)},
                               {hsum(a01), hsum(a11), hsum(a21), hsum(a31)},
                               {hsum(a02), hsum(a12), hsum(a22), hsum(a32)}};
        for (int j = 0; j < 3; ++j)
            for (int i = 0; i < nr; ++i) Y[(size_t)(t + j) * ldy + i] = r[j][i];
    }
    for (; t < nt; ++t) {
        const float* x0 = X + (size_t)t * ldx;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k += 8) {
            const __m256 v = _mm256_loadu_ps(x0 + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), v, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), v, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), v, a3);
        }
        const float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int i = 0; i < nr; ++i) Y[(size_t)t * ldy + i] = r[i];
    }
}

void tile8_q8(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_q8_impl(p, pb, n, x, s, g, acc, pf); }
void tile8_q4(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_affine<2, 16>(p, pb, n, x, s, g, acc, pf); }
void tile8_q3(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_affine<3, 12>(p, pb, n, x, s, g, acc, pf); }
void tile8_q2(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_affine<4, 8>(p, pb, n, x, s, g, acc, pf); }
void tile8_q1(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_affine<6, 4>(p, pb, n, x, s, g, acc, pf); }
void tile8_ternary(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_ternary_impl(p, pb, n, x, s, g, acc, pf); }
void tile8_q4s(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_sub<2, 16>(p, pb, n, x, s, g, acc, pf); }
void tile8_q3s(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_sub<3, 12>(p, pb, n, x, s, g, acc, pf); }
void tile8_q2s(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { tile8_sub<4, 8>(p, pb, n, x, s, g, acc, pf); }
void tile8_mix(const uint8_t* t, const TileDesc* d, int n, const XQ8* x, const int* x8off, const float* s, float* acc, ptrdiff_t pf) {
    tile8_mix_impl(t, d, n, x, x8off, s, acc, pf);
}

// prepare_x8's plain layout (VecOps::quant_x8), bit-identical to the scalar squant_x8: the same max|x| (exact in any
// order; max_ps(|x|, amax) keeps amax when |x| is NaN, as std::max does), the same float operations per value
// (x * id, then the 1.5 * 2^23 rounding add and subtract, no FMA), the same clamp (max_ps(r, -127) gives -127 for a
// NaN r, as std::max(-127, r)), and the sum in 8 double lanes reduced as sum_lanes8. g % 32 == 0 (blocks.cpp's
// quant_x8_any pads a ragged chunk with zeros first: adding 0.0 to a lane leaves its sum unchanged).
float quant_x8(const float* x, int g, XQ8* xq, float step) {
    const __m256 sign = _mm256_set1_ps(-0.0f), magic = _mm256_set1_ps(12582912.0f);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();  // lanes 0-3 and 4-7
    for (int b = 0; b < g / 32; ++b) {
        const float* src = x + 32 * b;
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(src + 8 * k);
            amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), amax);
            s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v[k])));
            s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v[k], 1)));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float am = _mm_cvtss_f32(m4);
        const float d = step > 0.0f ? step : am / 127.0f;
        const float id = step > 0.0f ? 1.0f / step : am > 0.0f ? 127.0f / am : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; ++k) {
            __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v[k], vid), magic), magic);
            r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
            q[k] = _mm256_cvttps_epi32(r);
        }
        const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i*)xq[b].q, _mm256_permutevar8x32_epi32(p, order));
        xq[b].d = d;
        xq[b].ds = d * (float)_mm_cvtsi128_si32(t4);
    }
    // lanes (0..3) + (4..7) = (l0 + l4, l1 + l5, l2 + l6, l3 + l7); then (l0 + l4) + (l2 + l6) and (l1 + l5) + (l3 + l7)
    const __m256d p = _mm256_add_pd(s0, s1);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(p), _mm256_extractf128_pd(p, 1));
    return (float)_mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// VecOps::fake_quant, bit-identical to the scalar sfake_quant: MINPS / MAXPS are `(a < b) ? a : b` / `(a > b) ? a : b`
// with the value first, i.e. std::min(lo, x) / std::max(hi, x) per lane (a NaN value leaves the lane as it was; every
// lane starts at x[0], as the scalar loop does); the extremes are the same whatever the order they are found in (a
// signed zero's sign reaches no output: q - z is +0 either way). Per value: IEEE division, round to nearest even
// (nearbyint's default mode), `(t < 0) ? 0 : t` as MAXPS(0, t), `(hc < m) ? hc : m` as MINPS(hc, m), then s * (q - z).
float fake_quant(float* x, int n, int bits) {
    const float hc = (float)((1 << bits) - 1);
    const int n8 = n & ~7;
    float lo = x[0], hi = x[0];
    if (n8) {
        __m256 vlo = _mm256_set1_ps(x[0]), vhi = vlo;
        for (int i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            vlo = _mm256_min_ps(v, vlo);
            vhi = _mm256_max_ps(v, vhi);
        }
        float l[8], h[8];
        _mm256_storeu_ps(l, vlo);
        _mm256_storeu_ps(h, vhi);
        for (int k = 0; k < 8; ++k) {
            lo = l[k] < lo ? l[k] : lo;
            hi = hi < h[k] ? h[k] : hi;
        }
    }
    for (int i = n8; i < n; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = hi < x[i] ? x[i] : hi;
    }
    const float v = (hi - lo) / hc;
    const float s = v < 1e-8f ? 1e-8f : v;
    const float z = _mm_cvtss_f32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(-lo / s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vhc = _mm256_set1_ps(hc), zero = _mm256_setzero_ps();
    for (int i = 0; i < n8; i += 8) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 q = _mm256_min_ps(vhc, _mm256_max_ps(zero, _mm256_add_ps(r, vz)));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(vs, _mm256_sub_ps(q, vz)));
    }
    for (int i = n8; i < n; ++i) {
        const float r = _mm_cvtss_f32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(x[i] / s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const float t = r + z, m = t < 0.0f ? 0.0f : t, q = hc < m ? hc : m;
        x[i] = s * (q - z);
    }
    return s;
}

// exp(x) for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial, 2^n through the exponent
// bits), x clamped to [-87.3, 88.3] so 2^n stays a normal float; NaN stays NaN (max_ps / min_ps return their second
// operand when one is NaN). silu_mul with it is within 2.1e-7 relative of std::exp's (cpp/tests/test_kernels.cpp).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

void silu_mul(float* g, const float* u, int n) {  // n % 8 == 0 (blocks.cpp's silu_mul_any runs the tail)
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_xor_ps(v, sign))));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
}

// ------------------------------------------------------------------ attention (VecOps::att_scores, exp_sum, att_values)
// The four keys' totals of four 8-lane accumulators: one horizontal reduction for all of them.
static inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// K and V rows are float32 (the float cache, or quantized rows converted into it) or fp16 (the 16-bit cache, read as
// it is stored: half the bytes, which at long context are most of a decode's). A row element's float is exact either
// way, so both give the same bits for the same values.
static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline float el(const float* p) { return *p; }
static inline float el(const uint16_t* p) { return half((const uint8_t*)p); }
// Bytes of the rows ATT_PREFETCH_ROWS keys ahead, one hint per cache line.
template <typename T>
static inline void prefetch_row(const T* r, int hd) {
    for (int d = 0; d < hd; d += 64 / (int)sizeof(T)) _mm_prefetch((const char*)(r + d), _MM_HINT_T0);
}

// A lone head (an odd nq's last, or MHA's only one): eight keys per pass, each key's arithmetic that of att_scores'
// pairs below (an 8-lane accumulator over the columns in steps of 8, hsum4x8's reduction, then the tail in order), so
// its scores are the same bits as when it is paired; half the multiply-adds of running the pair code on a duplicate.
template <typename T>
static void scores_one(const float* q0, int hd, const T* K, size_t ks, int n, float scale, float* S) {
    const int h8 = hd & ~7;
    for (int s = 0; s < n; s += 8) {
        const T* kr[8];
        for (int u = 0; u < 8; ++u) kr[u] = K + (size_t)std::min(s + u, n - 1) * ks;
        if (s + 8 + ATT_PREFETCH_ROWS < n)
            for (int u = 0; u < 8; ++u) prefetch_row(kr[0] + (ATT_PREFETCH_ROWS + u) * ks, hd);
        __m256 a[8];
        for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
        for (int d = 0; d < h8; d += 8) {
            const __m256 x0 = _mm256_loadu_ps(q0 + d);
            for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(x0, ld8(kr[u] + d), a[u]);
        }
        const __m128 lo = hsum4x8(a[0], a[1], a[2], a[3]), hi = hsum4x8(a[4], a[5], a[6], a[7]);
        if (h8 == hd && s + 8 <= n) {  // no tail columns: the eight scores at once (the same multiply per key)
            const __m128 sc = _mm_set1_ps(scale);
            _mm_storeu_ps(S + s, _mm_mul_ps(sc, lo));
            _mm_storeu_ps(S + s + 4, _mm_mul_ps(sc, hi));
            continue;
        }
        float t[8];
        _mm_storeu_ps(t, lo);
        _mm_storeu_ps(t + 4, hi);
        for (int u = 0; u < 8 && s + u < n; ++u) {
            float x = t[u];
            for (int d = h8; d < hd; ++d) x += q0[d] * el(kr[u] + d);
            S[s + u] = scale * x;
        }
    }
}

// Four keys x two heads per pass: an 8-lane accumulator per (head, key) over the columns in steps of 8, one reduction
// of each head's four, then the columns past the last multiple of 8. A lone head goes to scores_one (the same
// arithmetic per key), the last keys re-read the final row, so each head's sums never depend on nq or n.
template <typename T>
static void scores(const float* q, int nq, int hd, const T* K, size_t ks, int n, float scale, float* S, size_t lds) {
    const int h8 = hd & ~7;
    for (int j = 0; j < nq; j += 2) {
        const float* q0 = q + (size_t)j * hd;
        if (j + 1 == nq) {
            scores_one(q0, hd, K, ks, n, scale, S + (size_t)j * lds);
            break;
        }
        const float* q1 = q0 + hd;
        for (int s = 0; s < n; s += 4) {
            const T* k0 = K + (size_t)s * ks;
            const T* k1 = K + (size_t)std::min(s + 1, n - 1) * ks;
            const T* k2 = K + (size_t)std::min(s + 2, n - 1) * ks;
            const T* k3 = K + (size_t)std::min(s + 3, n - 1) * ks;
            if (s + 4 + ATT_PREFETCH_ROWS < n)
                for (int u = 0; u < 4; ++u) prefetch_row(k0 + (ATT_PREFETCH_ROWS + u) * ks, hd);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int d = 0; d < h8; d += 8) {
                const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
                __m256 v = ld8(k0 + d);
                a0 = _mm256_fmadd_ps(x0, v, a0);
                b0 = _mm256_fmadd_ps(x1, v, b0);
                v = ld8(k1 + d);
                a1 = _mm256_fmadd_ps(x0, v, a1);
                b1 = _mm256_fmadd_ps(x1, v, b1);
                v = ld8(k2 + d);
                a2 = _mm256_fmadd_ps(x0, v, a2);
                b2 = _mm256_fmadd_ps(x1, v, b2);
                v = ld8(k3 + d);
                a3 = _mm256_fmadd_ps(x0, v, a3);
                b3 = _mm256_fmadd_ps(x1, v, b3);
            }
            const __m128 ta = hsum4x8(a0, a1, a2, a3), tb = hsum4x8(b0, b1, b2, b3);
            if (h8 == hd && s + 4 <= n) {  // no tail columns: four scores a head at once (the same multiply per key)
                const __m128 sc = _mm_set1_ps(scale);
                _mm_storeu_ps(S + (size_t)j * lds + s, _mm_mul_ps(sc, ta));
                _mm_storeu_ps(S + (size_t)(j + 1) * lds + s, _mm_mul_ps(sc, tb));
                continue;
            }
            float t0[4], t1[4];
            _mm_storeu_ps(t0, ta);
            _mm_storeu_ps(t1, tb);
            const T* kr[4] = {k0, k1, k2, k3};
            for (int u = 0; u < 4 && s + u < n; ++u) {
                float x = t0[u], y = t1[u];
                for (int d = h8; d < hd; ++d) {
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
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (int s = 0; s + 8 <= n; s += 8) {
        const __m256 v = exp8(_mm256_sub_ps(_mm256_loadu_ps(e + s), m));
        _mm256_storeu_ps(e + s, v);
        acc = _mm256_add_ps(acc, v);
    }
    return hsum(acc);
}

// NH heads' outputs over 32 (then 8) columns at a time in registers while every position's row streams past: one
// FMA per element and position, in order of position (the tail columns: a multiply-add per element, in order too).
template <int NH, typename T>
static void values_heads(const float* const* p, int hd, const T* V, size_t vs, int n, float* const* o) {
    int d = 0;
    for (; d + 32 <= hd; d += 32) {
        __m256 acc[NH][4];
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_loadu_ps(o[h] + d + 8 * c);
        for (int s = 0; s < n; ++s) {
            const T* v = V + (size_t)s * vs + d;
            if (s + ATT_PREFETCH_ROWS < n)
                for (int c = 0; c < 32; c += 64 / (int)sizeof(T)) _mm_prefetch((const char*)(v + ATT_PREFETCH_ROWS * vs + c), _MM_HINT_T0);
            const __m256 v0 = ld8(v), v1 = ld8(v + 8), v2 = ld8(v + 16), v3 = ld8(v + 24);
            for (int h = 0; h < NH; ++h) {
                const __m256 ph = _mm256_set1_ps(p[h][s]);
                acc[h][0] = _mm256_fmadd_ps(ph, v0, acc[h][0]);
                acc[h][1] = _mm256_fmadd_ps(ph, v1, acc[h][1]);
                acc[h][2] = _mm256_fmadd_ps(ph, v2, acc[h][2]);
                acc[h][3] = _mm256_fmadd_ps(ph, v3, acc[h][3]);
            }
        }
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o[h] + d + 8 * c, acc[h][c]);
    }
    for (; d + 8 <= hd; d += 8) {
        __m256 acc[NH];
        for (int h = 0; h < NH; ++h) acc[h] = _mm256_loadu_ps(o[h] + d);
        for (int s = 0; s < n; ++s) {
            const __m256 v = ld8(V + (size_t)s * vs + d);
            for (int h = 0; h < NH; ++h) acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(p[h][s]), v, acc[h]);
        }
        for (int h = 0; h < NH; ++h) _mm256_storeu_ps(o[h] + d, acc[h]);
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

// ---- The quantized KV cache's rows read as stored (kvcache.h: per group of G values an fp16 scale d, an fp16 min m,
// then the codes: 8 bits G = 32, one byte each; 4 bits G = 16, byte i holding codes i and i + 8; a row is rb bytes):
// each value d * c + m formed in registers by the one multiply-add of kv_rows_values' AVX2 conversion, then the float
// kernels' arithmetic above (the same accumulators, order and reduction), so the bits of converting the rows first and
// running att_scores / att_values, without the conversion pass, which wrote and re-read 4 bytes a value (45% of a
// decode at 2000 tokens with the 8-bit cache on llama-s).
static inline void kv_scale_min(const uint8_t* p, __m256* d, __m256* m) {  // kvcache.cpp's scale_min
    uint32_t v;
    memcpy(&v, p, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)v));
    *d = _mm256_broadcastss_ps(dm);
    *m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
}
static inline __m256 kv_deq8(__m128i bytes8, __m256 d, __m256 m) {  // kvcache.cpp's deq8
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)), d, m);
}
// A group's G values as G / 8 vectors of 8 (columns in order), from its codes c (after the 4-byte scale and min).
template <int BITS>
struct KvGroup {
    static constexpr int G = kv_group(BITS), BYTES = kv_group_bytes(G, BITS);
    static inline void values(const uint8_t* c, __m256 d, __m256 m, __m256* v) {
        if (BITS == 8) {
            for (int j = 0; j < 4; ++j) v[j] = kv_deq8(_mm_loadl_epi64((const __m128i*)(c + 8 * j)), d, m);
        } else {
            const __m128i b = _mm_loadl_epi64((const __m128i*)c), nib = _mm_set1_epi8(0x0F);
            v[0] = kv_deq8(_mm_and_si128(b, nib), d, m);
            v[1] = kv_deq8(_mm_and_si128(_mm_srli_epi16(b, 4), nib), d, m);
        }
    }
};
static inline void prefetch_kv_row(const uint8_t* r, size_t rb) {
    for (size_t b = 0; b < rb; b += 64) _mm_prefetch((const char*)(r + b), _MM_HINT_T0);
}

// NK keys (2 for four heads, 4 for a pair, 8 for a lone one) x NH heads per pass: each key's 8-lane accumulator over
// the columns in steps of 8, hsum4x8 (two keys: each given twice), then `scale * x`, as scores / scores_one do per key
// (hd a multiple of G: no tail).
template <int BITS, int NH, int NK>
static inline void kv_scores_pass(const float* const* qh, int hd, const uint8_t* const* kr, float scale, float* const* S,
                                  int s, int n) {
    using Grp = KvGroup<BITS>;
    __m256 a[NH][NK];
    for (int h = 0; h < NH; ++h)
        for (int u = 0; u < NK; ++u) a[h][u] = _mm256_setzero_ps();
    for (int g0 = 0, gb = 0; g0 < hd; g0 += Grp::G, gb += Grp::BYTES)
        for (int u = 0; u < NK; ++u) {  // key by key, so a group's values and the accumulators fit the 16 registers
            __m256 d, m, v[Grp::G / 8];
            kv_scale_min(kr[u] + gb, &d, &m);
            Grp::values(kr[u] + gb + 4, d, m, v);
            for (int j = 0; j < Grp::G / 8; ++j)
                for (int h = 0; h < NH; ++h) a[h][u] = _mm256_fmadd_ps(_mm256_loadu_ps(qh[h] + g0 + 8 * j), v[j], a[h][u]);
        }
    const __m128 sc = _mm_set1_ps(scale);
    for (int h = 0; h < NH; ++h)
        for (int u0 = 0; u0 < NK; u0 += 4) {
            const int k2 = NK == 2 ? 0 : 2;  // (NK 2: keys 0, 1, 0, 1; every key's sum the same tree of adds)
            const __m128 t = _mm_mul_ps(sc, hsum4x8(a[h][u0], a[h][u0 + 1], a[h][u0 + k2], a[h][u0 + k2 + 1]));
            if (NK == 2) {
                float tt[4];
                _mm_storeu_ps(tt, t);
                for (int u = 0; u < 2 && s + u < n; ++u) S[h][s + u] = tt[u];
                continue;
            }
            if (s + u0 + 4 <= n) {
                _mm_storeu_ps(S[h] + s + u0, t);
            } else {
                float tt[4];
                _mm_storeu_ps(tt, t);
                for (int u = 0; u < 4 && s + u0 + u < n; ++u) S[h][s + u0 + u] = tt[u];
            }
        }
}
template <int BITS, int NH, int NK>
static void kv_scores_heads(const float* const* qh, int hd, const uint8_t* K, size_t rb, int n, float scale, float* const* S) {
    for (int s = 0; s < n; s += NK) {
        const uint8_t* kr[NK];
        for (int u = 0; u < NK; ++u) kr[u] = K + (size_t)std::min(s + u, n - 1) * rb;
        if (s + NK + ATT_PREFETCH_ROWS < n)
            for (int u = 0; u < NK; ++u) prefetch_kv_row(kr[0] + (ATT_PREFETCH_ROWS + u) * rb, rb);
        kv_scores_pass<BITS, NH, NK>(qh, hd, kr, scale, S, s, n);
    }
}
// NQ heads (1-4): O[j * hd + d] += sum over s, in order, of P[j * ldp + s] * row s's value d, the same FMA per element
// and position as values_heads. A group's columns CH vectors at a time in registers: the whole group for one or two
// heads, two vectors a pass for three or four (whose accumulators would not fit the registers otherwise); each value
// formed once per pass for all NQ heads.
template <int BITS, int NQ>
static void kv_values(const float* P, size_t ldp, int hd, const uint8_t* V, size_t rb, int n, float* O) {
    using Grp = KvGroup<BITS>;
    constexpr int NV = Grp::G / 8, CH = NQ <= 2 || NV < 2 ? NV : 2;
    const float* p[4] = {P, P + ldp, P + 2 * ldp, P + 3 * ldp};
    float* o[4] = {O, O + hd, O + 2 * hd, O + 3 * hd};
    for (int d0 = 0, gb = 0; d0 < hd; d0 += Grp::G, gb += Grp::BYTES)
        for (int c0 = 0; c0 < NV; c0 += CH) {
            __m256 acc[NQ][CH];
            for (int h = 0; h < NQ; ++h)
                for (int c = 0; c < CH; ++c) acc[h][c] = _mm256_loadu_ps(o[h] + d0 + 8 * (c0 + c));
            for (int s = 0; s < n; ++s) {
                const uint8_t* r = V + (size_t)s * rb + gb;
                if (c0 == 0 && s + ATT_PREFETCH_ROWS < n) _mm_prefetch((const char*)(r + ATT_PREFETCH_ROWS * rb), _MM_HINT_T0);
                __m256 d, m, v[NV];
                kv_scale_min(r, &d, &m);
                if (CH == NV) {
                    Grp::values(r + 4, d, m, v);
                } else {  // 8 bits, two of the group's four vectors
                    for (int c = 0; c < CH; ++c) v[c] = kv_deq8(_mm_loadl_epi64((const __m128i*)(r + 4 + 8 * (c0 + c))), d, m);
                }
                for (int h = 0; h < NQ; ++h) {
                    const __m256 ph = _mm256_set1_ps(p[h][s]);
                    for (int c = 0; c < CH; ++c) acc[h][c] = _mm256_fmadd_ps(ph, v[c], acc[h][c]);
                }
            }
            for (int h = 0; h < NQ; ++h)
                for (int c = 0; c < CH; ++c) _mm256_storeu_ps(o[h] + d0 + 8 * (c0 + c), acc[h][c]);
        }
}
#include "kernels_kv.inc"  // att_scores_kv / att_values_kv

}  // namespace avx2
}  // namespace wqe

#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

#endif
