"""Compile-time weight repacking around the default CPU schedules; kernel names kept.

Two passes frame the schedules (tuning records, then ``ApplyDefaultSchedules``) on CPUs:

- ``MarkWeightOperands`` (last in the fuse phase, so tuning's tasks carry it too): TVM's
  ``AttachAttrLayoutFreeBuffers`` records on each kernel which parameters are constants
  (``layout_free_buffers``), so a schedule rule or MetaSchedule's ``RewriteLayout`` may pick
  their layout.
- ``FoldWeightPrepack`` (after): TVM's ``SplitLayoutRewritePreproc`` moves the repacking a
  rule marked (``meta_schedule.layout_rewrite_preproc``) into its own function and
  ``FoldConstant`` runs it on the weights, once, at compile time.

Requires: fused PrimFuncs called from Relax with the weights still bound as constants
(before ``LiftWeights``). Guarantees: numbers do not change; each kernel keeps its name
(TVM's copies, ``<name>1_prepacked``, would reach reports and ``--profile``); no unused
function remains.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx


@tvm.transform.module_pass(opt_level=0, name="MarkWeightOperands")
def MarkWeightOperands(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _keep_names(mod, relax.transform.AttachAttrLayoutFreeBuffers()(mod))


@tvm.transform.module_pass(opt_level=0, name="FoldWeightPrepack")
def FoldWeightPrepack(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    # SplitLayoutRewritePreproc sees only the Relax functions and the kernels that repack:
    # it fails on kernels without compute blocks (TVM's cumsum: "There should be a compute
    # block if there is only one subtree under the root") even when they repack nothing.
    packing = {gv for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "layout_free_buffers" in f.attrs
               and _PREPROC in f.script(show_meta=False)}
    if not packing or not any(isinstance(f, relax.Function) for f in mod.functions.values()):
        return mod  # a kernel alone (a tuning task): the builder drops its repacking blocks itself
    rest = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and gv not in packing}
    split = relax.transform.SplitLayoutRewritePreproc()(
        tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in rest}, attrs=mod.attrs,
                     global_infos=mod.global_infos))
    for gv, f in rest.items():
        split[gv] = f
    return _keep_names(mod, relax.transform.FoldConstant()(split))


_PREPROC = "meta_schedule.layout_rewrite_preproc"


def _keep_names(before: tvm.IRModule, after: tvm.IRModule) -> tvm.IRModule:
    """``after`` without dead functions, each kernel renamed to the ``before`` name it was copied from."""
    after = relax.transform.DeadCodeElimination()(after)
    old = {gv.name_hint for gv in before.get_global_vars()}
    live = {gv.name_hint for gv in after.get_global_vars()}
    free = sorted(old - live, key=len, reverse=True)  # longest first: "conv2d1" before "conv2d"
    renames = {}
    for gv, func in after.functions_items():
        name = gv.name_hint
        if not isinstance(func, tirx.PrimFunc) or name in old:
            continue
        stem = name.removesuffix("_prepacked")
        origin = next((o for o in free if stem.startswith(o) and (stem == o or stem[len(o):].isdigit())), None)
        if origin is not None:
            free.remove(origin)
            renames[gv] = relax.BlockBuilder().add_func(func, origin)  # a GlobalVar typed like gv
    return _rename(after, renames) if renames else after


def _rename(mod: tvm.IRModule, renames: dict) -> tvm.IRModule:
    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_global_var_(self, gv):
            return renames.get(gv, gv)

    out = tvm.IRModule(attrs=mod.attrs, global_infos=mod.global_infos)
    mutator = Rename(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            func = mutator.visit_expr(func)
        out[renames.get(gv, gv)] = func
    return out
