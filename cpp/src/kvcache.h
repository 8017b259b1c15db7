// Quantized KV cache (issue 15; docs/format.md "KV cache", wqedge/kv_format.py, wqedge/kvquant.py).
// Each token's K and V of one KV head is one row: per group of g values (g = 32 at 8 bits, 16 at 4 bits, or head_dim
// when g does not divide it) an fp16 scale d, an fp16 min m and g codes (8 bits: one byte each; 4 bits: byte i of the group holds
// code i in its low nibble and code i + g/2 in its high one); value = d * code + m. K is rotated per head by the
// orthonormal Walsh-Hadamard transform (block-diagonal when head_dim is not a power of two) before it is
// quantized, and each query head by the same transform at attention time, so q.k is unchanged; V is stored
// unrotated (rotating it measured worse: bench/results/kv_cache_choice.txt).
#pragma once

#include <cstddef>
#include <cstdint>

namespace wqe {

// A 16-bit cache (bits 16: each value as fp16, no groups or rotation) halves the float32 cache's bytes per decoded
// token, which at long context are most of them (llama.cpp's default cache type).
struct KvFormat {
    int bits = 0;         // 0: float32 cache (none of the below is used), 16 (fp16 values), 8 or 4
    bool rotate = false;  // Hadamard on K (and Q) per head
    int head_dim = 0, group = 0, hblock = 0;  // hblock: Walsh-Hadamard block (largest power of two dividing head_dim)
    size_t row_bytes = 0;                     // bytes of one token's K (or V) of one head
    static KvFormat make(int bits, bool rotate, int head_dim);
};

// A quantized cache's group of values at `bits` (8 or 4), taken wherever it divides head_dim (KvFormat::make; else one
// group per row), and a group's bytes: an fp16 scale and an fp16 min, then the codes. The kernels that read rows as
// stored (VecOps::att_scores_kv / att_values_kv) take exactly this layout.
constexpr int kv_group(int bits) { return bits == 4 ? 16 : 32; }  // 4 bits: 16 (bench/results/kv_cache.md)
constexpr int kv_group_bytes(int group, int bits) { return 4 + group * bits / 8; }

// One head row: quantize x (head_dim floats, already rotated) into dst (row_bytes), exactly as
// wqedge.kvquant.fake_quant_kv (float32 parameters stored as fp16, round half to even). 8/4 bits scalar (once per
// token); 16 bits through `kernels`' VecOps::f32_to_f16 (K_SCALAR / K_AVX2 / K_NEON; the same bits).
void kv_quantize(const KvFormat& f, const float* x, uint8_t* dst, int kernels);
// dst = the row's values (d * code + m, float32), scalar.
void kv_dequantize(const KvFormat& f, const uint8_t* src, float* dst);
// In place x (n floats) -> H x per block of `block` values (butterflies, then the 1/sqrt(block) scale), the
// arithmetic of wqedge.kvquant.fwht.
void kv_hadamard(float* x, int n, int block);

// dst[i * head_dim ..] = row i's values as kv_dequantize, for the n rows at rows + i * row_bytes, with kernels K_SCALAR
// (kv_dequantize itself), K_AVX2 or K_NEON (which fuse d * code + m into one multiply-add); rows [n, avail) exist too
// and are prefetched. Where the kernel set reads quantized rows as stored (VecOps::att_scores_kv / att_values_kv:
// AVX2, NEON; 8 bits in groups of 32, 4 bits in groups of 16), attention does not convert them: the same fused d * c + m in
// registers, the same bits, and 1.45-1.56x the decode speed at 2000 tokens on llama-s (bench/results/decode_depth.md).
// Otherwise (the scalar set, other groups) the attention loop converts a KV head's rows (contiguous: the cache is
// head-major), 64 at a time, once for all the query heads of its group and runs VecOps::att_scores / att_values on
// them; an fp16 cache's rows it does not convert (VecOps::att_scores_h / att_values_h read them as stored, the same
// bits). One call per chunk, the per-row work inlined.
void kv_rows_values(const KvFormat& f, const uint8_t* rows, int n, int avail, float* dst, int kernels);

}  // namespace wqe
