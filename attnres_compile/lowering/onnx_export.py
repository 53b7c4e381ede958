"""ONNX export (SPEC section 6): one `attnres::DepthAttention` node per site.

The node takes the M sources stacked as one [M, ..., D] input (ONNX functions have a fixed
arity, and one function serving every source count is simpler for runtimes than one overload
per M), the query [D] and the gain [D]; attributes `eps` and `scale`; output h [..., D].

The exporter sees an opaque custom-domain op (so none of its passes can inline it away); the
model-local function of the same name and domain, whose body uses standard ONNX ops only, is
attached afterwards. Stock onnxruntime runs the function; a runtime with a fused kernel can
claim the node by its name and domain. `inline=True` expands the function for runtimes
without function support.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

DOMAIN = "attnres"
OP_TYPE = "DepthAttention"
DOMAIN_VERSION = 1
ONNX_OPSET = 20  # the default of torch 2.13's exporter; the function body imports the same


@lru_cache(maxsize=1)
def _onnxscript_parts():
    """Build (function, custom-op handle) lazily: onnxscript is only needed for export."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset20 as op

    attnres = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        doc="Depth attention over stacked sources (arXiv 2603.15031): softmax_j(w.(g*v_j/rms(v_j))) mixing of v_j",
        inputs=[OpSchema.FormalParameter("sources", "T", "[M, ..., D] stacked sources"),
                OpSchema.FormalParameter("query", "W", "[D] pseudo-query"),
                OpSchema.FormalParameter("norm_weight", "W", "[D] key RMSNorm gain")],
        outputs=[OpSchema.FormalParameter("h", "T", "[..., D]")],
        type_constraints=[("T", floats, "storage type"), ("W", floats, "parameter type")],
        attributes=[OpSchema.Attribute("eps", OpSchema.AttrType.FLOAT, "RMS epsilon"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "output multiplier")],
    )
    custom_op = onnxscript.values.Op(attnres, OP_TYPE, op_schema=schema)

    @onnxscript.script(attnres, default_opset=op)
    def DepthAttention(sources, query, norm_weight, eps: float, scale: float):
        # float32 math whatever the storage type (SPEC section 2), result cast back. Written to
        # touch the [M, ..., D] sources few times: a MatMul gives w.(g*v_j), ReduceSumSquare
        # gives |v_j|^2, and 1/rms is applied to the [M, ..., 1] logits, not to v.
        v = op.Cast(sources, to=1)
        u = op.Unsqueeze(op.Mul(op.Cast(query, to=1), op.Cast(norm_weight, to=1)), op.Constant(value_ints=[1]))
        dots = op.MatMul(v, u)                                               # [M, ..., 1]
        sum_sq = op.ReduceSumSquare(v, op.Constant(value_ints=[-1]), keepdims=1)
        width = op.Cast(op.Shape(v, start=-1), to=1)
        rms = op.Sqrt(op.Add(op.Div(sum_sq, width), op.Constant(value_float=eps)))
        alpha = op.Softmax(op.Div(dots, rms), axis=0)
        alpha = op.Mul(alpha, op.Constant(value_float=scale))
        h = op.ReduceSum(op.Mul(alpha, v), op.Constant(value_ints=[0]), keepdims=0)
        return op.CastLike(h, sources)

    def translate(sources, query, norm_weight, eps, scale):
        axis0 = op.Constant(value_ints=[0])
        stacked = op.Concat(*[op.Unsqueeze(s, axis0) for s in sources], axis=0)
        return custom_op(stacked, query, norm_weight, eps=float(eps), scale=float(scale))

    return DepthAttention, translate


def function_proto():
    """The model-local ONNX function `attnres::DepthAttention` (standard ops only)."""
    fn, _ = _onnxscript_parts()
    return fn.to_function_proto()


def translation_table() -> dict:
    """custom_translation_table entries for torch.onnx.export(..., dynamo=True)."""
    _, translate = _onnxscript_parts()
    return {torch.ops.attnres.depth_attention.default: translate}


def export_onnx(model: torch.nn.Module, example_inputs, path: str | os.PathLike | None = None, *,
                kwargs: dict | None = None, dynamic_shapes=None, inline: bool = False):
    """Export a converted module to ONNX; returns the onnx.ModelProto (also saved to `path`).

    Args:
        model: a module returned by `attnres_compile.convert()` (exported in eval mode).
        example_inputs: positional inputs, as for convert().
        path: where to write the .onnx file (None: do not write).
        kwargs: keyword inputs.
        dynamic_shapes: as for torch.export, e.g. ``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``.
        inline: expand every DepthAttention node into plain ONNX ops (no functions).
    """
    import onnx
    import onnx.inliner

    from ..capture import normalize_inputs
    from ..module import AttnResModule

    if not isinstance(model, AttnResModule):
        raise TypeError(
            f"export_onnx expects a module returned by attnres_compile.convert(), got {type(model).__name__}; "
            "convert it first"
        )
    args, kwargs = normalize_inputs(example_inputs, kwargs)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(), opset_version=ONNX_OPSET, verbose=False,
        )
    finally:
        model.train(was_training)
    proto = program.model_proto
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in proto.functions):
        proto.functions.append(function_proto())
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if inline:
        proto = onnx.inliner.inline_local_functions(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto


def count_depth_attention_nodes(proto) -> int:
    return sum(1 for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)
