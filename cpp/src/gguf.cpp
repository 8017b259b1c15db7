#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>

#include "common.h"

namespace wqe {

// ------------------------------------------------------------------ errors
static std::string vformat(const char* fmt, va_list ap) {
    char buf[1024];
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

void fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vformat(fmt, ap);
    va_end(ap);
    throw Error(code, msg);
}

void GGUFFile::format_error(const char* fmt, ...) const {
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vformat(fmt, ap);
    va_end(ap);
    throw Error(WQE_ERR_FORMAT, path_ + ": " + msg);
}

// ------------------------------------------------------------------ mapping
MappedFile::MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(WQE_ERR_IO, "%s: cannot open: %s", path.c_str(), std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        const int e = errno;
        ::close(fd);
        fail(WQE_ERR_IO, "%s: cannot stat: %s", path.c_str(), std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(WQE_ERR_IO, "%s: not a regular file", path.c_str());
    }
    size_ = (uint64_t)st.st_size;
    if (size_ == 0) {
        ::close(fd);
        fail(WQE_ERR_FORMAT, "%s: empty file (0 bytes), not a GGUF file", path.c_str());
    }
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int e = errno;
    ::close(fd);
    if (p == MAP_FAILED) fail(WQE_ERR_IO, "%s: cannot map %llu bytes: %s", path.c_str(), (unsigned long long)size_, std::strerror(e));
    data_ = (const uint8_t*)p;
    mapped_ = true;
}

MappedFile::~MappedFile() {
    if (mapped_) ::munmap((void*)data_, size_);
}

// ------------------------------------------------------------------ types
const char* ggml_type_name(uint32_t t) {
    switch (t) {
        case GGML_F32: return "F32";
        case GGML_F16: return "F16";
        case GGML_I8: return "I8";
        case GGML_I16: return "I16";
        case GGML_I32: return "I32";
        case GGML_I64: return "I64";
        case GGML_F64: return "F64";
        case GGML_BF16: return "BF16";
        default: return nullptr;
    }
}

static uint64_t ggml_type_size(uint32_t t) {
    switch (t) {
        case GGML_F32: case GGML_I32: return 4;
        case GGML_F16: case GGML_I16: case GGML_BF16: return 2;
        case GGML_I8: return 1;
        case GGML_I64: case GGML_F64: return 8;
        default: return 0;
    }
}

static uint64_t scalar_size(uint32_t t) {
    switch (t) {
        case GV_UINT8: case GV_INT8: case GV_BOOL: return 1;
        case GV_UINT16: case GV_INT16: return 2;
        case GV_UINT32: case GV_INT32: case GV_FLOAT32: return 4;
        case GV_UINT64: case GV_INT64: case GV_FLOAT64: return 8;
        default: return 0;
    }
}

static const char* value_type_name(uint32_t t) {
    static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
    return t < 13 ? names[t] : "unknown";
}

// ------------------------------------------------------------------ bounded cursor
namespace {
struct Cursor {
    const GGUFFile& f;
    const uint8_t* base;
    uint64_t size;
    uint64_t pos = 0;
    const char* what = "header";

