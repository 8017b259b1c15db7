// The GGUF reader on a small file built here: the file parses; every truncation, a wrong magic,
// absurd counts and dimensions, misaligned or out-of-range offsets and unknown types are each a
// wqe::Error with WQE_ERR_FORMAT (never a crash). Model-level checks are in tests/test_cpp_malformed.py.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

#include "common.h"
#include "gguf.h"

using namespace wqe;

static int n_pass = 0, n_fail = 0;
static void check(bool ok, const std::string& what) {
    if (ok) ++n_pass;
    else { ++n_fail; std::printf("FAIL %s\n", what.c_str()); }
}

struct Buf {
    std::vector<uint8_t> b;
    void raw(const void* p, size_t n) { b.insert(b.end(), (const uint8_t*)p, (const uint8_t*)p + n); }
    void u32(uint32_t v) { raw(&v, 4); }
    void u64(uint64_t v) { raw(&v, 8); }
    void str(const std::string& s) { u64(s.size()); raw(s.data(), s.size()); }
};

struct Offsets { size_t n_kv, alignment, tensor_dims, tensor_type, tensor_offset, data; };

static std::vector<uint8_t> make_file(Offsets* o) {
    Buf f;
    f.raw("GGUF", 4);
    f.u32(3);
    f.u64(2);   // tensors
    o->n_kv = f.b.size();
    f.u64(3);   // kv
    f.str("general.architecture"); f.u32(8); f.str("llama");
    f.str("general.alignment"); f.u32(4);
    o->alignment = f.b.size();
    f.u32(32);
    f.str("some.array"); f.u32(9); f.u32(4); f.u64(3); f.u32(1); f.u32(2); f.u32(3);
    f.str("a.weight"); f.u32(2);
    o->tensor_dims = f.b.size();
    f.u64(4); f.u64(2);
    o->tensor_type = f.b.size();
    f.u32(0);  // F32
    o->tensor_offset = f.b.size();
    f.u64(0);
    f.str("b.weight"); f.u32(1); f.u64(16); f.u32(24); f.u64(32);  // I8 at 32
    while (f.b.size() % 32) f.b.push_back(0);
    o->data = f.b.size();
    for (int i = 0; i < 48; ++i) f.b.push_back((uint8_t)i);
    return f.b;
}

static std::string tmp_path() {
    static int n = 0;
    return "/tmp/wqedge_test_gguf_" + std::to_string(getpid()) + "_" + std::to_string(n++) + ".gguf";
}

// Returns "" when parsed, else the error (code must be FORMAT).
static std::string parse(const std::vector<uint8_t>& bytes, int* code) {
    const std::string p = tmp_path();
    FILE* fp = std::fopen(p.c_str(), "wb");
    if (!bytes.empty()) std::fwrite(bytes.data(), 1, bytes.size(), fp);
    std::fclose(fp);
    std::string err;
    *code = 0;
    try {
        GGUFFile f(p);
        (void)f;
    } catch (const Error& e) {
        err = e.what();
        *code = e.code;
    }
    std::remove(p.c_str());
    return err;
}

static void expect_error(std::vector<uint8_t> bytes, const std::string& what, const std::string& needle) {
    int code;
    const std::string err = parse(bytes, &code);
    check(!err.empty() && code == WQE_ERR_FORMAT && err.find(needle) != std::string::npos,
          what + " -> '" + err + "' (wanted '" + needle + "')");
}

template <class T>
static void put(std::vector<uint8_t>& b, size_t at, T v) { std::memcpy(&b[at], &v, sizeof v); }

int main() {
    Offsets o;
    const std::vector<uint8_t> good = make_file(&o);
    {
        int code;
        const std::string err = parse(good, &code);
        check(err.empty(), "valid file parses: " + err);
        const std::string p = tmp_path();
        FILE* fp = std::fopen(p.c_str(), "wb");
        std::fwrite(good.data(), 1, good.size(), fp);
        std::fclose(fp);
        GGUFFile f(p);
        check(f.tensor("b.weight") && f.tensor("b.weight")->data[0] == 32, "tensor data located");
        check(f.get_int_array("some.array", 3).size() == 3, "array read");
        bool refused = false;
        try {
            f.get_int_array("some.array", 2);
        } catch (const Error& e) {
            refused = e.code == WQE_ERR_FORMAT && std::string(e.what()).find("at most 2") != std::string::npos;
        }
        check(refused, "array longer than its bound refused");
        check(f.get_string("general.architecture") == "llama", "string read");
        std::remove(p.c_str());
    }
    // Every truncation of the file is an error (the last tensor ends at the file's end).
    int trunc_ok = 0;
    for (size_t n = 0; n < good.size(); ++n) {
        int code;
        const std::string err = parse(std::vector<uint8_t>(good.begin(), good.begin() + n), &code);
        if (!err.empty() && code == WQE_ERR_FORMAT) ++trunc_ok;
        else std::printf("truncation to %zu bytes: code %d '%s'\n", n, code, err.c_str());
    }
    check(trunc_ok == (int)good.size(), "every truncation rejected");

    std::vector<uint8_t> b;
    b = good; b[0] = 'X'; expect_error(b, "wrong magic", "bad magic");
    b = good; put<uint32_t>(b, 4, 99); expect_error(b, "bad version", "unsupported GGUF version");
    b = good; put<uint64_t>(b, o.n_kv, (uint64_t)1 << 60); expect_error(b, "absurd kv count", "absurd key count");
    b = good; put<uint64_t>(b, 8, (uint64_t)1 << 50); expect_error(b, "absurd tensor count", "absurd tensor count");
    b = good; put<uint64_t>(b, o.tensor_dims, (uint64_t)1 << 62); expect_error(b, "absurd dimension", "absurd dimension");
    b = good; put<uint64_t>(b, o.tensor_dims, (uint64_t)1 << 39); put<uint64_t>(b, o.tensor_dims + 8, (uint64_t)1 << 39);
    expect_error(b, "dimension product", "overflows");
    b = good; put<uint64_t>(b, o.tensor_dims, 0); expect_error(b, "zero dimension", "absurd dimension");
    b = good; put<uint64_t>(b, o.tensor_dims, 1000); expect_error(b, "tensor larger than file", "cannot fit");
    b = good; put<uint64_t>(b, o.tensor_dims, 20); expect_error(b, "tensor overlaps the end", "past the end");
    b = good; put<uint32_t>(b, o.tensor_type, 77); expect_error(b, "unknown ggml type", "ggml type 77");
    // no wqedge.format_version key here: an unknown (llama.cpp) type means a llama.cpp file
    b = good; put<uint32_t>(b, o.tensor_type, 20); expect_error(b, "llama.cpp type", "not a wqedge file");
    // GGUF alignments are powers of two and multiples of 8 (below 8, typed loads could be misaligned)
    for (uint32_t a : {0u, 1u, 2u, 4u, 12u, 48u, 1u << 20}) {
        b = good; put<uint32_t>(b, o.alignment, a); expect_error(b, "alignment " + std::to_string(a), "multiple of 8");
    }
    b = good; put<uint64_t>(b, o.tensor_offset, 4096); expect_error(b, "offset past end", "past the end");
    b = good; put<uint64_t>(b, o.tensor_offset, ~(uint64_t)0 - 31); expect_error(b, "offset overflow", "past the end");
    b = good; put<uint64_t>(b, o.tensor_offset, 3); expect_error(b, "misaligned offset", "alignment");
    b = good; put<uint64_t>(b, 24, (uint64_t)1 << 40); expect_error(b, "absurd key length", "string length");
    expect_error({}, "empty file", "empty file");
    std::printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
