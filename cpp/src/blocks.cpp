// Scalar reference kernels, the block traits table and kernel selection.
// The scalar kernels follow docs/format.md literally (they are the C++ twin of wqedge/blocks.py);
// the AVX2 ones live in kernels_avx2.cpp and must agree with these.
#include "blocks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#  define WQE_X86 1
#  include <cpuid.h>

#  include "kernels_x86.h"
#endif
#if defined(__aarch64__)  // NEON kernels (kernels_neon.cpp), issue 7
#  define WQE_ARM64 1
#  if defined(__linux__)  // Linux and Android: getauxval(AT_HWCAP)
#    include <sys/auxv.h>
#    ifndef HWCAP_ASIMDDP
#      define HWCAP_ASIMDDP (1 << 20)
#    endif
#  elif defined(__APPLE__)  // macOS / iOS: sysctl
#    include <sys/sysctl.h>
#  endif
#endif

namespace wqe {

// ------------------------------------------------------------------ code accessors (scalar)
// Code of chunk-local column c of a row-block's code bytes.
static inline int code_q8(const uint8_t* q, int c) { return q[c]; }
static inline int code_q4(const uint8_t* q, int c) {
    const uint8_t b = q[(c / 32) * 16 + (c % 16)];
    return (c % 32) < 16 ? (b & 0x0F) : (b >> 4);
}
static inline int code_q2(const uint8_t* q, int c) {
    const int k = (c % 32) / 8, j = c % 8;
    return (q[(c / 32) * 8 + j] >> (2 * k)) & 3;
}
static inline int code_q1(const uint8_t* q, int c) {
    return (load_u32(q + (c / 32) * 4) >> (c % 32)) & 1;
}
static inline int code_q3(const uint8_t* q, int c) {
    const uint8_t* blk = q + (c / 32) * 12;
    const int k = (c % 32) / 8, j = c % 8;
    const int lo = (blk[j] >> (2 * k)) & 3;
    const int hi = (load_u32(blk + 8) >> (c % 32)) & 1;
    return lo | hi << 2;
}
static inline int trit(uint8_t byte, int i) {
    static const int pow3[5] = {1, 3, 9, 27, 81};
    return (int)(((((uint32_t)byte * pow3[i]) & 0xFF) * 3) >> 8);
}

// ------------------------------------------------------------------ scalar dots (double accumulation)
template <int (*CODE)(const uint8_t*, int)>
static float dot_affine_scalar(const uint8_t* rb, const float* xc, float xsum, int g_pad) {
    const float d = load_h(rb), m = load_h(rb + 2);
    const uint8_t* q = rb + 4;
    double acc = 0.0;
    for (int c = 0; c < g_pad; ++c) acc += (double)CODE(q, c) * xc[c];
    return (float)((double)d * acc + (double)m * xsum);
}

static float dot_fp16_scalar(const uint8_t* rb, const float* xc, float, int g_pad) {
    double acc = 0.0;
    for (int c = 0; c < g_pad; ++c) acc += (double)load_h(rb + 2 * c) * xc[c];
    return (float)acc;
}

static float dot_ternary_scalar(const uint8_t* rb, const float* xc, float xsum, int g_pad) {
    const float a = load_h(rb);
    const uint8_t* q = rb + 2;
    const int B = ternary_bytes(g_pad), S = round8(B);
    double acc = 0.0;
    for (int i = 0; i < 5; ++i)
        for (int j = 0; j < B; ++j) acc += (double)trit(q[j], i) * xc[i * S + j];
    return (float)((double)a * (acc - (double)xsum));
}

// ------------------------------------------------------------------ scalar int8-activation dots (reference)
// Exact int32 sum per 32-slot block, scaled by the block's d in double.
template <int (*CODE)(const uint8_t*, int)>
static float dot8_affine_scalar(const uint8_t* rb, const XQ8* xq, float xsum, int g_pad) {
    const float d = load_h(rb), m = load_h(rb + 2);
    const uint8_t* q = rb + 4;
    double acc = 0.0;
    for (int b = 0; b < g_pad / 32; ++b) {
        int32_t s = 0;
        for (int j = 0; j < 32; ++j) s += CODE(q, 32 * b + j) * (int32_t)xq[b].q[j];
        acc += (double)xq[b].d * s;
    }
    return (float)((double)d * acc + (double)m * xsum);
}

static float dot8_ternary_scalar(const uint8_t* rb, const XQ8* xq, float xsum, int g_pad) {
    const float a = load_h(rb);
    const uint8_t* q = rb + 2;
    const int B = ternary_bytes(g_pad), nb = (B + 31) / 32;
    double acc = 0.0;
    for (int i = 0; i < 5; ++i)
        for (int b = 0; b < nb; ++b) {
            const XQ8& x = xq[i * nb + b];
            int32_t s = 0;
            for (int j = 0; j < 32 && 32 * b + j < B; ++j) s += trit(q[32 * b + j], i) * (int32_t)x.q[j];
            acc += (double)x.d * s;
        }
    return (float)((double)a * (acc - (double)xsum));
}

template <dot8_fn F>
static void rows8_reference(const uint8_t* rb, size_t stride, int n, const XQ8* xq, float xsum, int g_pad, float* out) {
    for (int r = 0; r < n; ++r) out[r] = F(rb + r * stride, xq, xsum, g_pad);
}

// ------------------------------------------------------------------ scalar dequant (bit-identical to blocks.unpack_chunk)
// Codes of one 32-column sub-block (the layouts of docs/format.md, written out per block).
static void block_q8(const uint8_t* q, uint8_t* c) { std::memcpy(c, q, 32); }
static void block_q4(const uint8_t* q, uint8_t* c) {
    for (int j = 0; j < 16; ++j) { c[j] = q[j] & 0x0F; c[j + 16] = q[j] >> 4; }
}
static void block_q2(const uint8_t* q, uint8_t* c) {
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 8; ++j) c[8 * k + j] = (q[j] >> (2 * k)) & 3;
}
static void block_q1(const uint8_t* q, uint8_t* c) {
    const uint32_t bits = load_u32(q);
    for (int j = 0; j < 32; ++j) c[j] = (bits >> j) & 1;
}
static void block_q3(const uint8_t* q, uint8_t* c) {
    uint8_t hi[32];
    block_q2(q, c);
    block_q1(q + 8, hi);
    for (int j = 0; j < 32; ++j) c[j] |= hi[j] << 2;
}

template <void (*BLOCK)(const uint8_t*, uint8_t*), int SUB_BYTES>
static void dequant_affine_scalar(const uint8_t* rb, int g_pad, float* out) {
    const float d = load_h(rb), m = load_h(rb + 2);
    const uint8_t* q = rb + 4;
    uint8_t c[32];
    for (int b = 0; b < g_pad; b += 32, q += SUB_BYTES) {
        BLOCK(q, c);
        for (int j = 0; j < 32; ++j) {
            const float t = d * (float)c[j];  // numpy: params[:,0]*q + params[:,1], two roundings
            out[b + j] = t + m;
        }
    }
}

// fp16 -> fp32 through a 64K-entry table (the scalar path's conversions; exact, built once).
static const float* h2f_table() {
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t h = 0; h < 65536; ++h) t[h] = fp16_to_fp32((uint16_t)h);
        return t;
    }();
    return table.data();
}

static void dequant_fp16_scalar(const uint8_t* rb, int g_pad, float* out) {
    const float* T = h2f_table();
    for (int c = 0; c < g_pad; ++c) out[c] = T[load_u16(rb + 2 * c)];
}

static void dequant_ternary_scalar(const uint8_t* rb, int g_pad, float* out) {
    const float a = load_h(rb);
    const uint8_t* q = rb + 2;
    const int B = ternary_bytes(g_pad);
    for (int i = 0; i < 5; ++i)
        for (int j = 0; j < B; ++j) {
            const int c = i * B + j;
            if (c < g_pad) out[c] = a * (float)(trit(q[j], i) - 1);
        }
}

// Production scalar path (CPUs without AVX2): dequantize each row-block with the reference
// dequantizer, then a float dot with eight partial sums (which compilers vectorize with SSE2).
// Plain-layout kinds only; ternary keeps the reference dot (its prepared x is in plane order).
template <dequant_fn DQ>
static void rows_scalar(const uint8_t* rb, size_t stride, int n, const float* xc, float, int g_pad, float* out) {
    thread_local std::vector<float> w;
    if ((int)w.size() < g_pad) w.resize(g_pad);
    for (int r = 0; r < n; ++r) {
        DQ(rb + r * stride, g_pad, w.data());
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int c = 0; c < g_pad; c += 8)  // g_pad is a multiple of 32
            for (int k = 0; k < 8; ++k) s[k] += w[c + k] * xc[c + k];
        out[r] = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    }
}

