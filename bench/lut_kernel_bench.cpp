// Lookup-table (LUT) kernels for the low-bit kinds q2 and q1 against our int8 VNNI row tiles (issue 12): compute
// throughput with the weights resident in L1/L2, in the unit of bench/tile_kernel_bench.cpp (ns per 32 columns x 8 rows).
//
// The technique (T-MAC / bitnet.cpp TL): per token, for every group of g = 4 consecutive int8 activations, a table of
// the 16 sums over the subsets of the group; each weight bit-plane then reads 4 weights' worth of products with one
// byte of a `vpshufb`, so the cost is linear in the number of bit-planes (q2: 2, q1: 1).
//
// Exact variant (the only one here; no int8-quantized inexact T-MAC tables): a table entry (a sum of up to 4 int8,
// +-508) does not fit a byte, so every activation is split into nibbles, x = 16 * (x >> 4) + (x & 15) (arithmetic
// shift): two 16-entry byte tables per group, L (sums of the low nibbles, 0..60, unsigned) and H (sums of the signed
// high nibbles, -32..28). Four groups' L lookups add up in bytes without overflow (<= 240) and four groups' H lookups
// too (>= -128), then vpmaddubsw weighs and widens them to int16 (L with the plane weights 1, 2 as the signed operand;
// H with 16, 32 as the unsigned operand): the int16 block sums are exact (|sum| <= 32 * 3 * 128 = 12288).
// Layout (a load-time repack in a product): each 128-bit lane of a register is one 32-column block (so the per-block
// sums never leave their lane, and d_b multiplies them as floats per lane), its 16 bytes are 8 rows x 2 planes (q2)
// or 16 rows (q1) of one group's 4-bit indices; two groups' indices share a byte (low / high nibble), so the weights
// take exactly 2 (q2) / 1 (q1) bits each. AVX-512: 4 blocks (a 128-column chunk) per zmm, tiles of 16 rows; the
// high-nibble indices come out with one GFNI affine (vgf2p8affineqb, a per-byte shift right by 4). AVX2: 2 blocks
// (64 columns) per ymm, vpsrlw + vpand, nothing beyond AVX2.
// The tables (+ the per-lane d_b vectors) are built once per token for all K columns and shared by all rows of all
// linears that read the same input; "full" below includes that build amortized over the -n rows of this run,
// "kernel" leaves it out, "build" is the table build alone per 32x8 of this run.
//
// Checks (PASS/FAIL per kernel): (1) all d_b = 1: the outputs are sums of integers < 2^24, exact in any order, so
// they must equal the scalar reference exactly (the integer path is bit-faithful); (2) random d_b: exact float equality
// with the scalar reference evaluated in the kernel's order of float operations (fma per block, accumulators by
// block mod 4 (AVX-512) or mod 2 (AVX2)); the max relative error against the plain sequential-order reference
// (out = sum_b d_b * S_b, b = 0, 1, ...) is printed for information.
//
//   g++ -O2 -std=c++17 -ffp-contract=off bench/lut_kernel_bench.cpp -o /tmp/lkb
//   /tmp/lkb [-k 2048] [-n 64] [-r 2000]          (K columns, n rows (multiple of 16), r repetitions per timing run)
// Production kernels for comparison, same unit (bench/tile_kernel_bench.cpp):
//   cmake --build cpp/build -j2
//   g++ -O2 -std=c++17 -Icpp/src bench/tile_kernel_bench.cpp cpp/build/libwqedge.a -lpthread -o /tmp/tkb
//   /tmp/tkb -2 q2 q1; /tmp/tkb q2 q1; /tmp/tkb -v 0 q2 q1
#include <immintrin.h>
#include <x86intrin.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

template <class V>
struct AVec {  // 64-byte aligned array of vector registers (std::vector ignores the vector types' alignment)
    V* p = nullptr;
    size_t n = 0;
    void resize(size_t m) {
        std::free(p);
        n = m;
        p = (V*)std::aligned_alloc(64, (m * sizeof(V) + 63) / 64 * 64);
    }
    ~AVec() { std::free(p); }
    V* data() { return p; }
    const V* data() const { return p; }
    V& operator[](size_t i) { return p[i]; }
};
#pragma GCC diagnostic ignored "-Wignored-attributes"  // AVec<__m512i>: the alignment is AVec's own
struct XQ8 {  // as cpp/src/blocks.h
    float d, ds;
    int8_t q[32];
};

