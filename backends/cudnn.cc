// smelt's cuDNN convolution, linked into CUDA artifacts that dispatch convolutions to cuDNN.
//
// TVM 0.27's pip wheel is built without cuDNN (USE_CUDNN=OFF): tvm.contrib.cudnn and
// relax.ext.cudnn do not exist. This file is the one routine smelt needs from it, exported
// through TVM-FFI's C ABI so that the Relax VM finds it in the artifact's own library:
//
//   smelt_cudnn_conv2d(x, w, bias, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w, groups,
//                      epilogue, y, workspace)
//   smelt_cudnn_conv2d_residual(x, w, bias, residual, pad_h, ..., epilogue, y, workspace)
//
//   x: [N, H, W, C] (NHWC), w: [K, R, S, C / groups] (OHWI), bias: [K], residual and y:
//   [N, P, Q, K], workspace: bytes cuDNN may use. epilogue: 0 none, 1 relu.
//   y = epilogue(conv(x, w) + bias + residual), accumulated in float32
//   (cudnnConvolutionBiasActivationForward). The outputs come last, as Relax's call_dps_packed
//   passes them.
//
// libcudnn is opened at the first call (dlopen), not linked: artifacts load on machines without
// it and say what is missing only when a convolution runs. The declarations below are cuDNN 9's
// public C API (cudnn_graph.h, cudnn_ops.h, cudnn_cnn.h; the "legacy" convolution API, which
// cuDNN 8 has too), written out so that the file builds with a plain C++ compiler and no cuDNN.
//
// The call runs on TVM's current stream for the device (TVMFFIEnvGetStream), so CUDA graphs that
// TVM captures on their own stream capture it too. Algorithms are chosen once per problem, the
// fastest of those cuDNN's heuristic offers on the first call (cuda_timer.h), and cached; the
// VM's warm-up run fills the cache before a capture.

#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "cuda_timer.h"

