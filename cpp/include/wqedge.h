/* wqedge C API: run LLaMA models quantized in wqedge's column-chunk GGUF format (docs/format.md).
 *
 * Conventions
 *   - Every function that can fail returns an int status: WQE_OK (0) or a WQE_ERR_* code.
 *     After a failure, wqe_last_error() returns a readable message (per thread, valid until the
 *     next call into the library from that thread).
 *   - Objects are opaque; each *_new / *_open has a matching *_free (NULL is accepted).
 *   - A model is read-only once open and may be shared by several contexts; a context (KV cache,
 *     scratch buffers, thread pool) is used by one thread at a time.
 *   - Token ids are int32; logits are float32, n_vocab per token.
 */
#ifndef WQEDGE_H
#define WQEDGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  define WQE_API __declspec(dllexport)
#elif defined(__GNUC__)
#  define WQE_API __attribute__((visibility("default")))
#else
#  define WQE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define WQE_FORMAT_VERSION 4  /* newest file format read; 1, 2 (RUQuant, act bits), 3 (int8 transform matrices) and 4 (compact row headers) all run */

enum wqe_status {
    WQE_OK = 0,
    WQE_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a negative count, an id out of range, ... */
    WQE_ERR_IO = 2,               /* the file cannot be opened, read or mapped */
    WQE_ERR_FORMAT = 3,           /* the file is not a valid wqedge GGUF (truncated, bad magic, bad shape, ...) */
    WQE_ERR_UNSUPPORTED = 4,      /* valid but not supported here (format version, tensor type, CPU feature) */
    WQE_ERR_OUT_OF_MEMORY = 5,
    WQE_ERR_CONTEXT_FULL = 6,     /* the tokens do not fit in the context's KV cache */
    WQE_ERR_BUFFER_TOO_SMALL = 7, /* the output buffer is too small; the needed size is returned */
    WQE_ERR_NO_TOKENIZER = 8,     /* the file has no usable tokenizer, or the tokenizer is not built in */
    WQE_ERR_INTERNAL = 9
};

/* Message of the last failed call on this thread ("" when none). */
WQE_API const char* wqe_last_error(void);
/* Name of a status code ("WQE_ERR_FORMAT", ...). */
WQE_API const char* wqe_status_name(int status);
/* Library version, e.g. "0.1.0". */
WQE_API const char* wqe_version(void);
/* One line: CPU features found and the kernels in use, e.g. "avx2=1 fma=1 f16c=1 kernels=avx2". */
WQE_API const char* wqe_system_info(void);

/* Kernel selection for the whole process: 0 = best the CPU supports (default; the environment
 * variable WQEDGE_KERNELS=scalar|avx2 overrides it at load time), 1 = scalar reference,
 * 2 = AVX2+FMA+F16C (WQE_ERR_UNSUPPORTED when the CPU lacks it). */
enum wqe_kernels { WQE_KERNELS_AUTO = 0, WQE_KERNELS_SCALAR = 1, WQE_KERNELS_AVX2 = 2, WQE_KERNELS_NEON = 3 };
WQE_API int wqe_set_kernels(int kernels);
WQE_API int wqe_get_kernels(void); /* the kernels in use: WQE_KERNELS_SCALAR, _AVX2 or _NEON */

/* Activation precision of single-token steps (decode; batched prompts always use float), for the
 * whole process: WQE_ACT_F32 = float32 activations (matches the PyTorch reference to ~1e-5 of the
 * logits' spread), WQE_ACT_Q8 = activations quantized to int8 per 32 columns with integer dot
 * products (fp16 chunks and protected columns stay float; faster, but logits move by ~2% of their
 * spread on average and perplexity by < 0.5%: cpp/README.md). The default is WQE_ACT_Q8; the
 * environment variable WQEDGE_ACT=f32|q8 overrides it at load time. */
enum wqe_activations { WQE_ACT_F32 = 0, WQE_ACT_Q8 = 1 };
WQE_API int wqe_set_activations(int act);
WQE_API int wqe_get_activations(void);

/* ------------------------------------------------------------------ models */
typedef struct wqe_model wqe_model;

typedef struct wqe_model_info {
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t n_ff;
    int32_t n_ctx_train;      /* llama.context_length */
    int32_t group_size;       /* wqedge.group_size */
    int32_t format_version;   /* wqedge.format_version */
    int32_t bos_token_id;     /* -1 when absent */
    int32_t eos_token_id;     /* -1 when absent */
    int32_t add_bos;          /* tokenizer.ggml.add_bos_token (1 when absent) */
    int32_t tied_embeddings;  /* 1 when output.weight is absent */
    int32_t has_tokenizer;    /* 1 when wqe_tokenize can be used */
    int32_t rope_scaled;      /* 1 when rope_freqs.weight is present */
    float rope_freq_base;
    float rms_eps;
    float effective_bits;     /* wqedge.effective_bits (0 when absent) */
    uint64_t file_bytes;
    uint64_t quantized_bytes; /* bytes of the quantized linears (I8 tensors and their .protect) */
} wqe_model_info;

