// libwqedge_ort: the ONNX Runtime custom-operator library of the native ONNX variant (docs/onnx.md).
//
// One operator, wqedge.ChunkLinear (domain "wqedge", version 1): Y[..., N] = X[..., K] W^T, with W a
// column-chunked linear exactly as stored in our GGUF (docs/format.md). It runs the runtime's own
// kernels (wqe::matmul / matvec over the row-blocks, no unpacking), so the weights stay packed in
// memory: the node's only weight is the GGUF tensor's bytes as a uint8 initializer [N, row_bytes].
//
//   inputs:  X float [..., K];  W uint8 [N, row_bytes]
//   output:  Y float [..., N]
//   attributes (ints): N, K, group_size, chunk_actions (block type ids, one per chunk of group_size
//            columns), chunk_protected (protected columns per chunk; default none), protected_columns
//            (global column indices, chunk by chunk, ascending within a chunk; default none)
//
// The layout is built and validated once per kernel (wqe::chunked_layout, the model loader's code);
// W's data pointer is taken at each Compute, so no copy of the weights is made. Malformed attributes
// or inputs give an ORT status naming the node, never a crash.
//
// Threads: one wqe::ThreadPool (and its scratch) per thread count, shared by every node and session
// of the process and run by one node at a time; the count is the session config entry
// "wqedge.num_threads" read when the library is registered (0 / absent: the CPUs this process may use).
//
// Only the C API is used (vendored header, cpp/third_party/onnxruntime); the library does not link
// against onnxruntime: the OrtApi table comes from the OrtApiBase passed to RegisterCustomOps.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "common.h"
#include "linear.h"
#include "threadpool.h"

#if defined(_WIN32)
#  define WQE_ORT_EXPORT __declspec(dllexport)
#else
#  include <dlfcn.h>
#  define WQE_ORT_EXPORT __attribute__((visibility("default")))
#endif

extern "C" WQE_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base);

namespace {

// The oldest OrtApi / OrtCustomOp version with everything used here (CreateKernelV2 / KernelComputeV2
// are 1.16; KernelInfo_GetNodeName and KernelInfoGetConstantInput_tensor 1.15), so the library also
// loads into older onnxruntime releases than the header's.
constexpr uint32_t kApiVersion = 16;
constexpr const char* kDomain = "wqedge";
constexpr const char* kOpName = "ChunkLinear";
constexpr const char* kThreadsKey = "wqedge.num_threads";

// A thread pool and its scratch, for one thread count. Never freed: sessions may outlive any owner we
// could give it, and joining threads during process exit gains nothing.
struct Engine {
    std::mutex mu;  // one node at a time (the scratch is shared)
    wqe::ThreadPool pool;
    wqe::MatScratch scratch;
    int max_K = 0, max_g_pad = 0, max_x_floats = 0, max_chunks = 0;

