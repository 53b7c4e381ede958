"""onnxruntime sessions of exported converted models, with the fused DepthAttention kernel
(ort_kernel.py, built at install) claiming the sites where it can."""

from __future__ import annotations

import os

from .node import DOMAIN, OP_TYPE

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
