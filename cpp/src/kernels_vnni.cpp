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

// NT_MAX: tokens per pass of the integer prefill's tile GEMM: 8 with AVX-512's 32 vector registers (8-12% less CPU time than
// 4 on the local Zen 4, bench/results/prefill_local_nt8.txt), 4 with AVX-VNNI's 16.
#define WQE_TILE_KERNELS(NS, DPBUSD, NT_MAX)                                                                                  \
    namespace wqe {                                                                                                   \
    namespace avx2 {                                                                                                  \
    namespace NS {                                                                                                    \
    namespace {                                                                                                       \
    inline __m256i bcast4(const int8_t* p) {                                                                          \
        int32_t v;                                                                                                    \
        memcpy(&v, p, 4);                                                                                             \
        return _mm256_set1_epi32(v);                                                                                  \
    }                                                                                                                 \
    /* the 8 column groups of one tiled block (kernels_avx2.cpp tile_groups, docs/format.md "Row tiles") */          \
    template <int ID>                                                                                                 \
    inline void groups(const uint8_t* q, __m256i g[8]) {                                                              \
        if (ID == 2) {                                                                                                \
            const __m256i m = _mm256_set1_epi8(0x0F);                                                                 \
            for (int v = 0; v < 4; ++v) {                                                                             \
                const __m256i w = _mm256_loadu_si256((const __m256i*)(q + 32 * v));                                   \
                g[v] = _mm256_and_si256(w, m);                                                                        \
                g[v + 4] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);                                              \
            }                                                                                                         \
        } else if (ID == 4) {                                                                                         \
            const __m256i m = _mm256_set1_epi8(3);                                                                    \
            for (int v = 0; v < 2; ++v) {                                                                             \
                const __m256i w = _mm256_loadu_si256((const __m256i*)(q + 32 * v));                                   \
                g[v] = _mm256_and_si256(w, m);                                                                        \
                g[v + 2] = _mm256_and_si256(_mm256_srli_epi16(w, 2), m);                                              \
                g[v + 4] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);                                              \
                g[v + 6] = _mm256_and_si256(_mm256_srli_epi16(w, 6), m);                                              \
            }                                                                                                         \
        } else if (ID == 3) { /* 3-bit fields in vectors a, b, c (kernels_avx2.cpp tile_groups) */                   \
            const __m256i a = _mm256_loadu_si256((const __m256i*)q), b = _mm256_loadu_si256((const __m256i*)(q + 32)); \
            const __m256i c = _mm256_loadu_si256((const __m256i*)(q + 64));                                           \
            const __m256i m7 = _mm256_set1_epi8(7), m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);             \
            g[0] = _mm256_and_si256(a, m7);                                                                           \
            g[1] = _mm256_and_si256(_mm256_srli_epi16(a, 3), m7);                                                     \
            g[2] = _mm256_and_si256(b, m7);                                                                           \
            g[3] = _mm256_and_si256(_mm256_srli_epi16(b, 3), m7);                                                     \
            g[4] = _mm256_and_si256(c, m7);                                                                           \
            g[5] = _mm256_and_si256(_mm256_srli_epi16(c, 3), m7);                                                     \
            g[6] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), m3),                                     \
                                   _mm256_and_si256(_mm256_srli_epi16(c, 4), four));                                  \
            g[7] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 6), m3),                                     \
                                   _mm256_and_si256(_mm256_srli_epi16(c, 5), four));                                  \
        } else {                                                                                                      \
            const __m256i w = _mm256_loadu_si256((const __m256i*)q), one = _mm256_set1_epi8(1);                       \
            g[0] = _mm256_and_si256(w, one);                                                                          \
            for (int k = 1; k < 8; ++k) g[k] = _mm256_and_si256(_mm256_srli_epi16(w, k), one);                        \
        }                                                                                                             \
    }                                                                                                                 \
    /* lane r = row r's exact int32 sum over one block (codes g, activations x): two dpbusd chains */                \
    inline __m256i isum(const __m256i g[8], const int8_t* x) {                                                        \
        __m256i s0 = DPBUSD(_mm256_setzero_si256(), g[0], bcast4(x));                                                 \
        __m256i s1 = DPBUSD(_mm256_setzero_si256(), g[4], bcast4(x + 16));                                            \
        s0 = DPBUSD(s0, g[1], bcast4(x + 4));                                                                         \
        s1 = DPBUSD(s1, g[5], bcast4(x + 20));                                                                        \
        s0 = DPBUSD(s0, g[2], bcast4(x + 8));                                                                         \
        s1 = DPBUSD(s1, g[6], bcast4(x + 24));                                                                        \
        s0 = DPBUSD(s0, g[3], bcast4(x + 12));                                                                        \
        s1 = DPBUSD(s1, g[7], bcast4(x + 28));                                                                        \
        return _mm256_add_epi32(s0, s1);                                                                              \
    }                                                                                                                 \
    /* Decode's block sum (lane r = row r's exact sum, as isum(groups)) with fewer unpacking operations: a group      \
       whose codes sit at bit 3 or 4 of their byte is masked in place (no shift) and goes to a chain of its own,      \
       scaled by 8 or 16, which one arithmetic shift per block undoes exactly (vpdpbusd sums in int32 without         \
       saturation: codes <= 240 are fine). 3 fewer operations per block for q4, q2, q1, 2 for q3. */                  \
    template <int ID>                                                                                                 \
    inline __m256i dsum(const uint8_t* q, const int8_t* x) {                                                          \
        __m256i u0 = _mm256_setzero_si256(), u1 = u0, s0 = u0, s1 = u0;                                               \
        if (ID == 2) { /* q4: vector v, low nibble group v, high nibble (x16) group v + 4 */                          \
            const __m256i lo = _mm256_set1_epi8(0x0F), hi = _mm256_set1_epi8((char)0xF0);                             \
            const __m256i w0 = _mm256_loadu_si256((const __m256i*)q), w1 = _mm256_loadu_si256((const __m256i*)(q + 32));\
            const __m256i w2 = _mm256_loadu_si256((const __m256i*)(q + 64)), w3 = _mm256_loadu_si256((const __m256i*)(q + 96));\
            u0 = DPBUSD(u0, _mm256_and_si256(w0, lo), bcast4(x));                                                     \
            u1 = DPBUSD(u1, _mm256_and_si256(w1, lo), bcast4(x + 4));                                                 \
            s0 = DPBUSD(s0, _mm256_and_si256(w0, hi), bcast4(x + 16));                                                \
            s1 = DPBUSD(s1, _mm256_and_si256(w1, hi), bcast4(x + 20));                                                \
            u0 = DPBUSD(u0, _mm256_and_si256(w2, lo), bcast4(x + 8));                                                 \
            u1 = DPBUSD(u1, _mm256_and_si256(w3, lo), bcast4(x + 12));                                                \
            s0 = DPBUSD(s0, _mm256_and_si256(w2, hi), bcast4(x + 24));                                                \
            s1 = DPBUSD(s1, _mm256_and_si256(w3, hi), bcast4(x + 28));                                                \
            return _mm256_add_epi32(_mm256_add_epi32(u0, u1), _mm256_srai_epi32(_mm256_add_epi32(s0, s1), 4));        \
        } else if (ID == 4) { /* q2: vector v, bits 2s: group 2s + v; bits 4-5 of w and of w >> 2 (x16) */            \
            const __m256i m = _mm256_set1_epi8(3), h = _mm256_set1_epi8(0x30);                                        \
            const __m256i w0 = _mm256_loadu_si256((const __m256i*)q), w1 = _mm256_loadu_si256((const __m256i*)(q + 32));\
            const __m256i v0 = _mm256_srli_epi16(w0, 2), v1 = _mm256_srli_epi16(w1, 2);                               \
            u0 = DPBUSD(u0, _mm256_and_si256(w0, m), bcast4(x));                                                      \
            u1 = DPBUSD(u1, _mm256_and_si256(w1, m), bcast4(x + 4));                                                  \
            s0 = DPBUSD(s0, _mm256_and_si256(w0, h), bcast4(x + 16));                                                 \
            s1 = DPBUSD(s1, _mm256_and_si256(w1, h), bcast4(x + 20));                                                 \
            u0 = DPBUSD(u0, _mm256_and_si256(v0, m), bcast4(x + 8));                                                  \
            u1 = DPBUSD(u1, _mm256_and_si256(v1, m), bcast4(x + 12));                                                 \
            s0 = DPBUSD(s0, _mm256_and_si256(v0, h), bcast4(x + 24));                                                 \
            s1 = DPBUSD(s1, _mm256_and_si256(v1, h), bcast4(x + 28));                                                 \
            return _mm256_add_epi32(_mm256_add_epi32(u0, u1), _mm256_srai_epi32(_mm256_add_epi32(s0, s1), 4));        \
        } else if (ID == 3) { /* q3 (3-bit fields a, b, c): g1, g3, g5 masked in place at bits 3-5 (x8) */            \
            const __m256i a = _mm256_loadu_si256((const __m256i*)q), b = _mm256_loadu_si256((const __m256i*)(q + 32)); \
            const __m256i c = _mm256_loadu_si256((const __m256i*)(q + 64));                                           \
            const __m256i m7 = _mm256_set1_epi8(7), m38 = _mm256_set1_epi8(0x38), m3 = _mm256_set1_epi8(3);           \
            const __m256i four = _mm256_set1_epi8(4);                                                                 \
            u0 = DPBUSD(u0, _mm256_and_si256(a, m7), bcast4(x));                                                      \
            s0 = DPBUSD(s0, _mm256_and_si256(a, m38), bcast4(x + 4));                                                 \
            u1 = DPBUSD(u1, _mm256_and_si256(b, m7), bcast4(x + 8));                                                  \
            s1 = DPBUSD(s1, _mm256_and_si256(b, m38), bcast4(x + 12));                                                \
            u0 = DPBUSD(u0, _mm256_and_si256(c, m7), bcast4(x + 16));                                                 \
            s0 = DPBUSD(s0, _mm256_and_si256(c, m38), bcast4(x + 20));                                                \
            u1 = DPBUSD(u1, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), m3),                            \
                                            _mm256_and_si256(_mm256_srli_epi16(c, 4), four)), bcast4(x + 24));        \
            u0 = DPBUSD(u0, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 6), m3),                            \
                                            _mm256_and_si256(_mm256_srli_epi16(c, 5), four)), bcast4(x + 28));        \
            return _mm256_add_epi32(_mm256_add_epi32(u0, u1), _mm256_srai_epi32(_mm256_add_epi32(s0, s1), 3));        \
        } else { /* q1: bit G = group G; bit k and bit 4 + k of w >> k (x16) */                                       \
            const __m256i w = _mm256_loadu_si256((const __m256i*)q), one = _mm256_set1_epi8(1);                       \
            const __m256i h = _mm256_set1_epi8(0x10);                                                                 \
            const __m256i w1 = _mm256_srli_epi16(w, 1), w2 = _mm256_srli_epi16(w, 2), w3 = _mm256_srli_epi16(w, 3);   \
            u0 = DPBUSD(u0, _mm256_and_si256(w, one), bcast4(x));                                                     \
            u1 = DPBUSD(u1, _mm256_and_si256(w1, one), bcast4(x + 4));                                                \
            s0 = DPBUSD(s0, _mm256_and_si256(w, h), bcast4(x + 16));                                                  \
            s1 = DPBUSD(s1, _mm256_and_si256(w1, h), bcast4(x + 20));                                                 \
            u0 = DPBUSD(u0, _mm256_and_si256(w2, one), bcast4(x + 8));                                                \
            u1 = DPBUSD(u1, _mm256_and_si256(w3, one), bcast4(x + 12));                                               \
            s0 = DPBUSD(s0, _mm256_and_si256(w2, h), bcast4(x + 24));                                                 \
            s1 = DPBUSD(s1, _mm256_and_si256(w3, h), bcast4(x + 28));                                                 \
            return _mm256_add_epi32(_mm256_add_epi32(u0, u1), _mm256_srai_epi32(_mm256_add_epi32(s0, s1), 4));        \
        }                                                                                                             \
    }                                                                                                                 \
    template <int ID, int SUB>                                                                                        \
    inline __m256 chunk(const uint8_t* part, const XQ8* xq, int nb, ptrdiff_t pf) {                                   \
        constexpr int BLK = 8 * SUB;                                                                                  \
        const uint8_t* q = part + 32;                                                                                 \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                                    \
        for (int b = 0; b < nb; ++b, q += BLK) {                                                                      \
            if (pf)                                                                                                   \
                for (int o = 0; o < BLK; o += 64) _mm_prefetch((const char*)(q + pf + o), _MM_HINT_T0);               \
            const __m256 f = _mm256_cvtepi32_ps(dsum<ID>(q, xq[b].q));                                                \
            if (b & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), f, a1);                                          \
            else a0 = _mm256_fmadd_ps(_mm256_set1_ps(xq[b].d), f, a0);                                                \
        }                                                                                                             \
        return _mm256_add_ps(a0, a1);                                                                                 \
    }                                                                                                                 \
    /* Ternary tiles (kernels_avx2.cpp tile_chunk_ternary): with p_i = 3^i byte mod 256 (u8), 3 p_i = 256 t_i + p_(i+1), */\
    /* so plane i's exact sum is (3 sum p_i x - sum p_(i+1) x) / 256: two vpdpbusd on the bytes themselves per plane  */\
    /* and two byte adds (p_(i+1) = 3 p_i), no trit extraction; minus the block's activation sum Q (all lanes), as the */\
    /* AVX2 kernel: the same int32 sums, the same float operations.                                                   */\
    inline __m256i qsum_all(const int8_t* q) {                                                                       \
        __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i*)q)),\
                                      _mm256_set1_epi16(1));                                                         \
        s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0x4E));                                                      \
        s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0xB1));                                                      \
        return _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 1));                                              \
    }                                                                                                                \
    inline __m256 tchunk(const uint8_t* part, const XQ8* xq, int g_pad, ptrdiff_t pf) {                              \
        const int B = 2 * ((g_pad + 9) / 10), nbp = (B + 31) / 32, nv = (B + 3) / 4;                                 \
        const uint8_t* q = part + 16;                                                                                \
        const __m256i zero = _mm256_setzero_si256();                                                                 \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                                   \
        for (int b = 0; b < nbp; ++b) {                                                                              \
            const int v0 = 8 * b, nvb = nv - v0 < 8 ? nv - v0 : 8;                                                   \
            if (pf)                                                                                                  \
                for (int o = 0; o < 32 * nvb; o += 64) _mm_prefetch((const char*)(q + 32 * v0 + pf + o), _MM_HINT_T0);\
            __m256i S[5] = {zero, zero, zero, zero, zero}, R[5] = {zero, zero, zero, zero, zero};                    \
            for (int v = 0; v < nvb; ++v) {                                                                          \
                __m256i p = _mm256_loadu_si256((const __m256i*)(q + 32 * (v0 + v)));                                 \
                for (int i = 0; i < 5; ++i) {                                                                        \
                    const __m256i x = bcast4(xq[i * nbp + b].q + 4 * v);                                             \
                    S[i] = DPBUSD(S[i], p, x);                                                                       \
                    p = _mm256_add_epi8(p, _mm256_add_epi8(p, p));                                                   \
                    R[i] = DPBUSD(R[i], p, x);                                                                       \
                }                                                                                                    \
            }                                                                                                        \
            for (int i = 0; i < 5; ++i) {                                                                            \
                const __m256i t = _mm256_srai_epi32(_mm256_sub_epi32(_mm256_add_epi32(S[i], _mm256_add_epi32(S[i], S[i])), R[i]), 8);\
                const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(t, qsum_all(xq[i * nbp + b].q)));               \
                if (i & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(xq[i * nbp + b].d), f, a1);                           \
                else a0 = _mm256_fmadd_ps(_mm256_set1_ps(xq[i * nbp + b].d), f, a0);                                 \
            }                                                                                                        \
        }                                                                                                            \
        return _mm256_add_ps(a0, a1);                                                                                \
    }                                                                                                                \
    inline int ternary_x8(int g_pad) { return 5 * ((2 * ((g_pad + 9) / 10) + 31) / 32); }                            \
    /* tot + a (sum + (ds - xsum)), ds = the sum of the chunk's nx blocks' XQ8::ds (in order) */                     \
    inline __m256 adm(const uint8_t* part, __m256 sum, const XQ8* xq, int nx, float xsum, __m256 tot) {              \
        float ds = 0.0f;                                                                                             \
        for (int k = 0; k < nx; ++k) ds += xq[k].ds;                                                                 \
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)part));                                     \
        return _mm256_fmadd_ps(a, _mm256_add_ps(sum, _mm256_set1_ps(ds - xsum)), tot);                               \
    }                                                                                                                \
    inline __m256 dm(const uint8_t* part, __m256 sum, float xsum, __m256 tot) {                                       \
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)part));                                      \
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(part + 16)));                               \
        return _mm256_fmadd_ps(m, _mm256_set1_ps(xsum), _mm256_fmadd_ps(d, sum, tot));                                \
    }                                                                                                                 \
    template <int ID, int SUB>                                                                                        \
    inline void tile8(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum, int g_pad, float* acc,\
                      ptrdiff_t pf) {                                                                                 \
        const int nb = g_pad / 32;                                                                                    \
        __m256 tot = _mm256_setzero_ps();                                                                             \
        for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb) tot = dm(part, chunk<ID, SUB>(part, xq, nb, pf), xsum[c], tot);\
        _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));                                              \
    }                                                                                                                 \
    /* integer prefill (kernels_avx2.cpp gemm_chunk / gemm_run: the same operations with vpdpbusd) */                \
    template <int ID, int NT>                                                                                         \
    inline void gemm_block(const uint8_t* q, const XQ8* xq, size_t xs, __m256 a[NT]) {                               \
        __m256i g[8];                                                                                                 \
        groups<ID>(q, g);                                                                                             \
        for (int t = 0; t < NT; ++t) {                                                                                \
            const XQ8& x = xq[t * xs];                                                                                \
            a[t] = _mm256_fmadd_ps(_mm256_set1_ps(x.d), _mm256_cvtepi32_ps(isum(g, x.q)), a[t]);                     \
        }                                                                                                             \
    }                                                                                                                 \
    template <int ID, int SUB, int NT>                                                                                \
    inline void gemm_chunk(const uint8_t* part, const XQ8* xq, size_t xs, int nb, __m256 out[NT]) {                  \
        constexpr int BLK = 8 * SUB;                                                                                  \
        const uint8_t* q = part + 32;                                                                                 \
        __m256 a0[NT], a1[NT];                                                                                        \
        for (int t = 0; t < NT; ++t) a0[t] = a1[t] = _mm256_setzero_ps();                                             \
        int b = 0;                                                                                                    \
        for (; b + 2 <= nb; b += 2) {                                                                                 \
            gemm_block<ID, NT>(q + (size_t)b * BLK, xq + b, xs, a0);                                                  \
            gemm_block<ID, NT>(q + (size_t)(b + 1) * BLK, xq + b + 1, xs, a1);                                        \
        }                                                                                                             \
        if (b < nb) gemm_block<ID, NT>(q + (size_t)b * BLK, xq + b, xs, a0);                                          \
        for (int t = 0; t < NT; ++t) out[t] = _mm256_add_ps(a0[t], a1[t]);                                            \
    }                                                                                                                 \
    template <int NT>                                                                                                 \
    inline void gemm_run(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xs, const int* x8off,  \
                         const float* xsum, size_t ss, float* acc) {                                                  \
        __m256 tot[NT];                                                                                               \
        for (int t = 0; t < NT; ++t) tot[t] = _mm256_setzero_ps();                                                    \
        for (int i = 0; i < n; ++i) {                                                                                 \
            const uint8_t* part = tile + d[i].off;                                                                    \
            const XQ8* x = xq + x8off[d[i].c];                                                                       \
            if (d[i].kind == 5) {                                                                                    \
                for (int t = 0; t < NT; ++t)                                                                         \
                    tot[t] = adm(part, tchunk(part, x + t * xs, 32 * d[i].nb, 0), x + t * xs, ternary_x8(32 * d[i].nb),\
                                 xsum[t * ss + d[i].c], tot[t]);                                                     \
                continue;                                                                                            \
            }                                                                                                        \
            __m256 s[NT];                                                                                            \
            switch (d[i].kind) {                                                                                      \
                case 2: gemm_chunk<2, 16, NT>(part, x, xs, d[i].nb, s); break;                                        \
                case 3: gemm_chunk<3, 12, NT>(part, x, xs, d[i].nb, s); break;                                        \
                case 4: gemm_chunk<4, 8, NT>(part, x, xs, d[i].nb, s); break;                                         \
                default: gemm_chunk<6, 4, NT>(part, x, xs, d[i].nb, s); break;                                        \
            }                                                                                                         \
            for (int t = 0; t < NT; ++t) tot[t] = dm(part, s[t], xsum[t * ss + d[i].c], tot[t]);                      \
        }                                                                                                             \
        for (int t = 0; t < NT; ++t) _mm256_storeu_ps(acc + 8 * t, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * t), tot[t]));\
    }                                                                                                                 \
    }                                                                                                                 \
    void tile8_gemm(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xs, const int* x8off,       \
                    const float* xsum, size_t ss, int nt, float* acc) {                                               \
        for (; nt >= NT_MAX; nt -= NT_MAX, xq += NT_MAX * xs, xsum += NT_MAX * ss, acc += 8 * NT_MAX)                  \
            gemm_run<NT_MAX>(tile, d, n, xq, xs, x8off, xsum, ss, acc);                                               \
        for (; nt >= 4; nt -= 4, xq += 4 * xs, xsum += 4 * ss, acc += 32) gemm_run<4>(tile, d, n, xq, xs, x8off, xsum, ss, acc);\
        if (nt == 3) gemm_run<3>(tile, d, n, xq, xs, x8off, xsum, ss, acc);                                           \
        else if (nt == 2) gemm_run<2>(tile, d, n, xq, xs, x8off, xsum, ss, acc);                                      \
        else if (nt == 1) gemm_run<1>(tile, d, n, xq, xs, x8off, xsum, ss, acc);                                      \
    }                                                                                                                 \
    void tile8_mix(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, const int* x8off, const float* xsum, \
                   float* acc, ptrdiff_t pf) {                                                                        \
        __m256 tot = _mm256_setzero_ps();                                                                             \
        for (int i = 0; i < n; ++i) {                                                                                 \
            const uint8_t* part = tile + d[i].off;                                                                    \
            const XQ8* x = xq + x8off[d[i].c];                                                                       \
            if (d[i].kind == 5) {                                                                                    \
                tot = adm(part, tchunk(part, x, 32 * d[i].nb, pf), x, ternary_x8(32 * d[i].nb), xsum[d[i].c], tot);  \
                continue;                                                                                            \
            }                                                                                                        \
            __m256 s;                                                                                                \
            switch (d[i].kind) {                                                                                      \
                case 2: s = chunk<2, 16>(part, x, d[i].nb, pf); break;                                                \
                case 3: s = chunk<3, 12>(part, x, d[i].nb, pf); break;                                                \
                case 4: s = chunk<4, 8>(part, x, d[i].nb, pf); break;                                                 \
                default: s = chunk<6, 4>(part, x, d[i].nb, pf); break;                                                \
            }                                                                                                         \
            tot = dm(part, s, xsum[d[i].c], tot);                                                                     \
        }                                                                                                             \
        _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));                                              \
    }                                                                                                                 \
    void tile8_ternary(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) {\
        const int nx = 5 * ((2 * ((g + 9) / 10) + 31) / 32);                                                         \
        __m256 tot = _mm256_setzero_ps();                                                                            \
        for (int c = 0; c < n; ++c, p += pb, x += nx) tot = adm(p, tchunk(p, x, g, pf), x, nx, s[c], tot);                  \
        _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), tot));                                             \
    }                                                                                                                \
    void tile8_q4(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { \
        tile8<2, 16>(p, pb, n, x, s, g, acc, pf);                                                                     \
    }                                                                                                                 \
    void tile8_q3(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { \
        tile8<3, 12>(p, pb, n, x, s, g, acc, pf);                                                                     \
    }                                                                                                                 \
    void tile8_q2(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { \
        tile8<4, 8>(p, pb, n, x, s, g, acc, pf);                                                                      \
    }                                                                                                                 \
    void tile8_q1(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc, ptrdiff_t pf) { \
        tile8<6, 4>(p, pb, n, x, s, g, acc, pf);                                                                      \
    }                                                                                                                 \
    }                                                                                                                 \
    }                                                                                                                 \
    }

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
}  // namespace
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
        if (d[i].kind == 5) {
            const int g = 32 * d[i].nb, nx = ternary_x8(g);
            const float xs = xsum[d[i].c];
            const __m256 lo = adm(part, tchunk(part, x, g, pf), x, nx, xs, _mm512_castps512_ps256(tot));
            const __m256 hi = adm(part + ts, tchunk(part + ts, x, g, pf), x, nx, xs, _mm512_extractf32x8_ps(tot, 1));
            tot = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
            continue;
        }
        __m512 s;
        switch (d[i].kind) {
            case 2: s = chunk2<2, 16>(part, ts, x, d[i].nb, pf); break;
            case 3: s = chunk2<3, 12>(part, ts, x, d[i].nb, pf); break;
            case 4: s = chunk2<4, 8>(part, ts, x, d[i].nb, pf); break;
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