template <dot_fn F>
static void rows_reference(const uint8_t* rb, size_t stride, int n, const float* xc, float xsum, int g_pad, float* out) {
    for (int r = 0; r < n; ++r) out[r] = F(rb + r * stride, xc, xsum, g_pad);
}

// ------------------------------------------------------------------ two-level kinds (q4s, q3s, q2s), scalar reference
// A sub-block's 6-bit scale and min codes from its low byte (s & 15 | (n & 15) << 4) and high nibble
// (s >> 4 | (n >> 4) << 2), however a layout stores them (the row-block: blocks.h sub_bytes; row tiles: tile_pack_sub).
static inline void sub_pair(int lo, int nib, int* sc, int* mn) {
    *sc = (lo & 0x0F) | (nib & 3) << 4;
    *mn = (lo >> 4) | (nib >> 2) << 4;
}
// Sub-block j's codes in a row-block.
static inline void sub_codes(const uint8_t* s, int n_sub, int j, int* sc, int* mn) {
    sub_pair(s[j], (s[n_sub + j / 2] >> (4 * (j & 1))) & 0x0F, sc, mn);
}

// Calls f(b, D, M, codes) for each 32-column sub-block b: D = d s_b, M = dmin n_b (exact fp32 products), its codes.
template <void (*BLOCK)(const uint8_t*, uint8_t*), int SUB_BYTES, class F>
static void each_sub_block(const uint8_t* rb, int g_pad, F&& f) {
    const float d = load_h(rb), dmin = load_h(rb + 2);
    const int n_sub = g_pad / 32;
    const uint8_t* s = rb + 4;
    const uint8_t* q = s + sub_bytes(g_pad);
    uint8_t c[32];
    for (int b = 0; b < n_sub; ++b, q += SUB_BYTES) {
        int sc, mn;
        sub_codes(s, n_sub, b, &sc, &mn);
        BLOCK(q, c);
        f(b, d * (float)sc, dmin * (float)mn, c);
    }
}

// Float activations: sum_b D_b sum_c q_c x_c - M_b sum_c x_c (double accumulation).
template <void (*BLOCK)(const uint8_t*, uint8_t*), int SUB_BYTES>
static float dot_sub_scalar(const uint8_t* rb, const float* xc, float, int g_pad) {
    double acc = 0.0;
    each_sub_block<BLOCK, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, const uint8_t* c) {
        double sq = 0.0, sx = 0.0;
        for (int j = 0; j < 32; ++j) {
            sq += (double)c[j] * xc[32 * b + j];
            sx += xc[32 * b + j];
        }
        acc += (double)D * sq - (double)M * sx;
    });
    return (float)acc;
}

// w = D q - M: D q is exact in fp32, one rounding (blocks.subscale_grid).
template <void (*BLOCK)(const uint8_t*, uint8_t*), int SUB_BYTES>
static void dequant_sub_scalar(const uint8_t* rb, int g_pad, float* out) {
    each_sub_block<BLOCK, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, const uint8_t* c) {
        for (int j = 0; j < 32; ++j) {
            const float t = D * (float)c[j];
            out[32 * b + j] = t - M;
        }
    });
}

// Int8 activations: sum_b x_b.d D_b sum_c q_c xq_c - M_b x_b.ds, i.e. sum_c w_c x^_c.
template <void (*BLOCK)(const uint8_t*, uint8_t*), int SUB_BYTES>
static float dot8_sub_scalar(const uint8_t* rb, const XQ8* xq, float, int g_pad) {
    double acc = 0.0;
    each_sub_block<BLOCK, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, const uint8_t* c) {
        int32_t sum = 0;
        for (int j = 0; j < 32; ++j) sum += c[j] * (int32_t)xq[b].q[j];
        acc += (double)xq[b].d * (double)D * sum - (double)M * xq[b].ds;
    });
    return (float)acc;
}

// ------------------------------------------------------------------ row tiles (blocks.h, TILE_ROWS)
// Code of row r, column j (0..31) of one tiled 32-column block (8 rows x tile_sub bytes). A vector is 32
// bytes, byte 4r + k of it belongs to row r; "group" G is columns 4G..4G+3 (k = column % 4).
static inline int tcode_q4(const uint8_t* t, int r, int j) {  // vector v: low nibbles group v, high group v + 4
    const int g = j / 4, v = g % 4;
    const uint8_t b = t[32 * v + 4 * r + j % 4];
    return g < 4 ? (b & 0x0F) : (b >> 4);
}
static inline int tcode_q2(const uint8_t* t, int r, int j) {  // vector v, bits 2s: group 2s + v
    const int g = j / 4;
    return (t[32 * (g % 2) + 4 * r + j % 4] >> (2 * (g / 2))) & 3;
}
static inline int tcode_q8(const uint8_t* t, int r, int j) {  // vector G: group G, one byte per code
    return t[32 * (j / 4) + 4 * r + j % 4];
}
static inline int tcode_q1(const uint8_t* t, int r, int j) {  // one vector, bit G: group G
    return (t[4 * r + j % 4] >> (j / 4)) & 1;
}
static inline int tcode_q3(const uint8_t* t, int r, int j) {  // 3-bit fields in three vectors A, B, C (docs/format.md)
    const int g = j / 4, o = 4 * r + j % 4, a = t[o], b = t[32 + o], c = t[64 + o];
    switch (g) {
        case 0: return a & 7;
        case 1: return (a >> 3) & 7;
        case 2: return b & 7;
        case 3: return (b >> 3) & 7;
        case 4: return c & 7;
        case 5: return (c >> 3) & 7;
        case 6: return (a >> 6) | ((c >> 6) & 1) << 2;
        default: return (b >> 6) | ((c >> 7) & 1) << 2;
    }
}

// q1 bits of one row (u32, bit j = column j) <-> the tiled bytes of that row (byte k, bit G = column 4G + k).
static void tile_bits_pack(uint32_t bits, uint8_t* dst4) {
    for (int k = 0; k < 4; ++k) {  // bits 4G + k (G = 0..7) gathered into bits G
        uint32_t x = (bits >> k) & 0x11111111u;
        x = (x | x >> 3) & 0x03030303u;
        x = (x | x >> 6) & 0x000F000Fu;
        dst4[k] = (uint8_t)(x | x >> 12);
    }
}

// byte value -> its bits g spread to bit 4g (the tiled q1 byte k's bits go to 4g + k of the row's u32)
static const uint32_t* tile_spread() {
    static const std::vector<uint32_t> t = [] {
        std::vector<uint32_t> v(256, 0);
        for (int b = 0; b < 256; ++b)
            for (int g = 0; g < 8; ++g) v[b] |= (uint32_t)((b >> g) & 1) << (4 * g);
        return v;
    }();
    return t.data();
}

// q3: the 8 codes of columns 4G + k (G = 0..7) of one row <-> its bytes k of the three tiled vectors A, B, C
// (docs/format.md "Row tiles": A = g0 | g1 << 3 | (g6 & 3) << 6, B = g2 | g3 << 3 | (g7 & 3) << 6,
// C = g4 | g5 << 3 | (g6 >> 2) << 6 | (g7 >> 2) << 7). The row-block holds the low two bits as q2 and the third as q1.
static void q3_tile_pack(const uint8_t* src, uint8_t* a, uint8_t* b, uint8_t* c) {
    const uint32_t hi = load_u32(src + 8);
    for (int k = 0; k < 4; ++k) {
        int g[8];
        for (int G = 0; G < 8; ++G) {
            const int col = 4 * G + k;
            g[G] = ((src[col % 8] >> (2 * (col / 8))) & 3) | (int)((hi >> col) & 1) << 2;
        }
        a[k] = (uint8_t)(g[0] | g[1] << 3 | (g[6] & 3) << 6);
        b[k] = (uint8_t)(g[2] | g[3] << 3 | (g[7] & 3) << 6);
        c[k] = (uint8_t)(g[4] | g[5] << 3 | (g[6] >> 2) << 6 | (g[7] >> 2) << 7);
    }
}
static void q3_tile_unpack(const uint8_t* t, int r, uint8_t* o) {  // row r of one tiled block -> 12 row-block bytes
    std::memset(o, 0, 12);
    uint32_t hi = 0;
    for (int j = 0; j < 32; ++j) {
        const int q = tcode_q3(t, r, j);
        o[j % 8] |= (uint8_t)((q & 3) << (2 * (j / 8)));
        hi |= (uint32_t)(q >> 2) << j;
    }
    std::memcpy(o + 8, &hi, 4);  // little endian (as load_u32 reads it)
}

