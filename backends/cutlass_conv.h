// The CUTLASS kernel type of smelt's FP8 convolution (cutlass_conv.cu), which bench/cutlass_conv_probe.cu
// times in other element types too: CUTLASS's sm90 implicit-GEMM conv (fprop, wgmma, TMA,
// warp-specialized; NHWC activations, KRSC weights) whose epilogue computes
//   D = Act(alpha * conv(A, B) + beta * C + bias)   per output channel bias, in float32.
// Included only by nvcc-built sources (CUTLASS's headers are not on the C++ routines' path).
#pragma once

// CUTLASS's headers in the order of its own tests (the conv builder needs the adapter's first)
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"

namespace smelt_cutlass {

// AB: the operands' element type, Acc: the accumulator's, Out: D's, Res: C's (the residual),
// Bias: the bias's, Act: the activation (ReLu, Clamp, ...), Tile: the CTA tile (M, N, K-block).
template <class AB, class Acc, class Out, class Res, class Bias, template <class> class Act, class Tile>
struct ConvKernel {
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
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

}  // namespace smelt_cutlass
