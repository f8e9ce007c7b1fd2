"""Passes over the unified IR and the pipeline that orders them."""

from .canonicalize_ops import CanonicalizeOps
from .explain import Explainer
from .fold_batch_norm import FoldBatchNorm
from .fold_constant_layout import FoldConstantLayout
from .fuse_horizontal import FuseHorizontal
from .hoist_quantize_over_max_pool import HoistQuantizeOverMaxPool
from .legalize_grouped_conv import LegalizeGroupedConv
from .lift_weights import LiftWeights
from .manager import PassManager, PassTiming, Step
from .merge_common_stems import MERGED, MergeCommonStems, MergeReport, resolve_shared_inputs
from .pipeline import (PHASES, MergeOptions, PipelineOptions, build_pipeline, canonicalize_passes, fuse_passes,
                       merge_passes, quantize_passes)
from .mixed_precision import PRECISIONS, ToMixedPrecision
from .quantize_fp8 import Fp8, QuantizeFp8
from .quantize_int8 import Int8, QuantizeInt8
from .quantize_weights import QuantizeWeights, WeightOnly
from .remove_identity_ops import RemoveIdentityOps
from .rewrite_conv_space_to_depth import RewriteConvSpaceToDepth

__all__ = ["CanonicalizeOps", "Explainer", "FoldBatchNorm", "FoldConstantLayout", "FuseHorizontal", "HoistQuantizeOverMaxPool", "LegalizeGroupedConv", "LiftWeights", "PHASES", "PassManager",
           "MERGED", "MergeCommonStems", "MergeOptions", "MergeReport", "PassTiming", "PipelineOptions", "RemoveIdentityOps", "RewriteConvSpaceToDepth", "Step", "build_pipeline",
           "canonicalize_passes", "fuse_passes", "merge_passes", "quantize_passes", "resolve_shared_inputs", "PRECISIONS",
           "ToMixedPrecision", "Fp8", "Int8", "QuantizeFp8", "QuantizeInt8", "QuantizeWeights", "WeightOnly"]
