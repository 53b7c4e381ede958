"""ONNX export (SPEC section 6): one `attnres::DepthAttention` node per site.

The node takes the M sources stacked as one [M, ..., D] input (ONNX functions have a fixed
arity, and one function serving every source count is simpler for runtimes than one overload
per M), the query [D] and the gain [D]; attributes `eps` and `scale`; output h [..., D].

The exporter sees an opaque custom-domain op (so none of its passes can inline it away); the
model-local function of the same name and domain, whose body uses standard ONNX ops only, is
attached afterwards. Stock onnxruntime runs the function; a runtime with a fused kernel can
claim the node by its name and domain: `ort_session(path, fused=True)` (session.py) registers
the fused CPU kernel of `ort_kernel.py` with onnxruntime, which then runs it in place of the
function. The node itself is node.py.
`inline=True` expands the function for runtimes without function support.
"""

from __future__ import annotations

import os

import torch

from ..api import is_converted
from ..conversion.capture import normalize_inputs, without_cache
from .decoder import export_decoder
from .node import ONNX_OPSET, finish_proto, translation_table
from .session import ort_session  # noqa: F401  (public here since the export docs name it)

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
    if with_cache:
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