/* Memory-map and validate a model file. On failure *out is NULL and the status says why. */
WQE_API int wqe_model_open(const char* path, wqe_model** out);
WQE_API void wqe_model_free(wqe_model* model);
WQE_API int wqe_model_get_info(const wqe_model* model, wqe_model_info* info);
/* The plan JSON stored in the file (wqedge.plan), or "" when absent. Valid while the model is open. */
WQE_API const char* wqe_model_plan(const wqe_model* model);

/* The chat template stored in the file (tokenizer.chat_template, a Jinja template as in the checkpoint's
 * tokenizer_config.json or chat_template.jinja), UTF-8. Writes at most capacity bytes including a
 * terminating NUL; *length = bytes of text without the NUL, 0 when the file has no template. When
 * capacity is too small, returns WQE_ERR_BUFFER_TOO_SMALL with *length = the bytes needed. */
WQE_API int wqe_model_chat_template(const wqe_model* model, char* text, size_t capacity, size_t* length);

/* ------------------------------------------------------------------ tokenizer */
/* Text (UTF-8, text_len bytes) to token ids. add_bos: 1 prepend BOS, 0 do not, -1 as the file says.
 * When capacity is too small, returns WQE_ERR_BUFFER_TOO_SMALL with *n_tokens = the count needed. */
WQE_API int wqe_tokenize(const wqe_model* model, const char* text, size_t text_len, int add_bos,
                         int32_t* tokens, int32_t capacity, int32_t* n_tokens);
/* Token ids to UTF-8 text (special tokens such as BOS/EOS are skipped). Writes at most capacity
 * bytes including a terminating NUL; *length = bytes of text without the NUL. When capacity is too
 * small, returns WQE_ERR_BUFFER_TOO_SMALL with *length = the bytes needed (without the NUL). */
WQE_API int wqe_detokenize(const wqe_model* model, const int32_t* tokens, int32_t n_tokens,
                           char* text, size_t capacity, size_t* length);

/* The bytes one token stands for, for streaming output (no leading-space stripping; special tokens
 * give "" unless special = 1). Same buffer convention as wqe_detokenize. */
WQE_API int wqe_token_to_piece(const wqe_model* model, int32_t token, int special, char* text, size_t capacity,
                               size_t* length);

/* ------------------------------------------------------------------ contexts */
typedef struct wqe_context wqe_context;

typedef struct wqe_context_params {
    int32_t n_ctx;     /* KV cache length in tokens, at most 2^24; 0 = the model's context length, at most
                        * 4096. A cache larger than the machine's memory is WQE_ERR_OUT_OF_MEMORY. */
    int32_t n_threads; /* 0 = the number of CPUs available */
    int32_t kv_bits;     /* KV cache (docs/format.md "KV cache"): 0 = the file's setting (wqedge.kv_cache.bits; float
                          * when absent), 32 = float32, 16 = fp16 values (half the bytes per decoded token at long
                          * context), 8 or 4 = quantized per token and KV head (groups of 32 / 16 values) */
    int32_t kv_rotation; /* 0 = the file's setting, 1 = Hadamard on K (and Q), 2 = none; ignored by a float cache */
} wqe_context_params;

WQE_API wqe_context_params wqe_context_default_params(void);
WQE_API int wqe_context_new(const wqe_model* model, const wqe_context_params* params, wqe_context** out);
WQE_API void wqe_context_free(wqe_context* ctx);
WQE_API int wqe_set_threads(wqe_context* ctx, int32_t n_threads);
WQE_API int32_t wqe_get_threads(const wqe_context* ctx);
WQE_API int32_t wqe_context_size(const wqe_context* ctx);
/* The context's KV cache: *bits 32 (float32), 8 or 4; *rotated 1 when K is Hadamard-rotated; *bytes the K and V
 * caches' size for the whole context length. Any pointer may be NULL. */
WQE_API int wqe_context_kv_cache(const wqe_context* ctx, int32_t* bits, int32_t* rotated, uint64_t* bytes);
/* Tokens held in the KV cache (the position of the next token). */
WQE_API int32_t wqe_get_position(const wqe_context* ctx);
/* Forget the cache from position n_past on (0 clears it); n_past must not exceed the current position. */
WQE_API int wqe_set_position(wqe_context* ctx, int32_t n_past);

/* Evaluate n_tokens tokens at the current position (one batched prefill) and append them to the
 * cache. logits: NULL, or room for n_vocab floats (all_logits = 0: the last token's) or
 * n_tokens * n_vocab floats (all_logits = 1: every token's, row by row).
 * A non-finite value in a looked-up embedding row, or non-finite logits (a corrupt weight elsewhere),
 * is WQE_ERR_FORMAT with a message naming the tensor; the position is then left as before the call. */