    explicit Engine(int n) : pool(n) {}
    void fit(const wqe::Linear& L) {  // grow the scratch to cover L (call with mu held)
        if (L.K <= max_K && L.max_g_pad <= max_g_pad && L.x_floats <= max_x_floats && (int)L.chunks.size() <= max_chunks)
            return;
        max_K = std::max(max_K, L.K);
        max_g_pad = std::max(max_g_pad, L.max_g_pad);
        max_x_floats = std::max(max_x_floats, L.x_floats);
        max_chunks = std::max(max_chunks, (int)L.chunks.size());
        scratch.reserve(pool.size(), max_K, max_g_pad, max_x_floats, max_chunks);
    }
};

Engine* engine(int n_threads) {
    static std::mutex mu;
    static std::map<int, Engine*>* engines = new std::map<int, Engine*>();
    std::lock_guard<std::mutex> lock(mu);
    Engine*& e = (*engines)[n_threads];
    if (!e) e = new Engine(n_threads);
    return e;
}

struct OpDef : OrtCustomOp {
    int n_threads = 0;
};

struct Kernel {
    const OrtApi* api;
    std::string node;
    wqe::Linear L;  // layout; L.data is set under the engine's lock at each Compute
    Engine* eng;
    int kernels;
};

// Errors inside the op: thrown as OpError and turned into an OrtStatus at the C boundary.
struct OpError {
    OrtErrorCode code;
    std::string msg;
};

[[noreturn]] void op_fail(const std::string& node, const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
    throw OpError{code, "wqedge.ChunkLinear node '" + node + "': " + msg};
}

void check(const OrtApi* api, OrtStatus* st, const std::string& node, const char* what) {
    if (!st) return;
    std::string msg = std::string(what) + ": " + api->GetErrorMessage(st);
    const OrtErrorCode code = api->GetErrorCode(st);
    api->ReleaseStatus(st);
    op_fail(node, msg, code);
}

template <class F>
OrtStatus* guarded(const OrtApi* api, F&& f) {
    try {
        f();
        return nullptr;
    } catch (const OpError& e) {
        return api->CreateStatus(e.code, e.msg.c_str());
    } catch (const std::bad_alloc&) {
        return api->CreateStatus(ORT_FAIL, "wqedge.ChunkLinear: out of memory");
    } catch (const std::exception& e) {
        return api->CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    } catch (...) {
        return api->CreateStatus(ORT_RUNTIME_EXCEPTION, "wqedge.ChunkLinear: unknown error");
    }
}

std::string node_name(const OrtApi* api, const OrtKernelInfo* info) {
    size_t n = 0;
    if (OrtStatus* st = api->KernelInfo_GetNodeName(info, nullptr, &n)) {
        api->ReleaseStatus(st);
        return "?";
    }
    std::string s(n, '\0');
    if (OrtStatus* st = api->KernelInfo_GetNodeName(info, &s[0], &n)) {
        api->ReleaseStatus(st);
        return "?";
    }
    s.resize(n ? n - 1 : 0);  // n counts the terminating NUL
    return s;
}

int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const std::string& node, const char* name) {
    int64_t v = 0;
    check(api, api->KernelInfoGetAttribute_int64(info, name, &v), node, (std::string("attribute '") + name + "'").c_str());
    return v;
}

// An ints attribute; absent -> `absent` (or an error when required).
std::vector<int64_t> attr_ints(const OrtApi* api, const OrtKernelInfo* info, const std::string& node, const char* name,
                               bool required) {
    size_t n = 0;
    OrtStatus* st = api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
    if (st && !required) {
        api->ReleaseStatus(st);
        return {};
    }
    check(api, st, node, (std::string("attribute '") + name + "'").c_str());
    std::vector<int64_t> v(n);
    if (n) check(api, api->KernelInfoGetAttributeArray_int64(info, name, v.data(), &n), node, name);
    return v;
}

int dim_attr(const OrtApi* api, const OrtKernelInfo* info, const std::string& node, const char* name) {
    const int64_t v = attr_int(api, info, node, name);
    if (v <= 0 || v > INT_MAX) op_fail(node, std::string("attribute '") + name + "' = " + std::to_string(v) + " is out of range");
    return (int)v;
}

std::vector<int64_t> shape_of(const OrtApi* api, const OrtValue* v, const std::string& node, const char* what,
                              ONNXTensorElementDataType want) {
    OrtTensorTypeAndShapeInfo* ti = nullptr;
    check(api, api->GetTensorTypeAndShape(v, &ti), node, what);
    size_t nd = 0;
    ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    OrtStatus* st = api->GetDimensionsCount(ti, &nd);
    if (!st) st = api->GetTensorElementType(ti, &t);
    std::vector<int64_t> dims(nd);
    if (!st && nd) st = api->GetDimensions(ti, dims.data(), nd);
    api->ReleaseTensorTypeAndShapeInfo(ti);
    check(api, st, node, what);
    if (t != want) op_fail(node, std::string(what) + " has element type " + std::to_string((int)t) + ", expected " +
                                     std::to_string((int)want));
    return dims;
}

