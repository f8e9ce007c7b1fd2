// The CUTLASS kernel types of smelt's FP8 convolution (cutlass_conv.cu), which bench/cutlass_conv_probe.cu
// times in other element types too, both with the epilogue
//   D = Act(alpha * conv(A, B) + beta * C + bias)   per output channel bias, in float32:
// - ConvKernel: CUTLASS's sm90 implicit-GEMM conv (fprop, wgmma, TMA, warp-specialized; NHWC
//   activations, KRSC weights). CUTLASS 4.2 has no persistent schedule for convolutions: each CTA
//   computes one output tile, and its epilogue overlaps no main loop.
// - GemmKernel: CUTLASS's sm90 persistent GEMM, for the 1x1 stride-1 convs, which are GEMMs in
//   NHWC ([N*H*W, C] x [K, C]^T). Its ping-pong schedule runs one warp group's epilogue while the
//   other's main loop runs: ResNet's 1x1 convs reduce over 64 to 512 channels, one to four K-blocks,
//   so the epilogue (writing a 128x128 tile) is as long as the main loop.
// Included only by nvcc-built sources (CUTLASS's headers are not on the C++ routines' path).
#pragma once

// The kernels wait on the previous grid (griddepcontrol.wait) before touching global memory, so that
// they can be launched with programmatic dependent launch (cutlass_conv.cu); without it the wait
// is a no-op.
#define CUTLASS_ENABLE_GDC_FOR_SM90 1

// CUTLASS's headers in the order of its own tests (the conv builder needs the adapter's first)
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"

namespace smelt_cutlass {

// AB: the operands' element type, Acc: the accumulator's, Out: D's, Res: C's (the residual),
// Bias: the bias's, Act: the activation (ReLu, Clamp, ...), Tile: the CTA tile (M, N, K-block).
template <class AB, class Acc, class Out, class Res, class Bias, template <class> class Act, class Tile>
struct ConvKernel {
  static constexpr bool kGemm = false;
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, Out, float, Bias, Res>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, float, Res, cutlass::layout::TensorNHWC,
      16 / sizeof(Res), Out, cutlass::layout::TensorNHWC, 16 / sizeof(Out), cutlass::epilogue::TmaWarpSpecialized,
      Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, AB,
      cutlass::layout::TensorNHWC, 16 / sizeof(AB), AB, cutlass::layout::TensorNHWC, 16 / sizeof(AB), Acc, Tile,
      Cluster,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Adapter = cutlass::conv::device::ConvUniversalAdapter<Kernel>;  // the operator that runs it

  // The arguments for x [n, h, w, c] (NHWC) and weights [k, r, s, c] (KRSC), padded on both sides
  // and strided per axis, dilation 1; D and C are NHWC. The epilogue's parameters are the caller's.
  static typename Adapter::Arguments Arguments(int n, int h, int w, int c, int k, int r, int s, int pad_h,
                                               int pad_w, int stride_h, int stride_w, const AB* x, const AB* weight,
                                               const Res* res, Out* d) {
    Problem problem(cutlass::conv::Mode::kCrossCorrelation, {n, h, w, c}, {k, r, s, c}, {pad_h, pad_w},
                    {pad_h, pad_w}, {stride_h, stride_w}, {1, 1}, 1);
    typename Kernel::StrideC stride_c;
    typename Kernel::StrideD stride_d;
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_c) = problem.stride_C[Problem::RankT - 2 - i];
      cute::get<0, i>(stride_d) = problem.stride_C[Problem::RankT - 2 - i];
    });
    // a named local: GCC 12 fails (internal compiler error) on this braced list as a return value
    typename Adapter::Arguments args{problem, {x, weight}, {{}, res, stride_c, d, stride_d}};
    return args;
  }
};

// The same epilogue on a GEMM D[M, N] = A[M, K] B[N, K]^T (both K-major, D row-major), persistent:
// ping-pong (two warp groups on two tiles) or cooperative (both on one tile), over clusters of
// ``Cluster`` CTAs (a 1x2 cluster multicasts A's tile to both CTAs). ``Scheduler``: CUTLASS's tile
// scheduler tag (void: whole output tiles; cutlass::gemm::StreamKScheduler, cooperative only:
// units of K-blocks, partial tiles summed in the workspace, which each launch must clear). FP8
// operands accumulate in the tensor cores' own precision (CUTLASS's FP8FastAccum), as the conv
// kernel's do.
template <class AB, class Acc, class Out, class Res, class Bias, template <class> class Act, class Tile,
          class Cluster, bool kPingpong, class Scheduler = void>
struct GemmKernel {
  static constexpr bool kGemm = true;
  static constexpr bool kFp8 = cute::is_same_v<AB, cutlass::float_e4m3_t>;
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, Out, float, Bias, Res>;
  using EpilogueSchedule = cute::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                                               cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using MainloopSchedule = cute::conditional_t<
      kPingpong,
      cute::conditional_t<kFp8, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                          cutlass::gemm::KernelTmaWarpSpecializedPingpong>,
      cute::conditional_t<kFp8, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperative>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, float, Res, cutlass::layout::RowMajor, 16 / sizeof(Res),
      Out, cutlass::layout::RowMajor, 16 / sizeof(Out), EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, AB, cutlass::layout::RowMajor, 16 / sizeof(AB), AB,
      cutlass::layout::ColumnMajor, 16 / sizeof(AB), Acc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  // CUTLASS's conv adapter launches any 3.x kernel; its GEMM adapter would bring in the 2.x
  // GemmUniversal, whose partial specialization then matches the conv kernels' base as well.
  using Adapter = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  // The arguments for M x N x K (strides packed), the epilogue's parameters left to the caller.
  static typename Adapter::Arguments Arguments(int m, int n, int k, const AB* a, const AB* b, const Res* c, Out* d,
                                               int sm_count) {
    using cutlass::make_cute_packed_stride;
    typename Kernel::StrideA stride_a = make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1));
    typename Kernel::StrideB stride_b = make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1));
    typename Kernel::StrideC stride_c = make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(m, n, 1));
    typename Kernel::StrideD stride_d = make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, 1));
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = sm_count;
    return {cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k, 1}, {a, stride_a, b, stride_b},
            {{}, c, stride_c, d, stride_d}, hw};
  }
};

}  // namespace smelt_cutlass
