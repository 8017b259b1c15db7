// wqedge-perplexity: perplexity of a wqedge model on a text file, as llama.cpp's perplexity tool
// defines it (and wqedge.perplexity): the text tokenized once with a leading BOS, cut into
// non-overlapping windows of n_ctx tokens whose first token is replaced by BOS; only the second half
// of each window is scored (positions n_ctx/2 .. n_ctx-2 predicting the next token).
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common.h"

static const char* USAGE =
    "usage: wqedge-perplexity -m MODEL.gguf -f TEXT [options]\n"
    "  -c, --ctx N        window length (default 512)\n"
    "  --chunks N         windows to score; 0 = all (default 32)\n"
    "  -t, --threads N    threads (default: all available)\n"
    "  --kernels K        auto | scalar | avx2\n"
    "  --kv-bits B        KV cache: f32 | f16 | 8 | 4 (default: the file's setting; docs/format.md \"KV cache\")\n";

int main(int argc, char** argv) {
    tools::Args a(argc, argv);
    if (a.flag("-h") || a.flag("--help")) { std::printf("%s", USAGE); return 0; }
    const std::string model_path = a.str("-m", "--model", "");
    const std::string text_path = a.str("-f", "--file", "");
    const int n_ctx = (int)a.num("-c", "--ctx", 512);
    int n_chunks = (int)a.num("--chunks", "", 32);
    const int threads = (int)a.num("-t", "--threads", 0);
    const std::string kernels = a.str("--kernels", "", "auto");
    const std::string kv_bits = a.str("--kv-bits", "", "");
    a.done(USAGE);
    if (model_path.empty() || text_path.empty() || n_ctx < 4 || n_ctx % 2) { std::fprintf(stderr, "%s", USAGE); return 2; }
    if (kernels != "auto") tools::ok(wqe_set_kernels(kernels == "scalar" ? WQE_KERNELS_SCALAR : WQE_KERNELS_AVX2), "kernels");

    wqe_model* model = nullptr;
    tools::ok(wqe_model_open(model_path.c_str(), &model), "open");
    wqe_model_info info;
    tools::ok(wqe_model_get_info(model, &info), "info");
    if (info.bos_token_id < 0) tools::die("the model has no BOS token");
    const double t_tok = tools::now_s();
    const std::vector<int32_t> tokens = tools::tokenize(model, tools::read_file(text_path), 1);
    std::fprintf(stderr, "tokenized %zu tokens in %.2f s\n", tokens.size(), tools::now_s() - t_tok);
    const int available = (int)(tokens.size() / n_ctx);
    if (available == 0) tools::die("text is shorter than one window");
    if (n_chunks <= 0 || n_chunks > available) n_chunks = available;

    wqe_context_params cp = wqe_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_threads = threads;
    cp.kv_bits = kv_bits == "f32" ? 32 : kv_bits == "f16" ? 16 : kv_bits == "8" ? 8 : kv_bits == "4" ? 4 : 0;
    if (!kv_bits.empty() && cp.kv_bits == 0) tools::die("--kv-bits must be f32, f16, 8 or 4, got '" + kv_bits + "'");
    wqe_context* ctx = nullptr;
    tools::ok(wqe_context_new(model, &cp, &ctx), "context");
    const int V = info.n_vocab, half = n_ctx / 2;
    std::vector<float> logits((size_t)n_ctx * V);
    double nll = 0.0;
    long n_scored = 0;
    const double t0 = tools::now_s();
    for (int w = 0; w < n_chunks; ++w) {
        std::vector<int32_t> win(tokens.begin() + (size_t)w * n_ctx, tokens.begin() + (size_t)(w + 1) * n_ctx);
        win[0] = info.bos_token_id;
        tools::ok(wqe_set_position(ctx, 0), "reset");
        tools::ok(wqe_eval(ctx, win.data(), n_ctx, logits.data(), 1), "eval");
        for (int j = half; j < n_ctx - 1; ++j) {
            const float* l = &logits[(size_t)j * V];
            double mx = l[0];
            for (int i = 1; i < V; ++i) mx = std::max(mx, (double)l[i]);
            double s = 0.0;
            for (int i = 0; i < V; ++i) s += std::exp((double)l[i] - mx);
            nll += mx + std::log(s) - (double)l[win[j + 1]];
            ++n_scored;
        }
        std::fprintf(stderr, "[%d/%d] %.4f  (%.1f tok/s)\n", w + 1, n_chunks, std::exp(nll / n_scored),
                     (double)(w + 1) * n_ctx / (tools::now_s() - t0));
    }
    std::printf("perplexity %.4f over %d windows of %d tokens (%ld tokens scored)\n", std::exp(nll / n_scored), n_chunks,
                n_ctx, n_scored);
    wqe_context_free(ctx);
    wqe_model_free(model);
    return 0;
}
