// RUQuant input transforms (issue 15; docs/format.md "Rotations", docs/ruquant.md) and per-token activation
// quantization at 6 and 4 bits. One Rotation per decoder layer and transform group (q/k/v, o, gate/up, down):
// x' = H R2 P R1 (x / s), applied to a group's input right before its linears, whose weights the converter
// folded (W' = W diag(s) M^T, so W' x' = W x). Cost per token: two block matrix products (2 d B multiply-adds),
// a gather and a 2 d reflection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace wqe {

class GGUFFile;
class ThreadPool;
struct XQ8;

struct Rotation {
    int dim = 0, block = 0;
    // Format 2: float32 matrices, row-major B x B and t x t (t = dim mod B; empty when 0).
    std::vector<float> r1, r1_tail, r2, r2_tail;
    std::vector<float> r1p, r2p;                   // R1, R2 packed (pack_blocks): the AVX2 multi-block product
    // Format 3: int8 codes (row-major) with one float scale per row, R = diag(s) Q: y_i = (sum_j Q_ij x_j) s_i.
    std::vector<int8_t> q1, q1_tail, q2, q2_tail;
    std::vector<float> s1, s1_tail, s2, s2_tail;
    std::vector<int8_t> q1p, q2p;                  // Q1, Q2 packed (pack_rows16): the AVX2 multi-block product
    // Q1, Q2 packed for int8 activations (pack_quads16) with their row sums (quad_row_sums): made at load where the
    // AVX2 set runs AVX-512 VNNI (block_matmul_q8); empty elsewhere.
    std::vector<int8_t> q1v, q2v;
    std::vector<int32_t> q1rs, q2rs;
    bool integer() const { return !q1.empty(); }
    std::vector<int32_t> perm;                     // x'[i] = x[perm[i]]
    std::vector<float> hh;                         // unit Householder vector, empty when none
    std::vector<float> smooth;                     // divisors, empty when none
    // Stages that are the identity (float identity matrices, the identity permutation: found at load), which apply
    // skips: a method that transforms only some groups (docs/format.md "Rotations", method "hadamard") stores the
    // others as identities, and those groups then cost nothing.
    bool id1 = false, id2 = false, perm_id = false;
    // R1's whole blocks as a randomized Hadamard matrix (int8 codes Q[i][j] = 127 H[i][j] s[j], H the Sylvester
    // matrix, s = ±1: method "hadamard", found at load by find_hadamard): apply then runs the fast Walsh-Hadamard
    // transform on s * x and scales row i by 127 scale[i], B log B additions per block instead of B² products.
    std::vector<float> had_signs, had_gain;
    bool identity() const { return id1 && id2 && perm_id && hh.empty() && smooth.empty(); }
    // x (dim floats) -> x' in place. kernels: K_SCALAR, K_AVX2 or K_NEON.
    // int8: the whole blocks' products with int8 activations (block_matmul_q8) where this set has them (int8_ready).
    void apply(float* x, int kernels, bool int8 = false) const;
    bool int8_ready(int kernels) const;
    // Fill had_signs / had_gain when R1 (int8, block a power of two) is such a matrix; clear them otherwise.
    void find_hadamard();
    // Fill r1p, r2p from r1, r2 (load_rotations does; B a multiple of 16): with them the AVX2 set runs every whole block
    // of a stage in one multi-block product (block_matmul_p) instead of one block_matvec per block.
    void pack_blocks();
};

// y[i] = sum_j R[i * n + j] x[j] for i < n (one block; the kernel of Rotation::apply).
void block_matvec(const float* R, int n, const float* x, float* y, int kernels);
// The same product for nx blocks at once: Y[b n + i] = sum_j R[i n + j] X[b n + j] for b < nx and rows i in [i0, i1)
// (multiples of 16; n too), from R packed in strips of 16 rows (pack_rows16: strip s holds column j's 16 values R[16 s +
// r][j], r < 16, at P[(s n + j) 16 + r]): 16 output rows are two vector loads and each x_j one broadcast, no horizontal
// sums, each load serves every block, and a strip is one contiguous stream (block_matvec reads R once per block and
// reduces 4 rows per pass horizontally; a plain transpose read with a 512-byte stride was 3x slower in a model than in
// cache). Scalar reference and AVX2 (NEON runs the scalar loop; Rotation::apply keeps block_matvec there).
template <typename T>  // float32 matrices (format 2) and int8 codes (format 3) alike
std::vector<T> pack_rows16(const std::vector<T>& R, int n) {
    std::vector<T> P((size_t)n * n);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) P[((size_t)(i / 16) * n + j) * 16 + i % 16] = R[(size_t)i * n + j];
    return P;
}
void block_matmul_p(const float* P, int n, const float* X, int nx, float* Y, int i0, int i1, int kernels);

