// libFuzzer harness: whole files through the C API (open -> info, tokenizer, eval, generate).
// Every input must give WQE_OK or a clean error status with a message; crashes, sanitizer reports,
// leaks and timeouts are findings. Seeds: tiny models written by cpp/fuzz/make_seeds.py.
#include <cstring>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::open_and_exercise(data, size);
    return 0;
}
