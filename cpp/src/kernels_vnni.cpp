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

// AVX512-VNNI + AVX512VL (EVEX vpdpbusd on ymm registers)
#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
#endif
WQE_TILE_KERNELS(vnni512, _mm256_dpbusd_epi32, 8)
#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

// Two adjacent row tiles in one call, 16 rows in the lanes of 512-bit registers (tile A's 8 rows in the low half,
// tile B = A + ts bytes in the high half): the same integer sums (exact) and the same float operations per lane as
// tile8_* on each tile, so the results are bit-identical (cpp/tests/test_kernels.cpp checks), with half the
// instructions per row: one broadcast of 4 activation bytes and one vpdpbusd serve 16 rows. Measured on Zen 4, whose
// 256-bit units run 512-bit operations in two halves, the tile kernels are bound by vector instructions issued
// (bench/results/tile16.md), so the pair is faster there as well as on Intel's 512-bit units. AVX512BW for the
// byte/word operations on zmm.
#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq")
#endif
namespace wqe {
namespace avx2 {
namespace vnni512 {
namespace {
inline __m512i ld2(const uint8_t* a, std::ptrdiff_t ts) {  // 32 bytes of tile A, then the same 32 of tile B
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                              _mm256_loadu_si256((const __m256i*)(a + ts)), 1);
}
inline __m512 ph2(const uint8_t* a, std::ptrdiff_t ts) {  // 8 fp16 of tile A, then the same 8 of tile B, as floats
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a)),
                                                   _mm_loadu_si128((const __m128i*)(a + ts)), 1));
}
inline __m512i bz4(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
#define DPZ(acc, u, x) _mm512_dpbusd_epi32(acc, u, bz4(x))
/* dsum on 16 rows (the 8-row version's comments hold lane by lane) */
    template <int ID>
    inline __m512i dsum2(const uint8_t* q, std::ptrdiff_t ts, const int8_t* x) {
        __m512i u0 = _mm512_setzero_si512(), u1 = u0, s0 = u0, s1 = u0;
        if (ID == 2) { /* q4: vector v, low nibble group v, high nibble (x16) group v + 4 */
            const __m512i lo = _mm512_set1_epi8(0x0F), hi = _mm512_set1_epi8((char)0xF0);
            const __m512i w0 = ld2(q, ts), w1 = ld2(q + 32, ts);
            const __m512i w2 = ld2(q + 64, ts), w3 = ld2(q + 96, ts);
            u0 = DPZ(u0, _mm512_and_si512(w0, lo), x);
            u1 = DPZ(u1, _mm512_and_si512(w1, lo), x + 4);
            s0 = DPZ(s0, _mm512_and_si512(w0, hi), x + 16);
            s1 = DPZ(s1, _mm512_and_si512(w1, hi), x + 20);
            u0 = DPZ(u0, _mm512_and_si512(w2, lo), x + 8);
            u1 = DPZ(u1, _mm512_and_si512(w3, lo), x + 12);
            s0 = DPZ(s0, _mm512_and_si512(w2, hi), x + 24);
            s1 = DPZ(s1, _mm512_and_si512(w3, hi), x + 28);
            return _mm512_add_epi32(_mm512_add_epi32(u0, u1), _mm512_srai_epi32(_mm512_add_epi32(s0, s1), 4));
        } else if (ID == 4) { /* q2: vector v, bits 2s: group 2s + v; bits 4-5 of w and of w >> 2 (x16) */
            const __m512i m = _mm512_set1_epi8(3), h = _mm512_set1_epi8(0x30);
            const __m512i w0 = ld2(q, ts), w1 = ld2(q + 32, ts);
            const __m512i v0 = _mm512_srli_epi16(w0, 2), v1 = _mm512_srli_epi16(w1, 2);
            u0 = DPZ(u0, _mm512_and_si512(w0, m), x);
            u1 = DPZ(u1, _mm512_and_si512(w1, m), x + 4);
            s0 = DPZ(s0, _mm512_and_si512(w0, h), x + 16);
            s1 = DPZ(s1, _mm512_and_si512(w1, h), x + 20);
            u0 = DPZ(u0, _mm512_and_si512(v0, m), x + 8);
            u1 = DPZ(u1, _mm512_and_si512(v1, m), x + 12);
            s0 = DPZ(s0, _mm512_and_si512(v0, h), x + 24);
            s1 = DPZ(s1, _mm512_and_si512(v1, h), x + 28);
            return _mm512_add_epi32(_mm512_add_epi32(u0, u1), _mm512_srai_epi32(_mm512_add_epi32(s0, s1), 4));
        } else if (ID == 3) { /* q3 (3-bit fields a, b, c): g1, g3, g5 masked in place at bits 3-5 (x8) */
            const __m512i a = ld2(q, ts), b = ld2(q + 32, ts);
            const __m512i c = ld2(q + 64, ts);
            const __m512i m7 = _mm512_set1_epi8(7), m38 = _mm512_set1_epi8(0x38), m3 = _mm512_set1_epi8(3);
            const __m512i four = _mm512_set1_epi8(4);
            u0 = DPZ(u0, _mm512_and_si512(a, m7), x);
            s0 = DPZ(s0, _mm512_and_si512(a, m38), x + 4);
            u1 = DPZ(u1, _mm512_and_si512(b, m7), x + 8);
            s1 = DPZ(s1, _mm512_and_si512(b, m38), x + 12);
            u0 = DPZ(u0, _mm512_and_si512(c, m7), x + 16);
            s0 = DPZ(s0, _mm512_and_si512(c, m38), x + 20);
            u1 = DPZ(u1, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(a, 6), m3),
                                            _mm512_and_si512(_mm512_srli_epi16(c, 4), four)), x + 24);
            u0 = DPZ(u0, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(b, 6), m3),
                                            _mm512_and_si512(_mm512_srli_epi16(c, 5), four)), x + 28);
            return _mm512_add_epi32(_mm512_add_epi32(u0, u1), _mm512_srai_epi32(_mm512_add_epi32(s0, s1), 3));
        } else { /* q1: bit G = group G; bit k and bit 4 + k of w >> k (x16) */
            const __m512i w = ld2(q, ts), one = _mm512_set1_epi8(1);
            const __m512i h = _mm512_set1_epi8(0x10);
            const __m512i w1 = _mm512_srli_epi16(w, 1), w2 = _mm512_srli_epi16(w, 2), w3 = _mm512_srli_epi16(w, 3);
            u0 = DPZ(u0, _mm512_and_si512(w, one), x);
            u1 = DPZ(u1, _mm512_and_si512(w1, one), x + 4);
            s0 = DPZ(s0, _mm512_and_si512(w, h), x + 16);
            s1 = DPZ(s1, _mm512_and_si512(w1, h), x + 20);
            u0 = DPZ(u0, _mm512_and_si512(w2, one), x + 8);
            u1 = DPZ(u1, _mm512_and_si512(w3, one), x + 12);
            s0 = DPZ(s0, _mm512_and_si512(w2, h), x + 24);
            s1 = DPZ(s1, _mm512_and_si512(w3, h), x + 28);
            return _mm512_add_epi32(_mm512_add_epi32(u0, u1), _mm512_srai_epi32(_mm512_add_epi32(s0, s1), 4));
        }
    }

