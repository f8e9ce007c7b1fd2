// smelt's halo-tile FP8 convolution for Hopper: stride-1 convs of 64 or 128 input and output
// channels that load each input pixel into shared memory once per tile, where CUTLASS's implicit
// GEMM (cutlass_conv.h) loads it once per filter tap (measurements: bench/halo_conv_probe.cu).
//
// Output pixels are numbered along padded rows of WP = W + PW columns (the last PW of each row are
// computed and dropped), and shared memory holds the tile's input rows in the same numbering: a
// TMA box of 64 channels (a plane; 128 channels are two) x WP columns (from column -PW) x ROWS
// rows, out-of-range pixels zero, in TMA's 64-byte swizzle. Tap (dr, dc) of output pixel m then
// reads input pixel m + dr * WP + dc, a wgmma descriptor that starts dr * WP + dc rows later:
// wgmma applies the swizzle to absolute addresses as TMA wrote it, so the descriptor's base
// offset stays 0 at any row.
//
// 384 threads: one thread of warpgroup 0 loads the OHWI weights of the CTA's 64 output channels
// (128 are two halves, each CTA one) into shared memory as the wgmmas read them ([tap][16-channel
// chunk][k][16 B], one TMA copy), then a TMA load per tile into a ring of buffers; warpgroups
// 1 and 2 compute alternate tiles (wgmma m64n64k32 e4m3 -> f32), one's epilogue overlapping the
// other's wgmmas. Epilogue: y = max(alpha * acc + bias + beta * residual, lower) through a
// float16 stage, 8 channels a thread, to float16 or E4M3 (saturating). The kernel waits on the
// previous grid (griddepcontrol.wait) before it reads activations or writes: it may be launched
// with programmatic dependent launch (the weights start loading before the wait).
//
// Requires: x [N, H, W, C] float8_e4m3fn (NHWC), w [K, R, S, C] (OHWI), C and K 64 or 128, 3x3
// or 4x1 filters, S = 2 * PW + 1, stride 1, WP <= 256, two input buffers in shared memory at least
// (MakePlan).

#pragma once

#include <cuda.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/fast_math.h"

namespace smelt_halo {

// kRow: channels of an input plane (one 64-byte swizzled row a pixel); kN: output channels a CTA
// computes (a 128-channel output is two halves, each CTA keeping one half's weights).
constexpr int kRow = 64, kN = 64, kMaxStages = 4;
constexpr int kMaxSmem = 227 * 1024;

// A problem's tiling for tiles of MT padded output pixels.
struct Plan {
  int n, h, w, c, k, r, s, pad_h, pad_w;
  int planes, halves, wp, p, pimg, tiles, rows, box, plane, buf, wbytes, stage_bytes, stages, smem;
  // A tile's image and first pixel, a pixel's row and column, by multiply-high: a division by a
  // runtime divisor is a loop of some 20 instructions, and each tile needs about five of them.
  cutlass::FastDivmod by_tiles, by_wp;

