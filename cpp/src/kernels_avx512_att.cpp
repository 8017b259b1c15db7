// AVX-512 attention kernels (VecOps::att_scores / att_values and their fp16-row forms) for the AVX2 column on CPUs
// with AVX-512 (F, VL, DQ, BW): at long context attention is most of a decode (bench/results/decode_depth.md).
// - values: 16 columns a register instead of AVX2's 8, up to four heads a pass (each position's row converted once for
//   them; AVX2 takes pairs), every column's FMA chain over the positions in the same order;
// - the quantized cache's values (att_values_kv) the same way, each value formed as kv_rows_values forms it;
// - the quantized cache's scores (att_scores_kv) four heads at a time as below, each group's values formed once for
//   the four (AVX2's pairs form them once per two);
// - scores of four query heads of a KV group at a time (GQA: TinyLlama's 8 a group, Llama 3's and Mistral's 4): each
//   key's row converted once for the four heads (AVX2's pairs convert it once per two), the AVX2 kernel's 8-lane
//   accumulator of one key in each half of a register and hsum4x8's reduction on both halves; one or two heads (MHA,
//   llama-s's pairs) stay AVX2's, whose 512-bit form measured slower (the conversions and row inserts bound it).
// So every score and output has the bits of the AVX2 kernels' whichever of the two a CPU runs (test_kernels.cpp checks
// the float and fp16 rows', test_kvcache.cpp the quantized cache's). As kernels_avx2.cpp, the target is given per
// function (GCC pragma / clang attribute), never for the file; blocks.cpp calls these only after CPUID and XGETBV said
// yes (cpu_has_avx512), and WQEDGE_AVX512_ATTENTION=0 (set_avx512_attention(false)) keeps the AVX2 ones.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // ATT_PREFETCH_ROWS only: no inline function of it is called here
#include "kvcache.h"  // kv_group, kv_group_bytes (constant expressions only)

#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512dq,avx512bw"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512dq,avx512bw")
#endif

namespace wqe {
namespace avx2 {
// kernels_avx2.cpp's kernels: the value kernel for the columns past the last multiple of 64 (each column's arithmetic
// does not depend on the others, so a column range of them gives the bits of the whole row's), the scores for the heads
// past the last multiple of 4 (each head's scores do not depend on the heads beside it)
void att_values(const float* P, size_t ldp, int nq, int hd, const float* V, size_t vs, int n, float* O);
void att_values_h(const float* P, size_t ldp, int nq, int hd, const uint16_t* V, size_t vs, int n, float* O);
void att_scores(const float* q, int nq, int hd, const float* K, size_t ks, int n, float scale, float* S, size_t lds);
void att_scores_h(const float* q, int nq, int hd, const uint16_t* K, size_t ks, int n, float scale, float* S, size_t lds);
void att_scores_kv(const float* q, int nq, int hd, const uint8_t* K, size_t rb, int bits, int n, float scale, float* S,
                   size_t lds);
namespace z512 {
namespace {

inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
// 8 elements of row a in the low half, 8 of row b in the high half, as floats (fp16 rows: exact conversions)
inline __m512 ld2x8(const float* a, const float* b) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(a)), _mm256_loadu_ps(b), 1);
}
inline __m512 ld2x8(const uint16_t* a, const uint16_t* b) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a)),
                                                   _mm_loadu_si128((const __m128i*)b), 1));
}
inline float el(const float* p) { return *p; }
inline float el(const uint16_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
template <typename T>
inline void prefetch_row(const T* r, int hd) {
    for (int d = 0; d < hd; d += 64 / (int)sizeof(T)) _mm_prefetch((const char*)(r + d), _MM_HINT_T0);
}
// _mm256_hadd_ps on each 256-bit half (per 128-bit lane: a0 + a1, a2 + a3, b0 + b1, b2 + b3)
inline __m512 hadd(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD)); }
// kernels_avx2.cpp's hsum4x8 on both halves: lane u = the total of a[u]'s low half, lane 4 + u that of its high half
inline __m256 hsum4x8x2(const __m512* a) {
    const __m512 h = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
    const __m512 s = _mm512_add_ps(h, _mm512_shuffle_f32x4(h, h, 0xB1));  // 128-bit lanes 0 + 1, 2 + 3
    return _mm512_castps512_ps256(_mm512_shuffle_f32x4(s, s, 0x08));      // lanes 0 and 2
}

