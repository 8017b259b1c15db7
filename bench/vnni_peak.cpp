// The CPU's own ceiling for the int8 kernels (issues 12 and 15): how many `vpdpbusd` (u8 x s8 -> s32, 4 products per
// 32-bit lane) one core retires per nanosecond, on 512-bit (zmm) and 256-bit (ymm) registers, with C independent
// accumulator chains and register operands only (no loads), so nothing but the instruction's latency (few chains) or
// its throughput (many chains) limits it. Every chain starts from a different value, so the compiler cannot merge
// them. The best figure over the chain counts is the peak a kernel built on the instruction can approach:
// multiply-adds per ns = peak x 64 (zmm) or x 32 (ymm).
//
//   g++ -O2 -std=c++17 bench/vnni_peak.cpp -o /tmp/vnni_peak && /tmp/vnni_peak
//
// Needs AVX512-VNNI + AVX512VL (zmm and ymm forms); prints a line and exits 0 on CPUs without them.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

#define WQE_VNNI __attribute__((target("avx512f,avx512vl,avx512vnni"), noinline))
#define WQE_CHAINS(NAME, V, DP, SET)                                                                                 \
    template <int C>                                                                                                  \
    WQE_VNNI static double NAME(long iters) {                                                                         \
        V acc[C];                                                                                                     \
        _Pragma("GCC unroll 16") for (int c = 0; c < C; ++c) acc[c] = SET(c + 1);                                     \
        V a = SET(0x03030303), b = SET(0x05050505);                                                                   \
        const auto t0 = std::chrono::steady_clock::now();                                                             \
        for (long i = 0; i < iters; ++i) {                                                                            \
            _Pragma("GCC unroll 16") for (int c = 0; c < C; ++c) acc[c] = DP(acc[c], a, b);                             \
            __asm__ volatile("" : "+v"(a), "+v"(b)); /* opaque operands: nothing is hoisted out of the loop */        \
        }                                                                                                             \
        const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();    \
        int32_t sum = 0;                                                                                              \
        for (int c = 0; c < C; ++c) {                                                                                 \
            int32_t lanes[sizeof(V) / 4];                                                                             \
            __builtin_memcpy(lanes, &acc[c], sizeof lanes);                                                           \
            sum += lanes[0];                                                                                          \
        }                                                                                                             \
        g_sink = g_sink + sum;                                                                                        \
        return (double)iters * C / ns;                                                                                \
    }
static volatile int32_t g_sink;
WQE_CHAINS(chains_zmm, __m512i, _mm512_dpbusd_epi32, _mm512_set1_epi32)
WQE_CHAINS(chains_ymm, __m256i, _mm256_dpbusd_epi32, _mm256_set1_epi32)

template <int C>
static void row(long iters) {
    const double z = chains_zmm<C>(iters), y = chains_ymm<C>(iters);
    std::printf("%2d chains: zmm %.2f /ns (%.0f multiply-adds/ns)   ymm %.2f /ns (%.0f multiply-adds/ns)\n", C, z, 64 * z, y,
                32 * y);
}

int main() {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vl")) {
        std::printf("no AVX512-VNNI here: nothing to measure\n");
        return 0;
    }
    const long iters = 50000000;
    row<1>(iters);
    row<2>(iters / 2);
    row<4>(iters / 4);
    row<8>(iters / 8);
    row<12>(iters / 12);
    return 0;
}
