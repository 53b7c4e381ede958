"""Two-phase Block AttnRes inference (SPEC.md section 3, PAPER.md section d / Algorithm 1).

The pseudo-queries are parameters, so the ``S`` sites of block ``n`` can be served by one
read of the completed blocks ``b_0..b_{n-1}``:

* **Phase 1**, once per block, for every site ``l`` of the block::

      s_lj = (w_l * g_l) . b_j / rms(b_j)
      m_l  = max_j s_lj,   z_l = sum_j exp(s_lj - m_l),   o_l = sum_j exp(s_lj - m_l) * b_j

  ``o_l`` is unnormalised (storage dtype), ``m_l`` and ``z_l`` are per-token float32.
* **Phase 2**, per site, merges the running partial sum ``p`` of the current block::

      s = (w_l * g_l) . p / rms(p);  m = max(m_l, s)
      h_l = scale * (e^(m_l - m) o_l + e^(s - m) p) / (e^(m_l - m) z_l + e^(s - m))

  With no partial (the first site of a block) ``h_l = scale * o_l / z_l``.

This equals ``depth_attention(blocks + [p], w_l, g_l)`` to rounding. It is the no-grad path:
the ops have no autograd formula.

Registered ops (see ``kernels/dispatch.py``: CUDA -> generated Triton kernels, CPU -> compiled C
kernels or plain PyTorch)::

    attnres::depth_attention_phase1(Tensor[] blocks, Tensor queries, Tensor gains, float eps)
        -> (Tensor o, Tensor m, Tensor z)
        blocks: N >= 1 tensors [..., D]; queries, gains: [S, D]
        o: [S, ..., D] (blocks' dtype), m, z: [S, ...] (float32; float64 for float64 blocks)

    attnres::depth_attention_phase2(Tensor o, Tensor m, Tensor z, Tensor? partial,
                                    Tensor query, Tensor gain, float eps, float scale) -> Tensor
        o: [..., D] (one site's slice of phase 1's o), m, z: [...], partial: [..., D] or None,
        query, gain: [D]  ->  h: [..., D] in o's dtype
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .kernels import dispatch as _dispatch
from .depth_attention import _FAST_CPU, _check_param, check_tensor_sequence
from .kernels import cpu as cpu_kernels
from .paths import NATIVE_CPU, PYTORCH, TRITON, pytorch_path, record_path, recording
from .reference import depth_attention_reference, phase1_reference, phase2_reference

__all__ = [
    "depth_attention_phase1",
    "depth_attention_phase2",
    "two_phase_reference",
    "two_phase_block",
]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_float(name: str, value: object, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")


def _check_phase1(blocks: object, queries: object, gains: object, eps: object) -> None:
    first = check_tensor_sequence("blocks", blocks, "N")
    dim = first.shape[-1]
    for name, t in (("queries", queries), ("gains", gains)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [S, D], got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2 or t.shape[1] != dim or t.shape[0] == 0:
            raise ValueError(f"{name} must have shape [S, D] = [S, {dim}] with S >= 1, got {list(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but the blocks are on {first.device}")
    if queries.shape != gains.shape:
        raise ValueError(f"queries {list(queries.shape)} and gains {list(gains.shape)} must have the same shape")
    _check_float("eps", eps, positive=True)


def _check_phase2(o, m, z, partial, query, gain, eps, scale) -> None:
    if not isinstance(o, Tensor):
        raise TypeError(f"o must be a torch.Tensor [..., D], got {type(o).__name__}")
    if o.dim() == 0 or o.shape[-1] == 0 or not o.is_floating_point():
        raise ValueError(f"o must be a floating-point tensor [..., D] with D >= 1, got {o.dtype} {list(o.shape)}")
    for name, t in (("m", m), ("z", z)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != o.shape[:-1]:
            raise ValueError(f"{name} must have shape {list(o.shape[:-1])} (o's without D), got {list(t.shape)}")
        if not t.is_floating_point() or t.device != o.device:
            raise ValueError(f"{name} must be a floating-point tensor on {o.device}, got {t.dtype} on {t.device}")
    if partial is not None:
        if not isinstance(partial, Tensor):
            raise TypeError(f"partial must be a torch.Tensor or None, got {type(partial).__name__}")
        if partial.shape != o.shape or partial.dtype != o.dtype or partial.device != o.device:
            raise ValueError(
                f"partial is {list(partial.shape)} {partial.dtype} on {partial.device}; "
                f"expected {list(o.shape)} {o.dtype} on {o.device} (like o)"
            )
    _check_param("query", query, o.shape[-1], o.device)
    _check_param("gain", gain, o.shape[-1], o.device)
    _check_float("eps", eps, positive=True)
    _check_float("scale", scale, positive=False)


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------


def _phase1_body(blocks: list[Tensor], queries: Tensor, gains: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _phase1(blocks, queries, gains, eps, c_kernels=False)


def _phase1_cpu(blocks: list[Tensor], queries: Tensor, gains: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _phase1(blocks, queries, gains, eps, c_kernels=True)


#: While site paths are recorded (``paths.record_site_paths``): the path of the last
#: phase 1, which the phase 2 calls of its sites report with their own.
_LAST_PHASE1 = [PYTORCH]


def _phase1(blocks, queries, gains, eps, *, c_kernels: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Checks, then the first available of: Triton kernel, C kernel (CPU), plain PyTorch."""
    _check_phase1(blocks, queries, gains, eps)
    if _dispatch.use_triton(blocks[0], "phase1"):
        from .kernels import triton_launch as triton_kernels

        if recording:
            _LAST_PHASE1[0] = TRITON
        return triton_kernels.phase1(blocks, queries, gains, eps)
    if c_kernels and _FAST_CPU[0]:
        out = cpu_kernels.phase1(blocks, queries, gains, eps)
        if out is not None:
            if recording:
                _LAST_PHASE1[0] = NATIVE_CPU
            return out
    if recording:
        _LAST_PHASE1[0] = pytorch_path(blocks[0], "phase1")
    return phase1_reference(blocks, queries, gains, eps=eps)