void check_weights(const Kernel& k, const std::vector<int64_t>& w) {
    if (w.size() == 2 && w[0] == k.L.N && w[1] == (int64_t)k.L.row_bytes) return;
    std::string dims;
    for (size_t i = 0; i < w.size(); ++i) dims += (i ? ", " : "") + std::to_string(w[i]);
    op_fail(k.node, "input W has shape [" + dims + "], but N = " + std::to_string(k.L.N) + " rows of " +
                        std::to_string(k.L.row_bytes) + " bytes (the chunk actions' row-blocks) were expected");
}

// ONNX Runtime unloads a custom-op library once the last session options and sessions that registered
// it are gone, but our thread pools (and op definitions) live for the process: unloading the code under
// the pool's sleeping threads would crash them. So the first registration pins the library
// (RTLD_NODELETE: later dlclose calls leave it mapped).
void pin_library() {
#if !defined(_WIN32)
    static std::once_flag once;
    std::call_once(once, [] {
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&RegisterCustomOps), &info) && info.dli_fname)
            dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
    });
#endif
}

// ------------------------------------------------------------------ OrtCustomOp callbacks
OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
    *out = nullptr;
    return guarded(api, [&] {
        auto k = std::make_unique<Kernel>();
        k->api = api;
        k->node = node_name(api, info);
        const int N = dim_attr(api, info, k->node, "N"), K = dim_attr(api, info, k->node, "K");
        const int G = dim_attr(api, info, k->node, "group_size");
        const std::vector<int64_t> actions = attr_ints(api, info, k->node, "chunk_actions", true);
        std::vector<int64_t> prot = attr_ints(api, info, k->node, "chunk_protected", false);
        if (prot.empty()) prot.assign(actions.size(), 0);
        const std::vector<int64_t> cols = attr_ints(api, info, k->node, "protected_columns", false);
        try {
            k->L = wqe::chunked_layout(k->node, N, K, G, actions, prot);
            wqe::set_protected_columns(k->L, cols);
        } catch (const wqe::Error& e) {  // the message names the node as the tensor
            throw OpError{ORT_INVALID_ARGUMENT, std::string("wqedge.ChunkLinear: ") + e.what()};
        }
        size_t n_in = 0;
        check(api, api->KernelInfo_GetInputCount(info, &n_in), k->node, "input count");
        if (n_in != 2) op_fail(k->node, "expects 2 inputs (X, W), got " + std::to_string(n_in));
        int is_const = 0;
        const OrtValue* w = nullptr;  // the weights, when an initializer: checked now rather than at the first run
        if (OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, 1, &is_const, &w)) api->ReleaseStatus(st);
        else if (is_const && w) check_weights(*k, shape_of(api, w, k->node, "input W", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8));
        const int n_threads = static_cast<const OpDef*>(op)->n_threads;
        k->eng = engine(n_threads > 0 ? n_threads : wqe::default_thread_count());
        k->kernels = wqe::active_kernels();
        *out = k.release();
    });
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
    Kernel& k = *static_cast<Kernel*>(kernel);
    const OrtApi* api = k.api;
    return guarded(api, [&] {
        const OrtValue *x = nullptr, *w = nullptr;
        check(api, api->KernelContext_GetInput(ctx, 0, &x), k.node, "input X");
        check(api, api->KernelContext_GetInput(ctx, 1, &w), k.node, "input W");
        if (!x || !w) op_fail(k.node, "missing input");
        std::vector<int64_t> dims = shape_of(api, x, k.node, "input X", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        check_weights(k, shape_of(api, w, k.node, "input W", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8));
        if (dims.empty() || dims.back() != k.L.K)
            op_fail(k.node, "input X's last dimension is " + (dims.empty() ? std::string("missing") : std::to_string(dims.back())) +
                                ", expected K = " + std::to_string(k.L.K));
        int64_t rows = 1;
        for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
        if (rows > INT_MAX) op_fail(k.node, "too many rows (" + std::to_string(rows) + ")");
        dims.back() = k.L.N;
        OrtValue* y = nullptr;
        check(api, api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y), k.node, "output Y");
        if (rows == 0) return;
        void *xp = nullptr, *wp = nullptr, *yp = nullptr;
        check(api, api->GetTensorMutableData(const_cast<OrtValue*>(x), &xp), k.node, "input X");
        check(api, api->GetTensorMutableData(const_cast<OrtValue*>(w), &wp), k.node, "input W");
        check(api, api->GetTensorMutableData(y, &yp), k.node, "output Y");
        std::lock_guard<std::mutex> lock(k.eng->mu);
        k.eng->fit(k.L);
        k.L.data = static_cast<const uint8_t*>(wp);
        wqe::matmul(k.L, static_cast<const float*>(xp), (int)rows, static_cast<float*>(yp), k.eng->pool, k.eng->scratch,
                    k.kernels);
    });
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 2; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL mem_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL homogeneous(const OrtCustomOp*) { return 1; }