// Four heads' scores of eight keys per pass, each key's row converted once for the four: key s + u's 8-lane
// accumulator over the columns in the low half of a[h][u], key s + 4 + u's in the high half, FMAs in steps of 8
// columns, hsum4x8's reduction, then the tail columns in order and the scale: per key and head the AVX2 kernel's
// arithmetic, whose pairs convert each row once per two heads.
template <typename T>
void scores4(const float* q, int hd, const T* K, size_t ks, int n, float scale, float* S, size_t lds) {
    const int h8 = hd & ~7;
    for (int s = 0; s < n; s += 8) {
        const T* kr[8];
        for (int u = 0; u < 8; ++u) kr[u] = K + (size_t)(s + u < n ? s + u : n - 1) * ks;  // the last keys re-read the final row
        if (s + 8 + ATT_PREFETCH_ROWS < n)
            for (int u = 0; u < 8; ++u) prefetch_row(kr[0] + (ATT_PREFETCH_ROWS + u) * ks, hd);
        __m512 a[4][4];
        for (int h = 0; h < 4; ++h)
            for (int u = 0; u < 4; ++u) a[h][u] = _mm512_setzero_ps();
        for (int d = 0; d < h8; d += 8) {
            __m512 x[4];
            for (int h = 0; h < 4; ++h) x[h] = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + (size_t)h * hd + d));
            for (int u = 0; u < 4; ++u) {
                const __m512 v = ld2x8(kr[u] + d, kr[u + 4] + d);
                for (int h = 0; h < 4; ++h) a[h][u] = _mm512_fmadd_ps(x[h], v, a[h][u]);
            }
        }
        for (int h = 0; h < 4; ++h) {
            const __m256 tot = hsum4x8x2(a[h]);
            if (h8 == hd && s + 8 <= n) {  // no tail columns: the eight scores at once (the same multiply per key)
                _mm256_storeu_ps(S + (size_t)h * lds + s, _mm256_mul_ps(_mm256_set1_ps(scale), tot));
                continue;
            }
            float t[8];
            _mm256_storeu_ps(t, tot);
            const float* qh = q + (size_t)h * hd;
            for (int u = 0; u < 8 && s + u < n; ++u) {
                float x = t[u];
                for (int d = h8; d < hd; ++d) x += qh[d] * el(kr[u] + d);
                S[(size_t)h * lds + s + u] = scale * x;
            }
        }
    }
}

// Runs of four heads through scores4, the one to three left through the AVX2 kernel (its heads are independent too).
template <typename T>
void scores(const float* q, int nq, int hd, const T* K, size_t ks, int n, float scale, float* S, size_t lds,
            void (*avx2_scores)(const float*, int, int, const T*, size_t, int, float, float*, size_t)) {
    int j = 0;
    for (; j + 4 <= nq; j += 4) scores4(q + (size_t)j * hd, hd, K, ks, n, scale, S + (size_t)j * lds, lds);
    if (j < nq) avx2_scores(q + (size_t)j * hd, nq - j, hd, K, ks, n, scale, S + (size_t)j * lds, lds);
}

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

// One to four heads (GQA: each position's row converted once for all of them; each head's output is its own FMA chain,
// so how heads are grouped does not change a bit).
template <typename T>
void values4(const float* P, size_t ldp, int nq, int hd, const T* V, size_t vs, int n, float* O,
             void (*avx2_values)(const float*, size_t, int, int, const T*, size_t, int, float*)) {
    const float* p[4] = {P, P + ldp, P + 2 * ldp, P + 3 * ldp};
    float* o[4] = {O, O + hd, O + 2 * hd, O + 3 * hd};
    int d = 0;
    for (; d + 64 <= hd; d += 64) {
        switch (nq) {
            case 4: values_heads<4>(p, V, vs, n, o, d); break;
            case 3: values_heads<3>(p, V, vs, n, o, d); break;
            case 2: values_heads<2>(p, V, vs, n, o, d); break;
            default: values_heads<1>(p, V, vs, n, o, d); break;
        }
    }
    if (d < hd)  // the last hd % 64 columns, head by head (the AVX2 kernel's heads are independent too)
        for (int j = 0; j < nq; ++j) avx2_values(p[j], ldp, 1, hd - d, V + d, vs, n, o[j] + d);
}
// Any number of heads, four at a time.
template <typename T>
void values(const float* P, size_t ldp, int nq, int hd, const T* V, size_t vs, int n, float* O,
            void (*avx2_values)(const float*, size_t, int, int, const T*, size_t, int, float*)) {
    for (int j = 0; j < nq; j += 4)
        values4(P + (size_t)j * ldp, ldp, nq - j < 4 ? nq - j : 4, hd, V, vs, n, O + (size_t)j * hd, avx2_values);
}

