// Integer prefill (issue 12): matmul with int8 activations (ACT_Q8, n > 1 tokens) against
//   - matvec(..., ACT_Q8) token by token: bit for bit, in every kernel set (scalar reference, AVX2, the VNNI builds,
//     NEON with and without SDOT), tiled and row layout, 1 and 3 threads: prefill sees what decode sees;
//   - the scalar reference set's matmul: within 1e-5 of the magnitude of the terms (sum |w x|), every SIMD path;
//   - the float path (ACT_F32 matmul): within the activations' rounding, sum_c |w_c| * amax(x) / 254 (each int8
//     activation is off by at most half its block's step, d / 2 <= amax / 254), plus 1e-5 of the terms.
// Linears: every block kind of the traits table (fp16, q8, q4, q3, q2, ternary, q1, ...) alone and mixed, protected
// columns, K not a multiple of 128 (a ragged last chunk), N not a multiple of 8 (nor of 4: the NEON row GEMM's remainder
// rows); token counts 2, 7, 33 and 70 (more than one token block).
// Exit status 0 when all checks pass.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "blocks.h"
#include "common.h"
#include "linear.h"
#include "threadpool.h"

using namespace wqe;

static int n_pass = 0, n_fail = 0;
static void check(bool ok, const char* what, const char* detail) {
    if (ok) ++n_pass;
    else if (++n_fail < 30) std::printf("FAIL %s %s\n", what, detail);
}