// ---------------------------------------------------------------- scalar references
// exact int32 block sums S[r][b] = sum_{j in b} c[r][j] * x[j]
static void ref_sums(const uint8_t* codes, int N, int K, const XQ8* xq, std::vector<int32_t>& S) {
    const int nb = K / 32;
    S.assign((size_t)N * nb, 0);
    for (int r = 0; r < N; ++r)
        for (int b = 0; b < nb; ++b) {
            int32_t s = 0;
            for (int j = 0; j < 32; ++j) s += (int32_t)codes[(size_t)r * K + 32 * b + j] * xq[b].q[j];
            S[(size_t)r * nb + b] = s;
        }
}
// sequential order: out[r] = sum_b d_b * S_b
static void ref_seq(const std::vector<int32_t>& S, int N, int nb, const XQ8* xq, float* out) {
    for (int r = 0; r < N; ++r) {
        float a = 0.f;
        for (int b = 0; b < nb; ++b) a += xq[b].d * (float)S[(size_t)r * nb + b];
        out[r] = a;
    }
}
// kernel order: M fma chains by b mod M; M = 4: (a0 + a2) + (a1 + a3), M = 2: a0 + a1
static void ref_kernel_order(const std::vector<int32_t>& S, int N, int nb, const XQ8* xq, int M, float* out) {
    for (int r = 0; r < N; ++r) {
        float a[4] = {0, 0, 0, 0};
        for (int b = 0; b < nb; ++b) a[b % M] = std::fma((float)S[(size_t)r * nb + b], xq[b].d, a[b % M]);
        out[r] = M == 4 ? (a[0] + a[2]) + (a[1] + a[3]) : a[0] + a[1];
    }
}

// ---------------------------------------------------------------- repack (load time in a product)
// 4-bit index of group k (columns col0 + 4k .. + 3) of row r, plane p
static inline uint8_t gidx(const uint8_t* codes, int K, int r, int col, int p) {
    uint8_t v = 0;
    for (int j = 0; j < 4; ++j) v |= (uint8_t)(((codes[(size_t)r * K + col + j] >> p) & 1) << j);
    return v;
}
// LB blocks per register (4: zmm, 2: ymm), tiles of 16 rows, chunks of 32 * LB columns.
// q2: per (tile, chunk, row half h, group pair kp): 16 * LB bytes; lane l, byte 2 * r + p = row 8h + r, plane p,
//     low nibble group kp, high nibble group kp + 4.
// q1: per (tile, chunk, kp): 16 * LB bytes; lane l, byte i = row i.
static std::vector<uint8_t> repack(const uint8_t* codes, int N, int K, int bits, int LB) {
    const int CW = 32 * LB, nch = K / CW;
    std::vector<uint8_t> w((size_t)N * K * bits / 8);
    size_t o = 0;
    for (int t = 0; t < N / 16; ++t)
        for (int c = 0; c < nch; ++c)
            for (int h = 0; h < (bits == 2 ? 2 : 1); ++h)
                for (int kp = 0; kp < 4; ++kp)
                    for (int l = 0; l < LB; ++l)
                        for (int i = 0; i < 16; ++i) {
                            const int r = bits == 2 ? 16 * t + 8 * h + i / 2 : 16 * t + i, p = bits == 2 ? i % 2 : 0;
                            const int col = c * CW + 32 * l;
                            w[o++] = (uint8_t)(gidx(codes, K, r, col + 4 * kp, p) | gidx(codes, K, r, col + 4 * (kp + 4), p) << 4);
                        }
    return w;
}

// index vectors for the table build: lane byte i = (bit j of i) ? 4 * k + j : 0x80 (vpshufb zero)
static void build_idx(int k, int j, int8_t* v, int n) {
    for (int i = 0; i < n; ++i) v[i] = ((i & 15) >> j & 1) ? (int8_t)(4 * k + j) : (int8_t)0x80;
}