static int tile_vectors(int id) { return id == KIND_Q8 ? 8 : id == KIND_Q4 ? 4 : 2; }  // q8, q4, q2: 32-byte vectors per block

// The one-scale kind whose codes a kind's tiles hold: a two-level kind's (q4s, q3s, q2s: ids 7-9) are q4, q3, q2's.
static int tile_code_kind(int id) { return id >= KIND_Q4S ? id - KIND_Q4S + KIND_Q4 : id; }

static void tile_pack_block(int id, const uint8_t* const src[TILE_ROWS], uint8_t* dst) {
    // q8, q4 and q2: byte 4v + k of row r's block goes to vector v, byte 4r + k. For q8 that byte is column 4v + k;
    // for q4 it holds columns 4v + k (low) and 16 + 4v + k (high); for q2 its bit pairs 2s hold column
    // 8s + 4v + k = 4(2s + v) + k.
    const int nv = tile_vectors(id);
    if (id == KIND_Q3) {
        for (int r = 0; r < TILE_ROWS; ++r) q3_tile_pack(src[r], dst + 4 * r, dst + 32 + 4 * r, dst + 64 + 4 * r);
        return;
    }
    if (id == KIND_Q8 || id == KIND_Q4 || id == KIND_Q2)
        for (int v = 0; v < nv; ++v)
            for (int r = 0; r < TILE_ROWS; ++r) std::memcpy(dst + 32 * v + 4 * r, src[r] + 4 * v, 4);
    if (id == KIND_Q1)
        for (int r = 0; r < TILE_ROWS; ++r) tile_bits_pack(load_u32(src[r]), dst + 4 * r);
}

static void tile_unpack_rows(int id, int sub, const uint8_t* t, int nb, uint8_t* dst, size_t stride) {
    const int nv = tile_vectors(id);
    const uint32_t* spread = id == KIND_Q1 ? tile_spread() : nullptr;
    for (int b = 0; b < nb; ++b, t += TILE_ROWS * sub)
        for (int r = 0; r < TILE_ROWS; ++r) {
            uint8_t* o = dst + r * stride + (size_t)b * sub;
            if (id == KIND_Q3) q3_tile_unpack(t, r, o);
            if (id == KIND_Q8 || id == KIND_Q4 || id == KIND_Q2)
                for (int v = 0; v < nv; ++v) std::memcpy(o + 4 * v, t + 32 * v + 4 * r, 4);
            if (spread) {
                const uint8_t* h = t + 4 * r;
                const uint32_t bits = spread[h[0]] | spread[h[1]] << 1 | spread[h[2]] << 2 | spread[h[3]] << 3;
                std::memcpy(o, &bits, 4);  // little endian (as load_u32 reads it)
            }
        }
}

// Ternary (docs/format.md "Row tiles"): vector v = code bytes 4v..4v+3 of the 8 rows (byte 4r + k = row r's byte
// 4v + k), round4(B) / 4 vectors, zero past B.
static int tile_ternary_bytes(int g_pad) { return (ternary_bytes(g_pad) + 3) & ~3; }

size_t tile_code_bytes(const BlockTraits& bt, int g_pad) {
    if (bt.id == KIND_TERNARY) return (size_t)tile_ternary_bytes(g_pad);
    if (!bt.tile_sub) return bt.code_bytes(g_pad);
    return (bt.two_level ? (size_t)sub_bytes(g_pad) : 0) + (size_t)(g_pad / 32) * bt.tile_sub;
}

// Two-level tiles (docs/format.md "Row tiles"): the 8 rows' sub-scale codes first, 12 bytes per 32-column block b at
// 12 b: byte r = row r's low byte (s_b & 15 | (n_b & 15) << 4), then a u32 whose bits 4r..4r+3 are row r's high nibble
// (s_b >> 4 | (n_b >> 4) << 2); zero to 8 sub_bytes(g_pad) bytes. Then the codes, tiled as q4 / q3 / q2.
static void tile_pack_sub(const uint8_t* const src[TILE_ROWS], int g_pad, uint8_t* dst) {
    const int n = g_pad / 32;
    std::memset(dst, 0, (size_t)TILE_ROWS * sub_bytes(g_pad));
    for (int b = 0; b < n; ++b)
        for (int r = 0; r < TILE_ROWS; ++r) {
            dst[12 * b + r] = src[r][b];
            const int nib = (src[r][n + b / 2] >> (4 * (b & 1))) & 0x0F;
            dst[12 * b + 8 + r / 2] |= (uint8_t)(nib << (4 * (r & 1)));
        }
}
static void tile_unpack_sub(const uint8_t* t, int g_pad, uint8_t* dst, size_t stride) {
    const int n = g_pad / 32;
    for (int r = 0; r < TILE_ROWS; ++r) {
        uint8_t* o = dst + r * stride;
        std::memset(o, 0, (size_t)sub_bytes(g_pad));
        for (int b = 0; b < n; ++b) {
            o[b] = t[12 * b + r];
            const int nib = (t[12 * b + 8 + r / 2] >> (4 * (r & 1))) & 0x0F;
            o[n + b / 2] |= (uint8_t)(nib << (4 * (b & 1)));
        }
    }
}

void tile_pack_codes(const BlockTraits& bt, const uint8_t* const src[TILE_ROWS], int g_pad, uint8_t* dst) {
    if (bt.id == KIND_TERNARY) {
        const int B = ternary_bytes(g_pad), Bp = tile_ternary_bytes(g_pad);
        for (int j = 0; j < Bp; ++j)
            for (int r = 0; r < TILE_ROWS; ++r) dst[32 * (j / 4) + 4 * r + j % 4] = j < B ? src[r][j] : 0;
        return;
    }
    const int sub = bt.tile_sub;
    const size_t sb = bt.two_level ? (size_t)sub_bytes(g_pad) : 0;  // the sub-scale codes before the codes
    if (sb) tile_pack_sub(src, g_pad, dst);
    dst += TILE_ROWS * sb;
    std::memset(dst, 0, (size_t)(g_pad / 32) * TILE_ROWS * sub);
    for (int b = 0; b < g_pad / 32; ++b) {
        const uint8_t* s8[TILE_ROWS];
        for (int r = 0; r < TILE_ROWS; ++r) s8[r] = src[r] + sb + (size_t)b * sub;
        tile_pack_block(tile_code_kind(bt.id), s8, dst + (size_t)b * TILE_ROWS * sub);
    }
}

void tile_unpack_codes(const BlockTraits& bt, const uint8_t* t, int g_pad, uint8_t* dst, size_t stride) {
    if (bt.id == KIND_TERNARY) {
        for (int j = 0, Bp = tile_ternary_bytes(g_pad); j < Bp; ++j)
            for (int r = 0; r < TILE_ROWS; ++r) dst[r * stride + j] = t[32 * (j / 4) + 4 * r + j % 4];
        return;
    }
    const size_t sb = bt.two_level ? (size_t)sub_bytes(g_pad) : 0;
    if (sb) tile_unpack_sub(t, g_pad, dst, stride);
    tile_unpack_rows(tile_code_kind(bt.id), bt.tile_sub, t + TILE_ROWS * sb, g_pad / 32, dst + sb, stride);
}

// Ternary reference: per row, plane and 32-slot block the exact int32 sum of trit x activation (the plane's XQ8
// block), scaled in double, then a (sum - xsum) (as dot8_ternary_scalar).
static void tile8_ternary_scalar(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum,
                                 int g_pad, float* acc, std::ptrdiff_t) {
    const int B = ternary_bytes(g_pad), nbp = (B + 31) / 32;
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += 5 * nbp)
        for (int r = 0; r < TILE_ROWS; ++r) {
            const double a = load_h(part + 2 * r);
            const uint8_t* codes = part + 2 * TILE_ROWS;
            double s = 0.0;
            for (int i = 0; i < 5; ++i)
                for (int b = 0; b < nbp; ++b) {
                    const XQ8& x = xq[i * nbp + b];
                    int32_t sum = 0;
                    for (int j = 0; j < 32 && 32 * b + j < B; ++j) {
                        const int slot = 32 * b + j;
                        sum += trit(codes[32 * (slot / 4) + 4 * r + slot % 4], i) * (int32_t)x.q[j];
                    }
                    s += (double)x.d * sum;
                }
            acc[r] += (float)(a * (s - (double)xsum[c]));
        }
}

