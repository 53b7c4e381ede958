"""ONNX export (SPEC section 6): one `attnres::DepthAttention` node per site.

The node takes the M sources stacked as one [M, ..., D] input (ONNX functions have a fixed
arity, and one function serving every source count is simpler for runtimes than one overload
per M), the query [D] and the gain [D]; attributes `eps` and `scale`; output h [..., D].

The exporter sees an opaque custom-domain op (so none of its passes can inline it away); the
model-local function of the same name and domain, whose body uses standard ONNX ops only, is
attached afterwards. Stock onnxruntime runs the function; a runtime with a fused kernel can
claim the node by its name and domain: `ort_session(path, fused=True)` registers the fused
CPU kernel of `ort_kernel.py` with onnxruntime, which then runs it in place of the function.
`inline=True` expands the function for runtimes without function support.
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


def export_onnx(model: torch.nn.Module, example_inputs=None, path: str | os.PathLike | None = None, *,
                kwargs: dict | None = None, dynamic_shapes=None, inline: bool = False, with_cache: bool = False):
    """Export a converted module to ONNX; returns the onnx.ModelProto (also saved to `path`).

    Args:
        model: a module returned by `attnres_compile.convert()` (exported in eval mode).
        example_inputs: positional inputs, as for convert().
        path: where to write the .onnx file (None: do not write).
        kwargs: keyword inputs.
        dynamic_shapes: as for torch.export, e.g. ``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``.
        inline: expand every DepthAttention node into plain ONNX ops (no functions).
        with_cache: export a decoder with past for generation instead (`onnx_generate.export_decoder`:
            past_key_values.* in, present.* out, dynamic batch, sequence and past length; the
            example inputs are not needed).
    """
    from ..api import is_converted
    from ..convert.capture import normalize_inputs, without_cache

    if with_cache:
        from .decoder import export_decoder

        return export_decoder(model, path, inline=inline)

    if not is_converted(model):
        raise TypeError(
            f"export_onnx expects a model converted by attnres_compile.convert(), got {type(model).__name__}; "
            "convert it first"
        )
    args, kwargs = normalize_inputs(example_inputs, kwargs)
    added = without_cache(model, kwargs).keys() - kwargs.keys()
    kwargs = without_cache(model, kwargs)
    if isinstance(dynamic_shapes, dict) and added:
        dynamic_shapes = {**dynamic_shapes, **{k: None for k in added}}
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(), opset_version=ONNX_OPSET, verbose=False,
        )
    finally:
        model.train(was_training)
    return finish_proto(program.model_proto, path, inline=inline)


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


UNSTACKED_OP_TYPE = "DepthAttentionUnstacked"  # runtime-only: see unstack_sources()


def _int_values(name: str, graph) -> list[int] | None:
    import onnx.numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return [int(x) for x in onnx.numpy_helper.to_array(init).reshape(-1)]
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and list(n.output) == [name]:
            for a in n.attribute:
                if a.name == "value":
                    return [int(x) for x in onnx.numpy_helper.to_array(a.t).reshape(-1)]
                if a.name == "value_ints":
                    return list(a.ints)
    return None


def unstack_sources(proto):
    """A copy of an exported model for the fused kernel: each ``attnres::DepthAttention`` node
    fed by ``Concat(Unsqueeze(v_1, 0), ..., Unsqueeze(v_M, 0), axis=0)`` (the pattern
    `export_onnx` writes) becomes ``attnres::DepthAttentionUnstacked(query, norm_weight, v_1,
    ..., v_M)``, and the Concat and Unsqueezes left without consumers are dropped, so the
    stacked copy of the sources is never written. Only runtimes that registered the fused
    kernel (`ort_session(..., fused=True)`) know the new op; nodes that do not match the
    pattern are left as they are. Returns (model, number of nodes rewritten)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    drop: set[int] = set()
    rewritten = 0
    new_nodes = []
    for n in graph.node:
        new_nodes.append(n)
        if n.domain != DOMAIN or n.op_type != OP_TYPE or len(n.input) != 3:
            continue
        cat = producer.get(n.input[0])
        if (cat is None or cat.op_type != "Concat" or cat.domain not in ("", "ai.onnx")
                or [a.i for a in cat.attribute if a.name == "axis"] != [0]):
            continue
        unsq = [producer.get(i) for i in cat.input]
        if not unsq or any(u is None or u.op_type != "Unsqueeze" or u.domain not in ("", "ai.onnx")
                           or len(u.input) != 2 or _int_values(u.input[1], graph) != [0] for u in unsq):
            continue
        node = onnx.helper.make_node(UNSTACKED_OP_TYPE, [n.input[1], n.input[2], *[u.input[0] for u in unsq]],
                                     list(n.output), name=n.name, domain=DOMAIN)
        node.attribute.extend(n.attribute)
        new_nodes[-1] = node
        rewritten += 1
        uses[cat.output[0]] -= 1
        if uses[cat.output[0]] == 0:
            drop.add(id(cat))
            for u in unsq:
                uses[u.output[0]] -= 1
                if uses[u.output[0]] == 0:
                    drop.add(id(u))
    del graph.node[:]
    graph.node.extend(m for m in new_nodes if id(m) not in drop)
    used = {i for m in graph.node for i in m.input} | {o.name for o in graph.output}
    if any(init.name not in used for init in graph.initializer):  # e.g. the Unsqueeze axes
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return out, rewritten


