// The model (validated weights over the mapped file) and the inference context (KV cache,
// scratch, threads) with the forward pass.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "gguf.h"
#include "kvcache.h"
#include "linear.h"
#include "rotation.h"
#include "threadpool.h"

namespace wqedge { class Tokenizer; }

namespace wqe {

struct HParams {
    // n_head, n_head_kv, n_ff: the largest over the layers (buffers are sized by them); a pruned model's
    // layers have their own (Layer), read from per-layer arrays of the llama.* keys.
    int n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0;
    int n_ctx_train = 0, group_size = 0, format_version = 0;
    int act_bits = 8;  // format 2: activation bits of the linears' inputs (8: the int8/float path as before)
    int kv_bits = 0;           // wqedge.kv_cache.bits: the default KV cache (0 float32, 8 or 4; kvcache.h)
    bool kv_rotate = true;     // wqedge.kv_cache.rotation: "hadamard" (true) or "none"
    float rope_base = 10000.0f, rms_eps = 1e-5f, effective_bits = 0.0f;
    int bos = -1, eos = -1;
    bool add_bos = true;
    int q_dim() const { return n_head * head_dim; }
    int kv_dim() const { return n_head_kv * head_dim; }
};

struct Layer {
    int n_head = 0, n_head_kv = 0, n_ff = 0;  // this layer's shape (equal in every layer unless pruned)
    std::vector<float> attn_norm, ffn_norm;
    Linear wq, wk, wv, wo, w_gate, w_up, w_down;
    std::vector<Rotation> rot;  // format 2: input transforms of the groups q/k/v, o, gate/up, down (empty: none)
    const Rotation* rot_of(int g) const { return rot.empty() ? nullptr : &rot[g]; }
};

struct Model {
    std::unique_ptr<GGUFFile> file;
    HParams hp;
    Linear tok_embd;
    Linear output;             // == tok_embd when tied
    bool tied = false;
    std::vector<float> output_norm;
    std::vector<float> inv_freq;  // head_dim / 2, llama3 factors applied
    bool rope_scaled = false;
    std::vector<Layer> layers;
    std::string plan_json;
    uint64_t quantized_bytes = 0;
    // Largest sizes, for scratch allocation.
    int max_K = 0, max_N = 0, max_g_pad = 32, max_x_floats = 0, max_chunks = 1;

    std::unique_ptr<wqedge::Tokenizer> tokenizer;
    std::string tokenizer_error;  // why there is none

    explicit Model(const std::string& path);  // throws wqe::Error
    ~Model();
};

// Query heads of one KV group that an attention task takes together (model.cpp att_heads_per_task): each K/V row
// read (and dequantized) once for all of them; 8 covers the usual groups (Llama 3, TinyLlama).
constexpr int ATT_QPT = 8;
// (token, query head) pairs an attention task takes at most, each with n_ctx score floats per thread: a prompt's
// tokens go in blocks of ATT_QUERIES / qpt.
constexpr int ATT_QUERIES = 16;
// Positions of a KV head an attention task takes at a time (a quantized or fp16 cache's rows converted together),
// serving every token and head of the task while they are in L1.
constexpr int KV_CHUNK = 64;

struct Context {
    const Model& model;
    int n_ctx;
    int n_past = 0;
    std::unique_ptr<ThreadPool> pool;
    std::vector<float> k_cache, v_cache;  // [layer][kv head][n_ctx][head_dim] (float cache; head-major, model.cpp)
    std::vector<size_t> kv_off;           // where each layer's cache starts, in floats of the float cache
    KvFormat kvf;                         // the cache's format: kvf.bits 0 = the float vectors above
    std::vector<uint8_t> kq_cache, vq_cache;  // quantized cache: row (layer, kv head, pos) at (kv_off / head_dim + ..) * row_bytes
    MatScratch ms;
    int n_batch_alloc = 0;
    // Activations of one micro-batch.
    std::vector<float> x, xb, xb2, q, k, v, att, hg, hu, rope_cos, rope_sin;
    std::vector<float> act_steps;  // per token: the grid step of the current group's quantized input (act bits < 8)
    std::vector<std::vector<float>> scores;  // per thread, n_ctx

    // kv_bits: -1 the file's KV cache setting, 0 float32, 8 or 4; kv_rotate: -1 the file's, 0 none, 1 Hadamard.
    Context(const Model& m, int n_ctx, int n_threads, int kv_bits = -1, int kv_rotate = -1);
    size_t kv_bytes() const;  // bytes of the K and V caches
    void set_threads(int n);
    // Evaluate tokens at n_past; logits: nullptr, last token's (all = false) or every token's.
    void eval(const int32_t* tokens, int n, float* logits, bool all);

private:
    void forward(const int32_t* tokens, int n, float* logits, bool all);
    void ensure_batch(int n);
};

constexpr int MAX_UBATCH = 512;  // tokens per forward pass; longer evals are split
constexpr int MAX_CTX = 1 << 24;  // context length limit (as llama.context_length's)

}  // namespace wqe