    void need(uint64_t n) const {
        if (n > size - pos)
            f.format_error("truncated file: %s needs %llu bytes at offset %llu but the file has %llu",
                           what, (unsigned long long)n, (unsigned long long)pos, (unsigned long long)size);
    }
    const uint8_t* take(uint64_t n) {
        need(n);
        const uint8_t* p = base + pos;
        pos += n;
        return p;
    }
    uint32_t u32() { return load_u32(take(4)); }
    uint64_t u64() { return load_u64(take(8)); }
    GGUFString str() {
        const uint64_t n = u64();
        if (n > size - pos)
            f.format_error("%s: string length %llu at offset %llu runs past the end of the file (%llu bytes)",
                           what, (unsigned long long)n, (unsigned long long)(pos - 8), (unsigned long long)size);
        const char* p = (const char*)take(n);
        return GGUFString{p, n};
    }
};
}  // namespace

static void parse_value(Cursor& c, uint32_t type, GGUFValue& v, int depth, const std::string& key) {
    v.type = type;
    if (type == GV_STRING) {
        v.data = c.base + c.pos;
        v.strings.push_back(c.str());
        return;
    }
    if (type == GV_ARRAY) {
        if (depth > 2) c.f.format_error("key '%s': arrays nested too deeply", key.c_str());
        v.elem_type = c.u32();
        v.count = c.u64();
        v.data = c.base + c.pos;
        if (v.elem_type == GV_STRING) {
            // Each string needs at least its 8-byte length: bound the count before reserving.
            if (v.count > (c.size - c.pos) / 8)
                c.f.format_error("key '%s': string array of %llu elements cannot fit in the file", key.c_str(), (unsigned long long)v.count);
            v.strings.reserve(v.count);
            for (uint64_t i = 0; i < v.count; ++i) v.strings.push_back(c.str());
        } else if (v.elem_type == GV_ARRAY) {
            if (v.count > (c.size - c.pos) / 12)
                c.f.format_error("key '%s': nested array of %llu elements cannot fit in the file", key.c_str(), (unsigned long long)v.count);
            for (uint64_t i = 0; i < v.count; ++i) {
                GGUFValue inner;
                parse_value(c, GV_ARRAY, inner, depth + 1, key);
            }
        } else {
            const uint64_t es = scalar_size(v.elem_type);
            if (es == 0) c.f.format_error("key '%s': unknown array element type %u", key.c_str(), v.elem_type);
            if (v.count > (c.size - c.pos) / es)
                c.f.format_error("key '%s': array of %llu %s elements runs past the end of the file",
                                 key.c_str(), (unsigned long long)v.count, value_type_name(v.elem_type));
            c.take(v.count * es);
        }
        return;
    }
    const uint64_t s = scalar_size(type);
    if (s == 0) c.f.format_error("key '%s': unknown value type %u", key.c_str(), type);
    v.data = c.take(s);
}

GGUFFile::GGUFFile(const std::string& path) : path_(path), file_(path) {
    Cursor c{*this, file_.data(), file_.size()};
    if (file_.size() < 24) format_error("file too small to be GGUF (%llu bytes)", (unsigned long long)file_.size());
    const uint8_t* magic = c.take(4);
    if (std::memcmp(magic, "GGUF", 4) != 0)
        format_error("bad magic 0x%02x%02x%02x%02x: not a GGUF file (expected \"GGUF\")", magic[0], magic[1], magic[2], magic[3]);
    version_ = c.u32();
    if (version_ != 2 && version_ != 3) format_error("unsupported GGUF version %u (expected 3)", version_);
    const uint64_t n_tensors = c.u64();
    const uint64_t n_kv = c.u64();
    // Every KV pair takes at least 12 bytes and every tensor info at least 24: bound the counts.
    if (n_kv > file_.size() / 12) format_error("absurd key count %llu for a %llu-byte file", (unsigned long long)n_kv, (unsigned long long)file_.size());
    if (n_tensors > file_.size() / 24) format_error("absurd tensor count %llu for a %llu-byte file", (unsigned long long)n_tensors, (unsigned long long)file_.size());

    for (uint64_t i = 0; i < n_kv; ++i) {
        c.what = "a key";
        GGUFString k = c.str();
        std::string key = k.str();
        std::string what = "key '" + key + "'";
        c.what = what.c_str();
        const uint32_t type = c.u32();
        GGUFValue v;
        parse_value(c, type, v, 0, key);
        if (kv_.count(key)) format_error("duplicate key '%s'", key.c_str());
        kv_.emplace(std::move(key), std::move(v));
    }

    if (const GGUFValue* a = find("general.alignment")) {
        if (a->type != GV_UINT32) format_error("key 'general.alignment' has type %s, expected u32", value_type_name(a->type));
        alignment_ = load_u32(a->data);
        // GGUF requires a multiple of 8 (ggml: a power of two). Below 8, F32/F16 tensors could start at
        // addresses the kernels' typed loads may not use.
        if (alignment_ < 8 || (alignment_ & (alignment_ - 1)) || alignment_ > 65536)
            format_error("general.alignment = %llu is not allowed: GGUF requires a power of two that is a multiple "
                         "of 8 (8 to 65536; wqedge writes 32)", (unsigned long long)alignment_);
    }

    tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) {
        c.what = "a tensor info";
        GGUFTensor t;
        t.name = c.str().str();
        std::string what = "tensor '" + t.name + "'";
        c.what = what.c_str();
        t.n_dims = c.u32();
        if (t.n_dims < 1 || t.n_dims > 4) format_error("tensor '%s': %u dimensions (1 to 4 allowed)", t.name.c_str(), t.n_dims);
        uint64_t n_elems = 1;
        for (uint32_t d = 0; d < t.n_dims; ++d) {
            t.dims[d] = c.u64();
            if (t.dims[d] == 0 || t.dims[d] > (uint64_t)1 << 40)
                format_error("tensor '%s': absurd dimension %u = %llu", t.name.c_str(), d, (unsigned long long)t.dims[d]);
            if (n_elems > std::numeric_limits<uint64_t>::max() / t.dims[d])
                format_error("tensor '%s': element count overflows", t.name.c_str());
            n_elems *= t.dims[d];
        }
        t.type = c.u32();
        const uint64_t ts = ggml_type_size(t.type);
        if (ts == 0) {
            // llama.cpp's quantized types (Q4_0, Q4_K, IQ4_NL = 20, ...) are not ours: say what the file is.
            if (!find("wqedge.format_version"))
                format_error("this is a llama.cpp GGUF, not a wqedge file (no wqedge.format_version key; tensor '%s' "
                             "has ggml type %u, which wqedge does not use) — run it with llama.cpp",
                             t.name.c_str(), t.type);
            format_error("tensor '%s': unsupported ggml type %u", t.name.c_str(), t.type);
        }
        if (n_elems > file_.size() / ts)
            format_error("tensor '%s': %llu elements of %s cannot fit in a %llu-byte file", t.name.c_str(),
                         (unsigned long long)n_elems, ggml_type_name(t.type), (unsigned long long)file_.size());
        t.nbytes = n_elems * ts;
        t.offset = c.u64();
        if (tensor_index_.count(t.name)) format_error("duplicate tensor '%s'", t.name.c_str());
        tensor_index_[t.name] = tensors_.size();
        tensors_.push_back(std::move(t));
    }

