"""Pipelines are data: a named list of passes split into phases.

Phases, in order: ``canonicalize`` (clean up what importers produce), ``merge``
(cross-model sharing), ``quantize``, ``fuse`` (legalize to TIR and fuse),
``schedule`` (tuned records, then default schedules: backend), ``lower`` (lift
weights, then the backend's dataflow lowering and VM finalization). The backend
supplies ``schedule_passes`` and ``lower_passes``; everything else is shared, so
no file has an ``if target == ...`` ladder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import relax

from .canonicalize_ops import CanonicalizeOps
from .fold_batch_norm import FoldBatchNorm
from .fence_expanding_broadcasts import FenceExpandingBroadcasts
from .fold_constant_layout import FoldConstantLayout
from .fuse_horizontal import FuseHorizontal
from .legalize_grouped_conv import LegalizeGroupedConv
from .lift_weights import LiftWeights
from .manager import Step
from .mixed_precision import ToMixedPrecision
from .merge_common_stems import MergeCommonStems, resolve_shared_inputs
from .quantize_fp8 import Fp8, QuantizeFp8
from .quantize_int8 import Int8, QuantizeInt8
from .quantize_weights import QuantizeWeights, WeightOnly
from .remove_identity_ops import RemoveIdentityOps
from .rewrite_conv_space_to_depth import RewriteConvSpaceToDepth
from .rewrite_reshape_views import RewriteReshapeViews
from .sink_reshapes import SinkReshapes

log = logging.getLogger(__name__)

PHASES = ("canonicalize", "merge", "quantize", "fuse", "schedule", "lower")


@dataclass(frozen=True)
class MergeOptions:
    """How models compiled together share work (issue: merge models).

    ``enabled`` adds the ``__all__`` entry running every model; ``share_inputs`` shares
    inputs of equal name, shape and dtype; ``share`` lists explicit ``("a.x", "b.x")``
    pairs; ``horizontal`` fuses same-shaped layers of different models into one wider op.
    """

    enabled: bool = False
    share_inputs: bool = False
    share: tuple[tuple[str, str], ...] = ()
    horizontal: bool = True


@dataclass(frozen=True)
class PipelineOptions:
    """Options that choose passes (recorded in the artifact manifest)."""

    fold_batch_norm: bool = True
    fuse: bool = True
    precision: str = "float32"  # float16 / bfloat16: ToMixedPrecision in the quantize phase


def canonicalize_passes(opts: PipelineOptions) -> list[tvm.transform.Pass]:
    passes = [RemoveIdentityOps(), FoldConstantLayout, CanonicalizeOps()]
    if opts.fold_batch_norm:
        passes.append(FoldBatchNorm())
    # Whatever BatchNorm FoldBatchNorm could not take (non-constant statistics) is decomposed.
    passes += [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
               relax.transform.DeadCodeElimination()]
    return passes


def merge_passes(models: dict, opts: MergeOptions) -> list[tvm.transform.Pass]:
    """The merge phase for ``models`` ({name: ModelInfo}); empty unless merging two or more."""
    if not opts.enabled:
        return []
    if len(models) < 2:
        log.info("--merge with one model: nothing to merge")
        return []
    shared = resolve_shared_inputs(models, opts.share_inputs, opts.share)
    passes = [MergeCommonStems({m: [t.name for t in info.inputs] for m, info in models.items()}, shared)]
    if opts.horizontal:
        passes.append(FuseHorizontal())
    return passes


def quantize_passes(config: Int8 | Fp8 | WeightOnly | None, models: list[str], int8_weight_limit: int = 127):
    """The quantize phase's passes for ``config`` (``quantize=`` of ``smelt.compile``) over
    ``models``: (the quantizing pass, whose ``report`` the compile report shows, or None; the
    passes before ToMixedPrecision; those after it). Calibrated quantization reads float32;
    weight-only quantization keeps the compute type it finds."""
    if isinstance(config, Int8):
        quantizer = QuantizeInt8(config, models, int8_weight_limit)
        return quantizer, [quantizer], []
    if isinstance(config, Fp8):
        quantizer = QuantizeFp8(config, models)
        if config.convs != "all" or not config.stem:  # None: no compile resolved it for a target
            return quantizer, [quantizer], []
        # A few-channel strided stem becomes an FP8 conv over 16 or more channels.
        return quantizer, [RewriteConvSpaceToDepth(), quantizer], []
    if isinstance(config, WeightOnly):
        quantizer = QuantizeWeights(config, models)
        return quantizer, [], [quantizer]
    return None, [], []


def fuse_passes(opts: PipelineOptions) -> list[tvm.transform.Pass]:
    # TVM's library dispatch picks sort/scan/sampling kernels for the target in scope.
    passes = [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(), LegalizeGroupedConv()]
    if opts.fuse:  # reshapes between a matmul and its epilogue would keep them apart
        passes.append(SinkReshapes())
    passes += [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant()]
    if opts.fuse:
        passes += [FenceExpandingBroadcasts(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    passes += [RewriteReshapeViews(), relax.transform.DeadCodeElimination()]
    return passes


def build_pipeline(backend, target: tvm.target.Target, opts: PipelineOptions | None = None,
                   merge: list | None = None, quantize: list | None = None,
                   after_precision: list | None = None) -> list[Step]:
    """The full pipeline for ``backend`` as a list of ``Step``s. The quantize phase runs
    ``quantize`` (calibrated INT8 reads float32), then ``ToMixedPrecision``, then
    ``after_precision`` (weight-only quantization keeps the compute type it finds)."""
    opts = opts or PipelineOptions()
    phases = {
        "canonicalize": canonicalize_passes(opts),
        "merge": list(merge or []),
        "quantize": list(quantize or []) + ([ToMixedPrecision(opts.precision)] if opts.precision != "float32" else [])
        + list(after_precision or []),
        "fuse": backend.prelegalize_passes(target) + fuse_passes(opts) + backend.postfuse_passes(target),
        "schedule": backend.schedule_passes(target),
        "lower": [LiftWeights] + backend.lower_passes(target),
    }
    return [Step(phase, p) for phase in PHASES for p in phases[phase]]
