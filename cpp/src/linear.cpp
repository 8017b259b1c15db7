#include "linear.h"

#include <cmath>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "common.h"

#if defined(__linux__)
#  include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#  include <cpuid.h>
#endif

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

// Int8 blocks of one token's prepared activations (ACT_Q8: chunks whose kind has int8 kernels), and whether
// any chunk stays float (fp16, or a kind without int8 kernels).
int x8_blocks_of(const Linear& W, int kernels, int act, bool* any_float) {
    int n8 = 0;
    bool fl = false;
    for (int c = 0; c < (int)W.chunks.size(); ++c) {
        const BlockTraits& bt = W.kind_of(c);
        if (act == ACT_Q8 && bt.dot8[kernels]) n8 += x8_blocks(bt, W.chunks[c].g_pad);
        else fl = true;
    }
    if (any_float) *any_float = fl;
    return n8;
}

// Per-chunk activation preprocessing of one token, shared by all N rows: float (prepare_x, into xprep) or, in
// ACT_Q8 for kinds with int8 kernels, int8 blocks (prepare_x8, into xq8 at x8off[c]). xprep may be null when
// every chunk is int8.
void prepare_token(const Linear& W, const float* x, int kernels, int act, float* xprep, float* xsum, int* x8off,
                   XQ8* xq8, float step = 0.0f) {
    for (int c = 0, o8 = 0; c < (int)W.chunks.size(); ++c) {
        const Chunk& ch = W.chunks[c];
        const BlockTraits& bt = W.kind_of(c);  // a tiled ternary chunk may be q2: plain layout, within the same slot
        if (act == ACT_Q8 && bt.dot8[kernels]) {
            x8off[c] = o8;
            xsum[c] = prepare_x8(bt, x + ch.col0, ch.g, xq8 + o8, step, kernels);
            o8 += x8_blocks(bt, ch.g_pad);
        } else {
            x8off[c] = -1;
            xsum[c] = prepare_x(bt, x + ch.col0, ch.g, xprep + ch.xoff);
        }
    }
}

// Token t's activation grid step (MatScratch::act_grid), 0 when its input is not on a grid.
inline float grid_step(const MatScratch& s, int t) { return s.act_grid ? s.act_grid[t] : 0.0f; }

Prepared prepare(const Linear& W, const float* x, MatScratch::Slot& sl, int kernels, int act, float step) {
    const int n_chunks = (int)W.chunks.size();
    if ((int)sl.xsum.size() < n_chunks) sl.xsum.resize(n_chunks);
    if ((int)sl.x8off.size() < n_chunks) sl.x8off.resize(n_chunks);
    if ((int)sl.xprep.size() < W.x_floats) sl.xprep.resize(W.x_floats);
    const int n8 = x8_blocks_of(W, kernels, act, nullptr);
    if ((int)sl.xq8.size() < n8) sl.xq8.resize(n8);
    prepare_token(W, x, kernels, act, sl.xprep.data(), sl.xsum.data(), sl.x8off.data(), sl.xq8.data(), step);
    return {sl.xprep.data(), sl.xsum.data(), sl.x8off.data(), sl.xq8.data()};
}

