"""Depth attention fused with its neighbours: the ops the CUDA graph pass emits
(``compile/fuse_epilogues.py``), each with a generated Triton kernel (``triton_kernels.forward_norm``,
``forward_partial``), a plain PyTorch body (CPU, fake tensors) and an analytic backward.

* ``attnres::depth_attention_norm(Tensor[] sources, Tensor query, Tensor norm_weight, float eps,
  float scale, Tensor weight, Tensor? bias, float norm_eps, str kind) -> Tensor``:
  ``norm(depth_attention(sources))`` with the site never written (``kind`` ``"rmsnorm"``:
  ``h * rsqrt(mean(h^2) + norm_eps) * weight``; ``"layernorm"``: ``layer_norm(h, weight, bias)``).
* ``attnres::depth_attention_partial(Tensor[] blocks, Tensor prev, Tensor add, Tensor query,
  Tensor norm_weight, float eps, float scale) -> (Tensor h, Tensor new_partial)``: the block
  partial-sum add ``new_partial = prev + add`` fused into the site over ``[*blocks, new_partial]``.

Backward. The norm op recomputes ``h`` (one site forward) rather than storing it, then applies
the norm's backward formula and the site's backward op; the partial op's ``prev`` and ``add``
both receive the gradient of ``new_partial`` plus the site's gradient of its last source.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import dispatch as _dispatch
from .paths import TRITON, pytorch_path, record_path, recording
from .reference import depth_attention_reference, norm_backward_reference, norm_reference

__all__ = ["depth_attention_norm", "depth_attention_partial"]

_KINDS = ("rmsnorm", "layernorm")


def _check_kind(kind: str, bias: Tensor | None) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if (bias is not None) and kind == "rmsnorm":
        raise ValueError("an RMSNorm epilogue takes no bias")


# ---- site, then norm --------------------------------------------------------------------------

def _norm_body(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float, weight: Tensor,
               bias: Tensor | None, norm_eps: float, kind: str) -> Tensor:
    _check_kind(kind, bias)
    variant = f"forward_norm_{kind}"
    if _dispatch.use_triton(sources[0], variant):
        from .kernels import triton_launch as triton_kernels

        if recording:
            record_path(query, TRITON)
        return triton_kernels.forward_norm(sources, query, norm_weight, eps, scale, weight, bias, norm_eps, kind=kind)
    if recording:
        record_path(query, pytorch_path(sources[0], variant))
    h = depth_attention_reference(sources, query, norm_weight, eps=eps, scale=scale)
    return norm_reference(h, kind, weight, bias, norm_eps)


_norm_op = _dispatch.define_op("attnres::depth_attention_norm", _norm_body, _norm_body)


def _norm_setup(ctx, inputs, output) -> None:
    sources, query, norm_weight, eps, scale, weight, bias, norm_eps, kind = inputs
    ctx.save_for_backward(*sources, query, norm_weight, weight)
    ctx.m, ctx.eps, ctx.scale, ctx.norm_eps, ctx.kind = len(sources), eps, scale, norm_eps, kind
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _norm_backward(ctx, dy: Tensor):
    *sources, query, norm_weight, weight = ctx.saved_tensors
    h = torch.ops.attnres.depth_attention.default(list(sources), query, norm_weight, ctx.eps, ctx.scale)
    dh, dweight, dbias = norm_backward_reference(dy, h, ctx.kind, weight, ctx.norm_eps)
    gs, gq, gg = torch.ops.attnres.depth_attention_backward(dh.to(h.dtype), list(sources), query, norm_weight,
                                                            ctx.eps, ctx.scale)
    return (list(gs), gq, gg, None, None, dweight.to(weight.dtype),
            dbias.to(ctx.bias_dtype) if ctx.has_bias else None, None, None)


_norm_op.register_autograd(_norm_backward, setup_context=_norm_setup)


# ---- partial-sum add, then site -----------------------------------------------------------------

def _partial_body(blocks: list[Tensor], prev: Tensor, add: Tensor, query: Tensor, norm_weight: Tensor, eps: float,
                  scale: float) -> tuple[Tensor, Tensor]:
    if _dispatch.use_triton(prev, "forward_partial"):
        from .kernels import triton_launch as triton_kernels

        if recording:
            record_path(query, TRITON)
        return triton_kernels.forward_partial(blocks, prev, add, query, norm_weight, eps, scale)
    if recording:
        record_path(query, pytorch_path(prev, "forward_partial"))
    new_partial = (prev + add).contiguous()
    h = depth_attention_reference([*blocks, new_partial], query, norm_weight, eps=eps, scale=scale)
    return h.contiguous(), new_partial


_partial_op = _dispatch.define_op("attnres::depth_attention_partial", _partial_body, _partial_body)


def _partial_setup(ctx, inputs, output) -> None:
    blocks, prev, add, query, norm_weight, eps, scale = inputs
    ctx.save_for_backward(*blocks, output[1], query, norm_weight)
    ctx.n, ctx.eps, ctx.scale = len(blocks), eps, scale
    ctx.prev_dtype, ctx.add_dtype = prev.dtype, add.dtype


def _partial_backward(ctx, dh: Tensor, dnew: Tensor | None):
    *blocks, new_partial, query, norm_weight = ctx.saved_tensors
    gs, gq, gg = torch.ops.attnres.depth_attention_backward(dh, [*blocks, new_partial], query, norm_weight,
                                                            ctx.eps, ctx.scale)
    dp = gs[-1] if dnew is None else gs[-1] + dnew
    return list(gs[:-1]), dp.to(ctx.prev_dtype), dp.to(ctx.add_dtype), gq, gg, None, None


_partial_op.register_autograd(_partial_backward, setup_context=_partial_setup)


def depth_attention_norm(sources, query, norm_weight, *, eps: float, scale: float = 1.0, weight: Tensor,
                         bias: Tensor | None = None, norm_eps: float, kind: str) -> Tensor:
    """``norm(depth_attention(sources, query, norm_weight))`` as one op; shapes as
    :func:`~attnres_compile.ops.depth_attention` (``weight``, ``bias``: ``[D]``)."""
    return torch.ops.attnres.depth_attention_norm(list(sources), query, norm_weight, float(eps), float(scale),
                                                  weight, bias, float(norm_eps), kind)


def depth_attention_partial(blocks, prev: Tensor, add: Tensor, query: Tensor, norm_weight: Tensor, *, eps: float,
                            scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(depth_attention([*blocks, prev + add]), prev + add)`` as one op; all ``[..., D]``."""
    return torch.ops.attnres.depth_attention_partial(list(blocks), prev, add, query, norm_weight, float(eps),
                                                     float(scale))