OpDef* new_op(int n_threads) {
    OpDef* op = new OpDef();  // zero-initialised: callbacks of later versions stay null
    op->version = kApiVersion;
    op->n_threads = n_threads;
    op->GetName = op_name;
    op->GetExecutionProviderType = op_provider;
    op->GetInputType = input_type;
    op->GetInputTypeCount = input_count;
    op->GetOutputType = output_type;
    op->GetOutputTypeCount = output_count;
    op->KernelDestroy = destroy_kernel;
    op->GetInputCharacteristic = required;
    op->GetOutputCharacteristic = required;
    op->GetInputMemoryType = mem_type;
    op->GetVariadicInputMinArity = min_arity;
    op->GetVariadicInputHomogeneity = homogeneous;
    op->GetVariadicOutputMinArity = min_arity;
    op->GetVariadicOutputHomogeneity = homogeneous;
    op->CreateKernelV2 = create_kernel;
    op->KernelComputeV2 = compute;
    return op;
}

}  // namespace

// Called by ONNX Runtime (SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary_V2):
// adds the "wqedge" domain to `options`. The op definition and the domain must outlive every session
// made from these options; they are small and kept for the life of the process (as is the library).
extern "C" WQE_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    pin_library();
    const OrtApi* api = base->GetApi(kApiVersion);
    if (!api) {  // an onnxruntime older than 1.16: report through its version-1 table
        const OrtApi* v1 = base->GetApi(1);
        std::string msg = std::string("libwqedge_ort needs onnxruntime >= 1.16 (API ") + std::to_string(kApiVersion) +
                          "); this is onnxruntime " + base->GetVersionString();
        return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
    }
    int n_threads = 0;
    int has = 0;
    if (OrtStatus* st = api->HasSessionConfigEntry(options, kThreadsKey, &has)) return st;
    if (has) {
        char buf[32] = {0};
        size_t n = sizeof buf;
        if (OrtStatus* st = api->GetSessionConfigEntry(options, kThreadsKey, buf, &n)) return st;
        char* end = nullptr;
        const long v = std::strtol(buf, &end, 10);
        if (end == buf || *end != '\0' || v < 0 || v > 1024)
            return api->CreateStatus(ORT_INVALID_ARGUMENT,
                                     (std::string("session config '") + kThreadsKey + "' = '" + buf +
                                      "': expected a thread count 0..1024 (0 = all CPUs)").c_str());
        n_threads = (int)v;
    }
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
    OpDef* op = new_op(n_threads);
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
    if (OrtStatus* st = api->AddCustomOpDomain(options, domain)) return st;
    return nullptr;
}
