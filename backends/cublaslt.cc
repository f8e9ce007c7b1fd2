// smelt's cuBLASLt GEMM, linked into CUDA artifacts that dispatch matmuls to cuBLASLt.
//
// TVM 0.27's pip wheel is built without cuBLAS (USE_CUBLAS=OFF): relax.ext.cublas and
// tvm.contrib.cublas do not exist. This file is the one routine smelt needs from it, exported
// through TVM-FFI's C ABI so that the Relax VM finds it in the artifact's own library:
//
//   smelt_cublaslt_matmul(a, b, trans_b, epilogue, alpha, d, workspace)
//   smelt_cublaslt_matmul_bias(a, b, bias, trans_b, epilogue, alpha, d, workspace)
//   smelt_cublaslt_matmul_residual(a, b, residual, trans_b, epilogue, alpha, d, workspace)
//   smelt_cublaslt_matmul_bias_residual(a, b, bias, residual, trans_b, epilogue, alpha, d, workspace)
//
//   a: [..., K] row-major (M = numel / K), b: [K, N] (trans_b = 0) or [N, K] (trans_b = 1),
//   bias: [N], residual and d: M * N elements (any shape), workspace: bytes cuBLASLt may use.
//   epilogue: 0 none, 1 relu. d = epilogue(alpha * (a @ b) + bias + residual), accumulated in
//   float32. The outputs come last, as Relax's call_dps_packed passes them.
//   a and b are float16, bfloat16 or float32 of one dtype, or both float8_e4m3fn (FP8, sm_89 and
//   newer; b then must be [N, K] and K a multiple of 16, as cuBLASLt's FP8 kernels require): alpha
//   carries the two operands' scales, and d is 16-bit or float32.
//
// libcublasLt is opened at the first call (dlopen), not linked: artifacts load on machines
// without it and say what is missing only when a GEMM runs. The handful of declarations below
// are cuBLASLt's public C API (cublasLt.h, CUDA 12 and 13 share them), written out so that
// the file builds with a plain C++ compiler and no CUDA toolkit.
//
// The call runs on TVM's current stream for the device (TVMFFIEnvGetStream), so CUDA graphs that
// TVM captures on their own stream capture it too. Algorithms are chosen once per problem, the
// fastest of cuBLASLt's heuristic's best few on the first call (cuda_timer.h), and cached; the
// VM's warm-up run fills the cache before a capture.

#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_timer.h"

