// Quantized KV cache rows (kvcache.h): every SIMD path built here (AVX2 on x86-64, NEON on AArch64) against the
// scalar reference: the rows' values (kv_rows_values) and attention over them as the runtime runs it (the values
// through VecOps::att_scores / att_values, within 1e-5 of the magnitude of their terms); dequantized values within
// half a grid step of the input; the Walsh-Hadamard transform is its own inverse and keeps norms.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "blocks.h"
#include "common.h"
#include "kvcache.h"
#if defined(__x86_64__) || defined(__i386__)
#  include "kernels_x86.h"
#endif

int main() {
    using namespace wqe;
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int fails = 0, checks = 0;
    std::vector<int> sets = {K_SCALAR};
    if (cpu_has_avx2()) sets.push_back(K_AVX2);
    if (cpu_has_neon()) sets.push_back(K_NEON);
    for (int hd : {64, 128, 96, 80, 6}) {
        // Hadamard: H H x = x, |H x| = |x|.
        const int blk = hd & -hd;
        std::vector<float> x(hd), y;
        for (float& v : x) v = nd(rng) * (rng() % 9 == 0 ? 20.0f : 1.0f);
        y = x;
        kv_hadamard(y.data(), hd, blk);
        double n0 = 0.0, n1 = 0.0;
        for (int i = 0; i < hd; ++i) n0 += (double)x[i] * x[i], n1 += (double)y[i] * y[i];
        kv_hadamard(y.data(), hd, blk);
        ++checks;
        bool ok = std::fabs(n1 - n0) <= 1e-5 * n0;
        for (int i = 0; i < hd; ++i) ok = ok && std::fabs(y[i] - x[i]) <= 1e-5f * (1.0f + std::fabs(x[i]));
        if (!ok) ++fails, std::printf("FAIL hadamard hd %d\n", hd);
        for (int bits : {8, 4}) {
            const KvFormat f = KvFormat::make(bits, true, hd);
            const int n = 37;
            std::vector<float> X((size_t)n * hd), q(hd), p(n), deq(hd);
            std::vector<uint8_t> rows((size_t)n * f.row_bytes);
            for (float& v : X) v = nd(rng) * (rng() % 11 == 0 ? 8.0f : 1.0f);
            for (float& v : q) v = nd(rng);
            for (float& v : p) v = std::fabs(nd(rng));
            for (int i = 0; i < n; ++i) {
                kv_quantize(f, &X[(size_t)i * hd], &rows[(size_t)i * f.row_bytes], K_SCALAR);
                kv_dequantize(f, &rows[(size_t)i * f.row_bytes], deq.data());
                for (int g0 = 0; g0 < hd; g0 += f.group) {  // |x - x^| <= step/2 (+ the fp16 rounding of the min)
                    float mn = X[(size_t)i * hd + g0], mx = mn;
                    for (int j = 0; j < f.group; ++j) {
                        mn = std::min(mn, X[(size_t)i * hd + g0 + j]);
                        mx = std::max(mx, X[(size_t)i * hd + g0 + j]);
                    }
                    const float step = (mx - mn) / (float)((1 << bits) - 1);
                    for (int j = 0; j < f.group; ++j) {
                        ++checks;
                        if (std::fabs(deq[g0 + j] - X[(size_t)i * hd + g0 + j]) > 0.5f * step * 1.01f + 2e-3f * std::fabs(mn) + 1e-6f) {
                            ++fails;
                            std::printf("FAIL quantize bits %d hd %d row %d col %d: %g vs %g (step %g)\n", bits, hd, i, g0 + j,
                                        deq[g0 + j], X[(size_t)i * hd + g0 + j], step);
                        }
                    }
                }
            }
            // reference: scores and weighted sum over kv_dequantize's values, in double
            std::vector<double> ref_s(n, 0.0), ref_o(hd, 0.0), mag_s(n, 0.0), mag_o(hd, 0.0);
            for (int i = 0; i < n; ++i) {
                kv_dequantize(f, &rows[(size_t)i * f.row_bytes], deq.data());
                for (int j = 0; j < hd; ++j) {
                    ref_s[i] += (double)q[j] * deq[j];
                    ref_o[j] += (double)p[i] * deq[j];
                    mag_s[i] += std::fabs((double)q[j] * deq[j]);
                    mag_o[j] += std::fabs((double)p[i] * deq[j]);
                }
            }
            for (int k : sets) {
                std::vector<float> vals((size_t)n * hd), s(n), o(hd, 0.0f);
                kv_rows_values(f, rows.data(), n, n, vals.data(), k);
                for (int i = 0; i < n; ++i) {  // kv_rows_values == kv_dequantize up to the fused d * c + m (1e-6 of |d c| + |m|)
                    const uint8_t* r = &rows[(size_t)i * f.row_bytes];
                    float* v = &vals[(size_t)i * hd];
                    kv_dequantize(f, r, deq.data());
                    for (int j = 0; j < hd; ++j) {
                        const uint8_t* gp = r + (size_t)(j / f.group) * (4 + f.group * bits / 8);
                        const float d = load_h(gp), m = load_h(gp + 2);
                        ++checks;
                        if (std::fabs(v[j] - deq[j]) > 1e-6f * (std::fabs(deq[j] - m) + std::fabs(m)) + 1e-30f) {
                            ++fails;
                            std::printf("FAIL values set %d bits %d hd %d row %d col %d: %g vs %g (d %g)\n", k, bits, hd, i, j, v[j], deq[j], d);
                        }
                    }
                }
                const VecOps& ops = vec_ops(k);
                ops.att_scores(q.data(), 1, hd, vals.data(), hd, n, 1.0f, s.data(), n);
                ops.att_values(p.data(), n, 1, hd, vals.data(), hd, n, o.data());
                for (int i = 0; i < n; ++i) {
                    ++checks;
                    if (std::fabs((double)s[i] - ref_s[i]) > 1e-5 * mag_s[i] + 1e-30) {
                        ++fails;
                        std::printf("FAIL scores set %d bits %d hd %d row %d: %g vs %g\n", k, bits, hd, i, s[i], ref_s[i]);
                    }
                }
                for (int j = 0; j < hd; ++j) {
                    ++checks;
                    if (std::fabs((double)o[j] - ref_o[j]) > 1e-5 * mag_o[j] + 1e-30) {
                        ++fails;
                        std::printf("FAIL values sum set %d bits %d hd %d col %d: %g vs %g\n", k, bits, hd, j, o[j], ref_o[j]);
                    }
                }
            }
        }
    }
    // The quantized cache's rows read as stored (VecOps::att_scores_kv / att_values_kv, where a set has them): within
    // 1e-5 of the terms of the scalar reference (kv_dequantize's values, double sums), and bit for bit what converting
    // the rows with kv_rows_values and running att_scores / att_values gives with the same set, at
    // 8 and 4 bits, for 1-5 query heads, row counts around the passes' 4 and 8 keys and the prefetch distance, and
    // widths of 1-8 groups.
    // A case's inputs: nq queries, probabilities P (row stride ldp) and starting outputs O0, and n rows quantized from
    // normal values (every `every`-th one times `outlier`, so groups have outliers).
    struct KvCase {
        KvFormat f;
        size_t ldp;
        std::vector<float> q, P, O0;
        std::vector<uint8_t> rows;
    };
    auto kv_case = [&](const KvFormat& f, int nq, int n, size_t ldp, int every, float outlier) {
        const int hd = f.head_dim;
        KvCase c{f, ldp, std::vector<float>((size_t)nq * hd), std::vector<float>((size_t)nq * ldp),
                 std::vector<float>((size_t)nq * hd), std::vector<uint8_t>((size_t)n * f.row_bytes)};
        std::vector<float> X((size_t)n * hd);
        for (float& v : X) v = nd(rng) * (rng() % every == 0 ? outlier : 1.0f);
        for (float& v : c.q) v = nd(rng);
        for (float& v : c.P) v = std::fabs(nd(rng));
        for (float& v : c.O0) v = nd(rng);
        for (int i = 0; i < n; ++i) kv_quantize(f, &X[(size_t)i * hd], &c.rows[(size_t)i * f.row_bytes], K_SCALAR);
        return c;
    };
    int n_kv = 0;
    for (int k : sets) {
        const VecOps& ops = vec_ops(k);
        if (!ops.att_scores_kv) continue;
        for (int bits : {8, 4})
            for (int hd : {32, 64, 96, 128})
                for (int nq : {1, 2, 3, 5, 8})
                    for (int n : {1, 3, 4, 5, 8, 9, 17, 67}) {
                        const KvCase c = kv_case(KvFormat::make(bits, true, hd), nq, n, (size_t)n + 3, 11, 8.0f);
                        const KvFormat& f = c.f;
                        const size_t ldp = c.ldp;
                        const std::vector<float>&q = c.q, &P = c.P, &O0 = c.O0;
                        const std::vector<uint8_t>& rows = c.rows;
                        std::vector<float> vals((size_t)n * hd), sa((size_t)nq * ldp, 0.0f), sb = sa, oa = O0, ob = O0;
                        kv_rows_values(f, rows.data(), n, n, vals.data(), k);
                        ops.att_scores(q.data(), nq, hd, vals.data(), hd, n, 0.125f, sa.data(), ldp);
                        ops.att_scores_kv(q.data(), nq, hd, rows.data(), f.row_bytes, bits, n, 0.125f, sb.data(), ldp);
                        ops.att_values(P.data(), ldp, nq, hd, vals.data(), hd, n, oa.data());
                        ops.att_values_kv(P.data(), ldp, nq, hd, rows.data(), f.row_bytes, bits, n, ob.data());
                        // and against the scalar reference (kv_dequantize's values, sums in double): within 1e-5 of the terms
                        std::vector<float> deq_r(hd);
                        for (int j = 0; j < nq; ++j) {
                            std::vector<double> ro(hd), mo(hd, 1e-30);
                            for (int e = 0; e < hd; ++e) ro[e] = O0[(size_t)j * hd + e], mo[e] += std::fabs(O0[(size_t)j * hd + e]);
                            for (int i = 0; i < n; ++i) {
                                kv_dequantize(f, &rows[(size_t)i * f.row_bytes], deq_r.data());
                                double r = 0.0, mag = 1e-30;
                                for (int e = 0; e < hd; ++e) {
                                    r += (double)q[(size_t)j * hd + e] * deq_r[e];
                                    mag += std::fabs((double)q[(size_t)j * hd + e] * deq_r[e]);
                                    ro[e] += (double)P[(size_t)j * ldp + i] * deq_r[e];
                                    mo[e] += std::fabs((double)P[(size_t)j * ldp + i] * deq_r[e]);
                                }
                                ++checks;
                                if (std::fabs(sb[(size_t)j * ldp + i] - 0.125 * r) > 1e-5 * 0.125 * mag)
                                    ++fails, std::printf("FAIL att_scores_kv set %d bits %d hd %d nq %d n %d: %g vs reference %g\n", k, bits, hd, nq, n,
                                                         sb[(size_t)j * ldp + i], 0.125 * r);
                            }
                            for (int e = 0; e < hd; ++e) {
                                ++checks;
                                if (std::fabs(ob[(size_t)j * hd + e] - ro[e]) > 1e-5 * mo[e])
                                    ++fails, std::printf("FAIL att_values_kv set %d bits %d hd %d nq %d n %d col %d: %g vs reference %g\n", k, bits, hd,
                                                         nq, n, e, ob[(size_t)j * hd + e], ro[e]);
                            }
                        }
                        checks += 2;
                        ++n_kv;
                        if (sa != sb) ++fails, std::printf("FAIL att_scores_kv set %d bits %d hd %d nq %d n %d: not the bits of converted rows\n", k, bits, hd, nq, n);
                        if (oa != ob) ++fails, std::printf("FAIL att_values_kv set %d bits %d hd %d nq %d n %d: not the bits of converted rows\n", k, bits, hd, nq, n);
                    }
    }
    std::printf("kv cache: quantized rows read as stored, %d cases bit-identical to converted rows\n", n_kv);
#if defined(__x86_64__) || defined(__i386__)
    // The AVX-512 read-as-stored kernels (what vec_ops(K_AVX2) holds where the CPU has AVX-512: four heads' scores a pass,
    // values 16 columns a register) against the AVX2 ones directly, bit for bit, whichever the switch selects: 1-9
    // heads (runs of four and the rest), key counts around a pass's 8 and the prefetch distance, 1-8 groups a row.
    if (cpu_has_avx512()) {
        int n_z = 0;
        for (int bits : {8, 4})
            for (int hd : {16, 32, 64, 96, 128})
                for (int nq : {1, 2, 3, 4, 5, 7, 8, 9})
                    for (int n : {1, 5, 8, 9, 23, 67}) {
                        if (KvFormat::make(bits, false, hd).group != kv_group(bits)) continue;  // (the kernels' layout; model.cpp converts others)
                        const KvCase c = kv_case(KvFormat::make(bits, false, hd), nq, n, (size_t)n + 1, 7, 16.0f);
                        const KvFormat& f = c.f;
                        const size_t ldp = c.ldp;
                        const std::vector<float>&q = c.q, &P = c.P, &O0 = c.O0;
                        const std::vector<uint8_t>& rows = c.rows;
                        std::vector<float> sa((size_t)nq * ldp, 0.0f), sb = sa, oa = O0, ob = O0;
                        avx2::att_scores_kv(q.data(), nq, hd, rows.data(), f.row_bytes, bits, n, 0.125f, sa.data(), ldp);
                        avx2::z512::att_scores_kv(q.data(), nq, hd, rows.data(), f.row_bytes, bits, n, 0.125f, sb.data(), ldp);
                        avx2::att_values_kv(P.data(), ldp, nq, hd, rows.data(), f.row_bytes, bits, n, oa.data());
                        avx2::z512::att_values_kv(P.data(), ldp, nq, hd, rows.data(), f.row_bytes, bits, n, ob.data());
                        checks += 2;
                        ++n_z;
                        if (sa != sb) ++fails, std::printf("FAIL att_scores_kv AVX-512 bits %d hd %d nq %d n %d: not AVX2's bits\n", bits, hd, nq, n);
                        if (oa != ob) ++fails, std::printf("FAIL att_values_kv AVX-512 bits %d hd %d nq %d n %d: not AVX2's bits\n", bits, hd, nq, n);
                    }
        std::printf("kv cache: AVX-512 read-as-stored kernels bit-identical to AVX2's in %d cases\n", n_z);
    } else {
        std::printf("kv cache: AVX-512 read-as-stored kernels not run (this CPU has no AVX-512)\n");
    }
#endif
    std::printf("kv cache kernels: %d sets, %d checks, %d failures\n", (int)sets.size(), checks, fails);
    return fails ? 1 : 0;
}
