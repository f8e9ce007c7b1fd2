// Whether a stride-1 FP8 conv that loads each input pixel into shared memory once per tile (a
// halo tile) beats CUTLASS's implicit GEMM, which loads it once per filter tap (TMA im2col).
//
// Why: bench/cutlass_conv_probe.cu on an H100 times ResNet-50's 3x3 convs at the rate of their
// im2col loads (56x56 64->64: 17.7 us; 128->64: 26.9; 64->128: 30.4; 28x28 128->128: 17.3; e4m3,
// with residual): 3.3-4.3 TB/s of tap loads, the tensor cores at a quarter of their rate. A halo
// tile cuts those loads about 6x at 56x56.
//
// The shifted views: output pixels are numbered along padded rows of WP = W + PW columns (the
// last PW of each row computed and dropped), and shared memory holds the input so numbered. Tap (dr, dc) of output pixel m then reads input
// pixel m + dr * WP + dc: a descriptor starting dr * WP + dc rows later. One TMA box per tile (64
// channels x WP columns x ROWS rows from column -PW; out-of-range pixels arrive as zeros) in TMA's
// 64-byte swizzle, which wgmma reads from any starting row.
//
// The kernel (C = K = 64 only: a measurement, not yet a routine): one thread issues TMA loads
// into 4 buffers, two warpgroups compute alternate tiles, one's epilogue overlapping the other's
// wgmmas (m64n64k32 e4m3 -> f32); D = relu(alpha * acc + bias + beta * residual) in e4m3.
//
// On an H100 (max error 4.65e-2, as CUTLASS's): 56x56 3x3 64->64 in 15.1 us with residual
// (CUTLASS 17.7), 13.1 without (64-pixel tiles: 12.1); the stem's 4x1 conv 28.6 us (CUTLASS 36.7
// in ResNet-50).
// Earlier forms: unswizzled 16-byte channel planes 17.4 us (stem 75); per-thread loads, not TMA,
// 19.2; one warpgroup with cp.async 25.2-36.7. wgmma m64n64k32: 34 cycles from either layout.
//
// Build: nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a \
//        bench/halo_conv_probe.cu -o halo
// Run:   ./halo   (prints "layer variant ms rel_err" for ResNet-50's 56x56 3x3 conv and its stem)

#include <cuda.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    if (cudaError_t e = (x); e != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

constexpr int kC = 64, kK = 64;  // input and output channels
constexpr int kChunks = kC / 16;  // 16-byte channel planes
constexpr int kStages = 4;        // input tiles in flight per CTA

// A stride-1 conv over NHWC e4m3 with KRSC e4m3 weights; output P x Q = (H + 2PH - R + 1) x W.
template <int H_, int W_, int R_, int S_, int PH_, int PW_, int MT_>
struct Shape {
  static constexpr int H = H_, W = W_, R = R_, S = S_, PH = PH_, PW = PW_, MT = MT_;
  static_assert(S == 2 * PW + 1 || (S == 1 && PW == 0), "output width must equal input width");
  static constexpr int P = H + 2 * PH - R + 1, Q = W;
  static constexpr int WP = W + PW;                       // padded row
  static constexpr int PIMG = P * WP;                     // padded output pixels per image
  static constexpr int TILES = (PIMG + MT - 1) / MT;      // tiles per image
  static constexpr int SPAN = MT + (R - 1) * WP + S - 1;  // input pixels a tile reads
  static constexpr int ROWS = (WP - 1 + SPAN + WP - 1) / WP;  // padded rows a tile's box spans
  static constexpr int BOX = ROWS * WP * kC;                   // bytes of a tile's box
  static constexpr int BUF = (BOX + 1023) / 1024 * 1024;
  static constexpr int WBYTES = R * S * kC * kK;
  static constexpr int STAGE_PITCH = kK * 2 + 16;  // fp16 stage row, padded against bank conflicts
  static constexpr int SMEM = 1280 + WBYTES + kStages * BUF + 2 * MT * STAGE_PITCH;  // 1280: barriers
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// K-major wgmma operand in TMA's 64-byte swizzle: 64-byte rows, 8-row groups 512 B apart (SBO).
// Base offset 0 at any start row: the swizzle follows the absolute address, as TMA wrote it (the
// PTX manual's base offset, (addr >> 7) & 7, gave wrong results for odd rows).
__device__ __forceinline__ uint64_t desc_swizzled(uint32_t addr) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t(1) << 16) | (uint64_t(512 >> 4) << 32) | (uint64_t(2) << 62);
}