// ================================================================ AVX-512 (BW + GFNI)
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,gfni")
struct Tab512 {
    AVec<__m512i> t;  // [chunk][group k][L, H]
    AVec<__m512> dv;  // [chunk][2]: (d_4c x8, d_4c+1 x8), (d_4c+2 x8, d_4c+3 x8)
    __m512i idx[4][4];
};
static void tab512_init(Tab512& T, int K) {
    T.t.resize((size_t)K / 128 * 16);
    T.dv.resize((size_t)K / 128 * 2);
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 4; ++j) {
            alignas(64) int8_t v[64];
            build_idx(k, j, v, 64);
            T.idx[k][j] = _mm512_load_si512(v);
        }
}
__attribute__((noinline)) static void build512(const XQ8* xq, int K, Tab512& T) {
    const int nch = K / 128;
    const __m512i m0f = _mm512_set1_epi8(0x0F), m8 = _mm512_set1_epi8(8);
    __m512i I[4][4];
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 4; ++j) I[k][j] = T.idx[k][j];
    __m512i* tp = T.t.data();
    for (int c = 0; c < nch; ++c) {
        const XQ8* x = xq + 4 * c;
        for (int half = 0; half < 2; ++half) {
            const int o = 16 * half;
            __m512i src = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(x[0].q + o)));
            src = _mm512_inserti32x4(src, _mm_loadu_si128((const __m128i*)(x[1].q + o)), 1);
            src = _mm512_inserti32x4(src, _mm_loadu_si128((const __m128i*)(x[2].q + o)), 2);
            src = _mm512_inserti32x4(src, _mm_loadu_si128((const __m128i*)(x[3].q + o)), 3);
            const __m512i sl = _mm512_and_si512(src, m0f);
            const __m512i sh = _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(src, 4), m0f), m8), m8);
            for (int k = 0; k < 4; ++k) {
                const __m512i L = _mm512_add_epi8(_mm512_add_epi8(_mm512_shuffle_epi8(sl, I[k][0]), _mm512_shuffle_epi8(sl, I[k][1])),
                                                  _mm512_add_epi8(_mm512_shuffle_epi8(sl, I[k][2]), _mm512_shuffle_epi8(sl, I[k][3])));
                const __m512i H = _mm512_add_epi8(_mm512_add_epi8(_mm512_shuffle_epi8(sh, I[k][0]), _mm512_shuffle_epi8(sh, I[k][1])),
                                                  _mm512_add_epi8(_mm512_shuffle_epi8(sh, I[k][2]), _mm512_shuffle_epi8(sh, I[k][3])));
                _mm512_store_si512(tp + (c * 8 + 4 * half + k) * 2, L);
                _mm512_store_si512(tp + (c * 8 + 4 * half + k) * 2 + 1, H);
            }
        }
        T.dv[2 * c] = _mm512_insertf32x8(_mm512_set1_ps(x[0].d), _mm256_set1_ps(x[1].d), 1);
        T.dv[2 * c + 1] = _mm512_insertf32x8(_mm512_set1_ps(x[2].d), _mm256_set1_ps(x[3].d), 1);
    }
}
static inline __m512i hi_nib512(__m512i w) {  // per byte w >> 4 (GF(2) affine: output bit i = input bit i + 4)
    return _mm512_gf2p8affine_epi64_epi8(w, _mm512_set1_epi64(0x1020408000000000LL), 0);
}
static inline void fma_blocks512(__m512i s16, const __m512* dv, __m512& a01, __m512& a23) {
    a01 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(s16))), dv[0], a01);
    a23 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s16, 1))), dv[1], a23);
}
static inline void store8_512(float* out, __m512 a01, __m512 a23) {
    const __m512 s = _mm512_add_ps(a01, a23);  // low: blocks 0 + 2 (mod 4), high: 1 + 3
    _mm256_storeu_ps(out, _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
}
// the 4 pairs of group lookups of one 256-byte step: L (low-nibble tables) and H (high) for the low and the high
// 4-bit indices of every byte, summed in bytes (no overflow: <= 240, >= -128)
static inline __attribute__((always_inline)) void lookups512(const uint8_t* w, const __m512i* tb, __m512i& L0,
                                                            __m512i& H0, __m512i& L1, __m512i& H1) {
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    {
        const __m512i x = _mm512_loadu_si512(w), lo = _mm512_and_si512(x, m0f), hi = hi_nib512(x);
        L0 = _mm512_shuffle_epi8(tb[0], lo);
        H0 = _mm512_shuffle_epi8(tb[1], lo);
        L1 = _mm512_shuffle_epi8(tb[8], hi);
        H1 = _mm512_shuffle_epi8(tb[9], hi);
    }
#pragma GCC unroll 4
    for (int kp = 1; kp < 4; ++kp) {
        const __m512i x = _mm512_loadu_si512(w + 64 * kp), lo = _mm512_and_si512(x, m0f), hi = hi_nib512(x);
        L0 = _mm512_add_epi8(L0, _mm512_shuffle_epi8(tb[2 * kp], lo));
        H0 = _mm512_add_epi8(H0, _mm512_shuffle_epi8(tb[2 * kp + 1], lo));
        L1 = _mm512_add_epi8(L1, _mm512_shuffle_epi8(tb[2 * kp + 8], hi));
        H1 = _mm512_add_epi8(H1, _mm512_shuffle_epi8(tb[2 * kp + 9], hi));
    }
}
// one row half of a 16-row tile, one 128-column chunk: the 4 blocks' exact int16 sums of its 8 rows (lane = block)
static inline __attribute__((always_inline)) __m512i half512_q2(const uint8_t* w, const __m512i* tb) {
    const __m512i c12 = _mm512_set1_epi16(0x0201), c1632 = _mm512_set1_epi16(0x2010);
    __m512i L0, L1, H0, H1;
    lookups512(w, tb, L0, H0, L1, H1);
    return _mm512_add_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(L0, c12), _mm512_maddubs_epi16(L1, c12)),
                            _mm512_add_epi16(_mm512_maddubs_epi16(c1632, H0), _mm512_maddubs_epi16(c1632, H1)));
}
__attribute__((noinline)) static void lut512_q2(const uint8_t* W, int N, int K, const Tab512& T, float* out) {
    const int nch = K / 128;
    const __m512i* tab = T.t.data();
    const __m512* dv = T.dv.data();
    const uint8_t* w = W;
    for (int t = 0; t < N / 16; ++t) {
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
        for (int c = 0; c < nch; ++c, w += 512) {
            const __m512i* tb = tab + 16 * c;
            fma_blocks512(half512_q2(w, tb), dv + 2 * c, a00, a01);
            fma_blocks512(half512_q2(w + 256, tb), dv + 2 * c, a10, a11);
        }
        store8_512(out + 16 * t, a00, a01);
        store8_512(out + 16 * t + 8, a10, a11);
    }
}
__attribute__((noinline)) static void lut512_q1(const uint8_t* W, int N, int K, const Tab512& T, float* out) {
    const int nch = K / 128;
    const __m512i one = _mm512_set1_epi8(1), c16 = _mm512_set1_epi8(16);
    const __m512i* tab = T.t.data();
    const __m512* dv = T.dv.data();
    const uint8_t* w = W;
    for (int t = 0; t < N / 16; ++t) {
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
        for (int c = 0; c < nch; ++c, w += 256) {
            const __m512i* tb = tab + 16 * c;
            __m512i L0, L1, H0, H1;
            lookups512(w, tb, L0, H0, L1, H1);
            // rows 0-7 / 8-15 of each lane: interleave the two group halves, one vpmaddubsw adds them (and x16 for H)
            const __m512i sA = _mm512_add_epi16(_mm512_maddubs_epi16(_mm512_unpacklo_epi8(L0, L1), one),
                                                _mm512_maddubs_epi16(c16, _mm512_unpacklo_epi8(H0, H1)));
            const __m512i sB = _mm512_add_epi16(_mm512_maddubs_epi16(_mm512_unpackhi_epi8(L0, L1), one),
                                                _mm512_maddubs_epi16(c16, _mm512_unpackhi_epi8(H0, H1)));
            fma_blocks512(sA, dv + 2 * c, a00, a01);
            fma_blocks512(sB, dv + 2 * c, a10, a11);
        }
        store8_512(out + 16 * t, a00, a01);
        store8_512(out + 16 * t + 8, a10, a11);
    }
}
#pragma GCC pop_options

