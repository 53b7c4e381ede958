"""The ONNX node of a depth-attention site (SPEC section 6): `attnres::DepthAttention`, opset 1.

The node takes the M sources stacked as one [M, ..., D] input (ONNX functions have a fixed
arity, and one function serving every source count is simpler for runtimes than one overload
per M), the query [D] and the gain [D]; attributes `eps` and `scale`; output h [..., D]. The
model carries a model-local function of that name and domain whose body uses standard ONNX ops
only, so stock onnxruntime runs it; a runtime with a fused kernel can claim the node by name
(session.py). Export (export.py) and the decoder with past (decoder.py) both finish their
protos here.
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


def finish_proto(proto, path=None, *, inline: bool = False):
    """An exported ModelProto made self-contained: the `attnres::DepthAttention` function and
    its opset import added when the exporter left them out, optionally inlined, saved to `path`."""
    import onnx
    import onnx.inliner

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
