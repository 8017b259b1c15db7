// libFuzzer harness: the header region (magic, counts, KV pairs, tensor infos) of a valid model, with
// its tensor data kept. The input is the header; the file is input + zero padding to 32 bytes + the data
// section of the model in $WQEDGE_FUZZ_DATA (written by make_seeds.py with the header as the seed), so
// mutations of keys, shapes, types and offsets meet real weights instead of a truncated file.
#include <cstring>

#include "fuzz_common.h"

static std::vector<uint8_t> g_data_section;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    g_data_section = fuzz::read_all(std::getenv("WQEDGE_FUZZ_DATA"));
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static std::vector<uint8_t> file;
    file.assign(data, data + size);
    file.resize((size + 31) / 32 * 32, 0);
    file.insert(file.end(), g_data_section.begin(), g_data_section.end());
    wqe_model* m = nullptr;
    const int st = wqe_model_open(fuzz::as_file(file.data(), file.size()).c_str(), &m);
    if (st != WQE_OK) {
        fuzz::invariant(m == nullptr && std::strlen(wqe_last_error()) > 0, "a failed open leaves no model and says why");
        return 0;
    }
    fuzz::exercise(m);
    wqe_model_free(m);
    return 0;
}
