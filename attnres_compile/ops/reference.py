"""Depth attention in plain PyTorch: the math, written once (SPEC.md sections 2 and 3).

Everything else is checked against these functions, run in float64: the ops' Triton and
native CPU kernels (tests, and each kernel's self-check on first use, ops/kernels/selfcheck.py),
the two-phase schedule (its result must equal the single-pass site). They are also the
implementation the ops run where no kernel serves (fake and meta tensors, devices without
kernels, a package installed without its native code), and what the `attnres` compile backend
hands Inductor on CPU so that it generates and fuses the sites (compile/passes.py), as
`fla.ops.*.naive` sits beside each fused kernel in flash-linear-attention.

Written without stacking the sources: the M sources stay M buffers (a stack would copy every
source, the traffic SPEC section 4 rules out), the softmax over depth runs over a list of M
per-token logits, which Inductor unrolls into one pointwise kernel. Math in float32 whatever the
storage dtype (float64 for float64 inputs); results in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["compute_dtype", "depth_attention_backward_reference", "depth_attention_reference",
           "norm_backward_reference", "norm_reference", "phase1_reference", "phase2_reference"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for inputs of `dtype`: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logit(v: Tensor, u: Tensor, eps: float) -> Tensor:
    """s = u . v / rms(v) per token, ``[..., 1]`` (u = w * g; compute dtype)."""
    return (v * u).sum(-1, keepdim=True) * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)


def depth_attention_reference(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, *, eps: float,
                              scale: float = 1.0) -> Tensor:
    """Depth attention over ``M`` sources.

    Args:
        sources: ``M >= 1`` tensors ``v_1..v_M``, each ``[..., D]`` (same shape and dtype).
        query: pseudo-query ``w``, ``[D]``.
        norm_weight: key-norm gain ``g``, ``[D]``.
        eps: added to the mean square inside the RMS.
        scale: output multiplier (1 in the paper's mode, ``M`` in exact-retrofit mode).

    Returns:
        ``h`` ``[..., D]`` in ``sources[0].dtype``::

            rms(v)   = sqrt(mean_d(v_d^2) + eps)
            logit_j  = sum_d w_d * g_d * v_jd / rms(v_j)
            alpha    = softmax_j(logit_j)          # per token, over depth
            h        = scale * sum_j alpha_j * v_j
    """
    if len(sources) == 0:
        raise ValueError("sources must contain at least one tensor")
    out_dtype = sources[0].dtype
    compute = compute_dtype(out_dtype)
    u = query.to(compute) * norm_weight.to(compute)                          # [D]
    vs = [s.to(compute) for s in sources]
    logits = [_logit(v, u, eps) for v in vs]                                 # M x [..., 1]
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


def depth_attention_backward_reference(grad_out: Tensor, sources: Sequence[Tensor], query: Tensor,
                                       norm_weight: Tensor, *, eps: float, scale: float = 1.0
                                       ) -> tuple[list[Tensor], Tensor, Tensor]:
    """The analytic backward of :func:`depth_attention_reference`: the gradients of every
    source ``[..., D]``, of ``query`` and of ``norm_weight`` ``[D]``, each in its input's dtype.

    With ``u = w * g``, ``r_j = rms(v_j)``, ``s_j`` the logits and ``G = scale * grad_out``::

        da_j       = G . v_j
        ds_j       = alpha_j * (da_j - sum_i alpha_i * da_i)
        grad v_j   = alpha_j * G + ds_j * (u / r_j - s_j * v_j / (D * r_j^2))
        du         = sum over tokens of sum_j ds_j * v_j / r_j
        grad w     = du * g,   grad g = du * w
    """
    src_dtype = sources[0].dtype
    compute = compute_dtype(src_dtype)
    dim = sources[0].shape[-1]
    vs = [s.to(compute) for s in sources]
    w, g = query.to(compute), norm_weight.to(compute)
    u = w * g
    inv_r = torch.stack([torch.rsqrt(v.square().mean(-1) + eps) for v in vs])   # [M, ...]
    s = torch.stack([(v * u).sum(-1) for v in vs]) * inv_r                       # [M, ...]
    alpha = torch.softmax(s, dim=0)
    grad = grad_out.to(compute) * scale          # [..., D]; also densifies expanded grads
    da = torch.stack([(grad * v).sum(-1) for v in vs])
    # ds_j is shift invariant in da. Measuring da from the winning source keeps it accurate when
    # the softmax is peaked (alpha_max -> 1): the winner's own term is then exactly zero instead
    # of a difference of near-equal numbers.
    da = da - da.gather(0, s.argmax(dim=0, keepdim=True))
    ds = alpha * (da - (alpha * da).sum(dim=0, keepdim=True))
    c_u = ds * inv_r                              # coefficient of u (and of v_j in du)
    c_v = c_u * s * inv_r / dim                   # coefficient of -v_j
    grad_sources, du = [], torch.zeros(dim, dtype=compute, device=u.device)
    for j, v in enumerate(vs):
        dv = grad * alpha[j].unsqueeze(-1) + c_u[j].unsqueeze(-1) * u - c_v[j].unsqueeze(-1) * v
        grad_sources.append(dv.to(src_dtype).contiguous())
        du = du + (v * c_u[j].unsqueeze(-1)).reshape(-1, dim).sum(0)
    return grad_sources, (du * g).to(query.dtype), (du * w).to(norm_weight.dtype)


def phase1_reference(blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, *, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1 of two-phase inference for ``S`` sites over ``N`` completed blocks.

    blocks: N x ``[..., D]``; queries, gains: ``[S, D]``. Returns ``o`` ``[S, ..., D]`` (blocks'
    dtype, unnormalised), ``m`` and ``z`` ``[S, ...]`` (compute dtype)::

        s_lj = (w_l * g_l) . b_j / rms(b_j),  m_l = max_j s_lj,
        z_l = sum_j exp(s_lj - m_l),          o_l = sum_j exp(s_lj - m_l) * b_j
    """
    dtype = blocks[0].dtype
    compute = compute_dtype(dtype)
    u = queries.to(compute) * gains.to(compute)                               # [S, D]
    bs = [b.to(compute) for b in blocks]
    scores = [torch.movedim(torch.matmul(b, u.t()), -1, 0) * torch.rsqrt(b.square().mean(-1) + eps)
              for b in bs]                                                    # N x [S, ...]
    m = scores[0]
    for sc in scores[1:]:
        m = torch.maximum(m, sc)
    o = z = None
    for b, sc in zip(bs, scores):
        e = torch.exp(sc - m)
        term = e.unsqueeze(-1) * b
        o = term if o is None else o + term
        z = e if z is None else z + e
    return o.to(dtype).contiguous(), m.contiguous(), z.contiguous()


def phase2_reference(o: Tensor, m: Tensor, z: Tensor, partial: Tensor | None, query: Tensor, gain: Tensor, *,
                     eps: float, scale: float = 1.0) -> Tensor:
    """Phase 2 for one site: merge the block's running partial ``p`` (or none) into phase 1's
    ``(o, m, z)`` of that site; ``h`` ``[..., D]`` in ``o``'s dtype::

        s = (w * g) . p / rms(p),  mx = max(m, s)
        h = scale * (e^(m - mx) o + e^(s - mx) p) / (e^(m - mx) z + e^(s - mx))
    """
    compute = compute_dtype(o.dtype)
    of, zf = o.to(compute), z.to(compute)
    if partial is None:
        return (of * (scale / zf).unsqueeze(-1)).to(o.dtype).contiguous()
    pf, mf = partial.to(compute), m.to(compute)
    sp = _logit(pf, query.to(compute) * gain.to(compute), eps).squeeze(-1)
    mx = torch.maximum(mf, sp)
    a, b = torch.exp(mf - mx), torch.exp(sp - mx)
    h = (a.unsqueeze(-1) * of + b.unsqueeze(-1) * pf) * (scale / (a * zf + b)).unsqueeze(-1)
    return h.to(o.dtype).contiguous()


def norm_reference(h: Tensor, kind: str, weight: Tensor, bias: Tensor | None, norm_eps: float) -> Tensor:
    """The norm a fused epilogue applies to a site's output: ``"rmsnorm"`` or ``"layernorm"``."""
    d = h.shape[-1]
    if kind == "rmsnorm":
        return torch.nn.functional.rms_norm(h, (d,), weight, norm_eps)
    return torch.nn.functional.layer_norm(h, (d,), weight, bias, norm_eps)


def norm_backward_reference(dy: Tensor, h: Tensor, kind: str, weight: Tensor, norm_eps: float
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dh, dweight, dbias) of ``y = norm_reference(h)``, float32 math, one row per token."""
    d = h.shape[-1]
    hf, g = h.float(), dy.float()
    gw = g * weight.float()
    lead = tuple(range(h.dim() - 1))
    if kind == "rmsnorm":
        r = torch.rsqrt(hf.square().mean(-1, keepdim=True) + norm_eps)
        xhat = hf * r
        dh = r * (gw - xhat * (gw * xhat).sum(-1, keepdim=True) / d)
        return dh, (g * xhat).sum(lead), None
    mu = hf.mean(-1, keepdim=True)
    r = torch.rsqrt((hf - mu).square().mean(-1, keepdim=True) + norm_eps)
    xhat = (hf - mu) * r
    dh = r * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dh, (g * xhat).sum(lead), g.sum(lead)