def _sources_dtypes(proto) -> set[int]:
    """ONNX element types of the DepthAttention nodes' sources (0 where inference leaves one unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference is best effort here
        inferred = proto
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return {types.get(n.input[0], 0) for n in g.node if n.domain == DOMAIN and n.op_type == OP_TYPE}


def ort_session(model, *, fused: bool = True, unstack: bool = True, sess_options=None, providers=None):
    """An onnxruntime InferenceSession for an exported model.

    Args:
        model: a path to a .onnx file, its bytes, or an onnx.ModelProto.
        fused: register the fused `attnres::DepthAttention` kernel (``ort_kernel.py``), so that
            onnxruntime runs it for every DepthAttention node instead of the function body
            (CPU provider, float32 models). When the kernel is unavailable (not built at
            install, onnxruntime older than 1.29) the session runs the function body, with a
            warning naming the reason (none when ``ATTNRES_ORT_KERNEL=0`` turns it off on
            purpose); ``fused=False`` is stock onnxruntime.
            A model whose DepthAttention sources are not all float32 (or of a type shape
            inference cannot tell) runs the function body, with a warning: onnxruntime would
            reject such a node once the float32 kernel claims the op.
        unstack: with ``fused``, also drop the Concat that stacks each node's sources
            (`unstack_sources`; the kernel then reads the sources where they are). The model
            on disk is not changed.
        sess_options: an onnxruntime.SessionOptions to extend (default: a new one).
        providers: execution providers (default: ``["CPUExecutionProvider"]``).
    """
    import onnx
    import onnxruntime as ort

    opts = sess_options if sess_options is not None else ort.SessionOptions()
    if fused:
        from . import ort_kernel

        reason = ort_kernel.unavailable_reason()
        if reason is not None:
            if not ort_kernel.disabled():
                import warnings

                warnings.warn(f"ort_session: the fused attnres::DepthAttention kernel is unavailable ({reason}); "
                              "running the model's function body", RuntimeWarning, stacklevel=2)
            fused = False
    if fused:
        library = ort_kernel.library_path()
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        elif isinstance(model, (str, os.PathLike)):
            model = onnx.load(os.fspath(model))
        dtypes = _sources_dtypes(model) - {onnx.TensorProto.FLOAT}
        if dtypes:
            import warnings

            names = sorted(onnx.TensorProto.DataType.Name(t) if t else "unknown" for t in dtypes)
            warnings.warn(f"ort_session: DepthAttention sources of type {', '.join(names)}: the fused kernel "
                          "is float32 only, running the function body", stacklevel=2)
        else:
            opts.register_custom_ops_library(library)
            if unstack:
                model, _ = unstack_sources(model)
    if not isinstance(model, (str, bytes, os.PathLike)):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])