// Reference tile kernel: per row and block the exact int32 sum, scaled in double (as dot8_affine_scalar).
template <int (*TCODE)(const uint8_t*, int, int), int SUB>
static void tile8_affine_scalar(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum,
                                int g_pad, float* acc, std::ptrdiff_t) {
    const int nb = g_pad / 32;
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb)
        for (int r = 0; r < TILE_ROWS; ++r) {
            const double d = load_h(part + 2 * r), m = load_h(part + 2 * TILE_ROWS + 2 * r);
            double a = 0.0;
            for (int b = 0; b < nb; ++b) {
                const uint8_t* blk = part + 4 * TILE_ROWS + (size_t)b * TILE_ROWS * SUB;
                int32_t s = 0;
                for (int j = 0; j < 32; ++j) s += TCODE(blk, r, j) * (int32_t)xq[b].q[j];
                a += (double)xq[b].d * s;
            }
            acc[r] += (float)(d * a + m * (double)xsum[c]);
        }
}

// Two-level reference: per row and block the exact int32 sum, then the row-layout reference's terms in double
// (dot8_sub_scalar): x.d (d s_b) sum - (dmin n_b) x.ds. xsum is not used (the blocks' ds carry the activation sums).
template <int (*TCODE)(const uint8_t*, int, int), int SUB>
static void tile8_sub_scalar(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float*, int g_pad,
                             float* acc, std::ptrdiff_t) {
    const int nb = g_pad / 32;
    const size_t sb = (size_t)sub_bytes(g_pad);
    for (int c = 0; c < nch; ++c, part += part_bytes, xq += nb)
        for (int r = 0; r < TILE_ROWS; ++r) {
            const float d = load_h(part + 2 * r), dmin = load_h(part + 2 * TILE_ROWS + 2 * r);
            double a = 0.0;
            for (int b = 0; b < nb; ++b) {
                const uint8_t* sc = part + 4 * TILE_ROWS + 12 * b;
                int s_b, n_b;
                sub_pair(sc[r], (sc[8 + r / 2] >> (4 * (r & 1))) & 0x0F, &s_b, &n_b);
                const uint8_t* blk = part + 4 * TILE_ROWS + TILE_ROWS * sb + (size_t)b * TILE_ROWS * SUB;
                int32_t s = 0;
                for (int j = 0; j < 32; ++j) s += TCODE(blk, r, j) * (int32_t)xq[b].q[j];
                a += (double)xq[b].d * (double)(d * (float)s_b) * s - (double)(dmin * (float)n_b) * xq[b].ds;
            }
            acc[r] += (float)a;
        }
}

