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
    fuzz::open_and_exercise(file.data(), file.size());
    return 0;
}