// The quantized KV cache's rows read as stored (kernels_avx2.cpp's att_values_kv, 16 columns a register): each value
// d * c + m by one multiply-add as kv_rows_values forms it, then the same FMA per element and position.
inline void kv_scale_min(const uint8_t* p, __m512* d, __m512* m) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)v));
    *d = _mm512_broadcastss_ps(dm);
    *m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
}
inline __m512 kv_deq16(__m128i bytes16, __m512 d, __m512 m) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16)), d, m);
}
template <int BITS, int NQ>  // NQ heads, 1-4
void kv_values(const float* P, size_t ldp, int hd, const uint8_t* V, size_t rb, int n, float* O) {
    constexpr int G = kv_group(BITS), GB = kv_group_bytes(G, BITS), NV = G / 16, nq = NQ;  // (the loops' bound)
    const float* p[4] = {P, P + ldp, P + 2 * ldp, P + 3 * ldp};
    float* o[4] = {O, O + hd, O + 2 * hd, O + 3 * hd};
    for (int d0 = 0, gb = 0; d0 < hd; d0 += G, gb += GB) {
        __m512 acc[NQ][NV];
        for (int h = 0; h < nq; ++h)
            for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_loadu_ps(o[h] + d0 + 16 * c);
        for (int s = 0; s < n; ++s) {
            const uint8_t* r = V + (size_t)s * rb + gb;
            if (s + ATT_PREFETCH_ROWS < n) _mm_prefetch((const char*)(r + ATT_PREFETCH_ROWS * rb), _MM_HINT_T0);
            __m512 d, m, v[NV];
            kv_scale_min(r, &d, &m);
            if (BITS == 8) {
                for (int c = 0; c < NV; ++c) v[c] = kv_deq16(_mm_loadu_si128((const __m128i*)(r + 4 + 16 * c)), d, m);
            } else {  // 16 codes in 8 bytes: low nibbles columns 0-7, high nibbles 8-15
                const __m128i b = _mm_loadl_epi64((const __m128i*)(r + 4)), nib = _mm_set1_epi8(0x0F);
                v[0] = kv_deq16(_mm_unpacklo_epi64(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16(b, 4), nib)), d, m);
            }
            for (int h = 0; h < nq; ++h) {
                const __m512 ph = _mm512_set1_ps(p[h][s]);
                for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_fmadd_ps(ph, v[c], acc[h][c]);
            }
        }
        for (int h = 0; h < nq; ++h)
            for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o[h] + d0 + 16 * c, acc[h][c]);
    }
}

// Two keys' scale and min (rows a and b at their group's start): a's in the low half of each register, b's in the high.
inline void kv_scale_min2(const uint8_t* a, const uint8_t* b, __m512* d, __m512* m) {
    uint32_t va, vb;
    memcpy(&va, a, 4);
    memcpy(&vb, b, 4);
    const __m128 da = _mm_cvtph_ps(_mm_cvtsi32_si128((int)va)), db = _mm_cvtph_ps(_mm_cvtsi32_si128((int)vb));
    *d = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcastss_ps(da)), _mm256_broadcastss_ps(db), 1);
    *m = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcastss_ps(_mm_movehdup_ps(da))),
                            _mm256_broadcastss_ps(_mm_movehdup_ps(db)), 1);
}