WQE_API int wqe_eval(wqe_context* ctx, const int32_t* tokens, int32_t n_tokens, float* logits, int all_logits);

/* ------------------------------------------------------------------ sampling */
typedef struct wqe_sampler_params {
    float temperature; /* <= 0: greedy (argmax) */
    float top_p;       /* nucleus sampling; >= 1 disables */
    int32_t top_k;     /* <= 0 disables */
    uint64_t seed;
} wqe_sampler_params;

typedef struct wqe_sampler wqe_sampler;
WQE_API wqe_sampler_params wqe_sampler_default_params(void); /* greedy, top_p 1, top_k 0, seed 0 */
WQE_API int wqe_sampler_new(const wqe_sampler_params* params, wqe_sampler** out);
WQE_API void wqe_sampler_free(wqe_sampler* sampler);
/* Draw one token from logits (n_vocab floats; not modified). Non-finite logits, and a non-finite
 * temperature or a NaN top_p (also in wqe_sampler_new / wqe_generate), are WQE_ERR_INVALID_ARGUMENT. */
WQE_API int wqe_sample(wqe_sampler* sampler, const float* logits, int32_t n_vocab, int32_t* token);

/* Called once per generated token; return nonzero to stop. */
typedef int (*wqe_token_callback)(int32_t token, void* user_data);

/* Evaluate the prompt at the current position, then sample up to max_new tokens, evaluating each
 * before sampling the next. Stops at EOS when stop_at_eos (EOS is not returned) or when the callback
 * returns nonzero. out_tokens (room for max_new) receives the new tokens and *n_out their count; the
 * cache then holds the prompt and every new token but the last. The callback may be NULL.
 * The prompt and max_new tokens must fit: position + n_prompt + max_new - 1 <= the context size, else
 * WQE_ERR_CONTEXT_FULL before any work (generation never stops silently at a full context). */
WQE_API int wqe_generate(wqe_context* ctx, const int32_t* prompt, int32_t n_prompt, int32_t max_new,
                         const wqe_sampler_params* params, int stop_at_eos, wqe_token_callback callback,
                         void* user_data, int32_t* out_tokens, int32_t* n_out);

/* ------------------------------------------------------------------ machine */
/* Memory read bandwidth in GB/s (1e9 bytes/s): `bytes` (rounded down to 64) read once per pass by n_threads threads
 * of the runtime's pool, each streaming one contiguous part, as a decode step streams the weights; best of `reps`
 * passes after one untimed pass. The roofline that decode speed is compared to (wqedge bench). Returns < 0 and sets
 * wqe_last_error() on bad arguments or when the buffer cannot be allocated. */
WQE_API double wqe_read_bandwidth(int32_t n_threads, uint64_t bytes, int32_t reps);

/* ------------------------------------------------------------------ test hooks */
/* y[r] = sum over the chunk's g columns of W[r, c] x[c] for n_rows row-blocks of one chunk, laid out
 * as in a file (row r at rowblocks + r * row_stride), computed with the chosen kernels
 * (WQE_KERNELS_*). protected_cols: chunk-local indices of the n_protected protected columns. */
WQE_API int wqe_test_chunk_matvec(int action, int32_t g, int32_t n_protected, const int32_t* protected_cols,
                                  const uint8_t* rowblocks, int32_t n_rows, size_t row_stride,
                                  const float* x, int kernels, float* y);
/* The same with a chosen activation precision (WQE_ACT_*): WQE_ACT_Q8 runs the int8 kernels. */
WQE_API int wqe_test_chunk_matvec_act(int action, int32_t g, int32_t n_protected, const int32_t* protected_cols,
                                      const uint8_t* rowblocks, int32_t n_rows, size_t row_stride,
                                      const float* x, int kernels, int act, float* y);
/* Dequantize the same row-blocks to W[n_rows, g] (float32, row-major) with the chosen kernels. */
WQE_API int wqe_test_chunk_dequant(int action, int32_t g, int32_t n_protected, const int32_t* protected_cols,
                                   const uint8_t* rowblocks, int32_t n_rows, size_t row_stride,
                                   int kernels, float* w);
/* Bytes of one row-block (the format's row_bytes), or -1 for an unknown action. */
WQE_API int64_t wqe_row_bytes(int action, int32_t g, int32_t n_protected);
/* The fp16 d and m (bits; m = 0 for ternaryc) the loader computes from n compact row headers of kind `action`
 * (ids 10-14; header r at headers + r * header_bytes, header_bytes 2, or 1 for ternaryc) under scale base `base`
 * (fp16 bits): docs/format.md, "Compact row headers". */
WQE_API int wqe_test_compact_params(int action, const uint8_t* headers, int32_t n, uint16_t base, uint16_t* d,
                                    uint16_t* m);

#ifdef __cplusplus
}
#endif

#endif /* WQEDGE_H */
