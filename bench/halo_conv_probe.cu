// How fast smelt's halo-tile FP8 conv (backends/halo_conv.h, candidates of the CUTLASS routine)
// runs ResNet-50's stride-1 layers outside the routine: random E4M3 inputs, checked against an
// fp32 reference (max |y - ref| / max |ref|); timed warm (20 launches back to back behind a
// spinning kernel, median of 5) and cold (as the routine times: a launch after an L2 flush).
//
// Why: bench/cutlass_conv_probe.cu times CUTLASS's 3x3 convs at the rate of their im2col loads
// (H100, e4m3 with residual: 56x56 64->64 17.7 us, 28x28 128->128 17.3). The kernel's first form
// (0ae1f87: compile-time shapes, weights laid out on the host) ran 56x56 64->64 in 15.1 us with
// residual, 13.1 without, the stem's 4x1 conv in 28.6 (CUTLASS 36.7). The routine's form (H100,
// warm/cold, no residual): 56x56 64->64 20.2/22.5 us; stem 35.8/36.4 (CUTLASS cold in the
// routine: 20.2-20.4, 37.2-37.3). Weights by one TMA copy: 18.0/19.4 us; tile and pixel indices
// by FastDivmod: 17.4/18.7, stem 32.4/33.1; constant shapes: 15.6/18.1 (bench/results).
//
// Build, with CUTLASS 4.2's headers (PyPI's nvidia-cutlass wheel) in $CUTLASS:
//   nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a -I$CUTLASS/include \
//        bench/halo_conv_probe.cu -o halo
// Run:   ./halo

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../backends/halo_conv.h"

#define CHECK_CUDA(x)                                                                             \
  do {                                                                                            \
    if (cudaError_t e = (x); e != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));      \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

__device__ float F8(uint8_t v) { return float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3))); }

// The fp32 reference, one thread per output element: relu(alpha * conv + bias + beta * res).
__global__ void Reference(const uint8_t* x, const uint8_t* w, const float* bias, const uint8_t* res, float alpha,
                          float beta, smelt_halo::Plan pl, float* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(pl.n) * pl.p * pl.w * pl.k) return;
  const int k = i % pl.k, q = (i / pl.k) % pl.w, p = (i / pl.k / pl.w) % pl.p, n = i / pl.k / pl.w / pl.p;
  float acc = 0.f;
  for (int r = 0; r < pl.r; ++r)
    for (int s = 0; s < pl.s; ++s) {
      const int hy = p - pl.pad_h + r, wx = q - pl.pad_w + s;
      if (hy < 0 || hy >= pl.h || wx < 0 || wx >= pl.w) continue;
      for (int c = 0; c < pl.c; ++c)
        acc += F8(x[((int64_t(n) * pl.h + hy) * pl.w + wx) * pl.c + c]) *
               F8(w[((k * pl.r + r) * pl.s + s) * pl.c + c]);
    }
  out[i] = fmaxf(alpha * acc + bias[k] + beta * F8(res[i]), 0.f);
}

__global__ void Spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