// Rows [task * RT, +RT) of a chunked linear.
void chunked_tile(const Linear& W, const float* x, const Prepared& p, int task, float* y, int kernels) {
    const int n_tasks = (W.N + RT - 1) / RT, n_chunks = (int)W.chunks.size();
    const int r0 = task * RT, nr = std::min(RT, W.N - r0);
    float acc[RT] = {0}, part[RT];
    const uint8_t* rows = W.row(r0);
    // Prefetch the tile this thread will likely take next, one slice per chunk step: decode streams
    // every weight once, and the kernels stall on the loads without it.
    const int next = task + 1;  // the pool runs a thread's tasks as one contiguous span
    const uint8_t* pf = next < n_tasks ? W.row(next * RT) : nullptr;
    const size_t pf_bytes = pf ? (size_t)std::min(RT, W.N - next * RT) * W.row_bytes : 0;
    const size_t pf_step = (pf_bytes / n_chunks + 63) & ~(size_t)63;
    for (int c = 0; c < n_chunks; ++c) {
        const Chunk& ch = W.chunks[c];
        for (size_t o = c * pf_step, e = std::min(pf_bytes, o + pf_step); o < e; o += 64) prefetch_read(pf + o);
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

// ------------------------------------------------------------------ row tiles
constexpr int TPT = RT / TILE_ROWS;  // tiles per task

inline size_t tile_res_off(const Linear::TChunk& tc, const Chunk& ch) { return tc.rb - 2 * (size_t)ch.n_prot; }

// An interleaved part back in the row-block layout of its kind (docs/format.md): TILE_ROWS row-blocks of tc.rb bytes
// (a ternary one with its codes padded to round4(B) bytes: residuals at tile_res_off, as in the part).
void untile_part(const Chunk& ch, const Linear::TChunk& tc, const uint8_t* part, uint8_t* o) {
    const size_t ro = tile_res_off(tc, ch);
    const int hb = tc.bt->header_bytes;  // fp16 fields, each stored for the 8 rows in a row
    for (int r = 0; r < TILE_ROWS; ++r) {
        for (int f = 0; f < hb / 2; ++f) std::memcpy(o + r * tc.rb + 2 * f, part + 2 * TILE_ROWS * f + 2 * r, 2);
        if (ch.n_prot) std::memcpy(o + r * tc.rb + ro, part + TILE_ROWS * ro + (size_t)r * 2 * ch.n_prot, 2 * (size_t)ch.n_prot);
    }
    tile_unpack_codes(*tc.bt, part + TILE_ROWS * hb, ch.g_pad, o + hb, tc.rb);
}

inline uint8_t* thread_buf(size_t n) {
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

// Chunk c's protected residuals of the 8 rows of tile tb as floats (res[i * n_prot + q]).
void protected_residuals(const Linear& W, int c, const uint8_t* tb, float* res) {
    const Chunk& ch = W.chunks[c];
    const Linear::TChunk& tc = W.tch[c];
    const uint8_t* pp = tb + tc.off;
    const size_t ro = tile_res_off(tc, ch);
    for (int i = 0; i < TILE_ROWS; ++i) {
        const uint8_t* r = tc.bt->tile_sub ? pp + TILE_ROWS * ro + (size_t)i * 2 * ch.n_prot : pp + (size_t)i * tc.rb + ro;
        for (int q = 0; q < ch.n_prot; ++q) res[i * ch.n_prot + q] = load_h(r + 2 * q);
    }
}

// acc[i] += row i's protected residuals (res, as protected_residuals gives them) times x, after the chunk's codes as
// the row layout adds them.
void add_protected(const Linear& W, int c, const float* res, const float* x, float* acc) {
    const Chunk& ch = W.chunks[c];
    const int32_t* idx = W.prot_local.data() + ch.prot0;
    for (int i = 0; i < TILE_ROWS; ++i) {
        float sp = 0.0f;
        for (int q = 0; q < ch.n_prot; ++q) sp += res[i * ch.n_prot + q] * x[ch.col0 + idx[q]];
        acc[i] += sp;
    }
}

void add_protected(const Linear& W, int c, const uint8_t* tb, const float* x, float* acc) {
    thread_local std::vector<float> res;
    res.resize((size_t)TILE_ROWS * W.chunks[c].n_prot);
    protected_residuals(W, c, tb, res.data());
    add_protected(W, c, res.data(), x, acc);
}

// Whether a run goes through the int8 tile kernels (else chunk by chunk through the row kernels).
inline bool run_has_tile_kernel(const Linear& W, const Linear::Run& run, const Prepared& p, int kernels) {
    const Linear::TChunk& t0 = W.tch[run.c0];
    return p.x8off[run.c0] >= 0 && t0.bt->tile_sub &&
           (run.uniform ? t0.bt->tile8[kernels] != nullptr : vec_ops(kernels).tile8_mix != nullptr);
}

// acc[0..8) += one run of tile tb for one token (x, p); pf as the tile kernels take it.
void tile_run(const Linear& W, const Linear::Run& run, const uint8_t* tb, const float* x, const Prepared& p,
              int kernels, std::ptrdiff_t pf, float* acc) {
    const Chunk& c0 = W.chunks[run.c0];
    const Linear::TChunk& t0 = W.tch[run.c0];
    if (run_has_tile_kernel(W, run, p, kernels)) {
        if (run.uniform)
            t0.bt->tile8[kernels](tb + t0.off, TILE_ROWS * t0.rb, run.n, p.xq8 + p.x8off[run.c0], p.xs + run.c0, c0.g_pad, acc, pf);
        else
            vec_ops(kernels).tile8_mix(tb, W.tdesc.data() + run.c0, run.n, p.xq8, p.x8off, p.xs, acc, pf);
        for (int c = run.c0; c < run.c0 + run.n; ++c)
            if (W.chunks[c].n_prot) add_protected(W, c, tb, x, acc);
        return;
    }
    float part[TILE_ROWS];
    for (int c = run.c0; c < run.c0 + run.n; ++c) {
        const Chunk& ch = W.chunks[c];
        const Linear::TChunk& tc = W.tch[c];
        const BlockTraits& bt = *tc.bt;
        const uint8_t* pp = tb + tc.off;
        if (pf)
            for (size_t o = 0; o < TILE_ROWS * tc.rb; o += 64) prefetch_read(pp + pf + o);
        if (bt.tile_sub) {  // interleaved, no tile kernel here (float activations): untile
            uint8_t* buf = thread_buf(TILE_ROWS * tc.rb);
            untile_part(ch, tc, pp, buf);
            pp = buf;
        }
        if (p.x8off[c] >= 0) bt.dot8_rows[kernels](pp, tc.rb, TILE_ROWS, p.xq8 + p.x8off[c], p.xs[c], ch.g_pad, part);
        else bt.dot_rows[kernels](pp, tc.rb, TILE_ROWS, p.xp + ch.xoff, p.xs[c], ch.g_pad, part);
        for (int i = 0; i < TILE_ROWS; ++i) acc[i] += part[i];
        if (ch.n_prot) add_protected(W, c, tb, x, acc);
    }
}

// acc[0..16) += one run of tiles tb and tb + ts (rows of both, in order), through the pair kernels where this CPU has
// them (tile16_kernel: AVX-512 holds 16 rows per register, half the instructions per row), else tile_run on each
// tile. Bit-identical either way.
void tile_run_pair(const Linear& W, const Linear::Run& run, const uint8_t* tb, std::ptrdiff_t ts, const float* x,
                   const Prepared& p, int kernels, std::ptrdiff_t pf, float* acc) {
    if (run_has_tile_kernel(W, run, p, kernels)) {
        const Chunk& c0 = W.chunks[run.c0];
        const Linear::TChunk& t0 = W.tch[run.c0];
        bool done = false;
        if (!run.uniform) {
            if (const tile16_mix_fn f = tile16_mix_kernel(kernels)) {
                f(tb, ts, W.tdesc.data() + run.c0, run.n, p.xq8, p.x8off, p.xs, acc, pf);
                done = true;
            }
        } else if (const tile16_fn f = tile16_kernel(t0.bt->id, kernels)) {
            f(tb + t0.off, ts, TILE_ROWS * t0.rb, run.n, p.xq8 + p.x8off[run.c0], p.xs + run.c0, c0.g_pad, acc, pf);
            done = true;
        }
        if (done) {
            for (int c = run.c0; c < run.c0 + run.n; ++c)
                if (W.chunks[c].n_prot) {
                    add_protected(W, c, tb, x, acc);
                    add_protected(W, c, tb + ts, x, acc + TILE_ROWS);
                }
            return;
        }
    }
    tile_run(W, run, tb, x, p, kernels, pf, acc);
    tile_run(W, run, tb + ts, x, p, kernels, pf, acc + TILE_ROWS);
}

// The tile prefetch default (tiled_task): on for x86-64 CPUs except AMD ones with AVX-512 (Zen 4 and later), where it
// measured slower. Intel: CPUID vendor "GenuineIntel"; AMD "AuthenticAMD", AVX-512F = CPUID.7.0:EBX bit 16.
bool tile_prefetch_default() {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    char v[12];
    std::memcpy(v, &b, 4); std::memcpy(v + 4, &d, 4); std::memcpy(v + 8, &c, 4);
    if (std::memcmp(v, "GenuineIntel", 12) == 0) return true;
    if (std::memcmp(v, "AuthenticAMD", 12) != 0) return false;
    if (a < 7) return true;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 16)) == 0;  // AMD without AVX-512F (Zen 3 and earlier)
#else
    return false;
#endif
}

// Tiles [task * TPT, +TPT) of a tiled linear.
void tiled_task(const Linear& W, const float* x, const Prepared& p, int task, float* y, int kernels) {
    const int n_tiles = (W.N + TILE_ROWS - 1) / TILE_ROWS;
    // Software prefetch of the next task's tiles (a thread's tiles are one contiguous stream, the pool's spans):
    // whether it pays depends on the CPU's own prefetchers (bench/results/decode_spans.md, ms per decode step of 22
    // TinyLlama layers, 1 thread): on an Intel Xeon it does (q4 43 vs 60 ms, q2 25 vs 43; at 16 threads 5.8 vs
    // 7.3), on AMD Zen 4 it costs (q4 decode 26 vs 33 tok/s), on AMD Zen 3 (AVX2 only) it pays again (TinyLlama
    // decode, int8 activations: q4 22.4 vs 27.7 tok/s at 1 thread, 39.8 vs 45.6 at 2; the 2.5-bit plan 30.5 vs 35.8
    // and 53.2 vs 63.2; bench/results/issue12_zen3.md). So: on for x86-64 except AMD CPUs with AVX-512
    // (tile_prefetch_default), off on AArch64 (not measured there); WQEDGE_TILE_PREFETCH=1 / =0 forces it (only when
    // every tile of this task has its partner that far on: the pointers stay inside the copy).
    static const bool use_pf = env_switch("WQEDGE_TILE_PREFETCH", tile_prefetch_default());
    const std::ptrdiff_t pf = (task + 2) * TPT <= n_tiles && use_pf ? (std::ptrdiff_t)TPT * (std::ptrdiff_t)W.tile_bytes : 0;
    // Where the CPU has pair kernels (tile16_kernel), task t is the pair of tiles t and t + h, h = ceil(n_tiles / 2):
    // a thread's span of tasks reads two long sequential streams. Pairing adjacent tiles instead (t, t + 1) halved the
    // DRAM throughput on Zen 4 (bench/results/tile16.md): each stream restarted every tile, out of the reach of the
    // hardware prefetchers.
    if (tile16_mix_kernel(kernels) != nullptr) {
        const int h = (n_tiles + 1) / 2, ta = task, tb = task + h;
        if (tb < n_tiles) {
            const std::ptrdiff_t pfp = tb + 1 < n_tiles && use_pf ? (std::ptrdiff_t)W.tile_bytes : 0;  // the next task's pair
            float acc[2 * TILE_ROWS] = {0};
            for (const Linear::Run& run : W.runs)
                tile_run_pair(W, run, W.tile(ta), (std::ptrdiff_t)h * (std::ptrdiff_t)W.tile_bytes, x, p, kernels, pfp, acc);
            for (int i = 0; i < TILE_ROWS; ++i) y[ta * TILE_ROWS + i] = acc[i];  // ta < h <= n_tiles - 1: a whole tile
            for (int i = 0, n = std::min(TILE_ROWS, W.N - tb * TILE_ROWS); i < n; ++i) y[tb * TILE_ROWS + i] = acc[TILE_ROWS + i];
        } else {  // n_tiles odd: the middle tile alone
            float acc[TILE_ROWS] = {0};
            for (const Linear::Run& run : W.runs) tile_run(W, run, W.tile(ta), x, p, kernels, 0, acc);
            for (int i = 0, n = std::min(TILE_ROWS, W.N - ta * TILE_ROWS); i < n; ++i) y[ta * TILE_ROWS + i] = acc[i];
        }
        return;
    }
    for (int t = task * TPT, t1 = std::min(n_tiles, (task + 1) * TPT); t < t1; ++t) {
        float acc[TILE_ROWS] = {0};
        for (const Linear::Run& run : W.runs) tile_run(W, run, W.tile(t), x, p, kernels, pf, acc);
        for (int i = 0, n = std::min(TILE_ROWS, W.N - t * TILE_ROWS); i < n; ++i) y[t * TILE_ROWS + i] = acc[i];
    }
}

static_assert(TPT == 2, "tiled_task's pairs (t, t + ceil(n_tiles / 2)) assume as many tasks as with TPT tiles each");
inline int n_tasks_of(const Linear& W) {
    return W.tiled() ? ((W.N + TILE_ROWS - 1) / TILE_ROWS + TPT - 1) / TPT : (W.N + RT - 1) / RT;
}

inline void run_task(const Linear& W, const float* x, const Prepared& p, int task, float* y, int kernels) {
    if (W.tiled()) tiled_task(W, x, p, task, y, kernels);
    else chunked_tile(W, x, p, task, y, kernels);
}

inline int trit(uint8_t byte, int i) {  // docs/format.md: t_i = (((byte * 3^i) mod 256) * 3) >> 8
    static const int pow3[5] = {1, 3, 9, 27, 81};
    return (int)(((((uint32_t)byte * pow3[i]) & 0xFF) * 3) >> 8);
}

// A ternary row-block as a q2 one (d = a, m = -a, q = t; residuals copied): a (t - 1) == a t - a exactly. The
// default for ternary chunks in tiles (ternary_tiles()): the q2 tile kernel is faster than the 1.6-bit one here.
void ternary_as_q2(const Chunk& ch, const uint8_t* src, uint8_t* dst, size_t dst_rb) {
    std::memset(dst, 0, dst_rb);
    std::memcpy(dst, src, 2);
    const uint16_t m = (uint16_t)(load_u16(src) ^ 0x8000u);
    std::memcpy(dst + 2, &m, 2);
    const int B = ternary_bytes(ch.g_pad);
    for (int c = 0; c < ch.g_pad; ++c) {
        const int t = trit(src[2 + c % B], c / B), k = (c % 32) / 8;
        dst[4 + (c / 32) * 8 + c % 8] |= (uint8_t)(t << (2 * k));
    }
    std::memcpy(dst + dst_rb - 2 * (size_t)ch.n_prot, src + ch.res_off, 2 * (size_t)ch.n_prot);
}

}  // namespace