def _phase2_body(
    o: Tensor, m: Tensor, z: Tensor, partial: Optional[Tensor], query: Tensor, gain: Tensor, eps: float, scale: float
) -> Tensor:
    return _phase2(o, m, z, partial, query, gain, eps, scale, c_kernels=False)


def _phase2_cpu(
    o: Tensor, m: Tensor, z: Tensor, partial: Optional[Tensor], query: Tensor, gain: Tensor, eps: float, scale: float
) -> Tensor:
    return _phase2(o, m, z, partial, query, gain, eps, scale, c_kernels=True)


def _phase2(o, m, z, partial, query, gain, eps, scale, *, c_kernels: bool) -> Tensor:
    _check_phase2(o, m, z, partial, query, gain, eps, scale)
    f32_state = m.dtype == z.dtype == torch.float32
    if f32_state and _dispatch.use_triton(o, "phase2"):
        from .kernels import triton_launch as triton_kernels

        if recording:
            _record_two_phase(query, TRITON)
        return triton_kernels.phase2(o, m, z, partial, query, gain, eps, scale)
    if c_kernels and _FAST_CPU[0] and f32_state:
        out = cpu_kernels.phase2(o, m, z, partial, query, gain, eps, scale)
        if out is not None:
            if recording:
                _record_two_phase(query, NATIVE_CPU)
            return out
    if recording:
        _record_two_phase(query, pytorch_path(o, "phase2") if f32_state else PYTORCH)
    return phase2_reference(o, m, z, partial, query, gain, eps=eps, scale=scale)