// ================================================================ AVX2 only (VEX, no VNNI, no GFNI)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct Tab256 {
    AVec<__m256i> t;  // [chunk of 64 columns][group k][L, H]
    __m256i idx[4][4];
};
static void tab256_init(Tab256& T, int K) {
    T.t.resize((size_t)K / 64 * 16);
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 4; ++j) {
            alignas(32) int8_t v[32];
            build_idx(k, j, v, 32);
            T.idx[k][j] = _mm256_load_si256((const __m256i*)v);
        }
}
__attribute__((noinline)) static void build256(const XQ8* xq, int K, Tab256& T) {
    const int nch = K / 64;
    const __m256i m0f = _mm256_set1_epi8(0x0F), m8 = _mm256_set1_epi8(8);
    __m256i I[4][4];
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 4; ++j) I[k][j] = T.idx[k][j];
    __m256i* tp = T.t.data();
    for (int c = 0; c < nch; ++c) {
        const XQ8* x = xq + 2 * c;
        for (int half = 0; half < 2; ++half) {
            const int o = 16 * half;
            const __m256i src = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(x[0].q + o))),
                                                        _mm_loadu_si128((const __m128i*)(x[1].q + o)), 1);
            const __m256i sl = _mm256_and_si256(src, m0f);
            const __m256i sh = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(src, 4), m0f), m8), m8);
            for (int k = 0; k < 4; ++k) {
                const __m256i L = _mm256_add_epi8(_mm256_add_epi8(_mm256_shuffle_epi8(sl, I[k][0]), _mm256_shuffle_epi8(sl, I[k][1])),
                                                  _mm256_add_epi8(_mm256_shuffle_epi8(sl, I[k][2]), _mm256_shuffle_epi8(sl, I[k][3])));
                const __m256i H = _mm256_add_epi8(_mm256_add_epi8(_mm256_shuffle_epi8(sh, I[k][0]), _mm256_shuffle_epi8(sh, I[k][1])),
                                                  _mm256_add_epi8(_mm256_shuffle_epi8(sh, I[k][2]), _mm256_shuffle_epi8(sh, I[k][3])));
                _mm256_store_si256(tp + (c * 8 + 4 * half + k) * 2, L);
                _mm256_store_si256(tp + (c * 8 + 4 * half + k) * 2 + 1, H);
            }
        }
    }
}
static inline void fma_blocks256(__m256i s16, const XQ8* x, __m256& a0, __m256& a1) {
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16))), _mm256_set1_ps(x[0].d), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16, 1))), _mm256_set1_ps(x[1].d), a1);
}
static inline __attribute__((always_inline)) void lookups256(const uint8_t* w, const __m256i* tb, __m256i& L0,
                                                            __m256i& H0, __m256i& L1, __m256i& H1) {  // as lookups512
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    {
        const __m256i x = _mm256_loadu_si256((const __m256i*)w), lo = _mm256_and_si256(x, m0f);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m0f);
        L0 = _mm256_shuffle_epi8(tb[0], lo);
        H0 = _mm256_shuffle_epi8(tb[1], lo);
        L1 = _mm256_shuffle_epi8(tb[8], hi);
        H1 = _mm256_shuffle_epi8(tb[9], hi);
    }