static std::mt19937_64 rng(2024);
static float urand(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
static void put_h(uint8_t* p, float v) { const uint16_t h = fp32_to_fp16(v); std::memcpy(p, &h, 2); }

// Random codes, realistic scales (d > 0, m ~ -levels/2 d), small residuals; row-block layout of docs/format.md.
static void fill_rowblock(const BlockTraits& bt, int g, int n_p, uint8_t* rb) {
    const size_t n = row_bytes(bt, g, n_p);
    for (size_t i = 0; i < n; ++i) rb[i] = (uint8_t)rng();
    if (bt.id == 0) {
        for (int c = 0; c < padded(g); ++c) put_h(rb + 2 * c, c < g ? urand(-0.1f, 0.1f) : 0.0f);
    } else if (bt.id == 5) {
        put_h(rb, urand(0.005f, 0.05f));
        const int B = ternary_bytes(padded(g));  // valid trit bytes: n * 256 / 243 rounded up, n < 243
        for (int j = 0; j < B; ++j) rb[2 + j] = (uint8_t)(((rng() % 243) * 256 + 242) / 243);
    } else {
        const float d = urand(0.002f, 0.02f);
        put_h(rb, d);
        put_h(rb + 2, -d * urand(0.0f, 8.0f));
    }
    const size_t res = bt.header_bytes + bt.code_bytes(padded(g));
    for (int p = 0; p < n_p; ++p) put_h(rb + res + 2 * p, urand(-0.05f, 0.05f));
}

struct Case { const char* name; int G, N, K; std::vector<int64_t> kinds, prot; };

struct Set { int k, vnni; bool dotprod; const char* name; };
static std::vector<Set> kernel_sets() {
    std::vector<Set> v = {{K_SCALAR, 0, false, "scalar"}};
    if (best_kernels() == K_AVX2) {
        v.push_back({K_AVX2, 0, false, "avx2"});
        if (cpu_vnni()) v.push_back({K_AVX2, cpu_vnni(), false, cpu_vnni() == 1 ? "avx512-vnni" : "avx-vnni"});
    }
    if (best_kernels() == K_NEON) {
        v.push_back({K_NEON, 0, false, "neon"});
        if (cpu_has_dotprod()) v.push_back({K_NEON, 0, true, "neon+dotprod"});
    }
    return v;
}
static void use(const Set& s) {
    set_kernels(s.k);
    if (s.k == K_AVX2) set_x86_vnni(s.vnni);
    if (s.k == K_NEON) set_neon_dotprod(s.dotprod);
}

int main() {
    std::printf("%s\n", system_info());
    std::vector<Case> cases;
    for (int id = 0; id < N_BLOCK_TYPES; ++id) {  // each kind alone: 3 chunks of 128, the last ragged (K = 300)
        cases.push_back({block_traits(id)->name, 128, 29, 300, {id, id, id}, {0, 2, 1}});
    }
    cases.push_back({"mixed", 128, 37, 13 * 128 - 60, {2, 2, 2, 4, 4, 3, 3, 6, 6, 5, 1, 0, 2}, {0, 0, 2, 0, 0, 1, 1, 0, 3, 2, 0, 0, 1}});
    cases.push_back({"mixed-g64", 64, 16, 6 * 64, {2, 3, 4, 6, 5, 2}, {0, 0, 0, 0, 0, 0}});
    cases.push_back({"two-level", 128, 21, 7 * 128 - 40, {7, 8, 9, 2, 7, 7, 4}, {0, 1, 0, 0, 0, 2, 0}});
    cases.push_back({"q4-g32-prot", 32, 9, 5 * 32 - 7, {2, 2, 2, 2, 2}, {1, 1, 1, 0, 1}});
    const std::vector<Set> sets = kernel_sets();
    std::printf("kernel sets: %zu\n", sets.size());
    for (const Case& cs : cases) {
        Linear L = chunked_layout(cs.name, cs.N, cs.K, cs.G, cs.kinds, cs.prot);
        std::vector<int64_t> cols;
        for (const Chunk& ch : L.chunks)
            for (int p = 0; p < ch.n_prot; ++p) cols.push_back(ch.col0 + 3 + (int64_t)p * (ch.g - 4) / std::max(ch.n_prot, 1));
        set_protected_columns(L, cols);
        std::vector<uint8_t> data(L.row_bytes * cs.N);
        for (int r = 0; r < cs.N; ++r)
            for (const Chunk& ch : L.chunks) fill_rowblock(*ch.bt, ch.g, ch.n_prot, &data[r * L.row_bytes + ch.off]);
        L.data = data.data();
        Linear T = L;
        repack_tiles(T);
        T.data = nullptr;  // a tiled product must not read the row layout
        const int ld = round8(cs.K) + 64;
        std::vector<float> Wd((size_t)cs.N * ld), tmp(dequant_floats(cs.G) + 64);
        dequant_rows(L, 0, cs.N, Wd.data(), ld, tmp.data(), K_SCALAR);
        for (int n_tok : {2, 7, 33, 70}) {
            std::vector<float> X((size_t)n_tok * cs.K);
            for (float& v : X) v = urand(-1, 1) * (urand(0, 1) < 0.01f ? 20.0f : 1.0f);  // a few outliers
            // magnitude of the terms and the int8 rounding bound, per (token, row)
            std::vector<double> mag((size_t)n_tok * cs.N), qb((size_t)n_tok * cs.N);
            for (int t = 0; t < n_tok; ++t) {
                const float* x = &X[(size_t)t * cs.K];
                double amax = 0;
                for (int k = 0; k < cs.K; ++k) amax = std::max(amax, (double)std::fabs(x[k]));
                for (int r = 0; r < cs.N; ++r) {
                    double m = 1e-6, w = 0;
                    for (int k = 0; k < cs.K; ++k) {
                        m += std::fabs((double)Wd[(size_t)r * ld + k] * x[k]);
                        w += std::fabs((double)Wd[(size_t)r * ld + k]);
                    }
                    mag[(size_t)t * cs.N + r] = m;
                    qb[(size_t)t * cs.N + r] = w * amax / 254.0 * 1.0001 + 1e-5 * m;
                }
            }
            for (const Linear* W : {&L, &T}) {
                const char* layout = W == &L ? "rows" : "tiles";
                std::vector<float> Yref;  // scalar set, 1 thread
                for (const Set& s : sets) {
                    use(s);
                    for (int threads : {1, 3}) {
                        ThreadPool pool(threads);
                        MatScratch ms;
                        ms.reserve(threads, cs.K, cs.G, L.x_floats, (int)L.chunks.size());
                        std::vector<float> Y((size_t)n_tok * cs.N), Yf((size_t)n_tok * cs.N), y(cs.N);
                        matmul(*W, X.data(), n_tok, Y.data(), pool, ms, s.k, ACT_Q8);
                        matmul(*W, X.data(), n_tok, Yf.data(), pool, ms, s.k, ACT_F32);
                        bool same = true, near_ref = true, near_f32 = true;
                        for (int t = 0; t < n_tok; ++t) {
                            matvec(*W, &X[(size_t)t * cs.K], y.data(), pool, ms, s.k, ACT_Q8);
                            same = same && std::memcmp(y.data(), &Y[(size_t)t * cs.N], sizeof(float) * cs.N) == 0;
                        }
                        if (Yref.empty()) Yref = Y;
                        for (size_t i = 0; i < Y.size(); ++i) {
                            near_ref = near_ref && std::fabs((double)Y[i] - Yref[i]) <= 1e-5 * mag[i];
                            near_f32 = near_f32 && std::fabs((double)Y[i] - Yf[i]) <= qb[i];
                        }
                        char d[160];
                        std::snprintf(d, sizeof d, "%s %s n=%d set=%s threads=%d", cs.name, layout, n_tok, s.name, threads);
                        check(same, "matmul(ACT_Q8) == matvec(ACT_Q8) per token, bit for bit", d);
                        check(near_ref, "matmul(ACT_Q8) == scalar reference within 1e-5 of the terms", d);
                        check(near_f32, "matmul(ACT_Q8) == matmul(ACT_F32) within the int8 rounding bound", d);
                    }
                }
            }
        }
    }
    set_kernels(0);
    set_x86_vnni(-1);
    std::printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