// ------------------------------------------------------------------ AVX2 kernels (kernels_avx2.cpp; kernels_x86.h)
#if WQE_X86
// The AVX2 column's tile kernels: the VNNI builds where the CPU has them (bit-identical results), else AVX2.
static std::atomic<int> g_vnni{-1};  // -1 not decided, 0 none, 1 AVX512-VNNI, 2 AVX-VNNI
static int vnni_level() {
    int v = g_vnni.load(std::memory_order_relaxed);
    if (v < 0) {
        const char* e = std::getenv("WQEDGE_NO_VNNI");
        v = (e && std::strcmp(e, "1") == 0) ? 0 : cpu_vnni();
        g_vnni.store(v);
    }
    return v;
}
#  define TILE8_X86(K)                                                                                                \
    static void tile8_##K##_x86(const uint8_t* p, size_t pb, int n, const XQ8* x, const float* s, int g, float* acc,     \
                                std::ptrdiff_t pf) {                                                                   \
        const int v = vnni_level();                                                                                   \
        (v == 1 ? avx2::vnni512::tile8_##K : v == 2 ? avx2::vnni256::tile8_##K : avx2::tile8_##K)(p, pb, n, x, s, g, acc, pf); \
    }
TILE8_X86(q8)
TILE8_X86(q4)
TILE8_X86(q3)
TILE8_X86(q2)
TILE8_X86(q1)
TILE8_X86(ternary)
TILE8_X86(q4s)
TILE8_X86(q3s)
TILE8_X86(q2s)
#  define AVX2_TILE(K) tile8_##K##_x86
// q8 row-blocks (linears kept in the row layout; repacked ones use tile8_q8): one vpdpbusd per row and 32 columns
// where VNNI is in use.
static void dot8_rows_q8_x86(const uint8_t* rb, size_t st, int n, const XQ8* x, float s, int g, float* out) {
    const int v = vnni_level();
    (v == 1 ? avx2::vnni512::dot8_rows_q8 : v == 2 ? avx2::vnni256::dot8_rows_q8 : avx2::dot8_rows_q8)(rb, st, n, x, s, g, out);
}
#  define AVX2_Q8_ROWS dot8_rows_q8_x86
static void tile8_mix_x86(const uint8_t* t, const TileDesc* d, int n, const XQ8* x, const int* x8off, const float* s,
                          float* acc, std::ptrdiff_t pf) {
    const int v = vnni_level();
    (v == 1 ? avx2::vnni512::tile8_mix : v == 2 ? avx2::vnni256::tile8_mix : avx2::tile8_mix)(t, d, n, x, x8off, s, acc, pf);
}
#  define AVX2(f) avx2::f
// The pair kernels need AVX512BW too (byte and word operations on zmm; every AVX512-VNNI CPU so far has it).
static bool cpu_has_tile16() {
    static const bool ok = [] {
        if (cpu_vnni() != 1) return false;
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        return (b & (1u << 30)) != 0 && (b & (1u << 17)) != 0;  // AVX512BW, AVX512DQ
    }();
    return ok;
}
// GFNI (CPUID 7.0 ECX bit 8) for the pair kernels' bit-field extraction (kernels_vnni_pairs.inc).
static bool cpu_has_gfni() {
    static const bool ok = [] {
        if (__get_cpuid_max(0, nullptr) < 7) return false;
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        return (c & (1u << 8)) != 0;
    }();
    return ok;
}
// A kernel choice the CPU may offer: on where has() says it can, unless the environment variable is 0; set() for tests
// and benchmarks (false, and nothing changes, when asked on where the CPU cannot).
struct CpuSwitch {
    const char* env;
    bool (*has)();
    std::atomic<int> v{-1};  // -1 not decided, 0 off, 1 on
    bool on() {
        int x = v.load(std::memory_order_relaxed);
        if (x < 0) {
            x = has() && env_switch(env, true) ? 1 : 0;
            v.store(x);
        }
        return x == 1;
    }
    bool set(bool want) {
        if (want && !has()) return false;
        v.store(want ? 1 : 0);
        return true;
    }
};
static CpuSwitch g_tile16{"WQEDGE_TILE16", cpu_has_tile16};
static CpuSwitch g_gfni{"WQEDGE_GFNI", cpu_has_gfni};
static CpuSwitch g_avx512_att{"WQEDGE_AVX512_ATTENTION", cpu_has_avx512};
static bool tile16_on() { return g_tile16.on() && vnni_level() == 1; }
bool set_tile16(bool on) { return g_tile16.set(on); }
bool set_gfni(bool on) { return g_gfni.set(on); }
bool gfni_in_use() { return g_gfni.on(); }
bool set_avx512_attention(bool on) { return g_avx512_att.set(on); }
bool avx512_attention() { return g_avx512_att.on(); }
#  define WQE_TILE16_KERNELS(NS)                  \
    switch (id) {                                  \
        case KIND_Q8: return NS::tile16_q8;        \
        case KIND_Q4: return NS::tile16_q4;        \
        case KIND_Q3: return NS::tile16_q3;        \
        case KIND_Q2: return NS::tile16_q2;        \
        case KIND_Q1: return NS::tile16_q1;        \
        case KIND_Q4S: return NS::tile16_q4s;      \
        case KIND_Q3S: return NS::tile16_q3s;      \
        case KIND_Q2S: return NS::tile16_q2s;      \
        default: return nullptr;                   \
    }
tile16_fn tile16_kernel(int id, int kernels) {
    if (kernels != K_AVX2 || !tile16_on()) return nullptr;
    if (g_gfni.on()) WQE_TILE16_KERNELS(avx2::vnni512::gf)
    WQE_TILE16_KERNELS(avx2::vnni512)
}
#  undef WQE_TILE16_KERNELS
tile16_mix_fn tile16_mix_kernel(int kernels) {
    if (kernels != K_AVX2 || !tile16_on()) return nullptr;
    return g_gfni.on() ? avx2::vnni512::gf::tile16_mix : avx2::vnni512::tile16_mix;
}
#else
#  define AVX2(f) nullptr
#  define AVX2_TILE(K) nullptr
#  define AVX2_Q8_ROWS nullptr
tile16_fn tile16_kernel(int, int) { return nullptr; }
tile16_mix_fn tile16_mix_kernel(int) { return nullptr; }
bool set_tile16(bool on) { return !on; }
bool set_gfni(bool on) { return !on; }
bool gfni_in_use() { return false; }
bool set_avx512_attention(bool on) { return !on; }
bool avx512_attention() { return false; }
#endif

// ------------------------------------------------------------------ two-level kinds' SIMD kernels
// (kernels_subscale_avx2.cpp, kernels_subscale_neon.cpp): dot, dot_rows, dequant, dot8, dot8_rows per kind.
#define WQE_SUB_DECL(K)                                                              \
    float dot_##K(const uint8_t*, const float*, float, int);                         \
    void dot_rows_##K(const uint8_t*, size_t, int, const float*, float, int, float*); \
    void dequant_##K(const uint8_t*, int, float*);                                   \
    float dot8_##K(const uint8_t*, const XQ8*, float, int);                          \
    void dot8_rows_##K(const uint8_t*, size_t, int, const XQ8*, float, int, float*);
#if WQE_X86
namespace avx2 {
WQE_SUB_DECL(q4s)
WQE_SUB_DECL(q3s)
WQE_SUB_DECL(q2s)
}  // namespace avx2
#endif
#if WQE_ARM64
namespace neon {
WQE_SUB_DECL(q4s)
WQE_SUB_DECL(q3s)
WQE_SUB_DECL(q2s)
}  // namespace neon
#endif

// ------------------------------------------------------------------ NEON kernels (kernels_neon.cpp)
#if WQE_ARM64
namespace neon {
#include "kernel_set.inc"
void att_scores_kv(const float*, int, int, const uint8_t*, size_t, int, int, float, float*, size_t);  // quantized KV
void att_values_kv(const float*, size_t, int, int, const uint8_t*, size_t, int, int, float*);              // cache rows
// Row tiles (kernels_neon_tiles.cpp): SDOT or plain NEON per call (neon_dotprod()), as the dot8 kernels.
#include "tile_set.inc"
}  // namespace neon
#  define NEON(f) neon::f
#  define NEON_TILE(K) neon::tile8_##K
#else
#  define NEON(f) nullptr
#  define NEON_TILE(K) nullptr
#endif

// ------------------------------------------------------------------ the traits table
static size_t cb_fp16(int gp) { return 2 * (size_t)gp; }
static size_t cb_q8(int gp) { return (size_t)gp; }
static size_t cb_q4(int gp) { return (size_t)gp / 2; }
static size_t cb_q3(int gp) { return 3 * (size_t)gp / 8; }
static size_t cb_q2(int gp) { return (size_t)gp / 4; }
static size_t cb_ternary(int gp) { return (size_t)ternary_bytes(gp); }
static size_t cb_q1(int gp) { return (size_t)gp / 8; }
static size_t cb_q4s(int gp) { return (size_t)sub_bytes(gp) + (size_t)gp / 2; }
static size_t cb_q3s(int gp) { return (size_t)sub_bytes(gp) + 3 * (size_t)gp / 8; }
static size_t cb_q2s(int gp) { return (size_t)sub_bytes(gp) + (size_t)gp / 4; }

static const BlockTraits TABLE[N_BLOCK_TYPES] = {
    {"fp16", 0, 0, cb_fp16, X_PLAIN,
     {nullptr, dot_fp16_scalar, AVX2(dot_fp16), NEON(dot_fp16)}, 
     {nullptr, rows_scalar<dequant_fp16_scalar>, AVX2(dot_rows_fp16), NEON(dot_rows_fp16)}, {nullptr, dequant_fp16_scalar, AVX2(dequant_fp16), NEON(dequant_fp16)}, {}, {}, 0, {}, false},
    {"q8", 1, 4, cb_q8, X_PLAIN,
     {nullptr, dot_affine_scalar<code_q8>, AVX2(dot_q8), NEON(dot_q8)}, 
     {nullptr, rows_scalar<dequant_affine_scalar<block_q8, 32>>, AVX2(dot_rows_q8), NEON(dot_rows_q8)}, {nullptr, dequant_affine_scalar<block_q8, 32>, AVX2(dequant_q8), NEON(dequant_q8)}, {nullptr, dot8_affine_scalar<code_q8>, AVX2(dot8_q8), NEON(dot8_q8)}, {nullptr, rows8_reference<dot8_affine_scalar<code_q8>>, AVX2_Q8_ROWS, NEON(dot8_rows_q8)}, 32, {nullptr, tile8_affine_scalar<tcode_q8, 32>, AVX2_TILE(q8), NEON_TILE(q8)}, false},
    {"q4", 2, 4, cb_q4, X_PLAIN,
     {nullptr, dot_affine_scalar<code_q4>, AVX2(dot_q4), NEON(dot_q4)}, 
     {nullptr, rows_scalar<dequant_affine_scalar<block_q4, 16>>, AVX2(dot_rows_q4), NEON(dot_rows_q4)}, {nullptr, dequant_affine_scalar<block_q4, 16>, AVX2(dequant_q4), NEON(dequant_q4)}, {nullptr, dot8_affine_scalar<code_q4>, AVX2(dot8_q4), NEON(dot8_q4)}, {nullptr, rows8_reference<dot8_affine_scalar<code_q4>>, AVX2(dot8_rows_q4), NEON(dot8_rows_q4)}, 16, {nullptr, tile8_affine_scalar<tcode_q4, 16>, AVX2_TILE(q4), NEON_TILE(q4)}, false},
    {"q3", 3, 4, cb_q3, X_PLAIN,
     {nullptr, dot_affine_scalar<code_q3>, AVX2(dot_q3), NEON(dot_q3)}, 
     {nullptr, rows_scalar<dequant_affine_scalar<block_q3, 12>>, AVX2(dot_rows_q3), NEON(dot_rows_q3)}, {nullptr, dequant_affine_scalar<block_q3, 12>, AVX2(dequant_q3), NEON(dequant_q3)}, {nullptr, dot8_affine_scalar<code_q3>, AVX2(dot8_q3), NEON(dot8_q3)}, {nullptr, rows8_reference<dot8_affine_scalar<code_q3>>, AVX2(dot8_rows_q3), NEON(dot8_rows_q3)}, 12, {nullptr, tile8_affine_scalar<tcode_q3, 12>, AVX2_TILE(q3), NEON_TILE(q3)}, false},
    {"q2", 4, 4, cb_q2, X_PLAIN,
     {nullptr, dot_affine_scalar<code_q2>, AVX2(dot_q2), NEON(dot_q2)}, 
     {nullptr, rows_scalar<dequant_affine_scalar<block_q2, 8>>, AVX2(dot_rows_q2), NEON(dot_rows_q2)}, {nullptr, dequant_affine_scalar<block_q2, 8>, AVX2(dequant_q2), NEON(dequant_q2)}, {nullptr, dot8_affine_scalar<code_q2>, AVX2(dot8_q2), NEON(dot8_q2)}, {nullptr, rows8_reference<dot8_affine_scalar<code_q2>>, AVX2(dot8_rows_q2), NEON(dot8_rows_q2)}, 8, {nullptr, tile8_affine_scalar<tcode_q2, 8>, AVX2_TILE(q2), NEON_TILE(q2)}, false},
    {"ternary", 5, 2, cb_ternary, X_TERNARY,
     {nullptr, dot_ternary_scalar, AVX2(dot_ternary), NEON(dot_ternary)}, 
     {nullptr, rows_reference<dot_ternary_scalar>, AVX2(dot_rows_ternary), NEON(dot_rows_ternary)}, {nullptr, dequant_ternary_scalar, AVX2(dequant_ternary), NEON(dequant_ternary)}, {nullptr, dot8_ternary_scalar, AVX2(dot8_ternary), NEON(dot8_ternary)}, {nullptr, rows8_reference<dot8_ternary_scalar>, AVX2(dot8_rows_ternary), NEON(dot8_rows_ternary)}, 4, {nullptr, tile8_ternary_scalar, AVX2_TILE(ternary), NEON_TILE(ternary)}, false},
    {"q1", 6, 4, cb_q1, X_PLAIN,
     {nullptr, dot_affine_scalar<code_q1>, AVX2(dot_q1), NEON(dot_q1)}, 
     {nullptr, rows_scalar<dequant_affine_scalar<block_q1, 4>>, AVX2(dot_rows_q1), NEON(dot_rows_q1)}, {nullptr, dequant_affine_scalar<block_q1, 4>, AVX2(dequant_q1), NEON(dequant_q1)}, {nullptr, dot8_affine_scalar<code_q1>, AVX2(dot8_q1), NEON(dot8_q1)}, {nullptr, rows8_reference<dot8_affine_scalar<code_q1>>, AVX2(dot8_rows_q1), NEON(dot8_rows_q1)}, 4, {nullptr, tile8_affine_scalar<tcode_q1, 4>, AVX2_TILE(q1), NEON_TILE(q1)}, false},
    {"q4s", 7, 4, cb_q4s, X_PLAIN,
     {nullptr, dot_sub_scalar<block_q4, 16>, AVX2(dot_q4s), NEON(dot_q4s)},
     {nullptr, rows_scalar<dequant_sub_scalar<block_q4, 16>>, AVX2(dot_rows_q4s), NEON(dot_rows_q4s)}, {nullptr, dequant_sub_scalar<block_q4, 16>, AVX2(dequant_q4s), NEON(dequant_q4s)}, {nullptr, dot8_sub_scalar<block_q4, 16>, AVX2(dot8_q4s), NEON(dot8_q4s)}, {nullptr, rows8_reference<dot8_sub_scalar<block_q4, 16>>, AVX2(dot8_rows_q4s), NEON(dot8_rows_q4s)}, 16, {nullptr, tile8_sub_scalar<tcode_q4, 16>, AVX2_TILE(q4s), NEON_TILE(q4s)}, true},
    {"q3s", 8, 4, cb_q3s, X_PLAIN,
     {nullptr, dot_sub_scalar<block_q3, 12>, AVX2(dot_q3s), NEON(dot_q3s)},
     {nullptr, rows_scalar<dequant_sub_scalar<block_q3, 12>>, AVX2(dot_rows_q3s), NEON(dot_rows_q3s)}, {nullptr, dequant_sub_scalar<block_q3, 12>, AVX2(dequant_q3s), NEON(dequant_q3s)}, {nullptr, dot8_sub_scalar<block_q3, 12>, AVX2(dot8_q3s), NEON(dot8_q3s)}, {nullptr, rows8_reference<dot8_sub_scalar<block_q3, 12>>, AVX2(dot8_rows_q3s), NEON(dot8_rows_q3s)}, 12, {nullptr, tile8_sub_scalar<tcode_q3, 12>, AVX2_TILE(q3s), NEON_TILE(q3s)}, true},
    {"q2s", 9, 4, cb_q2s, X_PLAIN,
     {nullptr, dot_sub_scalar<block_q2, 8>, AVX2(dot_q2s), NEON(dot_q2s)},
     {nullptr, rows_scalar<dequant_sub_scalar<block_q2, 8>>, AVX2(dot_rows_q2s), NEON(dot_rows_q2s)}, {nullptr, dequant_sub_scalar<block_q2, 8>, AVX2(dequant_q2s), NEON(dequant_q2s)}, {nullptr, dot8_sub_scalar<block_q2, 8>, AVX2(dot8_q2s), NEON(dot8_q2s)}, {nullptr, rows8_reference<dot8_sub_scalar<block_q2, 8>>, AVX2(dot8_rows_q2s), NEON(dot8_rows_q2s)}, 8, {nullptr, tile8_sub_scalar<tcode_q2, 8>, AVX2_TILE(q2s), NEON_TILE(q2s)}, true},
};

const BlockTraits* block_traits(int id) {
    return (id >= 0 && id < N_BLOCK_TYPES) ? &TABLE[id] : nullptr;
}

int x_floats(const BlockTraits& bt, int g_pad) {
    return bt.x_layout == X_TERNARY ? 5 * round8(ternary_bytes(g_pad)) : g_pad;
}

int dequant_floats(int g_pad) {
    const int t = 5 * round8(ternary_bytes(g_pad));
    return t > g_pad ? t : g_pad;
}

float prepare_x(const BlockTraits& bt, const float* x, int g, float* xc) {
    const int g_pad = padded(g);
    double s = 0.0;
    for (int c = 0; c < g; ++c) s += x[c];
    if (bt.x_layout == X_TERNARY) {
        const int B = ternary_bytes(g_pad), S = round8(B);
        for (int i = 0; i < 5; ++i)
            for (int j = 0; j < S; ++j) {
                const int c = i * B + j;
                xc[i * S + j] = (j < B && c < g) ? x[c] : 0.0f;
            }
    } else {
        std::memcpy(xc, x, sizeof(float) * g);
        for (int c = g; c < g_pad; ++c) xc[c] = 0.0f;
    }
    return (float)s;
}

int x8_blocks(const BlockTraits& bt, int g_pad) {
    return bt.x_layout == X_TERNARY ? 5 * ((ternary_bytes(g_pad) + 31) / 32) : g_pad / 32;
}

// One block: d = max|x| / 127, q = round(x / d) (nearest, ties to even); all-zero block: d = 0. step > 0 (x on the
// grid step * integer, prepare_x8): d = step, q = x * (1 / step) rounded, which recovers the grid's integers exactly
// (x = step * k rounded once and |k| <= 127, so x / step is within a few ulps of k, far inside the rounding).
static void quantize_block(const float* x, XQ8& out, float step = 0.0f) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = step > 0.0f ? step : amax / 127.0f;
    const float id = step > 0.0f ? 1.0f / step : amax > 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
        // round to nearest even by the 1.5 * 2^23 trick (|x * id| <= 127): no libm call, vectorizable
        const float r = (x[j] * id + 12582912.0f) - 12582912.0f;
        // Clamp in float before converting: a non-finite activation (NaN, or Inf * 0) must not reach the
        // float -> int conversion (undefined behaviour). std::max(-127, NaN) is -127; the result is then
        // garbage but defined, and the NaN still reaches the output through xsum, where eval's check of
        // the logits reports it.
        out.q[j] = (int8_t)(int)std::min(127.0f, std::max(-127.0f, r));
        sum += out.q[j];
    }
    out.d = d;
    out.ds = d * (float)sum;
}

