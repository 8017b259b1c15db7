#include "model.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "common.h"
#ifdef WQE_HAVE_TOKENIZER
#  include "tokenizer.h"
#endif

namespace wqe {

// ------------------------------------------------------------------ loading and validation
namespace {

constexpr uint64_t MAX_CHUNK_LIST = 1 << 20;  // chunk_actions / chunk_protected entries (K <= 2^20)

struct Loader {
    const GGUFFile& f;
    Model& m;

    int dim_key(const std::string& key, int64_t lo, int64_t hi) const {
        const int64_t v = f.get_int(key);
        if (v < lo || v > hi) f.format_error("key '%s' = %lld is out of range [%lld, %lld]", key.c_str(), (long long)v, (long long)lo, (long long)hi);
        return (int)v;
    }
    int dim_key(const std::string& key, int64_t lo, int64_t hi, int64_t dflt) const {
        return f.has(key) ? dim_key(key, lo, hi) : (int)dflt;
    }
    std::vector<int> per_layer(const std::string& key, int64_t lo, int64_t hi) const {
        std::vector<int> out;
        for (int64_t v : f.get_int_per_layer(key, m.hp.n_layer)) {
            if (v < lo || v > hi)
                f.format_error("key '%s': layer %zu's value %lld is out of range [%lld, %lld]", key.c_str(), out.size(),
                               (long long)v, (long long)lo, (long long)hi);
            out.push_back((int)v);
        }
        return out;
    }

    const GGUFTensor& tensor(const std::string& name) const {
        const GGUFTensor* t = f.tensor(name);
        if (!t) f.format_error("missing tensor '%s'", name.c_str());
        return *t;
    }

    void expect_shape(const GGUFTensor& t, std::initializer_list<uint64_t> dims) const {
        bool ok = t.n_dims == dims.size();
        size_t i = 0;
        for (uint64_t d : dims) ok = ok && i < 4 && t.dims[i++] == d;
        if (!ok) {
            std::string want, got;
            for (uint64_t d : dims) want += (want.empty() ? "" : ", ") + std::to_string(d);
            for (uint32_t j = 0; j < t.n_dims; ++j) got += (j ? ", " : "") + std::to_string(t.dims[j]);
            f.format_error("tensor '%s' has ggml shape [%s], expected [%s]", t.name.c_str(), got.c_str(), want.c_str());
        }
    }

    std::vector<float> f32_vector(const std::string& name, int n) const {
        const GGUFTensor& t = tensor(name);
        if (t.type != GGML_F32) f.format_error("tensor '%s' has type %s, expected F32", name.c_str(), ggml_type_name(t.type));
        expect_shape(t, {(uint64_t)n});
        std::vector<float> v(n);
        std::memcpy(v.data(), t.data, sizeof(float) * n);
        for (int i = 0; i < n; ++i)
            if (!std::isfinite(v[i])) f.format_error("tensor '%s' holds a non-finite value at %d", name.c_str(), i);
        return v;
    }

    Linear dense(const std::string& name, int N, int K) const {
        const GGUFTensor& t = tensor(name);
        if (t.type != GGML_F32 && t.type != GGML_F16)
            f.format_error("tensor '%s' has type %s, expected F16 or F32", name.c_str(), ggml_type_name(t.type));
        expect_shape(t, {(uint64_t)K, (uint64_t)N});
        Linear L;
        L.kind = t.type == GGML_F32 ? Linear::DENSE_F32 : Linear::DENSE_F16;
        L.name = name;
        L.N = N;
        L.K = K;
        L.data = t.data;
        L.row_bytes = (size_t)K * (t.type == GGML_F32 ? 4 : 2);
        return L;
    }

    // token_embd.weight / output.weight [n_vocab, n_embd]: dense, or a quantized linear (not counted in
    // quantized_bytes: the effective bits cover the decoder linears only).
    Linear head_or_dense(const std::string& name) {
        const GGUFTensor& t = tensor(name);
        if (t.type != GGML_I8) return dense(name, m.hp.n_vocab, m.hp.n_embd);
        const uint64_t qb = m.quantized_bytes;
        Linear L = chunked(name, m.hp.n_vocab, m.hp.n_embd);
        m.quantized_bytes = qb;
        return L;
    }