// The tiles' memory: 2 MiB-aligned, its whole 2 MiB regions advised into transparent huge pages (Linux; the tail
// keeps 4 KiB pages, so no memory is added), fewer TLB misses and no 4 KiB boundaries in a thread's stream. Measured
// (bench/results/decode_spans.md): TinyLlama q4 decode 33.1 vs 29.4 tok/s at 1 thread on Zen 4, no change on an
// Intel Xeon. WQEDGE_HUGEPAGES=0 turns it off.
static std::shared_ptr<uint8_t[]> alloc_tiles(size_t n) {
#if defined(__linux__)
    constexpr size_t HUGE = (size_t)2 << 20;
    static const bool use_huge = env_switch("WQEDGE_HUGEPAGES", true);
    void* p = nullptr;
    if (use_huge && n >= HUGE && posix_memalign(&p, HUGE, n) == 0) {
        madvise(p, n / HUGE * HUGE, MADV_HUGEPAGE);  // a hint: without THP (never / unsupported) nothing changes
        return std::shared_ptr<uint8_t[]>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
    }
#endif
    return std::shared_ptr<uint8_t[]>(new uint8_t[n]);
}

void repack_tiles(Linear& L) {
    if (L.kind != Linear::CHUNKED || !L.data || L.tiled()) return;
    const int n_tiles = (L.N + TILE_ROWS - 1) / TILE_ROWS, n_chunks = (int)L.chunks.size();
    const BlockTraits* q2 = block_traits(4);
    const bool keep_ternary = ternary_tiles();
    L.tch.clear();
    size_t off = 0, max_rb = 0;
    for (int c = 0; c < n_chunks; ++c) {
        const Chunk& ch = L.chunks[c];
        const BlockTraits* bt = ch.bt->id == KIND_TERNARY && !keep_ternary ? q2 : ch.bt;
        const size_t rb = tile_row_bytes(*bt, ch.g, ch.n_prot);
        L.tch.push_back({bt, off, rb});
        off += TILE_ROWS * rb;
        max_rb = std::max(max_rb, rb);
    }
    L.tile_bytes = off;
    L.tiles_size = (size_t)n_tiles * L.tile_bytes;
    L.tiles = alloc_tiles(L.tiles_size);
    const std::vector<uint8_t> zero(L.row_bytes, 0);  // rows past N
    // Tiles [t0, t1): every byte written (header fields and residuals copied, codes packed, other kinds' parts whole).
    auto pack = [&L, &zero, n_chunks, max_rb](int t0, int t1) {
        std::vector<uint8_t> conv(TILE_ROWS * max_rb);  // converted (ternary -> q2) row-blocks
        for (int t = t0; t < t1; ++t) {
            const uint8_t* rows[TILE_ROWS];
            for (int r = 0; r < TILE_ROWS; ++r) rows[r] = t * TILE_ROWS + r < L.N ? L.row(t * TILE_ROWS + r) : zero.data();
            uint8_t* tile = L.tiles.get() + (size_t)t * L.tile_bytes;
            for (int c = 0; c < n_chunks; ++c) {
                const Chunk& ch = L.chunks[c];
                const Linear::TChunk& tc = L.tch[c];
                const BlockTraits& bt = *tc.bt;
                uint8_t* part = tile + tc.off;
                const uint8_t* src[TILE_ROWS];  // the rows' row-blocks, in the tile kind
                size_t res_off = ch.res_off;
                for (int r = 0; r < TILE_ROWS; ++r) {
                    src[r] = rows[r] + ch.off;
                    if (&bt != ch.bt) {
                        ternary_as_q2(ch, src[r], conv.data() + r * tc.rb, tc.rb);
                        src[r] = conv.data() + r * tc.rb;
                        res_off = tile_res_off(tc, ch);
                    }
                }
                if (!bt.tile_sub) {
                    for (int r = 0; r < TILE_ROWS; ++r) std::memcpy(part + r * tc.rb, src[r], tc.rb);
                    continue;
                }
                const size_t ro = tile_res_off(tc, ch);
                const int hb = bt.header_bytes;
                for (int r = 0; r < TILE_ROWS; ++r) {
                    for (int f = 0; f < hb / 2; ++f) std::memcpy(part + 2 * TILE_ROWS * f + 2 * r, src[r] + 2 * f, 2);
                    if (ch.n_prot) std::memcpy(part + TILE_ROWS * ro + (size_t)r * 2 * ch.n_prot, src[r] + res_off, 2 * (size_t)ch.n_prot);
                }
                const uint8_t* codes[TILE_ROWS];
                for (int r = 0; r < TILE_ROWS; ++r) codes[r] = src[r] + hb;
                tile_pack_codes(bt, codes, ch.g_pad, part + TILE_ROWS * hb);
            }
        }
    };
    // a few threads: the copy of a 1B model is ~1 GB of scattered 4-byte moves (and first-touch page faults)
    const int nt = (int)std::min<size_t>({(size_t)std::max(1u, std::thread::hardware_concurrency()), (size_t)8,
                                          L.tiles_size / (4u << 20) + 1});
    if (nt <= 1) {
        pack(0, n_tiles);
    } else {
        std::vector<std::thread> ts;
        for (int i = 0; i < nt; ++i) ts.emplace_back(pack, (int)((int64_t)n_tiles * i / nt), (int)((int64_t)n_tiles * (i + 1) / nt));
        for (auto& th : ts) th.join();
    }
    L.runs.clear();
    L.tdesc.clear();
    for (int c = 0; c < n_chunks; ++c) {
        const Chunk& ch = L.chunks[c];
        L.tdesc.push_back({L.tch[c].off, c, L.tch[c].bt->id, ch.g_pad / 32, 0});
        if (c > 0 && L.tch[c].bt->tile_sub && L.tch[c - 1].bt->tile_sub) {
            const Chunk& prev = L.chunks[c - 1];
            Linear::Run& run = L.runs.back();
            const bool same = L.tch[c].bt == L.tch[c - 1].bt && ch.g_pad == prev.g_pad && ch.n_prot == prev.n_prot;
            // q8 parts run only in uniform runs (tile8_q8): the mixed-run kernels (tile8_mix, tile16_mix) and the
            // prefill GEMM take the kinds below 8 bits, whose int8 products fit int16 sums
            const bool q8 = L.tch[c].bt->id == KIND_Q8 || L.tch[run.c0].bt->id == KIND_Q8;
            if (same || !q8) {
                if (!same) run.uniform = false;
                ++run.n;
                continue;
            }
        }
        L.runs.push_back({c, 1, true});
    }
}

