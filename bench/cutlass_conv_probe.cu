// How fast CUTLASS's Hopper implicit-GEMM convolutions (wgmma, TMA, warp-specialized) run
// ResNet-50's layers in FP8 E4M3 and INT8, with the epilogue a quantized network needs
// (per-channel bias, residual, ReLU) fused: the measurement behind an FP8/INT8 conv path.
//
// Each layer given on the command line runs in these variants, each with six conv tile shapes (128x128
// and 128x64 outputs with K-blocks of 128 or 64 bytes: at 64 channels a 128-byte K-block is half
// padding; 64x128 and 64x64 outputs), and 1x1 stride-1 layers also as persistent GEMMs (ping-pong
// with five tile shapes, cooperative with two and on 1x2 clusters; FP8 only), the kernels smelt's
// routine has, and two cooperative stream-K GEMMs it has not (yet); and every layer (FP8 only) as
// the conv mainloop in CUTLASS's persistent kernels (cutlass_conv.h's PersistentConvKernel):
// ping-pong with five tile shapes, cooperative with two, cooperative stream-K with one (the routine
// has four of them):
//   e4m3 -> f16   FP8 activations and weights, fp16 output
//   e4m3 -> e4m3  FP8 in and out (activations stay FP8 between layers; the output scale is
//                 folded into alpha and the bias)
//   s8   -> f16   INT8 activations and weights (int32 accumulation), fp16 output
// D = relu(alpha * conv(x, w) + beta * residual + bias), NHWC activations, KRSC (OHWI) weights,
// all on the GPU's current device. Every run is checked against a plain fp32 reference kernel
// computed from the same quantized inputs (max |d - ref| / max |ref|), then timed with CUDA
// events (20 runs of `run()` back to back, queued behind a spinning kernel, median of 5 such rounds;
// the arguments are initialized once per layer, as a
// library would cache them per problem).
//
// Build (sm_90a: wgmma needs it; -DNDEBUG: a device assert is a call, and nvcc 13 then
// serializes the wgmma pipeline across it, warning C7510), with CUTLASS 4.2's headers
// (pip install nvidia-cutlass; its wheel holds them under cutlass_library/source/):
//   nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -I$CUTLASS/include -I$CUTLASS/tools/util/include bench/cutlass_conv_probe.cu -o probe
// -DPROBE_EPILOGUE_TILES builds only run_epilogue_tiles's kernels (the epilogue's sub-tile).
// Run: ./probe N,H[xW],C,K,R[xS],STRIDE[,PAD[xPAD_W]] [...]   (one layer each; R, S: kernel size,
//      padding R/2 and S/2 unless given; ResNet-50's FP8 stem: 32,115x112,64,64,4x1,1,0)
// bench/fp8_headroom.py --cutlass ./probe runs it on ResNet-50's layers beside cuDNN.
// Output: one line per run: "layer variant tile ms rel_err" (ms -1 where CUTLASS declines).

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../backends/cutlass_conv.h"  // the kernel type smelt's FP8 conv routine instantiates

using namespace cute;

