"""ONNX: export a converted model (one `attnres::DepthAttention` node per site, SPEC section 6),
a decoder with past for generation, and onnxruntime sessions with the fused kernel.

`node.py` the node and its function, `export.py` export_onnx, `decoder.py` the decoder with
past and its generation loop, `session.py` onnxruntime sessions, `ort_kernel.py` the fused
kernel built at install.
"""

from .decoder import export_decoder, export_for_generation, ort_generate
from .export import export_onnx
from .node import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, count_depth_attention_nodes, function_proto
from .session import ort_session

__all__ = ["DOMAIN", "DOMAIN_VERSION", "ONNX_OPSET", "OP_TYPE", "count_depth_attention_nodes", "export_decoder",
           "export_for_generation", "export_onnx", "function_proto", "ort_generate", "ort_session"]
