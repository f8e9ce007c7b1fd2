// How fast smelt's halo-tile FP8 conv (backends/halo_conv.h, one of the CUTLASS routine's
// candidates) runs ResNet-50's stride-1 64->64 layers, outside the routine: random E4M3 inputs,
// checked against an fp32 reference kernel from the same values (max |y - ref| / max |ref|),
// timed with CUDA events (20 launches back to back behind a spinning kernel, median of 5 rounds).
//
// Why a halo tile: bench/cutlass_conv_probe.cu on an H100 times ResNet-50's 3x3 convs at the rate
// of their im2col loads (56x56 64->64: 17.7 us; 128->64: 26.9; 64->128: 30.4; 28x28 128->128: 17.3;
// e4m3, with residual), 3.3-4.3 TB/s of tap loads with the tensor cores at a quarter of their rate.
//
// Measured on an H100 by the kernel's first form (this probe with compile-time shapes, weights laid
// out on the host, a float16 stage; max error 4.65e-2 as CUTLASS's): 56x56 3x3 64->64 15.1 us with
// residual (CUTLASS 17.7), 13.1 without (64-pixel tiles 12.1); the stem's 4x1 conv 28.6 (CUTLASS
// 36.7). Earlier forms: 16-byte channel planes unswizzled (four boxes of 16-byte rows per tile)
// 17.4 us, stem 75; per-thread loads instead of TMA 19.2 (a tile's 15.6 KB took 3.5-4.4 us to
// arrive); one warpgroup with cp.async double buffering 25.2-36.7. wgmma m64n64k32 took 34 cycles
// from swizzled and unswizzled operands alike. The routine's form (runtime shapes, a float32
// stage, weights gathered from OHWI) matched CUTLASS's ResNet-50 b32 output when forced, but
// timing (cold L2, one launch at a time) picked CUTLASS for every conv: this probe is where to
// find out why.
//
// Build: nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a \
//        bench/halo_conv_probe.cu -o halo
// Run:   ./halo   (prints "layer variant ms rel_err" for ResNet-50's 56x56 3x3 conv and its stem)

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

using smelt_halo::kC;
using smelt_halo::kK;

__device__ float F8(uint8_t v) { return float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3))); }

// The fp32 reference, one thread per output element: relu(alpha * conv + bias + beta * res).
__global__ void Reference(const uint8_t* x, const uint8_t* w, const float* bias, const uint8_t* res, float alpha,
                          float beta, smelt_halo::Plan pl, float* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(pl.n) * pl.p * pl.w * kK) return;
  const int k = i % kK, q = (i / kK) % pl.w, p = (i / kK / pl.w) % pl.p, n = i / kK / pl.w / pl.p;
  float acc = 0.f;
  for (int r = 0; r < pl.r; ++r)
    for (int s = 0; s < pl.s; ++s) {
      const int hy = p - pl.pad_h + r, wx = q - pl.pad_w + s;
      if (hy < 0 || hy >= pl.h || wx < 0 || wx >= pl.w) continue;
      for (int c = 0; c < kC; ++c)
        acc += F8(x[((int64_t(n) * pl.h + hy) * pl.w + wx) * kC + c]) * F8(w[((k * pl.r + r) * pl.s + s) * kC + c]);
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

// Layer n x h x w, r x s filter, padding (ph, pw), tiles of MT pixels; beta 0: no residual.
template <int MT>
void Layer(const char* name, int n, int h, int w, int r, int s, int ph, int pw, float beta) {
  const smelt_halo::Plan pl = smelt_halo::MakePlan(n, h, w, r, s, ph, pw, MT);
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  const size_t nd = size_t(n) * pl.p * w * kK;
  std::vector<uint8_t> hx(size_t(n) * h * w * kC), hw(size_t(kK) * r * s * kC), hr(nd);
  std::vector<float> hb(kK);
  for (auto& v : hx) v = E4m3(std::max(normal(gen), 0.f));
  for (auto& v : hw) v = E4m3(normal(gen));
  for (auto& v : hb) v = normal(gen);
  for (auto& v : hr) v = E4m3(std::max(normal(gen), 0.f));
  const float alpha = 1.f / std::sqrt(float(kC * r * s));
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
  std::printf("%s halo-%d-%s %.5f %.2e (%d stages, smem %d B, %d tiles)\n", name, MT, beta != 0.f ? "res" : "nores",
              times[2], worst / std::max(scale, 1e-30f), pl.stages, pl.smem, n * pl.tiles);
  std::fflush(stdout);
  for (void* p : {(void*)dx, (void*)dw, (void*)dr, (void*)dd, (void*)db, (void*)dref}) CHECK_CUDA(cudaFree(p));
}

int main() {
  Layer<128>("32,56,64,64,3,1", 32, 56, 56, 3, 3, 1, 1, 1.f);  // ResNet-50's 56x56 3x3, batch 32
  Layer<128>("32,56,64,64,3,1", 32, 56, 56, 3, 3, 1, 1, 0.f);
  Layer<64>("32,56,64,64,3,1", 32, 56, 56, 3, 3, 1, 1, 0.f);
  Layer<128>("32,115x112,64,64,4x1,1,0", 32, 115, 112, 4, 1, 0, 0, 0.f);  // the FP8 stem after space-to-depth
  Layer<64>("32,115x112,64,64,4x1,1,0", 32, 115, 112, 4, 1, 0, 0, 0.f);
  return 0;
}
