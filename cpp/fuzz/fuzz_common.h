// Shared by the libFuzzer harnesses: the loader takes a path, so each input is written to one
// memory-backed file (memfd, no disk I/O) opened as /proc/self/fd/N; and a short run of the C API on
// a model that opened.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "wqedge.h"

namespace fuzz {

// Path of a file holding exactly `n` bytes of `data` (the same file, rewritten, on every call).
inline const std::string& as_file(const uint8_t* data, size_t n) {
    static int fd = -1;
    static std::string path;
    if (fd < 0) {
        fd = memfd_create("wqedge-fuzz", 0);
        if (fd < 0) { std::perror("memfd_create"); std::abort(); }
        path = "/proc/self/fd/" + std::to_string(fd);
    }
    if (ftruncate(fd, 0) != 0 || (n && pwrite(fd, data, n, 0) != (ssize_t)n)) { std::perror("memfd write"); std::abort(); }
    return path;
}

inline std::vector<uint8_t> read_all(const char* path) {
    std::vector<uint8_t> b;
    FILE* f = path ? std::fopen(path, "rb") : nullptr;
    if (!f) { std::fprintf(stderr, "fuzz: cannot read %s\n", path ? path : "(unset environment variable)"); std::exit(2); }
    uint8_t buf[65536];
    size_t k;
    while ((k = std::fread(buf, 1, sizeof buf, f)) > 0) b.insert(b.end(), buf, buf + k);
    std::fclose(f);
    return b;
}

// A bug, not a bad input: abort so libFuzzer reports it.
inline void invariant(bool ok, const char* what) {
    if (!ok) { std::fprintf(stderr, "fuzz invariant violated: %s (%s)\n", what, wqe_last_error()); std::abort(); }
}

// Everything a user does with a model that opened: info, plan, tokenizer round trip, eval (float and
// int8 activations), sampling, generation. Failures must be clean statuses with a message.
inline void exercise(wqe_model* m) {
    wqe_model_info info;
    invariant(wqe_model_get_info(m, &info) == WQE_OK, "get_info");
    (void)wqe_model_plan(m);
    std::vector<int32_t> toks = {info.bos_token_id >= 0 ? info.bos_token_id : 0, 1 % info.n_vocab, info.n_vocab - 1};
    if (info.has_tokenizer) {
        const char text[] = "Hello world, \xc3\xa9t\xc3\xa9 \xe2\x96\x81 <s> 123";
        int32_t ids[64], n = 0;
        const int st = wqe_tokenize(m, text, sizeof text - 1, -1, ids, 64, &n);
        invariant(st == WQE_OK || st == WQE_ERR_BUFFER_TOO_SMALL, "tokenize status");
        if (st == WQE_OK) {
            for (int i = 0; i < n; ++i) invariant(ids[i] >= 0 && ids[i] < info.n_vocab, "token id inside the vocabulary");
            char out[512];
            size_t len = 0;
            const int d = wqe_detokenize(m, ids, n, out, sizeof out, &len);
            invariant(d == WQE_OK || d == WQE_ERR_BUFFER_TOO_SMALL, "detokenize status");
            if (n > 0) toks.assign(ids, ids + (n < 6 ? n : 6));
        }
    }
    wqe_context_params cp = wqe_context_default_params();
    cp.n_ctx = 16;
    cp.n_threads = 1;
    wqe_context* ctx = nullptr;
    if (wqe_context_new(m, &cp, &ctx) != WQE_OK) return;  // e.g. a cache too large for this machine
    std::vector<float> logits((size_t)info.n_vocab * toks.size());
    for (int act : {WQE_ACT_F32, WQE_ACT_Q8}) {
        wqe_set_activations(act);
        wqe_set_position(ctx, 0);
        if (wqe_eval(ctx, toks.data(), (int32_t)toks.size(), logits.data(), 1) != WQE_OK) continue;
        int32_t one = toks[0];
        if (wqe_eval(ctx, &one, 1, logits.data(), 0) != WQE_OK) continue;  // a decode step (matvec path)
        wqe_sampler_params sp = wqe_sampler_default_params();
        sp.temperature = 0.8f;
        sp.top_p = 0.9f;
        int32_t out[4], n_out = 0;
        wqe_set_position(ctx, 0);
        const int g = wqe_generate(ctx, toks.data(), (int32_t)toks.size(), 4, &sp, 1, nullptr, nullptr, out, &n_out);
        if (g == WQE_OK)
            for (int i = 0; i < n_out; ++i) invariant(out[i] >= 0 && out[i] < info.n_vocab, "generated id inside the vocabulary");
    }
    wqe_set_activations(WQE_ACT_F32);
    wqe_context_free(ctx);
}

// Open the bytes as a model file: a failed open must leave no model and say why; an opened one is
// exercised and freed.
inline void open_and_exercise(const uint8_t* data, size_t n) {
    wqe_model* m = nullptr;
    if (wqe_model_open(as_file(data, n).c_str(), &m) != WQE_OK) {
        invariant(m == nullptr && std::strlen(wqe_last_error()) > 0, "a failed open leaves no model and says why");
        return;
    }
    exercise(m);
    wqe_model_free(m);
}

}  // namespace fuzz