  // Tile t's image and first padded output pixel, for tiles of mt pixels.
  CUTLASS_HOST_DEVICE void Tile(int t, int mt, int& img, int& m0) const {
    by_tiles(img, m0, t);
    m0 *= mt;
  }
};

// The plan for x [n, h, w, c], w [k, r, s, c] (c, k 64 or 128; 3x3 or 4x1), padding (pad_h,
// pad_w); stages 0 where the kernel does not take the problem.
inline Plan MakePlan(int n, int h, int w, int c, int k, int r, int s, int pad_h, int pad_w, int mt) {
  Plan p = {};
  p.n = n, p.h = h, p.w = w, p.c = c, p.k = k, p.r = r, p.s = s, p.pad_h = pad_h, p.pad_w = pad_w;
  p.planes = c / kRow, p.halves = k / kN;
  p.wp = w + pad_w;
  p.p = h + 2 * pad_h - r + 1;
  p.pimg = p.p * p.wp;
  p.tiles = (p.pimg + mt - 1) / mt;
  p.by_tiles = cutlass::FastDivmod(p.tiles), p.by_wp = cutlass::FastDivmod(p.wp);
  const int span = mt + (r - 1) * p.wp + s - 1;  // input pixels a tile reads
  p.rows = (p.wp - 1 + span + p.wp - 1) / p.wp;  // padded rows its box spans
  p.box = p.rows * p.wp * kRow;  // one plane's
  p.plane = (p.box + 1023) / 1024 * 1024;
  p.buf = p.planes * p.plane;
  p.wbytes = r * s * c * kN;  // one half's
  p.stage_bytes = mt * (kN * 2 + 16);  // float16 rows, padded against bank conflicts
  const int fixed = 1024 + 128 + p.wbytes + 2 * p.stage_bytes;  // alignment, barriers, weights, stages
  if ((c != 64 && c != 128) || (k != 64 && k != 128) || s != 2 * pad_w + 1 || (r * s != 9 && r * s != 4) ||
      p.p <= 0 || p.wp > 256 || p.rows > 256 || n <= 0) {
    return p;
  }
  for (int k = kMaxStages; k >= 2 && !p.stages; --k) {
    if (fixed + k * p.buf <= kMaxSmem) p.stages = k;
  }
  p.smem = fixed + p.stages * p.buf;
  return p;
}

namespace detail {

// A 4-d TMA map of uint8 data (dims innermost first, byte strides of dims 1-3); false where the
// driver cannot make it.
inline bool Map4(const void* data, const cuuint64_t (&dims)[4], const cuuint64_t (&strides)[3],
                 const cuuint32_t (&box)[4], CUtensorMapSwizzle swizzle, CUtensorMap* map) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    const bool ok = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                     &found) == cudaSuccess;
    return ok && found == cudaDriverEntryPointSuccess ? reinterpret_cast<Encode>(fn) : nullptr;
  }();
  const cuuint32_t ones[4] = {1, 1, 1, 1};
  return encode != nullptr &&
         encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void*>(data), dims, strides, box, ones,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// K-major wgmma operand in TMA's 64-byte swizzle: 64-byte rows, 8-row groups 512 B apart.
__device__ __forceinline__ uint64_t DescSwizzled(uint32_t addr) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t(1) << 16) | (uint64_t(512 >> 4) << 32) | (uint64_t(2) << 62);
}

// K-major unswizzled wgmma operand: 8-row core matrices 128 B apart, 16-byte K halves `plane` apart.
__device__ __forceinline__ uint64_t Desc(uint32_t addr, uint32_t plane) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((plane >> 4) & 0x3FFF) << 16) | (uint64_t(128 >> 4) << 32);
}

