// The C API: argument checks, exception-to-status translation, thread-local error messages.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>
#include <cmath>
#include <cstring>
#include <new>
#include <string>

#include "blocks.h"
#include "common.h"
#include "model.h"
#include "sampler.h"
#include "threadpool.h"
#include "wqedge.h"
#ifdef WQE_HAVE_TOKENIZER
#  include "tokenizer.h"
#endif

struct wqe_model {
    wqe::Model m;
    explicit wqe_model(const std::string& path) : m(path) {}
};
struct wqe_context {
    wqe::Context c;
    wqe_context(const wqe::Model& m, int n_ctx, int n_threads, int kv_bits, int kv_rotate)
        : c(m, n_ctx, n_threads, kv_bits, kv_rotate) {}
};
struct wqe_sampler {
    wqe::Sampler s;
    explicit wqe_sampler(const wqe_sampler_params& p) : s(p) {}
};

namespace {

thread_local std::string g_error;

int set_error(int code, const std::string& msg) {
    g_error = msg;
    return code;
}

template <class F>
int guarded(F&& f) {
    g_error.clear();
    try {
        f();
        return WQE_OK;
    } catch (const wqe::Error& e) {
        return set_error(e.code, e.what());
    } catch (const std::bad_alloc&) {
        return set_error(WQE_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return set_error(WQE_ERR_INTERNAL, std::string("internal error: ") + e.what());
    } catch (...) {
        return set_error(WQE_ERR_INTERNAL, "internal error");
    }
}

#define CHECK_ARG(cond, ...) \
    do { if (!(cond)) wqe::fail(WQE_ERR_INVALID_ARGUMENT, __VA_ARGS__); } while (0)

int copy_out(const std::string& s, char* text, size_t capacity, size_t* length) {
    if (length) *length = s.size();
    if (!text || capacity < s.size() + 1) {
        if (text && capacity) text[0] = '\0';
        return set_error(WQE_ERR_BUFFER_TOO_SMALL,
                         "text needs " + std::to_string(s.size() + 1) + " bytes, buffer has " + std::to_string(capacity));
    }
    std::memcpy(text, s.data(), s.size());
    text[s.size()] = '\0';
    return WQE_OK;
}

#ifdef WQE_HAVE_TOKENIZER
const wqedge::Tokenizer& tokenizer_of(const wqe_model* model) {
    CHECK_ARG(model, "model is NULL");
    if (!model->m.tokenizer) wqe::fail(WQE_ERR_NO_TOKENIZER, "%s", model->m.tokenizer_error.c_str());
    return *model->m.tokenizer;
}
#endif

int check_kernels(int kernels) {
    if (kernels == WQE_KERNELS_AUTO) return wqe::active_kernels();
    if (kernels == WQE_KERNELS_SCALAR) return wqe::K_SCALAR;
    if (kernels == WQE_KERNELS_AVX2) {
        if (!wqe::cpu_has_avx2()) wqe::fail(WQE_ERR_UNSUPPORTED, "this CPU lacks AVX2/FMA/F16C");
        return wqe::K_AVX2;
    }
    if (kernels == WQE_KERNELS_NEON) {
        if (!wqe::cpu_has_neon()) wqe::fail(WQE_ERR_UNSUPPORTED, "this build or CPU has no NEON kernels");
        return wqe::K_NEON;
    }
    wqe::fail(WQE_ERR_INVALID_ARGUMENT, "unknown kernel set %d", kernels);
}

void check_sampler_params(const wqe_sampler_params& p) {
    CHECK_ARG(std::isfinite(p.temperature), "temperature %g is not a finite number", (double)p.temperature);
    CHECK_ARG(!std::isnan(p.top_p), "top_p is NaN");
}

}  // namespace

extern "C" {

const char* wqe_last_error(void) { return g_error.c_str(); }

const char* wqe_status_name(int s) {
    switch (s) {
        case WQE_OK: return "WQE_OK";
        case WQE_ERR_INVALID_ARGUMENT: return "WQE_ERR_INVALID_ARGUMENT";
        case WQE_ERR_IO: return "WQE_ERR_IO";
        case WQE_ERR_FORMAT: return "WQE_ERR_FORMAT";
        case WQE_ERR_UNSUPPORTED: return "WQE_ERR_UNSUPPORTED";
        case WQE_ERR_OUT_OF_MEMORY: return "WQE_ERR_OUT_OF_MEMORY";
        case WQE_ERR_CONTEXT_FULL: return "WQE_ERR_CONTEXT_FULL";
        case WQE_ERR_BUFFER_TOO_SMALL: return "WQE_ERR_BUFFER_TOO_SMALL";
        case WQE_ERR_NO_TOKENIZER: return "WQE_ERR_NO_TOKENIZER";
        case WQE_ERR_INTERNAL: return "WQE_ERR_INTERNAL";
        default: return "WQE_ERR_UNKNOWN";
    }
}

const char* wqe_version(void) { return "0.1.0"; }
const char* wqe_system_info(void) { return wqe::system_info(); }

double wqe_read_bandwidth(int32_t n_threads, uint64_t bytes, int32_t reps) {
    double best = -1.0;
    const int st = guarded([&] {
        if (n_threads < 1 || reps < 1 || bytes < 4096)
            wqe::fail(WQE_ERR_INVALID_ARGUMENT, "read_bandwidth: need n_threads >= 1, reps >= 1, bytes >= 4096");
        const size_t n = (size_t)(bytes / 64) * 8;  // uint64 words, whole cache lines
        std::vector<uint64_t> buf;
        try {
            buf.assign(n, 0x0123456789abcdefull);  // touched: the pages exist before the timing
        } catch (const std::bad_alloc&) {
            wqe::fail(WQE_ERR_OUT_OF_MEMORY, "read_bandwidth: cannot allocate %llu bytes", (unsigned long long)bytes);
        }
        wqe::ThreadPool pool(n_threads);
        const int n_tasks = 16 * n_threads;  // contiguous per thread (the pool's spans), as decode's tiles
        std::vector<uint64_t> sink(n_tasks);
        auto pass = [&] {
            pool.run(n_tasks, [&](int t, int) {
                const size_t a = n * t / n_tasks / 8 * 8, b = n * (t + 1) / n_tasks / 8 * 8;
                uint64_t x0 = 0, x1 = 0, x2 = 0, x3 = 0, x4 = 0, x5 = 0, x6 = 0, x7 = 0;
                for (size_t i = a; i < b; i += 8) {  // one cache line per iteration, 8 independent chains
                    x0 ^= buf[i]; x1 ^= buf[i + 1]; x2 ^= buf[i + 2]; x3 ^= buf[i + 3];
                    x4 ^= buf[i + 4]; x5 ^= buf[i + 5]; x6 ^= buf[i + 6]; x7 ^= buf[i + 7];
                }
                sink[t] = x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7;
            });
        };
        pass();
        for (int r = 0; r < reps; ++r) {
            const auto t0 = std::chrono::steady_clock::now();
            pass();
            const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            best = std::max(best, (double)n * 8 / dt / 1e9);
        }
        volatile uint64_t keep = 0;
        for (uint64_t v : sink) keep = keep ^ v;
        (void)keep;
    });
    return st == WQE_OK ? best : -1.0;
}

int wqe_set_kernels(int kernels) {
    return guarded([&] {
        if (kernels < WQE_KERNELS_AUTO || kernels > WQE_KERNELS_NEON)
            wqe::fail(WQE_ERR_INVALID_ARGUMENT, "unknown kernel set %d", kernels);
        if (wqe::set_kernels(kernels) != 0)
            wqe::fail(WQE_ERR_UNSUPPORTED, "kernel set %d is not available on this CPU or build", kernels);
    });
}
int wqe_get_kernels(void) { return wqe::active_kernels(); }

int wqe_set_activations(int act) {
    return guarded([&] {
        if (wqe::set_act(act) != 0) wqe::fail(WQE_ERR_INVALID_ARGUMENT, "unknown activation precision %d", act);
    });
}
int wqe_get_activations(void) { return wqe::active_act(); }

// ------------------------------------------------------------------ models
int wqe_model_open(const char* path, wqe_model** out) {
    if (out) *out = nullptr;
    return guarded([&] {
        CHECK_ARG(path && out, "path and out must not be NULL");
        *out = new wqe_model(path);
    });
}

void wqe_model_free(wqe_model* model) { delete model; }

int wqe_model_get_info(const wqe_model* model, wqe_model_info* info) {
    return guarded([&] {
        CHECK_ARG(model && info, "model and info must not be NULL");
        const wqe::Model& m = model->m;
        const wqe::HParams& hp = m.hp;
        std::memset(info, 0, sizeof *info);
        info->n_vocab = hp.n_vocab;
        info->n_embd = hp.n_embd;
        info->n_layer = hp.n_layer;
        info->n_head = hp.n_head;
        info->n_head_kv = hp.n_head_kv;
        info->head_dim = hp.head_dim;
        info->n_ff = hp.n_ff;
        info->n_ctx_train = hp.n_ctx_train;
        info->group_size = hp.group_size;
        info->format_version = hp.format_version;
        info->bos_token_id = hp.bos;
        info->eos_token_id = hp.eos;
        info->add_bos = hp.add_bos ? 1 : 0;
        info->tied_embeddings = m.tied ? 1 : 0;
        info->has_tokenizer = m.tokenizer ? 1 : 0;
        info->rope_scaled = m.rope_scaled ? 1 : 0;
        info->rope_freq_base = hp.rope_base;
        info->rms_eps = hp.rms_eps;
        info->effective_bits = hp.effective_bits;
        info->file_bytes = m.file->file_size();
        info->quantized_bytes = m.quantized_bytes;
    });
}

const char* wqe_model_plan(const wqe_model* model) { return model ? model->m.plan_json.c_str() : ""; }

int wqe_model_chat_template(const wqe_model* model, char* text, size_t capacity, size_t* length) {
    if (length) *length = 0;
    std::string s;
    const int rc = guarded([&] {
        CHECK_ARG(model && length, "model and length must not be NULL");
        s = model->m.file->get_string("tokenizer.chat_template", "");
    });
    return rc != WQE_OK ? rc : copy_out(s, text, capacity, length);
}

// ------------------------------------------------------------------ tokenizer
int wqe_tokenize(const wqe_model* model, const char* text, size_t text_len, int add_bos, int32_t* tokens,
                 int32_t capacity, int32_t* n_tokens) {
    if (n_tokens) *n_tokens = 0;
    int status = WQE_OK;
    const int rc = guarded([&] {
        CHECK_ARG(model && n_tokens && (text || text_len == 0), "model, text and n_tokens must not be NULL");
        CHECK_ARG(capacity >= 0 && (tokens || capacity == 0), "bad output buffer");
#ifdef WQE_HAVE_TOKENIZER
        const wqedge::Tokenizer& tok = tokenizer_of(model);
        const std::string s(text ? text : "", text_len);
        const std::vector<int32_t> ids = add_bos < 0 ? tok.encode(s, tok.add_bos_token(), tok.add_eos_token())
                                                     : tok.encode(s, add_bos != 0, false);
        if (ids.size() > (size_t)INT32_MAX) wqe::fail(WQE_ERR_INVALID_ARGUMENT, "text too long");
        *n_tokens = (int32_t)ids.size();
        if ((int32_t)ids.size() > capacity) {
            status = WQE_ERR_BUFFER_TOO_SMALL;
            g_error = "tokens need room for " + std::to_string(ids.size()) + ", buffer has " + std::to_string(capacity);
            return;
        }
        std::copy(ids.begin(), ids.end(), tokens);
#else
        (void)add_bos;
        wqe::fail(WQE_ERR_NO_TOKENIZER, "%s", model->m.tokenizer_error.c_str());
#endif
    });
    return rc != WQE_OK ? rc : status;
}

int wqe_detokenize(const wqe_model* model, const int32_t* tokens, int32_t n, char* text, size_t capacity, size_t* length) {
    if (length) *length = 0;
    std::string s;
    const int rc = guarded([&] {
        CHECK_ARG(model && length && (tokens || n == 0) && n >= 0, "bad arguments");
#ifdef WQE_HAVE_TOKENIZER
        s = tokenizer_of(model).decode(std::vector<int32_t>(tokens, tokens + n));
#else
        wqe::fail(WQE_ERR_NO_TOKENIZER, "%s", model->m.tokenizer_error.c_str());
#endif
    });
    return rc != WQE_OK ? rc : copy_out(s, text, capacity, length);
}

int wqe_token_to_piece(const wqe_model* model, int32_t token, int special, char* text, size_t capacity, size_t* length) {
    if (length) *length = 0;
    std::string s;
    const int rc = guarded([&] {
        CHECK_ARG(model && length, "bad arguments");
        CHECK_ARG(token >= 0 && token < model->m.hp.n_vocab, "token %d is outside the vocabulary", token);
#ifdef WQE_HAVE_TOKENIZER
        s = tokenizer_of(model).token_to_piece(token, special != 0);
#else
        (void)special;
        wqe::fail(WQE_ERR_NO_TOKENIZER, "%s", model->m.tokenizer_error.c_str());
#endif
    });
    return rc != WQE_OK ? rc : copy_out(s, text, capacity, length);
}

// ------------------------------------------------------------------ contexts
wqe_context_params wqe_context_default_params(void) { return wqe_context_params{0, 0, 0, 0}; }

int wqe_context_new(const wqe_model* model, const wqe_context_params* params, wqe_context** out) {
    if (out) *out = nullptr;
    return guarded([&] {
        CHECK_ARG(model && out, "model and out must not be NULL");
        const wqe_context_params p = params ? *params : wqe_context_default_params();
        CHECK_ARG(p.n_ctx >= 0 && p.n_threads >= 0 && p.n_threads <= 1024, "bad context parameters (n_ctx %d, n_threads %d)",
                  p.n_ctx, p.n_threads);
        CHECK_ARG(p.kv_bits == 0 || p.kv_bits == 32 || p.kv_bits == 16 || p.kv_bits == 8 || p.kv_bits == 4,
                  "kv_bits %d: use 0 (the file's setting), 32 (float), 16 (fp16), 8 or 4", p.kv_bits);
        CHECK_ARG(p.kv_rotation >= 0 && p.kv_rotation <= 2, "kv_rotation %d: use 0 (the file's), 1 (Hadamard) or 2 (none)",
                  p.kv_rotation);
        const int n_ctx = p.n_ctx ? p.n_ctx : std::min(model->m.hp.n_ctx_train, 4096);
        const int bits = p.kv_bits == 0 ? -1 : p.kv_bits == 32 ? 0 : p.kv_bits;
        const int rot = p.kv_rotation == 0 ? -1 : p.kv_rotation == 1 ? 1 : 0;
        *out = new wqe_context(model->m, n_ctx, p.n_threads, bits, rot);
    });
}

int wqe_context_kv_cache(const wqe_context* ctx, int32_t* bits, int32_t* rotated, uint64_t* bytes) {
    return guarded([&] {
        CHECK_ARG(ctx, "ctx is NULL");
        if (bits) *bits = ctx->c.kvf.bits == 0 ? 32 : ctx->c.kvf.bits;
        if (rotated) *rotated = ctx->c.kvf.rotate ? 1 : 0;
        if (bytes) *bytes = ctx->c.kv_bytes();
    });
}

void wqe_context_free(wqe_context* ctx) { delete ctx; }

int wqe_set_threads(wqe_context* ctx, int32_t n) {
    return guarded([&] {
        CHECK_ARG(ctx && n >= 0 && n <= 1024, "bad arguments");
        ctx->c.set_threads(n);
    });
}
int32_t wqe_get_threads(const wqe_context* ctx) { return ctx ? ctx->c.pool->size() : 0; }
int32_t wqe_context_size(const wqe_context* ctx) { return ctx ? ctx->c.n_ctx : 0; }
int32_t wqe_get_position(const wqe_context* ctx) { return ctx ? ctx->c.n_past : 0; }

int wqe_set_position(wqe_context* ctx, int32_t n_past) {
    return guarded([&] {
        CHECK_ARG(ctx, "ctx is NULL");
        CHECK_ARG(n_past >= 0 && n_past <= ctx->c.n_past, "position %d outside [0, %d]", n_past, ctx->c.n_past);
        ctx->c.n_past = n_past;
    });
}

int wqe_eval(wqe_context* ctx, const int32_t* tokens, int32_t n, float* logits, int all_logits) {
    return guarded([&] {
        CHECK_ARG(ctx && tokens, "ctx and tokens must not be NULL");
        ctx->c.eval(tokens, n, logits, all_logits != 0);
    });
}

// ------------------------------------------------------------------ sampling
wqe_sampler_params wqe_sampler_default_params(void) { return wqe_sampler_params{0.0f, 1.0f, 0, 0}; }

int wqe_sampler_new(const wqe_sampler_params* params, wqe_sampler** out) {
    if (out) *out = nullptr;
    return guarded([&] {
        CHECK_ARG(params && out, "params and out must not be NULL");
        check_sampler_params(*params);
        *out = new wqe_sampler(*params);
    });
}

void wqe_sampler_free(wqe_sampler* s) { delete s; }

int wqe_sample(wqe_sampler* s, const float* logits, int32_t n_vocab, int32_t* token) {
    return guarded([&] {
        CHECK_ARG(s && logits && token && n_vocab > 0, "bad arguments");
        // Sorting NaNs breaks the comparator's ordering (undefined behaviour in std::sort): refuse them.
        for (int32_t i = 0; i < n_vocab; ++i)
            CHECK_ARG(std::isfinite(logits[i]), "logit %d is %g: cannot sample from non-finite logits", i, (double)logits[i]);
        *token = s->s.sample(logits, n_vocab);
    });
}

int wqe_generate(wqe_context* ctx, const int32_t* prompt, int32_t n_prompt, int32_t max_new,
                 const wqe_sampler_params* params, int stop_at_eos, wqe_token_callback cb, void* user,
                 int32_t* out_tokens, int32_t* n_out) {
    if (n_out) *n_out = 0;
    return guarded([&] {
        CHECK_ARG(ctx && prompt && n_prompt > 0 && max_new >= 0 && n_out && (out_tokens || max_new == 0), "bad arguments");
        wqe::Context& c = ctx->c;
        const int V = c.model.hp.n_vocab, eos = c.model.hp.eos;
        // All of it must fit before any work (the last new token is returned, not evaluated); 64-bit sums.
        const int64_t need = (int64_t)c.n_past + n_prompt + std::max(max_new - 1, 0);
        if (need > c.n_ctx)
            wqe::fail(WQE_ERR_CONTEXT_FULL, "a prompt of %d tokens and %d new tokens do not fit: the context holds %d of %d tokens",
                      n_prompt, max_new, c.n_past, c.n_ctx);
        if (params) check_sampler_params(*params);
        wqe::Sampler sampler(params ? *params : wqe_sampler_default_params());
        std::vector<float> logits(V);
        c.eval(prompt, n_prompt, logits.data(), false);
        for (int i = 0; i < max_new; ++i) {
            const int32_t tok = sampler.sample(logits.data(), V);
            if (stop_at_eos && tok == eos) break;
            out_tokens[(*n_out)++] = tok;
            if (cb && cb(tok, user)) break;
            if (i + 1 == max_new) break;
            c.eval(&tok, 1, logits.data(), false);
        }
    });
}

// ------------------------------------------------------------------ test hooks
static void check_chunk_args(int action, int32_t g, int32_t n_p, const int32_t* prot, const uint8_t* rb, int32_t n_rows,
                             size_t stride) {
    const wqe::BlockTraits* bt = wqe::block_traits(action);
    if (!bt) wqe::fail(WQE_ERR_INVALID_ARGUMENT, "unknown block type %d", action);
    CHECK_ARG(g >= 1 && g <= (1 << 16) && n_p >= 0 && n_p <= g && n_rows >= 0 && (rb || n_rows == 0), "bad chunk arguments");
    CHECK_ARG(stride >= wqe::row_bytes(*bt, g, n_p), "row stride %zu is smaller than the row-block (%zu bytes)", stride,
              wqe::row_bytes(*bt, g, n_p));
    CHECK_ARG(n_p == 0 || prot, "protected_cols is NULL");
    for (int p = 0; p < n_p; ++p)
        CHECK_ARG(prot[p] >= 0 && prot[p] < g && (p == 0 || prot[p] > prot[p - 1]), "protected column %d is out of order or range", p);
}

int wqe_test_chunk_matvec(int action, int32_t g, int32_t n_p, const int32_t* prot, const uint8_t* rb, int32_t n_rows,
                          size_t stride, const float* x, int kernels, float* y) {
    return wqe_test_chunk_matvec_act(action, g, n_p, prot, rb, n_rows, stride, x, kernels, WQE_ACT_F32, y);
}

int wqe_test_chunk_matvec_act(int action, int32_t g, int32_t n_p, const int32_t* prot, const uint8_t* rb,
                              int32_t n_rows, size_t stride, const float* x, int kernels, int act, float* y) {
    return guarded([&] {
        check_chunk_args(action, g, n_p, prot, rb, n_rows, stride);
        CHECK_ARG(x && y, "x and y must not be NULL");
        CHECK_ARG(act == WQE_ACT_F32 || act == WQE_ACT_Q8, "unknown activation precision %d", act);
        const int k = check_kernels(kernels);
        const wqe::BlockTraits& bt = *wqe::block_traits(action);
        const int g_pad = wqe::padded(g);
        const bool q8 = act == WQE_ACT_Q8 && bt.dot8[k];
        std::vector<float> xc(wqe::x_floats(bt, g_pad));
        std::vector<wqe::XQ8> xq(wqe::x8_blocks(bt, g_pad));
        const float xsum = q8 ? wqe::prepare_x8(bt, x, g, xq.data(), 0.0f, k) : wqe::prepare_x(bt, x, g, xc.data());
        const size_t res_off = bt.header_bytes + bt.code_bytes(g_pad);
        for (int r = 0; r < n_rows; ++r) {
            const uint8_t* row = rb + (size_t)r * stride;
            float acc = q8 ? bt.dot8[k](row, xq.data(), xsum, g_pad) : bt.dot[k](row, xc.data(), xsum, g_pad);
            for (int p = 0; p < n_p; ++p) acc += wqe::load_h(row + res_off + 2 * p) * x[prot[p]];
            y[r] = acc;
        }
    });
}

int wqe_test_chunk_dequant(int action, int32_t g, int32_t n_p, const int32_t* prot, const uint8_t* rb, int32_t n_rows,
                           size_t stride, int kernels, float* w) {
    return guarded([&] {
        check_chunk_args(action, g, n_p, prot, rb, n_rows, stride);
        CHECK_ARG(w, "w must not be NULL");
        const int k = check_kernels(kernels);
        const wqe::BlockTraits& bt = *wqe::block_traits(action);
        const int g_pad = wqe::padded(g);
        std::vector<float> tmp(wqe::dequant_floats(g_pad) + 64);
        const size_t res_off = bt.header_bytes + bt.code_bytes(g_pad);
        for (int r = 0; r < n_rows; ++r) {
            const uint8_t* row = rb + (size_t)r * stride;
            bt.dequant[k](row, g_pad, tmp.data());
            for (int p = 0; p < n_p; ++p) tmp[prot[p]] += wqe::load_h(row + res_off + 2 * p);
            std::memcpy(w + (size_t)r * g, tmp.data(), sizeof(float) * g);
        }
    });
}

int wqe_test_compact_params(int action, const uint8_t* headers, int32_t n, uint16_t base, uint16_t* d, uint16_t* m) {
    return guarded([&] {
        if (wqe::compact_base(action) < 0)
            wqe::fail(WQE_ERR_INVALID_ARGUMENT, "block type %d is not a compact kind (ids 10-14)", action);
        CHECK_ARG(n >= 0 && ((headers && d && m) || n == 0), "bad arguments");
        const int hb = wqe::compact_header_bytes(action);
        for (int r = 0; r < n; ++r) {
            m[r] = 0;
            wqe::compact_params(action, headers + (size_t)r * hb, base, d + r, m + r);
        }
    });
}

int64_t wqe_row_bytes(int action, int32_t g, int32_t n_p) {
    const int base = wqe::compact_base(action);  // compact kinds: their base kind's row-block, one byte per parameter
    const wqe::BlockTraits* bt = wqe::block_traits(base >= 0 ? base : action);
    if (!bt || g < 1 || n_p < 0) return -1;
    return (int64_t)wqe::row_bytes(*bt, g, n_p) - (base >= 0 ? wqe::compact_header_bytes(action) : 0);
}

}  // extern "C"
