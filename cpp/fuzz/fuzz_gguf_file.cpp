// libFuzzer harness: whole files through the C API (open -> info, tokenizer, eval, generate).
// Every input must give WQE_OK or a clean error status with a message; crashes, sanitizer reports,
// leaks and timeouts are findings. Seeds: tiny models written by cpp/fuzz/make_seeds.py.
#include <cstring>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    wqe_model* m = nullptr;
    const int st = wqe_model_open(fuzz::as_file(data, size).c_str(), &m);
    if (st != WQE_OK) {
        fuzz::invariant(m == nullptr && std::strlen(wqe_last_error()) > 0, "a failed open leaves no model and says why");
        return 0;
    }
    fuzz::exercise(m);
    wqe_model_free(m);
    return 0;
}
