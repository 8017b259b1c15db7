// The per-block-type traits table (one entry per action of docs/format.md) and the vector
// primitives, each with a scalar reference and, on x86-64, an AVX2+FMA+F16C implementation
// selected at run time. Adding a block type touches the table in blocks.cpp (plus its kernels).
#pragma once

#include <cstddef>
#include <cstdint>

namespace wqe {

enum KernelSet { K_SCALAR = 1, K_AVX2 = 2, K_NEON = 3 };
constexpr int N_KERNEL_SETS = 4;  // index 0 unused

constexpr int SUBBLOCK = 32;
inline int padded(int g) { return (g + SUBBLOCK - 1) / SUBBLOCK * SUBBLOCK; }
inline int round8(int n) { return (n + 7) & ~7; }
inline int ternary_bytes(int g_pad) { return 2 * ((g_pad + 9) / 10); }
// Two-level ("subscale") kinds q4s, q3s, q2s (ids 7-9, docs/format.md): row-block = d, dmin (fp16) | per 32-column
// sub-block j a 6-bit scale code s_j and min code n_j (sub_bytes) | codes as q4/q3/q2; w = (d s_j) q - dmin n_j.
// Sub-scale bytes: n_sub bytes (s_j & 15 | (n_j & 15) << 4), then one nibble per sub-block (low nibble for even j)
// holding s_j >> 4 | (n_j >> 4) << 2.
inline int sub_bytes(int g_pad) { const int n = g_pad / 32; return n + (n + 1) / 2; }

// How a chunk's activation slice is laid out for the dot kernels ("prepared x"):
//   X_PLAIN:   g_pad floats, x[0..g) then zeros;
//   X_TERNARY: 5 planes of round8(B) floats; plane i, slot j holds x[i*B + j] (0 past g or past B),
//              so byte j's trit i meets its column without a gather.
enum XLayout { X_PLAIN = 0, X_TERNARY = 1 };
// Block kind ids (BlockTraits::id; the file format's action ids, docs/format.md): the kernels' per-kind switches name
// them. KIND_Q4S.. are the two-level kinds (a kind >= KIND_Q4S is two-level).
enum BlockKind {
    KIND_FP16 = 0, KIND_Q8 = 1, KIND_Q4 = 2, KIND_Q3 = 3, KIND_Q2 = 4, KIND_TERNARY = 5, KIND_Q1 = 6,
    KIND_Q4S = 7, KIND_Q3S = 8, KIND_Q2S = 9
};

// Dot product of one row-block's codes with the prepared x (no protected residuals):
//   affine:  d * sum_j q_j x_j + m * xsum;   ternary: a * (sum_j t_j x_j - xsum);   fp16: sum_j h_j x_j.
// rb points at the row-block (header first); xsum = sum of the chunk's g activations.
typedef float (*dot_fn)(const uint8_t* rb, const float* xc, float xsum, int g_pad);
// The same for n rows at once (row r at rb + r * stride): out[r] = dot of row r. The matrix-vector
// product calls this once per chunk per tile of rows, so per-call overhead is amortised.
typedef void (*dot_rows_fn)(const uint8_t* rb, size_t stride, int n, const float* xc, float xsum, int g_pad, float* out);
// Dequantize one row-block's codes (no residuals) to `out` in column order; writes
// dequant_floats(g_pad) floats (>= g_pad; the values past g are padding).
typedef void (*dequant_fn)(const uint8_t* rb, int g_pad, float* out);

// Int8 activations (activation mode ACT_Q8, decode only): a chunk's prepared x, in the same slot order
// as its XLayout, cut into blocks of 32 slots, each quantized symmetrically: x ~ d * q, q in [-127, 127]
// (round to nearest, d = max|x| / 127). X_PLAIN: block b = columns 32b..32b+31 (g_pad / 32 blocks);
// X_TERNARY: plane i is ceil(B / 32) blocks, slot j of plane i = column i*B + j (0 past B or g).
// ds = d * sum(q): lets a kernel that offsets its codes (q8: code - 128, to make them int8) restore
// sum(code * x) = sum((code - 128) * x) + 128 * sum(x) without another pass.
struct XQ8 {
    float d, ds;
    int8_t q[32];
};
// Dot of one row-block with int8 activations: affine d * sum_b xq[b].d * (sum_j q_j xq_j) + m * xsum,
// ternary a * (sum_b xq[b].d * (sum_j t_j xq_j) - xsum); the per-block integer sums are exact, xsum is
// the float sum of the chunk's true activations.
typedef float (*dot8_fn)(const uint8_t* rb, const XQ8* xq, float xsum, int g_pad);
typedef void (*dot8_rows_fn)(const uint8_t* rb, size_t stride, int n, const XQ8* xq, float xsum, int g_pad, float* out);

// Row tiles (issue 12; the decode layout a model is repacked into at load, linear.h Linear::tiles): the
// row-blocks of TILE_ROWS consecutive rows for one chunk stored as one "part" of TILE_ROWS * tile_row_bytes
// bytes. Kinds with tile kernels (q8, q4, q3, q2, q1, ternary: BlockTraits::tile_sub > 0; q8 only in uniform runs,
// linear.cpp repack_tiles) interleave the rows:
//   [header field 0 of rows 0..7, fp16][field 1 of rows 0..7 (affine kinds: d, then m)][codes][residuals:
//   row 0's n_p fp16, row 1's, ...]
// Affine kinds: codes = g_pad/32 blocks of 8 * tile_sub bytes, a block holding 32 columns of the 8 rows as
// 32-byte vectors of 8 rows x 4 bytes (byte 4r + k of a vector belongs to row r), so one int8 multiply-add over a
// vector gives an int32 lane per row for a group of 4 columns. Ternary (header a): round4(B) / 4 vectors, vector v =
// code bytes 4v..4v+3 of each row (byte 4r + k = row r's byte 4v + k, 0 past B), i.e. slots 4v..4v+3 of the five
// X_TERNARY planes. docs/format.md, "Row tiles". Other kinds store the 8 row-blocks one after another.
constexpr int TILE_ROWS = 8;
// acc[r] += sum over nch consecutive chunks (parts part_bytes apart; their XQ8 blocks consecutive,
// x8_blocks(kind, g_pad) per chunk; xsum one per chunk) of row r's int8 dot (no residuals). pf: when non-zero, the kernel
// prefetches the bytes pf further on as it goes (the tile its thread takes next).
typedef void (*tile8_fn)(const uint8_t* part, size_t part_bytes, int nch, const XQ8* xq, const float* xsum, int g_pad,
                         float* acc, std::ptrdiff_t pf);

// A run of tiled chunks of any tile kinds (ids 2, 3, 4, 5, 6: a mixed plan's chunks) in one call: chunk d[i].c's part
// at tile + d[i].off, its int8 activations at xq + x8off[d[i].c] (nb = g_pad / 32), its sum xsum[d[i].c];
// acc[r] += the rows' dots (VecOps::tile8_mix).
struct TileDesc {
    size_t off;
    int32_t c, kind, nb, pad_;
};
typedef void (*tile8_mix_fn)(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, const int* x8off,
                             const float* xsum, float* acc, std::ptrdiff_t pf);

// Two adjacent tiles in one call (tile B = tile A + tstride bytes; acc[0..8) += tile A's rows, acc[8..16) += tile B's),
// the same results bit for bit as tile8 / tile8_mix on each: where registers hold 16 rows (AVX-512), one activation
// broadcast and one multiply-add serve both tiles (kernels_vnni.cpp; bench/results/tile16.md).
typedef void (*tile16_fn)(const uint8_t* part, std::ptrdiff_t tstride, size_t part_bytes, int nch, const XQ8* xq,
                          const float* xsum, int g_pad, float* acc, std::ptrdiff_t pf);
typedef void (*tile16_mix_fn)(const uint8_t* tile, std::ptrdiff_t tstride, const TileDesc* d, int n, const XQ8* xq,
                              const int* x8off, const float* xsum, float* acc, std::ptrdiff_t pf);
// The pair kernel of tile kind id (2, 3, 4, 6, 7, 8, 9) and the mixed-run one for kernel set `kernels`; nullptr where there is
// none (then tile8 runs on each tile): only the AVX2 set with AVX512-VNNI (+ AVX512BW) in use, and not switched off by
// WQEDGE_TILE16=0 or set_tile16(false).
tile16_fn tile16_kernel(int id, int kernels);
tile16_mix_fn tile16_mix_kernel(int kernels);
bool set_tile16(bool on);  // false (and nothing changes) when on but this CPU has no pair kernels
// The pair kernels' GFNI build (vgf2p8affineqb extracts the bit fields; bit-identical): on where the CPU has GFNI, unless
// WQEDGE_GFNI=0 or set_gfni(false); set_gfni(true) is false (and nothing changes) on a CPU without it.
bool set_gfni(bool on);
bool gfni_in_use();
// The AVX2 set's attention value kernels on 512-bit registers (kernels_avx512_att.cpp; bit-identical): in
// vec_ops(K_AVX2) where the CPU has AVX-512 (cpu_has_avx512), unless WQEDGE_AVX512_ATTENTION=0 or
// set_avx512_attention(false); set_avx512_attention(true) is false (and nothing changes) on a CPU without it.
bool set_avx512_attention(bool on);
bool avx512_attention();

struct BlockTraits {
    const char* name;
    int id;            // id stored in wqedge.tensors.<t>.chunk_actions
    int header_bytes;  // fp16 parameters at the start of each row-block
    size_t (*code_bytes)(int g_pad);
    XLayout x_layout;
    dot_fn dot[N_KERNEL_SETS];          // [K_SCALAR], [K_AVX2], [K_NEON] (nullptr when not built)
    dot_rows_fn dot_rows[N_KERNEL_SETS];
    dequant_fn dequant[N_KERNEL_SETS];
    // Int8-activation kernels (nullptr in every column: the kind stays float in ACT_Q8, e.g. fp16).
    // The NEON column picks SDOT (dot-product extension) or plain NEON at run time (neon_dotprod()).
    dot8_fn dot8[N_KERNEL_SETS];
    dot8_rows_fn dot8_rows[N_KERNEL_SETS];
    // Row tiles: code bytes per 32 columns of one row in the interleaved tile layout (ternary: 4, the bytes of one
    // row in a vector; 0: the kind keeps plain row-blocks in a tile), and the tile kernels (scalar reference, AVX2;
    // nullptr: untile and use dot8_rows).
    int tile_sub;
    tile8_fn tile8[N_KERNEL_SETS];
    // Two-level kinds (ids 7-9): header d, dmin, then sub_bytes(g_pad) of sub-scale codes before the codes;
    // their int8 dots take each sub-block's activation sum from XQ8::ds (as llama.cpp's k-quants do).
    bool two_level;
};

constexpr int N_BLOCK_TYPES = 10;
const BlockTraits* block_traits(int id);  // nullptr for an unknown id

inline size_t row_bytes(const BlockTraits& bt, int g, int n_protected) {
    return (size_t)bt.header_bytes + bt.code_bytes(padded(g)) + 2 * (size_t)n_protected;
}
// Row tiles (tile_sub > 0 kinds): code bytes of one row of a part (affine: g_pad / 32 * tile_sub; ternary:
// round4(ternary_bytes(g_pad))), and a row-block's bytes in a tile (header + those + 2 per protected column).
size_t tile_code_bytes(const BlockTraits& bt, int g_pad);
inline size_t tile_row_bytes(const BlockTraits& bt, int g, int n_protected) {
    return (size_t)bt.header_bytes + tile_code_bytes(bt, padded(g)) + 2 * (size_t)n_protected;
}
// The 8 rows' codes of one chunk (src[r] = row r's code bytes, as in its row-block) into the interleaved layout
// (dst: 8 * tile_code_bytes bytes, every byte written); and back: row r's code bytes (the row-block's) to
// dst + r * stride (tile_code_bytes bytes each: ternary's padding bytes, 0, included).
void tile_pack_codes(const BlockTraits& bt, const uint8_t* const src[TILE_ROWS], int g_pad, uint8_t* dst);
void tile_unpack_codes(const BlockTraits& bt, const uint8_t* tile, int g_pad, uint8_t* dst, size_t stride);

int x_floats(const BlockTraits& bt, int g_pad);   // floats of prepared x for one chunk
int dequant_floats(int g_pad);                     // floats a dequant_fn may write
// Prepare a chunk's activations x[0..g) into xc (x_floats floats); returns sum of x[0..g).
float prepare_x(const BlockTraits& bt, const float* x, int g, float* xc);

// Int8 activations: blocks of one chunk, and their preparation (returns sum of x[0..g), in float).
int x8_blocks(const BlockTraits& bt, int g_pad);
// step > 0: x lies on the grid step * integer, |integer| <= 127 (activations quantized to 4 or 6 bits, rotation.h
// act_fake_quant): every block takes d = step and q = those integers, so the int8 values are the grid values exactly
// instead of a second rounding of them.
// kernels: the set whose quant_x8 quantizes plain-layout chunks (bit-identical results in every set).
float prepare_x8(const BlockTraits& bt, const float* x, int g, XQ8* xq, float step = 0.0f, int kernels = K_SCALAR);
// The sum of x[0..n) that prepare_x8 returns: double lanes c mod 8, each in order of c, combined as
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), the reduction of 8 lanes in SIMD registers (the scalar reference).
double sum_lanes8(const float* x, int n);