#define CHECK_CUDA(x)                                                                        \
  do {                                                                                       \
    cudaError_t e = (x);                                                                     \
    if (e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

struct Layer {
  int n, h, w, c, k, r, s, stride, pad_h, pad_w;
  __host__ __device__ int p() const { return (h + 2 * pad_h - r) / stride + 1; }
  __host__ __device__ int q() const { return (w + 2 * pad_w - s) / stride + 1; }
  __host__ __device__ size_t pixels() const { return size_t(n) * p() * q(); }
};

constexpr int kRuns = 20;  // per timed round

__global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

SMELT_STREAM_K_IS_LAST_TILE(128, 128, 128)
SMELT_STREAM_K_IS_LAST_TILE(128, 64, 128)

template <class AB, class Acc, class Out, class Tile>
using ConvType = smelt_cutlass::ConvKernel<AB, Acc, Out, Out, cutlass::half_t, cutlass::epilogue::thread::ReLu, Tile>;
using EpiAuto = cutlass::epilogue::collective::EpilogueTileAuto;
template <class AB, class Out, class Tile, bool kPingpong, class Scheduler = void, class EpiTile = EpiAuto>
using PersistentConvType = smelt_cutlass::PersistentConvKernel<
    AB, float, Out, Out, cutlass::half_t, cutlass::epilogue::thread::ReLu, Tile, kPingpong, Scheduler, EpiTile>;
template <class AB, class Out, class Tile, class Cluster, bool kPingpong, class Scheduler = void,
          class EpiTile = EpiAuto>
using GemmType = smelt_cutlass::GemmKernel<AB, float, Out, Out, cutlass::half_t, cutlass::epilogue::thread::ReLu, Tile,
                                           Cluster, kPingpong, Scheduler, EpiTile>;

// Whether kernel type ``K`` is a stream-K GEMM, whose workspace (its tiles' locks) must be cleared
// before every launch, as the adapter's initialize() does.
template <class K>
constexpr bool StreamK() {
  if constexpr (K::kPersistent) {
    return std::is_same_v<typename K::Kernel::TileSchedulerTag, cutlass::gemm::StreamKScheduler>;
  } else {
    return false;
  }
}

// The fp32 reference: one thread per output element, from the same quantized values.
template <class AB, class Out>
__global__ void reference(const AB* x, const AB* w, const cutlass::half_t* bias, const Out* res, float alpha,
                          float beta, Layer l, float* out) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int p = l.p(), qn = l.q();
  int64_t total = int64_t(l.pixels()) * l.k;
  if (i >= total) return;
  int k = i % l.k, q = (i / l.k) % qn, y = (i / l.k / qn) % p, n = i / l.k / qn / p;
  float acc = 0.f;
  for (int r = 0; r < l.r; ++r) {
    for (int s = 0; s < l.s; ++s) {
      int hy = y * l.stride - l.pad_h + r, wx = q * l.stride - l.pad_w + s;
      if (hy < 0 || hy >= l.h || wx < 0 || wx >= l.w) continue;
      const AB* xp = x + ((int64_t(n) * l.h + hy) * l.w + wx) * l.c;
      const AB* wp = w + ((int64_t(k) * l.r + r) * l.s + s) * l.c;
      for (int c = 0; c < l.c; ++c) acc += float(xp[c]) * float(wp[c]);
    }
  }
  out[i] = fmaxf(alpha * acc + beta * float(res[i]) + float(bias[k]), 0.f);
}

template <class T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  CHECK_CUDA(cudaMalloc(&dev, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

// A CUTLASS operator (conv or GEMM adapter) with its arguments, set up once per layer as a library
// would cache them per problem; ok: whether CUTLASS takes the problem.
template <class Op, bool kClear = false>
struct Launch {
  Op op;
  typename Op::Arguments args;
  void* workspace = nullptr;
  bool ok = false;
  explicit Launch(const typename Op::Arguments& a) : args(a) {
    if (op.can_implement(args) != cutlass::Status::kSuccess) return;
    CHECK_CUDA(cudaMalloc(&workspace, std::max<size_t>(Op::get_workspace_size(args), 1)));
    ok = op.initialize(args, workspace) == cutlass::Status::kSuccess;
  }
  ~Launch() {
    if (workspace) cudaFree(workspace);
  }
  bool run() {
    if (kClear && op.initialize(args, workspace) != cutlass::Status::kSuccess) return false;
    return op.run() == cutlass::Status::kSuccess;
  }
};

// The kernel ``K`` (a smelt_cutlass::ConvKernel or GemmKernel) set up for layer ``l``.
template <class K, class AB, class Out>
auto setup(const Layer& l, const AB* x, const AB* w, const cutlass::half_t* bias, const Out* res, Out* d, float alpha,
           float beta) {
  auto args = [&] {
    if constexpr (K::kGemm) {
      int sms = 0;
      CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
      return K::Arguments(int(l.pixels()), l.k, l.c, x, w, res, d, sms);
    } else if constexpr (K::kPersistent) {
      int sms = 0;
      CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
      return K::Arguments(l.n, l.h, l.w, l.c, l.k, l.r, l.s, l.pad_h, l.pad_w, l.stride, l.stride, x, w, res, d, sms);
    } else {
      return K::Arguments(l.n, l.h, l.w, l.c, l.k, l.r, l.s, l.pad_h, l.pad_w, l.stride, l.stride, x, w, res, d);
    }
  }();
  args.epilogue.thread.alpha = alpha;
  args.epilogue.thread.beta = beta;
  args.epilogue.thread.bias_ptr = bias;
  return std::make_unique<Launch<typename K::Adapter, StreamK<K>()>>(args);
}

// A layer's random inputs, drawn once per layer (drawing them per kernel took most of a sweep's time).
struct Values {
  std::vector<float> x, w, bias, residual;
  Values(const Layer& l, int index) {
    std::mt19937 gen(index);
    std::normal_distribution<float> normal;
    x.resize(size_t(l.n) * l.h * l.w * l.c);
    w.resize(size_t(l.k) * l.r * l.s * l.c);
    bias.resize(l.k);
    residual.resize(l.pixels() * l.k);
    for (auto& v : x) v = std::max(normal(gen), 0.f);  // post-ReLU activations
    for (auto& v : w) v = normal(gen);
    for (auto& v : bias) v = normal(gen);
    for (auto& v : residual) v = std::max(normal(gen), 0.f);
  }
};

template <class AB, class Out, class K>
void run(const Layer& l, const Values& values, int index, const char* variant, const char* tile) {
  const size_t nx = size_t(l.n) * l.h * l.w * l.c, nw = size_t(l.k) * l.r * l.s * l.c, nd = l.pixels() * l.k;
  const bool is_int = std::is_same_v<AB, int8_t>;
  auto quantize = [&](float v) {
    if constexpr (std::is_same_v<AB, int8_t>) {
      return AB(std::clamp(std::lround(v * 32), -127L, 127L));
    } else {
      return AB(v);
    }
  };
  std::vector<AB> hx(nx), hw(nw);
  for (size_t i = 0; i < nx; ++i) hx[i] = quantize(values.x[i]);
  for (size_t i = 0; i < nw; ++i) hw[i] = quantize(values.w[i]);
  std::vector<cutlass::half_t> hb(l.k);
  for (int i = 0; i < l.k; ++i) hb[i] = cutlass::half_t(values.bias[i]);
  std::vector<Out> hr(nd);
  for (size_t i = 0; i < nd; ++i) hr[i] = Out(values.residual[i]);
  // alpha scales the sum of C*R*S products of unit scale back to about 1
  const float alpha = 1.f / (std::sqrt(float(l.c * l.r * l.s)) * (is_int ? 32.f * 32.f : 1.f)), beta = 1.f;
  AB *dx = upload(hx), *dw = upload(hw);
  cutlass::half_t* db = upload(hb);
  Out* dr = upload(hr);
  Out* dd = nullptr;
  float* dref = nullptr;
  CHECK_CUDA(cudaMalloc(&dd, nd * sizeof(Out)));
  CHECK_CUDA(cudaMalloc(&dref, nd * sizeof(float)));

  float ms = -1.f, err = -1.f;
  auto op = setup<K>(l, dx, dw, db, dr, dd, alpha, beta);
  if (op->ok) {
    if (!op->run()) {
      std::fprintf(stderr, "layer %d %s %s: CUTLASS failed to run\n", index, variant, tile);
      std::exit(1);
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    reference<AB, Out><<<(nd + 255) / 256, 256>>>(dx, dw, db, dr, alpha, beta, l, dref);
    CHECK_CUDA(cudaGetLastError());
    std::vector<Out> got(nd);
    std::vector<float> ref(nd);
    CHECK_CUDA(cudaMemcpy(got.data(), dd, nd * sizeof(Out), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(ref.data(), dref, nd * sizeof(float), cudaMemcpyDeviceToHost));
    float worst = 0.f, scale = 0.f;
    for (size_t i = 0; i < nd; ++i) {
      worst = std::max(worst, std::fabs(float(got[i]) - ref[i]));
      scale = std::max(scale, std::fabs(ref[i]));
    }
    err = worst / std::max(scale, 1e-30f);
    cudaEvent_t start, end;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&end));
    // Runs back to back, queued behind a spinning kernel: timed one by one, each run's launch on
    // the host (about 5 us) sat between the events and set a floor under small layers.
    std::vector<float> times;
    for (int i = 0; i < 3; ++i) op->run();
    for (int round = 0; round < 5; ++round) {
      CHECK_CUDA(cudaDeviceSynchronize());
      spin<<<1, 1>>>(20000000LL);  // about 10 ms: the runs below are all queued before it ends
      CHECK_CUDA(cudaEventRecord(start));
      for (int i = 0; i < kRuns; ++i) op->run();
      CHECK_CUDA(cudaEventRecord(end));
      CHECK_CUDA(cudaEventSynchronize(end));
      float t = 0.f;
      CHECK_CUDA(cudaEventElapsedTime(&t, start, end));
      times.push_back(t / kRuns);
    }
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    ms = times[times.size() / 2];
  }
  op.reset();
  std::printf("%d %s %s %.5f %.2e\n", index, variant, tile, ms, err);
  std::fflush(stdout);
  for (void* ptr : {(void*)dx, (void*)dw, (void*)db, (void*)dr, (void*)dd, (void*)dref}) CHECK_CUDA(cudaFree(ptr));
}

using E4M3 = cutlass::float_e4m3_t;
using F16 = cutlass::half_t;

template <class Tile>
void run_all(const Layer& l, const Values& values, int index, const char* tile) {
  run<E4M3, F16, ConvType<E4M3, float, F16, Tile>>(l, values, index, "e4m3->f16", tile);
  run<E4M3, E4M3, ConvType<E4M3, float, E4M3, Tile>>(l, values, index, "e4m3->e4m3", tile);
  run<int8_t, F16, ConvType<int8_t, int32_t, F16, Tile>>(l, values, index, "s8->f16", tile);
}

// The conv mainloop in a persistent kernel: FP8 in, fp16 or FP8 out.
template <class Tile, bool kPingpong = true, class Scheduler = void>
void run_persistent(const Layer& l, const Values& values, int index, const char* tile) {
  run<E4M3, F16, PersistentConvType<E4M3, F16, Tile, kPingpong, Scheduler>>(l, values, index, "e4m3->f16", tile);
  run<E4M3, E4M3, PersistentConvType<E4M3, E4M3, Tile, kPingpong, Scheduler>>(l, values, index, "e4m3->e4m3", tile);
}

// The GEMM kernels, for 1x1 stride-1 layers: FP8 in, fp16 or FP8 out.
template <class Tile, class Cluster, bool kPingpong, class Scheduler = void>
void run_gemm(const Layer& l, const Values& values, int index, const char* tile) {
  run<E4M3, F16, GemmType<E4M3, F16, Tile, Cluster, kPingpong, Scheduler>>(l, values, index, "e4m3->f16", tile);
  run<E4M3, E4M3, GemmType<E4M3, E4M3, Tile, Cluster, kPingpong, Scheduler>>(l, values, index, "e4m3->e4m3", tile);
}

// The epilogue's sub-tile (cutlass_conv.h's PersistentEpilogue) against CUTLASS's default, FP8 in
// and out: for layers whose epilogue is most of the work (the expanding 1x1 convs, the stem).
template <class Tile, bool kPingpong, class EpiTile = EpiAuto>
void run_gemm_e4m3(const Layer& l, const Values& values, int index, const char* tile) {
  using K = GemmType<E4M3, E4M3, Tile, Shape<_1, _1, _1>, kPingpong, void, EpiTile>;
  run<E4M3, E4M3, K>(l, values, index, "e4m3->e4m3", tile);
}

template <class Tile, bool kPingpong, class EpiTile = EpiAuto>
void run_persistent_e4m3(const Layer& l, const Values& values, int index, const char* tile) {
  run<E4M3, E4M3, PersistentConvType<E4M3, E4M3, Tile, kPingpong, void, EpiTile>>(l, values, index, "e4m3->e4m3",
                                                                                  tile);
}

void run_epilogue_tiles(const Layer& l, const Values& values, int i) {
  if (l.r == 1 && l.s == 1 && l.stride == 1 && l.pad_h == 0 && l.pad_w == 0) {
    run_gemm_e4m3<Shape<_256, _128, _64>, false>(l, values, i, "gemm-cooperative-256x128x64-epi-auto");
    run_gemm_e4m3<Shape<_256, _128, _64>, false, Shape<_128, _64>>(l, values, i,
                                                                    "gemm-cooperative-256x128x64-epi-128x64");
    run_gemm_e4m3<Shape<_256, _128, _64>, false, Shape<_128, _128>>(l, values, i,
                                                                     "gemm-cooperative-256x128x64-epi-128x128");
    run_gemm_e4m3<Shape<_128, _128, _64>, false>(l, values, i, "gemm-cooperative-128x128x64-epi-auto");
    run_gemm_e4m3<Shape<_128, _128, _64>, false, Shape<_128, _128>>(l, values, i,
                                                                     "gemm-cooperative-128x128x64-epi-128x128");
    run_gemm_e4m3<Shape<_128, _128, _64>, true>(l, values, i, "gemm-pingpong-128x128x64-epi-auto");
    run_gemm_e4m3<Shape<_128, _128, _64>, true, Shape<_64, _128>>(l, values, i, "gemm-pingpong-128x128x64-epi-64x128");
    run_gemm_e4m3<Shape<_128, _128, _128>, true>(l, values, i, "gemm-pingpong-128x128x128-epi-auto");
    run_gemm_e4m3<Shape<_128, _128, _128>, true, Shape<_64, _128>>(l, values, i,
                                                                    "gemm-pingpong-128x128x128-epi-64x128");
  }
  run_persistent_e4m3<Shape<_256, _64, Shape<_64>>, false>(l, values, i, "persistent-cooperative-256x64x64-epi-auto");
  run_persistent_e4m3<Shape<_256, _64, Shape<_64>>, false, Shape<_128, _64>>(
      l, values, i, "persistent-cooperative-256x64x64-epi-128x64");
  run_persistent_e4m3<Shape<_128, _64, Shape<_64>>, true>(l, values, i, "persistent-128x64x64-epi-auto");
}

// "a" or "axb" into (a, a) or (a, b); false if neither.
bool ParsePair(const std::string& text, int& a, int& b) {
  char extra = 0;
  if (std::sscanf(text.c_str(), "%dx%d%c", &a, &b, &extra) == 2) return true;
  if (std::sscanf(text.c_str(), "%d%c", &a, &extra) != 1) return false;
  b = a;
  return true;
}

// N,H[xW],C,K,R[xS],STRIDE[,PAD[xPAD_W]]: square sizes where one number is given; the padding
// R/2 and S/2 unless given.
bool ParseLayer(const char* arg, Layer& l) {
  std::vector<std::string> f;
  std::string text(arg);
  for (size_t at = 0;;) {
    size_t comma = text.find(',', at);
    f.push_back(text.substr(at, comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  if (f.size() != 6 && f.size() != 7) return false;
  if (!ParsePair(f[1], l.h, l.w) || !ParsePair(f[4], l.r, l.s)) return false;
  if (std::sscanf(f[0].c_str(), "%d", &l.n) != 1 || std::sscanf(f[2].c_str(), "%d", &l.c) != 1 ||
      std::sscanf(f[3].c_str(), "%d", &l.k) != 1 || std::sscanf(f[5].c_str(), "%d", &l.stride) != 1) {
    return false;
  }
  l.pad_h = l.r / 2, l.pad_w = l.s / 2;
  return f.size() == 6 || ParsePair(f[6], l.pad_h, l.pad_w);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s N,H[xW],C,K,R[xS],STRIDE[,PAD[xPAD_W]] [...]\n", argv[0]);
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    Layer l{};
    if (!ParseLayer(argv[i], l)) {
      std::fprintf(stderr, "bad layer '%s': expected N,H[xW],C,K,R[xS],STRIDE[,PAD[xPAD_W]]\n", argv[i]);
      return 2;
    }
    const Values values(l, i - 1);
#ifdef PROBE_EPILOGUE_TILES
    run_epilogue_tiles(l, values, i - 1);
    continue;
#endif
    run_all<Shape<_128, _128, Shape<_128>>>(l, values, i - 1, "128x128x128");
    run_all<Shape<_128, _64, Shape<_128>>>(l, values, i - 1, "128x64x128");
    run_all<Shape<_128, _128, Shape<_64>>>(l, values, i - 1, "128x128x64");
    run_all<Shape<_128, _64, Shape<_64>>>(l, values, i - 1, "128x64x64");
    run_all<Shape<_64, _128, Shape<_128>>>(l, values, i - 1, "64x128x128");
    run_all<Shape<_64, _64, Shape<_128>>>(l, values, i - 1, "64x64x128");
    run_persistent<Shape<_128, _64, Shape<_64>>>(l, values, i - 1, "persistent-128x64x64");
    run_persistent<Shape<_128, _64, Shape<_128>>>(l, values, i - 1, "persistent-128x64x128");
    run_persistent<Shape<_128, _128, Shape<_64>>>(l, values, i - 1, "persistent-128x128x64");
    run_persistent<Shape<_128, _128, Shape<_128>>>(l, values, i - 1, "persistent-128x128x128");
    run_persistent<Shape<_64, _128, Shape<_128>>>(l, values, i - 1, "persistent-64x128x128");
    run_persistent<Shape<_128, _128, Shape<_128>>, false>(l, values, i - 1, "persistent-cooperative-128x128x128");
    run_persistent<Shape<_256, _64, Shape<_64>>, false>(l, values, i - 1, "persistent-cooperative-256x64x64");
    run_persistent<Shape<_128, _128, Shape<_128>>, false, cutlass::gemm::StreamKScheduler>(
        l, values, i - 1, "persistent-streamk-128x128x128");
    if (l.r == 1 && l.s == 1 && l.stride == 1 && l.pad_h == 0 && l.pad_w == 0) {
      run_gemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>, true>(l, values, i - 1, "gemm-pingpong-128x128x128");
      run_gemm<Shape<_128, _64, _128>, Shape<_1, _1, _1>, true>(l, values, i - 1, "gemm-pingpong-128x64x128");
      run_gemm<Shape<_128, _128, _64>, Shape<_1, _1, _1>, true>(l, values, i - 1, "gemm-pingpong-128x128x64");
      run_gemm<Shape<_64, _128, _128>, Shape<_1, _1, _1>, true>(l, values, i - 1, "gemm-pingpong-64x128x128");
      run_gemm<Shape<_64, _64, _128>, Shape<_1, _1, _1>, true>(l, values, i - 1, "gemm-pingpong-64x64x128");
      run_gemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, false>(l, values, i - 1,
                                                                  "gemm-cooperative-128x128x128-c1x2");
      run_gemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>, false>(l, values, i - 1, "gemm-cooperative-128x128x128");
      run_gemm<Shape<_256, _128, _64>, Shape<_1, _1, _1>, false>(l, values, i - 1, "gemm-cooperative-256x128x64");
      run_gemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>, false, cutlass::gemm::StreamKScheduler>(
          l, values, i - 1, "gemm-streamk-128x128x128");
      run_gemm<Shape<_128, _64, _128>, Shape<_1, _1, _1>, false, cutlass::gemm::StreamKScheduler>(
          l, values, i - 1, "gemm-streamk-128x64x128");
    }
  }
  return 0;
}
