/* Minimal wqedge application in C: load a wqedge GGUF, generate text greedily from a prompt.
 *
 *   generate MODEL.gguf "Once upon a time" [N_NEW [LOGITS.f32]]
 *
 * Prints the prompt followed by up to N_NEW (default 32) generated tokens. With LOGITS.f32 it also
 * writes the logits of every prompt position (n_prompt x n_vocab float32, row-major, little-endian):
 * tests/test_aarch64.py compares those between an x86-64 and an AArch64 (qemu) run.
 * Uses only the public C API (wqedge.h); links libwqedge (shared or static). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wqedge.h"

static int check(int status, const char* what) {
    if (status != WQE_OK) {
        fprintf(stderr, "%s: %s (%s)\n", what, wqe_status_name(status), wqe_last_error());
        exit(1);
    }
    return status;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [N_NEW [LOGITS.f32]]\n", argv[0]);
        return 2;
    }
    const char* prompt = argv[2];
    const int n_new = argc > 3 ? atoi(argv[3]) : 32;
    fprintf(stderr, "wqedge %s: %s\n", wqe_version(), wqe_system_info());

    wqe_model* model = NULL;
    check(wqe_model_open(argv[1], &model), "open");
    wqe_model_info info;
    check(wqe_model_get_info(model, &info), "info");

    /* Tokenize (first call asks for the count). */
    int32_t n_prompt = 0;
    int st = wqe_tokenize(model, prompt, strlen(prompt), 1, NULL, 0, &n_prompt);
    if (st != WQE_OK && st != WQE_ERR_BUFFER_TOO_SMALL) check(st, "tokenize");
    int32_t* tokens = malloc(sizeof(int32_t) * (size_t)(n_prompt + n_new + 1));
    check(wqe_tokenize(model, prompt, strlen(prompt), 1, tokens, n_prompt, &n_prompt), "tokenize");

    wqe_context_params cp = wqe_context_default_params();
    cp.n_ctx = n_prompt + n_new + 1;
    wqe_context* ctx = NULL;
    check(wqe_context_new(model, &cp, &ctx), "context");

    if (argc > 4) { /* logits of every prompt position, then start again from an empty cache */
        float* logits = malloc(sizeof(float) * (size_t)n_prompt * (size_t)info.n_vocab);
        check(wqe_eval(ctx, tokens, n_prompt, logits, 1), "eval");
        FILE* f = fopen(argv[4], "wb");
        if (!f || fwrite(logits, sizeof(float), (size_t)n_prompt * info.n_vocab, f) != (size_t)n_prompt * info.n_vocab) {
            fprintf(stderr, "cannot write %s\n", argv[4]);
            return 1;
        }
        fclose(f);
        free(logits);
        check(wqe_set_position(ctx, 0), "reset");
    }

    wqe_sampler_params sp = wqe_sampler_default_params(); /* greedy */
    int32_t n_out = 0;
    check(wqe_generate(ctx, tokens, n_prompt, n_new, &sp, 1, NULL, NULL, tokens + n_prompt, &n_out), "generate");

    size_t len = 0;
    st = wqe_detokenize(model, tokens, n_prompt + n_out, NULL, 0, &len);
    if (st != WQE_OK && st != WQE_ERR_BUFFER_TOO_SMALL) check(st, "detokenize");
    char* text = malloc(len + 1);
    check(wqe_detokenize(model, tokens, n_prompt + n_out, text, len + 1, &len), "detokenize");
    printf("%s\n", text);
    fprintf(stderr, "generated %d tokens\n", (int)n_out);

    free(text);
    free(tokens);
    wqe_context_free(ctx);
    wqe_model_free(model);
    return 0;
}