namespace {

// ---- cuDNN's C API --------------------------------------------------------------------------
using Status = int;
using Handle = void*;
using TensorDesc = void*;
using FilterDesc = void*;
using ConvDesc = void*;
using ActDesc = void*;
struct AlgoPerf {  // cudnnConvolutionFwdAlgoPerf_t
  int algo;
  Status status;
  float time;
  size_t memory;
  int determinism;
  int math_type;
  int reserved[3];
};
constexpr int kDATA_FLOAT = 0, kDATA_HALF = 2, kDATA_BFLOAT16 = 9;
constexpr int kTENSOR_NCHW = 0, kTENSOR_NHWC = 1;
constexpr int kCROSS_CORRELATION = 1;
constexpr int kTENSOR_OP_MATH = 1, kFMA_MATH = 3;
constexpr int kACTIVATION_RELU = 1, kACTIVATION_IDENTITY = 5, kNOT_PROPAGATE_NAN = 0;
constexpr int kALGO_IMPLICIT_PRECOMP_GEMM = 1;

struct Api {
  Status (*create)(Handle*);
  const char* (*error_string)(Status);
  Status (*set_stream)(Handle, void*);
  Status (*tensor_create)(TensorDesc*);
  Status (*tensor_set4d)(TensorDesc, int, int, int, int, int, int);
  Status (*filter_create)(FilterDesc*);
  Status (*filter_set4d)(FilterDesc, int, int, int, int, int, int);
  Status (*conv_create)(ConvDesc*);
  Status (*conv_set2d)(ConvDesc, int, int, int, int, int, int, int, int);
  Status (*conv_set_math)(ConvDesc, int);
  Status (*conv_set_groups)(ConvDesc, int);
  Status (*act_create)(ActDesc*);
  Status (*act_set)(ActDesc, int, int, double);
  Status (*algos)(Handle, TensorDesc, FilterDesc, ConvDesc, TensorDesc, int, int*, AlgoPerf*);
  Status (*workspace_size)(Handle, TensorDesc, FilterDesc, ConvDesc, TensorDesc, int, size_t*);
  Status (*conv_bias_act)(Handle, const void*, TensorDesc, const void*, FilterDesc, const void*, ConvDesc, int,
                          void*, size_t, const void*, TensorDesc, const void*, TensorDesc, const void*, ActDesc,
                          TensorDesc, void*);
  Handle handle = nullptr;
};

template <typename F>
void Bind(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (*fn == nullptr) {
    TVM_FFI_THROW(RuntimeError) << "smelt cuDNN conv2d: libcudnn has no " << name << " (a cuDNN older than 8?)";
  }
}

std::mutex mu;

const Api& GetApi() {
  static Api api;
  static bool ready = false;
  if (ready) return api;
  // smelt's loader (backends/vendor_libs.py) loads the library first when it is not on the
  // loader path (pip's nvidia-cudnn); dlopen by soname then finds that one.
  const char* names[] = {"libcudnn.so.9", "libcudnn.so.8"};
  void* lib = nullptr;
  for (const char* name : names) {
    if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
  }
  if (lib == nullptr) {
    TVM_FFI_THROW(RuntimeError)
        << "this artifact runs its convolutions with cuDNN, and libcudnn.so.9 or .so.8 was not found: pip "
           "install nvidia-cudnn-cu13 (or -cu12), or add cuDNN's lib folder to LD_LIBRARY_PATH, or recompile "
           "with --libs cublaslt (or none)";
  }
  Bind(lib, "cudnnCreate", &api.create);
  Bind(lib, "cudnnGetErrorString", &api.error_string);
  Bind(lib, "cudnnSetStream", &api.set_stream);
  Bind(lib, "cudnnCreateTensorDescriptor", &api.tensor_create);
  Bind(lib, "cudnnSetTensor4dDescriptor", &api.tensor_set4d);
  Bind(lib, "cudnnCreateFilterDescriptor", &api.filter_create);
  Bind(lib, "cudnnSetFilter4dDescriptor", &api.filter_set4d);
  Bind(lib, "cudnnCreateConvolutionDescriptor", &api.conv_create);
  Bind(lib, "cudnnSetConvolution2dDescriptor", &api.conv_set2d);
  Bind(lib, "cudnnSetConvolutionMathType", &api.conv_set_math);
  Bind(lib, "cudnnSetConvolutionGroupCount", &api.conv_set_groups);
  Bind(lib, "cudnnCreateActivationDescriptor", &api.act_create);
  Bind(lib, "cudnnSetActivationDescriptor", &api.act_set);
  Bind(lib, "cudnnGetConvolutionForwardAlgorithm_v7", &api.algos);
  Bind(lib, "cudnnGetConvolutionForwardWorkspaceSize", &api.workspace_size);
  Bind(lib, "cudnnConvolutionBiasActivationForward", &api.conv_bias_act);
  Status s = api.create(&api.handle);
  if (s != 0) TVM_FFI_THROW(RuntimeError) << "cudnnCreate failed: " << api.error_string(s);
  ready = true;
  return api;
}

void Check(const Api& api, Status s, const char* what) {
  if (s != 0) TVM_FFI_THROW(RuntimeError) << "smelt cuDNN conv2d: " << what << " failed: " << api.error_string(s);
}

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

int DataType(const TensorView& t, const char* name) {
  DLDataType d = t.dtype();
  if (d.lanes == 1 && d.code == kDLFloat && d.bits == 16) return kDATA_HALF;
  if (d.lanes == 1 && d.code == kDLBfloat && d.bits == 16) return kDATA_BFLOAT16;
  if (d.lanes == 1 && d.code == kDLFloat && d.bits == 32) return kDATA_FLOAT;
  TVM_FFI_THROW(TypeError) << "smelt cuDNN conv2d: " << name << " has dtype code " << int(d.code) << " bits "
                           << int(d.bits) << "; expected float16, bfloat16 or float32";
  return -1;
}

// Tensors the Relax VM passes are dense (it allocates them), so only the device is checked.
void* Data(const TensorView& t, const char* name) {
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "smelt cuDNN conv2d: " << name << " is not on a CUDA device";
  }
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// One problem: x's NHWC shape, w's K R S, the y's P Q, pads, strides, dilations, groups, dtype,
// epilogue, device and workspace bytes.
using Key = std::tuple<std::array<int64_t, 9>, std::array<int64_t, 7>, int, int, int, size_t>;

struct Plan {
  TensorDesc x = nullptr, y = nullptr, bias = nullptr;
  FilterDesc w = nullptr;
  ConvDesc conv = nullptr;
  ActDesc act = nullptr;
  int algo = -1;
};

// A new problem's plan, with the algorithms that compute it, cuDNN's heuristic's best first.
Plan NewPlan(const Api& api, const Key& key, std::vector<int>* algos) {
  auto& [shape, conv, dtype, epilogue, device_id, ws_bytes] = key;
  (void)device_id;  // plans are per device; the handle is not
  auto [n, h, w, c, k, r, s, p, q] = shape;
  auto [pad_h, pad_w, stride_h, stride_w, dil_h, dil_w, groups] = conv;
  Plan plan;
  Check(api, api.tensor_create(&plan.x), "cudnnCreateTensorDescriptor");
  Check(api, api.tensor_set4d(plan.x, kTENSOR_NHWC, dtype, n, c, h, w), "cudnnSetTensor4dDescriptor(x)");
  Check(api, api.tensor_create(&plan.y), "cudnnCreateTensorDescriptor");
  Check(api, api.tensor_set4d(plan.y, kTENSOR_NHWC, dtype, n, k, p, q), "cudnnSetTensor4dDescriptor(y)");
  Check(api, api.tensor_create(&plan.bias), "cudnnCreateTensorDescriptor");
  Check(api, api.tensor_set4d(plan.bias, kTENSOR_NCHW, dtype, 1, k, 1, 1), "cudnnSetTensor4dDescriptor(bias)");
  Check(api, api.filter_create(&plan.w), "cudnnCreateFilterDescriptor");
  Check(api, api.filter_set4d(plan.w, dtype, kTENSOR_NHWC, k, c / groups, r, s), "cudnnSetFilter4dDescriptor");
  Check(api, api.conv_create(&plan.conv), "cudnnCreateConvolutionDescriptor");
  Check(api,
        api.conv_set2d(plan.conv, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w, kCROSS_CORRELATION, kDATA_FLOAT),
        "cudnnSetConvolution2dDescriptor");
  // float32 stays float32 (no TF32), as smelt's cuBLASLt GEMMs; 16-bit types use tensor cores.
  Check(api, api.conv_set_math(plan.conv, dtype == kDATA_FLOAT ? kFMA_MATH : kTENSOR_OP_MATH),
        "cudnnSetConvolutionMathType");
  Check(api, api.conv_set_groups(plan.conv, groups), "cudnnSetConvolutionGroupCount");
  Check(api, api.act_create(&plan.act), "cudnnCreateActivationDescriptor");
  Check(api, api.act_set(plan.act, epilogue == 1 ? kACTIVATION_RELU : kACTIVATION_IDENTITY, kNOT_PROPAGATE_NAN, 0.0),
        "cudnnSetActivationDescriptor");
  AlgoPerf perf[16];
  int found = 0;
  Check(api, api.algos(api.handle, plan.x, plan.w, plan.conv, plan.y, 16, &found, perf),
        "cudnnGetConvolutionForwardAlgorithm_v7");
  // The heuristic's ranking, those that fit the workspace; the fused op takes an identity
  // activation only with the precomputed implicit GEMM.
  for (int i = 0; i < found; ++i) {
    if (perf[i].status != 0 || perf[i].memory > ws_bytes) continue;
    if (epilogue != 1 && perf[i].algo != kALGO_IMPLICIT_PRECOMP_GEMM) continue;
    algos->push_back(perf[i].algo);
  }
  if (algos->empty() && epilogue != 1) {
    size_t need = 0;
    if (api.workspace_size(api.handle, plan.x, plan.w, plan.conv, plan.y, kALGO_IMPLICIT_PRECOMP_GEMM, &need) == 0 &&
        need <= ws_bytes) {
      algos->push_back(kALGO_IMPLICIT_PRECOMP_GEMM);
    }
  }
  if (algos->empty()) {
    TVM_FFI_THROW(RuntimeError) << "smelt cuDNN conv2d: cuDNN has no algorithm for x [" << n << ", " << h << ", "
                                << w << ", " << c << "], w [" << k << ", " << r << ", " << s << ", " << c / groups
                                << "] within " << ws_bytes << " bytes of workspace";
  }
  return plan;
}

void Conv(TensorView x, TensorView w, TensorView bias, Optional<TensorView> residual, int64_t pad_h, int64_t pad_w,
          int64_t stride_h, int64_t stride_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t epilogue,
          TensorView y, TensorView workspace) {
  if (x.ndim() != 4 || w.ndim() != 4 || y.ndim() != 4) {
    TVM_FFI_THROW(ValueError) << "smelt cuDNN conv2d: expected x, w and y of rank 4, got ranks " << x.ndim() << ", "
                              << w.ndim() << " and " << y.ndim();
  }
  int64_t k = w.size(0);
  if (groups < 1 || x.size(3) != w.size(3) * groups || y.size(0) != x.size(0) || y.size(3) != k ||
      bias.numel() != k || (residual && residual.value().numel() != y.numel())) {
    TVM_FFI_THROW(ValueError) << "smelt cuDNN conv2d: shapes disagree: x has " << x.size(3) << " channels, w ["
                              << k << ", " << w.size(1) << ", " << w.size(2) << ", " << w.size(3) << "] in "
                              << groups << " groups, y has " << y.size(3) << " channels, bias " << bias.numel()
                              << " elements";
  }
  int dtype = DataType(x, "x");
  if (DataType(w, "w") != dtype || DataType(y, "y") != dtype || DataType(bias, "bias") != dtype ||
      (residual && DataType(residual.value(), "residual") != dtype)) {
    TVM_FFI_THROW(TypeError) << "smelt cuDNN conv2d: x, w, bias, residual and y differ in dtype";
  }
  void* px = Data(x, "x");
  void* pw = Data(w, "w");
  void* pb = Data(bias, "bias");
  void* py = Data(y, "y");
  void* pz = residual ? Data(residual.value(), "residual") : py;
  void* pws = Data(workspace, "workspace");
  size_t ws_bytes = static_cast<size_t>(workspace.numel()) * ((workspace.dtype().bits + 7) / 8);
  if (y.numel() == 0) return;
  std::lock_guard<std::mutex> lock(mu);
  const Api& api = GetApi();
  Key key({x.size(0), x.size(1), x.size(2), x.size(3), k, w.size(1), w.size(2), y.size(1), y.size(2)},
          {pad_h, pad_w, stride_h, stride_w, dil_h, dil_w, groups}, dtype, int(epilogue), y.device().device_id,
          ws_bytes);
  void* stream = TVMFFIEnvGetStream(kDLCUDA, y.device().device_id);
  Check(api, api.set_stream(api.handle, stream), "cudnnSetStream");
  // y = act(alpha1 * conv(x) + alpha2 * z + bias): the residual is z (y itself, scaled by 0, without one).
  const float alpha1 = 1.0f, alpha2 = residual ? 1.0f : 0.0f;
  auto run = [&](const Plan& p, int algo) {
    return api.conv_bias_act(api.handle, &alpha1, p.x, px, p.w, pw, p.conv, algo, pws, ws_bytes, &alpha2, p.y, pz,
                             p.bias, pb, p.act, p.y, py);
  };
  static std::map<Key, Plan> plans;
  auto it = plans.find(key);
  if (it == plans.end()) {
    std::vector<int> algos;
    Plan p = NewPlan(api, key, &algos);
    // Running a candidate writes y, which the call below writes again (a residual is read, never y).
    p.algo = algos[smelt_timer::Fastest(stream, int(algos.size()), [&](int i) { return run(p, algos[i]) == 0; })];
    it = plans.emplace(key, p).first;
  }
  const Plan& p = it->second;
  Check(api, run(p, p.algo), "cudnnConvolutionBiasActivationForward");
}

void Conv2d(TensorView x, TensorView w, TensorView bias, int64_t pad_h, int64_t pad_w, int64_t stride_h,
            int64_t stride_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t epilogue, TensorView y,
            TensorView workspace) {
  Conv(x, w, bias, std::nullopt, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w, groups, epilogue, y, workspace);
}

void Conv2dResidual(TensorView x, TensorView w, TensorView bias, TensorView residual, int64_t pad_h, int64_t pad_w,
                    int64_t stride_h, int64_t stride_w, int64_t dil_h, int64_t dil_w, int64_t groups, int64_t epilogue,
                    TensorView y, TensorView workspace) {
  Conv(x, w, bias, residual, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w, groups, epilogue, y, workspace);
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(smelt_cudnn_conv2d, Conv2d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(smelt_cudnn_conv2d_residual, Conv2dResidual);