// K-major unswizzled wgmma operand (the weights): 8-row core matrices 128 B apart (SBO), a k32
// step's two 16-byte halves `plane` bytes apart (LBO).
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t plane) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((plane >> 4) & 0x3FFF) << 16) | (uint64_t(128 >> 4) << 32);
}

__device__ __forceinline__ void wgmma64(float (&d)[32], uint64_t a, uint64_t b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(scale_d));
}

template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, int bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// TMA: the box at coordinates c of the tensor map into shared memory, completing on `bar`
__device__ __forceinline__ void tma_load4(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Warp-specialized: one thread of warpgroup 0 issues the TMA loads; tile j is computed by
// warpgroup 1 + j % 2. The weights, laid out on the host as the wgmmas read them, stay.
template <class L>
__global__ void __launch_bounds__(384, 1) halo_conv(const __grid_constant__ CUtensorMap xmap,
                                                    const uint8_t* __restrict__ w, const __half* __restrict__ bias,
                                                    const uint8_t* __restrict__ res, uint8_t* __restrict__ out,
                                                    float alpha, float beta, int images) {
  extern __shared__ __align__(128) uint8_t smem[];
  // barriers (full[kStages], empty[kStages], weights); weights [tap][chunk][k][16 B]; input
  // buffers [ROWS][WP][64 B] in the 64-byte swizzle; the fp16 stages
  const uint32_t bars_a = (smem_addr(smem) + 7) & ~7u, ws_a = (bars_a + 8 * (2 * kStages + 1) + 1023) & ~1023u;
  const uint32_t bufs_a = ws_a + L::WBYTES;
  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128, total = images * L::TILES;
  const uint32_t full = bars_a, empty = bars_a + 8 * kStages, wbar = bars_a + 16 * kStages;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 1);
    }
    mbar_init(wbar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  }
  __syncthreads();
  const int tiles = total > int(blockIdx.x) ? (total - 1 - blockIdx.x) / gridDim.x + 1 : 0;  // this CTA's

  if (wg == 0) {  // producer
    if (t == 0) {
      mbar_expect(wbar, L::WBYTES);
      bulk_copy(ws_a, w, L::WBYTES, wbar);
      for (int j = 0; j < tiles; ++j) {
        const int s = j % kStages, tile = blockIdx.x + j * gridDim.x, m0 = (tile % L::TILES) * L::MT;
        if (j >= kStages) mbar_wait(empty + 8 * s, (j / kStages - 1) & 1);
        mbar_expect(full + 8 * s, L::BOX);
        // from the tile's first padded row, column -PW
        tma_load4(bufs_a + s * L::BUF, &xmap, 0, -L::PW, m0 / L::WP - L::PH, tile / L::TILES, full + 8 * s);
      }
    }
    return;
  }

  const int c = wg - 1, warp = t / 32, lane = t % 32;
  uint8_t* stage = smem + (bufs_a - smem_addr(smem)) + kStages * L::BUF + c * L::MT * L::STAGE_PITCH;
  float bias_r[16];  // this thread's accumulator columns: 8j + 2(lane % 4) + {0, 1}
