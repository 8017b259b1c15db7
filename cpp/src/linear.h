// A linear layer y = W x as stored in the file: dense (F32/F16 rows) or column-chunked
// (wqedge row-blocks, docs/format.md), with the threaded matrix-vector and matrix-matrix products.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
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

    // Row tiles (issue 12): a copy of the weights in tiles of TILE_ROWS rows (blocks.h), made once at load
    // by repack_tiles; empty when not repacked. Tile t is tiles[t * tile_bytes, +tile_bytes); chunk c's part of
    // it is TILE_ROWS row-blocks of kind tch[c].bt (tch[c].rb = tile_row_bytes each, interleaved when the kind
    // has tile_sub) at tch[c].off. Ternary chunks become q2 (d = a, m = -a, q = t: the same weights, exactly; 2 bits
    // instead of 1.6, but the q2 tile kernel's speed, which the 1.6-bit ternary tile kernel does not reach on AVX2 /
    // Zen 4: bench/results/tile_ternary.md), or stay ternary in their own tile layout when ternary_tiles(). Rows past
    // N are zero. When tiled, every product reads the tiles and never `data` (chunks, row_bytes and data keep
    // describing the file).
    struct TChunk {
        const BlockTraits* bt;
        size_t off, rb;
    };
    std::vector<TChunk> tch;
    std::shared_ptr<uint8_t[]> tiles;  // n_tiles * tile_bytes (not zero-initialised: repack_tiles writes every byte)
    std::shared_ptr<uint8_t[]> owned;  // `data` when the loader built the rows (compact kinds expanded), else empty
    size_t tiles_size = 0, tile_bytes = 0;
    // Consecutive chunks of tile kinds (tch): one call each, tile8 when uniform (one kind, width and protected
    // count), VecOps::tile8_mix with tdesc[c0, c0 + n) otherwise; a chunk of another kind is a run of its own.
    struct Run { int c0, n; bool uniform; };
    std::vector<Run> runs;
    std::vector<TileDesc> tdesc;  // per chunk
    bool tiled() const { return tiles_size != 0; }
    const uint8_t* tile(int t) const { return tiles.get() + (size_t)t * tile_bytes; }
    // The block kind chunk c's products use (its kind in the tiles when tiled).
    const BlockTraits& kind_of(int c) const { return tiled() ? *tch[c].bt : *chunks[c].bt; }
};

// Per-context scratch space; sized once for the largest linear and batch.
struct MatScratch {
    // matvec: prepared x per linear of a group (slot 0 for a single product)
    struct Slot {
        std::vector<float> xprep;   // float prepared x
        std::vector<float> xsum;    // per-chunk sums of x
        std::vector<XQ8> xq8;       // int8 prepared x (ACT_Q8)
        std::vector<int> x8off;     // per chunk: first XQ8 block, -1 when float
    };
    std::vector<Slot> slots;
    std::vector<std::vector<float>> tile;        // per thread: ROW_TILE dequantized rows
    std::vector<std::vector<float>> chunk_tmp;   // per thread: one dequantized chunk
    std::vector<float> xpad;                     // padded activations (matmul, when K % 8 != 0)
    // matmul with int8 activations: every token's prepared x (token t at t * blocks, t * chunks, t * x_floats)
    std::vector<XQ8> bq8;
    std::vector<float> bsum, bprep;
    std::vector<int> b8off;
    // Activations on a known grid (RUQuant act bits 4 or 6, model.cpp): token t's input is step act_grid[t] times an
    // integer, and the int8 products take those integers exactly (prepare_x8's step). nullptr: any input.
    const float* act_grid = nullptr;
    void reserve(int n_threads, int max_K, int max_g_pad, int max_x_floats, int max_chunks);
};

constexpr int ROW_TILE = 16;
constexpr int MAX_GROUP = 3;  // linears per matvec_group (q, k, v)

// y[N] = W x[K]. act = ACT_Q8: chunks whose kind has int8 kernels use int8 activations (per 32
// columns), the others (fp16, dense) and protected residuals stay float; the 6-argument form is ACT_F32.
void matvec(const Linear& W, const float* x, float* y, ThreadPool& pool, MatScratch& s, int kernels);
void matvec(const Linear& W, const float* x, float* y, ThreadPool& pool, MatScratch& s, int kernels, int act);
// y[i] = W[i] x for n <= MAX_GROUP linears of the same input (q/k/v, gate/up) in one threaded pass:
// one fork-join instead of n; each y[i] is bit-identical to matvec(*W[i], x, y[i], ...).
void matvec_group(int n, const Linear* const* W, const float* x, float* const* y, ThreadPool& pool, MatScratch& s,
                  int kernels, int act);
