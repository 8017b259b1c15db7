// Every SIMD kernel (AVX2 on x86-64, NEON on AArch64: whichever set best_kernels() picks) against its scalar reference, and both against a double-precision dot of the
// dequantized weights, on random and adversarial row-blocks; then threaded matvec/matmul of a
// mixed-type linear against the same reference. Exit status 0 when all checks pass.
#include <atomic>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "blocks.h"
#include "rotation.h"
#include "common.h"
#include "linear.h"
#include "threadpool.h"

using namespace wqe;

static int n_pass = 0, n_fail = 0;

static void check(bool ok, const char* what, const char* detail = "") {
    if (ok) ++n_pass;
    else {
        ++n_fail;
        if (n_fail < 30) std::printf("FAIL %s %s\n", what, detail);
    }
}

static std::mt19937_64 rng(12345);
// The SIMD kernel set under test (K_AVX2 or K_NEON), 0 when this CPU/build has none.
static const int SIMD = best_kernels() != K_SCALAR ? best_kernels() : 0;
static const char* SIMD_NAME = SIMD == K_NEON ? "neon" : "avx2";
static float urand(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

enum Mode { RANDOM, EXTREME, ZERO, TINY };

// Fill one row-block of `action` for width g with n_p residuals.
static void make_rowblock(const BlockTraits& bt, int g, int n_p, Mode mode, uint8_t* rb) {
    const int g_pad = padded(g);
    const size_t n = row_bytes(bt, g, n_p);
    if (mode == ZERO) { std::memset(rb, 0, n); return; }
    for (size_t i = 0; i < n; ++i) rb[i] = (uint8_t)rng();
    auto put_h = [](uint8_t* p, float v) { uint16_t h = fp32_to_fp16(v); std::memcpy(p, &h, 2); };
    float scale = mode == EXTREME ? 65504.0f : mode == TINY ? 6.0e-8f : urand(1e-3f, 0.1f);
    if (bt.id == 0) {
        for (int c = 0; c < g_pad; ++c) put_h(rb + 2 * c, c < g ? urand(-1, 1) * (mode == EXTREME ? 65504.0f : 1.0f) : 0.0f);
    } else if (bt.header_bytes == 4) {
        put_h(rb, scale);
        put_h(rb + 2, mode == EXTREME ? -65504.0f : urand(-1, 1) * scale * 8);
    } else {
        put_h(rb, scale);
    }
    const size_t res = bt.header_bytes + bt.code_bytes(g_pad);
    for (int p = 0; p < n_p; ++p) put_h(rb + res + 2 * p, mode == EXTREME ? -65504.0f : urand(-0.5f, 0.5f));
}

static void chunk_tests() {
    const int widths[] = {1, 17, 32, 64, 96, 100, 128, 160, 200, 256, 512};
    const Mode modes[] = {RANDOM, RANDOM, EXTREME, ZERO, TINY};
    for (int id = 0; id < N_BLOCK_TYPES; ++id) {
        const BlockTraits& bt = *block_traits(id);
        for (int g : widths)
            for (int n_p : {0, 1, 5})
                for (Mode mode : modes) {
                    if (n_p > g) continue;
                    const int g_pad = padded(g);
                    const size_t rbn = row_bytes(bt, g, n_p);
                    std::vector<uint8_t> rb(rbn);
                    make_rowblock(bt, g, n_p, mode, rb.data());
                    // exact-size buffer: any read past the row-block would be caught by ASan builds
                    std::vector<int> prot;
                    for (int p = 0; p < n_p; ++p) prot.push_back((int)((p * 7919L + 3) % g));
                    std::sort(prot.begin(), prot.end());
                    prot.erase(std::unique(prot.begin(), prot.end()), prot.end());
                    const int np = (int)prot.size();
                    std::vector<float> x(g);
                    const float xs = mode == EXTREME ? 1e3f : 1.0f;
                    for (float& v : x) v = urand(-1, 1) * xs;
                    if (mode == TINY) for (float& v : x) v *= 1e-3f;

                    // dequant: scalar == AVX2 bit for bit
                    std::vector<float> ws(dequant_floats(g_pad) + 64), wa(dequant_floats(g_pad) + 64);
                    bt.dequant[K_SCALAR](rb.data(), g_pad, ws.data());
                    const size_t res = bt.header_bytes + bt.code_bytes(g_pad);
                    double ref = 0.0, mag = 0.0;
                    for (int c = 0; c < g; ++c) {
                        float w = ws[c];
                        for (int p = 0; p < np; ++p)
                            if (prot[p] == c) w += load_h(rb.data() + res + 2 * p);
                        ref += (double)w * x[c];
                        mag += std::fabs((double)w * x[c]);
                    }
                    char detail[160];
                    std::snprintf(detail, sizeof detail, "type=%s g=%d n_p=%d mode=%d", bt.name, g, np, (int)mode);
                    if (SIMD) {
                        bt.dequant[SIMD](rb.data(), g_pad, wa.data());
                        check(std::memcmp(ws.data(), wa.data(), sizeof(float) * g) == 0, SIMD == K_NEON ? "dequant neon==scalar" : "dequant avx2==scalar", detail);
                    }
                    std::vector<float> xc(x_floats(bt, g_pad) + 8);
                    const float xsum = prepare_x(bt, x.data(), g, xc.data());
                    double rsum = 0.0;
                    for (int p = 0; p < np; ++p) rsum += (double)load_h(rb.data() + res + 2 * p) * x[prot[p]];
                    const double ds = bt.dot[K_SCALAR](rb.data(), xc.data(), xsum, g_pad) + rsum;
                    // The affine form d*sum(qx) + m*sum(x) cancels differently from sum((dq+m)x): allow
                    // 1e-5 of the magnitude of the terms (|d q x| + |m x|).
                    double termmag = mag;
                    if (bt.two_level) {  // two-level: |D q| + |M| <= |w| + 2 |M|, M = dmin n_j <= 63 |dmin|
                        const double dm = 63.0 * std::fabs((double)load_h(rb.data() + 2));
                        termmag = 0.0;
                        for (int c = 0; c < g; ++c) termmag += (std::fabs((double)ws[c]) + 2 * dm) * std::fabs(x[c]);
                    } else if (bt.header_bytes == 4 || bt.id == 5) {
                        const float d = load_h(rb.data()), m = bt.header_bytes == 4 ? load_h(rb.data() + 2) : d;
                        termmag = 0.0;
                        for (int c = 0; c < g; ++c) termmag += (std::fabs(ws[c] - m) + 2 * std::fabs(m) + std::fabs(d)) * std::fabs(x[c]);
                    }
                    const double tol = 1e-5 * termmag + 1e-30;
                    // dot_rows over 3 copies of the row-block: AVX2 equals its dot bit for bit; the
                    // production scalar rows (dequantize, then float dot) agree within tol.
                    for (int kk : {(int)K_SCALAR, SIMD}) {
                        if (kk == 0) continue;
                        std::vector<uint8_t> three(3 * (rbn + 5));
                        for (int r = 0; r < 3; ++r) std::memcpy(&three[r * (rbn + 5)], rb.data(), rbn);
                        float out[3];
                        bt.dot_rows[kk](three.data(), rbn + 5, 3, xc.data(), xsum, g_pad, out);
                        const float one = bt.dot[kk](rb.data(), xc.data(), xsum, g_pad);
                        bool ok = true;
                        for (int r = 0; r < 3; ++r)
                            ok = ok && (kk != K_SCALAR ? out[r] == one : std::fabs((double)out[r] - one) <= tol);
                        check(ok, kk != K_SCALAR ? (SIMD == K_NEON ? "dot_rows == dot (neon)" : "dot_rows == dot (avx2)") : "dot_rows ~ dot (scalar)", detail);
                    }
                    check(std::fabs(ds - ref) <= tol, "dot scalar==dequant reference", detail);
                    if (SIMD) {
                        const double da = bt.dot[SIMD](rb.data(), xc.data(), xsum, g_pad) + rsum;
                        if (!(std::fabs(da - ds) <= tol)) {
                            std::snprintf(detail + std::strlen(detail), 60, " %s=%g scalar=%g tol=%g", SIMD_NAME, da, ds, tol);
                        }
                        check(std::fabs(da - ds) <= tol, SIMD == K_NEON ? "dot neon==scalar" : "dot avx2==scalar", detail);
                    }
                }
    }
}

// ------------------------------------------------------------------ int8 activations (ACT_Q8)
// XQ8 block holding chunk-local column c (the layouts of blocks.h).
static int block_of(const BlockTraits& bt, int g_pad, int c, int* slot) {
    if (bt.x_layout != X_TERNARY) { *slot = c % 32; return c / 32; }
    const int B = ternary_bytes(g_pad), nb = (B + 31) / 32, i = c / B, j = c % B;
    *slot = j % 32;
    return i * nb + j / 32;
}

// The int8 kernel sets to check: scalar, the SIMD set, and on AArch64 NEON with and without SDOT.
// x86: the AVX2 set without VNNI, then with the CPU's VNNI level where it has one (the q8 row kernels and the tile
// kernels use vpdpbusd there).
struct Q8Set { int k; bool dotprod; const char* name; int vnni = 0; };
static std::vector<Q8Set> q8_sets() {
    std::vector<Q8Set> v = {{K_SCALAR, false, "scalar"}};
    if (SIMD == K_AVX2) {
        v.push_back({K_AVX2, false, "avx2", 0});
        if (cpu_vnni()) v.push_back({K_AVX2, false, cpu_vnni() == 1 ? "avx2+avx512vnni" : "avx2+avxvnni", cpu_vnni()});
    }
    if (SIMD == K_NEON) {
        v.push_back({K_NEON, false, "neon"});
        if (cpu_has_dotprod()) v.push_back({K_NEON, true, "neon+dotprod"});
    }
    return v;
}
static void use_set(const Q8Set& s) {
    if (s.k == K_NEON) set_neon_dotprod(s.dotprod);
    if (s.k == K_AVX2) set_x86_vnni(s.vnni);
}

static int n_q8_sets_seen = 0;

static void q8_chunk_tests() {
    const int widths[] = {1, 17, 32, 64, 96, 100, 128, 160, 200, 256, 512};
    const Mode modes[] = {RANDOM, RANDOM, EXTREME, ZERO, TINY};
    const std::vector<Q8Set> sets = q8_sets();
    n_q8_sets_seen = (int)sets.size();
    for (int id = 0; id < N_BLOCK_TYPES; ++id) {
        const BlockTraits& bt = *block_traits(id);
        if (!bt.dot8[K_SCALAR]) {  // fp16: float in every set
            for (const Q8Set& s : sets) check(!bt.dot8[s.k] && !bt.dot8_rows[s.k], "q8: no int8 kernel for fp16", bt.name);
            continue;
        }
        for (const Q8Set& s : sets) check(bt.dot8[s.k] && bt.dot8_rows[s.k], "q8: int8 kernels present", bt.name);
        for (int g : widths)
            for (Mode mode : modes) {
                const int g_pad = padded(g);
                const size_t rbn = row_bytes(bt, g, 0);
                const int R = 6;  // 4-row path + tail
                std::vector<uint8_t> rows(R * rbn);
                for (int r = 0; r < R; ++r) make_rowblock(bt, g, 0, r == 2 && mode != ZERO ? RANDOM : mode, &rows[r * rbn]);
                std::vector<float> x(g);
                const float xs = mode == EXTREME ? 1e3f : 1.0f;
                for (float& v : x) v = urand(-1, 1) * xs;
                if (mode == TINY) for (float& v : x) v *= 1e-3f;
                if (g > 40) x[37] *= 50.0f;  // an outlier: its block's scale is coarse
                std::vector<XQ8> xq(x8_blocks(bt, g_pad));
                const float xsum = prepare_x8(bt, x.data(), g, xq.data());
                std::vector<float> xc(x_floats(bt, g_pad) + 8);
                prepare_x(bt, x.data(), g, xc.data());
                // the quantized activations: |x - d q| <= d / 2, |q| <= 127
                bool qok = true;
                for (int c = 0; c < g; ++c) {
                    int j;
                    const XQ8& b = xq[block_of(bt, g_pad, c, &j)];
                    qok = qok && std::abs((int)b.q[j]) <= 127 && std::fabs(x[c] - b.d * b.q[j]) <= 0.5001f * b.d + 1e-30f;
                }
                char detail[160];
                std::snprintf(detail, sizeof detail, "type=%s g=%d mode=%d", bt.name, g, (int)mode);
                check(qok, "q8: activation quantization error <= d/2", detail);
                std::vector<float> w(dequant_floats(g_pad) + 64);
                double rowtol[R];
                for (int r = 0; r < R; ++r) {
                    const uint8_t* rb = &rows[r * rbn];
                    bt.dequant[K_SCALAR](rb, g_pad, w.data());
                    // off = the code's offset in w (w = d q + m, ternary w = a (t - 1)): |code term| = |w - off|
                    // two-level kinds: the int8 dot is sum_c w_c x^_c (sub-block mins times XQ8::ds), off = 0
                    const double off = bt.two_level ? 0.0 : bt.id == 5 ? -(double)load_h(rb) : (double)load_h(rb + 2);
                    const double dm = bt.two_level ? 126.0 * std::fabs((double)load_h(rb + 2)) : 0.0;
                    double bound = 0.0, mag = 0.0;
                    for (int c = 0; c < g; ++c) {
                        int j;
                        const XQ8& b = xq[block_of(bt, g_pad, c, &j)];
                        const double qt = std::fabs((double)w[c] - off);
                        bound += qt * 0.5 * b.d;
                        mag += (qt + dm) * (std::fabs(x[c]) + 0.5 * b.d) + std::fabs(off * x[c]);
                    }
                    const double tol = 1e-5 * mag + 1e-30;
                    rowtol[r] = tol;
                    const double ref = bt.dot[K_SCALAR](rb, xc.data(), xsum, g_pad);  // float activations
                    const double s8 = bt.dot8[K_SCALAR](rb, xq.data(), xsum, g_pad);
                    char d2[224];
                    std::snprintf(d2, sizeof d2, "%s row=%d s8=%g f32=%g bound=%g", detail, r, s8, ref, bound);
                    check(std::fabs(s8 - ref) <= bound * 1.0001 + 2 * tol, "q8: scalar int8 dot within the quantization bound of the float dot", d2);
                    for (const Q8Set& s : sets) {
                        if (s.k == K_SCALAR) continue;
                        use_set(s);
                        const double v = bt.dot8[s.k](rb, xq.data(), xsum, g_pad);
                        char d3[256];
                        std::snprintf(d3, sizeof d3, "%s set=%s simd=%g scalar=%g tol=%g", detail, s.name, v, s8, tol);
                        check(std::fabs(v - s8) <= tol, "q8: simd int8 dot == scalar int8 dot (exact integer sums)", d3);
                    }
                }
                float avx2_out[R];  // x86: the VNNI rows == the AVX2 rows, bit for bit
                bool avx2_seen = false;
                for (const Q8Set& s : sets) {
                    use_set(s);
                    float out[R];
                    bt.dot8_rows[s.k](rows.data(), rbn, R, xq.data(), xsum, g_pad, out);
                    if (s.k == K_AVX2) {
                        if (avx2_seen) check(std::memcmp(out, avx2_out, sizeof out) == 0, "q8: VNNI dot8_rows == AVX2 bit for bit", detail);
                        std::memcpy(avx2_out, out, sizeof out);
                        avx2_seen = true;
                    }
                    bool ok = true;
                    for (int r = 0; r < R; ++r) {
                        const float one = bt.dot8[s.k](&rows[r * rbn], xq.data(), xsum, g_pad);
                        const float ref = bt.dot8[K_SCALAR](&rows[r * rbn], xq.data(), xsum, g_pad);
                        ok = ok && std::fabs((double)out[r] - one) <= rowtol[r] && std::fabs((double)out[r] - ref) <= rowtol[r];
                    }
                    char d3[200];
                    std::snprintf(d3, sizeof d3, "%s set=%s", detail, s.name);
                    check(ok, "q8: dot8_rows == dot8", d3);
                }
                for (const Q8Set& s : sets) use_set(s);  // leave the default (last = best) selected
            }
    }
}

static void vec_tests() {
    if (!SIMD) return;
    const VecOps& s = vec_ops(K_SCALAR);
    const VecOps& a = vec_ops(SIMD);
    for (int n : {1, 7, 8, 9, 31, 64, 100, 513}) {
        std::vector<float> x(n), y(n), y2(n);
        std::vector<uint8_t> h(2 * n);
        for (int i = 0; i < n; ++i) {
            x[i] = urand(-1, 1);
            y[i] = urand(-1, 1);
            const uint16_t v = fp32_to_fp16(urand(-2, 2));
            std::memcpy(&h[2 * i], &v, 2);
        }
        double mag = 0;
        for (int i = 0; i < n; ++i) mag += std::fabs(x[i] * y[i]);
        check(std::fabs(s.dot_f32(x.data(), y.data(), n) - a.dot_f32(x.data(), y.data(), n)) <= 1e-5 * mag + 1e-30, "dot_f32");
        check(std::fabs(s.dot_f16(h.data(), x.data(), n) - a.dot_f16(h.data(), x.data(), n)) <= 1e-5 * 2 * n + 1e-30, "dot_f16");
        {  // dot_f16_rows: 6 rows (the 4-row path and a tail) against the scalar dot_f16 of each row
            std::vector<uint8_t> hr(6 * (2 * n + 6));
            for (size_t i = 0; i < hr.size(); i += 2) { const uint16_t v = fp32_to_fp16(urand(-2, 2)); std::memcpy(&hr[i], &v, 2); }
            float o[6];
            a.dot_f16_rows(hr.data(), 2 * n + 6, 6, x.data(), n, o);
            bool ok = true;
            for (int r = 0; r < 6; ++r)
                ok = ok && std::fabs(o[r] - s.dot_f16(&hr[r * (2 * n + 6)], x.data(), n)) <= 1e-5 * 2 * n + 1e-30;
            check(ok, "dot_f16_rows");
        }
        std::vector<float> fs(n), fa(n);
        s.f16_to_f32(h.data(), fs.data(), n);
        a.f16_to_f32(h.data(), fa.data(), n);
        check(std::memcmp(fs.data(), fa.data(), 4 * n) == 0, "f16_to_f32");
        y2 = y;
        s.axpy(0.5f, x.data(), y.data(), n);
        a.axpy(0.5f, x.data(), y2.data(), n);
        bool ok = true;
        for (int i = 0; i < n; ++i) ok = ok && std::fabs(y[i] - y2[i]) <= 1e-6f;
        check(ok, "axpy");
    }
    // gemm4
    for (int nt : {1, 2, 3, 4, 7}) {
        const int K = 72, nr = 3;
        std::vector<float> W(4 * K, 0.0f), X(nt * K), Ys(nt * 4), Ya(nt * 4);
        for (int i = 0; i < nr * K; ++i) W[i] = urand(-1, 1);
        for (float& v : X) v = urand(-1, 1);
        s.gemm4(W.data(), K, X.data(), K, nt, K, Ys.data(), 4, nr);
        a.gemm4(W.data(), K, X.data(), K, nt, K, Ya.data(), 4, nr);
        bool ok = true;
        for (int t = 0; t < nt; ++t)
            for (int r = 0; r < nr; ++r) ok = ok && std::fabs(Ys[t * 4 + r] - Ya[t * 4 + r]) <= 1e-4f;
        check(ok, "gemm4");
    }
}

// A mixed linear: every block type once, a ragged last chunk, protected columns.
// The pool runs every task exactly once, whatever the task and thread counts (spans of unequal size, empty spans,
// more threads than tasks), over many jobs in a row (a late worker must never run a task of a finished job).
static void threadpool_tests() {
    for (int threads : {1, 2, 3, 5}) {
        ThreadPool pool(threads);
        bool ok = true, ids_ok = true;
        for (int n : {1, 2, 3, 4, 7, 16, 33, 1000}) {
            for (int job = 0; job < 50; ++job) {
                std::vector<std::atomic<int>> hits(n);
                for (auto& h : hits) h.store(0);
                pool.run(n, [&](int task, int thread) {
                    hits[task].fetch_add(1);
                    if (thread < 0 || thread >= threads) ids_ok = false;
                });
                for (auto& h : hits) ok = ok && h.load() == 1;
            }
        }
        char what[64];
        std::snprintf(what, sizeof what, "threadpool %d threads: every task once", threads);
        check(ok && ids_ok, what);
    }
}

static void linear_tests() {
    const int G = 64, N = 37;
    const int types[] = {0, 1, 2, 3, 4, 5, 6, 2};
    const int n_chunks = 8;
    const int K = G * (n_chunks - 1) + 36;  // ragged
    Linear L;
    L.kind = Linear::CHUNKED;
    L.N = N;
    L.K = K;
    size_t off = 0;
    int xoff = 0, prot0 = 0;
    for (int c = 0; c < n_chunks; ++c) {
        Chunk ch;
        ch.bt = block_traits(types[c]);
        ch.col0 = c * G;
        ch.g = std::min(G, K - ch.col0);
        ch.g_pad = padded(ch.g);
        ch.n_prot = c % 3 == 1 ? 2 : 0;
        ch.prot0 = prot0;
        for (int p = 0; p < ch.n_prot; ++p) L.prot_local.push_back(5 + 11 * p);
        prot0 += ch.n_prot;
        ch.off = off;
        ch.res_off = ch.bt->header_bytes + ch.bt->code_bytes(ch.g_pad);
        ch.xoff = xoff;
        xoff += round8(x_floats(*ch.bt, ch.g_pad));
        off += row_bytes(*ch.bt, ch.g, ch.n_prot);
        L.max_g_pad = std::max(L.max_g_pad, ch.g_pad);
        L.chunks.push_back(ch);
    }
    L.row_bytes = off;
    L.x_floats = xoff;
    std::vector<uint8_t> data(off * N);
    for (int r = 0; r < N; ++r)
        for (const Chunk& ch : L.chunks) make_rowblock(*ch.bt, ch.g, ch.n_prot, r == 3 ? ZERO : RANDOM, &data[r * off + ch.off]);
    L.data = data.data();

    // Reference: dequantize (scalar) then double dots.
    std::vector<float> Wd((size_t)N * (round8(K) + 64));
    std::vector<float> tmp(dequant_floats(64) + 64);
    dequant_rows(L, 0, N, Wd.data(), round8(K) + 64, tmp.data(), K_SCALAR);
    const int n_tok = 5;
    std::vector<float> X((size_t)n_tok * K);
    for (float& v : X) v = urand(-1, 1);
    for (int kern : {(int)K_SCALAR, SIMD}) {
        if (kern == 0) continue;
        for (int threads : {1, 2, 3}) {
            ThreadPool pool(threads);
            MatScratch ms;
            ms.reserve(threads, K, 64, L.x_floats, n_chunks);
            std::vector<float> Y((size_t)n_tok * N), y(N);
            matmul(L, X.data(), n_tok, Y.data(), pool, ms, kern);
            bool ok_mm = true, ok_mv = true;
            for (int t = 0; t < n_tok; ++t) {
                matvec(L, &X[(size_t)t * K], y.data(), pool, ms, kern);
                for (int r = 0; r < N; ++r) {
                    double ref = 0, mag = 0;
                    for (int k = 0; k < K; ++k) {
                        ref += (double)Wd[(size_t)r * (round8(K) + 64) + k] * X[(size_t)t * K + k];
                        mag += std::fabs((double)Wd[(size_t)r * (round8(K) + 64) + k] * X[(size_t)t * K + k]) + 1e-3;
                    }
                    ok_mm = ok_mm && std::fabs(Y[(size_t)t * N + r] - ref) <= 1e-5 * mag;
                    ok_mv = ok_mv && std::fabs(y[r] - ref) <= 1e-4 * mag;
                }
            }
            char d[64];
            std::snprintf(d, sizeof d, "kernels=%d threads=%d", kern, threads);
            check(ok_mm, "matmul mixed linear", d);
            check(ok_mv, "matvec mixed linear", d);
        }
    }
    // ACT_Q8: matvec against a double reference that uses the same int8 activations for the code
    // terms (affine (w - m) x^, ternary (w + a) x^, x^ = d_b q) and the float ones for the rest
    // (m sum x, a sum x, fp16 chunks, protected columns).
    const int ld = round8(K) + 64;
    for (const Q8Set& qs : q8_sets()) {
        use_set(qs);
        for (int threads : {1, 2, 3}) {
            ThreadPool pool(threads);
            MatScratch ms;
            ms.reserve(threads, K, 64, L.x_floats, n_chunks);
            std::vector<float> y(N);
            bool ok = true, eq = true;
            for (int t = 0; t < n_tok; ++t) {
                const float* x = &X[(size_t)t * K];
                matvec(L, x, y.data(), pool, ms, qs.k, ACT_Q8);
                std::vector<float> y2(N);
                matmul(L, x, 1, y2.data(), pool, ms, qs.k, ACT_Q8);
                eq = eq && std::memcmp(y.data(), y2.data(), sizeof(float) * N) == 0;
                {  // the grouped pass (q/k/v in decode) == separate products, bit for bit
                    std::vector<float> g0(N), g1(N), g2(N);
                    const Linear* Ws[3] = {&L, &L, &L};
                    float* Ys[3] = {g0.data(), g1.data(), g2.data()};
                    matvec_group(3, Ws, x, Ys, pool, ms, qs.k, ACT_Q8);
                    eq = eq && std::memcmp(y.data(), g0.data(), sizeof(float) * N) == 0 &&
                         std::memcmp(y.data(), g2.data(), sizeof(float) * N) == 0;
                    matvec(L, x, g1.data(), pool, ms, qs.k, ACT_F32);
                    matvec_group(2, Ws, x, Ys, pool, ms, qs.k, ACT_F32);
                    eq = eq && std::memcmp(g1.data(), g0.data(), sizeof(float) * N) == 0;
                }
                for (int r = 0; r < N; ++r) {
                    double ref = 0, mag = 0;
                    for (const Chunk& ch : L.chunks) {
                        const uint8_t* rb = L.row(r) + ch.off;
                        std::vector<double> wres(ch.g, 0.0);  // protected residuals
                        for (int p = 0; p < ch.n_prot; ++p) wres[L.prot_local[ch.prot0 + p]] = load_h(rb + ch.res_off + 2 * p);
                        const double* wr = wres.data();
                        const float* wd = &Wd[(size_t)r * ld + ch.col0];
                        if (ch.bt->id == 0) {
                            for (int c = 0; c < ch.g; ++c) { ref += (double)wd[c] * x[ch.col0 + c]; mag += std::fabs(wd[c] * x[ch.col0 + c]); }
                            continue;
                        }
                        std::vector<XQ8> xq(x8_blocks(*ch.bt, ch.g_pad));
                        prepare_x8(*ch.bt, x + ch.col0, ch.g, xq.data());
                        const double off = ch.bt->id == 5 ? -(double)load_h(rb) : (double)load_h(rb + 2);
                        for (int c = 0; c < ch.g; ++c) {
                            int j;
                            const XQ8& b = xq[block_of(*ch.bt, ch.g_pad, c, &j)];
                            const double xh = (double)b.d * b.q[j], xv = x[ch.col0 + c];
                            const double code = (double)wd[c] - wr[c] - off;  // Wd includes the residual
                            ref += code * xh + off * xv + wr[c] * xv;
                            mag += std::fabs(code * xh) + std::fabs(off * xv) + std::fabs(wr[c] * xv);
                        }
                    }
                    ok = ok && std::fabs(y[r] - ref) <= 1e-4 * mag + 1e-6;
                }
            }
            char d[80];
            std::snprintf(d, sizeof d, "set=%s threads=%d", qs.name, threads);
            check(ok, "matvec mixed linear, ACT_Q8", d);
            check(eq, "matmul(n = 1, ACT_Q8) == matvec(ACT_Q8) == matvec_group", d);
        }
    }
    for (const Q8Set& qs : q8_sets()) use_set(qs);
}

static void fp16_tests() {
    // fp32_to_fp16 o fp16_to_fp32 is the identity on all finite halves.
    bool ok = true;
    for (uint32_t h = 0; h < 65536; ++h) {
        if (((h >> 10) & 0x1F) == 0x1F) continue;
        const float f = fp16_to_fp32((uint16_t)h);
        ok = ok && fp32_to_fp16(f) == (uint16_t)h;
    }
    check(ok, "fp16 round trip");
}

// Non-finite activations (a corrupt file) must not reach a float -> int conversion in the int8
// activation quantizer (undefined behaviour; the sanitizer build of this test traps on it): every code
// stays in [-127, 127] and the chunk's sum stays non-finite, so the NaN reaches the output.
static void q8_nonfinite_tests() {
    const BlockTraits& bt = *block_traits(2);  // q4, plain layout
    for (float bad : {NAN, INFINITY, -INFINITY}) {
        std::vector<float> x(64, 0.5f);
        x[3] = bad;
        x[40] = bad;
        std::vector<XQ8> xq(x8_blocks(bt, 64));
        const float s = prepare_x8(bt, x.data(), 64, xq.data());
        bool in_range = true;
        for (const XQ8& b : xq)
            for (int j = 0; j < 32; ++j) in_range = in_range && b.q[j] >= -127 && b.q[j] <= 127;
        check(in_range && !std::isfinite(s), "q8: non-finite activations quantize to defined codes");
    }
}

// The SIMD set's int8 activation quantizer (VecOps::quant_x8, prepare_x8's plain layout) against the scalar one,
// bit for bit: d, ds and the 32 codes of every block and the returned sum, for ragged widths (tails padded with
// zeros), grid steps, all-zero blocks, signed zeros, huge and subnormal values, and NaN / Inf (the same defined codes
// on both sides). The sum's order (sum_lanes8) is checked against a plain double sum: within 1e-12 of the
// values' magnitude.
static void quant_x8_tests() {
    if (!SIMD) return;
    const VecOps& ref = vec_ops(K_SCALAR);
    const VecOps& simd = vec_ops(SIMD);
    int n_checked = 0;
    for (int g : {1, 5, 8, 31, 32, 33, 64, 100, 128, 129, 255, 256, 1000, 2048, 5632})
        for (int mode = 0; mode < 6; ++mode) {
            std::vector<float> x(g);
            for (float& v : x) v = urand(-2, 2) * (urand(0, 1) < 0.03f ? 50.0f : 1.0f);
            float step = 0.0f;
            if (mode == 1) step = act_fake_quant(x.data(), g, 4);
            if (mode == 2) step = act_fake_quant(x.data(), g, 6);
            if (mode == 3)  // zero blocks and signed zeros, huge and subnormal values
                for (int c = 0; c < g; ++c) x[c] = c < 40 ? (c % 2 ? -0.0f : 0.0f) : c % 7 == 0 ? 3e38f : c % 5 == 0 ? 1e-40f : x[c];
            if (mode == 4 || mode == 5) x[g / 2] = mode == 4 ? NAN : -INFINITY;
            const int nb = padded(g) / 32;
            std::vector<XQ8> a(nb), b(nb);
            std::memset(a.data(), 0x5A, sizeof(XQ8) * nb);
            std::memset(b.data(), 0xA5, sizeof(XQ8) * nb);
            const float sa = ref.quant_x8(x.data(), g, a.data(), step);
            const float sb = simd.quant_x8(x.data(), g, b.data(), step);
            bool same = std::memcmp(&sa, &sb, sizeof sa) == 0;
            for (int k = 0; k < nb; ++k)
                same = same && std::memcmp(&a[k].d, &b[k].d, 4) == 0 && std::memcmp(&a[k].ds, &b[k].ds, 4) == 0 &&
                       std::memcmp(a[k].q, b[k].q, 32) == 0;
            char d[96];
            std::snprintf(d, sizeof d, "g=%d mode=%d %s", g, mode, SIMD_NAME);
            check(same, "quant_x8: the SIMD set bit-identical to the scalar reference", d);
            if (mode < 3) {
                double plain = 0.0, mag = 0.0;
                for (float v : x) plain += v, mag += std::fabs(v);
                check(std::fabs(sum_lanes8(x.data(), g) - plain) <= 1e-12 * mag, "sum_lanes8 = the plain double sum", d);
            }
            ++n_checked;
        }
    std::printf("quant_x8: %d widths x modes checked bit for bit against the scalar reference\n", n_checked);
}

// RUQuant's activation quantizer (VecOps::fake_quant) against the scalar one, bit for bit: the step it returns and
// every value, at 4 and 6 bits, for ragged lengths (the vector tails), outliers, constant and all-zero vectors, signed
// zeros, values on a grid (ties to round half to even), and a NaN after the first value (passed over by min and max on
// both sides) or as the first (then every value is a NaN on both sides, not necessarily the same NaN).
static void fake_quant_tests() {
    if (!SIMD) return;
    const VecOps& ref = vec_ops(K_SCALAR);
    const VecOps& simd = vec_ops(SIMD);
    int n_checked = 0;
    for (int n : {1, 3, 4, 7, 8, 9, 31, 32, 100, 512, 576, 1408, 2051})
        for (int bits : {4, 6})
            for (int mode = 0; mode < 7; ++mode) {
                std::vector<float> x(n);
                for (float& v : x) v = urand(-2, 2) * (urand(0, 1) < 0.03f ? 50.0f : 1.0f);
                if (mode == 1) std::fill(x.begin(), x.end(), 0.75f);  // constant: hi - lo = 0, the 1e-8 floor
                if (mode == 2)
                    for (int i = 0; i < n; ++i) x[i] = i % 2 ? -0.0f : 0.0f;
                if (mode == 3)  // halves of a grid step: round half to even decides
                    for (int i = 0; i < n; ++i) x[i] = 0.5f * (float)(i % 31) - 3.0f;
                if (mode == 4) x[n / 2] = 3e38f, x[0] = -1e-40f;
                if (mode == 5 && n > 1) x[n - 1] = NAN;
                if (mode == 6) x[0] = NAN;
                std::vector<float> a = x, b = x;
                const float sa = ref.fake_quant(a.data(), n, bits), sb = simd.fake_quant(b.data(), n, bits);
                bool same = std::memcmp(&sa, &sb, sizeof sa) == 0 && std::memcmp(a.data(), b.data(), sizeof(float) * n) == 0;
                if (mode == 6) {  // all NaN on both sides (which NaN, its sign and payload, follows operand order)
                    same = std::isnan(sa) && std::isnan(sb);
                    for (int i = 0; i < n; ++i) same = same && std::isnan(a[i]) && std::isnan(b[i]);
                }
                char d[96];
                std::snprintf(d, sizeof d, "n=%d bits=%d mode=%d %s", n, bits, mode, SIMD_NAME);
                check(same, "fake_quant: the SIMD set bit-identical to the scalar reference", d);
                ++n_checked;
            }
    std::printf("fake_quant: %d lengths x bits x modes checked bit for bit against the scalar reference\n", n_checked);
}

// SwiGLU's gate (VecOps::silu_mul): the SIMD set's polynomial exp against the scalar std::exp, within 1e-6 of the
// result's magnitude (plus 1e-30 for results that underflow), over g in [-100, 100] (both clamps of the exp), ragged
// lengths (the vector tail); non-finite inputs give non-finite outputs on both sides.
static void silu_tests() {
    if (!SIMD) return;
    const VecOps& ref = vec_ops(K_SCALAR);
    const VecOps& simd = vec_ops(SIMD);
    double worst = 0.0;
    for (int n : {1, 3, 8, 13, 64, 1408, 5632}) {
        std::vector<float> g(n), u(n);
        for (int i = 0; i < n; ++i) {
            g[i] = i % 9 == 0 ? urand(-100, 100) : urand(-12, 12);
            u[i] = urand(-3, 3);
        }
        if (n > 8) g[3] = 0.0f, g[4] = -0.0f, g[5] = 88.0f, g[6] = -88.0f, g[7] = 1e-30f;
        std::vector<float> a = g, b = g;
        ref.silu_mul(a.data(), u.data(), n);
        simd.silu_mul(b.data(), u.data(), n);
        bool ok = true;
        for (int i = 0; i < n; ++i) {
            const double err = std::fabs((double)a[i] - b[i]), tol = 1e-6 * std::fabs(a[i]) + 1e-30;
            ok = ok && std::isfinite(b[i]) && err <= tol;
            if (std::fabs(a[i]) > 1e-30f) worst = std::max(worst, err / std::fabs(a[i]));
        }
        char d[64];
        std::snprintf(d, sizeof d, "n=%d %s", n, SIMD_NAME);
        check(ok, "silu_mul: the SIMD set within 1e-6 of the scalar reference", d);
    }
    for (float bad : {NAN, INFINITY, -INFINITY}) {
        std::vector<float> g(16, 1.0f), u(16, 1.0f);
        g[9] = bad;
        std::vector<float> a = g, b = g;
        ref.silu_mul(a.data(), u.data(), 16);
        simd.silu_mul(b.data(), u.data(), 16);
        check(!std::isfinite(a[9]) && !std::isfinite(b[9]) && b[8] == a[8], "silu_mul: a non-finite input stays non-finite");
    }
    std::printf("silu_mul: %s within %.2g (relative) of the scalar reference\n", SIMD_NAME, worst);
}

// Attention (VecOps::att_scores, exp_sum, att_values) against the scalar set: head widths that are and are not
// multiples of the vector width, 1-5 heads, 1-67 positions (ragged key groups and tails), padded row strides.
// Scores and outputs within 1e-5 of their magnitude (sums of products in another order); exp within 1e-6 relative.
// Each head's results must not depend on how many heads a call takes (decode and prefill split heads differently).
static void attention_tests() {
    if (!SIMD) return;
    const VecOps& ref = vec_ops(K_SCALAR);
    const VecOps& simd = vec_ops(SIMD);
    double worst_s = 0.0, worst_e = 0.0, worst_o = 0.0;
    for (int hd : {64, 128, 80, 36, 100, 7})
        for (int nq : {1, 2, 3, 5})
            for (int n : {1, 3, 4, 9, 67}) {
                const size_t ks = (size_t)hd * 3 + 5, ldp = (size_t)n + 3;
                std::vector<float> q((size_t)nq * hd), K((size_t)n * ks), V((size_t)n * ks);
                for (float& v : q) v = urand(-2, 2);
                for (float& v : K) v = urand(-2, 2);
                for (float& v : V) v = urand(-2, 2);
                std::vector<float> sa((size_t)nq * ldp, 0.0f), sb = sa;
                ref.att_scores(q.data(), nq, hd, K.data(), ks, n, 0.125f, sa.data(), ldp);
                simd.att_scores(q.data(), nq, hd, K.data(), ks, n, 0.125f, sb.data(), ldp);
                bool ok = true, same_alone = true;
                for (int j = 0; j < nq; ++j) {
                    std::vector<float> one(ldp, 0.0f);   // head j alone
                    simd.att_scores(q.data() + (size_t)j * hd, 1, hd, K.data(), ks, n, 0.125f, one.data(), ldp);
                    for (int s = 0; s < n; ++s) {
                        const float a = sa[(size_t)j * ldp + s], b = sb[(size_t)j * ldp + s];
                        const double err = std::fabs((double)a - b);
                        ok = ok && err <= 1e-5 * (1.0 + std::fabs(a));
                        worst_s = std::max(worst_s, err / (1.0 + std::fabs(a)));
                        same_alone = same_alone && one[s] == b;
                    }
                }
                char d[80];
                std::snprintf(d, sizeof d, "hd=%d nq=%d n=%d %s", hd, nq, n, SIMD_NAME);
                check(ok, "att_scores: the SIMD set within 1e-5 of the scalar reference", d);
                check(same_alone, "att_scores: a head's scores do not depend on the heads beside it", d);
                // softmax numerators of head 0's scores
                std::vector<float> ea(sa.begin(), sa.begin() + n), eb = ea;
                float mx = -INFINITY;
                for (float v : ea) mx = std::max(mx, v);
                const float suma = ref.exp_sum(ea.data(), n, mx), sumb = simd.exp_sum(eb.data(), n, mx);
                bool eok = std::fabs((double)suma - sumb) <= 1e-6 * suma;
                for (int s = 0; s < n; ++s) {
                    eok = eok && std::fabs((double)ea[s] - eb[s]) <= 1e-6 * ea[s] + 1e-30;
                    worst_e = std::max(worst_e, std::fabs((double)ea[s] - eb[s]) / ea[s]);
                }
                check(eok, "exp_sum: the SIMD set within 1e-6 of the scalar reference", d);
                // weighted sums of V rows, accumulated onto a start value
                std::vector<float> P((size_t)nq * ldp);
                for (float& v : P) v = urand(0, 1);
                std::vector<float> oa((size_t)nq * hd), ob;
                for (float& v : oa) v = urand(-1, 1);
                ob = oa;
                std::vector<float> start = oa;
                ref.att_values(P.data(), ldp, nq, hd, V.data(), ks, n, oa.data());
                simd.att_values(P.data(), ldp, nq, hd, V.data(), ks, n, ob.data());
                bool vok = true, valone = true;
                for (int j = 0; j < nq; ++j) {
                    std::vector<float> one(start.begin() + (size_t)j * hd, start.begin() + (size_t)(j + 1) * hd);
                    simd.att_values(P.data() + (size_t)j * ldp, ldp, 1, hd, V.data(), ks, n, one.data());
                    for (int e = 0; e < hd; ++e) {
                        const float a = oa[(size_t)j * hd + e], b = ob[(size_t)j * hd + e];
                        const double err = std::fabs((double)a - b);
                        vok = vok && err <= 1e-5 * (1.0 + std::fabs(a));
                        worst_o = std::max(worst_o, err / (1.0 + std::fabs(a)));
                        valone = valone && one[e] == b;
                    }
                }
                check(vok, "att_values: the SIMD set within 1e-5 of the scalar reference", d);
                check(valone, "att_values: a head's output does not depend on the heads beside it", d);
            }
    std::printf("attention: %s within %.2g (scores) / %.2g (exp) / %.2g (values) of the scalar reference\n", SIMD_NAME,
                worst_s, worst_e, worst_o);
}

#if defined(__x86_64__) || defined(__i386__)
#include "kernels_x86.h"

// The AVX-512 attention kernels (what vec_ops(K_AVX2) runs where the CPU has AVX-512) against the AVX2 ones, bit for
// bit, on float and fp16 rows: head widths below, at and past multiples of 8, 16 and 64 (the scores' tail columns; the
// values' columns past the last 64 go to the AVX2 kernel), 1-9 heads (runs of four, the scores' rest through AVX2's),
// key counts around the 8 a pass takes, padded row strides; and
// vec_ops(K_AVX2) gives those bits with the switch on and off (system_info names the kernels in use).
static void attention_avx512_tests() {
    if (!cpu_has_avx512()) {
        std::printf("attention AVX-512: not run (this CPU has no AVX-512)\n");
        return;
    }
    int cases = 0;
    for (int hd : {64, 128, 80, 36, 100, 7, 16, 144, 200})
        for (int nq : {1, 2, 3, 4, 5, 7, 8, 9})
            for (int n : {1, 3, 8, 9, 17, 67}) {
                const size_t ks = (size_t)hd * 2 + 3, ldp = (size_t)n + 5;
                std::vector<float> q((size_t)nq * hd), Kf((size_t)n * ks), Vf((size_t)n * ks), P((size_t)nq * ldp), O0((size_t)nq * hd);
                std::vector<uint16_t> Kh(Kf.size()), Vh(Vf.size());
                for (float& v : q) v = urand(-2, 2);
                for (size_t i = 0; i < Kf.size(); ++i) {
                    Kf[i] = urand(-2, 2);
                    Vf[i] = urand(-2, 2);
                    Kh[i] = fp32_to_fp16(urand(-2, 2));
                    Vh[i] = fp32_to_fp16(urand(-2, 2));
                }
                for (float& v : P) v = urand(0, 1);
                for (float& v : O0) v = urand(-1, 1);
                std::vector<float> sa((size_t)nq * ldp, 0.0f), sb = sa, sc = sa, sd = sa;
                avx2::att_scores(q.data(), nq, hd, Kf.data(), ks, n, 0.125f, sa.data(), ldp);
                avx2::z512::att_scores(q.data(), nq, hd, Kf.data(), ks, n, 0.125f, sb.data(), ldp);
                avx2::att_scores_h(q.data(), nq, hd, Kh.data(), ks, n, 0.125f, sc.data(), ldp);
                avx2::z512::att_scores_h(q.data(), nq, hd, Kh.data(), ks, n, 0.125f, sd.data(), ldp);
                char d[64];
                std::snprintf(d, sizeof d, "hd=%d nq=%d n=%d", hd, nq, n);
                check(sa == sb, "att_scores: AVX-512 bit-identical to AVX2", d);
                check(sc == sd, "att_scores_h: AVX-512 bit-identical to AVX2", d);
                ++cases;
                // values: AVX2's take one or two heads a call (pairs here, as att_values_pairs runs them), AVX-512's any
                std::vector<float> oa = O0, ob = O0, oc = O0, od = O0;
                for (int j = 0; j < nq; j += 2) {
                    const int nh = std::min(2, nq - j);
                    avx2::att_values(P.data() + j * ldp, ldp, nh, hd, Vf.data(), ks, n, oa.data() + (size_t)j * hd);
                    avx2::att_values_h(P.data() + j * ldp, ldp, nh, hd, Vh.data(), ks, n, oc.data() + (size_t)j * hd);
                }
                avx2::z512::att_values(P.data(), ldp, nq, hd, Vf.data(), ks, n, ob.data());
                avx2::z512::att_values_h(P.data(), ldp, nq, hd, Vh.data(), ks, n, od.data());
                check(oa == ob, "att_values: AVX-512 bit-identical to AVX2", d);
                check(oc == od, "att_values_h: AVX-512 bit-identical to AVX2", d);
                if (hd == 64 && (nq == 2 || nq == 5) && n == 67) {  // through the set's table, the switch on and off
                    const bool was = avx512_attention();
                    for (bool on : {true, false}) {
                        std::vector<float> oe = O0;
                        check(set_avx512_attention(on), "set_avx512_attention: accepted on a CPU with AVX-512", on ? "on" : "off");
                        vec_ops(K_AVX2).att_values(P.data(), ldp, nq, hd, Vf.data(), ks, n, oe.data());
                        check(oe == ob, "vec_ops(K_AVX2).att_values: the same bits with the AVX-512 kernels on and off", on ? "on" : "off");
                        check(std::strstr(system_info(), on ? "attention=avx512" : "attention=avx2") != nullptr,
                              "system_info: names the attention kernels in use", system_info());
                    }
                    set_avx512_attention(was);
                }
            }
    std::printf("attention AVX-512: scores and values bit-identical to AVX2 in %d cases (float and fp16 rows), %s\n", cases,
                avx512_attention() ? "in use" : "not in use (WQEDGE_AVX512_ATTENTION=0)");
}
#else
static void attention_avx512_tests() {}
#endif

// VecOps::f32_to_f16 (the fp16 KV cache's writes) against the scalar fp32_to_fp16, bit for bit on every non-NaN value:
// random magnitudes from 2^-30 (subnormal halves, and below: zero) to 2^17 (overflow to infinity), exact ties between
// two halves (round to even), the largest finite half and the first value that rounds past it, signed zeros and
// infinities; NaN stays NaN. Lengths that leave a scalar tail.
static void f32_to_f16_tests() {
    std::vector<float> x;
    for (int i = 0; i < 4000; ++i) x.push_back((urand(0, 1) < 0.5f ? -1.0f : 1.0f) * std::ldexp(urand(1, 2), (int)urand(-30, 17)));
    for (int e = -24; e < 16; ++e)  // ties: a half's value plus half its last place (both parities of the mantissa)
        for (uint32_t m : {0u, 1u, 2u, 3u, 1023u}) {
            const float lo = std::ldexp(1.0f + m / 1024.0f, e), ulp = std::ldexp(1.0f, e - 10);
            x.push_back(lo + 0.5f * ulp);
            x.push_back(-(lo + 0.5f * ulp));
        }
    for (float v : {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, INFINITY, -INFINITY, 5.96e-8f, 2.98e-8f, 2.99e-8f,
                    6.1035156e-05f, 6.1e-05f})
        x.push_back(v);
    x.push_back(NAN);
    std::vector<int> sets = {K_SCALAR};
    if (SIMD) sets.push_back(SIMD);
    for (int n : {(int)x.size(), 1, 7, 13}) {
        std::vector<uint8_t> ref((size_t)2 * n);
        for (int i = 0; i < n; ++i) {
            const uint16_t h = fp32_to_fp16(x[i]);
            std::memcpy(&ref[(size_t)2 * i], &h, 2);
        }
        for (int set : sets) {
            std::vector<uint8_t> got((size_t)2 * n, 0xAB);
            vec_ops(set).f32_to_f16(x.data(), got.data(), n);
            bool same = true;
            for (int i = 0; i < n; ++i) {
                uint16_t a, b;
                std::memcpy(&a, &ref[(size_t)2 * i], 2);
                std::memcpy(&b, &got[(size_t)2 * i], 2);
                const bool nan_a = (a & 0x7C00) == 0x7C00 && (a & 0x3FF), nan_b = (b & 0x7C00) == 0x7C00 && (b & 0x3FF);
                same = same && (std::isnan(x[i]) ? nan_a && nan_b : a == b);
            }
            char d[64];
            std::snprintf(d, sizeof d, "n=%d %s", n, set == K_SCALAR ? "scalar" : SIMD_NAME);
            check(same, "f32_to_f16: fp32_to_fp16's bits (NaN stays NaN)", d);
        }
    }
    std::printf("f32_to_f16: %s bit-identical to fp32_to_fp16 on %zu values\n", SIMD ? SIMD_NAME : "scalar", x.size());
}

// The fp16-row attention kernels (att_scores_h / att_values_h: the 16-bit KV cache read as stored) against the float
// ones of the same set on the rows converted to float32, bit for bit (each half's float is exact and the arithmetic
// the same), in the scalar set and the SIMD one: head widths that are and are not multiples of the vector width, 1-5
// heads, ragged key counts, odd row strides (unaligned rows).
static void attention_half_tests() {
    std::vector<int> sets = {K_SCALAR};
    if (SIMD) sets.push_back(SIMD);
    for (int set : sets) {
        const VecOps& ops = vec_ops(set);
        for (int hd : {64, 128, 80, 36, 100, 7})
            for (int nq : {1, 2, 3, 5})
                for (int n : {1, 3, 4, 9, 67}) {
                    const size_t ks = (size_t)hd * 3 + 5, ldp = (size_t)n + 3;
                    std::vector<float> q((size_t)nq * hd), Kf((size_t)n * ks), Vf((size_t)n * ks);
                    std::vector<uint16_t> Kh(Kf.size()), Vh(Vf.size());
                    for (float& v : q) v = urand(-2, 2);
                    for (size_t i = 0; i < Kf.size(); ++i) {
                        Kh[i] = fp32_to_fp16(urand(-2, 2));
                        Vh[i] = fp32_to_fp16(urand(-2, 2));
                        Kf[i] = fp16_to_fp32(Kh[i]);
                        Vf[i] = fp16_to_fp32(Vh[i]);
                    }
                    std::vector<float> sa((size_t)nq * ldp, 0.0f), sb = sa;
                    ops.att_scores(q.data(), nq, hd, Kf.data(), ks, n, 0.125f, sa.data(), ldp);
                    ops.att_scores_h(q.data(), nq, hd, Kh.data(), ks, n, 0.125f, sb.data(), ldp);
                    std::vector<float> P((size_t)nq * ldp), oa((size_t)nq * hd);
                    for (float& v : P) v = urand(0, 1);
                    for (float& v : oa) v = urand(-1, 1);
                    std::vector<float> ob = oa;
                    ops.att_values(P.data(), ldp, nq, hd, Vf.data(), ks, n, oa.data());
                    ops.att_values_h(P.data(), ldp, nq, hd, Vh.data(), ks, n, ob.data());
                    char d[80];
                    std::snprintf(d, sizeof d, "hd=%d nq=%d n=%d %s", hd, nq, n, set == K_SCALAR ? "scalar" : SIMD_NAME);
                    check(std::memcmp(sa.data(), sb.data(), sizeof(float) * sa.size()) == 0,
                          "att_scores_h: the bits of att_scores on the rows converted to float32", d);
                    check(std::memcmp(oa.data(), ob.data(), sizeof(float) * oa.size()) == 0,
                          "att_values_h: the bits of att_values on the rows converted to float32", d);
                }
    }
    std::printf("attention on fp16 rows: scalar%s%s bit-identical to the float kernels on converted rows\n",
                SIMD ? " and " : "", SIMD ? SIMD_NAME : "");
}

// Activations on a 4- or 6-bit grid (rotation.h act_fake_quant, then prepare_x8 with its step): every block holds
// d = step and the grid's integers exactly (plain and ternary layouts, a ragged chunk), and the activation sum.
static void q8_grid_tests() {
    for (int bits : {4, 6})
        for (int id : {2, 5}) {  // q4 (X_PLAIN), ternary (X_TERNARY planes)
            const BlockTraits& bt = *block_traits(id);
            const int g = 100;
            std::vector<float> x(g);
            for (float& v : x) v = urand(-3, 3) * (urand(0, 1) < 0.05f ? 20.0f : 1.0f);
            const float step = act_fake_quant(x.data(), g, bits);
            std::vector<XQ8> xq(x8_blocks(bt, padded(g)));
            const float sum = prepare_x8(bt, x.data(), g, xq.data(), step);
            // rebuild the chunk's columns from the blocks (prepare_x8's layout) and compare with x / step
            std::vector<float> back(g, 0.0f);
            if (bt.x_layout == X_TERNARY) {
                const int B = ternary_bytes(padded(g)), nb = (B + 31) / 32;
                for (int i = 0; i < 5; ++i)
                    for (int slot = 0; slot < B; ++slot)
                        if (i * B + slot < g) back[i * B + slot] = xq[i * nb + slot / 32].q[slot % 32];
            } else {
                for (int c = 0; c < g; ++c) back[c] = xq[c / 32].q[c % 32];
            }
            bool exact = true;
            double s = 0.0;
            for (int c = 0; c < g; ++c) {
                exact = exact && back[c] * step == x[c] && std::nearbyint(x[c] / step) == back[c];
                s += x[c];
            }
            for (const XQ8& b : xq) exact = exact && b.d == step;
            char d[64];
            std::snprintf(d, sizeof d, "bits=%d kind=%s", bits, bt.name);
            check(exact, "int8 activations on a grid: d = step and q = the grid's integers, exactly", d);
            check(std::fabs(sum - s) <= 1e-5 * (std::fabs(s) + 1.0), "int8 activations on a grid: the chunk's sum", d);
        }
}

// Tile kernels one by one (BlockTraits::tile8 and VecOps::tile8_mix of every int8 set: AVX2 on x86-64, NEON with and
// without SDOT on AArch64) against the scalar tile reference: every tile kind, G = 32, 128 and 256, 1, 3 and 5 chunks,
// and runs whose last chunk is ragged (g = G / 2 + 4: its own g_pad, so a uniform call of its own, and in the mixed run
// its own nb). Parts are built as repack_tiles builds them (interleaved headers, tile_pack_codes, a residual gap so
// part_bytes exceeds what the kernel reads), activations by prepare_x8 (zero past g). Tolerance: 1e-5 of the magnitude
// of the row's terms (as the row-layout int8 checks). The NEON builds must agree with each other bit for bit (exact
// int32 block sums, then the same float operations), and a mixed run of one width with the uniform call.
static int n_tile_kernel_checks = 0;
static void tile_kernel_tests() {
    const int kinds[] = {1, 2, 3, 4, 6, 5, 7, 8, 9};
    for (int id : kinds) {
        const BlockTraits& bt = *block_traits(id);
        const bool mixable = id != 1;  // q8 parts run only in uniform runs (repack_tiles): no mixed-run kernel takes them
        for (int G : {32, 128, 256})
            for (int nch : {1, 3, 5})
                for (int ragged = 0; ragged < 2; ++ragged) {
                    const int n_p = 1, hb = bt.header_bytes;
                    // 3 chunks: every code at its largest value and |q| = 127 everywhere (chunks +, -, +): the int16
                    // pair sums at their bounds, where a kernel's shortcut would saturate (ternary: no such codes)
                    const bool sat = nch == 3 && id != 5;
                    std::vector<int> gs(nch, G);
                    if (ragged) gs[nch - 1] = G / 2 + 4;
                    std::vector<TileDesc> td(nch);
                    std::vector<int> x8off(nch);
                    size_t off = 0;
                    int nx = 0;
                    for (int c = 0; c < nch; ++c) {
                        td[c] = TileDesc{off, c, id, padded(gs[c]) / 32, 0};
                        x8off[c] = nx;
                        off += TILE_ROWS * tile_row_bytes(bt, gs[c], n_p);
                        nx += x8_blocks(bt, padded(gs[c]));
                    }
                    std::vector<uint8_t> tile(off + 64);
                    for (uint8_t& v : tile) v = (uint8_t)rng();  // residual bytes and the tail: noise
                    std::vector<XQ8> xq(nx);
                    std::vector<float> xsum(nch), x(G), w(dequant_floats(G) + 64);
                    std::vector<double> mag(TILE_ROWS, 1e-3);
                    for (int c = 0; c < nch; ++c) {
                        const int g = gs[c], g_pad = padded(g);
                        const size_t rbn = row_bytes(bt, g, n_p);
                        std::vector<uint8_t> rows(TILE_ROWS * rbn);
                        uint8_t* part = &tile[td[c].off];
                        const uint8_t* src[TILE_ROWS];
                        for (int r = 0; r < TILE_ROWS; ++r) {
                            uint8_t* rb = &rows[r * rbn];
                            make_rowblock(bt, g, n_p, c == 1 && r == 3 ? ZERO : RANDOM, rb);
                            if (sat && !(c == 1 && r == 3)) std::memset(rb + hb, 0xFF, bt.code_bytes(g_pad));
                            for (int f = 0; f < hb / 2; ++f) std::memcpy(part + 2 * (f * TILE_ROWS + r), rb + 2 * f, 2);
                            src[r] = rb + hb;
                        }
                        tile_pack_codes(bt, src, g_pad, part + TILE_ROWS * hb);
                        for (int k = 0; k < g; ++k) x[k] = sat ? (c % 2 ? -1.0f : 1.0f) : urand(-1, 1) * (urand(0, 1) < 0.02f ? 30.0f : 1.0f);
                        xsum[c] = prepare_x8(bt, x.data(), g, &xq[x8off[c]]);
                        for (int r = 0; r < TILE_ROWS; ++r) {  // the terms: |code part of w| |x| + |offset x| per column
                            const uint8_t* rb = &rows[r * rbn];
                            bt.dequant[K_SCALAR](rb, g_pad, w.data());  // column order (ternary: plane i*B + j = column)
                            // two-level: the offset of column k is dmin n_b, at most 63 |dmin|
                            const double o = id == 5 ? -(double)load_h(rb) : bt.two_level ? 63.0 * std::fabs((double)load_h(rb + 2)) : (double)load_h(rb + 2);
                            for (int k = 0; k < g; ++k) mag[r] += (std::fabs((double)w[k]) + 2 * std::fabs(o)) * (std::fabs(x[k]) + 0.01);
                        }
                    }
                    float acc0[TILE_ROWS];
                    for (float& v : acc0) v = urand(-1, 1);
                    for (int r = 0; r < TILE_ROWS; ++r) mag[r] += std::fabs(acc0[r]);
                    // uniform calls: the chunks of width G in one call, a ragged last chunk in a call of its own
                    const int nu = ragged ? nch - 1 : nch;
                    auto uniform = [&](int k, float* acc) {
                        if (nu) bt.tile8[k](tile.data(), td.size() > 1 ? td[1].off : 0, nu, xq.data(), xsum.data(), G, acc, 64);
                        if (ragged)
                            bt.tile8[k](tile.data() + td[nch - 1].off, 0, 1, &xq[x8off[nch - 1]], &xsum[nch - 1], 32 * td[nch - 1].nb, acc, 0);
                    };
                    float ref[TILE_ROWS], refm[TILE_ROWS];
                    std::memcpy(ref, acc0, sizeof ref);
                    std::memcpy(refm, acc0, sizeof refm);
                    uniform(K_SCALAR, ref);
                    if (mixable) vec_ops(K_SCALAR).tile8_mix(tile.data(), td.data(), nch, xq.data(), x8off.data(), xsum.data(), refm, 0);
                    else uniform(K_SCALAR, refm);
                    char detail[160];
                    std::snprintf(detail, sizeof detail, "kind=%s G=%d nch=%d ragged=%d", bt.name, G, nch, ragged);
                    check(std::memcmp(ref, refm, sizeof ref) == 0, "tile kernels: scalar mix == scalar uniform", detail);
                    float neon_u[TILE_ROWS] = {0}, neon_m[TILE_ROWS] = {0};
                    int n_neon = 0;
                    for (const Q8Set& qs : q8_sets()) {
                        if (qs.k == K_SCALAR) continue;
                        use_set(qs);
                        const bool have = bt.tile8[qs.k] != nullptr && vec_ops(qs.k).tile8_mix != nullptr;
                        check(have, "tile kernels: present", qs.name);
                        if (!have) continue;
                        float u[TILE_ROWS], m[TILE_ROWS];
                        std::memcpy(u, acc0, sizeof u);
                        std::memcpy(m, acc0, sizeof m);
                        uniform(qs.k, u);
                        if (mixable) vec_ops(qs.k).tile8_mix(tile.data(), td.data(), nch, xq.data(), x8off.data(), xsum.data(), m, 0);
                        else uniform(qs.k, m);
                        bool ok = true;
                        for (int r = 0; r < TILE_ROWS; ++r)
                            ok = ok && std::fabs((double)u[r] - ref[r]) <= 1e-5 * mag[r] && std::fabs((double)m[r] - ref[r]) <= 1e-5 * mag[r];
                        char d2[224];
                        std::snprintf(d2, sizeof d2, "%s set=%s row0 %.9g / %.9g vs %.9g", detail, qs.name, u[0], m[0], ref[0]);
                        check(ok, "tile kernels: SIMD == scalar tile reference within 1e-5 of the terms", d2);
                        ++n_tile_kernel_checks;
                        if (qs.k == K_NEON) {
                            if (!ragged) check(std::memcmp(u, m, sizeof u) == 0, "tile kernels: neon mix == neon uniform, bit for bit", d2);
                            if (n_neon++)
                                check(std::memcmp(u, neon_u, sizeof u) == 0 && std::memcmp(m, neon_m, sizeof m) == 0,
                                      "tile kernels: neon SDOT == plain neon, bit for bit", d2);
                            std::memcpy(neon_u, u, sizeof u);
                            std::memcpy(neon_m, m, sizeof m);
                        }
                    }
                    if (SIMD == K_NEON) set_neon_dotprod(cpu_has_dotprod());
                }
    }
}

// Row tiles (issue 12): a linear repacked by repack_tiles gives the row layout's products: bit for bit with
// float activations (matvec untiles into the same dot_rows; matmul dequantizes untiled rows) and within
// 1e-5 of the terms' magnitude with int8 activations (tile kernels: scalar reference and SIMD, summed in
// another order; 1.6-bit ternary tiles take the row layout's X_TERNARY activations, so the same int8 values).
// Runs of equal kinds, every kind, protected columns, a ragged chunk, N not a multiple of 8.
static int n_vnni_checked = 0;
static void tiled_tests(bool ternary_tiles) {
    set_ternary_tiles(ternary_tiles);
    struct Case { int G, N; std::vector<int64_t> types, prot; };
    const Case cases[] = {
        {128, 37, {2, 2, 2, 4, 4, 3, 3, 6, 6, 5, 1, 0, 2}, {0, 0, 2, 0, 0, 1, 1, 0, 3, 2, 0, 0, 1}},
        {64, 24, {2, 3, 4, 6, 5, 2}, {0, 0, 0, 0, 0, 0}},
        {32, 9, {4, 4, 4, 2, 2}, {1, 1, 1, 0, 0}},
        {128, 19, {2, 2, 3, 3, 3, 4, 6, 6, 1, 0, 2}, {0, 1, 1, 0, 0, 2, 0, 0, 1, 0, 3}},
        {256, 8, {5, 5, 4, 5}, {0, 1, 0, 0}},
        {128, 21, {5, 5, 5, 5}, {0, 0, 0, 0}},  // a uniform ternary run (tile8_ternary, not tile8_mix)
        {128, 29, {1, 1, 1, 1, 1}, {0, 0, 1, 1, 0}},  // q8 (the output head's kind): uniform runs, split where n_prot changes
        {64, 13, {1, 2, 1, 1, 4, 4, 1}, {0, 0, 0, 0, 0, 0, 0}},  // q8 beside other kinds: runs of its own
        {128, 27, {7, 7, 8, 9, 2, 9, 0, 7, 3, 1}, {0, 1, 0, 0, 0, 2, 0, 0, 1, 0}},  // two-level kinds, mixed with others
        {256, 16, {7, 7, 7, 8}, {0, 0, 0, 0}},  // a uniform two-level run (tile8_q4s), then q3s
    };
    int ci = 0;
    for (const Case& cs : cases) {
        ++ci;
        const int n_chunks = (int)cs.types.size();
        const int K = cs.G * (n_chunks - 1) + (ci == 2 || ci == 6 ? cs.G : cs.G / 2 + 4);  // ragged last chunk but in cases 2, 6
        std::vector<int64_t> prot(cs.prot);
        for (int c = 0; c < n_chunks; ++c) prot[c] = std::min<int64_t>(prot[c], std::min(cs.G, K - c * cs.G));
        Linear L = chunked_layout("t", cs.N, K, cs.G, cs.types, prot);
        std::vector<int64_t> cols;
        for (const Chunk& ch : L.chunks)
            for (int p = 0; p < ch.n_prot; ++p) cols.push_back(ch.col0 + (int64_t)p * ch.g / std::max(ch.n_prot, 1));
        set_protected_columns(L, cols);
        std::vector<uint8_t> data(L.row_bytes * cs.N);
        for (int r = 0; r < cs.N; ++r)
            for (const Chunk& ch : L.chunks) make_rowblock(*ch.bt, ch.g, ch.n_prot, r == 5 ? ZERO : RANDOM, &data[r * L.row_bytes + ch.off]);
        L.data = data.data();
        // ternary chunks as q2 in the tiles (the default): activations quantized per 32 columns, not per 32 plane
        // slots, so int8 results differ by the activations' rounding, and float ones by the summation order
        const bool conv = !ternary_tiles && std::count(cs.types.begin(), cs.types.end(), 5) > 0;
        Linear T = L;
        repack_tiles(T);
        size_t tb = 0;  // each kind's codes (ternary tiles padded to 4-byte groups per row), or ternary as q2
        for (const Chunk& ch : L.chunks)
            tb += 8 * tile_row_bytes(ch.bt->id == 5 && !ternary_tiles ? *block_traits(4) : *ch.bt, ch.g, ch.n_prot);
        check(T.tiled() && T.tiles_size == (size_t)((cs.N + 7) / 8) * tb, "tiles: repacked size");
        size_t run_chunks = 0;
        for (const Linear::Run& r : T.runs) run_chunks += r.n;
        check(run_chunks == L.chunks.size(), "tiles: runs cover the chunks");
        T.data = nullptr;  // a tiled product must not read the row layout
        const int n_tok = 3;
        std::vector<float> X((size_t)n_tok * K);
        for (float& v : X) v = urand(-1, 1);
        const int ld = round8(K) + 64;
        std::vector<float> Wd((size_t)cs.N * ld), Wt((size_t)cs.N * ld), tmp(dequant_floats(cs.G) + 64);
        dequant_rows(L, 0, cs.N, Wd.data(), ld, tmp.data(), K_SCALAR);
        dequant_rows(T, 0, cs.N, Wt.data(), ld, tmp.data(), K_SCALAR);
        check(Wd == Wt, "tiles: dequant_rows == row layout");  // == : a q2-tiled ternary zero may be +0 for -0
        for (const Q8Set& qs : q8_sets()) {
            use_set(qs);
            for (int threads : {1, 3}) {
                ThreadPool pool(threads);
                MatScratch ms;
                ms.reserve(threads, K, cs.G, L.x_floats, n_chunks);
                std::vector<float> Y0((size_t)n_tok * cs.N), Y1((size_t)n_tok * cs.N), y0(cs.N), y1(cs.N);
                matmul(L, X.data(), n_tok, Y0.data(), pool, ms, qs.k);
                matmul(T, X.data(), n_tok, Y1.data(), pool, ms, qs.k);
                bool eq = std::memcmp(Y0.data(), Y1.data(), sizeof(float) * Y0.size()) == 0, ok = true;
                for (int t = 0; t < n_tok; ++t) {
                    const float* x = &X[(size_t)t * K];
                    matvec(L, x, y0.data(), pool, ms, qs.k, ACT_F32);
                    matvec(T, x, y1.data(), pool, ms, qs.k, ACT_F32);
                    eq = eq && (conv || std::memcmp(y0.data(), y1.data(), sizeof(float) * cs.N) == 0);
                    matvec(L, x, y0.data(), pool, ms, qs.k, ACT_Q8);
                    matvec(T, x, y1.data(), pool, ms, qs.k, ACT_Q8);
                    if (qs.k == K_AVX2 && cpu_vnni()) {  // the VNNI tile kernels == the AVX2 ones, bit for bit
                        std::vector<float> y2(cs.N);
                        set_x86_vnni(0);
                        matvec(T, x, y2.data(), pool, ms, qs.k, ACT_Q8);
                        set_x86_vnni(-1);
                        eq = eq && std::memcmp(y1.data(), y2.data(), sizeof(float) * cs.N) == 0;
                        ++n_vnni_checked;
                        if (set_tile16(false)) {  // tile8 one tile at a time == the pairs (the default here)
                            matvec(T, x, y2.data(), pool, ms, qs.k, ACT_Q8);
                            set_tile16(true);
                            eq = eq && std::memcmp(y1.data(), y2.data(), sizeof(float) * cs.N) == 0;
                        }
                    }
                    {  // grouped == separate, tiled and not mixed in one group
                        std::vector<float> g0(cs.N), g1(cs.N);
                        const Linear* Ws[2] = {&T, &L};
                        float* Ys[2] = {g0.data(), g1.data()};
                        matvec_group(2, Ws, x, Ys, pool, ms, qs.k, ACT_Q8);
                        eq = eq && std::memcmp(g0.data(), y1.data(), sizeof(float) * cs.N) == 0 &&
                             std::memcmp(g1.data(), y0.data(), sizeof(float) * cs.N) == 0;
                    }
                    for (int r = 0; r < cs.N; ++r) {
                        double mag = 1e-3;
                        for (int k = 0; k < K; ++k) mag += std::fabs((double)Wd[(size_t)r * ld + k] * x[k]);
                        ok = ok && std::fabs((double)y1[r] - y0[r]) <= (conv ? 1e-2 : 1e-5) * mag;
                    }
                    if (conv) {  // float products: the same weights (dequant_rows above), summed differently
                        matvec(L, x, y0.data(), pool, ms, qs.k, ACT_F32);
                        matvec(T, x, y1.data(), pool, ms, qs.k, ACT_F32);
                        for (int r = 0; r < cs.N; ++r) {
                            double mag = 1e-3;
                            for (int k = 0; k < K; ++k) mag += std::fabs((double)Wd[(size_t)r * ld + k] * x[k]);
                            ok = ok && std::fabs((double)y1[r] - y0[r]) <= 1e-5 * mag;
                        }
                    }
                }
                char d[96];
                std::snprintf(d, sizeof d, "case %d, %s, threads %d, ternary tiles %d", ci, qs.name, threads, (int)ternary_tiles);
                check(eq, "tiles: float products and groups bit-identical to the row layout", d);
                check(ok, "tiles: int8 matvec == row layout within 1e-5 of the terms", d);
            }
        }
    }
}

// Pair kernels (tile16_kernel / tile16_mix_kernel: two tiles ts bytes apart, 16 rows per AVX-512 register) against
// tile8 / tile8_mix on each tile: bit for bit (the same exact int32 block sums and the same float operations per row),
// for every pair kind, mixed runs with ternary tiles among them, G = 32, 128 and 256, 1-5 chunks, a ragged last chunk,
// tile gaps (ts) that are not a multiple of anything. Skipped, saying so, where the CPU has no pair kernels.
static int n_pair_checks = 0;
static void tile_pair_tests() {
    if (!tile16_mix_kernel(K_AVX2)) {
        std::printf("tile pairs: no pair kernels on this CPU (AVX512-VNNI + BW), skipped\n");
        return;
    }
    const std::vector<std::vector<int>> runs = {{1}, {2}, {3}, {4}, {6}, {7}, {8}, {9}, {2, 4, 3, 6}, {5, 4, 2}, {4, 4, 5, 3, 6},
                                                {7, 2, 9, 8}, {8, 8, 7, 9}};
    // both builds of the pair kernels: without GFNI, and with it where the CPU has it (the field extraction differs)
    const bool had_gfni = gfni_in_use();
    int n_gfni = 0;
    for (int gf = 0; gf < 2; ++gf) {
    if (!set_gfni(gf == 1)) {
        std::printf("tile pairs: no GFNI on this CPU, its build skipped\n");
        continue;
    }
    n_gfni += gf;
    for (const std::vector<int>& kinds : runs)
        for (int G : {32, 128, 256})
            for (int nch : {1, 2, 5})
                for (int ragged = 0; ragged < 2; ++ragged) {
                    if (kinds[0] == KIND_Q8 && ragged) continue;  // q8 tiles run in uniform runs only (linear.cpp)
                    std::vector<TileDesc> td(nch);
                    std::vector<int> x8off(nch), gs(nch, G);
                    if (ragged) gs[nch - 1] = G / 2 + 4;
                    size_t off = 0;
                    int nx = 0;
                    for (int c = 0; c < nch; ++c) {
                        const BlockTraits& bt = *block_traits(kinds[c % kinds.size()]);
                        td[c] = TileDesc{off, c, bt.id, padded(gs[c]) / 32, 0};
                        x8off[c] = nx;
                        off += TILE_ROWS * tile_row_bytes(bt, gs[c], 1);
                        nx += x8_blocks(bt, padded(gs[c]));
                    }
                    const std::ptrdiff_t ts = (std::ptrdiff_t)off + 1 + (std::ptrdiff_t)(rng() % 300);
                    std::vector<uint8_t> buf(ts + off + 64);
                    for (uint8_t& v : buf) v = (uint8_t)rng();
                    for (std::ptrdiff_t t0 : {(std::ptrdiff_t)0, ts})  // finite fp16 headers (d, m; ternary a) in both tiles
                        for (int c = 0; c < nch; ++c)
                            for (int i = 0; i < TILE_ROWS * block_traits(td[c].kind)->header_bytes / 2; ++i)
                                buf[t0 + td[c].off + 2 * i + 1] = (uint8_t)(0x2C + rng() % 12) | (rng() & 0x80);
                    std::vector<XQ8> xq(nx);
                    std::vector<float> xsum(nch), x(G);
                    for (int c = 0; c < nch; ++c) {
                        for (int k = 0; k < gs[c]; ++k) x[k] = urand(-1, 1) * (urand(0, 1) < 0.02f ? 30.0f : 1.0f);
                        xsum[c] = prepare_x8(*block_traits(td[c].kind), x.data(), gs[c], &xq[x8off[c]]);
                    }
                    float acc0[2 * TILE_ROWS];
                    for (float& v : acc0) v = urand(-1, 1);
                    float one[2 * TILE_ROWS], pair[2 * TILE_ROWS];
                    std::memcpy(one, acc0, sizeof one);
                    std::memcpy(pair, acc0, sizeof pair);
                    const bool uniform = kinds.size() == 1 && !ragged;
                    const BlockTraits& bt0 = *block_traits(kinds[0]);
                    const size_t pb = nch > 1 ? td[1].off : 0;
                    for (int h = 0; h < 2; ++h) {
                        if (uniform) bt0.tile8[K_AVX2](buf.data() + h * ts, pb, nch, xq.data(), xsum.data(), G, one + h * TILE_ROWS, 0);
                        else vec_ops(K_AVX2).tile8_mix(buf.data() + h * ts, td.data(), nch, xq.data(), x8off.data(), xsum.data(), one + h * TILE_ROWS, 0);
                    }
                    if (uniform) {
                        const tile16_fn f = tile16_kernel(bt0.id, K_AVX2);
                        check(f != nullptr, "tile pairs: a pair kernel for every affine tile kind", bt0.name);
                        if (!f) continue;
                        f(buf.data(), ts, pb, nch, xq.data(), xsum.data(), G, pair, 64);
                    } else {
                        tile16_mix_kernel(K_AVX2)(buf.data(), ts, td.data(), nch, xq.data(), x8off.data(), xsum.data(), pair, 64);
                    }
                    char d[128];
                    std::snprintf(d, sizeof d, "kinds %zu from %s, G=%d nch=%d ragged=%d, row 0 %.9g vs %.9g", kinds.size(), bt0.name, G, nch, ragged, pair[0], one[0]);
                    check(std::memcmp(one, pair, sizeof one) == 0, gf ? "tile pairs (GFNI build): == tile8 on each tile, bit for bit"
                                                                  : "tile pairs: == tile8 on each tile, bit for bit", d);
                    ++n_pair_checks;
                }
    }
    set_gfni(had_gfni);
    check(gfni_in_use() == had_gfni, "tile pairs: set_gfni restores the choice");
    check(set_tile16(false) && tile16_mix_kernel(K_AVX2) == nullptr && tile16_kernel(2, K_AVX2) == nullptr,
          "tile pairs: set_tile16(false) turns them off");
    check(set_tile16(true) && tile16_mix_kernel(K_AVX2) != nullptr, "tile pairs: set_tile16(true) turns them on");
    std::printf("tile pairs: %d checks against tile8 on each tile (%s)\n", n_pair_checks,
                n_gfni ? "without and with GFNI" : "without GFNI");
}

// ------------------------------------------------------------------ VNNI kernels under an emulated vpdpbusd
// The VNNI tile kernels and the VNNI q8 row kernel (kernels_vnni_tiles.inc) instantiated with an AVX2 emulation of
// vpdpbusd (exact: 16-bit products of the even and odd bytes, then vpmaddwd), and checked bit for bit against the AVX2
// kernels, so their logic is tested on every x86-64 CPU with AVX2 (this CI's may have no VNNI); on a CPU with VNNI the
// real instructions are checked the same way by q8_chunk_tests and tiled_tests.
#if defined(__x86_64__)
#include <immintrin.h>
#if defined(__clang__)
#  pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#  pragma GCC push_options
#  pragma GCC target("avx2,fma,f16c")
#endif
static inline __m256i dpbusd_emulated(__m256i acc, __m256i u, __m256i s) {
    const __m256i ue = _mm256_and_si256(u, _mm256_set1_epi16(0x00FF)), uo = _mm256_srli_epi16(u, 8);
    const __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
}
#include "kernels_vnni_tiles.inc"
WQE_TILE_KERNELS(emulated, dpbusd_emulated, 8)
#if defined(__clang__)
#  pragma clang attribute pop
#else
#  pragma GCC pop_options
#endif

static int n_emulated_checks = 0;

static void random_xq8(std::vector<XQ8>& xq) {
    for (XQ8& b : xq) {
        b.d = urand(0.001f, 0.1f);
        int s = 0;
        for (int j = 0; j < 32; ++j) s += (b.q[j] = (int8_t)(rng() % 255) - 127);
        b.ds = b.d * (float)s;
    }
}
static void random_bytes(uint8_t* p, size_t n, int below = 256) {
    for (size_t i = 0; i < n; ++i) p[i] = (uint8_t)(rng() % below);
}
static void finite_halves(uint8_t* p, int n) {  // n fp16 values in [-1, 1)
    for (int i = 0; i < n; ++i) {
        const uint16_t h = fp32_to_fp16(urand(-1.0f, 1.0f));
        std::memcpy(p + 2 * i, &h, 2);
    }
}

static void vnni_emulated_tests() {
    if (!cpu_has_avx2()) return;
    typedef void (*tile_fn)(const uint8_t*, size_t, int, const XQ8*, const float*, int, float*, std::ptrdiff_t);
    struct Kind { int id, sub; tile_fn ref, emu; };
    const Kind kinds[] = {{1, 32, avx2::tile8_q8, avx2::emulated::tile8_q8},  // q8: uniform runs only (not in the mixed run below)
                          {2, 16, avx2::tile8_q4, avx2::emulated::tile8_q4}, {3, 12, avx2::tile8_q3, avx2::emulated::tile8_q3},
                          {4, 8, avx2::tile8_q2, avx2::emulated::tile8_q2}, {6, 4, avx2::tile8_q1, avx2::emulated::tile8_q1},
                          {5, 0, avx2::tile8_ternary, avx2::emulated::tile8_ternary},
                          {7, 16, avx2::tile8_q4s, avx2::emulated::tile8_q4s}, {8, 12, avx2::tile8_q3s, avx2::emulated::tile8_q3s},
                          {9, 8, avx2::tile8_q2s, avx2::emulated::tile8_q2s}};
    // a part's bytes: header, two-level sub-scale codes (8 rows x sub_bytes), codes
    auto part_of = [](int id, int sub, int g_pad) -> size_t {
        if (id == 5) return 16 + 8 * (size_t)((ternary_bytes(g_pad) + 3) & ~3);
        return 32 + (id >= 7 ? 8 * (size_t)sub_bytes(g_pad) : 0) + (size_t)(g_pad / 32) * 8 * sub;
    };
    for (int g_pad : {32, 96, 128, 256}) {
        const int nb = g_pad / 32, nch = 3;
        const int tnx = 5 * ((ternary_bytes(g_pad) + 31) / 32);  // XQ8 blocks of a ternary chunk (X_TERNARY)
        for (const Kind& k : kinds) {
            const bool tern = k.id == 5;
            const size_t part = part_of(k.id, k.sub, g_pad);
            std::vector<uint8_t> buf(part * nch);
            random_bytes(buf.data(), buf.size(), tern ? 243 : 256);
            for (int c = 0; c < nch; ++c) finite_halves(&buf[c * part], tern ? 8 : 16);
            std::vector<XQ8> xq((size_t)nch * (tern ? tnx : nb));
            random_xq8(xq);
            std::vector<float> xsum(nch);
            for (float& v : xsum) v = urand(-3, 3);
            float a[8] = {0}, b[8] = {0};
            k.ref(buf.data(), part, nch, xq.data(), xsum.data(), g_pad, a, 0);
            k.emu(buf.data(), part, nch, xq.data(), xsum.data(), g_pad, b, 0);
            char d[80];
            std::snprintf(d, sizeof d, "kind=%d g_pad=%d", k.id, g_pad);
            check(std::memcmp(a, b, sizeof a) == 0, "emulated VNNI tile8 == AVX2 tile8 bit for bit", d);
            ++n_emulated_checks;
        }
        // a mixed run of every tile kind, through tile8_mix and (nt tokens) tile8_gemm
        std::vector<TileDesc> desc;
        std::vector<int> x8off;
        size_t off = 0;
        int nx = 0;
        for (const Kind& k : kinds) {
            if (k.id == 1) continue;
            const bool tern = k.id == 5;
            desc.push_back({off, (int32_t)desc.size(), k.id, nb, 0});
            x8off.push_back(nx);
            off += part_of(k.id, k.sub, g_pad);
            nx += tern ? tnx : nb;
        }
        std::vector<uint8_t> tile(off);
        for (const TileDesc& t : desc) {
            const bool tern = t.kind == 5;
            const size_t end = &t == &desc.back() ? off : (&t + 1)->off;
            random_bytes(&tile[t.off], end - t.off, tern ? 243 : 256);
            finite_halves(&tile[t.off], tern ? 8 : 16);
        }
        const int n = (int)desc.size(), max_nt = 11;
        std::vector<XQ8> xq((size_t)nx * max_nt);
        random_xq8(xq);
        std::vector<float> xsum((size_t)n * max_nt);
        for (float& v : xsum) v = urand(-3, 3);
        float a[8] = {0}, b[8] = {0};
        avx2::tile8_mix(tile.data(), desc.data(), n, xq.data(), x8off.data(), xsum.data(), a, 0);
        avx2::emulated::tile8_mix(tile.data(), desc.data(), n, xq.data(), x8off.data(), xsum.data(), b, 0);
        check(std::memcmp(a, b, sizeof a) == 0, "emulated VNNI tile8_mix == AVX2 bit for bit");
        for (int nt = 1; nt <= max_nt; ++nt) {
            std::vector<float> ga((size_t)8 * nt, 0.0f), gb((size_t)8 * nt, 0.0f);
            avx2::tile8_gemm(tile.data(), desc.data(), n, xq.data(), nx, x8off.data(), xsum.data(), n, nt, ga.data());
            avx2::emulated::tile8_gemm(tile.data(), desc.data(), n, xq.data(), nx, x8off.data(), xsum.data(), n, nt, gb.data());
            char d[80];
            std::snprintf(d, sizeof d, "g_pad=%d nt=%d", g_pad, nt);
            check(std::memcmp(ga.data(), gb.data(), sizeof(float) * ga.size()) == 0, "emulated VNNI tile8_gemm == AVX2 bit for bit", d);
        }
        n_emulated_checks += 1 + max_nt;
    }
    // q8 row-blocks: every row count (4-row groups and the tail), chunks up to and past 512 columns
    for (int g_pad : {32, 64, 96, 128, 512, 544, 1024}) {
        const size_t rb = 4 + (size_t)g_pad;
        const int R = 7;
        std::vector<uint8_t> rows(rb * R);
        random_bytes(rows.data(), rows.size());
        for (int r = 0; r < R; ++r) finite_halves(&rows[r * rb], 2);
        std::vector<XQ8> xq(g_pad / 32);
        random_xq8(xq);
        for (int n = 1; n <= R; ++n) {
            float a[R], b[R];
            avx2::dot8_rows_q8(rows.data(), rb, n, xq.data(), 1.25f, g_pad, a);
            avx2::emulated::dot8_rows_q8(rows.data(), rb, n, xq.data(), 1.25f, g_pad, b);
            char d[80];
            std::snprintf(d, sizeof d, "g_pad=%d rows=%d", g_pad, n);
            check(std::memcmp(a, b, sizeof(float) * n) == 0, "emulated VNNI dot8_rows_q8 == AVX2 bit for bit", d);
            ++n_emulated_checks;
        }
    }
}
#else
static int n_emulated_checks = 0;
static void vnni_emulated_tests() {}
#endif

int main() {
    std::printf("%s\n", system_info());
    std::printf("simd kernels under test: %s\n", SIMD ? SIMD_NAME : "none");
    fp16_tests();
    chunk_tests();
    q8_chunk_tests();
    q8_nonfinite_tests();
    q8_grid_tests();
    quant_x8_tests();
    fake_quant_tests();
    silu_tests();
    attention_tests();
    attention_half_tests();
    attention_avx512_tests();
    f32_to_f16_tests();
    std::printf("int8-activation kernel sets under test: %d (scalar%s)\n", n_q8_sets_seen,
                SIMD == K_AVX2 ? ", avx2" : SIMD == K_NEON ? (cpu_has_dotprod() ? ", neon, neon+dotprod" : ", neon") : "");
    vec_tests();
    threadpool_tests();
    linear_tests();
    tile_kernel_tests();
    std::printf("tile kernels: %d SIMD checks against the scalar tile reference\n", n_tile_kernel_checks);
    tile_pair_tests();
    tiled_tests(false);  // ternary chunks as q2 in the tiles (the default)
    tiled_tests(true);   // ternary chunks in their own 1.6-bit tiles (WQEDGE_TERNARY_TILES=1)
    set_ternary_tiles(false);
    std::printf("row tiles: VNNI (level %d) checked against AVX2 %d times\n", cpu_vnni(), n_vnni_checked);
    vnni_emulated_tests();
    std::printf("VNNI kernels with an emulated vpdpbusd: %d checks against AVX2\n", n_emulated_checks);
    std::printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