// Format 3's block product: y[i] = (sum_j (float)Q[i n + j] x[j]) * s[i] for i < n (block_matvec_q: scalar, NEON, any
// n), and for nx blocks of n at once and rows [i0, i1) (block_matmul_q; multiples of 16, n too) from Q packed by
// pack_rows16 (the same strips with int8 codes: a quarter of the float32 bytes per token; AVX2 sign-extends and
// converts a column's 16 codes, then runs block_matmul_p's FMAs). The inputs stay float, so the transform is as exact
// as with float32 matrices (rounding the inputs to int16 for integer products turned each 1e-7 float difference
// between two orderings into a jump of a whole int16 step: 100x the noise between prefill and decode).
void block_matvec_q(const int8_t* Q, const float* s, int n, const float* x, float* y, int kernels);
void block_matmul_q(const int8_t* P, const float* s, int n, const float* X, int nx, float* Y, int i0, int i1, int kernels);

// Format 3's block product with int8 activations (act bits 8 and int8 activations, the runtime's default): each whole
// block's input quantized per 32 columns (VecOps::quant_x8), then exact int32 sums per 32 columns:
// Y[b n + i] = (sum over 32-column blocks k, in order, of (float)(sum_j Q[i n + 32 k + j] q_j) * d_k) * s[i], the float
// operations being one multiply, then one add, per k. The int8 inputs cost W4A8 nothing measurable on llama-s (reference
// perplexity with each block input quantized so: -0.03%; the runtime's +0.03%; bench/results/ruquant_speed.md run 7).
// Scalar reference on row-major Q (any kernels); with kernels == K_AVX2 and x86_vnni() == 1, AVX-512 VNNI on QV =
// pack_quads16(Q) (strips of 16 rows; per 4 columns one 64-byte vector, row r's 4 codes at bytes 4r..4r+3) and
// RS = quad_row_sums(Q) (128 * each row's code sum per 32 columns, per strip: n/32 x 16), bit-identical.
// n a multiple of 32; rows [i0, i1) multiples of 16.
std::vector<int8_t> pack_quads16(const std::vector<int8_t>& Q, int n);
std::vector<int32_t> quad_row_sums(const std::vector<int8_t>& Q, int n);
void block_matmul_q8(const int8_t* Q, const int8_t* QV, const int32_t* RS, const float* s, int n, const XQ8* X, int nx,
                     float* Y, int i0, int i1, int kernels);
// block_matmul_q8's VNNI product on its operand layout (what it converts X to): per 32 columns of each block, the codes
// + 128 as 8 u32 words U (one vpdpbusd broadcast operand per 4 codes) and the block's d in D. Bit-identical to
// block_matmul_q8 on the XQ8 blocks these came from. Only where block_matmul_q8 runs VNNI (kernels == K_AVX2,
// x86_vnni() == 1, QV and RS made): the transform's int8 path, Rotation::int8_ready.
void block_matmul_u8(const int8_t* QV, const int32_t* RS, const float* s, int n, const uint32_t* U, const float* D, int nx,
                     float* Y, int i0, int i1);
// block_matmul_u8's operand of x[idx[j]], j < g (x[j] when idx is null: stage 2 takes the gather P in the same pass):
// VecOps::quant_x8's codes and d per 32 values (bit-identical in every set), without the sums quant_x8 also makes.
// g a multiple of 32; U holds g / 4 words, D g / 32 floats.
void stage_input_u8(const float* x, const int32_t* idx, int g, uint32_t* U, float* D, int kernels);

// Per-token asymmetric quantize-dequantize at `bits` (6 or 4) in place, exactly as wqedge.actquant.fake_quant:
// s = max((max - min) / (2^b - 1), 1e-8), z = round(-min / s), q = clamp(round(x / s) + z, 0, 2^b - 1),
// x = s (q - z), round half to even. Returns s: x now lies on the grid s * integer (|integer| < 2^b), which the int8
// path takes exactly (prepare_x8's step). This is the scalar set's VecOps::fake_quant, the reference of the SIMD ones
// that group_input runs.
float act_fake_quant(float* x, int n, int bits);

// The group's input step for n tokens of width dim (row stride dim), in place: the rotation (when r is not
// null), then activation quantization when bits < 8, writing each token's grid step to steps[t] (when steps is not
// null; 0 when bits >= 8). Tokens are split over the pool's threads.
void group_input(const Rotation* r, int bits, float* x, int n, int dim, ThreadPool& pool, int kernels,
                 float* steps = nullptr);

// Load layer l's four rotations from a rotated file (names: wqedge.rotation_format); group widths in
// GROUPS order. Throws Error(WQE_ERR_FORMAT) naming the tensor on a missing or malformed one.
std::vector<Rotation> load_rotations(const GGUFFile& f, int layer, int block, const int widths[4]);

}  // namespace wqe
