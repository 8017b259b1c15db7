// wqedge C++ tokenizer: SentencePiece ("llama") and byte-level BPE ("gpt2")
// tokenizers built from the arrays a GGUF file keeps under llama.cpp's
// tokenizer.ggml.* keys. Token ids are meant to be identical to the Hugging Face
// tokenizer of the same model (transformers 5 / tokenizers 0.23); see
// tests/test_cpp_tokenizer.py for what is checked and docs in tokenizer.cpp for
// the exact rules and known gaps.
//
// No GGUF parsing happens here: the runtime reads the keys and passes plain
// vectors:
//   model         tokenizer.ggml.model          "llama" | "gpt2"
//   tokens        tokenizer.ggml.tokens         UTF-8 strings, index = id
//   scores        tokenizer.ggml.scores         may be empty (then all 0)
//   token_types   tokenizer.ggml.token_type     may be empty (then all NORMAL)
//   merges        tokenizer.ggml.merges         "left right" strings; required
//                                               for gpt2; optional for llama
//   bos/eos/unk   tokenizer.ggml.{bos,eos,unknown}_token_id, -1 if absent
//   add_bos/eos   tokenizer.ggml.add_{bos,eos}_token
//   add_space_prefix  tokenizer.ggml.add_space_prefix (llama only; default true)
//   pre           tokenizer.ggml.pre (gpt2 only): "gpt-2" (also "" = key absent),
//                 "llama-bpe" (aliases "llama3", "llama-v3"), "smollm"; any
//                 other name throws UnsupportedPreTokenizer. Ignored for llama.
//   spm_prepend   wqedge.tokenizer.spm_prepend (llama only): "first" (default;
//                 transformers' legacy=false: "▁" before the text's first
//                 segment only), "always" (legacy=true, e.g. Mistral: before
//                 every segment, also right after a special token; both only
//                 when the segment does not start with a space) or "prepend"
//                 (older tokenizer.json's Prepend("▁") normalizer: before every
//                 segment unconditionally, so " hi" gives "▁▁hi").
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace wqedge {

// Values of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
enum TokenType : int32_t {
    TOKEN_TYPE_UNDEFINED = 0,
    TOKEN_TYPE_NORMAL = 1,
    TOKEN_TYPE_UNKNOWN = 2,
    TOKEN_TYPE_CONTROL = 3,
    TOKEN_TYPE_USER_DEFINED = 4,
    TOKEN_TYPE_UNUSED = 5,
    TOKEN_TYPE_BYTE = 6,
};

// A valid vocabulary whose pre-tokenizer (tokenizer.ggml.pre) is not implemented:
// the caller should report the tokenizer as unavailable rather than tokenize wrong.
class UnsupportedPreTokenizer : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

class Tokenizer {
public:
    enum class Model { SPM, BPE };
    // Byte-level BPE pre-tokenizers: GPT-2's regex; LLaMA 3's split regex
    // (llama.cpp 'llama-bpe', with ignore_merges as llama.cpp sets it);
    // SmolLM's individual digits followed by GPT-2's regex; Tekken's split
    // regex (Mistral NeMo; llama.cpp 'tekken', with ignore_merges).
    enum class Pre { GPT2, LLAMA3, SMOLLM, TEKKEN };

    // Throws std::invalid_argument for an unknown model name, arrays of
    // mismatched length or special ids out of range; UnsupportedPreTokenizer
    // (a std::invalid_argument) for a gpt2 model with an unknown pre name.
    Tokenizer(const std::string& model,
              std::vector<std::string> tokens,
              std::vector<float> scores,
              std::vector<int32_t> token_types,
              std::vector<std::string> merges,
              int32_t bos_id, int32_t eos_id, int32_t unk_id,
              bool add_bos, bool add_eos,
              bool add_space_prefix = true,
              const std::string& pre = std::string(),
              const std::string& spm_prepend = "first");
    ~Tokenizer();
    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;
    Tokenizer(const Tokenizer&) = delete;
    Tokenizer& operator=(const Tokenizer&) = delete;

    // Encode UTF-8 text. BOS is prepended iff add_bos (and the model has one),
    // EOS appended iff add_eos. Control, unknown and user-defined token texts
    // occurring in the input (e.g. "<s>") are matched verbatim and become
    // their ids, as Hugging Face does by default. Thread-safe (const).
    std::vector<int32_t> encode(const std::string& utf8, bool add_bos, bool add_eos = false) const;
    // Same as HF tokenizer(text)["input_ids"]: uses the add_bos/add_eos flags
    // given to the constructor.
    std::vector<int32_t> encode_with_defaults(const std::string& utf8) const {
        return encode(utf8, add_bos_, add_eos_);
    }

    // Same as HF tokenizer.decode(ids, skip_special_tokens=True): control and
    // unknown tokens are dropped; for "llama" one leading space of the result
    // is stripped. Invalid UTF-8 from byte tokens becomes U+FFFD as in HF.
    // Out-of-range ids are skipped.
    std::string decode(const std::vector<int32_t>& ids) const;

    // Raw bytes of one token for streaming output: "▁" -> ' ' (llama), byte
    // tokens -> that single byte (may be a partial UTF-8 sequence: buffer until
    // complete), byte-level BPE pieces -> their bytes. Control/unknown tokens
    // give "" unless special is true (then their text). No leading-space
    // stripping: a streaming caller that wants HF's decode() output drops the
    // first ' ' of the very first piece it prints after BOS.
    std::string token_to_piece(int32_t id, bool special = false) const;

    Model model() const { return model_; }
    Pre pre() const { return pre_; }
    int32_t n_tokens() const { return static_cast<int32_t>(tokens_.size()); }
    int32_t bos_id() const { return bos_id_; }
    int32_t eos_id() const { return eos_id_; }
    int32_t unk_id() const { return unk_id_; }
    bool add_bos_token() const { return add_bos_; }
    bool add_eos_token() const { return add_eos_; }
    const std::string& token_text(int32_t id) const;  // as stored in the vocabulary
    int32_t token_type(int32_t id) const;
    float token_score(int32_t id) const;
    bool is_control(int32_t id) const { return token_type(id) == TOKEN_TYPE_CONTROL; }
    // Exact vocabulary lookup; -1 if absent.
    int32_t token_to_id(const std::string& text) const;

private:
    struct Impl;
    Model model_;
    Pre pre_ = Pre::GPT2;
    std::vector<std::string> tokens_;
    std::vector<float> scores_;
    std::vector<int32_t> types_;
    int32_t bos_id_, eos_id_, unk_id_;
    bool add_bos_, add_eos_, add_space_prefix_;
    int prepend_mode_ = 0;  // 0 first, 1 always, 2 prepend
    std::unique_ptr<Impl> impl_;
};

}  // namespace wqedge