    Linear chunked(const std::string& name, int N, int K) {
        const GGUFTensor& t = tensor(name);
        const std::string key = "wqedge.tensors." + name + ".";
        if (t.type != GGML_I8) f.format_error("tensor '%s' has type %s, expected I8 (wqedge row-blocks)", name.c_str(), ggml_type_name(t.type));
        const int64_t in_features = f.get_int(key + "in_features");
        if (in_features != K)
            f.format_error("key '%sin_features' = %lld, but the model shape says %d", key.c_str(), (long long)in_features, K);
        const int G = m.hp.group_size;
        const int n_chunks = (K + G - 1) / G;
        const std::vector<int64_t> actions = f.get_int_array(key + "chunk_actions", MAX_CHUNK_LIST);
        if ((int64_t)actions.size() != n_chunks)
            f.format_error("key '%schunk_actions' lists %zu chunks, but %d columns in chunks of %d make %d",
                           key.c_str(), actions.size(), K, G, n_chunks);
        std::vector<int64_t> prot(n_chunks, 0);
        if (f.has(key + "chunk_protected")) {
            prot = f.get_int_array(key + "chunk_protected", MAX_CHUNK_LIST);
            if ((int64_t)prot.size() != n_chunks)
                f.format_error("key '%schunk_protected' lists %zu chunks, expected %d", key.c_str(), prot.size(), n_chunks);
        }
        // compact-header chunks (linear.h): laid out as their base kinds, expanded into them below
        std::vector<int64_t> base_actions = actions;
        int n_compact = 0;
        for (int64_t& a : base_actions)
            if (const int b = compact_base(a); b >= 0) a = b, ++n_compact;
        Linear L;
        try {
            L = chunked_layout(name, N, K, G, base_actions, prot);
        } catch (const Error& e) {
            f.format_error("%s", e.what());
        }
        m.quantized_bytes += t.nbytes;
        if (n_compact == 0) {
            expect_shape(t, {(uint64_t)L.row_bytes, (uint64_t)N});
            L.data = t.data;
        } else {
            expect_shape(t, {(uint64_t)compact_row_bytes(L, actions), (uint64_t)N});
            const GGUFTensor* bt = f.tensor(name + ".scale_base");
            if (!bt) f.format_error("tensor '%s' has %d compact chunks but '%s.scale_base' is missing", name.c_str(), n_compact, name.c_str());
            if (bt->type != GGML_F16) f.format_error("tensor '%s.scale_base' has type %s, expected F16", name.c_str(), ggml_type_name(bt->type));
            expect_shape(*bt, {(uint64_t)n_compact});
            std::vector<uint16_t> bases(n_compact);
            for (int i = 0; i < n_compact; ++i) {
                bases[i] = load_u16(bt->data + 2 * i);
                const float v = fp16_to_fp32(bases[i]);
                if (!std::isfinite(v) || v < 0)
                    f.format_error("tensor '%s.scale_base' holds %g at %d (scale bases are finite and >= 0)", name.c_str(), v, i);
            }
            m.quantized_bytes += bt->nbytes;
            L.owned.reset(new uint8_t[(size_t)N * L.row_bytes]);
            compact_expand(L, actions, t.data, bases.data(), L.owned.get());
            L.data = L.owned.get();
        }
        // Protected column indices: global u16 in an I16 tensor, chunk by chunk, ascending in a chunk.
        const GGUFTensor* pt = f.tensor(name + ".protect");
        const size_t n_prot = L.prot_local.size();
        if (n_prot > 0) {
            if (!pt) f.format_error("tensor '%s' protects %zu columns but '%s.protect' is missing", name.c_str(), n_prot, name.c_str());
            if (pt->type != GGML_I16) f.format_error("tensor '%s.protect' has type %s, expected I16", name.c_str(), ggml_type_name(pt->type));
            expect_shape(*pt, {(uint64_t)n_prot});
            m.quantized_bytes += pt->nbytes;
            std::vector<int64_t> cols(n_prot);
            for (size_t p = 0; p < n_prot; ++p) cols[p] = load_u16(pt->data + 2 * p);
            try {
                set_protected_columns(L, cols);
            } catch (const Error& e) {
                f.format_error("%s", e.what());
            }
        } else if (pt) {
            f.format_error("tensor '%s.protect' exists but no chunk of '%s' protects columns", name.c_str(), name.c_str());
        }
        m.max_g_pad = std::max(m.max_g_pad, L.max_g_pad);
        m.max_x_floats = std::max(m.max_x_floats, L.x_floats);
        m.max_chunks = std::max(m.max_chunks, (int)L.chunks.size());
        if (repack) {  // decode layout (linear.h, row tiles); the mapped pages are not read again
            repack_tiles(L);
            release_pages(t.data, t.nbytes);
            if (L.owned && L.tiled()) L.owned.reset(), L.data = nullptr;  // the expanded rows: nothing reads them now
        }
        return L;
    }

    // Drop the (read-only, file-backed) mapped pages wholly inside [p, p + n) from this process: after a
    // repack nothing reads them (a reader would fault them back in from the file), so the model's resident
    // size is the repacked copy instead of both.
    static void release_pages(const uint8_t* p, size_t n) {
        const uintptr_t ps = (uintptr_t)sysconf(_SC_PAGESIZE);
        const uintptr_t a = ((uintptr_t)p + ps - 1) & ~(ps - 1), e = ((uintptr_t)p + n) & ~(ps - 1);
        if (e > a) madvise((void*)a, e - a, MADV_DONTNEED);
    }
    const bool repack = repack_wanted(active_kernels());

