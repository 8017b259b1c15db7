// wqedge-run: generate text from a prompt with a wqedge model.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <string>
#include <vector>

#include "common.h"

static const char* USAGE =
    "usage: wqedge-run -m MODEL.gguf [-p PROMPT | -f PROMPT_FILE] [options]\n"
    "  -n, --n-predict N   tokens to generate (default 64)\n"
    "  --temp T            temperature; 0 = greedy (default 0)\n"
    "  --top-p P           nucleus sampling (default 1 = off)\n"
    "  --top-k K           top-k sampling (default 0 = off)\n"
    "  -s, --seed S        sampling seed (default 0)\n"
    "  -t, --threads N     threads (default: all available)\n"
    "  -c, --ctx N         context length (default: prompt + n, at most the model's)\n"
    "  --ignore-eos        keep generating after the end-of-sequence token\n"
    "  --kernels K         auto | scalar | avx2\n"
    "  --kv-bits B         KV cache: f32 | f16 | 8 | 4 (default: the file's setting; docs/format.md \"KV cache\")\n";

int main(int argc, char** argv) {
    tools::Args a(argc, argv);
    if (a.flag("-h") || a.flag("--help")) { std::printf("%s", USAGE); return 0; }
    const std::string model_path = a.str("-m", "--model", "");
    std::string prompt = a.str("-p", "--prompt", "");
    const std::string prompt_file = a.str("-f", "--file", "");
    const int n_predict = (int)a.num("-n", "--n-predict", 64, 1, 1 << 24);
    wqe_sampler_params sp = wqe_sampler_default_params();
    sp.temperature = (float)a.real("--temp", "", 0.0);
    sp.top_p = (float)a.real("--top-p", "", 1.0);
    sp.top_k = (int)a.num("--top-k", "", 0);
    sp.seed = (uint64_t)a.num("-s", "--seed", 0, LONG_MIN, LONG_MAX);
    const int threads = (int)a.num("-t", "--threads", 0, 0, 1024);
    int n_ctx = (int)a.num("-c", "--ctx", 0, 0, 1 << 24);
    const bool ignore_eos = a.flag("--ignore-eos");
    const std::string kernels = a.str("--kernels", "", "auto");
    const std::string kv_bits = a.str("--kv-bits", "", "");
    a.done(USAGE);
    if (model_path.empty()) { std::fprintf(stderr, "%s", USAGE); return 2; }
    if (!prompt_file.empty()) prompt = tools::read_file(prompt_file);
    if (kernels != "auto") tools::ok(wqe_set_kernels(kernels == "scalar" ? WQE_KERNELS_SCALAR : WQE_KERNELS_AVX2), "kernels");

    wqe_model* model = nullptr;
    const double t_load = tools::now_s();
    tools::ok(wqe_model_open(model_path.c_str(), &model), "open");
    wqe_model_info info;
    tools::ok(wqe_model_get_info(model, &info), "info");
    std::vector<int32_t> tokens = prompt.empty() ? std::vector<int32_t>() : tools::tokenize(model, prompt, -1);
    if (tokens.empty()) tokens.push_back(info.bos_token_id >= 0 ? info.bos_token_id : 0);
    if (n_ctx == 0) n_ctx = (int)std::min<int64_t>(info.n_ctx_train, (int64_t)tokens.size() + n_predict);
    if ((int64_t)tokens.size() + n_predict - 1 > n_ctx)  // say so up front, never stop silently at a full context
        tools::die("the prompt is " + std::to_string(tokens.size()) + " tokens and the context " + std::to_string(n_ctx) +
                   ": ask for at most " + std::to_string(std::max<int64_t>(0, n_ctx - (int64_t)tokens.size() + 1)) +
                   " new tokens (-n), or a longer context (-c)");
    wqe_context_params cp = wqe_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_threads = threads;
    cp.kv_bits = kv_bits == "f32" ? 32 : kv_bits == "f16" ? 16 : kv_bits == "8" ? 8 : kv_bits == "4" ? 4 : 0;
    if (!kv_bits.empty() && cp.kv_bits == 0) tools::die("--kv-bits must be f32, f16, 8 or 4, got '" + kv_bits + "'");
    wqe_context* ctx = nullptr;
    tools::ok(wqe_context_new(model, &cp, &ctx), "context");
    wqe_sampler* sampler = nullptr;
    tools::ok(wqe_sampler_new(&sp, &sampler), "sampler");
    const double t_ready = tools::now_s();

    std::printf("%s", prompt.c_str());
    std::fflush(stdout);
    std::vector<float> logits(info.n_vocab);
    const double t0 = tools::now_s();
    tools::ok(wqe_eval(ctx, tokens.data(), (int32_t)tokens.size(), logits.data(), 0), "eval prompt");
    const double t1 = tools::now_s();
    int n_gen = 0;
    std::string pending;
    for (; n_gen < n_predict; ++n_gen) {
        int32_t tok;
        tools::ok(wqe_sample(sampler, logits.data(), info.n_vocab, &tok), "sample");
        if (!ignore_eos && tok == info.eos_token_id) break;
        pending += tools::piece(model, tok);
        // Print whole UTF-8 sequences only.
        size_t cut = pending.size();
        for (size_t i = pending.size(); i-- > 0 && i + 4 >= pending.size();) {
            const unsigned char c = (unsigned char)pending[i];
            if ((c & 0xC0) == 0x80) continue;
            const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            if (i + need > pending.size()) cut = i;
            break;
        }
        std::fwrite(pending.data(), 1, cut, stdout);
        std::fflush(stdout);
        pending.erase(0, cut);
        if (n_gen + 1 == n_predict) { ++n_gen; break; }
        tools::ok(wqe_eval(ctx, &tok, 1, logits.data(), 0), "eval");
    }
    const double t2 = tools::now_s();
    std::fwrite(pending.data(), 1, pending.size(), stdout);
    std::printf("\n");
    std::fprintf(stderr, "\n[%s] load %.2f s | prompt %zu tokens, %.1f tok/s | generated %d tokens, %.1f tok/s | peak RSS %.1f MiB\n",
                 wqe_system_info(), t_ready - t_load, tokens.size(), tokens.size() / (t1 - t0), n_gen,
                 n_gen > 1 ? (n_gen - 1) / (t2 - t1) : 0.0, tools::peak_rss_kib() / 1024.0);
    wqe_sampler_free(sampler);
    wqe_context_free(ctx);
    wqe_model_free(model);
    return 0;
}
