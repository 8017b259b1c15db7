// wqedge-bench: prefill and decode throughput of a wqedge model (random tokens, no tokenizer needed).
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common.h"

static const char* USAGE =
    "usage: wqedge-bench -m MODEL.gguf [options]\n"
    "  -p, --prefill N     prompt tokens evaluated in one batch (default 128)\n"
    "  -n, --decode N      tokens decoded one at a time after the prompt (default 64)\n"
    "  -r, --reps N        repetitions; the median is reported (default 3)\n"
    "  -t, --threads N     threads (default: all available)\n"
    "  --kernels K         auto | scalar | avx2 | neon\n"
    "  --act A             activations of decode steps: f32 | q8 (default: the library's, WQEDGE_ACT)\n"
    "  --kv-bits B         KV cache: f32 | f16 | 8 | 4 (default: the file's setting)\n"
    "  --json              one JSON line instead of text\n";

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char** argv) {
    tools::Args a(argc, argv);
    if (a.flag("-h") || a.flag("--help")) { std::printf("%s", USAGE); return 0; }
    const std::string model_path = a.str("-m", "--model", "");
    const int n_prefill = (int)a.num("-p", "--prefill", 128);
    const int n_decode = (int)a.num("-n", "--decode", 64);
    const int reps = std::max(1, (int)a.num("-r", "--reps", 3));
    const int threads = (int)a.num("-t", "--threads", 0);
    const std::string kernels = a.str("--kernels", "", "auto");
    const std::string act = a.str("--act", "", "");
    const std::string kv_bits = a.str("--kv-bits", "", "");
    const bool json = a.flag("--json");
    a.done(USAGE);
    if (model_path.empty() || n_prefill < 1 || n_decode < 0) { std::fprintf(stderr, "%s", USAGE); return 2; }
    if (kernels != "auto")
        tools::ok(wqe_set_kernels(kernels == "scalar" ? WQE_KERNELS_SCALAR : kernels == "neon" ? WQE_KERNELS_NEON : WQE_KERNELS_AVX2),
                  "kernels");
    if (!act.empty()) {
        if (act != "f32" && act != "q8") { std::fprintf(stderr, "%s", USAGE); return 2; }
        tools::ok(wqe_set_activations(act == "q8" ? WQE_ACT_Q8 : WQE_ACT_F32), "activations");
    }

    wqe_model* model = nullptr;
    const double t_load0 = tools::now_s();
    tools::ok(wqe_model_open(model_path.c_str(), &model), "open");
    const double t_load = tools::now_s() - t_load0;
    wqe_model_info info;
    tools::ok(wqe_model_get_info(model, &info), "info");
    wqe_context_params cp = wqe_context_default_params();
    cp.n_ctx = n_prefill + n_decode;
    cp.n_threads = threads;
    cp.kv_bits = kv_bits == "f32" ? 32 : kv_bits == "f16" ? 16 : kv_bits == "8" ? 8 : kv_bits == "4" ? 4 : 0;
    if (!kv_bits.empty() && cp.kv_bits == 0) tools::die("--kv-bits must be f32, f16, 8 or 4, got '" + kv_bits + "'");
    wqe_context* ctx = nullptr;
    tools::ok(wqe_context_new(model, &cp, &ctx), "context");

    std::mt19937 rng(1);
    std::vector<int32_t> prompt(n_prefill);
    for (int32_t& t : prompt) t = (int32_t)(rng() % info.n_vocab);
    std::vector<float> logits(info.n_vocab);
    // Warm-up (page in the weights).
    tools::ok(wqe_eval(ctx, prompt.data(), std::min(n_prefill, 8), logits.data(), 0), "eval");
    std::vector<double> pre, dec, dec_cpu;  // dec_cpu: process CPU ms per decoded token (robust to a busy machine at -t 1)
    for (int r = 0; r < reps; ++r) {
        tools::ok(wqe_set_position(ctx, 0), "reset");
        double t0 = tools::now_s();
        tools::ok(wqe_eval(ctx, prompt.data(), n_prefill, logits.data(), 0), "eval prompt");
        pre.push_back(n_prefill / (tools::now_s() - t0));
        if (n_decode > 0) {
            t0 = tools::now_s();
            const double c0 = tools::cpu_s();
            for (int i = 0; i < n_decode; ++i) {
                int32_t tok = (int32_t)(rng() % info.n_vocab);
                tools::ok(wqe_eval(ctx, &tok, 1, logits.data(), 0), "eval token");
            }
            dec.push_back(n_decode / (tools::now_s() - t0));
            dec_cpu.push_back(1e3 * (tools::cpu_s() - c0) / n_decode);
        }
    }
    const double p = median(pre), d = dec.empty() ? 0.0 : median(dec);
    const double dc = dec_cpu.empty() ? 0.0 : *std::min_element(dec_cpu.begin(), dec_cpu.end());
    const int n_threads = wqe_get_threads(ctx);
    if (json) {
        std::printf("{\"model\": \"%s\", \"prefill_tokens\": %d, \"decode_tokens\": %d, \"threads\": %d, "
                    "\"prefill_tok_s\": %.3f, \"decode_tok_s\": %.3f, \"decode_cpu_ms_per_token\": %.4f, \"load_s\": %.3f, \"peak_rss_mib\": %.1f, "
                    "\"file_mib\": %.2f, \"effective_bits\": %.4f, \"system\": \"%s\"}\n",
                    model_path.c_str(), n_prefill, n_decode, n_threads, p, d, dc, t_load, tools::peak_rss_kib() / 1024.0,
                    info.file_bytes / 1048576.0, info.effective_bits, wqe_system_info());
    } else {
        std::printf("model      %s (%.2f MiB, %.3f bits/weight in the linears)\n", model_path.c_str(),
                    info.file_bytes / 1048576.0, info.effective_bits);
        std::printf("system     %s, %d threads\n", wqe_system_info(), n_threads);
        std::printf("prefill    %d tokens: %.1f tok/s (median of %d)\n", n_prefill, p, reps);
        if (n_decode)
            std::printf("decode     %d tokens: %.1f tok/s (median of %d); CPU %.3f ms/token (best)\n", n_decode, d, reps, dc);
        std::printf("peak RSS   %.1f MiB\n", tools::peak_rss_kib() / 1024.0);
    }
    wqe_context_free(ctx);
    wqe_model_free(model);
    return 0;
}
