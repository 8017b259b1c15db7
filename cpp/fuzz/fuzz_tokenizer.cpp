// libFuzzer harness: the tokenizer on real vocabularies (the models listed in $WQEDGE_FUZZ_VOCABS,
// colon-separated: SentencePiece and byte-level BPE). Byte 0 of the input picks the vocabulary and the
// operation; the rest is text to encode (any bytes: invalid UTF-8, NULs, special-token texts) or int32
// ids to decode (any values: out of range, negative). Encoded ids must lie in the vocabulary; decoding
// and token_to_piece must never fail on any id list.
#include <cstring>
#include <string>

#include "fuzz_common.h"

static std::vector<wqe_model*> g_models;
static std::vector<int32_t> g_vocab;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    const char* env = std::getenv("WQEDGE_FUZZ_VOCABS");
    if (!env) { std::fprintf(stderr, "fuzz_tokenizer: set WQEDGE_FUZZ_VOCABS=model.gguf[:model.gguf...]\n"); std::exit(2); }
    std::string list = env;
    size_t at = 0;
    while (at <= list.size()) {
        const size_t end = std::min(list.find(':', at), list.size());
        const std::string path = list.substr(at, end - at);
        at = end + 1;
        if (path.empty()) continue;
        wqe_model* m = nullptr;
        if (wqe_model_open(path.c_str(), &m) != WQE_OK) {
            std::fprintf(stderr, "fuzz_tokenizer: %s: %s\n", path.c_str(), wqe_last_error());
            std::exit(2);
        }
        wqe_model_info info;
        wqe_model_get_info(m, &info);
        if (!info.has_tokenizer) { std::fprintf(stderr, "fuzz_tokenizer: %s has no tokenizer\n", path.c_str()); std::exit(2); }
        g_models.push_back(m);
        g_vocab.push_back(info.n_vocab);
    }
    if (g_models.empty()) std::exit(2);
    std::atexit([] {  // not a leak: free the vocabularies before LeakSanitizer's exit check
        for (wqe_model* m : g_models) wqe_model_free(m);
    });
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 1) return 0;
    const int sel = data[0];
    wqe_model* m = g_models[(sel >> 2) % g_models.size()];
    const int32_t V = g_vocab[(sel >> 2) % g_models.size()];
    const uint8_t* p = data + 1;
    const size_t n = size - 1;
    static std::vector<int32_t> ids;
    static std::string text;
    if ((sel & 3) < 2) {  // encode (with/without BOS), then decode what came out
        ids.resize(n + 16);
        int32_t k = 0;
        int st = wqe_tokenize(m, (const char*)p, n, sel & 1, ids.data(), (int32_t)ids.size(), &k);
        if (st == WQE_ERR_BUFFER_TOO_SMALL) {
            fuzz::invariant(k > (int32_t)ids.size(), "BUFFER_TOO_SMALL reports the size needed");
            ids.resize(k);
            st = wqe_tokenize(m, (const char*)p, n, sel & 1, ids.data(), (int32_t)ids.size(), &k);
        }
        fuzz::invariant(st == WQE_OK, "tokenize accepts any bytes");
        for (int32_t i = 0; i < k; ++i) fuzz::invariant(ids[i] >= 0 && ids[i] < V, "token id inside the vocabulary");
        ids.resize(k);
    } else {  // arbitrary ids
        ids.resize(n / 4);
        if (!ids.empty()) std::memcpy(ids.data(), p, 4 * ids.size());
    }
    size_t len = 0;
    text.resize(256);
    int st = wqe_detokenize(m, ids.data(), (int32_t)ids.size(), &text[0], text.size(), &len);
    if (st == WQE_ERR_BUFFER_TOO_SMALL) {
        text.resize(len + 1);
        st = wqe_detokenize(m, ids.data(), (int32_t)ids.size(), &text[0], text.size(), &len);
    }
    fuzz::invariant(st == WQE_OK, "detokenize accepts any ids");
    for (size_t i = 0; i < ids.size() && i < 64; ++i) {
        char piece[64];
        const int ps = wqe_token_to_piece(m, ids[i], sel & 1, piece, sizeof piece, &len);
        const bool in_vocab = ids[i] >= 0 && ids[i] < V;
        fuzz::invariant(in_vocab ? (ps == WQE_OK || ps == WQE_ERR_BUFFER_TOO_SMALL) : ps == WQE_ERR_INVALID_ARGUMENT,
                        "token_to_piece: pieces of vocabulary ids, a clean error for the others");
    }
    return 0;
}