template <class T>
T* Upload(const std::vector<T>& host) {
  T* dev = nullptr;
  CHECK_CUDA(cudaMalloc(&dev, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

uint8_t E4m3(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }

// Layer n x h x w x c -> k, r x s filter, padding (ph, pw), tiles of MT pixels; beta 0: no residual.
template <int MT>
void Layer(const char* name, int n, int h, int w, int c, int k, int r, int s, int ph, int pw, float beta) {
  const smelt_halo::Plan pl = smelt_halo::MakePlan(n, h, w, c, k, r, s, ph, pw, MT);
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  const size_t nd = size_t(n) * pl.p * w * k;
  std::vector<uint8_t> hx(size_t(n) * h * w * c), hw(size_t(k) * r * s * c), hr(nd);
  std::vector<float> hb(k);
  for (auto& v : hx) v = E4m3(std::max(normal(gen), 0.f));
  for (auto& v : hw) v = E4m3(normal(gen));
  for (auto& v : hb) v = normal(gen);
  for (auto& v : hr) v = E4m3(std::max(normal(gen), 0.f));
  const float alpha = 1.f / std::sqrt(float(c * r * s));
  uint8_t *dx = Upload(hx), *dw = Upload(hw), *dr = Upload(hr), *dd = nullptr;
  float *db = Upload(hb), *dref = nullptr;
  CHECK_CUDA(cudaMalloc(&dd, nd));
  CHECK_CUDA(cudaMalloc(&dref, nd * sizeof(float)));
  CHECK_CUDA(cudaMemset(dd, 0xFF, nd));  // NaN in e4m3: an output the kernel misses shows
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  auto launch = [&] {
    if (!smelt_halo::Run<true, true, MT>(pl, dx, dw, db, dr, dd, alpha, beta, 0.f, sms, 0, false)) {
      std::fprintf(stderr, "%s: the halo kernel does not take this layer\n", name);
      std::exit(1);
    }
  };
  launch();
  CHECK_CUDA(cudaDeviceSynchronize());
  Reference<<<(nd + 255) / 256, 256>>>(dx, dw, db, dr, alpha, beta, pl, dref);
  CHECK_CUDA(cudaGetLastError());
  std::vector<uint8_t> got(nd);
  std::vector<float> ref(nd);
  CHECK_CUDA(cudaMemcpy(got.data(), dd, nd, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(ref.data(), dref, nd * sizeof(float), cudaMemcpyDeviceToHost));
  float worst = 0.f, scale = 0.f;
  for (size_t i = 0; i < nd; ++i) {
    const float g = float(__half(__nv_cvt_fp8_to_halfraw(got[i], __NV_E4M3)));
    worst = std::isnan(g) ? INFINITY : std::max(worst, std::fabs(g - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  cudaEvent_t start, end;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&end));
  std::vector<float> times;
  for (int round = 0; round < 5; ++round) {
    CHECK_CUDA(cudaDeviceSynchronize());
    Spin<<<1, 1>>>(20000000LL);
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < 20; ++i) launch();
    CHECK_CUDA(cudaEventRecord(end));
    CHECK_CUDA(cudaEventSynchronize(end));
    float t = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, end));
    times.push_back(t / 20);
  }
  std::nth_element(times.begin(), times.begin() + 2, times.end());
  const float warm = times[2];
  // as the routine times candidates: one launch at a time, each after a write of twice the L2
  int l2 = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  void* flush = nullptr;
  CHECK_CUDA(cudaMalloc(&flush, 2 * size_t(l2)));
  times.clear();
  for (int round = 0; round < 5; ++round) {
    CHECK_CUDA(cudaMemsetAsync(flush, round, 2 * size_t(l2)));
    CHECK_CUDA(cudaEventRecord(start));
    launch();
    CHECK_CUDA(cudaEventRecord(end));
    CHECK_CUDA(cudaEventSynchronize(end));
    float t = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, end));
    times.push_back(t);
  }
  CHECK_CUDA(cudaFree(flush));
  std::nth_element(times.begin(), times.begin() + 2, times.end());
  std::printf("%s halo-%d-%s warm %.5f cold %.5f ms, err %.2e (%d stages, smem %d B, %d tiles)\n", name, MT,
              beta != 0.f ? "res" : "nores", warm, times[2], worst / std::max(scale, 1e-30f), pl.stages, pl.smem,
              n * pl.tiles * pl.halves);
  std::fflush(stdout);
  for (void* p : {(void*)dx, (void*)dw, (void*)dr, (void*)dd, (void*)db, (void*)dref}) CHECK_CUDA(cudaFree(p));
}

int main() {
  Layer<128>("32,56,64,64,3,1", 32, 56, 56, 64, 64, 3, 3, 1, 1, 1.f);  // ResNet-50's 56x56 3x3, batch 32
  Layer<128>("32,56,64,64,3,1", 32, 56, 56, 64, 64, 3, 3, 1, 1, 0.f);
  Layer<64>("32,56,64,64,3,1", 32, 56, 56, 64, 64, 3, 3, 1, 1, 0.f);
  Layer<128>("32,115x112,64,64,4x1,1,0", 32, 115, 112, 64, 64, 4, 1, 0, 0, 0.f);  // the FP8 stem
  Layer<64>("32,115x112,64,64,4x1,1,0", 32, 115, 112, 64, 64, 4, 1, 0, 0, 0.f);
  Layer<128>("32,28,128,128,3,1", 32, 28, 28, 128, 128, 3, 3, 1, 1, 0.f);  // ResNet-50's 28x28 3x3
  Layer<64>("32,28,128,128,3,1", 32, 28, 28, 128, 128, 3, 3, 1, 1, 0.f);
  Layer<128>("32,56,64,128,3,1", 32, 56, 56, 64, 128, 3, 3, 1, 1, 0.f);  // mixed planes and halves
  Layer<64>("32,28,128,64,3,1", 32, 28, 28, 128, 64, 3, 3, 1, 1, 1.f);
  return 0;
}