#pragma GCC unroll 1
    for (int kp = 1; kp < 4; ++kp) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(w + 32 * kp)), lo = _mm256_and_si256(x, m0f);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m0f);
        L0 = _mm256_add_epi8(L0, _mm256_shuffle_epi8(tb[2 * kp], lo));
        H0 = _mm256_add_epi8(H0, _mm256_shuffle_epi8(tb[2 * kp + 1], lo));
        L1 = _mm256_add_epi8(L1, _mm256_shuffle_epi8(tb[2 * kp + 8], hi));
        H1 = _mm256_add_epi8(H1, _mm256_shuffle_epi8(tb[2 * kp + 9], hi));
    }
}
static inline __attribute__((always_inline)) __m256i half256_q2(const uint8_t* w, const __m256i* tb) {
    const __m256i c12 = _mm256_set1_epi16(0x0201), c1632 = _mm256_set1_epi16(0x2010);
    __m256i L0, L1, H0, H1;
    lookups256(w, tb, L0, H0, L1, H1);
    return _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(L0, c12), _mm256_maddubs_epi16(L1, c12)),
                            _mm256_add_epi16(_mm256_maddubs_epi16(c1632, H0), _mm256_maddubs_epi16(c1632, H1)));
}
__attribute__((noinline)) static void lut256_q2(const uint8_t* W, int N, int K, const Tab256& T, const XQ8* xq, float* out) {
    const int nch = K / 64;
    const __m256i* tab = T.t.data();
    const uint8_t* w = W;
    for (int t = 0; t < N / 16; ++t, w += 256 * nch)
        for (int h = 0; h < 2; ++h) {  // one row half at a time: 16 ymm registers hold 2 accumulators, not 4
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int c = 0; c < nch; ++c) fma_blocks256(half256_q2(w + 256 * c + 128 * h, tab + 16 * c), xq + 2 * c, a0, a1);
            _mm256_storeu_ps(out + 16 * t + 8 * h, _mm256_add_ps(a0, a1));
        }
}
__attribute__((noinline)) static void lut256_q1(const uint8_t* W, int N, int K, const Tab256& T, const XQ8* xq, float* out) {
    const int nch = K / 64;
    const __m256i one = _mm256_set1_epi8(1), c16 = _mm256_set1_epi8(16);
    const __m256i* tab = T.t.data();
    const uint8_t* w = W;
    for (int t = 0; t < N / 16; ++t) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
        for (int c = 0; c < nch; ++c, w += 128) {
            const __m256i* tb = tab + 16 * c;
            __m256i L0, L1, H0, H1;
            lookups256(w, tb, L0, H0, L1, H1);
            const __m256i sA = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_unpacklo_epi8(L0, L1), one),
                                                _mm256_maddubs_epi16(c16, _mm256_unpacklo_epi8(H0, H1)));
            const __m256i sB = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_unpackhi_epi8(L0, L1), one),
                                                _mm256_maddubs_epi16(c16, _mm256_unpackhi_epi8(H0, H1)));
            fma_blocks256(sA, xq + 2 * c, a00, a01);
            fma_blocks256(sB, xq + 2 * c, a10, a11);
        }
        _mm256_storeu_ps(out + 16 * t, _mm256_add_ps(a00, a01));
        _mm256_storeu_ps(out + 16 * t + 8, _mm256_add_ps(a10, a11));
    }
}
#pragma GCC pop_options