// Process wide, read once from WQEDGE_TERNARY_TILES (set and not 0: on, as the other WQEDGE_ switches); tests switch
// it with set_ternary_tiles.
static std::atomic<int> g_ternary_tiles{-1};

bool ternary_tiles() {
    int v = g_ternary_tiles.load(std::memory_order_relaxed);
    if (v < 0) {
        v = env_switch("WQEDGE_TERNARY_TILES", false) ? 1 : 0;
        g_ternary_tiles.store(v);
    }
    return v != 0;
}

void set_ternary_tiles(bool on) { g_ternary_tiles.store(on ? 1 : 0); }

// Row tiles serve the int8 kernels. A model loaded while float activations are selected (the reference path:
// WQEDGE_ACT=f32, set_activations) keeps the row layout: on tiles the float path would untile every part for every
// call (q3's untile is a scalar field-by-field decode), and a mixed plan decoded 13x slower than on the rows
// (llama-s 3.25-bit, 2 threads: 36 vs 490 tok/s, bench/results/issue12_zen3.md). WQEDGE_REPACK=1 still forces tiles.
bool repack_wanted(int kernels) {
    return env_switch("WQEDGE_REPACK", block_traits(2)->tile8[kernels] != nullptr && kernels != K_SCALAR &&
                                           active_act() == ACT_Q8);
}

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
            // RB rows per call. Software prefetch of the next RB rows (also past the task's end: with one thread the next
            // task is this thread's) only for short rows (RB rows <= 8 KB, e.g. D = 512): measured on the 2-core EPYC
            // (bench/matvec_bench.cpp head, 1 thread, 32000 rows): D = 512 11.7 GB/s prefetching within the task (issue 5),
            // 9.7 without, 20.0 with this; D = 2048 14.5 with issue 5's prefetch (32 KB ahead), 14.1-14.9 with 4-16 KB
            // ahead, 17.1 without: the hardware prefetchers follow long rows better than the prefetches do (issue 12)
            constexpr int RB = 8;
            const bool pf = (size_t)RB * W.row_bytes <= 8192;
            const uint8_t* end = W.row(W.N);
            for (int r = task * 64; r < r1; r += RB) {
                const int nr = std::min(RB, r1 - r);
                if (pf)
                    for (const uint8_t *p = W.row(r + nr), *e = std::min(end, p + (size_t)RB * W.row_bytes); p < e; p += 64) prefetch_read(p);
                ops.dot_f16_rows(W.row(r), W.row_bytes, nr, x, W.K, y + r);
            }
        });
        return;
    }
    if (s.slots.empty()) s.slots.resize(1);
    const Prepared p = prepare(W, x, s.slots[0], kernels, act, grid_step(s, 0));
    pool.run(n_tasks_of(W), [&](int task, int) { run_task(W, x, p, task, y, kernels); });
}