    void load();
    void load_tokenizer();
};

void Loader::load() {
    HParams& hp = m.hp;
    // Whether the file is ours at all comes first: a stock llama.cpp GGUF (any architecture) gets one message.
    const std::string arch = f.get_string("general.architecture", "");
    if (!f.has("wqedge.format_version"))
        f.format_error("this is a llama.cpp GGUF (architecture '%s'), not a wqedge file (no wqedge.format_version "
                       "key) — run it with llama.cpp", arch.c_str());
    if (arch.empty()) f.format_error("missing required key 'general.architecture'");
    if (arch != "llama")
        throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": general.architecture is '" + arch +
                                             "'; this runtime runs 'llama' models only");
    hp.format_version = dim_key("wqedge.format_version", 0, 1 << 30);
    if (hp.format_version < 1 || hp.format_version > WQE_FORMAT_VERSION)
        throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": wqedge format version " + std::to_string(hp.format_version) +
                                             ", this runtime reads versions 1 to " + std::to_string(WQE_FORMAT_VERSION));
    // Format 2 (RUQuant, docs/format.md "Rotations"): activation bits and per-layer input transforms.
    int rot_block = 0;
    if (hp.format_version >= 2) {
        hp.act_bits = dim_key("wqedge.act_bits", 4, 8, 8);
        if (hp.act_bits != 8 && hp.act_bits != 6 && hp.act_bits != 4)
            f.format_error("wqedge.act_bits = %d; this runtime runs 8, 6 or 4", hp.act_bits);
        if (f.has("wqedge.rotation")) {
            const std::string method = f.get_string("wqedge.rotation");
            if (method != "ruquant" && method != "hadamard")
                throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": rotation method '" + method + "' is not supported "
                                                     "(this runtime runs 'ruquant' and 'hadamard')");
            rot_block = dim_key("wqedge.rotation.block_size", 1, 4096);
        }
    }
    // The KV cache setting (docs/format.md "KV cache"): a runtime default, any format version; absent = float.
    if (f.has("wqedge.kv_cache.bits")) {
        hp.kv_bits = (int)f.get_int("wqedge.kv_cache.bits");
        if (hp.kv_bits != 16 && hp.kv_bits != 8 && hp.kv_bits != 4)
            throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": wqedge.kv_cache.bits = " + std::to_string(hp.kv_bits) +
                                                 "; this runtime stores the KV cache at 16 (fp16), 8 or 4 bits (float "
                                                 "when the key is absent)");
    }
    if (f.has("wqedge.kv_cache.rotation")) {
        const std::string r = f.get_string("wqedge.kv_cache.rotation");
        if (r != "hadamard" && r != "none")
            throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": wqedge.kv_cache.rotation = '" + r +
                                                 "'; this runtime knows 'hadamard' and 'none'");
        hp.kv_rotate = r == "hadamard";
    }
    hp.group_size = dim_key("wqedge.group_size", 32, 1 << 16);
    if (hp.group_size % 32) f.format_error("wqedge.group_size = %d is not a multiple of 32", hp.group_size);
    if (!f.get_bool("wqedge.rope.neox", true))
        throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": wqedge.rope.neox = false (llama.cpp-permuted Q/K rows) is not supported");
    hp.effective_bits = (float)f.get_float("wqedge.effective_bits", 0.0);
    m.plan_json = f.get_string("wqedge.plan", "");

    const int LIM = 1 << 20;
    hp.n_embd = dim_key("llama.embedding_length", 1, 1 << 16);
    hp.n_layer = dim_key("llama.block_count", 1, 4096);
    // FFN length and head counts: one value, or one per layer (a pruned model); hp holds the largest.
    const std::vector<int> ff = per_layer("llama.feed_forward_length", 1, LIM);
    const std::vector<int> heads = per_layer("llama.attention.head_count", 1, 4096);
    const std::vector<int> heads_kv = f.has("llama.attention.head_count_kv")
                                          ? per_layer("llama.attention.head_count_kv", 1, 4096) : heads;
    m.layers.resize(hp.n_layer);
    for (int l = 0; l < hp.n_layer; ++l) {
        if (heads[l] % heads_kv[l])
            f.format_error("layer %d: llama.attention.head_count = %d is not a multiple of head_count_kv = %d", l,
                           heads[l], heads_kv[l]);
        m.layers[l].n_ff = ff[l];
        m.layers[l].n_head = heads[l];
        m.layers[l].n_head_kv = heads_kv[l];
    }
    hp.n_ff = *std::max_element(ff.begin(), ff.end());
    hp.n_head = *std::max_element(heads.begin(), heads.end());
    hp.n_head_kv = *std::max_element(heads_kv.begin(), heads_kv.end());
    hp.head_dim = dim_key("llama.attention.key_length", 2, 4096, hp.n_embd / hp.n_head);
    if (hp.head_dim < 2 || hp.head_dim % 2) f.format_error("head dimension %d must be even and >= 2", hp.head_dim);
    const int vdim = dim_key("llama.attention.value_length", 1, 4096, hp.head_dim);
    if (vdim != hp.head_dim) f.format_error("llama.attention.value_length = %d differs from key_length = %d", vdim, hp.head_dim);
    if ((int64_t)hp.n_head * hp.head_dim > (1 << 17)) f.format_error("attention width %d x %d is absurd", hp.n_head, hp.head_dim);
    const int rope_dim = dim_key("llama.rope.dimension_count", 1, 4096, hp.head_dim);
    if (rope_dim != hp.head_dim)
        throw Error(WQE_ERR_UNSUPPORTED, f.path() + ": partial rotary embeddings (rope.dimension_count " + std::to_string(rope_dim) +
                                             " != head dim " + std::to_string(hp.head_dim) + ") are not supported");
    hp.n_ctx_train = dim_key("llama.context_length", 1, 1 << 24);
    hp.rms_eps = (float)f.get_float("llama.attention.layer_norm_rms_epsilon");
    if (!(hp.rms_eps >= 0.0f && hp.rms_eps < 1.0f)) f.format_error("layer_norm_rms_epsilon = %g is out of range", hp.rms_eps);
    hp.rope_base = (float)f.get_float("llama.rope.freq_base", 10000.0);
    if (!(hp.rope_base > 1.0f && std::isfinite(hp.rope_base))) f.format_error("rope.freq_base = %g is out of range", hp.rope_base);

    const GGUFTensor& emb = tensor("token_embd.weight");
    if (emb.n_dims != 2) f.format_error("tensor 'token_embd.weight' has %u dimensions, expected 2", emb.n_dims);
    if (emb.dims[1] > (uint64_t)(1 << 24)) f.format_error("vocabulary of %llu tokens is absurd", (unsigned long long)emb.dims[1]);
    hp.n_vocab = dim_key("llama.vocab_size", 1, 1 << 24, (int64_t)emb.dims[1]);
    // The output head (and the embedding table when tied) is dense F16/F32 or, since issue 12's quantized head, a
    // quantized linear in the decoders' layout (docs/format.md "Output head"): an I8 tensor with its keys.
    m.tok_embd = head_or_dense("token_embd.weight");
    m.tied = f.tensor("output.weight") == nullptr;
    m.output = m.tied ? m.tok_embd : head_or_dense("output.weight");
    m.output_norm = f32_vector("output_norm.weight", hp.n_embd);

    // RoPE inverse frequencies as Hugging Face computes them, divided by rope_freqs (llama3 scaling).
    const int half = hp.head_dim / 2;
    m.inv_freq.resize(half);
    for (int i = 0; i < half; ++i)
        m.inv_freq[i] = (float)(1.0 / std::pow((double)hp.rope_base, (double)(2 * i) / hp.head_dim));
    if (f.tensor("rope_freqs.weight")) {
        const std::vector<float> fac = f32_vector("rope_freqs.weight", half);
        for (int i = 0; i < half; ++i) {
            if (!(fac[i] > 0.0f)) f.format_error("rope_freqs.weight[%d] = %g is not positive", i, fac[i]);
            m.inv_freq[i] /= fac[i];
        }
        m.rope_scaled = true;
    }

    m.max_K = std::max(std::max(hp.n_embd, hp.n_ff), hp.q_dim());
    m.max_N = std::max(std::max(hp.n_vocab, hp.n_ff), hp.q_dim());
    for (int l = 0; l < hp.n_layer; ++l) {
        Layer& L = m.layers[l];
        const std::string p = "blk." + std::to_string(l) + ".";
        const int qd = L.n_head * hp.head_dim, kvd = L.n_head_kv * hp.head_dim;
        L.attn_norm = f32_vector(p + "attn_norm.weight", hp.n_embd);
        L.ffn_norm = f32_vector(p + "ffn_norm.weight", hp.n_embd);
        L.wq = chunked(p + "attn_q.weight", qd, hp.n_embd);
        L.wk = chunked(p + "attn_k.weight", kvd, hp.n_embd);
        L.wv = chunked(p + "attn_v.weight", kvd, hp.n_embd);
        L.wo = chunked(p + "attn_output.weight", hp.n_embd, qd);
        L.w_gate = chunked(p + "ffn_gate.weight", L.n_ff, hp.n_embd);
        L.w_up = chunked(p + "ffn_up.weight", L.n_ff, hp.n_embd);
        L.w_down = chunked(p + "ffn_down.weight", hp.n_embd, L.n_ff);
        if (rot_block) {
            const int widths[4] = {hp.n_embd, qd, hp.n_embd, L.n_ff};
            L.rot = load_rotations(f, l, rot_block, widths);
        }
    }
    // Token ids are range-checked as read (int64), before narrowing: 2^32 + 1 must not become 1.
    hp.bos = dim_key("tokenizer.ggml.bos_token_id", -1, hp.n_vocab - 1, -1);
    hp.eos = dim_key("tokenizer.ggml.eos_token_id", -1, hp.n_vocab - 1, -1);
    hp.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", true);
    load_tokenizer();
}

