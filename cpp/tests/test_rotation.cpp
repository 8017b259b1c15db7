// RUQuant block product: every SIMD path built here (AVX2 on x86-64, NEON on AArch64) against the scalar
// reference, within 1e-5 of the magnitude of the terms; and a transform of orthogonal blocks keeps norms.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "blocks.h"
#include "rotation.h"

int main() {
    using namespace wqe;
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int fails = 0, checks = 0;
    std::vector<int> sets;
    if (cpu_has_avx2()) sets.push_back(K_AVX2);
    if (cpu_has_neon()) sets.push_back(K_NEON);
    for (int n : {128, 72, 33, 5, 1}) {
        std::vector<float> R((size_t)n * n), x(n), ref(n), y(n);
        for (float& v : R) v = nd(rng);
        for (float& v : x) v = nd(rng) * (rng() % 7 == 0 ? 50.0f : 1.0f);
        block_matvec(R.data(), n, x.data(), ref.data(), K_SCALAR);
        for (int k : sets) {
            block_matvec(R.data(), n, x.data(), y.data(), k);
            for (int i = 0; i < n; ++i) {
                double mag = 0.0;
                for (int j = 0; j < n; ++j) mag += std::fabs((double)R[(size_t)i * n + j] * x[j]);
                ++checks;
                if (std::fabs((double)y[i] - ref[i]) > 1e-5 * mag + 1e-30) {
                    ++fails;
                    std::printf("FAIL set %d n %d row %d: %g vs %g\n", k, n, i, y[i], ref[i]);
                }
            }
        }
    }
    // The multi-block product from R packed in strips of 16 rows (pack_rows16, block_matmul_p), scalar and every set,
    // against block_matvec's scalar reference on each block: nx = 1..6 blocks (the AVX2 kernel's groups of 4 and their
    // remainders), all rows and a middle row range (multiples of 16), n = 128, 48 and 16.
    for (int n : {128, 48, 16})
        for (int nx : {1, 3, 4, 6})
            for (int part = 0; part < 2; ++part) {
                const int i0 = part ? 16 : 0, i1 = part ? std::max(16, n - 16) : n;
                std::vector<float> R((size_t)n * n), X((size_t)nx * n), ref((size_t)nx * n);
                for (float& v : R) v = nd(rng);
                const std::vector<float> P = pack_rows16(R, n);
                for (float& v : X) v = nd(rng) * (rng() % 7 == 0 ? 50.0f : 1.0f);
                for (int b = 0; b < nx; ++b) block_matvec(R.data(), n, &X[(size_t)b * n], &ref[(size_t)b * n], K_SCALAR);
                std::vector<int> all = sets;
                all.push_back(K_SCALAR);
                for (int k : all) {
                    std::vector<float> Y((size_t)nx * n, 7.0f);  // rows outside [i0, i1) must stay untouched
                    block_matmul_p(P.data(), n, X.data(), nx, Y.data(), i0, i1, k);
                    for (int b = 0; b < nx; ++b)
                        for (int i = 0; i < n; ++i) {
                            const float yv = Y[(size_t)b * n + i], rv = ref[(size_t)b * n + i];
                            double mag = 0.0;
                            for (int j = 0; j < n; ++j) mag += std::fabs((double)R[(size_t)i * n + j] * X[(size_t)b * n + j]);
                            const bool in = i >= i0 && i < i1;
                            ++checks;
                            if (in ? std::fabs((double)yv - rv) > 1e-5 * mag + 1e-30 : yv != 7.0f) {
                                ++fails;
                                std::printf("FAIL matmul_p set %d n %d nx %d block %d row %d [%d, %d): %g vs %g\n", k, n, nx, b, i, i0, i1, yv, rv);
                            }
                        }
                }
            }
    // Format 3's int8 matrices with row scales: block_matvec_q of every set and block_matmul_q (packed by
    // pack_rows16; scalar and every set; rows outside [i0, i1) untouched) against a float64 reference of
    // (sum_j Q_ij x_j) s_i, within 1e-5 of the terms' magnitude; codes at +-127 too.
    std::uniform_int_distribution<int> code(-127, 127);
    for (int n : {128, 48, 16, 72, 33, 5}) {
        for (int nx : {1, 3, 4, 6}) {
            for (int extreme = 0; extreme < 2; ++extreme) {
                std::vector<int8_t> Q((size_t)n * n);
                std::vector<float> s(n), X((size_t)nx * n);
                std::vector<double> ref((size_t)nx * n), mag((size_t)nx * n);
                for (int8_t& c : Q) c = (int8_t)(extreme ? (rng() & 1 ? 127 : -127) : code(rng));
                for (float& v : s) v = std::fabs(nd(rng)) * 0.01f + 1e-4f;
                for (float& v : X) v = nd(rng) * (rng() % 7 == 0 ? 50.0f : 1.0f);
                for (int b = 0; b < nx; ++b)
                    for (int i = 0; i < n; ++i) {
                        double a = 0.0, m = 0.0;
                        for (int j = 0; j < n; ++j) {
                            a += (double)Q[(size_t)i * n + j] * X[(size_t)b * n + j];
                            m += std::fabs((double)Q[(size_t)i * n + j] * X[(size_t)b * n + j]);
                        }
                        ref[(size_t)b * n + i] = a * s[i];
                        mag[(size_t)b * n + i] = m * s[i];
                    }
                std::vector<int> all = sets;
                all.push_back(K_SCALAR);
                for (int k : all) {
                    for (int b = 0; b < nx; ++b) {
                        std::vector<float> y(n);
                        block_matvec_q(Q.data(), s.data(), n, &X[(size_t)b * n], y.data(), k);
                        for (int i = 0; i < n; ++i) {
                            const size_t o = (size_t)b * n + i;
                            ++checks;
                            if (std::fabs(y[i] - ref[o]) > 1e-5 * mag[o] + 1e-30) {
                                ++fails;
                                std::printf("FAIL matvec_q set %d n %d row %d: %g vs %g\n", k, n, i, y[i], ref[o]);
                            }
                        }
                    }
                    if (n % 16) continue;
                    const std::vector<int8_t> P = pack_rows16(Q, n);
                    for (int part = 0; part < 2; ++part) {
                        const int i0 = part ? 16 : 0, i1 = part ? std::max(16, n - 16) : n;
                        std::vector<float> Y((size_t)nx * n, 7.0f);
                        block_matmul_q(P.data(), s.data(), n, X.data(), nx, Y.data(), i0, i1, k);
                        for (int b = 0; b < nx; ++b)
                            for (int i = 0; i < n; ++i) {
                                const size_t o = (size_t)b * n + i;
                                const bool in = i >= i0 && i < i1;
                                ++checks;
                                if (in ? std::fabs(Y[o] - ref[o]) > 1e-5 * mag[o] + 1e-30 : Y[o] != 7.0f) {
                                    ++fails;
                                    std::printf("FAIL matmul_q set %d n %d nx %d block %d row %d: %g vs %g\n", k, n, nx, b, i,
                                                Y[o], ref[o]);
                                }
                            }
                    }
                }
            }
        }
    }
    // The AVX2 set's AVX-512 packed product (x86_vnni() == 1) against its AVX2 code (set_x86_vnni(0)), bit for bit:
    // float32 and int8 matrices, 1..11 blocks (groups of 8 and every remainder), a row range, codes at +-127.
    int n_512 = 0;
    if (cpu_has_avx2() && cpu_vnni() == 1) {
        std::uniform_int_distribution<int> code8(-127, 127);
        for (int n : {128, 64, 16})
            for (int nx : {1, 3, 4, 7, 8, 11})
                for (int part = 0; part < 2; ++part) {
                    const int i0 = part ? 16 : 0, i1 = part ? std::max(16, n - 16) : n;
                    std::vector<float> R((size_t)n * n), s(n), X((size_t)nx * n);
                    std::vector<int8_t> Q((size_t)n * n);
                    for (float& v : R) v = nd(rng);
                    for (int8_t& c : Q) c = (int8_t)(rng() % 5 == 0 ? (rng() & 1 ? 127 : -127) : code8(rng));
                    for (float& v : s) v = std::fabs(nd(rng)) * 0.01f + 1e-4f;
                    for (float& v : X) v = nd(rng) * (rng() % 7 == 0 ? 50.0f : 1.0f);
                    const std::vector<float> PR = pack_rows16(R, n);
                    const std::vector<int8_t> PQ = pack_rows16(Q, n);
                    std::vector<float> a((size_t)nx * n, 7.0f), b = a, c = a, d = a;
                    set_x86_vnni(1);
                    block_matmul_p(PR.data(), n, X.data(), nx, a.data(), i0, i1, K_AVX2);
                    block_matmul_q(PQ.data(), s.data(), n, X.data(), nx, c.data(), i0, i1, K_AVX2);
                    set_x86_vnni(0);
                    block_matmul_p(PR.data(), n, X.data(), nx, b.data(), i0, i1, K_AVX2);
                    block_matmul_q(PQ.data(), s.data(), n, X.data(), nx, d.data(), i0, i1, K_AVX2);
                    set_x86_vnni(-1);
                    checks += 2;
                    ++n_512;
                    if (std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) != 0 ||
                        std::memcmp(c.data(), d.data(), sizeof(float) * c.size()) != 0) {
                        ++fails;
                        std::printf("FAIL AVX-512 packed product differs from AVX2: n %d nx %d rows [%d, %d)\n", n, nx, i0, i1);
                    }
                }
    }
    std::printf("AVX-512 packed products checked bit for bit against AVX2: %d\n", n_512);
    // Int8 activations (block_matmul_q8): the AVX-512 VNNI kernel on pack_quads16 / quad_row_sums against the scalar
    // reference on row-major codes, bit for bit; inputs from quant_x8 (a zero 32-column block, outliers), codes at
    // +-127, 1..6 blocks, row ranges (rows outside untouched; an odd number of 16-row strips too). The scalar reference
    // itself against a float64 sum.
    int n_q8 = 0;
    {
        std::uniform_int_distribution<int> code8(-127, 127);
        for (int n : {128, 64, 32})
            for (int nx : {1, 3, 4, 6})
                for (int part = 0; part < 3; ++part) {  // all rows; [16, n - 16); [16, n)
                    const int i0 = part && n > 32 ? 16 : 0, i1 = part == 1 && n > 32 ? n - 16 : n;
                    std::vector<int8_t> Q((size_t)n * n);
                    std::vector<float> s(n), X((size_t)nx * n);
                    for (int8_t& c : Q) c = (int8_t)(rng() % 5 == 0 ? (rng() & 1 ? 127 : -127) : code8(rng));
                    for (float& v : s) v = std::fabs(nd(rng)) * 0.01f + 1e-4f;
                    for (float& v : X) v = nd(rng) * (rng() % 13 == 0 ? 40.0f : 1.0f);
                    for (int j = 0; j < 32; ++j) X[j] = 0.0f;  // an all-zero block: d = 0
                    std::vector<XQ8> xq((size_t)nx * n / 32);
                    vec_ops(K_SCALAR).quant_x8(X.data(), nx * n, xq.data(), 0.0f);
                    std::vector<float> a((size_t)nx * n, 7.0f), b = a;
                    block_matmul_q8(Q.data(), nullptr, nullptr, s.data(), n, xq.data(), nx, a.data(), i0, i1, K_SCALAR);
                    for (int bb = 0; bb < nx; ++bb)  // the reference: sum_k (exact int sum) * d_k, then * s_i
                        for (int i = 0; i < n; ++i) {
                            const bool in = i >= i0 && i < i1;
                            double want = 0.0, mag = 0.0;
                            for (int j = 0; j < n; ++j) {
                                const XQ8& xk = xq[(size_t)bb * n / 32 + j / 32];
                                want += (double)Q[(size_t)i * n + j] * xk.q[j % 32] * xk.d;
                                mag += std::fabs((double)Q[(size_t)i * n + j] * xk.q[j % 32] * xk.d);
                            }
                            const float got = a[(size_t)bb * n + i];
                            ++checks;
                            if (in ? std::fabs(got - want * s[i]) > 1e-5 * mag * s[i] + 1e-30 : got != 7.0f) {
                                ++fails;
                                std::printf("FAIL matmul_q8 scalar n %d nx %d row %d: %g vs %g\n", n, nx, i, got, want * s[i]);
                            }
                        }
                    if (cpu_has_avx2() && cpu_vnni() == 1) {
                        const std::vector<int8_t> QV = pack_quads16(Q, n);
                        const std::vector<int32_t> RS = quad_row_sums(Q, n);
                        set_x86_vnni(1);
                        block_matmul_q8(Q.data(), QV.data(), RS.data(), s.data(), n, xq.data(), nx, b.data(), i0, i1, K_AVX2);
                        set_x86_vnni(-1);
                        ++checks;
                        ++n_q8;
                        if (std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) != 0) {
                            ++fails;
                            std::printf("FAIL matmul_q8 VNNI differs from the scalar reference: n %d nx %d rows [%d, %d)\n", n,
                                        nx, i0, i1);
                        }
                    }
                }
    }
    std::printf("int8-activation block products (AVX-512 VNNI) checked bit for bit against scalar: %d\n", n_q8);
    // The stage inputs' quantizer (stage_input_u8): in every set, the codes + 128 and d equal the scalar quant_x8's of
    // the same values, gathered through a permutation or read in order; zero and outlier blocks included.
    int n_in8 = 0;
    for (int g : {32, 64, 352, 1408}) {
        std::vector<float> x(g);
        for (float& v : x) v = nd(rng) * (rng() % 11 == 0 ? 60.0f : 1.0f);
        for (int j = 0; j < 32; ++j) x[(size_t)(g / 32 / 2) * 32 + j] = 0.0f;  // an all-zero block in order
        std::vector<int32_t> perm(g);
        for (int j = 0; j < g; ++j) perm[j] = j;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (bool gather : {false, true}) {
            std::vector<float> v(g);
            for (int j = 0; j < g; ++j) v[j] = x[gather ? perm[j] : j];
            std::vector<XQ8> xq(g / 32);
            vec_ops(K_SCALAR).quant_x8(v.data(), g, xq.data(), 0.0f);
            std::vector<uint8_t> want_u((size_t)g);
            std::vector<float> want_d(g / 32);
            for (int j = 0; j < g; ++j) want_u[j] = (uint8_t)(xq[j / 32].q[j % 32] + 128);
            for (int b = 0; b < g / 32; ++b) want_d[b] = xq[b].d;
            std::vector<int> all = sets;
            all.push_back(K_SCALAR);
            for (int k : all) {
                std::vector<uint32_t> u((size_t)g / 4, 0x5a5a5a5au);
                std::vector<float> d(g / 32, -1.0f);
                stage_input_u8(x.data(), gather ? perm.data() : nullptr, g, u.data(), d.data(), k);
                ++checks;
                ++n_in8;
                if (std::memcmp(want_u.data(), u.data(), (size_t)g) != 0 ||
                    std::memcmp(want_d.data(), d.data(), sizeof(float) * d.size()) != 0) {
                    ++fails;
                    std::printf("FAIL stage_input_u8 set %d g %d gather %d differs from quant_x8\n", k, g, (int)gather);
                }
            }
        }
    }
    std::printf("stage input quantization checked bit for bit against quant_x8: %d\n", n_in8);
    // A randomized Hadamard R1 (method "hadamard"): find_hadamard recognises it, and the fast Walsh-Hadamard path equals
    // the int8 block product (the reference: the same Rotation with the recognition cleared), tail block included;
    // a code changed anywhere is not recognised.
    int n_had = 0;
    for (int B : {64, 128})
        for (int tl : {0, 20}) {
            Rotation r;
            r.block = B;
            r.dim = 2 * B + tl;
            std::vector<int> sg(B);
            for (int& v : sg) v = rng() % 2 ? 1 : -1;
            r.q1.resize((size_t)B * B);
            r.s1.resize(B);
            for (int i = 0; i < B; ++i) {
                r.s1[i] = (0.5f + (float)(rng() % 100) / 100.0f) / (127.0f * std::sqrt((float)B));
                for (int j = 0; j < B; ++j) {
                    int p = 0;
                    for (unsigned v = (unsigned)(i & j); v; v &= v - 1) p ^= 1;
                    r.q1[(size_t)i * B + j] = (int8_t)(127 * (p ? -1 : 1) * sg[j]);
                }
            }
            r.q2.assign((size_t)B * B, 0);
            r.s2.assign(B, 1.0f / 127.0f);
            for (int i = 0; i < B; ++i) r.q2[(size_t)i * B + i] = 127;
            if (tl) {
                r.q1_tail.resize((size_t)tl * tl);
                r.q2_tail.assign((size_t)tl * tl, 0);
                for (int8_t& v : r.q1_tail) v = (int8_t)((int)(rng() % 255) - 127);
                for (int i = 0; i < tl; ++i) r.q2_tail[(size_t)i * tl + i] = 127;
                r.s1_tail.assign(tl, 0.01f);
                r.s2_tail.assign(tl, 1.0f / 127.0f);
            }
            r.perm.resize(r.dim);
            for (int i = 0; i < r.dim; ++i) r.perm[i] = i;
            r.perm_id = r.id2 = true;
            r.find_hadamard();
            ++checks;
            if (r.had_signs.empty()) {
                ++fails;
                std::printf("FAIL hadamard B %d not recognised\n", B);
                continue;
            }
            std::vector<float> x(r.dim), fast(r.dim), slow(r.dim);
            for (float& v : x) v = nd(rng) * (rng() % 7 == 0 ? 30.0f : 1.0f);
            fast = x;
            r.apply(fast.data(), K_SCALAR);
            Rotation ref = r;
            ref.had_signs.clear();
            ref.had_gain.clear();
            slow = x;
            ref.apply(slow.data(), K_SCALAR);
            double mag = 0.0;
            for (float v : x) mag = std::max(mag, (double)std::fabs(v));
            for (int i = 0; i < r.dim; ++i) {
                ++checks;
                ++n_had;
                if (std::fabs(fast[i] - slow[i]) > 1e-5 * mag * std::sqrt((double)B) * 127.0 * r.s1[i % B] + 1e-6 * mag) {
                    ++fails;
                    std::printf("FAIL hadamard B %d tail %d row %d: %g vs %g\n", B, tl, i, fast[i], slow[i]);
                }
            }
            r.q1[(size_t)(B / 2) * B + 3] = (int8_t)-r.q1[(size_t)(B / 2) * B + 3];
            r.find_hadamard();
            ++checks;
            if (!r.had_signs.empty()) {
                ++fails;
                std::printf("FAIL hadamard B %d: a changed code still recognised\n", B);
            }
        }
    std::printf("fast Walsh-Hadamard path checked against the int8 block product: %d values\n", n_had);
    std::printf("rotation kernels: %d sets, %d checks, %d failures\n", (int)sets.size(), checks, fails);
    return fails ? 1 : 0;
}