#undef DPZ
template <int ID, int SUB>
inline __m512 chunk2(const uint8_t* part, std::ptrdiff_t ts, const XQ8* xq, int nb, std::ptrdiff_t pf) {
    constexpr int BLK = 8 * SUB;
    const uint8_t* q = part + 32;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b, q += BLK) {
        if (pf)
            for (int o = 0; o < BLK; o += 64) {
                _mm_prefetch((const char*)(q + pf + o), _MM_HINT_T0);
                _mm_prefetch((const char*)(q + ts + pf + o), _MM_HINT_T0);
            }
        const __m512 f = _mm512_cvtepi32_ps(dsum2<ID>(q, ts, xq[b].q));
        if (b & 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(xq[b].d), f, a1);
        else a0 = _mm512_fmadd_ps(_mm512_set1_ps(xq[b].d), f, a0);
    }
    return _mm512_add_ps(a0, a1);
}
inline __m512 dm2(const uint8_t* part, std::ptrdiff_t ts, __m512 sum, float xsum, __m512 tot) {
    return _mm512_fmadd_ps(ph2(part + 16, ts), _mm512_set1_ps(xsum), _mm512_fmadd_ps(ph2(part, ts), sum, tot));
}
inline void add_acc(float* acc, __m512 tot) { _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), tot)); }
template <int ID, int SUB>
inline void tile16(const uint8_t* part, std::ptrdiff_t ts, size_t part_bytes, int nch, const XQ8* xq, const float* xsum,
                   int g_pad, float* acc, std::ptrdiff_t pf) {
    const int nb = g_pad / 32;
    __m512 tot = _mm512_setzero_ps();
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb) tot = dm2(part, ts, chunk2<ID, SUB>(part, ts, xq, nb, pf), xsum[c], tot);
    add_acc(acc, tot);
}
// Two-level parts of two tiles (the 8-row sub_part's float operations lane by lane on dsum2's exact sums): the 16
// rows' sub-scale and min codes (tile A's 8 in the low lanes), then as sub_part.
inline void sub_codes2(const uint8_t* sc, std::ptrdiff_t ts, __m512& s, __m512& m) {
    const __m512i lo = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)sc),
                                                                _mm_loadl_epi64((const __m128i*)(sc + ts))));
    int32_t ha, hb;
    memcpy(&ha, sc + 8, 4);
    memcpy(&hb, sc + ts + 8, 4);
    const __m512i h = _mm512_inserti64x4(_mm512_set1_epi32(ha), _mm256_set1_epi32(hb), 1);
    const __m512i hi = _mm512_srlv_epi32(h, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28));
    const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3);
    s = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_and_si512(lo, m15), _mm512_slli_epi32(_mm512_and_si512(hi, m3), 4)));
    m = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(lo, 4),
                                           _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hi, 2), m3), 4)));
}
template <int ID, int SUB>
inline __m512 sub_part2(const uint8_t* part, std::ptrdiff_t ts, const XQ8* xq, int nb, std::ptrdiff_t pf, __m512 tot) {
    constexpr int BLK = 8 * SUB;
    const uint8_t* sc = part + 32;
    const uint8_t* q = sc + 8 * (nb + (nb + 1) / 2);
    if (pf)
        for (int o = 0; o < 12 * nb; o += 64) {
            _mm_prefetch((const char*)(sc + pf + o), _MM_HINT_T0);
            _mm_prefetch((const char*)(sc + ts + pf + o), _MM_HINT_T0);
        }
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), mn = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b, q += BLK, sc += 12) {
        if (pf)
            for (int o = 0; o < BLK; o += 64) {
                _mm_prefetch((const char*)(q + pf + o), _MM_HINT_T0);
                _mm_prefetch((const char*)(q + ts + pf + o), _MM_HINT_T0);
            }
        __m512 sf, mf;
        sub_codes2(sc, ts, sf, mf);
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dsum2<ID>(q, ts, xq[b].q)), sf);
        if (b & 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(xq[b].d), f, a1);
        else a0 = _mm512_fmadd_ps(_mm512_set1_ps(xq[b].d), f, a0);
        mn = _mm512_fmadd_ps(_mm512_set1_ps(xq[b].ds), mf, mn);
    }
    return _mm512_fnmadd_ps(ph2(part + 16, ts), mn, _mm512_fmadd_ps(ph2(part, ts), _mm512_add_ps(a0, a1), tot));
}
template <int ID, int SUB>
inline void tile16_sub(const uint8_t* part, std::ptrdiff_t ts, size_t part_bytes, int nch, const XQ8* xq, int g_pad,
                       float* acc, std::ptrdiff_t pf) {
    const int nb = g_pad / 32;
    __m512 tot = _mm512_setzero_ps();
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb) tot = sub_part2<ID, SUB>(part, ts, xq, nb, pf, tot);
    add_acc(acc, tot);
}
}  // namespace
void tile16_q4s(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float*, int g, float* acc, std::ptrdiff_t pf) {
    tile16_sub<2, 16>(p, ts, pb, n, x, g, acc, pf);
}
void tile16_q3s(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float*, int g, float* acc, std::ptrdiff_t pf) {
    tile16_sub<3, 12>(p, ts, pb, n, x, g, acc, pf);
}
void tile16_q2s(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float*, int g, float* acc, std::ptrdiff_t pf) {
    tile16_sub<4, 8>(p, ts, pb, n, x, g, acc, pf);
}
void tile16_q4(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, std::ptrdiff_t pf) {
    tile16<2, 16>(p, ts, pb, n, x, s, g, acc, pf);
}
void tile16_q3(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, std::ptrdiff_t pf) {
    tile16<3, 12>(p, ts, pb, n, x, s, g, acc, pf);
}
void tile16_q2(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, std::ptrdiff_t pf) {
    tile16<4, 8>(p, ts, pb, n, x, s, g, acc, pf);
}
void tile16_q1(const uint8_t* p, std::ptrdiff_t ts, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, std::ptrdiff_t pf) {
    tile16<6, 4>(p, ts, pb, n, x, s, g, acc, pf);
}
// tile8_mix on two tiles; ternary parts (only with WQEDGE_TERNARY_TILES=1) run the 8-row kernel on each half.
void tile16_mix(const uint8_t* tile, std::ptrdiff_t ts, const TileDesc* d, int n, const XQ8* xq, const int* x8off,
                const float* xsum, float* acc, std::ptrdiff_t pf) {
    __m512 tot = _mm512_setzero_ps();
    for (int i = 0; i < n; ++i) {
        const uint8_t* part = tile + d[i].off;
        const XQ8* x = xq + x8off[d[i].c];
        if (d[i].kind == KIND_TERNARY) {
            const int g = 32 * d[i].nb, nx = ternary_x8(g);
            const float xs = xsum[d[i].c];
            const __m256 lo = adm(part, tchunk(part, x, g, pf), x, nx, xs, _mm512_castps512_ps256(tot));
            const __m256 hi = adm(part + ts, tchunk(part + ts, x, g, pf), x, nx, xs, _mm512_extractf32x8_ps(tot, 1));
            tot = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
            continue;
        }
        if (d[i].kind >= KIND_Q4S) {  // two-level parts
            switch (d[i].kind) {
                case KIND_Q4S: tot = sub_part2<2, 16>(part, ts, x, d[i].nb, pf, tot); break;
                case KIND_Q3S: tot = sub_part2<3, 12>(part, ts, x, d[i].nb, pf, tot); break;
                default: tot = sub_part2<4, 8>(part, ts, x, d[i].nb, pf, tot); break;
            }
            continue;
        }
        __m512 s;
        switch (d[i].kind) {
            case KIND_Q4: s = chunk2<2, 16>(part, ts, x, d[i].nb, pf); break;
            case KIND_Q3: s = chunk2<3, 12>(part, ts, x, d[i].nb, pf); break;
            case KIND_Q2: s = chunk2<4, 8>(part, ts, x, d[i].nb, pf); break;
            default: s = chunk2<6, 4>(part, ts, x, d[i].nb, pf); break;
        }
        tot = dm2(part, ts, s, xsum[d[i].c], tot);
    }
    add_acc(acc, tot);
}
}  // namespace vnni512
}  // namespace avx2
}  // namespace wqe
#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

// AVX-VNNI (VEX vpdpbusd)
#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c,avxvnni")
#endif
WQE_TILE_KERNELS(vnni256, _mm256_dpbusd_avx_epi32, 4)
#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

#endif
