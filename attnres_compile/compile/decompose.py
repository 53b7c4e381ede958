"""Depth attention as plain ATen arithmetic, so Inductor generates and fuses it on CPU.

The ``attnres::depth_attention`` op is one opaque node to Inductor: its CPU kernel is fast on
its own, but nothing around it can fuse with it. Under ``torch.compile(..., backend="attnres")``
on CPU, :func:`decompose_sites` replaces every site node of the Dynamo graph with
:func:`depth_attention_decomposed` before aot_autograd traces it, so Inductor sees the
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

__all__ = ["depth_attention_decomposed", "decompose_sites"]


def depth_attention_decomposed(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
                               scale: float = 1.0) -> Tensor:
    """The site of SPEC section 2 in ATen ops, without stacking.

    Args:
        sources: M tensors ``[..., D]`` (same shape and dtype).
        query, norm_weight: ``[D]``.
    Returns:
        ``[..., D]`` in the sources' dtype; math in float32 (float64 for float64 sources).
    """
    out_dtype = sources[0].dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    u = query.to(compute) * norm_weight.to(compute)                          # [D]
    vs = [s.to(compute) for s in sources]
    logits = [(v * u).sum(-1, keepdim=True) * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
              for v in vs]                                                   # M x [..., 1]
    top = logits[0]
    for s in logits[1:]:
        top = torch.maximum(top, s)
    e = [torch.exp(s - top) for s in logits]
    z = e[0]
    for x in e[1:]:
        z = z + x
    h = vs[0] * e[0]
    for v, x in zip(vs[1:], e[1:]):
        h = h + v * x
    return (h * (scale / z)).to(out_dtype)


def decompose_sites(gm: torch.fx.GraphModule) -> int:
    """Match: ``attnres::depth_attention`` nodes of a Dynamo graph. Replace: a call of
    :func:`depth_attention_decomposed` with the same arguments. Returns the count."""
    from .two_phase import is_depth_attention

    count = 0
    for node in gm.graph.nodes:
        if is_depth_attention(node):
            node.target = depth_attention_decomposed
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
