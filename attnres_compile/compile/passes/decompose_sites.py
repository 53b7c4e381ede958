"""Depth attention as plain ATen arithmetic, so Inductor generates and fuses it on CPU.

The ``attnres::depth_attention`` op is one opaque node to Inductor: its CPU kernel is fast on
its own, but nothing around it can fuse with it. Under ``torch.compile(..., backend="attnres")``
on CPU, :func:`decompose_sites` replaces every site node of the Dynamo graph with the op's math in
plain PyTorch (ops/reference.py) before aot_autograd traces it, so Inductor sees the
per-source reductions, the softmax over depth and the weighted sum, and fuses them with the
block partial-sum adds that produce the sources and with the norm that reads the site. The
backward is autograd of the same arithmetic, which Inductor compiles too.

No stacking: the M sources stay M separate buffers (``torch.stack`` would write a copy of
every source, the extra traffic SPEC section 4 rules out); the softmax runs over a Python list
of M per-token logits, which Inductor unrolls into one pointwise kernel.

Eager and every other capture keep the op (and its native or Triton kernels); CUDA graphs keep
it too, where the generated Triton kernels are the fused path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops.reference import depth_attention_reference
from .match import is_depth_attention

__all__ = ["decompose_sites"]


def decompose_sites(gm: torch.fx.GraphModule) -> int:
    """Match: ``attnres::depth_attention`` nodes of a Dynamo graph. Replace: a call of
    the op's math (ops/reference.py) with the same arguments. Returns the count."""
    count = 0
    for node in gm.graph.nodes:
        if is_depth_attention(node):
            node.target = _decomposed
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _decomposed(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float = 1.0) -> Tensor:
    """The site node's call signature over ops/reference.py (keyword-only eps and scale there)."""
    return depth_attention_reference(sources, query, norm_weight, eps=eps, scale=scale)
