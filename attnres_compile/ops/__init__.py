"""Depth-attention ops. Importing this package registers ``torch.ops.attnres.depth_attention``
and ``torch.ops.attnres.depth_attention_backward``."""

from .depth_attention import depth_attention
from .reference import depth_attention_reference

__all__ = ["depth_attention", "depth_attention_reference"]