void Loader::load_tokenizer() {
    if (!f.has("tokenizer.ggml.model")) {
        m.tokenizer_error = "the model file has no tokenizer (no tokenizer.ggml.model key)";
        return;
    }
#ifdef WQE_HAVE_TOKENIZER
    const std::string model = f.get_string("tokenizer.ggml.model");
    // Every tokenizer array has one entry per vocabulary token: check the counts before copying.
    for (const char* key : {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}) {
        const GGUFValue* v = f.find(key);
        if (v && v->type == GV_ARRAY && v->count != (uint64_t)m.hp.n_vocab)
            f.format_error("key '%s' has %llu entries but the model's vocabulary is %d", key,
                           (unsigned long long)v->count, m.hp.n_vocab);
    }
    std::vector<std::string> tokens;
    for (const GGUFString& s : f.get_array("tokenizer.ggml.tokens", GV_STRING).strings) tokens.push_back(s.str());
    std::vector<float> scores;
    if (f.has("tokenizer.ggml.scores")) {
        const GGUFValue& v = f.get_array("tokenizer.ggml.scores", GV_FLOAT32);
        scores.resize(v.count);
        std::memcpy(scores.data(), v.data, 4 * v.count);
    }
    std::vector<int32_t> types;
    if (f.has("tokenizer.ggml.token_type")) {
        for (int64_t t : f.get_int_array("tokenizer.ggml.token_type", (uint64_t)m.hp.n_vocab)) types.push_back((int32_t)t);
    }
    std::vector<std::string> merges;
    if (f.has("tokenizer.ggml.merges"))
        for (const GGUFString& s : f.get_array("tokenizer.ggml.merges", GV_STRING).strings) merges.push_back(s.str());
    const int unk = dim_key("tokenizer.ggml.unknown_token_id", -1, m.hp.n_vocab - 1, -1);
    try {
        m.tokenizer.reset(new wqedge::Tokenizer(model, std::move(tokens), std::move(scores), std::move(types), std::move(merges),
                                                m.hp.bos, m.hp.eos, unk, m.hp.add_bos,
                                                f.get_bool("tokenizer.ggml.add_eos_token", false),
                                                f.get_bool("tokenizer.ggml.add_space_prefix", true),
                                                f.get_string("tokenizer.ggml.pre", ""),
                                                f.get_string("wqedge.tokenizer.spm_prepend", "first")));
    } catch (const wqedge::UnsupportedPreTokenizer& e) {
        // A valid file whose text splitting we do not implement: the model opens (token ids
        // still work) but tokenizing reports this, rather than giving ids that differ from HF.
        m.tokenizer_error = e.what();
        return;
    } catch (const std::exception& e) {
        f.format_error("invalid tokenizer: %s", e.what());
    }
    if (m.tokenizer->n_tokens() != m.hp.n_vocab)
        f.format_error("tokenizer has %d tokens but the model's vocabulary is %d", m.tokenizer->n_tokens(), m.hp.n_vocab);
#else
    m.tokenizer_error = "tokenizer not built into this library (cpp/src/tokenizer.cpp was missing at build time)";
#endif
}

}  // namespace

Model::Model(const std::string& path) : file(new GGUFFile(path)) {
    Loader ld{*file, *this};
    ld.load();
}

Model::~Model() = default;

// ------------------------------------------------------------------ context
// Buffers sized by the caller's numbers are zeroed when made: refuse more than the machine's memory up
// front rather than being killed half-way through touching them.
static void check_fits(double bytes, const std::string& what) {
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && bytes > (double)pages * (double)page)
        fail(WQE_ERR_OUT_OF_MEMORY, "%s needs %.1f GiB, more than this machine's %.1f GiB of memory", what.c_str(),
             bytes / 1073741824.0, (double)pages * page / 1073741824.0);
}