#pragma unroll
  for (int i = 0; i < 16; ++i) bias_r[i] = __half2float(bias[8 * (i / 2) + 2 * (lane % 4) + i % 2]);
  mbar_wait(wbar, 0);
  constexpr int MB = L::MT / 64;
  float acc[MB][32];
  for (int j = c; j < tiles; j += 2) {
    const int s = j % kStages, tile = blockIdx.x + j * gridDim.x;
    const int img = tile / L::TILES, m0 = (tile % L::TILES) * L::MT;
    mbar_wait(full + 8 * s, (j / kStages) & 1);
    const uint32_t a0 = bufs_a + s * L::BUF + (m0 % L::WP) * kC;  // the tile's first pixel in the box
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) fence_acc(acc[mb]);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int tap = 0; tap < L::R * L::S; ++tap) {
      const int shift = (tap / L::S) * L::WP + tap % L::S;
#pragma unroll
      for (int kk = 0; kk < kChunks / 2; ++kk) {
        const uint64_t b = desc(ws_a + (tap * kChunks + 2 * kk) * kK * 16, kK * 16);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          const uint64_t a = desc_swizzled(a0 + (mb * 64 + shift) * kC + 32 * kk);
          wgmma64(acc[mb], a, b, (tap | kk) != 0);
        }
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) fence_acc(acc[mb]);
    if (t == 0) mbar_arrive(empty + 8 * s);  // the wgmmas have read the buffer

    // accumulators -> alpha * acc + bias in the fp16 stage
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = mb * 64 + warp * 16 + lane / 4 + 8 * h, col = 8 * jj + 2 * (lane % 4);
          *reinterpret_cast<__half2*>(stage + row * L::STAGE_PITCH + col * 2) =
              __floats2half2_rn(alpha * acc[mb][4 * jj + 2 * h] + bias_r[2 * jj],
                                alpha * acc[mb][4 * jj + 2 * h + 1] + bias_r[2 * jj + 1]);
        }
      }
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
    // stage -> relu(. + beta * res) -> e4m3, 8 channels a thread, padding columns dropped
    constexpr int kPer = L::MT * kK / 8 / 128;
    size_t o[kPer];
    bool keep[kPer];
    uint2 rv[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = t + 128 * u, row = i / (kK / 8), k0 = (i % (kK / 8)) * 8, m = m0 + row;
      const int p = m / L::WP, q = m % L::WP;
      keep[u] = m < L::PIMG && q < L::Q;
      o[u] = ((size_t(img) * L::P + p) * L::Q + q) * kK + k0;
      rv[u] = keep[u] && beta != 0.f ? *reinterpret_cast<const uint2*>(res + o[u]) : make_uint2(0, 0);
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = t + 128 * u, row = i / (kK / 8), k0 = (i % (kK / 8)) * 8;
      const uint4 sv = *reinterpret_cast<const uint4*>(stage + row * L::STAGE_PITCH + k0 * 2);
      const __half2* hv = reinterpret_cast<const __half2*>(&sv);
      const __nv_fp8x2_storage_t* r2 = reinterpret_cast<const __nv_fp8x2_storage_t*>(&rv[u]);
      uint2 ov;
      __nv_fp8x2_storage_t* o2 = reinterpret_cast<__nv_fp8x2_storage_t*>(&ov);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(hv[e]);
        const float2 r = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(r2[e], __NV_E4M3)));
        o2[e] = __nv_cvt_float2_to_fp8x2(make_float2(fmaxf(f.x + beta * r.x, 0.f), fmaxf(f.y + beta * r.y, 0.f)),
                                         __NV_SATFINITE, __NV_E4M3);
      }
      if (keep[u]) *reinterpret_cast<uint2*>(out + o[u]) = ov;
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");  // the stage is free again
  }
}

// The fp32 reference, one thread per output element, from the same e4m3 values.
template <class L>
__global__ void reference(const uint8_t* x, const uint8_t* w, const __half* bias, const uint8_t* res, float alpha,
                          float beta, int images, float* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(images) * L::P * L::Q * kK) return;
  const int k = i % kK, q = (i / kK) % L::Q, p = (i / kK / L::Q) % L::P, n = i / kK / L::Q / L::P;
  auto f8 = [](uint8_t v) { return float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3))); };
  float acc = 0.f;
  for (int r = 0; r < L::R; ++r)
    for (int s = 0; s < L::S; ++s) {
      const int hy = p - L::PH + r, wx = q - L::PW + s;
      if (hy < 0 || hy >= L::H || wx < 0 || wx >= L::W) continue;
      for (int c = 0; c < kC; ++c)
        acc += f8(x[((int64_t(n) * L::H + hy) * L::W + wx) * kC + c]) * f8(w[((k * L::R + r) * L::S + s) * kC + c]);
    }
  out[i] = fmaxf(alpha * acc + __half2float(bias[k]) + beta * f8(res[i]), 0.f);
}

__global__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

