// AArch64 NEON kernels of the two-level kinds q4s, q3s, q2s (blocks.h, sub_bytes; docs/format.md): the twins of
// kernels_subscale_avx2.cpp, registered in the K_NEON column of the traits table. Per 32-column sub-block the codes
// are widened to two byte vectors in column order (0-15, 16-31). The int8 dot uses plain NEON (vmull_s8 +
// vpadalq_s16) on every core, with or without the dot-product extension: the codes are at most 15, so one
// instruction path is exact everywhere. Dequantization: D q is exact in fp32, so w = D q - M rounds once however
// the compiler contracts it, bit-identical to the scalar reference.
#if defined(__aarch64__)

#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"  // XQ8

namespace wqe {
namespace neon {
namespace {

float half_at(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

// One sub-block's codes as two byte vectors: columns 0-15, 16-31.
struct Codes {
    uint8x16_t v[2];
};
void codes32_q4(const uint8_t* q, Codes* c) {  // byte j: column j low nibble, column j + 16 high nibble
    const uint8x16_t v = vld1q_u8(q);
    c->v[0] = vandq_u8(v, vdupq_n_u8(0x0F));
    c->v[1] = vshrq_n_u8(v, 4);
}
void codes32_q2(const uint8_t* q, Codes* c) {  // byte j bits 2k..2k+1: column 8k + j
    const uint8x8_t b = vld1_u8(q), m = vdup_n_u8(3);
    c->v[0] = vcombine_u8(vand_u8(b, m), vand_u8(vshr_n_u8(b, 2), m));
    c->v[1] = vcombine_u8(vand_u8(vshr_n_u8(b, 4), m), vshr_n_u8(b, 6));
}
void codes32_q3(const uint8_t* q, Codes* c) {  // q2 of the low bits, then bit c of a u32: column c's third bit
    codes32_q2(q, c);
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t sel = vld1q_u8(bit), four = vdupq_n_u8(4);
    const uint8_t* h = q + 8;
    const uint8x16_t h0 = vcombine_u8(vdup_n_u8(h[0]), vdup_n_u8(h[1]));
    const uint8x16_t h1 = vcombine_u8(vdup_n_u8(h[2]), vdup_n_u8(h[3]));
    c->v[0] = vorrq_u8(c->v[0], vandq_u8(vtstq_u8(h0, sel), four));
    c->v[1] = vorrq_u8(c->v[1], vandq_u8(vtstq_u8(h1, sel), four));
}

// Columns 4k..4k+3 (k = 0..3) of a 16-byte code vector as floats.
void widen16(uint8x16_t c, float32x4_t v[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(c)), hi = vmovl_high_u8(c);
    v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

#include "kernels_subscale.inc"

template <void (*CODES)(const uint8_t*, Codes*), int SUB_BYTES>
float dot_sub(const uint8_t* rb, const float* xc, float, int g_pad) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    each_sub<CODES, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, const Codes& c) {
        float32x4_t sq = vdupq_n_f32(0.0f), sx = vdupq_n_f32(0.0f);
        for (int h = 0; h < 2; ++h) {
            float32x4_t v[4];
            widen16(c.v[h], v);
            for (int k = 0; k < 4; ++k) {
                const float32x4_t x = vld1q_f32(xc + 32 * b + 16 * h + 4 * k);
                sq = vfmaq_f32(sq, v[k], x);
                sx = vaddq_f32(sx, x);
            }
        }
        acc = vfmaq_n_f32(acc, sq, D);
        acc = vfmsq_n_f32(acc, sx, M);
    });
    return vaddvq_f32(acc);
}

template <void (*CODES)(const uint8_t*, Codes*), int SUB_BYTES>
void dequant_sub(const uint8_t* rb, int g_pad, float* out) {
    each_sub<CODES, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, const Codes& c) {
        const float32x4_t vd = vdupq_n_f32(D), vm = vdupq_n_f32(M);
        for (int h = 0; h < 2; ++h) {
            float32x4_t v[4];
            widen16(c.v[h], v);
            for (int k = 0; k < 4; ++k) vst1q_f32(out + 32 * b + 16 * h + 4 * k, vsubq_f32(vmulq_f32(vd, v[k]), vm));
        }
    });
}

template <void (*CODES)(const uint8_t*, Codes*), int SUB_BYTES>
float dot8_sub(const uint8_t* rb, const XQ8* xq, float, int g_pad) {
    float acc = 0.0f, mins = 0.0f;
    each_sub<CODES, SUB_BYTES>(rb, g_pad, [&](int b, float D, float M, const Codes& c) {
        const int8x16_t c0 = vreinterpretq_s8_u8(c.v[0]), c1 = vreinterpretq_s8_u8(c.v[1]);
        const int8x16_t x0 = vld1q_s8(xq[b].q), x1 = vld1q_s8(xq[b].q + 16);
        int32x4_t s32 = vdupq_n_s32(0);
        s32 = vpadalq_s16(s32, vmull_s8(vget_low_s8(c0), vget_low_s8(x0)));
        s32 = vpadalq_s16(s32, vmull_high_s8(c0, x0));
        s32 = vpadalq_s16(s32, vmull_s8(vget_low_s8(c1), vget_low_s8(x1)));
        s32 = vpadalq_s16(s32, vmull_high_s8(c1, x1));
        acc += xq[b].d * D * (float)vaddvq_s32(s32);
        mins += M * xq[b].ds;
    });
    return acc - mins;
}

}  // namespace

WQE_SUB_KERNELS(q4s, codes32_q4, 16)
WQE_SUB_KERNELS(q3s, codes32_q3, 12)
WQE_SUB_KERNELS(q2s, codes32_q2, 8)

}  // namespace neon
}  // namespace wqe

#endif  // __aarch64__
