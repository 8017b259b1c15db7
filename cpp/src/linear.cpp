#include "linear.h"

#include <algorithm>
#include <cstring>

#include "common.h"

namespace wqe {

void MatScratch::reserve(int n_threads, int max_K, int max_g_pad, int max_x_floats, int max_chunks) {
    const int Kp = round8(max_K);
    tile.assign(n_threads, std::vector<float>((size_t)ROW_TILE * Kp + 64, 0.0f));
    chunk_tmp.assign(n_threads, std::vector<float>(dequant_floats(std::max(max_g_pad, 32)) + 64, 0.0f));
    // int8 blocks: x8_blocks(chunk) <= round8(x_floats(chunk)) / 8 + 1 (blocks.h), summed over chunks
    slots.assign(MAX_GROUP, Slot());
    for (Slot& sl : slots) {
        sl.xprep.assign(std::max(max_x_floats, 8), 0.0f);
        sl.xsum.assign(std::max(max_chunks, 1), 0.0f);
        sl.xq8.resize(max_x_floats / 8 + std::max(max_chunks, 1));
        sl.x8off.assign(std::max(max_chunks, 1), -1);
    }
}

static inline void prefetch(const uint8_t* p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
}

static inline float protected_sum(const Linear& W, const Chunk& c, const uint8_t* rb, const float* x) {
    const uint8_t* res = rb + c.res_off;
    const int32_t* idx = W.prot_local.data() + c.prot0;
    float s = 0.0f;
    for (int p = 0; p < c.n_prot; ++p) s += load_h(res + 2 * p) * x[c.col0 + idx[p]];
    return s;
}

void matvec(const Linear& W, const float* x, float* y, ThreadPool& pool, MatScratch& s, int kernels) {
    matvec(W, x, y, pool, s, kernels, ACT_F32);
}

namespace {

constexpr int RT = 16;  // rows per task: each chunk's kernel runs over RT rows per call

// Prepared activations of one chunked linear (views into MatScratch).
struct Prepared {
    const float* xp;
    const float* xs;
    const int* x8off;
    const XQ8* xq8;
};

// Per-chunk activation preprocessing, shared by all N rows: float (prepare_x) or, in ACT_Q8 for kinds
// with int8 kernels, int8 blocks (prepare_x8).
Prepared prepare(const Linear& W, const float* x, MatScratch::Slot& sl, int kernels, int act) {
    const int n_chunks = (int)W.chunks.size();
    if ((int)sl.xsum.size() < n_chunks) sl.xsum.resize(n_chunks);
    if ((int)sl.x8off.size() < n_chunks) sl.x8off.resize(n_chunks);
    if ((int)sl.xprep.size() < W.x_floats) sl.xprep.resize(W.x_floats);
    if (act == ACT_Q8) {
        int n8 = 0;
        for (const Chunk& ch : W.chunks)
            if (ch.bt->dot8[kernels]) n8 += x8_blocks(*ch.bt, ch.g_pad);
        if ((int)sl.xq8.size() < n8) sl.xq8.resize(n8);
    }
    for (int c = 0, o8 = 0; c < n_chunks; ++c) {
        const Chunk& ch = W.chunks[c];
        if (act == ACT_Q8 && ch.bt->dot8[kernels]) {
            sl.x8off[c] = o8;
            sl.xsum[c] = prepare_x8(*ch.bt, x + ch.col0, ch.g, sl.xq8.data() + o8);
            o8 += x8_blocks(*ch.bt, ch.g_pad);
        } else {
            sl.x8off[c] = -1;
            sl.xsum[c] = prepare_x(*ch.bt, x + ch.col0, ch.g, sl.xprep.data() + ch.xoff);
        }
    }
    return {sl.xprep.data(), sl.xsum.data(), sl.x8off.data(), sl.xq8.data()};
}

// Rows [task * RT, +RT) of a chunked linear. `ahead`: the task this thread likely takes next.
void chunked_tile(const Linear& W, const float* x, const Prepared& p, int task, int ahead, float* y, int kernels) {
    const int n_tasks = (W.N + RT - 1) / RT, n_chunks = (int)W.chunks.size();
    const int r0 = task * RT, nr = std::min(RT, W.N - r0);
    float acc[RT] = {0}, part[RT];
    const uint8_t* rows = W.row(r0);
    // Prefetch the tile this thread will likely take next, one slice per chunk step: decode streams
    // every weight once, and the kernels stall on the loads without it.
    const int next = task + ahead;
    const uint8_t* pf = next < n_tasks ? W.row(next * RT) : nullptr;
    const size_t pf_bytes = pf ? (size_t)std::min(RT, W.N - next * RT) * W.row_bytes : 0;
    const size_t pf_step = (pf_bytes / n_chunks + 63) & ~(size_t)63;
    for (int c = 0; c < n_chunks; ++c) {
        const Chunk& ch = W.chunks[c];
        for (size_t o = c * pf_step, e = std::min(pf_bytes, o + pf_step); o < e; o += 64) prefetch(pf + o);
        if (p.x8off[c] >= 0)
            ch.bt->dot8_rows[kernels](rows + ch.off, W.row_bytes, nr, p.xq8 + p.x8off[c], p.xs[c], ch.g_pad, part);
        else
            ch.bt->dot_rows[kernels](rows + ch.off, W.row_bytes, nr, p.xp + ch.xoff, p.xs[c], ch.g_pad, part);
        for (int i = 0; i < nr; ++i) acc[i] += part[i];
        if (ch.n_prot)
            for (int i = 0; i < nr; ++i) acc[i] += protected_sum(W, ch, rows + (size_t)i * W.row_bytes + ch.off, x);
    }
    for (int i = 0; i < nr; ++i) y[r0 + i] = acc[i];
}

}  // namespace

void matvec(const Linear& W, const float* x, float* y, ThreadPool& pool, MatScratch& s, int kernels, int act) {
    const VecOps& ops = vec_ops(kernels);
    if (W.kind == Linear::DENSE_F32 || W.kind == Linear::DENSE_F16) {
        const int n_tasks = (W.N + 63) / 64;
        pool.run(n_tasks, [&](int task, int) {
            const int r1 = std::min(W.N, (task + 1) * 64);
            if (W.kind == Linear::DENSE_F32) {
                // A typed load is fine: the loader only accepts alignments that are multiples of 8, so an
                // F32 tensor starts 8-aligned in the (page-aligned) mapping and each row 4-aligned.
                for (int r = task * 64; r < r1; ++r) y[r] = ops.dot_f32((const float*)(const void*)W.row(r), x, W.K);
                return;
            }
            constexpr int RB = 8;  // rows per call; the next RB rows are prefetched meanwhile
            for (int r = task * 64; r < r1; r += RB) {
                const int nr = std::min(RB, r1 - r), nn = std::max(0, std::min(RB, r1 - r - nr));
                for (size_t o = 0; o < (size_t)nn * W.row_bytes; o += 64) prefetch(W.row(r + nr) + o);
                ops.dot_f16_rows(W.row(r), W.row_bytes, nr, x, W.K, y + r);
            }
        });
        return;
    }
    if (s.slots.empty()) s.slots.resize(1);
    const Prepared p = prepare(W, x, s.slots[0], kernels, act);
    const int ahead = pool.size();  // with dynamic hand-out, a thread's next tile is about this far on
    pool.run((W.N + RT - 1) / RT, [&](int task, int) { chunked_tile(W, x, p, task, ahead, y, kernels); });
}

void matvec_group(int n, const Linear* const* W, const float* x, float* const* y, ThreadPool& pool, MatScratch& s,
                  int kernels, int act) {
    bool chunked = n <= MAX_GROUP;
    for (int i = 0; i < n && chunked; ++i) chunked = W[i]->kind == Linear::CHUNKED;
    if (!chunked) {  // dense members (not in wqedge files' layers): one product at a time
        for (int i = 0; i < n; ++i) matvec(*W[i], x, y[i], pool, s, kernels, act);
        return;
    }
    if ((int)s.slots.size() < n) s.slots.resize(n);
    Prepared p[MAX_GROUP];
    int first[MAX_GROUP + 1] = {0};  // task ranges, concatenated
    for (int i = 0; i < n; ++i) {
        p[i] = prepare(*W[i], x, s.slots[i], kernels, act);
        first[i + 1] = first[i] + (W[i]->N + RT - 1) / RT;
    }
    const int ahead = pool.size();
    pool.run(first[n], [&](int task, int) {
        int i = 0;
        while (task >= first[i + 1]) ++i;
        chunked_tile(*W[i], x, p[i], task - first[i], ahead, y[i], kernels);
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
    matmul(W, X, n, Y, pool, s, kernels, ACT_F32);
}

void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels, int act) {
    if (n == 1) {
        matvec(W, X, Y, pool, s, kernels, act);
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
