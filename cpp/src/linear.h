// A linear layer y = W x as stored in the file: dense (F32/F16 rows) or column-chunked
// (wqedge row-blocks, docs/format.md), with the threaded matrix-vector and matrix-matrix products.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "blocks.h"
#include "threadpool.h"

namespace wqe {

struct Chunk {
    const BlockTraits* bt;
    int g, g_pad, col0;   // width, padded width, first global input column
    size_t off;           // byte offset of the row-block within a row
    size_t res_off;       // byte offset of the residuals within the row-block
    int n_prot, prot0;    // protected columns: Linear::prot_local[prot0 .. prot0 + n_prot)
    int xoff;             // offset of the chunk's prepared x (floats)
};

struct Linear {
    enum Kind { NONE, DENSE_F32, DENSE_F16, CHUNKED } kind = NONE;
    std::string name;
    int N = 0, K = 0;          // out, in
    const uint8_t* data = nullptr;
    size_t row_bytes = 0;
    std::vector<Chunk> chunks;
    std::vector<int32_t> prot_local;  // chunk-local protected column indices
    int x_floats = 0;                 // prepared x per token (chunked)
    int max_g_pad = 0;

    const uint8_t* row(int r) const { return data + (size_t)r * row_bytes; }
};

// Per-context scratch space; sized once for the largest linear and batch.
struct MatScratch {
    std::vector<float> xprep;                    // prepared x (matvec)
    std::vector<float> xsum;                     // per-chunk sums (matvec)
    std::vector<std::vector<float>> tile;        // per thread: ROW_TILE dequantized rows
    std::vector<std::vector<float>> chunk_tmp;   // per thread: one dequantized chunk
    std::vector<float> xpad;                     // padded activations (matmul, when K % 8 != 0)
    void reserve(int n_threads, int max_K, int max_g_pad, int max_x_floats, int max_chunks);
};

constexpr int ROW_TILE = 16;

// y[N] = W x[K]
void matvec(const Linear& W, const float* x, float* y, ThreadPool& pool, MatScratch& s, int kernels);
// Y[n][N] = X[n][K] W^T (n >= 1)
void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels);
// One row of a dense tensor (embeddings) as float.
void dense_row(const Linear& W, int r, float* out, int kernels);
// Dequantize rows [r0, r0 + nr) to out (row stride ld >= K; floats past K are zeroed up to round8(K)).
void dequant_rows(const Linear& W, int r0, int nr, float* out, int ld, float* chunk_tmp, int kernels);

}  // namespace wqe