namespace {

// ---- cuBLASLt's C API (cublasLt.h, library_types.h) -------------------------------------------
using Status = int;
using Handle = void*;
using Desc = void*;
using Layout = void*;
using Pref = void*;
struct Algo {
  uint64_t data[8];
};
struct Heuristic {
  Algo algo;
  size_t workspace_size;
  Status state;
  float waves_count;
  int reserved[4];
};
constexpr int kCUDA_R_32F = 0, kCUDA_R_16F = 2, kCUDA_R_16BF = 14, kCUDA_R_8F_E4M3 = 28;
constexpr int kCOMPUTE_32F = 68;
constexpr int kDESC_TRANSA = 3, kDESC_TRANSB = 4, kDESC_EPILOGUE = 7, kDESC_BIAS_POINTER = 8, kDESC_FAST_ACCUM = 25;
constexpr int kOP_N = 0, kOP_T = 1;
constexpr int kEPILOGUE_DEFAULT = 1, kEPILOGUE_RELU = 2, kEPILOGUE_BIAS = 4;
constexpr int kPREF_MAX_WORKSPACE_BYTES = 1, kPREF_MIN_ALIGNMENT_A = 5;  // then B, C, D: 6, 7, 8
constexpr int kCandidates = 8;  // the heuristic's best, timed on the first call (cuda_timer.h)

struct Api {
  Status (*create)(Handle*);
  const char* (*status_string)(Status);
  Status (*desc_create)(Desc*, int, int);
  Status (*desc_set)(Desc, int, const void*, size_t);
  Status (*desc_destroy)(Desc);
  Status (*layout_create)(Layout*, int, uint64_t, uint64_t, int64_t);
  Status (*layout_destroy)(Layout);
  Status (*pref_create)(Pref*);
  Status (*pref_set)(Pref, int, const void*, size_t);
  Status (*pref_destroy)(Pref);
  Status (*heuristic)(Handle, Desc, Layout, Layout, Layout, Layout, Pref, int, Heuristic*, int*);
  Status (*matmul)(Handle, Desc, const void*, const void*, Layout, const void*, Layout, const void*,
                   const void*, Layout, void*, Layout, const Algo*, void*, size_t, void*);
  Handle handle = nullptr;
};

template <typename F>
void Bind(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (*fn == nullptr) {
    TVM_FFI_THROW(RuntimeError) << "smelt cuBLASLt GEMM: libcublasLt has no " << name
                                << " (a cuBLASLt older than CUDA 11?)";
  }
}

std::mutex mu;

const Api& GetApi() {
  static Api api;
  static bool ready = false;
  if (ready) return api;
  // smelt's loader (backends/cublaslt.py) loads the library first when it is not on the loader
  // path (pip's nvidia-cublas); dlopen by soname then finds that one.
  const char* names[] = {"libcublasLt.so.13", "libcublasLt.so.12"};
  void* lib = nullptr;
  for (const char* name : names) {
    if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
  }
  if (lib == nullptr) {
    TVM_FFI_THROW(RuntimeError)
        << "this artifact runs its matmuls with cuBLASLt, and libcublasLt.so.13 or .so.12 was not "
           "found: pip install nvidia-cublas (or add the CUDA toolkit's lib64 to LD_LIBRARY_PATH), "
           "or recompile with --libs none";
  }
  Bind(lib, "cublasLtCreate", &api.create);
  Bind(lib, "cublasLtGetStatusString", &api.status_string);
  Bind(lib, "cublasLtMatmulDescCreate", &api.desc_create);
  Bind(lib, "cublasLtMatmulDescSetAttribute", &api.desc_set);
  Bind(lib, "cublasLtMatmulDescDestroy", &api.desc_destroy);
  Bind(lib, "cublasLtMatrixLayoutCreate", &api.layout_create);
  Bind(lib, "cublasLtMatrixLayoutDestroy", &api.layout_destroy);
  Bind(lib, "cublasLtMatmulPreferenceCreate", &api.pref_create);
  Bind(lib, "cublasLtMatmulPreferenceSetAttribute", &api.pref_set);
  Bind(lib, "cublasLtMatmulPreferenceDestroy", &api.pref_destroy);
  Bind(lib, "cublasLtMatmulAlgoGetHeuristic", &api.heuristic);
  Bind(lib, "cublasLtMatmul", &api.matmul);
  Status s = api.create(&api.handle);
  if (s != 0) TVM_FFI_THROW(RuntimeError) << "cublasLtCreate failed: " << api.status_string(s);
  ready = true;
  return api;
}

void Check(const Api& api, Status s, const char* what) {
  if (s != 0) TVM_FFI_THROW(RuntimeError) << "smelt cuBLASLt GEMM: " << what << " failed: " << api.status_string(s);
}

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

int CudaType(const TensorView& t, const char* name) {
  DLDataType d = t.dtype();
  if (d.lanes == 1 && d.code == kDLFloat && d.bits == 16) return kCUDA_R_16F;
  if (d.lanes == 1 && d.code == kDLBfloat && d.bits == 16) return kCUDA_R_16BF;
  if (d.lanes == 1 && d.code == kDLFloat && d.bits == 32) return kCUDA_R_32F;
  if (d.lanes == 1 && d.code == kDLFloat8_e4m3fn && d.bits == 8) return kCUDA_R_8F_E4M3;
  TVM_FFI_THROW(TypeError) << "smelt cuBLASLt GEMM: " << name << " has dtype code " << int(d.code) << " bits "
                           << int(d.bits) << "; expected float16, bfloat16, float32 or float8_e4m3fn";
  return -1;
}

// Tensors the Relax VM passes are dense (it allocates them), so only the device is checked.
void* Data(const TensorView& t, const char* name) {
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "smelt cuBLASLt GEMM: " << name << " is not on a CUDA device";
  }
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// One cuBLASLt problem: everything the algorithm choice depends on.
using Key = std::tuple<int64_t, int64_t, int64_t, int, int, int, int, int, int, size_t, uint32_t>;

// The largest power of two up to 256 that divides every address: cuBLASLt's heuristic assumes
// 256-byte aligned operands unless told otherwise, and a view into a planned buffer may not be.
uint32_t Alignment(std::initializer_list<const void*> ptrs) {
  uint32_t align = 256;
  for (const void* p : ptrs) {
    while (align > 1 && reinterpret_cast<uintptr_t>(p) % align) align /= 2;
  }
  return align;
}

struct Plan {
  Desc desc = nullptr;
  Layout la = nullptr, lb = nullptr, ld = nullptr;
  Algo algo{};
};

// A new problem's plan, with cuBLASLt's candidate algorithms for it, best ranked first.
Plan NewPlan(const Api& api, const Key& key, const void* bias, std::vector<Algo>* candidates) {
  // A residual needs no key of its own: C has D's layout either way, and beta is per call.
  auto [m, n, k, ab_type, d_type, trans_b, epilogue, has_bias, device_id, ws_bytes, align] = key;
  (void)device_id;  // plans are per device; the handle is not
  Plan p;
  Check(api, api.desc_create(&p.desc, kCOMPUTE_32F, kCUDA_R_32F), "cublasLtMatmulDescCreate");
  // Row-major D[M,N] = A[M,K] B is column-major D^T[N,M] = B^T A^T: cuBLASLt's "A" is our b.
  int op_a = trans_b ? kOP_T : kOP_N, op_b = kOP_N;
  Check(api, api.desc_set(p.desc, kDESC_TRANSA, &op_a, sizeof(op_a)), "set TRANSA");
  Check(api, api.desc_set(p.desc, kDESC_TRANSB, &op_b, sizeof(op_b)), "set TRANSB");
  int ep = (epilogue == 1 ? kEPILOGUE_RELU : 0) | (has_bias ? kEPILOGUE_BIAS : 0);
  if (ep == 0) ep = kEPILOGUE_DEFAULT;
  Check(api, api.desc_set(p.desc, kDESC_EPILOGUE, &ep, sizeof(ep)), "set EPILOGUE");
  if (ab_type == kCUDA_R_8F_E4M3) {
    // Accumulate in the tensor cores' own float32 registers without promoting partial sums at
    // each K block: what Transformer Engine runs FP8 inference with, and cuBLASLt's fastest path.
    int8_t fast = 1;
    Check(api, api.desc_set(p.desc, kDESC_FAST_ACCUM, &fast, sizeof(fast)), "set FAST_ACCUM");
  }
  // b is [K,N] row-major = column-major N x K (ld N); with trans_b it is [N,K] = K x N (ld K).
  Check(api, trans_b ? api.layout_create(&p.la, ab_type, k, n, k) : api.layout_create(&p.la, ab_type, n, k, n),
        "cublasLtMatrixLayoutCreate(b)");
  Check(api, api.layout_create(&p.lb, ab_type, k, m, k), "cublasLtMatrixLayoutCreate(a)");
  Check(api, api.layout_create(&p.ld, d_type, n, m, n), "cublasLtMatrixLayoutCreate(d)");
  Pref pref = nullptr;
  Check(api, api.pref_create(&pref), "cublasLtMatmulPreferenceCreate");
  uint64_t ws = ws_bytes;
  Check(api, api.pref_set(pref, kPREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), "set MAX_WORKSPACE_BYTES");
  for (int attr = kPREF_MIN_ALIGNMENT_A; attr < kPREF_MIN_ALIGNMENT_A + 4; ++attr) {
    Check(api, api.pref_set(pref, attr, &align, sizeof(align)), "set MIN_ALIGNMENT");
  }
  Heuristic h[kCandidates] = {};
  int found = 0;
  if (has_bias) {  // the heuristic reads the bias pointer's alignment; its value is set per call
    Check(api, api.desc_set(p.desc, kDESC_BIAS_POINTER, &bias, sizeof(bias)), "set BIAS_POINTER");
  }
  Status s = api.heuristic(api.handle, p.desc, p.la, p.lb, p.ld, p.ld, pref, kCandidates, h, &found);
  api.pref_destroy(pref);
  Check(api, s, "cublasLtMatmulAlgoGetHeuristic");
  for (int i = 0; i < found; ++i) {
    if (h[i].state == 0) candidates->push_back(h[i].algo);
  }
  if (candidates->empty()) {
    TVM_FFI_THROW(RuntimeError) << "smelt cuBLASLt GEMM: cuBLASLt has no algorithm for M=" << m << " N=" << n
                                << " K=" << k;
  }
  return p;
}

void Gemm(TensorView a, TensorView b, Optional<TensorView> bias, Optional<TensorView> residual, int64_t trans_b,
          int64_t epilogue, double scale, TensorView d, TensorView workspace) {
  if (a.ndim() < 1 || b.ndim() != 2) {
    TVM_FFI_THROW(ValueError) << "smelt cuBLASLt GEMM: expected a of rank >= 1 and b of rank 2, got ranks "
                              << a.ndim() << " and " << b.ndim();
  }
  int64_t k = a.size(-1);
  int64_t n = trans_b ? b.size(0) : b.size(1);
  int64_t kb = trans_b ? b.size(1) : b.size(0);
  int64_t m = k ? a.numel() / k : 0;
  if (kb != k || d.numel() != m * n || (bias && bias.value().numel() != n) ||
      (residual && residual.value().numel() != m * n)) {
    TVM_FFI_THROW(ValueError) << "smelt cuBLASLt GEMM: shapes disagree: a has K=" << k << ", b has K=" << kb
                              << " N=" << n << ", d has " << d.numel() << " elements (expected " << m * n << ")";
  }
  int ab_type = CudaType(a, "a"), d_type = CudaType(d, "d");
  if (CudaType(b, "b") != ab_type) TVM_FFI_THROW(TypeError) << "smelt cuBLASLt GEMM: a and b differ in dtype";
  if (residual && CudaType(residual.value(), "residual") != d_type) {
    TVM_FFI_THROW(TypeError) << "smelt cuBLASLt GEMM: residual and d differ in dtype";
  }
  if (ab_type == kCUDA_R_8F_E4M3 && (!trans_b || k % 16 != 0 || d_type == kCUDA_R_8F_E4M3)) {
    TVM_FFI_THROW(ValueError) << "smelt cuBLASLt GEMM: FP8 operands need b as [N, K] (trans_b), K a multiple of 16 "
                                 "and a 16-bit or float32 d; got trans_b="
                              << trans_b << " K=" << k;
  }
  void* pa = Data(a, "a");
  void* pb = Data(b, "b");
  void* pd = Data(d, "d");
  void* pbias = bias ? Data(bias.value(), "bias") : nullptr;
  void* pc = residual ? Data(residual.value(), "residual") : pd;
  void* pws = Data(workspace, "workspace");
  size_t ws_bytes = static_cast<size_t>(workspace.numel()) * ((workspace.dtype().bits + 7) / 8);
  if (m == 0 || n == 0) return;
  std::lock_guard<std::mutex> lock(mu);
  const Api& api = GetApi();
  const float alpha = static_cast<float>(scale), beta = residual ? 1.0f : 0.0f;
  void* stream = TVMFFIEnvGetStream(kDLCUDA, d.device().device_id);
  Key key(m, n, k, ab_type, d_type, int(trans_b), int(epilogue), pbias != nullptr, d.device().device_id, ws_bytes,
          Alignment({pa, pb, pc, pd, pbias ? pbias : pd}));
  static std::map<Key, Plan> plans;
  auto it = plans.find(key);
  std::vector<Algo> algos;  // a new problem's candidates
  if (it == plans.end()) it = plans.emplace(key, NewPlan(api, key, pbias, &algos)).first;
  Plan& p = it->second;
  if (bias) Check(api, api.desc_set(p.desc, kDESC_BIAS_POINTER, &pbias, sizeof(pbias)), "set BIAS_POINTER");
  if (!algos.empty()) {  // running a candidate writes d, which the call below writes again
    p.algo = algos[smelt_timer::Fastest(stream, int(algos.size()), [&](int i) {
      return api.matmul(api.handle, p.desc, &alpha, pb, p.la, pa, p.lb, &beta, pc, p.ld, pd, p.ld, &algos[i], pws,
                        ws_bytes, stream) == 0;
    })];
  }
  Check(api,
        api.matmul(api.handle, p.desc, &alpha, pb, p.la, pa, p.lb, &beta, pc, p.ld, pd, p.ld, &p.algo, pws,
                   ws_bytes, stream),
        "cublasLtMatmul");
}

void Matmul(TensorView a, TensorView b, int64_t trans_b, int64_t epilogue, double alpha, TensorView d,
            TensorView workspace) {
  Gemm(a, b, std::nullopt, std::nullopt, trans_b, epilogue, alpha, d, workspace);
}

void MatmulBias(TensorView a, TensorView b, TensorView bias, int64_t trans_b, int64_t epilogue, double alpha,
                TensorView d, TensorView workspace) {
  Gemm(a, b, bias, std::nullopt, trans_b, epilogue, alpha, d, workspace);
}

void MatmulResidual(TensorView a, TensorView b, TensorView residual, int64_t trans_b, int64_t epilogue, double alpha,
                    TensorView d, TensorView workspace) {
  Gemm(a, b, std::nullopt, residual, trans_b, epilogue, alpha, d, workspace);
}

void MatmulBiasResidual(TensorView a, TensorView b, TensorView bias, TensorView residual, int64_t trans_b,
                        int64_t epilogue, double alpha, TensorView d, TensorView workspace) {
  Gemm(a, b, bias, residual, trans_b, epilogue, alpha, d, workspace);
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(smelt_cublaslt_matmul, Matmul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(smelt_cublaslt_matmul_bias, MatmulBias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(smelt_cublaslt_matmul_residual, MatmulResidual);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(smelt_cublaslt_matmul_bias_residual, MatmulBiasResidual);
