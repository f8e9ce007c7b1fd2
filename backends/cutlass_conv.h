// The CUTLASS kernel types of smelt's FP8 convolution (cutlass_conv.cu), which bench/cutlass_conv_probe.cu
// times in other element types too, both with the epilogue
//   D = Act(alpha * conv(A, B) + beta * C + bias)   per output channel bias, in float32:
// - ConvKernel: CUTLASS's sm90 implicit-GEMM conv (fprop, wgmma, TMA, warp-specialized; NHWC
//   activations, KRSC weights). CUTLASS 4.2 has no persistent schedule for convolutions: each CTA
//   computes one output tile, and its epilogue overlaps no main loop.
// - PersistentConvKernel: that conv's main loop in CUTLASS's persistent GEMM kernels (ping-pong,
//   cooperative, stream-K), through ConvAsGemmMainloop.
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

// CUTLASS 4.2's sm90 stream-K scheduler does not compile where kernels signal the next grid early
// (CUTLASS_ENABLE_GDC_FOR_SM90, which smelt's kernels are built with): its const is_last_tile passes
// a member to a non-const reference (sm90_tile_scheduler_stream_k.hpp:337). For the tile shapes
// a source names (SMELT_STREAM_K_IS_LAST_TILE(128, 128, 128), once per program), this
// specialization computes the same from a copy.
#define SMELT_STREAM_K_IS_LAST_TILE(M, N, K)                                                                    \
  template <>                                                                                                   \
  CUTLASS_DEVICE bool cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamK<                        \
      cute::Shape<cute::_##M, cute::_##N, cute::_##K>, cute::Shape<cute::_1, cute::_1, cute::_1>>::is_last_tile( \
      WorkTileInfo work_tile_info, uint32_t advance_count) const {                                              \
    if (continue_current_work(work_tile_info)) return false;                                                    \
    uint32_t unit_iter_start = unit_iter_start_;                                                                \
    return not get_current_work_for_linear_idx(                                                                 \
               unit_iter_start,                                                                                 \
               current_work_linear_idx_ + uint64_t(gridDim.x) * gridDim.y * gridDim.z * advance_count,          \
               block_id_in_cluster_, scheduler_params)                                                          \
                .is_valid();                                                                                    \
  }

namespace smelt_cutlass {

// AB: the operands' element type, Acc: the accumulator's, Out: D's, Res: C's (the residual),
// Bias: the bias's, Act: the activation (ReLu, Clamp, ...), Tile: the CTA tile (M, N, K-block).
// EpiTile: as PersistentEpilogue's (64 rows: this epilogue's schedule is ping-pong's).
template <class AB, class Acc, class Out, class Res, class Bias, template <class> class Act, class Tile,
          class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct ConvKernel {
  static constexpr bool kGemm = false;
  static constexpr bool kPersistent = false;
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, Out, float, Bias, Res>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, EpiTile, Acc, float, Res,
      cutlass::layout::TensorNHWC,
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

// The persistent kernels' epilogue (the ConvKernel's, over D and C as row-major [M, N] matrices:
// NHWC, packed), for ping-pong or cooperative schedules. ``EpiTile``: the sub-tile of the output
// tile it loads C, computes and stores D by (64 rows for ping-pong, 128 for cooperative); CUTLASS
// picks 64x64 (ping-pong, 8-bit D) or 128x32 (cooperative) by default. Each sub-tile is a TMA box
// whose rows are contiguous for only as many bytes as its columns are wide.
template <class Acc, class Out, class Res, class Bias, template <class> class Act, class Tile, class Cluster,
          bool kPingpong, class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
using PersistentEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, EpiTile,
    Acc, float, Res, cutlass::layout::RowMajor, 16 / sizeof(Res), Out, cutlass::layout::RowMajor, 16 / sizeof(Out),
    cute::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                        cutlass::epilogue::TmaWarpSpecializedCooperative>,
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, Out, float, Bias, Res>>::CollectiveOp;

// CUTLASS's sm90 implicit-GEMM conv mainloop (TMA im2col loads of NHWC activations) presented as
// a GEMM mainloop, so that CUTLASS's persistent GEMM kernels run convolutions. CUTLASS 4.2 runs its
// conv mainloop in its non-persistent kernel only (the ping-pong and cooperative conv schedule tags
// exist, no kernel takes them), where a CTA's epilogue and its next tile's loads never overlap: on
// an H100, 56x56 64->64 3x3 convs at batch 32 took 0.028 ms against a 0.006 ms floor. The GEMM kernel
// sees a flat (M, N, K, L) problem (M = N*P*Q output pixels, K = R*S*C); the conv's own shape, whose
// K mode is (C, S, R), travels in the arguments, and its tile coordinates are the ones CUTLASS's
// conv kernel gives it. The kernel's view of A and B adds the batch mode L (of size 1) that GEMM
// kernels index; the loads use the conv's own.
template <class Conv, class KernelSchedule>
struct ConvAsGemmMainloop : Conv {
  struct DispatchPolicy : Conv::DispatchPolicy {
    using Schedule = KernelSchedule;
  };
  static constexpr int NumProducerThreadEvents = 1;  // the one thread that issues the TMA loads
  // The kernel's tile (M, N, K-block) flat, as its tile schedulers count K-blocks; the conv's keeps
  // its K mode nested, which its loads tile (C, S, R) by.
  using TileShape = cute::Shape<decltype(cute::get<0>(typename Conv::TileShape{})),
                                decltype(cute::get<1>(typename Conv::TileShape{})),
                                decltype(cute::size<2>(typename Conv::TileShape{}))>;
  using ConvProblem = typename Conv::ProblemShape;
  using ShapeMNKL = decltype(Conv::get_problem_shape_MNKL(ConvProblem{}));  // (N*P*Q, K, (C, S, R), 1)