def _record_two_phase(query: Tensor, phase2: str) -> None:
    phase1 = _LAST_PHASE1[0]
    record_path(query, f"two-phase: {phase2}" if phase1 == phase2 else
                    f"two-phase: phase1 {phase1}, phase2 {phase2}")


_phase1_op = _dispatch.define_op("attnres::depth_attention_phase1", _phase1_body, _phase1_cpu)
_phase2_op = _dispatch.define_op("attnres::depth_attention_phase2", _phase2_body, _phase2_cpu)


def depth_attention_phase1(
    blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, *, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1 for the ``S`` sites of one block over ``N`` completed blocks (one read of each).

    Args:
        blocks: ``N >= 1`` completed block representations ``[..., D]`` (same shape/dtype/device).
        queries: ``[S, D]``, row ``l`` is site ``l``'s pseudo-query ``w_l``.
        gains: ``[S, D]``, row ``l`` is site ``l``'s key-norm gain ``g_l``.
        eps: RMS epsilon (> 0).

    Returns:
        ``(o, m, z)``: ``o`` ``[S, ..., D]`` unnormalised in the blocks' dtype; ``m`` (running max)
        and ``z`` (running sum) ``[S, ...]`` in float32 (float64 for float64 blocks).
    """
    _check_phase1(blocks, queries, gains, eps)
    return torch.ops.attnres.depth_attention_phase1(list(blocks), queries, gains, float(eps))


def depth_attention_phase2(o: Tensor, m: Tensor, z: Tensor, partial: Tensor | None, query: Tensor, gain: Tensor,
                           *, eps: float, scale: float = 1.0) -> Tensor:
    """Phase 2 for one site: merge the running partial (or none) into phase 1's ``(o, m, z)``.

    Args:
        o, m, z: this site's slice of :func:`depth_attention_phase1`'s outputs
            (``o[l]``, ``m[l]``, ``z[l]``).
        partial: the block's running partial sum ``[..., D]`` (same dtype as ``o``), or ``None``
            for the first site of a block.
        query, gain: this site's ``w_l`` and ``g_l`` ``[D]``.
        eps: RMS epsilon; scale: output multiplier (``M`` in exact-retrofit mode).

    Returns:
        ``h_l`` ``[..., D]`` in ``o``'s dtype, equal to ``depth_attention(blocks + [partial])``.
    """
    _check_phase2(o, m, z, partial, query, gain, eps, scale)
    return torch.ops.attnres.depth_attention_phase2(o, m, z, partial, query, gain, float(eps), float(scale))


def two_phase_block(blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, partials: Sequence[Tensor | None],
                    *, eps: float, scale: float | Sequence[float] = 1.0) -> list[Tensor]:
    """All ``S`` sites of one block through the two ops: phase 1 once, phase 2 per site.

    ``partials[l]`` is the running partial seen by site ``l`` (``None`` for the first site);
    ``scale`` is one float or one per site. In a real model the partials are produced between
    sites; this helper is for when they are known (tests, benchmarks).
    """
    o, m, z = depth_attention_phase1(blocks, queries, gains, eps=eps)
    scales = [float(scale)] * len(partials) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    return [
        depth_attention_phase2(o[l], m[l], z[l], partials[l], queries[l], gains[l], eps=eps, scale=scales[l])
        for l in range(len(partials))
    ]


def two_phase_reference(blocks: Sequence[Tensor], queries: Tensor, gains: Tensor,
                        partials: Sequence[Tensor | None], *, eps: float, scale: float = 1.0) -> list[Tensor]:
    """What Algorithm 1 must equal: each of the ``S = len(partials)`` sites of one block is the
    single-pass site over the completed ``blocks`` and its partial (``ops/reference.py``).
    Returns ``[h_0, ..., h_{S-1}]`` in the blocks' dtype."""
    return [depth_attention_reference([*blocks, *([p] if p is not None else [])], queries[l], gains[l], eps=eps,
                                      scale=scale) for l, p in enumerate(partials)]