__device__ __forceinline__ void Wgmma(float (&d)[32], uint64_t a, uint64_t b, int scale_d) {
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
__device__ __forceinline__ void FenceAcc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void MbarWait(uint32_t bar, int parity) {
  asm volatile("{\n.reg .pred p;\nW%=:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W%=;\n}\n"
               ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void MbarExpect(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void TmaLoad4(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// 8 outputs: float16 or E4M3 (saturating).
template <bool kFp8>
__device__ __forceinline__ void Store8(void* dst, const float (&f)[8]) {
  if constexpr (kFp8) {
    uint2 v;
    __nv_fp8x2_storage_t* o = reinterpret_cast<__nv_fp8x2_storage_t*>(&v);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      o[e] = __nv_cvt_float2_to_fp8x2(make_float2(f[2 * e], f[2 * e + 1]), __NV_SATFINITE, __NV_E4M3);
    *reinterpret_cast<uint2*>(dst) = v;
  } else {
    uint4 v;
    __half2* o = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = __floats2half2_rn(f[2 * e], f[2 * e + 1]);
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

// 8 residual values, float16 or E4M3, as they sit in memory (E4M3 in the low 8 bytes).
template <bool kFp8>
__device__ __forceinline__ uint4 LoadResidual8(const void* src) {
  if constexpr (kFp8) {
    const uint2 v = *reinterpret_cast<const uint2*>(src);
    return make_uint4(v.x, v.y, 0, 0);
  } else {
    return *reinterpret_cast<const uint4*>(src);
  }
}

// f += beta * LoadResidual8's values.
template <bool kFp8>
__device__ __forceinline__ void AddResidual8(const uint4& v, float beta, float (&f)[8]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 t = kFp8 ? __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(
                                reinterpret_cast<const __nv_fp8x2_storage_t*>(&v)[e], __NV_E4M3)))
                          : __half22float2(reinterpret_cast<const __half2*>(&v)[e]);
    f[2 * e] += beta * t.x;
    f[2 * e + 1] += beta * t.y;
  }
}

}  // namespace detail

// The TMA map of x [n, h, w, c] that the kernel loads its tiles through: boxes of 64 channels (a
// plane) x WP columns x ROWS rows in the 64-byte swizzle.
inline bool InputMap(const void* x, const Plan& p, CUtensorMap* map) {
  return detail::Map4(x, {cuuint64_t(p.c), cuuint64_t(p.w), cuuint64_t(p.h), cuuint64_t(p.n)},
                      {cuuint64_t(p.c), cuuint64_t(p.w) * p.c, cuuint64_t(p.h) * p.w * p.c},
                      {kRow, cuuint32_t(p.wp), cuuint32_t(p.rows), 1}, CU_TENSOR_MAP_SWIZZLE_64B, map);
}

// The TMA map of w [k, r, s, c] that reads one half's weights in the order the wgmmas read them:
// dims (16 bytes, k, 16-channel chunk, tap), one box a half ([tap][chunk][k][16 B] in shared
// memory, the strides out of order: TMA walks them as given).
inline bool WeightMap(const uint8_t* w, const Plan& p, CUtensorMap* map) {
  const int taps = p.r * p.s;
  return detail::Map4(w, {16, cuuint64_t(p.k), cuuint64_t(p.c / 16), cuuint64_t(taps)},
                      {cuuint64_t(taps) * p.c, 16, cuuint64_t(p.c)},
                      {16, kN, cuuint32_t(p.c / 16), cuuint32_t(taps)}, CU_TENSOR_MAP_SWIZZLE_NONE, map);
}

// The kernel for tiles of MT output pixels, kTaps = R * S taps (unrolled: a loop of wgmmas gets
// warpgroup arrives between them) and kPlanes 64-channel input planes; res is read only where
// beta != 0. CTA b computes output half b % halves of tiles b / halves, + ctas, + 2 ctas, ...
template <bool kOutFp8, bool kResFp8, int MT, int kTaps, int kPlanes>
__global__ void __launch_bounds__(384, 1)
    HaloConv(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap,
             const float* __restrict__ bias, const void* __restrict__ res, void* __restrict__ out, float alpha,
             float beta, float lower, Plan pl) {
  using namespace detail;
  extern __shared__ __align__(128) uint8_t smem[];
  const int stages = pl.stages;
  // barriers (full, empty, weights), then 1024-byte aligned: weights, input buffers, stages
  const uint32_t base = SmemAddr(smem), bars = (base + 7) & ~7u;
  const uint32_t ws = (bars + 8 * (2 * kMaxStages + 1) + 1023) & ~1023u, bufs = ws + pl.wbytes;
  const uint32_t full = bars, empty = bars + 8 * kMaxStages, wbar = bars + 16 * kMaxStages;
  constexpr int kChunks = kPlanes * kRow / 16;  // 16-channel chunks of the input channels
  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128, total = pl.n * pl.tiles;
  const int half = blockIdx.x % pl.halves, cta = blockIdx.x / pl.halves, ctas = gridDim.x / pl.halves;
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) {
      MbarInit(full + 8 * s, 1);
      MbarInit(empty + 8 * s, 1);
    }
    MbarInit(wbar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  }
  __syncthreads();
  const int tiles = total > cta ? (total - 1 - cta) / ctas + 1 : 0;

  if (wg == 0) {  // producer
    // The weights are constants: their load starts before the previous grid is waited on, and the
    // first tiles' loads are in flight before it lands (else two memory latencies before a wgmma).
    // One TMA copy (H100, 56x56 64->64: 18.0 us; a gather of 16-byte pieces by the warpgroup ran
    // 18.4 in shared memory's order, 19.9 in OHWI order).
    if (t == 0) {
      MbarExpect(wbar, pl.wbytes);
      TmaLoad4(ws, &wmap, 0, half * kN, 0, 0, wbar);
    }
    asm volatile("griddepcontrol.wait;\n" ::: "memory");  // the previous kernel's results visible
    // tile j in stage s; the stage's previous tile freed it when `empty` completed phase `phase`
    for (int j = 0, s = 0, phase = 1; t == 0 && j < tiles; ++j) {
      int img, m0;
      pl.Tile(cta + j * ctas, MT, img, m0);
      if (j >= stages) MbarWait(empty + 8 * s, phase);
      MbarExpect(full + 8 * s, kPlanes * pl.box);
      // each plane from the tile's first padded row, column -PW
#pragma unroll
      for (int c0 = 0; c0 < kPlanes; ++c0)
        TmaLoad4(bufs + s * pl.buf + c0 * pl.plane, &xmap, c0 * kRow, -pl.pad_w, pl.by_wp.div(m0) - pl.pad_h, img,
                 full + 8 * s);
      if (++s == stages) s = 0, phase ^= 1;
    }
    return;
  }

  const int c = wg - 1, warp = t / 32, lane = t % 32;
  __half* stage = reinterpret_cast<__half*>(smem + (bufs - base) + stages * pl.buf + c * pl.stage_bytes);
  constexpr int kPitch = kN + 8;  // halves per stage row: 144 bytes, conflict-free writes and reads
  float bias_r[16];               // this thread's accumulator columns: 8j + 2(lane % 4) + {0, 1}
#pragma unroll
  for (int i = 0; i < 16; ++i) bias_r[i] = bias[half * kN + 8 * (i / 2) + 2 * (lane % 4) + i % 2];
  int shifts[kTaps];  // tap (dr, dc) reads dr * WP + dc rows later
#pragma unroll
  for (int tap = 0, dr = 0, dc = 0; tap < kTaps; ++tap) {
    shifts[tap] = dr * pl.wp + dc;
    if (++dc == pl.s) dc = 0, ++dr;
  }
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // the residual visible, the output free to write
  MbarWait(wbar, 0);
  constexpr int MB = MT / 64;
  float acc[MB][32];
  // tile j (this warpgroup's: every second) in stage s, loaded when `full` completes phase `phase`;
  // tile c in stage c, phase 0, as MakePlan gives at least two stages
  int s = c, phase = 0;
  for (int j = c; j < tiles; j += 2) {
    int img, m0;
    pl.Tile(cta + j * ctas, MT, img, m0);
    MbarWait(full + 8 * s, phase);
    const uint32_t a0 = bufs + s * pl.buf + pl.by_wp.rem(m0) * kRow;  // the tile's first pixel in the box
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) FenceAcc(acc[mb]);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int tap = 0; tap < kTaps; ++tap) {
      const int shift = shifts[tap];
#pragma unroll
      for (int kk = 0; kk < kChunks / 2; ++kk) {
        const uint64_t b = Desc(ws + (tap * kChunks + 2 * kk) * kN * 16, kN * 16);
        const uint32_t a = a0 + (kk / 2) * pl.plane + shift * kRow + 32 * (kk % 2);  // plane kk / 2
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) Wgmma(acc[mb], DescSwizzled(a + mb * 64 * kRow), b, (tap | kk) != 0);
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) FenceAcc(acc[mb]);
    if (t == 0) MbarArrive(empty + 8 * s);  // the wgmmas have read the buffer
    for (s += 2; s >= stages; s -= stages) phase ^= 1;

    // This thread's outputs: rows r0 + 16u of the tile, channels k0..k0+7; their residual loads
    // are issued first, so that their latency overlaps the stage's writes. Row u + 1 is 16 padded
    // pixels on (one division a tile, not one an output).
    constexpr int kPer = MT * kN / 8 / 128, kRowStep = 128 / (kN / 8);
    const int r0 = t / (kN / 8), k0 = (t % (kN / 8)) * 8;
    int p, q;
    pl.by_wp(p, q, m0 + r0);
    size_t o[kPer];
    bool keep[kPer];
    uint4 rv[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      keep[u] = m0 + r0 + kRowStep * u < pl.pimg && q < pl.w;
      o[u] = ((size_t(img) * pl.p + p) * pl.w + q) * pl.k + half * kN + k0;
      rv[u] = keep[u] && beta != 0.f
                  ? LoadResidual8<kResFp8>(static_cast<const uint8_t*>(res) + o[u] * (kResFp8 ? 1 : 2))
                  : make_uint4(0, 0, 0, 0);
      for (q += kRowStep; q >= pl.wp; q -= pl.wp) ++p;
    }
    // accumulators -> alpha * acc + bias in the float16 stage
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = mb * 64 + warp * 16 + lane / 4 + 8 * h, col = 8 * jj + 2 * (lane % 4);
          *reinterpret_cast<__half2*>(stage + row * kPitch + col) =
              __floats2half2_rn(alpha * acc[mb][4 * jj + 2 * h] + bias_r[2 * jj],
                                alpha * acc[mb][4 * jj + 2 * h + 1] + bias_r[2 * jj + 1]);
        }
      }
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
    // stage -> clamp(. + beta * residual) -> y, padding columns dropped
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const uint4 sv = *reinterpret_cast<const uint4*>(stage + (r0 + kRowStep * u) * kPitch + k0);
      float f[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 v = __half22float2(reinterpret_cast<const __half2*>(&sv)[e]);
        f[2 * e] = v.x, f[2 * e + 1] = v.y;
      }
      if (beta != 0.f) AddResidual8<kResFp8>(rv[u], beta, f);
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = fmaxf(f[e], lower);
      if (keep[u]) Store8<kOutFp8>(static_cast<uint8_t*>(out) + o[u] * (kOutFp8 ? 1 : 2), f);
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");  // the stage is free again
  }
}