template <class T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  CHECK_CUDA(cudaMalloc(&dev, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

uint8_t e4m3(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }

// The input's TMA map: NHWC e4m3 with boxes of 16 channels x WP columns x ROWS rows, one per
// 16-byte channel plane of a tile's buffer ([h][w][16 B], the unswizzled layout the wgmmas read).
template <class L>
CUtensorMap input_map(const uint8_t* x, int images) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  CHECK_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
  const cuuint64_t dims[4] = {kC, cuuint64_t(L::W), cuuint64_t(L::H), cuuint64_t(images)};
  const cuuint64_t strides[3] = {kC, cuuint64_t(L::W) * kC, cuuint64_t(L::H) * L::W * kC};
  const cuuint32_t box[4] = {kC, cuuint32_t(L::WP), cuuint32_t(L::ROWS), 1}, ones[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = reinterpret_cast<Encode>(fn)(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<uint8_t*>(x), dims, strides, box, ones,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", int(r));
    std::exit(1);
  }
  return map;
}

template <class L>
void run(const char* name, int images, float beta) {
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  const size_t nx = size_t(images) * L::H * L::W * kC, nw = size_t(kK) * L::R * L::S * kC,
               nd = size_t(images) * L::P * L::Q * kK;
  std::vector<uint8_t> hx(nx), hw(nw), hr(nd);
  std::vector<__half> hb(kK);
  for (auto& v : hx) v = e4m3(std::max(normal(gen), 0.f));
  for (auto& v : hw) v = e4m3(normal(gen));
  for (auto& v : hb) v = __float2half(normal(gen));
  for (auto& v : hr) v = e4m3(std::max(normal(gen), 0.f));
  const float alpha = 1.f / std::sqrt(float(kC * L::R * L::S));
  // the weights as shared memory holds them
  std::vector<uint8_t> hws(nw);
  for (int k = 0; k < kK; ++k)
    for (int tap = 0; tap < L::R * L::S; ++tap)
      for (int c = 0; c < kC; ++c) hws[((tap * kChunks + c / 16) * kK + k) * 16 + c % 16] = hw[(k * L::R * L::S + tap) * kC + c];
  uint8_t *dx = upload(hx), *dw = upload(hw), *dws = upload(hws), *dr = upload(hr), *dd = nullptr;
  __half* db = upload(hb);
  float* dref = nullptr;
  CHECK_CUDA(cudaMalloc(&dd, nd));
  CHECK_CUDA(cudaMalloc(&dref, nd * sizeof(float)));
  CHECK_CUDA(cudaMemset(dd, 0xFF, nd));  // NaN in e4m3: an output the kernel misses shows

  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK_CUDA(cudaFuncSetAttribute(halo_conv<L>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::SMEM));
  const int grid = std::min(images * L::TILES, sms);
  const CUtensorMap xmap = input_map<L>(dx, images);
  auto launch = [&] { halo_conv<L><<<grid, 384, L::SMEM>>>(xmap, dws, db, dr, dd, alpha, beta, images); };
  launch();
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  reference<L><<<(nd + 255) / 256, 256>>>(dx, dw, db, dr, alpha, beta, images, dref);
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
    spin<<<1, 1>>>(20000000LL);
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < 20; ++i) launch();
    CHECK_CUDA(cudaEventRecord(end));
    CHECK_CUDA(cudaEventSynchronize(end));
    float t = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, end));
    times.push_back(t / 20);
  }
  std::nth_element(times.begin(), times.begin() + 2, times.end());
  std::printf("%s halo-mt%d-%s %.5f %.2e (smem %d B, %d tiles)\n", name, L::MT,
              beta != 0.f ? "res" : "nores", times[2], worst / std::max(scale, 1e-30f), L::SMEM, images * L::TILES);
  std::fflush(stdout);
  for (void* p : {(void*)dx, (void*)dw, (void*)dws, (void*)dr, (void*)dd, (void*)db, (void*)dref}) CHECK_CUDA(cudaFree(p));
}

int main() {
  // ResNet-50's 56x56 3x3 64 -> 64 conv, batch 32
  using C56_64 = Shape<56, 56, 3, 3, 1, 1, 64>;
  using C56_128 = Shape<56, 56, 3, 3, 1, 1, 128>;
  run<C56_128>("32,56,64,64,3,1", 32, 1.f);
  run<C56_128>("32,56,64,64,3,1", 32, 0.f);
  run<C56_64>("32,56,64,64,3,1", 32, 0.f);
  // the FP8 stem's 4x1 conv over 64 space-to-depth channels
  using Stem = Shape<115, 112, 4, 1, 0, 0, 128>;
  run<Stem>("32,115x112,64,64,4x1,1,0", 32, 0.f);
  return 0;
}