// Activation precision of the matrix-vector products (decode): ACT_F32 (float activations, the
// reference) or ACT_Q8 (int8 activations per 32 columns where the block kind has dot8 kernels).
// Process wide; the default comes from WQEDGE_ACT=f32|q8, read once, else ACT_F32 (blocks.cpp).
enum ActPrecision { ACT_F32 = 0, ACT_Q8 = 1 };
int active_act();
int set_act(int act);  // 0 or -1 for an unknown value
// AArch64: whether the NEON int8 kernels use SDOT (cpu_has_dotprod(), unless switched off by
// set_neon_dotprod(false) or WQEDGE_NO_DOTPROD=1, so tests can run both paths on one CPU).
bool neon_dotprod();
bool set_neon_dotprod(bool on);  // returns false (and changes nothing) when on but the CPU lacks it

// Dense vector primitives (float32 activations).
struct VecOps {
    float (*dot_f32)(const float* a, const float* b, int n);
    float (*dot_f16)(const uint8_t* h, const float* x, int n);      // h: n halves, unaligned
    // out[r] = dot_f16(h + r * stride, x, n) for r < nr (SIMD: several rows share each x load)
    void (*dot_f16_rows)(const uint8_t* h, size_t stride, int nr, const float* x, int n, float* out);
    void (*axpy)(float a, const float* x, float* y, int n);          // y += a x
    void (*f16_to_f32)(const uint8_t* h, float* out, int n);
    // h = n halves of x, round to nearest even (fp32_to_fp16's bits for every non-NaN value; NaN stays NaN): the fp16
    // KV cache's rows, written once per token and KV head (the scalar conversion was 3-5% of a short decode).
    void (*f32_to_f16)(const float* x, uint8_t* h, int n);
    // Y[t * ldy + r] = sum_k W[r * ldw + k] * X[t * ldx + k] for r < 4, t < nt; K % 8 == 0,
    // W has 4 rows (unused ones zero), rows and X 32-byte padded with zeros past the true K.
    void (*gemm4)(const float* W, int ldw, const float* X, int ldx, int nt, int K, float* Y, int ldy, int nr);
    tile8_mix_fn tile8_mix;  // nullptr: no tile kernels in this set
    // prepare_x8 for the plain layout: x[0..g) into g_pad / 32 int8 blocks (quantize_block each, zeros past g);
    // returns the sum of x[0..g) in double over 8 lanes (sum_lanes8's order). Bit-identical in every set: it runs
    // once per linear per token on the calling thread, so its speed is decode's serial time (issue 12).
    float (*quant_x8)(const float* x, int g, XQ8* xq, float step);
    // SwiGLU's gate in place: g[i] = g[i] / (1 + exp(-g[i])) * u[i]. The scalar set calls std::exp; SIMD sets use a
    // polynomial exp (within 1e-6 relative of the scalar result; non-finite inputs stay non-finite). On the calling
    // thread between two threaded products, its speed is decode's serial time (issue 12).
    void (*silu_mul)(float* g, const float* u, int n);
    // Attention over n cached positions of one KV head (row s of K at K + s * ks, of V at V + s * vs) for nq query
    // heads (head j at q + j * hd): at long context one dot and one axpy call per position and head were most of a
    // decode (issue 12), so each call takes every position. Each head's arithmetic is the same whatever nq.
    // S[j * lds + s] = scale * dot(q_j, K_s) for j < nq, s < n.
    void (*att_scores)(const float* q, int nq, int hd, const float* K, size_t ks, int n, float scale, float* S,
                       size_t lds);
    // e[s] = exp(e[s] - mx) in place for s < n; returns their sum (the softmax's numerators and denominator). SIMD
    // sets use silu_mul's polynomial exp.
    float (*exp_sum)(float* e, int n, float mx);
    // O[j * hd + d] += sum over s, in order, of P[j * ldp + s] * V_s[d], for j < nq and d < hd.
    void (*att_values)(const float* P, size_t ldp, int nq, int hd, const float* V, size_t vs, int n, float* O);
    // The same two on fp16 rows (the 16-bit KV cache read as stored, kvcache.h; strides in values): each element's
    // float is exact, so the results are the bits of att_scores / att_values on the rows converted to float32.
    void (*att_scores_h)(const float* q, int nq, int hd, const uint16_t* K, size_t ks, int n, float scale, float* S,
                         size_t lds);
    void (*att_values_h)(const float* P, size_t ldp, int nq, int hd, const uint16_t* V, size_t vs, int n, float* O);
    // Per-token asymmetric quantize-dequantize of x[0..n) at `bits` (4 or 6) in place, returning the grid step s:
    // RUQuant's activation quantizer (rotation.h act_fake_quant defines it). Bit-identical in every set (the same
    // comparisons, IEEE division and round-to-nearest-even per value). On the calling thread once per group input
    // and token, so its speed is decode's serial time: the scalar loop was 7% of a W4A4 decode on llama-s.
    float (*fake_quant)(float* x, int n, int bits);
    // The same two on the quantized KV cache's rows as stored (kvcache.h: bits 8 or 4, groups of 32 or 16 values, hd a
    // multiple of the group; rows rb bytes apart; any number of heads): the bits of att_scores / att_values on the rows
    // converted by kv_rows_values with this set. nullptr where the set has none (the rows are converted first, 64 at a
    // time).
    void (*att_scores_kv)(const float* q, int nq, int hd, const uint8_t* K, size_t rb, int bits, int n, float scale,
                          float* S, size_t lds);
    void (*att_values_kv)(const float* P, size_t ldp, int nq, int hd, const uint8_t* V, size_t rb, int bits, int n,
                          float* O);
};
// Rows ahead that the attention kernels prefetch (a float32 cache's rows; measured +14% decode at 2000 tokens when a KV
// head's rows lay a token's K apart; the quantized rows' conversion prefetches by bytes instead, kvcache.cpp).
constexpr int ATT_PREFETCH_ROWS = 8;
const VecOps& vec_ops(int kernels);

// Kernel set in use (process wide): set_kernels(0) picks the best the CPU supports.
bool cpu_has_avx2();
bool cpu_has_neon();     // AArch64 Advanced SIMD (always, on AArch64)
// x86-64: VNNI for the row-tile int8 kernels of the AVX2 set (kernels_vnni.cpp; bit-identical results):
// 0 none, 1 AVX512-VNNI + AVX512VL, 2 AVX-VNNI. x86_vnni() is the level in use (cpu_vnni() unless
// WQEDGE_NO_VNNI=1 or set_x86_vnni(0 | the CPU's level; -1 = the CPU's), which returns false for a level the CPU lacks).
int cpu_vnni();
int x86_vnni();
// x86-64: AVX-512 F, VL, DQ and BW, with the OS saving zmm state.
bool cpu_has_avx512();
bool set_x86_vnni(int level);
bool cpu_has_dotprod();  // AArch64 SDOT/UDOT (getauxval HWCAP_ASIMDDP); used by the NEON int8 kernels (docs/neon.md)
int best_kernels();      // K_AVX2, K_NEON or K_SCALAR
int active_kernels();
int set_kernels(int k);  // returns 0, or -1 when k is unsupported here
const char* system_info();

}  // namespace wqe