double sum_lanes8(const float* x, int n) {
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int c = 0; c < n; ++c) l[c % 8] += x[c];
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// The scalar set's quant_x8 (the reference of the SIMD ones).
static float squant_x8(const float* x, int g, XQ8* xq, float step) {
    float buf[32];
    for (int b = 0; b < padded(g) / 32; ++b) {
        const int n = std::min(32, g - 32 * b);
        if (n == 32) {
            quantize_block(x + 32 * b, xq[b], step);
        } else {
            for (int j = 0; j < 32; ++j) buf[j] = j < n ? x[32 * b + j] : 0.0f;
            quantize_block(buf, xq[b], step);
        }
    }
    return (float)sum_lanes8(x, g);
}

float prepare_x8(const BlockTraits& bt, const float* x, int g, XQ8* xq, float step, int kernels) {
    if (bt.x_layout != X_TERNARY) return vec_ops(kernels).quant_x8(x, g, xq, step);
    const int g_pad = padded(g);
    float buf[32];
    const int B = ternary_bytes(g_pad), nb = (B + 31) / 32;
    for (int i = 0; i < 5; ++i)
        for (int b = 0; b < nb; ++b) {
            for (int j = 0; j < 32; ++j) {
                const int slot = 32 * b + j, c = i * B + slot;
                buf[j] = (slot < B && c < g) ? x[c] : 0.0f;
            }
            quantize_block(buf, xq[i * nb + b], step);
        }
    return (float)sum_lanes8(x, g);
}

// ------------------------------------------------------------------ scalar vector primitives
static float sdot_f32(const float* a, const float* b, int n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
    float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; i < n; ++i) acc += a[i] * b[i];
    return acc;
}
static float sdot_f16(const uint8_t* h, const float* x, int n) {
    const float* T = h2f_table();
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += T[load_u16(h + 2 * (i + k))] * x[i + k];
    float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; i < n; ++i) acc += T[load_u16(h + 2 * i)] * x[i];
    return acc;
}
static void sdot_f16_rows(const uint8_t* h, size_t stride, int nr, const float* x, int n, float* out) {
    for (int r = 0; r < nr; ++r) out[r] = sdot_f16(h + r * stride, x, n);
}
static void saxpy(float a, const float* x, float* y, int n) {
    for (int i = 0; i < n; ++i) y[i] += a * x[i];
}
static void sf16_to_f32(const uint8_t* h, float* out, int n) {
    const float* T = h2f_table();
    for (int i = 0; i < n; ++i) out[i] = T[load_u16(h + 2 * i)];
}
static void sf32_to_f16(const float* x, uint8_t* h, int n) {
    for (int i = 0; i < n; ++i) {
        const uint16_t v = fp32_to_fp16(x[i]);
        std::memcpy(h + 2 * i, &v, 2);
    }
}
static void sgemm4(const float* W, int ldw, const float* X, int ldx, int nt, int K, float* Y, int ldy, int nr) {
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r < nr; ++r) Y[(size_t)t * ldy + r] = sdot_f32(W + (size_t)r * ldw, X + (size_t)t * ldx, K);
}