Context::Context(const Model& m, int n_ctx_, int n_threads, int kv_bits, int kv_rotate) : model(m), n_ctx(n_ctx_) {
    const HParams& hp = m.hp;
    if (n_ctx < 1 || n_ctx > MAX_CTX) fail(WQE_ERR_INVALID_ARGUMENT, "context length %d is outside [1, %d]", n_ctx, MAX_CTX);
    if (kv_bits != -1 && kv_bits != 0 && kv_bits != 16 && kv_bits != 8 && kv_bits != 4)
        fail(WQE_ERR_INVALID_ARGUMENT, "KV cache bits %d: use 16 (fp16), 8, 4, 0 (float32) or -1 (the file's setting)",
             kv_bits);
    if (kv_rotate < -1 || kv_rotate > 1) fail(WQE_ERR_INVALID_ARGUMENT, "KV cache rotation %d: use 0, 1 or -1", kv_rotate);
    kvf = KvFormat::make(kv_bits < 0 ? hp.kv_bits : kv_bits, kv_rotate < 0 ? hp.kv_rotate : kv_rotate == 1, hp.head_dim);
    // kv <= 2^12 layers * 2^24 tokens * 2^17 floats: no overflow in 64 bits.
    size_t kv = 0;
    for (const Layer& L : m.layers) {
        kv_off.push_back(kv);
        kv += (size_t)n_ctx * L.n_head_kv * hp.head_dim;
    }
    const size_t kv_rows = kv / hp.head_dim;
    const int nt = n_threads > 0 ? n_threads : default_thread_count();
    check_fits(2.0 * (double)kv_rows * kvf.row_bytes + (double)nt * ATT_QUERIES * n_ctx * sizeof(float),
               "a KV cache of " + std::to_string(n_ctx) + " tokens (with " + std::to_string(nt) + " threads' scores)");
    try {
        if (kvf.bits == 0) {
            k_cache.assign(kv, 0.0f);
            v_cache.assign(kv, 0.0f);
        } else {
            kq_cache.assign(kv_rows * kvf.row_bytes, 0);
            vq_cache.assign(kv_rows * kvf.row_bytes, 0);
        }
    } catch (const std::bad_alloc&) {
        fail(WQE_ERR_OUT_OF_MEMORY, "cannot allocate a KV cache of %d tokens (%.1f MiB)", n_ctx,
             2.0 * kv_rows * kvf.row_bytes / 1048576.0);
    }
    set_threads(n_threads);
}

size_t Context::kv_bytes() const {
    return kvf.bits == 0 ? (k_cache.size() + v_cache.size()) * sizeof(float) : kq_cache.size() + vq_cache.size();
}

void Context::set_threads(int n) {
    if (n <= 0) n = default_thread_count();
    if (pool && pool->size() == n) return;
    check_fits((double)n * ATT_QUERIES * n_ctx * sizeof(float), "attention scores for " + std::to_string(n) + " threads x " +
                                                                    std::to_string(ATT_QUERIES) + " queries x " + std::to_string(n_ctx) + " tokens");
    pool.reset(new ThreadPool(n));
    ms.reserve(n, model.max_K, model.max_g_pad, model.max_x_floats, model.max_chunks);
    // per thread: ATT_QUERIES (token, head) queries' scores and rotated queries (KV cache), and KV_CHUNK dequantized rows
    scores.assign(n, std::vector<float>((size_t)ATT_QUERIES * (n_ctx + model.hp.head_dim) + (size_t)KV_CHUNK * model.hp.head_dim));
}

void Context::ensure_batch(int n) {
    if (n <= n_batch_alloc) return;
    const HParams& hp = model.hp;
    x.resize((size_t)n * hp.n_embd);
    xb.resize((size_t)n * std::max(hp.n_embd, hp.q_dim()));
    xb2.resize((size_t)n * hp.n_embd);
    q.resize((size_t)n * hp.q_dim());
    k.resize((size_t)n * hp.kv_dim());
    v.resize((size_t)n * hp.kv_dim());
    att.resize((size_t)n * hp.q_dim());
    hg.resize((size_t)n * hp.n_ff);
    hu.resize((size_t)n * hp.n_ff);
    act_steps.resize((size_t)n);
    rope_cos.resize((size_t)n * hp.head_dim / 2);
    rope_sin.resize((size_t)n * hp.head_dim / 2);
    n_batch_alloc = n;
}

// ------------------------------------------------------------------ non-finite values
// The loader checks the small float tensors (norms, rope_freqs) completely. The embedding matrix is
// large and stays lazily mapped, so its rows are checked when looked up (once per token per eval), and
// anything else (the output head, a linear's fp16 scales) is caught by checking the logits once per
// evaluated token; only then is the file scanned to name the culprit. No check sits in the kernels.
static bool finite_half(uint16_t h) { return (h & 0x7C00u) != 0x7C00u; }
static bool finite_halves(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!finite_half(load_u16(p + 2 * i))) return false;
    return true;
}
static bool finite_floats(const float* x, size_t n) {
    int bad = 0;  // no early exit: the compiler vectorizes the compare-and-or (the logits of every decode step)
    for (size_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= FLT_MAX);  // NaN compares false
    return !bad;
}
// Row r of a tensor is finite (dense values; chunked: the fp16 scales, fp16 codes and protected residuals of its
// row-blocks, read from the file's row layout).
static bool row_finite(const Linear& L, int r) {
    const uint8_t* row = L.row(r);
    if (L.kind == Linear::CHUNKED) {
        for (const Chunk& ch : L.chunks) {
            const uint8_t* rb = row + ch.off;
            const size_t halves = ch.bt->id == KIND_FP16 ? ch.bt->code_bytes(ch.g_pad) / 2 : (size_t)ch.bt->header_bytes / 2;
            if (!finite_halves(rb, halves) || !finite_halves(rb + ch.res_off, ch.n_prot)) return false;
        }
        return true;
    }
    if (L.kind == Linear::DENSE_F16) return finite_halves(row, L.K);
    for (int k = 0; k < L.K; ++k) {
        float v;
        std::memcpy(&v, row + 4 * (size_t)k, 4);
        if (!std::isfinite(v)) return false;
    }
    return true;
}

// First row of a tensor holding a non-finite weight (dense values; chunked: fp16 scales, fp16 codes
// and protected residuals), or -1.
static int64_t nonfinite_row(const Linear& L) {
    for (int r = 0; r < L.N; ++r)
        if (!row_finite(L, r)) return r;
    return -1;
}

