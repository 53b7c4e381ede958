"""Depth-attention ops. Importing this package registers ``torch.ops.attnres.depth_attention``,
``torch.ops.attnres.depth_attention_backward`` and the two-phase inference ops
``torch.ops.attnres.depth_attention_phase1`` / ``depth_attention_phase2``, and the fused ops
``torch.ops.attnres.depth_attention_norm`` / ``depth_attention_partial`` (ops/fused.py)."""

from .depth_attention import depth_attention
from .fused import depth_attention_norm, depth_attention_partial
from .reference import depth_attention_reference
from .two_phase import (
    depth_attention_phase1,
    depth_attention_phase2,
    two_phase_block,
    two_phase_reference,
)

__all__ = [
    "depth_attention",
    "depth_attention_norm",
    "depth_attention_partial",
    "depth_attention_reference",
    "depth_attention_phase1",
    "depth_attention_phase2",
    "two_phase_block",
    "two_phase_reference",
]
