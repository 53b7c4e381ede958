"""A readable plain-PyTorch reference of depth attention (SPEC.md section 2).

This is the formula the op and every generated kernel are tested against. It is written for
clarity, not speed: it stacks the sources and lets autograd differentiate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["depth_attention_reference"]


def depth_attention_reference(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Tensor,
    *,
    eps: float,
    scale: float = 1.0,
) -> Tensor:
    """Depth attention over ``M`` sources, written out step by step.

    Args:
        sources: ``M >= 1`` tensors ``v_1..v_M``, each of shape ``[..., D]`` (same shape and dtype).
        query: pseudo-query ``w``, shape ``[D]``.
        norm_weight: key-norm gain ``g``, shape ``[D]``.
        eps: added to the mean square inside the RMS.
        scale: output multiplier (1 in the paper's mode, ``M`` in exact-retrofit mode).

    Returns:
        ``h`` of shape ``[..., D]`` in ``sources[0].dtype``::

            rms(v)   = sqrt(mean_d(v_d^2) + eps)
            logit_j  = sum_d w_d * g_d * v_jd / rms(v_j)
            alpha    = softmax_j(logit_j)          # per token, over depth
            h        = scale * sum_j alpha_j * v_j

    The math runs in float32 whatever the storage dtype (float64 inputs stay float64).
    """
    if len(sources) == 0:
        raise ValueError("sources must contain at least one tensor")
    out_dtype = sources[0].dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32

    v = torch.stack([s.to(compute) for s in sources], dim=0)          # [M, ..., D]
    w = query.to(compute)                                             # [D]
    g = norm_weight.to(compute)                                       # [D]

    rms = torch.sqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)       # [M, ..., 1]
    keys = g * (v / rms)                                              # [M, ..., D]
    logits = (keys * w).sum(dim=-1)                                   # [M, ...]
    alpha = torch.softmax(logits, dim=0)                              # [M, ...]
    h = (alpha.unsqueeze(-1) * v).sum(dim=0)                          # [..., D]
    return (scale * h).to(out_dtype)
