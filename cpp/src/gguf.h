// A validating GGUF reader over a memory-mapped file. Parsing checks every length, count, type,
// shape, offset and size against the file before anything is used; any problem throws
// wqe::Error(WQE_ERR_FORMAT, "<file>: <what is wrong>").
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace wqe {

enum GGUFValueType : uint32_t {
    GV_UINT8 = 0, GV_INT8 = 1, GV_UINT16 = 2, GV_INT16 = 3, GV_UINT32 = 4, GV_INT32 = 5,
    GV_FLOAT32 = 6, GV_BOOL = 7, GV_STRING = 8, GV_ARRAY = 9, GV_UINT64 = 10, GV_INT64 = 11,
    GV_FLOAT64 = 12,
};

enum GGMLType : uint32_t {
    GGML_F32 = 0, GGML_F16 = 1, GGML_I8 = 24, GGML_I16 = 25, GGML_I32 = 26, GGML_I64 = 27,
    GGML_F64 = 28, GGML_BF16 = 30,
};
const char* ggml_type_name(uint32_t t);  // nullptr when the type is not one we can size

struct GGUFString {
    const char* data;
    uint64_t size;
    std::string str() const { return std::string(data, size); }
};

struct GGUFValue {
    uint32_t type = 0;        // GGUFValueType
    const uint8_t* data = nullptr;  // scalar: the value; array: the first element
    uint32_t elem_type = 0;   // arrays
    uint64_t count = 0;       // arrays: element count
    std::vector<GGUFString> strings;  // string arrays: each element (and a plain string: one)
};

struct GGUFTensor {
    std::string name;
    uint32_t n_dims = 0;
    uint64_t dims[4] = {1, 1, 1, 1};  // ggml order: dims[0] is the contiguous row length
    uint32_t type = 0;
    uint64_t offset = 0;  // relative to the data section
    uint64_t nbytes = 0;
    const uint8_t* data = nullptr;
};

class MappedFile {
public:
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }

private:
    const uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
    bool mapped_ = false;
};

class GGUFFile {
public:
    explicit GGUFFile(const std::string& path);  // throws wqe::Error

    const std::string& path() const { return path_; }
    uint64_t file_size() const { return file_.size(); }
    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }

    const GGUFValue* find(const std::string& key) const;
    const GGUFTensor* tensor(const std::string& name) const;
    const std::vector<GGUFTensor>& tensors() const { return tensors_; }

    // Typed getters: throw a format error naming the key when it is missing (required) or of the
    // wrong type; integers are range-checked into the requested type.
    bool has(const std::string& key) const { return find(key) != nullptr; }
    int64_t get_int(const std::string& key) const;
    int64_t get_int(const std::string& key, int64_t dflt) const;
    double get_float(const std::string& key) const;
    double get_float(const std::string& key, double dflt) const;
    bool get_bool(const std::string& key, bool dflt) const;
    std::string get_string(const std::string& key) const;
    std::string get_string(const std::string& key, const std::string& dflt) const;
    // Integer array elements (any integer element type) widened to int64; more than max_count elements
    // is a format error (raised before anything is allocated).
    std::vector<int64_t> get_int_array(const std::string& key, uint64_t max_count) const;
    const GGUFValue& get_array(const std::string& key, uint32_t elem_type) const;  // exact element type
    // One integer per layer: a scalar (every layer the same) or an array of exactly n_layer integers, as
    // llama.cpp reads feed_forward_length / head_count / head_count_kv (per-layer arrays: pruned models).
    std::vector<int64_t> get_int_per_layer(const std::string& key, int n_layer) const;

    [[noreturn]] void format_error(const char* fmt, ...) const
#if defined(__GNUC__)
        __attribute__((format(printf, 2, 3)))
#endif
        ;

private:
    std::string path_;
    MappedFile file_;
    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    std::map<std::string, GGUFValue> kv_;
    std::vector<GGUFTensor> tensors_;
    std::map<std::string, size_t> tensor_index_;
};

}  // namespace wqe