// Whether b's prepared activations of a token are a's (prepare_token on the same x): the same chunk columns and, per
// chunk, the same path (int8 blocks or float) and layout, float chunks at the same offsets. matvec_group then prepares
// the token once for both: the preparation runs on the calling thread while the others wait, and was 5-7% of llama-s's
// decode CPU time at 2 threads (issue 12).
static bool same_preparation(const Linear& a, const Linear& b, int kernels, int act) {
    if (a.chunks.size() != b.chunks.size()) return false;
    for (size_t c = 0; c < a.chunks.size(); ++c) {
        const Chunk &ca = a.chunks[c], &cb = b.chunks[c];
        const BlockTraits &ta = a.kind_of((int)c), &tb = b.kind_of((int)c);
        const bool i8a = act == ACT_Q8 && ta.dot8[kernels], i8b = act == ACT_Q8 && tb.dot8[kernels];
        if (ca.col0 != cb.col0 || ca.g != cb.g || ta.x_layout != tb.x_layout || i8a != i8b) return false;
        if (!i8a && ca.xoff != cb.xoff) return false;
    }
    return true;
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
        int j = 0;  // an earlier member that prepared the same activations (q, k and v of most plans; gate and up)
        while (j < i && !same_preparation(*W[j], *W[i], kernels, act)) ++j;
        p[i] = j < i ? p[j] : prepare(*W[i], x, s.slots[i], kernels, act, grid_step(s, 0));
        first[i + 1] = first[i] + n_tasks_of(*W[i]);
    }
    pool.run(first[n], [&](int task, int) {
        int i = 0;
        while (task >= first[i + 1]) ++i;
        run_task(*W[i], x, p[i], task - first[i], y[i], kernels);
    });
}