// Y[n][N] = X[n][K] W^T (n >= 1); n == 1 is matvec(..., act). n >= 2: ACT_F32 dequantizes rows and runs a float
// GEMM; ACT_Q8 (chunked linears) quantizes each token's activations once and runs the int8 tile GEMM, every token's
// row bit-identical to matvec(..., ACT_Q8) on it (dense linears stay float).
void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels);
void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels, int act);
// One row of an embedding table as float: dense, or chunked (a tied quantized head; dequantized from the file layout).
void dense_row(const Linear& W, int r, float* out, int kernels);
// Dequantize rows [r0, r0 + nr) to out (row stride ld >= K; floats past K are zeroed up to round8(K)).
void dequant_rows(const Linear& W, int r0, int nr, float* out, int ld, float* chunk_tmp, int kernels);

#define WQE_HAVE_TILES 1  // repack_tiles exists (bench/matvec_bench.cpp builds against older sources too)
// Repack a chunked linear into row tiles (Linear::tiles; blocks.h TILE_ROWS), reading `data` once.
void repack_tiles(Linear& L);
// Whether repack_tiles keeps ternary chunks in the 1.6-bit ternary tile layout (else q2 in the tiles): WQEDGE_TERNARY_TILES=1,
// or set_ternary_tiles (tests); read at repack time, so a model loaded before a change keeps its tiles.
bool ternary_tiles();
void set_ternary_tiles(bool on);
// Whether the model loader repacks: WQEDGE_REPACK=0 never, =1 always, unset: when the kernel set in use has
// tile kernels for int8 activations (AVX2, NEON; the scalar reference set keeps the file's row layout, zero-copy).
bool repack_wanted(int kernels);

// Compact-header kinds (ids 10-14: q4c, q3c, q2c, ternaryc, q1c; docs/format.md "Compact row headers"): the codes of
// base kinds 2-6 under one byte per header parameter (e, and z for kinds with an offset) and one fp16 scale base per
// chunk (tensor <name>.scale_base). The loader expands them into their base kinds' row-blocks (fp16 d, m computed
// exactly as wqedge.blocks.compact_decode does), so no kernel ever sees them.
constexpr int KIND_COMPACT_FIRST = 10, N_COMPACT_KINDS = 5;
int compact_base(int64_t id);  // the base kind of compact kind `id`, or -1 when `id` is not one
// Bytes of compact kind `id`'s row header in the file: one per parameter of its base kind.
int compact_header_bytes(int id);
// fp16 d (and m, for a base with an offset) of one row header of compact kind `id` under scale base `base` (fp16 bits).
void compact_params(int id, const uint8_t* header, uint16_t base, uint16_t* d, uint16_t* m);
// Bytes of one row in the file (compact chunks' one-byte headers) for the chunks of L (laid out in base kinds) whose
// file actions are `actions`.
size_t compact_row_bytes(const Linear& L, const std::vector<int64_t>& actions);
// The rows of `src` (N rows of compact_row_bytes, file actions `actions`, the compact chunks' scale bases in chunk
// order) as L's base-kind rows into dst (N x L.row_bytes bytes).
void compact_expand(const Linear& L, const std::vector<int64_t>& actions, const uint8_t* src, const uint16_t* bases,
                    uint8_t* dst);

// Building a column-chunked Linear (docs/format.md) from its description; shared by the model loader
// (model.cpp) and the ONNX Runtime custom op (ort_ops.cpp). Defined in linear.cpp.
// The layout of an N x K linear in chunks of G columns, chunk c of block type id actions[c] with
// n_protected[c] protected columns: chunks, row_bytes, x_floats, max_g_pad, and prot_local sized to
// the total protected count (filled by set_protected_columns). data is left null. Throws
// Error(WQE_ERR_FORMAT, "tensor '<name>' ...") on an unknown id, a bad count or bad dimensions.
Linear chunked_layout(const std::string& name, int N, int K, int G, const std::vector<int64_t>& actions,
                      const std::vector<int64_t>& n_protected);
// Fill L.prot_local from the global protected column indices (chunk by chunk, ascending within a
// chunk; cols.size() == L.prot_local.size()). Throws Error(WQE_ERR_FORMAT, ...) naming the bad entry.
void set_protected_columns(Linear& L, const std::vector<int64_t>& cols);

}  // namespace wqe
