// Internal helpers shared by the runtime: status codes, error reporting, fp16 conversion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "wqedge.h"

namespace wqe {

// An on/off switch from the environment: `dflt` when `name` is unset or empty, else on unless it is "0".
inline bool env_switch(const char* name, bool dflt) {
    const char* e = std::getenv(name);
    return e && *e ? std::strcmp(e, "0") != 0 : dflt;
}

// Every internal failure is an Error carrying a status code and a readable message;
// the C API catches it at the boundary and turns it into (code, wqe_last_error()).
struct Error : std::runtime_error {
    int code;
    Error(int c, const std::string& msg) : std::runtime_error(msg), code(c) {}
};

[[noreturn]] void fail(int code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// IEEE half <-> float, exact (subnormals, inf, nan), no CPU feature needed.
inline float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
            mant &= 0x3FFu;
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | mant << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | mant << 13;
    } else {
        bits = sign | (exp + 112) << 23 | mant << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t fp32_to_fp16(float f);  // round to nearest even

inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint64_t load_u64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline float load_h(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }
// A hint to bring the cache line at p into all cache levels (strided reads the hardware streamers miss).
inline void prefetch_read(const void* p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
}

}  // namespace wqe