// Dequantize one row of a chunked linear from the file's row layout (`row`) into o[0, K); tmp holds max_g_pad floats.
static void dequant_row_blocks(const Linear& W, const uint8_t* row, float* o, float* tmp, int kernels) {
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

void dense_row(const Linear& W, int r, float* out, int kernels) {
    if (W.kind == Linear::DENSE_F32) {
        std::memcpy(out, W.row(r), sizeof(float) * W.K);
    } else if (W.kind == Linear::DENSE_F16) {
        vec_ops(kernels).f16_to_f32(W.row(r), out, W.K);
    } else {
        // A quantized embedding table (tied quantized head): the row from the file's layout, which stays mapped
        // when the linear is tiled (its released pages fault back in from the file; one row per token).
        thread_local std::vector<float> tmp;
        tmp.resize(W.max_g_pad);
        dequant_row_blocks(W, W.row(r), out, tmp.data(), kernels);
    }
}

// dequant_rows of a tiled linear: tile by tile, each interleaved part untiled once for its rows.
static void dequant_rows_tiled(const Linear& W, int r0, int nr, float* out, int ld, float* tmp, int kernels) {
    const int Kp = round8(W.K);
    for (int row = r0; row < r0 + nr;) {
        const int t = row / TILE_ROWS, i0 = row % TILE_ROWS, i1 = std::min(TILE_ROWS, r0 + nr - t * TILE_ROWS);
        for (int c = 0; c < (int)W.chunks.size(); ++c) {
            const Chunk& ch = W.chunks[c];
            const Linear::TChunk& tc = W.tch[c];
            const BlockTraits& bt = *tc.bt;
            const uint8_t* part = W.tile(t) + tc.off;
            if (bt.tile_sub) {
                uint8_t* buf = thread_buf(TILE_ROWS * tc.rb);
                untile_part(ch, tc, part, buf);
                part = buf;
            }
            const size_t ro = tile_res_off(tc, ch);
            for (int i = i0; i < i1; ++i) {
                const uint8_t* rb = part + (size_t)i * tc.rb;
                float* o = out + (size_t)(t * TILE_ROWS + i - r0) * ld;
                if (ch.g == ch.g_pad && bt.x_layout == X_PLAIN) {
                    bt.dequant[kernels](rb, ch.g_pad, o + ch.col0);  // writes exactly g_pad
                } else {
                    bt.dequant[kernels](rb, ch.g_pad, tmp);
                    std::memcpy(o + ch.col0, tmp, sizeof(float) * ch.g);
                }
                const int32_t* idx = W.prot_local.data() + ch.prot0;
                for (int p = 0; p < ch.n_prot; ++p) o[ch.col0 + idx[p]] += load_h(rb + ro + 2 * p);
            }
        }
        for (int i = i0; i < i1; ++i)
            for (int k = W.K; k < Kp; ++k) out[(size_t)(t * TILE_ROWS + i - r0) * ld + k] = 0.0f;
        row = t * TILE_ROWS + i1;
    }
}

void dequant_rows(const Linear& W, int r0, int nr, float* out, int ld, float* tmp, int kernels) {
    if (W.tiled()) {
        dequant_rows_tiled(W, r0, nr, out, ld, tmp, kernels);
        return;
    }
    const int Kp = round8(W.K);
    for (int i = 0; i < nr; ++i) {
        float* o = out + (size_t)i * ld;
        const uint8_t* row = W.row(r0 + i);
        if (W.kind != Linear::CHUNKED) dense_row(W, r0 + i, o, kernels);
        else dequant_row_blocks(W, row, o, tmp, kernels);
        for (int k = W.K; k < Kp; ++k) o[k] = 0.0f;
    }
}

// ------------------------------------------------------------------ integer prefill (ACT_Q8, n > 1)
// The batched tile GEMM (tile8_gemm_fn): for nt tokens, acc[8 t + r] += one run of tile kinds (TileDesc d[0, n)) of
// row r for token t, whose int8 activations are xq + t * xq_stride (+ x8off[c] per chunk) and sums xsum + t * xs_stride.
// Each token's result is bit-identical to VecOps::tile8_mix / tile8 on that token (the same exact int32 block sums,
// then the same float operations in the same order): prefill logits equal token-by-token decode's.
typedef void (*tile8_gemm_fn)(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xq_stride,
                              const int* x8off, const float* xsum, size_t xs_stride, int nt, float* acc);
// The row layout's batched kernel (rows4_gemm_fn): 4 rows (rb + k * stride) of one chunk x nt tokens (token t's blocks
// at xq + t * xq_stride, its sum at xsum[t * xs_stride]); out[t * ld + k] equals dot8_rows(...)[k] on token t, bit for
// bit. NEON only (its row layout: WQEDGE_REPACK=0); elsewhere the row layout goes token by token.
typedef void (*rows4_gemm_fn)(const uint8_t* rb, size_t stride, const XQ8* xq, size_t xq_stride, const float* xsum,
                              size_t xs_stride, int nt, int g_pad, float* out, size_t ld);
#if defined(__aarch64__)
namespace neon {  // kernels_neon.cpp
void gemm4_q8(const uint8_t*, size_t, const XQ8*, size_t, const float*, size_t, int, int, float*, size_t);
void gemm4_q4(const uint8_t*, size_t, const XQ8*, size_t, const float*, size_t, int, int, float*, size_t);
void gemm4_q3(const uint8_t*, size_t, const XQ8*, size_t, const float*, size_t, int, int, float*, size_t);
void gemm4_q2(const uint8_t*, size_t, const XQ8*, size_t, const float*, size_t, int, int, float*, size_t);
void gemm4_q1(const uint8_t*, size_t, const XQ8*, size_t, const float*, size_t, int, int, float*, size_t);
void tile8_gemm(const uint8_t*, const TileDesc*, int, const XQ8*, size_t, const int*, const float*, size_t, int, float*);  // kernels_neon_tiles.cpp
}  // namespace neon
#endif
#if defined(__x86_64__) || defined(__i386__)
namespace avx2 {  // kernels_avx2.cpp, kernels_vnni.cpp
void tile8_gemm(const uint8_t*, const TileDesc*, int, const XQ8*, size_t, const int*, const float*, size_t, int, float*);
namespace vnni512 {
void tile8_gemm(const uint8_t*, const TileDesc*, int, const XQ8*, size_t, const int*, const float*, size_t, int, float*);
}
namespace vnni256 {
void tile8_gemm(const uint8_t*, const TileDesc*, int, const XQ8*, size_t, const int*, const float*, size_t, int, float*);
}
}  // namespace avx2
#endif

namespace {

// Scalar reference: the scalar tile kernels, token by token.
void tile8_gemm_scalar(const uint8_t* tile, const TileDesc* d, int n, const XQ8* xq, size_t xq_stride, const int* x8off,
                       const float* xsum, size_t xs_stride, int nt, float* acc) {
    for (int t = 0; t < nt; ++t)
        vec_ops(K_SCALAR).tile8_mix(tile, d, n, xq + t * xq_stride, x8off, xsum + t * xs_stride, acc + TILE_ROWS * t, 0);
}

// The tile GEMM of a kernel set (the VNNI build the AVX2 tile kernels use, x86_vnni(); NEON: SDOT or plain per call,
// neon_dotprod()); nullptr: none, the products go token by token through tile_run.
tile8_gemm_fn tile8_gemm_of(int kernels) {
    if (kernels == K_SCALAR) return tile8_gemm_scalar;
#if defined(__aarch64__)
    if (kernels == K_NEON) return neon::tile8_gemm;
#endif
#if defined(__x86_64__) || defined(__i386__)
    if (kernels == K_AVX2) {
        const int v = x86_vnni();
        return v == 1 ? avx2::vnni512::tile8_gemm : v == 2 ? avx2::vnni256::tile8_gemm : avx2::tile8_gemm;
    }
#endif
    return nullptr;
}

rows4_gemm_fn rows4_gemm_of(int kernels, int kind) {
#if defined(__aarch64__)
    if (kernels == K_NEON) switch (kind) {
            case KIND_Q8: return neon::gemm4_q8;
            case KIND_Q4: return neon::gemm4_q4;
            case KIND_Q3: return neon::gemm4_q3;
            case KIND_Q2: return neon::gemm4_q2;
            case KIND_Q1: return neon::gemm4_q1;
            default: break;
        }
#endif
    (void)kernels;
    (void)kind;
    return nullptr;
}

// Rows [r0, r0 + nr) (nr <= RT) x tokens [t0, t1) (<= GEMM_TOK) of a row-layout linear, chunk by chunk as chunked_tile
// does for one token (acc += the chunk's dots, then its protected residuals), the dots through rows4_gemm where the
// kind has one (groups of 4 rows; dot8_rows groups rows in fours too, so the results are the same) and token by token
// through the decode kernels otherwise.
void rows_task(const Linear& W, const float* X, int t0, int t1, int r0, int nr, const Prepared& p0, size_t n8, float* Y,
               int kernels, int gemm_tok) {
    const int K = W.K, N = W.N, n_chunks = (int)W.chunks.size(), nt = t1 - t0;
    thread_local std::vector<float> acc, part;
    acc.assign((size_t)gemm_tok * RT, 0.0f);
    part.resize((size_t)gemm_tok * RT);
    auto prep = [&](int t) {
        const size_t xf = p0.xp == nullptr ? 0 : (size_t)W.x_floats;
        return Prepared{p0.xp ? p0.xp + (t - t0) * xf : nullptr, p0.xs + (size_t)(t - t0) * n_chunks, p0.x8off,
                        p0.xq8 + (size_t)(t - t0) * n8};
    };
    for (int c = 0; c < n_chunks; ++c) {
        const Chunk& ch = W.chunks[c];
        const uint8_t* rows = W.row(r0) + ch.off;
        const rows4_gemm_fn g = p0.x8off[c] >= 0 ? rows4_gemm_of(kernels, ch.bt->id) : nullptr;
        const int r4 = g ? nr & ~3 : 0;
        for (int i = 0; i < r4; i += 4)
            g(rows + (size_t)i * W.row_bytes, W.row_bytes, p0.xq8 + p0.x8off[c], n8, p0.xs + c, n_chunks, nt, ch.g_pad,
              part.data() + i, RT);
        if (r4 < nr)
            for (int t = t0; t < t1; ++t) {
                const Prepared p = prep(t);
                const uint8_t* rb = rows + (size_t)r4 * W.row_bytes;
                float* o = part.data() + (size_t)(t - t0) * RT + r4;
                if (p.x8off[c] >= 0) ch.bt->dot8_rows[kernels](rb, W.row_bytes, nr - r4, p.xq8 + p.x8off[c], p.xs[c], ch.g_pad, o);
                else ch.bt->dot_rows[kernels](rb, W.row_bytes, nr - r4, p.xp + ch.xoff, p.xs[c], ch.g_pad, o);
            }
        for (int t = 0; t < nt; ++t) {
            float* a = acc.data() + (size_t)t * RT;
            for (int i = 0; i < nr; ++i) a[i] += part[(size_t)t * RT + i];
            if (ch.n_prot)
                for (int i = 0; i < nr; ++i) a[i] += protected_sum(W, ch, rows + (size_t)i * W.row_bytes, X + (size_t)(t0 + t) * K);
        }
    }
    for (int t = 0; t < nt; ++t)
        std::memcpy(Y + (size_t)(t0 + t) * N + r0, acc.data() + (size_t)t * RT, sizeof(float) * nr);
}

// Whether every chunk of a run is of a kind the tile GEMMs know (q4, q3, q2, ternary, q1, q4s, q3s, q2s; ternary
// chunks are q2 unless ternary_tiles()).
bool gemm_kinds(const Linear& W, const Linear::Run& run) {
    for (int c = run.c0; c < run.c0 + run.n; ++c) {
        const int id = W.tch[c].bt->id;
        if (id < 2 || id > 9) return false;
    }
    return true;
}

constexpr int GEMM_TOK = 64;  // tokens per task: their int8 activations stay in L2 while a tile's weights stay in L1

}  // namespace

// Y[n][N] with int8 activations: each token quantized once (prepare_token, as decode does), then per task one tile
// (tiled linear; row layout: RT rows) times GEMM_TOK tokens. Runs of tile kinds go through the tile GEMM, eight tokens
// per call; anything else (fp16 chunks, kinds without tile kernels, the row layout) through the decode path's
// per-token kernels on weights the task keeps in cache. Every token's row equals matvec(..., ACT_Q8) bit for bit.
static void matmul_q8(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels) {
    const int n_chunks = (int)W.chunks.size(), K = W.K, N = W.N;
    bool any_float = false;
    const int n8 = x8_blocks_of(W, kernels, ACT_Q8, &any_float);
    const size_t xf = any_float ? (size_t)W.x_floats : 0;
    if (s.bq8.size() < (size_t)n * n8) s.bq8.resize((size_t)n * n8);
    if (s.bsum.size() < (size_t)n * n_chunks) s.bsum.resize((size_t)n * n_chunks);
    if (s.bprep.size() < (size_t)n * xf) s.bprep.resize((size_t)n * xf);
    if ((int)s.b8off.size() < n_chunks) s.b8off.resize(n_chunks);
    XQ8* xq = s.bq8.data();
    float* xs = s.bsum.data();
    float* xp = s.bprep.data();
    int* x8off = s.b8off.data();  // the same for every token (it depends on the kinds only)
    pool.run(n, [&](int t, int) {
        thread_local std::vector<int> off;
        off.resize(n_chunks);
        prepare_token(W, X + (size_t)t * K, kernels, ACT_Q8, xp + t * xf, xs + (size_t)t * n_chunks, off.data(),
                      xq + (size_t)t * n8, grid_step(s, t));
        if (t == 0) std::copy(off.begin(), off.end(), x8off);
    });
    auto prep = [&](int t) { return Prepared{xp + t * xf, xs + (size_t)t * n_chunks, x8off, xq + (size_t)t * n8}; };
    const int n_tb = (n + GEMM_TOK - 1) / GEMM_TOK;
    if (!W.tiled()) {  // row layout: RT rows x GEMM_TOK tokens per task
        const int n_rt = (N + RT - 1) / RT;
        pool.run(n_rt * n_tb, [&](int task, int) {
            const int rt = task % n_rt, t0 = task / n_rt * GEMM_TOK, t1 = std::min(n, t0 + GEMM_TOK);
            Prepared p0 = prep(t0);
            if (!xf) p0.xp = nullptr;
            rows_task(W, X, t0, t1, rt * RT, std::min(RT, N - rt * RT), p0, n8, Y, kernels, GEMM_TOK);
        });
        return;
    }
    const tile8_gemm_fn gemm = tile8_gemm_of(kernels);
    const int n_tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
    pool.run(n_tiles * n_tb, [&](int task, int) {
        const int ti = task % n_tiles, t0 = task / n_tiles * GEMM_TOK, t1 = std::min(n, t0 + GEMM_TOK);
        const uint8_t* tb = W.tile(ti);
        const Prepared p0 = prep(t0);
        float acc[GEMM_TOK * TILE_ROWS];
        std::fill(acc, acc + (t1 - t0) * TILE_ROWS, 0.0f);
        thread_local std::vector<float> res;  // the tile's protected residuals, chunk c's at 8 * prot0 (once per task)
        res.resize((size_t)TILE_ROWS * W.prot_local.size());
        for (const Linear::Run& run : W.runs) {
            if (gemm && run_has_tile_kernel(W, run, p0, kernels) && gemm_kinds(W, run)) {
                for (int t = t0; t < t1; t += 8) {  // 8 tokens per call (the kernels take them 8 or 4 at a time)
                    const int nt = std::min(8, t1 - t);
                    float* a = acc + (t - t0) * TILE_ROWS;
                    gemm(tb, W.tdesc.data() + run.c0, run.n, xq + (size_t)t * n8, n8, x8off, xs + (size_t)t * n_chunks,
                         n_chunks, nt, a);
                    for (int c = run.c0; c < run.c0 + run.n; ++c)
                        if (W.chunks[c].n_prot) {
                            float* rc = res.data() + (size_t)TILE_ROWS * W.chunks[c].prot0;
                            if (t == t0) protected_residuals(W, c, tb, rc);
                            for (int u = 0; u < nt; ++u) add_protected(W, c, rc, X + (size_t)(t + u) * K, a + u * TILE_ROWS);
                        }
                }
                continue;
            }
            for (int t = t0; t < t1; ++t) tile_run(W, run, tb, X + (size_t)t * K, prep(t), kernels, 0, acc + (t - t0) * TILE_ROWS);
        }
        for (int t = t0; t < t1; ++t)
            for (int i = 0, nr = std::min(TILE_ROWS, N - ti * TILE_ROWS); i < nr; ++i)
                Y[(size_t)t * N + ti * TILE_ROWS + i] = acc[(t - t0) * TILE_ROWS + i];
    });
}

void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels) {
    matmul(W, X, n, Y, pool, s, kernels, ACT_F32);
}