  struct Arguments : Conv::Arguments {
    ConvProblem problem;
  };
  struct Params {
    typename Conv::Params conv;
    ShapeMNKL shape;
    uint32_t tma_transaction_bytes = Conv::TmaTransactionBytes;
  };
  // The GEMM kernel asserts [M, K, L] strides; the conv's (im2col) ones are in its TMA descriptors.
  using StrideA = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideB = cute::Stride<int64_t, cute::_1, int64_t>;

  template <class GemmShape>
  static Params to_underlying_arguments(GemmShape const&, Arguments const& args, void* workspace) {
    return {Conv::to_underlying_arguments(args.problem, args, workspace), Conv::get_problem_shape_MNKL(args.problem)};
  }
  template <class GemmShape>
  static bool can_implement(GemmShape const&, Arguments const& args) {
    return Conv::can_implement(args.problem, args);
  }
  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Conv::prefetch_tma_descriptors(params.conv);
  }
  // (A, B with an L mode: shapes for the kernel's tile arithmetic; A, B: the conv's, for the loads)
  template <class GemmShape>
  CUTLASS_DEVICE auto load_init(GemmShape const&, Params const& params) {
    auto [gA, gB] = Conv::load_init(params.shape, params.conv);  // (BLK_M,BLK_K,m,k), (BLK_N,BLK_K,n,k)
    auto with_l = [](auto const& t) { return cute::make_identity_tensor(cute::append(t.shape(), cute::_1{})); };
    return cute::make_tuple(with_l(gA), with_l(gB), gA, gB);
  }
  template <class Inputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, typename Conv::MainloopPipeline pipeline,
                           typename Conv::PipelineState state, Inputs const& inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           typename Conv::TensorStorage& shared_tensors) {
    Conv::load(params.conv, pipeline, state, cute::make_tuple(cute::get<2>(inputs), cute::get<3>(inputs)), blk_coord,
               k_tile_iter, k_tile_count, thread_idx, block_rank_in_cluster, shared_tensors);
  }
  template <class Accumulators>
  CUTLASS_DEVICE void mma(typename Conv::MainloopPipeline pipeline, typename Conv::PipelineState state,
                          Accumulators& accum, int k_tile_count, int thread_idx,
                          typename Conv::TensorStorage& shared_tensors, Params const& params) {
    Conv::mma(pipeline, state, accum, k_tile_count, thread_idx, shared_tensors, params.conv);
  }
};