// Four heads' scores of eight keys per pass over the quantized cache read as stored: scores4's layout (key s + u in the
// low half of a[h][u], key s + 4 + u in the high half), each group's values of a key formed once for the four heads by
// kv_rows_values' multiply-add (d * c + m), and per key and head the AVX2 kv_scores_pass's arithmetic: an 8-lane
// accumulator over the columns in order, hsum4x8, then `scale * x` (hd a multiple of the group: no tail columns).
template <int BITS>
void kv_scores4(const float* q, int hd, const uint8_t* K, size_t rb, int n, float scale, float* S, size_t lds) {
    constexpr int G = kv_group(BITS), GB = kv_group_bytes(G, BITS);
    for (int s = 0; s < n; s += 8) {
        const uint8_t* kr[8];
        for (int u = 0; u < 8; ++u) kr[u] = K + (size_t)(s + u < n ? s + u : n - 1) * rb;  // the last keys re-read the final row
        if (s + 8 + ATT_PREFETCH_ROWS < n)
            for (int u = 0; u < 8; ++u)
                for (size_t b = 0; b < rb; b += 64) _mm_prefetch((const char*)(kr[0] + (ATT_PREFETCH_ROWS + u) * rb + b), _MM_HINT_T0);
        __m512 a[4][4];
        for (int h = 0; h < 4; ++h)
            for (int u = 0; u < 4; ++u) a[h][u] = _mm512_setzero_ps();
        for (int g0 = 0, gb = 0; g0 < hd; g0 += G, gb += GB) {
            __m512 x[4][G / 8];
            for (int h = 0; h < 4; ++h)
                for (int j = 0; j < G / 8; ++j) x[h][j] = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + (size_t)h * hd + g0 + 8 * j));
            for (int u = 0; u < 4; ++u) {
                const uint8_t *ra = kr[u] + gb, *rw = kr[u + 4] + gb;
                __m512 d, m, v[G / 8];
                kv_scale_min2(ra, rw, &d, &m);
                if (BITS == 8) {
                    for (int j = 0; j < G / 8; ++j)
                        v[j] = kv_deq16(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)(ra + 4 + 8 * j)),
                                                           _mm_loadl_epi64((const __m128i*)(rw + 4 + 8 * j))), d, m);
                } else {  // 16 codes in 8 bytes: low nibbles columns 0-7, high nibbles 8-15
                    const __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)(ra + 4)),
                                                         _mm_loadl_epi64((const __m128i*)(rw + 4)));
                    const __m128i nib = _mm_set1_epi8(0x0F);
                    v[0] = kv_deq16(_mm_and_si128(b, nib), d, m);
                    v[1] = kv_deq16(_mm_and_si128(_mm_srli_epi16(b, 4), nib), d, m);
                }
                for (int j = 0; j < G / 8; ++j)
                    for (int h = 0; h < 4; ++h) a[h][u] = _mm512_fmadd_ps(x[h][j], v[j], a[h][u]);
            }
        }
        for (int h = 0; h < 4; ++h) {
            const __m256 t = _mm256_mul_ps(_mm256_set1_ps(scale), hsum4x8x2(a[h]));
            if (s + 8 <= n) {
                _mm256_storeu_ps(S + (size_t)h * lds + s, t);
            } else {
                float tt[8];
                _mm256_storeu_ps(tt, t);
                for (int u = 0; s + u < n; ++u) S[(size_t)h * lds + s + u] = tt[u];
            }
        }
    }
}

}  // namespace

#define WQE_KV_VALUES_ONLY  // the scores: below
#include "kernels_kv.inc"  // att_values_kv: up to four heads a pass through kv_values above
#undef WQE_KV_VALUES_ONLY
// Runs of four heads through kv_scores4, the one to three left through the AVX2 kernel (heads are independent).
void att_scores_kv(const float* q, int nq, int hd, const uint8_t* K, size_t rb, int bits, int n, float scale, float* S,
                   size_t lds) {
    int j = 0;
    for (; j + 4 <= nq; j += 4) {
        if (bits == 8) kv_scores4<8>(q + (size_t)j * hd, hd, K, rb, n, scale, S + (size_t)j * lds, lds);
        else kv_scores4<4>(q + (size_t)j * hd, hd, K, rb, n, scale, S + (size_t)j * lds, lds);
    }
    if (j < nq) avx2::att_scores_kv(q + (size_t)j * hd, nq - j, hd, K, rb, bits, n, scale, S + (size_t)j * lds, lds);
}
void att_scores(const float* q, int nq, int hd, const float* K, size_t ks, int n, float scale, float* S, size_t lds) {
    scores(q, nq, hd, K, ks, n, scale, S, lds, avx2::att_scores);
}
void att_scores_h(const float* q, int nq, int hd, const uint16_t* K, size_t ks, int n, float scale, float* S, size_t lds) {
    scores(q, nq, hd, K, ks, n, scale, S, lds, avx2::att_scores_h);
}
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