static void stile8_mix(const uint8_t* t, const TileDesc* d, int n, const XQ8* xq, const int* x8off, const float* xsum,
                       float* acc, std::ptrdiff_t pf) {  // reference: the kinds' scalar tile kernels, chunk by chunk
    for (int i = 0; i < n; ++i)
        block_traits(d[i].kind)->tile8[K_SCALAR](t + d[i].off, 0, 1, xq + x8off[d[i].c], xsum + d[i].c, 32 * d[i].nb, acc, pf);
}
static void ssilu_mul(float* g, const float* u, int n) {
    for (int i = 0; i < n; ++i) {
        const float v = g[i];
        g[i] = v / (1.0f + std::exp(-v)) * u[i];
    }
}
static void satt_scores(const float* q, int nq, int hd, const float* K, size_t ks, int n, float scale, float* S,
                        size_t lds) {
    for (int j = 0; j < nq; ++j)
        for (int s = 0; s < n; ++s) S[(size_t)j * lds + s] = scale * sdot_f32(q + (size_t)j * hd, K + (size_t)s * ks, hd);
}
static float sexp_sum(float* e, int n, float mx) {
    float sum = 0.0f;
    for (int s = 0; s < n; ++s) {
        e[s] = std::exp(e[s] - mx);
        sum += e[s];
    }
    return sum;
}
static void satt_values(const float* P, size_t ldp, int nq, int hd, const float* V, size_t vs, int n, float* O) {
    for (int j = 0; j < nq; ++j)
        for (int s = 0; s < n; ++s) saxpy(P[(size_t)j * ldp + s], V + (size_t)s * vs, O + (size_t)j * hd, hd);
}
// The fp16-row forms: each row converted (exactly) to float32, then the float reference above.
static void satt_scores_h(const float* q, int nq, int hd, const uint16_t* K, size_t ks, int n, float scale, float* S,
                          size_t lds) {
    thread_local std::vector<float> row;   // (the scalar set runs decode on CPUs without SIMD: no allocation per call)
    row.resize((size_t)hd);
    for (int s = 0; s < n; ++s) {
        sf16_to_f32((const uint8_t*)(K + (size_t)s * ks), row.data(), hd);
        satt_scores(q, nq, hd, row.data(), 0, 1, scale, S + s, lds);
    }
}
static void satt_values_h(const float* P, size_t ldp, int nq, int hd, const uint16_t* V, size_t vs, int n, float* O) {
    thread_local std::vector<float> row;
    row.resize((size_t)hd);
    for (int s = 0; s < n; ++s) {
        sf16_to_f32((const uint8_t*)(V + (size_t)s * vs), row.data(), hd);
        satt_values(P + s, ldp, nq, hd, row.data(), 0, 1, O);
    }
}
// A SIMD set's quant_x8 (whole blocks of 32) on any g: a ragged chunk is copied into zeros up to its padded width,
// which is what the scalar reference quantizes (its last block zero-padded) and leaves every lane's sum unchanged.
template <float (*Q32)(const float*, int, XQ8*, float)>
static float quant_x8_any(const float* x, int g, XQ8* xq, float step) {
    if (g % 32 == 0) return Q32(x, g, xq, step);
    thread_local std::vector<float> buf;
    buf.assign((size_t)padded(g), 0.0f);
    std::memcpy(buf.data(), x, sizeof(float) * g);
    return Q32(buf.data(), padded(g), xq, step);
}
// A SIMD set's silu_mul (multiples of 8 values) on any n: the tail padded to 8 and run through the same vector code,
// so every value gets the same arithmetic wherever it sits.
template <void (*SILU8)(float*, const float*, int)>
static void silu_mul_any(float* g, const float* u, int n) {
    const int n8 = n & ~7;
    if (n8) SILU8(g, u, n8);
    if (n8 < n) {
        float gv[8] = {0, 0, 0, 0, 0, 0, 0, 0}, uv[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < n - n8; ++j) gv[j] = g[n8 + j], uv[j] = u[n8 + j];
        SILU8(gv, uv, 8);
        for (int j = 0; j < n - n8; ++j) g[n8 + j] = gv[j];
    }
}
// A SIMD set's exp_sum (multiples of 8 values) on any n: the tail padded to 8 and run through the same vector code
// (its padding's exps are not summed), so every value gets the same arithmetic wherever it sits.
template <float (*EXP8)(float*, int, float)>
static float exp_sum_any(float* e, int n, float mx) {
    const int n8 = n & ~7;
    float sum = n8 ? EXP8(e, n8, mx) : 0.0f;
    if (n8 < n) {
        float buf[8];
        for (int j = 0; j < 8; ++j) buf[j] = n8 + j < n ? e[n8 + j] : mx;
        EXP8(buf, 8, mx);
        for (int j = 0; j < n - n8; ++j) {
            e[n8 + j] = buf[j];
            sum += buf[j];
        }
    }
    return sum;
}
// A SIMD set's att_values (one or two heads a call, their outputs held in registers) on any number of heads.
template <typename T, void (*AV2)(const float*, size_t, int, int, const T*, size_t, int, float*)>
static void att_values_pairs(const float* P, size_t ldp, int nq, int hd, const T* V, size_t vs, int n, float* O) {
    for (int j = 0; j < nq; j += 2) AV2(P + (size_t)j * ldp, ldp, std::min(2, nq - j), hd, V, vs, n, O + (size_t)j * hd);
}
// The scalar set's fake_quant (the reference of the SIMD ones; rotation.h act_fake_quant): s = max((max - min) /
// (2^b - 1), 1e-8), z = round(-min / s), q = clamp(round(x / s) + z, 0, 2^b - 1), x = s (q - z), rounding half to
// even. std::min / std::max's comparisons exactly (a NaN value after the first is passed over by min and max).
static float sfake_quant(float* x, int n, int bits) {
    const float hi_code = (float)((1 << bits) - 1);
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
    }
    const float s = std::max((hi - lo) / hi_code, 1e-8f);
    const float z = std::nearbyint(-lo / s);
    for (int i = 0; i < n; ++i) {
        const float q = std::min(std::max(std::nearbyint(x[i] / s) + z, 0.0f), hi_code);
        x[i] = s * (q - z);
    }
    return s;
}
static const VecOps SCALAR_OPS = {sdot_f32, sdot_f16, sdot_f16_rows, saxpy, sf16_to_f32, sf32_to_f16, sgemm4, stile8_mix, squant_x8, ssilu_mul,
                                   satt_scores, sexp_sum, satt_values, satt_scores_h, satt_values_h, sfake_quant, nullptr, nullptr};
#if WQE_X86
static const VecOps AVX2_OPS = {avx2::vdot_f32, avx2::vdot_f16, avx2::vdot_f16_rows, avx2::vaxpy, avx2::vf16_to_f32, avx2::vf32_to_f16, avx2::vgemm4, tile8_mix_x86, quant_x8_any<avx2::quant_x8>, silu_mul_any<avx2::silu_mul>,
                                 avx2::att_scores, exp_sum_any<avx2::exp_sum>, att_values_pairs<float, avx2::att_values>,
                                 avx2::att_scores_h, att_values_pairs<uint16_t, avx2::att_values_h>, avx2::fake_quant,
                                 avx2::att_scores_kv, avx2::att_values_kv};
// The AVX2 set with the AVX-512 attention kernels (the same bits, twice the elements per instruction): what
// vec_ops(K_AVX2) gives where avx512_attention() says so.
static const VecOps AVX512_OPS = {avx2::vdot_f32, avx2::vdot_f16, avx2::vdot_f16_rows, avx2::vaxpy, avx2::vf16_to_f32, avx2::vf32_to_f16, avx2::vgemm4, tile8_mix_x86, quant_x8_any<avx2::quant_x8>, silu_mul_any<avx2::silu_mul>,
                                   avx2::z512::att_scores, exp_sum_any<avx2::exp_sum>, avx2::z512::att_values,
                                   avx2::z512::att_scores_h, avx2::z512::att_values_h, avx2::fake_quant,
                                   avx2::z512::att_scores_kv, avx2::z512::att_values_kv};