// ---------------------------------------------------------------- driver
static bool has512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("gfni");
}

template <class F>
static double best_ns(F f, int reps) {  // best of 5 runs of reps calls, ns per call
    for (int i = 0; i < reps / 10 + 1; ++i) f();
    double best = 1e30;
    for (int round = 0; round < 5; ++round) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) f();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
    }
    return best * 1e9;
}

int main(int argc, char** argv) {
    int K = 2048, N = 64, reps = 2000;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "-k")) K = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-n")) N = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r")) reps = atoi(argv[++i]);
    }
    if (K % 128 || N % 16) {
        fprintf(stderr, "K must be a multiple of 128, n of 16\n");
        return 1;
    }
    const int nb = K / 32;
    const bool z = has512();
    std::mt19937 rng(7);
    std::vector<XQ8> xq(nb), xq1(nb);
    for (int b = 0; b < nb; ++b) {
        xq[b].d = std::ldexp(0.5f + (rng() % 1000000) / 1e6f, -(int)(rng() % 8) - 4);
        xq[b].ds = 0;
        for (auto& q : xq[b].q) q = (int8_t)(rng() & 255);  // full int8 range, -128 included
        xq1[b] = xq[b];
        xq1[b].d = 1.0f;
    }
    for (int j = 0; j < 4; ++j) xq[0].q[j] = xq1[0].q[j] = -128;  // extreme table entries (H = -32, L sums)
    for (int j = 4; j < 8; ++j) xq[0].q[j] = xq1[0].q[j] = 127;

    const double units = (double)nb * (N / 8);  // 32 columns x 8 rows
    printf("LUT kernels (exact, g = 4, nibble-split byte tables): K %d, %d rows (%zu tiles of 16 rows), reps %d; ns per 32 columns x 8 rows\n",
           K, N, (size_t)N / 16, reps);
    printf("%-22s %8s %8s %8s   %s\n", "kernel", "full", "kernel", "build", "check");
    std::vector<float> out(N), ref(N), seq(N);
    std::vector<int32_t> S;
    volatile float sink = 0;
    for (int bits : {2, 1}) {
        std::vector<uint8_t> codes((size_t)N * K);
        for (auto& c : codes) c = (uint8_t)(rng() % (bits == 2 ? 4 : 2));
        for (int j = 0; j < 32; ++j) codes[j] = (uint8_t)(bits == 2 ? 3 : 1);  // row 0 block 0: all-max codes
        const char* kind = bits == 2 ? "q2" : "q1";
        for (int isa : {512, 256}) {
            if (isa == 512 && !z) {
                printf("%s lut avx512: not available on this CPU\n", kind);
                continue;
            }
            const int LB = isa == 512 ? 4 : 2;
            const std::vector<uint8_t> W = repack(codes.data(), N, K, bits, LB);
            Tab512 T5;
            Tab256 T2;
            if (isa == 512) tab512_init(T5, K);
            else tab256_init(T2, K);
            auto build = [&](const XQ8* x) {
                if (isa == 512) build512(x, K, T5);
                else build256(x, K, T2);
            };
            auto kern = [&](const XQ8* x) {
                if (isa == 512) (bits == 2 ? lut512_q2 : lut512_q1)(W.data(), N, K, T5, out.data());
                else (bits == 2 ? lut256_q2 : lut256_q1)(W.data(), N, K, T2, x, out.data());
            };
            // checks
            bool ok = true;
            ref_sums(codes.data(), N, K, xq1.data(), S);
            ref_seq(S, N, nb, xq1.data(), ref.data());
            build(xq1.data());
            kern(xq1.data());
            for (int r = 0; r < N; ++r) ok &= out[r] == ref[r];
            const bool ok_int = ok;
            ref_kernel_order(S, N, nb, xq.data(), isa == 512 ? 4 : 2, ref.data());
            ref_seq(S, N, nb, xq.data(), seq.data());
            build(xq.data());
            kern(xq.data());
            double rel = 0, mag = 0;
            for (int r = 0; r < N; ++r) {
                ok &= out[r] == ref[r];
                mag = std::max(mag, (double)std::fabs(seq[r]));
            }
            for (int r = 0; r < N; ++r) rel = std::max(rel, std::fabs((double)out[r] - seq[r]) / mag);
            // timing
            const double tf = best_ns([&] { build(xq.data()); kern(xq.data()); sink = sink + out[0]; }, reps);
            const double tk = best_ns([&] { kern(xq.data()); sink = sink + out[0]; }, reps);
            const double tb = best_ns([&] { build(xq.data()); }, reps);
            char name[64];
            snprintf(name, sizeof name, "%s lut %s", kind, isa == 512 ? "avx512bw+gfni" : "avx2");
            printf("%-22s %8.3f %8.3f %8.3f   int-exact %s, kernel-order float %s, max |err| / max |out| vs sequential %.1e\n", name,
                   tf / units, tk / units, tb / units, ok_int ? "PASS" : "FAIL", ok ? "PASS" : "FAIL", rel);
        }
    }
    return 0;
}