// Launches the kernel for MakePlan's plan p (tiles of MT) on ``stream``, with programmatic dependent
// launch where ``pdl``; false where it does not take the problem or the launch fails.
template <bool kOutFp8, bool kResFp8, int MT>
bool Run(const Plan& p, const void* x, const uint8_t* w, const float* bias, const void* res, void* out, float alpha,
         float beta, float lower, int sm_count, cudaStream_t stream, bool pdl) {
  CUtensorMap xmap, wmap;
  if (p.stages == 0 || !InputMap(x, p, &xmap) || !WeightMap(w, p, &wmap)) return false;
  // 3x3 (ResNet's) and 4x1 (the FP8 stem after space-to-depth) filters
  auto kernel = p.planes == 1 ? HaloConv<kOutFp8, kResFp8, MT, 9, 1> : HaloConv<kOutFp8, kResFp8, MT, 9, 2>;
  if (p.r * p.s == 4) {
    kernel = p.planes == 1 ? HaloConv<kOutFp8, kResFp8, MT, 4, 1> : HaloConv<kOutFp8, kResFp8, MT, 4, 2>;
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem) != cudaSuccess) return false;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl;
  const int ctas = p.n * p.tiles < sm_count / p.halves ? p.n * p.tiles : sm_count / p.halves;  // per half
  cudaLaunchConfig_t config = {dim3(ctas * p.halves), dim3(384), size_t(p.smem), stream, attr, 1};
  return cudaLaunchKernelEx(&config, kernel, xmap, wmap, bias, res, out, alpha, beta, lower, p) == cudaSuccess;
}

}  // namespace smelt_halo