static std::string nonfinite_culprit(const Model& m) {
    std::vector<const Linear*> all = {&m.tok_embd};
    if (!m.tied) all.push_back(&m.output);
    for (const Layer& L : m.layers)
        for (const Linear* W : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) all.push_back(W);
    for (const Linear* W : all) {
        const int64_t r = nonfinite_row(*W);
        if (r >= 0) return "tensor '" + W->name + "' holds a non-finite value in row " + std::to_string(r);
    }
    return "no weight is non-finite; the activations overflowed";
}

void Context::eval(const int32_t* tokens, int n, float* logits, bool all) {
    const HParams& hp = model.hp;
    if (n <= 0) fail(WQE_ERR_INVALID_ARGUMENT, "no tokens to evaluate (n_tokens = %d)", n);
    if (n > n_ctx - n_past) fail(WQE_ERR_CONTEXT_FULL, "%d tokens do not fit: context holds %d of %d", n, n_past, n_ctx);
    for (int i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= hp.n_vocab)
            fail(WQE_ERR_INVALID_ARGUMENT, "token %d at index %d is outside the vocabulary [0, %d)", tokens[i], i, hp.n_vocab);
    for (int i = 0; i < n; ++i) {
        if (!row_finite(model.tok_embd, tokens[i]))
            fail(WQE_ERR_FORMAT, "%s: tensor 'token_embd.weight' holds a non-finite value in row %d (token %d at index %d); "
                 "the file is corrupt", model.file->path().c_str(), tokens[i], tokens[i], i);
    }
    const int n_past0 = n_past;
    for (int i0 = 0; i0 < n; i0 += MAX_UBATCH) {
        const int nb = std::min(MAX_UBATCH, n - i0);
        const bool last = i0 + nb == n;
        float* out = nullptr;
        if (logits && all) out = logits + (size_t)i0 * hp.n_vocab;
        else if (logits && last) out = logits;
        forward(tokens + i0, nb, out, all);
        if (out && !finite_floats(out, (size_t)(all ? nb : 1) * hp.n_vocab)) {
            n_past = n_past0;  // the cache holds non-finite values from here on: drop this eval
            fail(WQE_ERR_FORMAT, "%s: the model produced non-finite logits; the file may be corrupt: %s",
                 model.file->path().c_str(), nonfinite_culprit(model).c_str());
        }
    }
}

// ------------------------------------------------------------------ forward pass
static void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
    // the sum of squares in 8 double lanes (i mod 8): one serial chain of double adds was ~4 cycles per value on the
    // calling thread, between two threaded products (issue 12)
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) l[j] += (double)x[i + j] * x[i + j];
    for (; i < n; ++i) l[i % 8] += (double)x[i] * x[i];
    const double ss = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    const float scale = 1.0f / std::sqrt((float)(ss / n) + eps);
    for (i = 0; i < n; ++i) out[i] = w[i] * (x[i] * scale);
}