    uint64_t data_start = c.pos;
    if (data_start % alignment_) data_start += alignment_ - data_start % alignment_;
    if (!tensors_.empty() && data_start > file_.size())
        format_error("truncated file: tensor data would start at %llu but the file has %llu bytes",
                     (unsigned long long)data_start, (unsigned long long)file_.size());
    const uint64_t data_size = data_start <= file_.size() ? file_.size() - data_start : 0;
    for (GGUFTensor& t : tensors_) {
        if (t.offset % alignment_)
            format_error("tensor '%s': offset %llu is not a multiple of the alignment %llu", t.name.c_str(),
                         (unsigned long long)t.offset, (unsigned long long)alignment_);
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            format_error("tensor '%s': data [%llu, %llu) lies past the end of the data section (%llu bytes; file truncated or offset corrupt)",
                         t.name.c_str(), (unsigned long long)t.offset, (unsigned long long)(t.offset + t.nbytes),
                         (unsigned long long)data_size);
        t.data = file_.data() + data_start + t.offset;
    }
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
}

const GGUFTensor* GGUFFile::tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

static bool is_int_type(uint32_t t) {
    return t == GV_UINT8 || t == GV_INT8 || t == GV_UINT16 || t == GV_INT16 || t == GV_UINT32 ||
           t == GV_INT32 || t == GV_UINT64 || t == GV_INT64;
}

static int64_t read_int(const uint8_t* p, uint32_t t, bool* overflow) {
    *overflow = false;
    switch (t) {
        case GV_UINT8: return p[0];
        case GV_INT8: return (int8_t)p[0];
        case GV_UINT16: return load_u16(p);
        case GV_INT16: return (int16_t)load_u16(p);
        case GV_UINT32: return load_u32(p);
        case GV_INT32: return (int32_t)load_u32(p);
        case GV_INT64: return (int64_t)load_u64(p);
        case GV_UINT64: {
            const uint64_t v = load_u64(p);
            if (v > (uint64_t)std::numeric_limits<int64_t>::max()) *overflow = true;
            return (int64_t)v;
        }
        default: return 0;
    }
}