// A conv (the ConvKernel's problem and epilogue) in CUTLASS's persistent GEMM kernels: ping-pong
// (two consumer warp groups on two output tiles, one's epilogue running while the other's main
// loop does) or cooperative (both on one tile), the producer warp loading the next tile meanwhile;
// one CTA per SM. ``Scheduler`` as GemmKernel's (stream-K: cooperative only).
template <class AB, class Acc, class Out, class Res, class Bias, template <class> class Act, class Tile,
          bool kPingpong = true, class Scheduler = void,
          class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct PersistentConvKernel {
  static constexpr bool kGemm = false;
  static constexpr bool kPersistent = true;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using FlatTile = cute::Shape<decltype(cute::get<0>(Tile{})), decltype(cute::get<1>(Tile{})),
                               decltype(cute::size<2>(Tile{}))>;
  // D and C as [N*P*Q, K] matrices
  using Epilogue = PersistentEpilogue<Acc, Out, Res, Bias, Act, FlatTile, Cluster, kPingpong, EpiTile>;
  // the persistent kernels' barriers and scheduler state besides the epilogue's
  static constexpr int kCarveout = static_cast<int>(sizeof(typename Epilogue::SharedStorage)) + 1024;
  // CUTLASS's builder makes the conv mainloop for its non-persistent kernel: one warp group per
  // tile, as ping-pong's; the cooperative kernel's two share a tile, along M.
  using Built = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, AB,
      cutlass::layout::TensorNHWC, 16 / sizeof(AB), AB, cutlass::layout::TensorNHWC, 16 / sizeof(AB), Acc, Tile,
      Cluster, cutlass::conv::collective::StageCountAutoCarveout<kCarveout>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using CooperativeMma = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<AB, AB, Acc, Tile, cute::GMMA::Major::K, cute::GMMA::Major::K>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using Conv = cute::conditional_t<
      kPingpong, Built,
      cutlass::conv::collective::CollectiveConv<
          typename Built::DispatchPolicy, Tile, AB, AB, CooperativeMma,
          cutlass::conv::collective::detail::Sm90ImplicitGemmTileTraits<typename Built::GmemTiledCopyA,
                                                                         typename Built::SmemLayoutA>,
          cutlass::conv::collective::detail::Sm90ImplicitGemmTileTraits<typename Built::GmemTiledCopyB,
                                                                         typename Built::SmemLayoutB>>>;
  using Schedule = cute::conditional_t<kPingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                       cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using Mainloop = ConvAsGemmMainloop<Conv, Schedule>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Adapter = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  using Problem = typename Mainloop::ConvProblem;

  // ConvKernel::Arguments's, and the persistent grid's SM count. The GEMM's K counts the K-blocks
  // the conv's loads make (C rounded up to whole K-blocks, times R*S), as the tile schedulers do.
  static typename Adapter::Arguments Arguments(int n, int h, int w, int c, int k, int r, int s, int pad_h,
                                               int pad_w, int stride_h, int stride_w, const AB* x, const AB* weight,
                                               const Res* res, Out* d, int sm_count) {
    Problem problem(cutlass::conv::Mode::kCrossCorrelation, {n, h, w, c}, {k, r, s, c}, {pad_h, pad_w},
                    {pad_h, pad_w}, {stride_h, stride_w}, {1, 1}, 1);
    int m = problem.shape_C[0] * problem.shape_C[1] * problem.shape_C[2];
    constexpr int kBlock = cute::size<2>(Tile{});
    int gemm_k = (c + kBlock - 1) / kBlock * kBlock * r * s;
    using cutlass::make_cute_packed_stride;
    typename Kernel::StrideC stride_c = make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(m, k, 1));
    typename Kernel::StrideD stride_d = make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, k, 1));
    typename Mainloop::Arguments mainloop{{x, weight}, problem};
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = sm_count;
    typename Adapter::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {m, k, gemm_k, 1}, mainloop,
                                     {{}, res, stride_c, d, stride_d}, hw};
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
          class Cluster, bool kPingpong, class Scheduler = void,
          class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct GemmKernel {
  static constexpr bool kGemm = true;
  static constexpr bool kPersistent = true;
  static constexpr bool kFp8 = cute::is_same_v<AB, cutlass::float_e4m3_t>;
  using MainloopSchedule = cute::conditional_t<
      kPingpong,
      cute::conditional_t<kFp8, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                          cutlass::gemm::KernelTmaWarpSpecializedPingpong>,
      cute::conditional_t<kFp8, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperative>>;
  using Epilogue = PersistentEpilogue<Acc, Out, Res, Bias, Act, Tile, Cluster, kPingpong, EpiTile>;
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
