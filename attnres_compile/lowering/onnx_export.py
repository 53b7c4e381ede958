"""Compatibility re-export: ONNX export lives in onnx/export.py."""

from ..onnx.export import (DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, count_depth_attention_nodes, export_onnx,
                           function_proto, ort_session, translation_table, unstack_sources)

__all__ = ["DOMAIN", "DOMAIN_VERSION", "ONNX_OPSET", "OP_TYPE", "count_depth_attention_nodes", "export_onnx",
           "function_proto", "ort_session", "translation_table", "unstack_sources"]