void matmul(const Linear& W, const float* X, int n, float* Y, ThreadPool& pool, MatScratch& s, int kernels, int act) {
    if (n == 1) {
        matvec(W, X, Y, pool, s, kernels, act);
        return;
    }
    if (act == ACT_Q8 && W.kind == Linear::CHUNKED) {
        matmul_q8(W, X, n, Y, pool, s, kernels);
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

// ------------------------------------------------------------------ column-chunked layout
// (declared in linear.h; used by the model loader, model.cpp, and the ONNX Runtime custom op, ort_ops.cpp)
// The compact kinds, id KIND_COMPACT_FIRST + i: their base kind and its number of code levels (L in m's formula).
static const struct {
    int base, levels;
} COMPACT_KINDS[N_COMPACT_KINDS] = {{KIND_Q4, 16}, {KIND_Q3, 8}, {KIND_Q2, 4}, {KIND_TERNARY, 3}, {KIND_Q1, 2}};

int compact_base(int64_t id) {
    return id >= KIND_COMPACT_FIRST && id < KIND_COMPACT_FIRST + N_COMPACT_KINDS
               ? COMPACT_KINDS[id - KIND_COMPACT_FIRST].base
               : -1;
}

int compact_header_bytes(int id) { return block_traits(compact_base(id))->header_bytes / 2; }

// float32(2^(-i/32)), i < 32: wqedge.blocks.COMPACT_FRAC, the same values
static const float COMPACT_FRAC[32] = {
    0x1p+0f, 0x1.f50766p-1f, 0x1.ea4afap-1f, 0x1.dfc974p-1f, 0x1.d5818ep-1f, 0x1.cb720ep-1f, 0x1.c199bep-1f,
    0x1.b7f77p-1f, 0x1.ae89fap-1f, 0x1.a5503cp-1f, 0x1.9c4918p-1f, 0x1.93737cp-1f, 0x1.8ace54p-1f, 0x1.82589ap-1f,
    0x1.7a1148p-1f, 0x1.71f75ep-1f, 0x1.6a09e6p-1f, 0x1.6247ecp-1f, 0x1.5ab07ep-1f, 0x1.5342b6p-1f, 0x1.4bfdaep-1f,
    0x1.44e086p-1f, 0x1.3dea64p-1f, 0x1.371a74p-1f, 0x1.306fep-1f, 0x1.29e9ep-1f, 0x1.2387a6p-1f, 0x1.1d4874p-1f,
    0x1.172b84p-1f, 0x1.11301ep-1f, 0x1.0b5586p-1f, 0x1.059b0ep-1f};

void compact_params(int id, const uint8_t* header, uint16_t base, uint16_t* d, uint16_t* m) {
    const int e = header[0];
    // d = fp16(D 2^(-e/32)): the product with the table's value rounds once, the power of two is exact; e = 255: d = 0
    *d = e == 255 ? 0 : fp32_to_fp16(std::ldexp(fp16_to_fp32(base) * COMPACT_FRAC[e & 31], -(e >> 5)));
    if (compact_header_bytes(id) < 2) return;  // ternary: d alone
    // m = fp16(-(d (z (L - 1))) / 255): the product is exact (11 + 12 bits), the division rounds once
    const float t = fp16_to_fp32(*d) * (float)(header[1] * (COMPACT_KINDS[id - KIND_COMPACT_FIRST].levels - 1));
    *m = fp32_to_fp16(-(t / 255.0f));
}

size_t compact_row_bytes(const Linear& L, const std::vector<int64_t>& actions) {
    size_t n = 0;
    for (size_t c = 0; c < L.chunks.size(); ++c) {
        const Chunk& ch = L.chunks[c];
        n += row_bytes(*ch.bt, ch.g, ch.n_prot) - (compact_base(actions[c]) >= 0 ? compact_header_bytes((int)actions[c]) : 0);
    }
    return n;
}

void compact_expand(const Linear& L, const std::vector<int64_t>& actions, const uint8_t* src, const uint16_t* bases,
                    uint8_t* dst) {
    const size_t src_rb = compact_row_bytes(L, actions);
    for (int r = 0; r < L.N; ++r) {
        const uint8_t* s = src + (size_t)r * src_rb;
        uint8_t* o = dst + (size_t)r * L.row_bytes;
        int ci = 0;  // compact chunks so far: the index of this one's scale base
        for (size_t c = 0; c < L.chunks.size(); ++c) {
            const Chunk& ch = L.chunks[c];
            const size_t hb = (size_t)ch.bt->header_bytes, rest = row_bytes(*ch.bt, ch.g, ch.n_prot) - hb;
            if (compact_base(actions[c]) < 0) {
                std::memcpy(o + ch.off, s, hb + rest);
                s += hb + rest;
                continue;
            }
            uint16_t d = 0, m = 0;
            const int id = (int)actions[c], chb = compact_header_bytes(id);
            compact_params(id, s, bases[ci++], &d, &m);
            std::memcpy(o + ch.off, &d, 2);
            if (chb == 2) std::memcpy(o + ch.off + 2, &m, 2);
            std::memcpy(o + ch.off + hb, s + chb, rest);
            s += chb + rest;
        }
    }
}

Linear chunked_layout(const std::string& name, int N, int K, int G, const std::vector<int64_t>& actions,
                      const std::vector<int64_t>& n_protected) {
    if (N <= 0 || K <= 0 || G <= 0)
        fail(WQE_ERR_FORMAT, "tensor '%s': bad dimensions N = %d, K = %d, group size %d", name.c_str(), N, K, G);
    const int n_chunks = (K + G - 1) / G;
    if ((int64_t)actions.size() != n_chunks || (int64_t)n_protected.size() != n_chunks)
        fail(WQE_ERR_FORMAT, "tensor '%s': %zu chunk actions and %zu protected counts, but %d columns in chunks of %d make %d",
             name.c_str(), actions.size(), n_protected.size(), K, G, n_chunks);
    Linear L;
    L.kind = Linear::CHUNKED;
    L.name = name;
    L.N = N;
    L.K = K;
    size_t off = 0;
    int xoff = 0, prot0 = 0;
    for (int c = 0; c < n_chunks; ++c) {
        const BlockTraits* bt = block_traits(actions[c] < 0 || actions[c] > 255 ? -1 : (int)actions[c]);
        if (!bt)
            fail(WQE_ERR_FORMAT, "tensor '%s' chunk %d: unknown block type %lld (this runtime knows ids 0-%d)",
                 name.c_str(), c, (long long)actions[c], N_BLOCK_TYPES - 1);
        Chunk ch;
        ch.bt = bt;
        ch.col0 = c * G;
        ch.g = std::min(G, K - ch.col0);
        ch.g_pad = padded(ch.g);
        if (n_protected[c] < 0 || n_protected[c] > ch.g)
            fail(WQE_ERR_FORMAT, "tensor '%s' chunk %d: %lld protected columns in a chunk of %d", name.c_str(), c,
                 (long long)n_protected[c], ch.g);
        ch.n_prot = (int)n_protected[c];
        ch.prot0 = prot0;
        prot0 += ch.n_prot;
        ch.off = off;
        ch.res_off = (size_t)bt->header_bytes + bt->code_bytes(ch.g_pad);
        ch.xoff = xoff;
        xoff += round8(x_floats(*bt, ch.g_pad));
        off += row_bytes(*bt, ch.g, ch.n_prot);
        L.max_g_pad = std::max(L.max_g_pad, ch.g_pad);
        L.chunks.push_back(ch);
    }
    L.row_bytes = off;
    L.x_floats = xoff;
    L.prot_local.assign(prot0, 0);
    return L;
}

void set_protected_columns(Linear& L, const std::vector<int64_t>& cols) {
    if (cols.size() != L.prot_local.size())
        fail(WQE_ERR_FORMAT, "tensor '%s': %zu protected column indices, but its chunks protect %zu", L.name.c_str(),
             cols.size(), L.prot_local.size());
    for (const Chunk& ch : L.chunks) {
        int prev = -1;
        for (int p = 0; p < ch.n_prot; ++p) {
            const int64_t col = cols[ch.prot0 + p];
            const int64_t local = col - ch.col0;
            if (local < 0 || local >= ch.g || local <= prev)
                fail(WQE_ERR_FORMAT, "tensor '%s.protect': entry %d = column %lld is not inside chunk %d [%d, %d) in ascending order",
                     L.name.c_str(), ch.prot0 + p, (long long)col, (int)(&ch - L.chunks.data()), ch.col0, ch.col0 + ch.g);
            L.prot_local[ch.prot0 + p] = (int32_t)local;
            prev = (int)local;
        }
    }
}

}  // namespace wqe
