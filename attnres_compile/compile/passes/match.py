"""Matching depth-attention site nodes in a captured graph (what every pass here starts from)."""

from __future__ import annotations

import torch
from torch.fx import Node

from ... import ops  # noqa: F401  (registers the attnres ops the nodes call)


def depth_attention_op():
    return torch.ops.attnres.depth_attention.default


def is_depth_attention(node: Node) -> bool:
    """Whether `node` is a call of `attnres::depth_attention`."""
    return node.op == "call_function" and node.target is depth_attention_op()


def site_args(node: Node):
    """(sources, query, norm_weight, eps, scale) of a site node (keyword or positional)."""
    sources, w, g, eps, scale = (list(node.args) + [None] * 5)[:5]
    eps = node.kwargs.get("eps", eps)
    scale = node.kwargs.get("scale", scale if scale is not None else 1.0)
    return list(sources), w, g, float(eps), float(scale)
