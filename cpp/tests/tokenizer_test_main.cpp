// Test driver for wqedge::Tokenizer.
//
//   tokenizer_test_main encode [--no-special] [--time] VOCAB TEXT [TEXT...]
//       Encodes each text file (raw bytes) and prints the ids one per line;
//       with several files, a line "---" follows each file's ids. By default
//       BOS/EOS follow the vocabulary's add_bos_token/add_eos_token (like
//       HF tokenizer(text)["input_ids"]); --no-special adds neither.
//   tokenizer_test_main decode VOCAB IDS [OUT] [IDS OUT ...]
//       IDS: whitespace-separated ids. Writes Tokenizer::decode() to OUT
//       (stdout if a single IDS file is given without OUT).
//   tokenizer_test_main pieces VOCAB IDS [OUT] [IDS OUT ...]
//       Same, but writes the concatenation of token_to_piece(id).
//
// VOCAB dump (text, written by tests/test_cpp_tokenizer.py; mirrors the
// tokenizer.ggml.* GGUF keys):
//   wqedge-tokenizer-vocab 1
//   model <llama|gpt2>
//   bos_token_id <int, -1 if none>
//   eos_token_id <int>
//   unknown_token_id <int>
//   add_bos_token <0|1>
//   add_eos_token <0|1>
//   add_space_prefix <0|1>
//   tokens <N>
//   <token_type> <score> <hex of the token's UTF-8 bytes, "-" if empty>   (N lines, line i = id i)
//   merges <M>
//   <hex of the merge string "left right", "-" if empty>                   (M lines)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "tokenizer.h"

namespace {

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path);
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void write_file(const std::string& path, const std::string& data) {
    std::ofstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot write " + path);
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

std::string unhex(const std::string& h) {
    if (h == "-") return std::string();
    if (h.size() % 2) throw std::runtime_error("bad hex field: " + h);
    std::string out(h.size() / 2, '\0');
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(std::stoi(h.substr(2 * i, 2), nullptr, 16));
    return out;
}

void expect(std::istream& in, const char* key) {
    std::string k;
    if (!(in >> k) || k != key) throw std::runtime_error(std::string("vocab dump: expected '") + key + "', got '" + k + "'");
}

wqedge::Tokenizer load_vocab(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::string magic;
    int version = 0;
    in >> magic >> version;
    if (magic != "wqedge-tokenizer-vocab" || version != 1) throw std::runtime_error("not a wqedge vocab dump: " + path);
    std::string model;
    int32_t bos, eos, unk;
    int add_bos, add_eos, add_space_prefix;
    expect(in, "model"); in >> model;
    expect(in, "bos_token_id"); in >> bos;
    expect(in, "eos_token_id"); in >> eos;
    expect(in, "unknown_token_id"); in >> unk;
    expect(in, "add_bos_token"); in >> add_bos;
    expect(in, "add_eos_token"); in >> add_eos;
    expect(in, "add_space_prefix"); in >> add_space_prefix;
    size_t n = 0;
    expect(in, "tokens"); in >> n;
    std::vector<std::string> tokens(n);
    std::vector<float> scores(n);
    std::vector<int32_t> types(n);
    for (size_t i = 0; i < n; ++i) {
        std::string score, hex;
        if (!(in >> types[i] >> score >> hex)) throw std::runtime_error("vocab dump: truncated token list");
        scores[i] = std::strtof(score.c_str(), nullptr);
        tokens[i] = unhex(hex);
    }
    size_t m = 0;
    expect(in, "merges"); in >> m;
    std::vector<std::string> merges(m);
    for (size_t i = 0; i < m; ++i) {
        std::string hex;
        if (!(in >> hex)) throw std::runtime_error("vocab dump: truncated merge list");
        merges[i] = unhex(hex);
    }
    return wqedge::Tokenizer(model, std::move(tokens), std::move(scores), std::move(types), std::move(merges), bos, eos,
                             unk, add_bos != 0, add_eos != 0, add_space_prefix != 0);
}

std::vector<int32_t> read_ids(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::vector<int32_t> ids;
    long long v;
    while (in >> v) ids.push_back(static_cast<int32_t>(v));
    return ids;
}

int usage() {
    std::fprintf(stderr,
                 "usage: tokenizer_test_main encode [--no-special] [--time] VOCAB TEXT [TEXT...]\n"
                 "       tokenizer_test_main decode|pieces VOCAB IDS [OUT] [IDS OUT ...]\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        if (argc < 2) return usage();
        const std::string mode = argv[1];
        std::vector<std::string> args;
        bool no_special = false, timing = false;
        for (int i = 2; i < argc; ++i) {
            if (std::strcmp(argv[i], "--no-special") == 0) no_special = true;
            else if (std::strcmp(argv[i], "--time") == 0) timing = true;
            else args.emplace_back(argv[i]);
        }
        if (args.size() < 2) return usage();
        auto t0 = std::chrono::steady_clock::now();
        wqedge::Tokenizer tok = load_vocab(args[0]);
        auto t1 = std::chrono::steady_clock::now();
        if (timing)
            std::fprintf(stderr, "load: %.3f ms\n", std::chrono::duration<double, std::milli>(t1 - t0).count());

        if (mode == "encode") {
            std::string buf;
            for (size_t f = 1; f < args.size(); ++f) {
                const std::string text = read_file(args[f]);
                auto a = std::chrono::steady_clock::now();
                std::vector<int32_t> ids = no_special ? tok.encode(text, false, false) : tok.encode_with_defaults(text);
                auto b = std::chrono::steady_clock::now();
                if (timing)
                    std::fprintf(stderr, "encode %s: %zu bytes -> %zu ids in %.3f ms\n", args[f].c_str(), text.size(),
                                 ids.size(), std::chrono::duration<double, std::milli>(b - a).count());
                buf.clear();
                buf.reserve(ids.size() * 6);
                for (int32_t id : ids) {
                    buf += std::to_string(id);
                    buf += '\n';
                }
                if (args.size() > 2) buf += "---\n";
                std::fwrite(buf.data(), 1, buf.size(), stdout);
            }
            return 0;
        }
        if (mode == "decode" || mode == "pieces") {
            const bool pieces = mode == "pieces";
            auto render = [&](const std::vector<int32_t>& ids) {
                if (!pieces) return tok.decode(ids);
                std::string s;
                for (int32_t id : ids) s += tok.token_to_piece(id);
                return s;
            };
            if (args.size() == 2) {
                const std::string s = render(read_ids(args[1]));
                std::fwrite(s.data(), 1, s.size(), stdout);
                return 0;
            }
            if ((args.size() - 1) % 2) return usage();
            for (size_t f = 1; f < args.size(); f += 2) write_file(args[f + 1], render(read_ids(args[f])));
            return 0;
        }
        return usage();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