#endif
#if WQE_ARM64
static const VecOps NEON_OPS = {neon::vdot_f32, neon::vdot_f16, neon::vdot_f16_rows, neon::vaxpy, neon::vf16_to_f32, neon::vf32_to_f16, neon::vgemm4, neon::tile8_mix, quant_x8_any<neon::quant_x8>, silu_mul_any<neon::silu_mul>,
                                 neon::att_scores, exp_sum_any<neon::exp_sum>, att_values_pairs<float, neon::att_values>,
                                 neon::att_scores_h, att_values_pairs<uint16_t, neon::att_values_h>, neon::fake_quant,
                                 neon::att_scores_kv, neon::att_values_kv};
#endif

const VecOps& vec_ops(int kernels) {
#if WQE_X86
    if (kernels == K_AVX2) return avx512_attention() ? AVX512_OPS : AVX2_OPS;
#endif
#if WQE_ARM64
    if (kernels == K_NEON) return NEON_OPS;
#endif
    (void)kernels;
    return SCALAR_OPS;
}

// ------------------------------------------------------------------ CPU detection and selection
bool cpu_has_avx2() {
#if WQE_X86
    static const bool ok = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
        const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
        if (!(fma && osxsave && avx && f16c)) return false;
        unsigned xlo, xhi;
        __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
        if ((xlo & 6u) != 6u) return false;  // OS saves SSE and AVX state
        if (__get_cpuid_max(0, nullptr) < 7) return false;
        __cpuid_count(7, 0, a, b, c, d);
        return (b & (1u << 5)) != 0;  // AVX2
    }();
    return ok;
#else
    return false;
#endif
}

bool cpu_has_avx512() {
#if WQE_X86
    static const bool ok = [] {
        if (!cpu_has_avx2() || __get_cpuid_max(0, nullptr) < 7) return false;
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        unsigned xlo, xhi;
        __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
        const bool zmm_state = (xlo & 0xE6u) == 0xE6u;  // opmask, ZMM_Hi256, Hi16_ZMM saved by the OS
        const unsigned f = 1u << 16, dq = 1u << 17, bw = 1u << 30, vl = 1u << 31;
        return zmm_state && (b & (f | dq | bw | vl)) == (f | dq | bw | vl);
    }();
    return ok;
#else
    return false;
#endif
}

int cpu_vnni() {
#if WQE_X86
    static const int v = [] {
        if (!cpu_has_avx2() || __get_cpuid_max(0, nullptr) < 7) return 0;
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        const unsigned max_sub = a;
        unsigned xlo, xhi;
        __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
        const bool zmm_state = (xlo & 0xE6u) == 0xE6u;  // opmask, ZMM_Hi256, Hi16_ZMM saved by the OS
        if (zmm_state && (b & (1u << 16)) && (b & (1u << 31)) && (c & (1u << 11))) return 1;  // AVX512F, VL, VNNI
        if (max_sub >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            if (a & (1u << 4)) return 2;  // AVX-VNNI
        }
        return 0;
    }();
    return v;
#else
    return 0;
#endif
}

bool set_x86_vnni(int level) {
#if WQE_X86
    if (level < 0) level = cpu_vnni();
    if (level != 0 && level != cpu_vnni()) return false;
    g_vnni.store(level);
    return true;
#else
    return level <= 0;
#endif
}

int x86_vnni() {
#if WQE_X86
    return vnni_level();
#else
    return 0;
#endif
}

bool cpu_has_neon() {
#if WQE_ARM64
    return true;
#else
    return false;
#endif
}

bool cpu_has_dotprod() {
#if WQE_ARM64 && defined(__linux__)
    static const bool ok = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
    return ok;
#elif WQE_ARM64 && defined(__APPLE__)
    static const bool ok = [] {
        int v = 0;
        size_t n = sizeof v;
        return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, nullptr, 0) == 0 && v != 0;
    }();
    return ok;
#else
    return false;
#endif
}

int best_kernels() { return cpu_has_avx2() ? K_AVX2 : cpu_has_neon() ? K_NEON : K_SCALAR; }

static int default_kernels() {
    const char* env = std::getenv("WQEDGE_KERNELS");
    if (env && std::strcmp(env, "scalar") == 0) return K_SCALAR;
    return best_kernels();
}

static std::atomic<int> g_kernels{0};

int active_kernels() {
    int k = g_kernels.load(std::memory_order_relaxed);
    if (k == 0) {
        k = default_kernels();
        g_kernels.store(k);
    }
    return k;
}

int set_kernels(int k) {
    if (k == 0) k = best_kernels();
    if (k == K_AVX2 && !cpu_has_avx2()) return -1;
    if (k == K_NEON && !cpu_has_neon()) return -1;
    if (k != K_SCALAR && k != K_AVX2 && k != K_NEON) return -1;
    g_kernels.store(k);
    return 0;
}

// ------------------------------------------------------------------ activation precision
// Default for decode: int8 activations (issue 12). Decode is memory-bound only with integer dot products
// (float activations decode 1.4-2x slower), the decode-path perplexity moves by < 0.5% on the fixture model,
// and llama.cpp does the same for every quantized type; the float path stays the reference
// (WQEDGE_ACT=f32, wqe_set_activations(WQE_ACT_F32)). cpp/README.md has the numbers.
static constexpr int DEFAULT_ACT = ACT_Q8;

static int env_act() {
    const char* env = std::getenv("WQEDGE_ACT");
    if (env && std::strcmp(env, "f32") == 0) return ACT_F32;
    if (env && std::strcmp(env, "q8") == 0) return ACT_Q8;
    return DEFAULT_ACT;
}

static std::atomic<int> g_act{-1};

int active_act() {
    int a = g_act.load(std::memory_order_relaxed);
    if (a < 0) {
        a = env_act();
        g_act.store(a);
    }
    return a;
}

int set_act(int act) {
    if (act != ACT_F32 && act != ACT_Q8) return -1;
    g_act.store(act);
    return 0;
}

static std::atomic<int> g_dotprod{-1};

bool neon_dotprod() {
    int v = g_dotprod.load(std::memory_order_relaxed);
    if (v < 0) {
        const char* env = std::getenv("WQEDGE_NO_DOTPROD");
        v = cpu_has_dotprod() && !(env && std::strcmp(env, "1") == 0) ? 1 : 0;
        g_dotprod.store(v);
    }
    return v != 0;
}

bool set_neon_dotprod(bool on) {
    if (on && !cpu_has_dotprod()) return false;
    g_dotprod.store(on ? 1 : 0);
    return true;
}

bool repack_wanted(int kernels);  // linear.h

const char* system_info() {
    static char buf[128];
    const int k = active_kernels();
#if WQE_ARM64  // tiles: whether a model loaded now gets row tiles (repack_wanted)
    std::snprintf(buf, sizeof buf, "neon=1 dotprod=%d kernels=%s%s act=%s tiles=%d", cpu_has_dotprod() ? 1 : 0,
                  k == K_NEON ? "neon" : "scalar", k == K_NEON && neon_dotprod() ? "+dotprod" : "",
                  active_act() == ACT_Q8 ? "q8" : "f32", repack_wanted(k) ? 1 : 0);
#else
    std::snprintf(buf, sizeof buf, "avx2+fma+f16c=%d vnni=%s kernels=%s act=%s attention=%s", cpu_has_avx2() ? 1 : 0,
                  x86_vnni() == 1 ? "avx512" : x86_vnni() == 2 ? "avx" : "none", k == K_AVX2 ? "avx2" : "scalar",
                  active_act() == ACT_Q8 ? "q8" : "f32", k != K_AVX2 ? "scalar" : avx512_attention() ? "avx512" : "avx2");
#endif
    return buf;
}

uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    if (x >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (x > 0x7F800000u ? 0x200u : 0));  // inf / nan
    if (x >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520: inf
    if (x < 0x38800000u) {  // subnormal half (or zero)
        if (x < 0x33000000u) return (uint16_t)sign;  // < 2^-25: rounds to zero
        const uint32_t e = x >> 23;
        uint32_t mant = (x & 0x7FFFFFu) | 0x800000u;
        const int shift = 126 - (int)e;  // 14 + (113 - e) ... half subnormal = mant >> (126 - e)
        const uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        uint32_t r = half + ((rem > mid || (rem == mid && (half & 1))) ? 1 : 0);
        return (uint16_t)(sign | r);
    }
    uint32_t h = ((x >> 13) - (112u << 10));
    const uint32_t rem = x & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
    return (uint16_t)(sign | h);
}

}  // namespace wqe
