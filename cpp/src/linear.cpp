#include "linear.h"

#include <algorithm>
#include <cstring>

#include "common.h"

namespace wqe {

void MatScratch::reserve(int n_threads, int max_K, int max_g_pad, int max_x_floats, int max_chunks) {
    const int Kp = round8(max_K);
    xprep.assign(std::max(max_x_floats, 8), 0.0f);
    xsum.assign(std::max(max_chunks, 1), 0.0f);
    tile.assign(n_threads, std::vector<float>((size_t)ROW_TILE * Kp + 64, 0.0f));
    chunk_tmp.assign(n_threads, std::vector<float>(dequant_floats(std::max(max_g_pad, 32)) + 64, 0.0f));
}

static inline float protected_sum(const Linear& W, const Chunk& c, const uint8_t* rb, const float* x) {
    const uint8_t* res = rb + c.res_off;
    const int32_t* idx = W.prot_local.data() + c.prot0;
    float s = 0.0f;
    for (int p = 0; p < c.n_prot; ++p) s += load_h(res + 2 * p) * x[c.col0 + idx[p]];
    return s;
}

void matvec(const Linear& W, const float* x, float* y, ThreadPool& pool, MatScratch& s, int kernels) {
    const VecOps& ops = vec_ops(kernels);
    if (W.kind == Linear::DENSE_F32 || W.kind == Linear::DENSE_F16) {
        const int n_tasks = (W.N + 63) / 64;
        pool.run(n_tasks, [&](int task, int) {
            const int r1 = std::min(W.N, (task + 1) * 64);
            for (int r = task * 64; r < r1; ++r)
                y[r] = W.kind == Linear::DENSE_F32 ? ops.dot_f32((const float*)(const void*)W.row(r), x, W.K)
                                                  : ops.dot_f16(W.row(r), x, W.K);
        });
        return;
    }
    // Per-chunk activation preprocessing, shared by all N rows.
    float* xp = s.xprep.data();
    float* xs = s.xsum.data();
    for (size_t c = 0; c < W.chunks.size(); ++c) {
        const Chunk& ch = W.chunks[c];
        xs[c] = prepare_x(*ch.bt, x + ch.col0, ch.g, xp + ch.xoff);
    }
    const int n_chunks = (int)W.chunks.size();
    const Chunk* chunks = W.chunks.data();
    constexpr int RT = 16;  // rows per task: each chunk's kernel runs over RT rows per call
    const int n_tasks = (W.N + RT - 1) / RT;
    pool.run(n_tasks, [&](int task, int) {
        const int r0 = task * RT, nr = std::min(RT, W.N - r0);
        float acc[RT] = {0}, part[RT];
        const uint8_t* rows = W.row(r0);
        for (int c = 0; c < n_chunks; ++c) {
            const Chunk& ch = chunks[c];
            ch.bt->dot_rows[kernels](rows + ch.off, W.row_bytes, nr, xp + ch.xoff, xs[c], ch.g_pad, part);
            for (int i = 0; i < nr; ++i) acc[i] += part[i];
            if (ch.n_prot)
                for (int i = 0; i < nr; ++i) acc[i] += protected_sum(W, ch, rows + (size_t)i * W.row_bytes + ch.off, x);
        }
        for (int i = 0; i < nr; ++i) y[r0 + i] = acc[i];
    });
}

void dense_row(const Linear& W, int r, float* out, int kernels) {
    if (W.kind == Linear::DENSE_F32) std::memcpy(out, W.row(r), sizeof(float) * W.K);
    else if (W.kind == Linear::DENSE_F16) vec_ops(kernels).f16_to_f32(W.row(r), out, W.K);
    else fail(WQE_ERR_INTERNAL, "dense_row on a chunked tensor");
}

void dequant_rows(const Linear& W, int r0, int nr, float* out, int ld, float* tmp, int kernels) {
    const int Kp = round8(W.K);
    for (int i = 0; i < nr; ++i) {
        float* o = out + (size_t)i * ld;
        const uint8_t* row = W.row(r0 + i);
        if (W.kind != Linear::CHUNKED) {
            dense_row(W, r0 + i, o, kernels);
        } else {
            for (const Chunk& ch : W.chunks) {
                const uint8_t* rb = row + ch.off;
                if (ch.g == ch.g_pad && ch.bt->x_layout == X_PLAIN) {
                    ch.bt->dequant[kernels](rb, ch.g_pad, o + ch.col0);  // writes exactly g_pad
                } else {
                    ch.bt->dequant[kernels](rb, ch.g_pad, tmp);
                    std::memcpy(o + ch.col0, tmp, sizeof(float) * ch.g);
                }
                if (ch.n_prot) {
                    const uint8_t* res = rb + ch.res_off;
                    const int32_t* idx = W.prot_local.data() + ch.prot0;
                    for (int p = 0; p < ch.n_prot; ++p) o[ch.col0 + idx[p]] += load_h(res + 2 * p);
                }
            }
        }
        for (int k = W.K; k < Kp; ++k) o[k] = 0.0f;
    }
}

void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels) {
    if (n == 1) {
        matvec(W, X, Y, pool, s, kernels);
        return;
    }
    const VecOps& ops = vec_ops(kernels);
    const int K = W.K, Kp = round8(K), N = W.N;
    const float* Xp = X;
    if (Kp != K) {  // pad the activations so the micro-kernel needs no tail
        s.xpad.assign((size_t)n * Kp, 0.0f);
        for (int t = 0; t < n; ++t) std::memcpy(&s.xpad[(size_t)t * Kp], X + (size_t)t * K, sizeof(float) * K);
        Xp = s.xpad.data();
    }
    const int n_tasks = (N + ROW_TILE - 1) / ROW_TILE;
    const int TOK_BLOCK = 48;
    pool.run(n_tasks, [&](int task, int thread) {
        const int r0 = task * ROW_TILE, nr = std::min(ROW_TILE, N - r0);
        float* tile = s.tile[thread].data();
        dequant_rows(W, r0, nr, tile, Kp, s.chunk_tmp[thread].data(), kernels);
        for (int i = nr; i < ((nr + 3) & ~3); ++i) std::memset(tile + (size_t)i * Kp, 0, sizeof(float) * Kp);
        for (int t0 = 0; t0 < n; t0 += TOK_BLOCK) {
            const int nt = std::min(TOK_BLOCK, n - t0);
            for (int i = 0; i < nr; i += 4)
                ops.gemm4(tile + (size_t)i * Kp, Kp, Xp + (size_t)t0 * Kp, Kp, nt, Kp, Y + (size_t)t0 * N + r0 + i, N,
                          std::min(4, nr - i));
        }
    });
}

}  // namespace wqe