int64_t GGUFFile::get_int(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) format_error("missing required key '%s'", key.c_str());
    if (!is_int_type(v->type)) format_error("key '%s' has type %s, expected an integer", key.c_str(), value_type_name(v->type));
    bool ovf;
    const int64_t r = read_int(v->data, v->type, &ovf);
    if (ovf) format_error("key '%s': value out of range", key.c_str());
    return r;
}

int64_t GGUFFile::get_int(const std::string& key, int64_t dflt) const { return has(key) ? get_int(key) : dflt; }

double GGUFFile::get_float(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) format_error("missing required key '%s'", key.c_str());
    if (v->type == GV_FLOAT32) { float f; std::memcpy(&f, v->data, 4); return f; }
    if (v->type == GV_FLOAT64) { double f; std::memcpy(&f, v->data, 8); return f; }
    if (is_int_type(v->type)) return (double)get_int(key);
    format_error("key '%s' has type %s, expected a number", key.c_str(), value_type_name(v->type));
}

double GGUFFile::get_float(const std::string& key, double dflt) const { return has(key) ? get_float(key) : dflt; }

bool GGUFFile::get_bool(const std::string& key, bool dflt) const {
    const GGUFValue* v = find(key);
    if (!v) return dflt;
    if (v->type == GV_BOOL) {
        if (v->data[0] > 1) format_error("key '%s': bool value %u is not 0 or 1", key.c_str(), v->data[0]);
        return v->data[0] != 0;
    }
    if (is_int_type(v->type)) return get_int(key) != 0;
    format_error("key '%s' has type %s, expected bool", key.c_str(), value_type_name(v->type));
}

std::string GGUFFile::get_string(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) format_error("missing required key '%s'", key.c_str());
    if (v->type != GV_STRING) format_error("key '%s' has type %s, expected string", key.c_str(), value_type_name(v->type));
    return v->strings[0].str();
}

std::string GGUFFile::get_string(const std::string& key, const std::string& dflt) const {
    return has(key) ? get_string(key) : dflt;
}

const GGUFValue& GGUFFile::get_array(const std::string& key, uint32_t elem_type) const {
    const GGUFValue* v = find(key);
    if (!v) format_error("missing required key '%s'", key.c_str());
    if (v->type != GV_ARRAY) format_error("key '%s' has type %s, expected an array", key.c_str(), value_type_name(v->type));
    if (v->elem_type != elem_type)
        format_error("key '%s' is an array of %s, expected %s", key.c_str(), value_type_name(v->elem_type), value_type_name(elem_type));
    return *v;
}

std::vector<int64_t> GGUFFile::get_int_array(const std::string& key, uint64_t max_count) const {
    const GGUFValue* v = find(key);
    if (!v) format_error("missing required key '%s'", key.c_str());
    if (v->type != GV_ARRAY || !is_int_type(v->elem_type))
        format_error("key '%s' has type %s, expected an array of integers", key.c_str(),
                     v->type == GV_ARRAY ? (std::string("array of ") + value_type_name(v->elem_type)).c_str() : value_type_name(v->type));
    // The count is bounded by the file size, but widening to int64 multiplies it by up to 8: check first.
    if (v->count > max_count)
        format_error("key '%s' has %llu elements, at most %llu expected", key.c_str(), (unsigned long long)v->count,
                     (unsigned long long)max_count);
    const uint64_t es = scalar_size(v->elem_type);
    std::vector<int64_t> out(v->count);
    for (uint64_t i = 0; i < v->count; ++i) {
        bool ovf;
        out[i] = read_int(v->data + i * es, v->elem_type, &ovf);
        if (ovf) format_error("key '%s': element %llu out of range", key.c_str(), (unsigned long long)i);
    }
    return out;
}

std::vector<int64_t> GGUFFile::get_int_per_layer(const std::string& key, int n_layer) const {
    const GGUFValue* v = find(key);
    if (v && v->type == GV_ARRAY) {
        std::vector<int64_t> out = get_int_array(key, (uint64_t)n_layer);
        if ((int64_t)out.size() != n_layer)
            format_error("key '%s' lists %zu values, one per layer of %d expected", key.c_str(), out.size(), n_layer);
        return out;
    }
    return std::vector<int64_t>(n_layer, get_int(key));
}

}  // namespace wqe
