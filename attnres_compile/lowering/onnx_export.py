"""Compatibility re-export: ONNX export lives in onnx/ (export.py, node.py, session.py)."""

from ..onnx.export import export_onnx
from ..onnx.node import (DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, count_depth_attention_nodes, finish_proto,
                         function_proto, translation_table)
from ..onnx.session import ort_session, unstack_sources

__all__ = ["DOMAIN", "DOMAIN_VERSION", "ONNX_OPSET", "OP_TYPE", "count_depth_attention_nodes", "export_onnx",
           "finish_proto", "function_proto", "ort_session", "translation_table", "unstack_sources"]