// Rotate-half RoPE (Hugging Face order): pairs (i, i + d/2) of every head.
static void rope(float* v, int n_heads, int hd, const float* cs, const float* sn) {
    const int half = hd / 2;
    for (int h = 0; h < n_heads; ++h) {
        float* p = v + (size_t)h * hd;
        for (int i = 0; i < half; ++i) {
            const float a = p[i], b = p[i + half];
            p[i] = a * cs[i] - b * sn[i];
            p[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

// The largest of x[0..n), as `m = std::max(m, x[s])` from -inf in order gives it (NaNs passed over; of two equal
// zeros either, which exp(x - m) cannot tell apart), with eight running maxima: the one chain of dependent
// comparisons, a few cycles a key, was 10% of a decode step after 2000 tokens (bench/results/decode_depth.md).
static float row_max(const float* x, int n) {
    float m[8];
    for (float& v : m) v = -INFINITY;
    int s = 0;
    for (; s + 8 <= n; s += 8)
        for (int i = 0; i < 8; ++i) m[i] = std::max(m[i], x[s + i]);
    for (; s < n; ++s) m[0] = std::max(m[0], x[s]);
    for (int i = 1; i < 8; ++i) m[0] = std::max(m[0], m[i]);
    return m[0];
}

// Query heads per attention task (forward): the largest divisor of the KV group size, up to ATT_QPT, that still
// leaves a task per thread (n_kv_tasks = tokens x KV heads), so decode on many cores keeps one head per task.
static int att_heads_per_task(int group, int n_kv_tasks, int threads) {
    int best = 1;
    for (int k = 2; k <= std::min(group, ATT_QPT); ++k)
        if (group % k == 0 && (long)n_kv_tasks * (group / k) >= threads) best = k;
    return best;
}

// Process n tokens at positions n_past .. n_past + n - 1 (the llama2.c forward, batched).
void Context::forward(const int32_t* tokens, int n, float* logits, bool all) {
    const Model& m = model;
    const HParams& hp = m.hp;
    const int D = hp.n_embd, hd = hp.head_dim, half = hd / 2;
    const int kern = active_kernels();
    const int act = active_act();  // int8 activations: decode (matvec) and prefill (the int8 tile GEMM in matmul)
    const VecOps& ops = vec_ops(kern);
    ThreadPool& tp = *pool;
    ensure_batch(n);
    const int pos0 = n_past;

    // Token embeddings.
    for (int t = 0; t < n; ++t) dense_row(m.tok_embd, tokens[t], &x[(size_t)t * D], kern);

    // RoPE angles for these positions (fp32 angle as Hugging Face computes it).
    for (int t = 0; t < n; ++t)
        for (int i = 0; i < half; ++i) {
            const float ang = (float)(pos0 + t) * m.inv_freq[i];
            rope_cos[(size_t)t * half + i] = (float)std::cos((double)ang);
            rope_sin[(size_t)t * half + i] = (float)std::sin((double)ang);
        }
    const float att_scale = 1.0f / std::sqrt((float)hd);

    for (int l = 0; l < hp.n_layer; ++l) {
        const Layer& L = m.layers[l];
        const int H = L.n_head, QD = H * hd, KVD = L.n_head_kv * hd, F = L.n_ff, group = H / L.n_head_kv;
        const bool kvq = kvf.bits != 0;  // quantized KV cache (kvcache.h)
        // Both caches are head-major: KV head h's row of position s is row h * n_ctx + s of the layer, so a task that
        // reads one KV head streams contiguous memory (position-major rows a whole token's K apart measured 2x slower
        // at 2000 tokens: the prefetchers fetch the other heads' bytes too; bench/results/decode_depth.md).
        float* kc = kvq ? nullptr : &k_cache[kv_off[l]];
        float* vc = kvq ? nullptr : &v_cache[kv_off[l]];
        uint8_t* kqc = kvq ? &kq_cache[kv_off[l] / hd * kvf.row_bytes] : nullptr;
        uint8_t* vqc = kvq ? &vq_cache[kv_off[l] / hd * kvf.row_bytes] : nullptr;

        // Attention: xb = rmsnorm(x); q, k, v projections; RoPE; append k, v to the cache.
        for (int t = 0; t < n; ++t) rmsnorm(&xb[(size_t)t * D], &x[(size_t)t * D], L.attn_norm.data(), D, hp.rms_eps);
        group_input(L.rot_of(0), hp.act_bits, xb.data(), n, D, tp, kern, act_steps.data());  // RUQuant (format 2); else nothing
        // the four groups' inputs lie on their tokens' grids (act bits 4 or 6): the int8 products take them exactly
        ms.act_grid = hp.act_bits < 8 ? act_steps.data() : nullptr;
        if (n == 1) {  // decode: one threaded pass for the three products of the same input
            const Linear* W[3] = {&L.wq, &L.wk, &L.wv};
            float* Y[3] = {q.data(), k.data(), v.data()};
            matvec_group(3, W, xb.data(), Y, tp, ms, kern, act);
        } else {
            matmul(L.wq, xb.data(), n, q.data(), tp, ms, kern, act);
            matmul(L.wk, xb.data(), n, k.data(), tp, ms, kern, act);
            matmul(L.wv, xb.data(), n, v.data(), tp, ms, kern, act);
        }
        for (int t = 0; t < n; ++t) {
            rope(&q[(size_t)t * QD], H, hd, &rope_cos[(size_t)t * half], &rope_sin[(size_t)t * half]);
            rope(&k[(size_t)t * KVD], L.n_head_kv, hd, &rope_cos[(size_t)t * half], &rope_sin[(size_t)t * half]);
        }
        for (int r = 0; r < n * L.n_head_kv; ++r) {  // token t = r / n_head_kv, KV head r % n_head_kv
            const size_t row = (size_t)(r % L.n_head_kv) * n_ctx + pos0 + r / L.n_head_kv;
            if (!kvq) {
                std::memcpy(kc + row * hd, &k[(size_t)r * hd], sizeof(float) * hd);
                std::memcpy(vc + row * hd, &v[(size_t)r * hd], sizeof(float) * hd);
            } else {  // K rotated (in place: k is not read again) and quantized, V quantized
                if (kvf.rotate) kv_hadamard(&k[(size_t)r * hd], hd, kvf.hblock);
                kv_quantize(kvf, &k[(size_t)r * hd], kqc + row * kvf.row_bytes, kern);
                kv_quantize(kvf, &v[(size_t)r * hd], vqc + row * kvf.row_bytes, kern);
            }
        }

        // Causal grouped-query attention. A task = (a block of tb tokens, KV head, a run of qpt query heads of its group):
        // the KV head's rows are read KV_CHUNK positions at a time (a quantized one dequantized once), and each chunk
        // serves every token and head of the task while it is in L1, so a prompt reads each row once per block of
        // tokens rather than once per token. Each (token, head) gets the same operations whatever the blocking: its
        // scores over its own positions, its softmax, then its weighted sum in order of position.
        const bool kv_rows_read = (kvf.bits == 8 || kvf.bits == 4) && kvf.group == kv_group(kvf.bits) &&
                                  ops.att_scores_kv && ops.att_values_kv;  // the quantized rows read as stored
        const int qpt = att_heads_per_task(group, n * L.n_head_kv, tp.size()), n_sub = group / qpt;
        const int tb = std::max(1, std::min(ATT_QUERIES / qpt, n * L.n_head_kv * n_sub / (4 * tp.size())));
        const int n_tb = (n + tb - 1) / tb;
        tp.run(n_tb * L.n_head_kv * n_sub, [&](int task, int thread) {
            const int t0 = task / (L.n_head_kv * n_sub) * tb, nt = std::min(tb, n - t0);
            const int kvh = task / n_sub % L.n_head_kv, h0 = kvh * group + task % n_sub * qpt;
            const int n_max = pos0 + t0 + nt;                           // positions the block's last token sees
            float* sc = scores[thread].data();                          // nt x qpt rows of n_ctx scores
            float* qr = sc + (size_t)ATT_QUERIES * n_ctx;              // the queries in the keys' rotated space
            float* rows = qr + (size_t)ATT_QUERIES * hd;               // KV_CHUNK dequantized K or V rows
            const float* qh[ATT_QUERIES];                               // token u's qpt heads (contiguous)
            for (int u = 0; u < nt; ++u) {
                qh[u] = &q[(size_t)(t0 + u) * QD + (size_t)h0 * hd];
                if (kvq && kvf.rotate) {  // (H q).(H k) = q.k
                    float* r = qr + (size_t)u * qpt * hd;
                    std::memcpy(r, qh[u], sizeof(float) * qpt * hd);
                    for (int j = 0; j < qpt; ++j) kv_hadamard(r + (size_t)j * hd, hd, kvf.hblock);
                    qh[u] = r;
                }
            }
            // positions [s0, s0 + m) of this KV head's K or V, rows hd floats apart: in the float cache, or dequantized
            // into `rows`
            auto kv_rows = [&](const float* fc, const uint8_t* qc, int s0, int m) -> const float* {
                const size_t row0 = (size_t)kvh * n_ctx + s0;
                if (!kvq) return fc + row0 * hd;
                const uint8_t* r0 = qc + row0 * kvf.row_bytes;
                kv_rows_values(kvf, r0, m, n_max - s0, rows, kern);
                return rows;
            };
            // a 16-bit or quantized cache's rows [s0, ..) of this KV head, as stored
            auto rows_of = [&](const uint8_t* qc, int s0) { return qc + ((size_t)kvh * n_ctx + s0) * kvf.row_bytes; };
            // the fp16 cache's rows as stored: the _h kernels read them directly (half the bytes of float rows, and
            // no conversion pass; each value's float is exact, so the same bits as converting first)
            auto half_rows = [&](const uint8_t* qc, int s0) {
                return reinterpret_cast<const uint16_t*>(rows_of(qc, s0));
            };
            // a quantized cache's rows as stored, where the set reads them (att_scores_kv / att_values_kv: groups of 32
            // at 8 bits, 16 at 4): each value formed in registers as the conversion forms it, so the same bits again
            auto scores_kv = [&](const float* qv, int nq, int d, const uint8_t* r, size_t, int nr, float scl, float* S,
                                 size_t lds) {
                ops.att_scores_kv(qv, nq, d, r, kvf.row_bytes, kvf.bits, nr, scl, S, lds);
            };
            auto values_kv = [&](const float* P, size_t ldp, int nq, int d, const uint8_t* r, size_t, int nr,
                                 float* O) { ops.att_values_kv(P, ldp, nq, d, r, kvf.row_bytes, kvf.bits, nr, O); };
            auto seen = [&](int u, int s0, int m) { return std::min(m, pos0 + t0 + u + 1 - s0); };  // causal
            auto out_of = [&](int u) { return &att[(size_t)(t0 + u) * QD + (size_t)h0 * hd]; };  // token u's qpt heads
            auto scores_of = [&](auto* kr, auto kernel, int s0, int m) {
                for (int u = 0; u < nt; ++u)
                    if (const int mu = seen(u, s0, m); mu > 0)
                        kernel(qh[u], qpt, hd, kr, hd, mu, att_scale, sc + (size_t)u * qpt * n_ctx + s0, n_ctx);
            };
            auto values_of = [&](auto* vr, auto kernel, int s0, int m) {
                for (int u = 0; u < nt; ++u)
                    if (const int mu = seen(u, s0, m); mu > 0)
                        kernel(sc + (size_t)u * qpt * n_ctx + s0, n_ctx, qpt, hd, vr, hd, mu, out_of(u));
            };
            for (int s0 = 0; s0 < n_max; s0 += KV_CHUNK) {
                const int m = std::min(KV_CHUNK, n_max - s0);
                if (kvf.bits == 16) scores_of(half_rows(kqc, s0), ops.att_scores_h, s0, m);
                else if (kv_rows_read) scores_of(rows_of(kqc, s0), scores_kv, s0, m);
                else scores_of(kv_rows(kc, kqc, s0, m), ops.att_scores, s0, m);
            }
            float inv[ATT_QUERIES];
            for (int r = 0; r < nt * qpt; ++r) {
                float* scr = sc + (size_t)r * n_ctx;
                const int n_keys = pos0 + t0 + r / qpt + 1;
                inv[r] = 1.0f / ops.exp_sum(scr, n_keys, row_max(scr, n_keys));
            }
            for (int u = 0; u < nt; ++u) std::memset(out_of(u), 0, sizeof(float) * qpt * hd);
            for (int s0 = 0; s0 < n_max; s0 += KV_CHUNK) {
                const int m = std::min(KV_CHUNK, n_max - s0);
                if (kvf.bits == 16) values_of(half_rows(vqc, s0), ops.att_values_h, s0, m);
                else if (kv_rows_read) values_of(rows_of(vqc, s0), values_kv, s0, m);
                else values_of(kv_rows(vc, vqc, s0, m), ops.att_values, s0, m);
            }
            for (int u = 0; u < nt; ++u) {
                float* out = out_of(u);
                for (int j = 0; j < qpt; ++j)
                    for (int d = 0; d < hd; ++d) out[(size_t)j * hd + d] *= inv[u * qpt + j];
            }
        });
        group_input(L.rot_of(1), hp.act_bits, att.data(), n, QD, tp, kern, act_steps.data());
        matmul(L.wo, att.data(), n, xb2.data(), tp, ms, kern, act);
        for (size_t i = 0; i < (size_t)n * D; ++i) x[i] += xb2[i];

        // SwiGLU MLP: x += W_down (silu(W_gate xb) * (W_up xb)).
        for (int t = 0; t < n; ++t) rmsnorm(&xb[(size_t)t * D], &x[(size_t)t * D], L.ffn_norm.data(), D, hp.rms_eps);
        group_input(L.rot_of(2), hp.act_bits, xb.data(), n, D, tp, kern, act_steps.data());
        if (n == 1) {
            const Linear* W[2] = {&L.w_gate, &L.w_up};
            float* Y[2] = {hg.data(), hu.data()};
            matvec_group(2, W, xb.data(), Y, tp, ms, kern, act);
        } else {
            matmul(L.w_gate, xb.data(), n, hg.data(), tp, ms, kern, act);
            matmul(L.w_up, xb.data(), n, hu.data(), tp, ms, kern, act);
        }
        ops.silu_mul(hg.data(), hu.data(), n * F);
        group_input(L.rot_of(3), hp.act_bits, hg.data(), n, F, tp, kern, act_steps.data());
        matmul(L.w_down, hg.data(), n, xb2.data(), tp, ms, kern, act);
        for (size_t i = 0; i < (size_t)n * D; ++i) x[i] += xb2[i];
    }
    n_past += n;

    ms.act_grid = nullptr;  // the head's input is not quantized to a grid
    if (!logits) return;
    // Final norm and output head: every token's logits, or the last one's.
    const int first = all ? 0 : n - 1;
    for (int t = first; t < n; ++t) rmsnorm(&xb[(size_t)t * D], &x[(size_t)t * D], m.output_norm.data(), D, hp.rms_eps);
    matmul(m.output, &xb[(size_t)first * D], n - first, logits, tp, ms, kern, act);
}

}  // namespace wqe
