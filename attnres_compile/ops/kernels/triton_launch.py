"""Launchers for the generated Triton kernels (``triton_codegen``).

Each launcher takes the op's arguments, views every source as ``[T, D]`` rows in place (a
copy is made only when a source's last dimension is not unit-stride or its leading dims do
not merge), allocates outputs, and launches the specialised kernel through
``torch.library.wrap_triton`` so that ``torch.library.triton_op`` tracing (and Inductor) sees
the kernel. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors, which is how the
tests exercise them.

Grid: persistent programs, ``P = min(number of token tiles, max_programs)``; program ``p``
handles tiles ``p, p + P, ...``. Parameters (query, gain) are read once per program; the
backward's ``du`` partial sums are one ``[P, D]`` float32 row per program, reduced in order by
a second kernel (deterministic, no atomics).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .triton_cache import load_kernel
from .triton_codegen import (
    SUPPORTED_DTYPES,
    KernelSpec,
    choose_block_t,
    choose_num_warps,
    next_power_of_2,
    resident_fits,
)

__all__ = [
    "triton_available",
    "interpreter_enabled",
    "supports",
    "forward",
    "forward_norm",
    "forward_partial",
    "backward",
    "phase1",
    "phase2",
    "max_programs",
]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def supports(dtype: torch.dtype) -> bool:
    return dtype in SUPPORTED_DTYPES


def max_programs(device: torch.device) -> int:
    """Persistent-grid size cap: 4 programs per SM on CUDA; 4 in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _wrap(kernel):
    from torch.library import wrap_triton

    if interpreter_enabled():
        from .triton_interpret import interpreter_compat

        interpreter_compat()
    try:
        return wrap_triton(kernel)
    except RuntimeError:
        # torch < 2.13 accepts only a JITFunction, not the InterpretedFunction that triton.jit
        # makes under TRITON_INTERPRET=1 (torch 2.11 + triton 3.6, the GPU machine's pair). The
        # interpreter runs CPU tensors, which the ops never decompose into a trace: launch the
        # kernel itself.
        if interpreter_enabled():
            return kernel
        raise


def _rows(t: Tensor, d: int) -> Tensor:
    """``t`` as a ``[T, D]`` view with unit column stride (a copy only when impossible)."""
    r = t.reshape(-1, d)
    if d > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def _vec(t: Tensor) -> Tensor:
    """A ``[D]`` parameter as the kernels read it: unit stride (a strided or expanded query or
    gain is copied; the kernels index it as ``ptr + d``)."""
    return t if t.stride(0) == 1 else t.contiguous()


def _grid(num_tiles: int, device: torch.device, num_programs: int | None) -> int:
    cap = num_programs if num_programs is not None else max_programs(device)
    return max(1, min(num_tiles, cap))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(spec: KernelSpec, args: Sequence, *, t: int, device: torch.device, num_programs: int | None,
            programs: int | None = None, num_warps: int | None = None) -> None:
    """What every launcher shares: generate (or load) the kernel of `spec`, and launch it with
    `args` on a persistent grid over the `t` tokens (at most `num_programs` programs, or exactly
    `programs`)."""
    p = programs if programs is not None else _grid(_cdiv(t, spec.block_t), device, num_programs)
    _wrap(load_kernel(spec))[(p,)](*args, num_warps=num_warps or choose_num_warps(spec.block_t, spec.d))


def forward(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float, *,
            block_t: int | None = None, num_programs: int | None = None) -> Tensor:
    """``h`` [..., D] in the sources' dtype; one read of every source element."""
    return _forward_launch(sources, query, norm_weight, eps, scale, block_t=block_t, num_programs=num_programs)


def forward_norm(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float,
                 weight: Tensor, bias: Tensor | None, norm_eps: float, *, kind: str, block_t: int | None = None,
                 num_programs: int | None = None) -> Tensor:
    """``norm(h)`` [..., D] with the site ``h`` never written: the site fused with the RMSNorm
    (``kind="rmsnorm"``: ``h * rsqrt(mean(h^2) + norm_eps) * weight``) or LayerNorm
    (``kind="layernorm"``: ``(h - mean) * rsqrt(var + norm_eps) * weight + bias``) that reads it.
    Moves ``M*D`` read and ``D`` written per token, against ``M*D + D`` read and ``2*D`` written
    for the site and the norm apart."""
    if kind not in ("rmsnorm", "layernorm"):
        raise ValueError(f"kind must be 'rmsnorm' or 'layernorm', got {kind!r}")
    if (bias is None) != (kind == "rmsnorm"):
        raise ValueError("a LayerNorm epilogue takes a bias; an RMSNorm epilogue none")
    params = [_vec(weight)] + ([_vec(bias)] if bias is not None else [])
    return _forward_launch(sources, query, norm_weight, eps, scale, variant=kind, params=params,
                           tail=[float(norm_eps)], block_t=block_t, num_programs=num_programs)


def _forward_launch(sources, query, norm_weight, eps, scale, *, variant: str = "", params=(), tail=(),
                    block_t: int | None, num_programs: int | None) -> Tensor:
    """Launch the ``fwd`` kernel ``variant``: arguments ``sources, row strides, query, gain,
    *params, out, T, eps, scale, *tail``."""
    first = sources[0]
    query, norm_weight = _vec(query), _vec(norm_weight)
    d = first.shape[-1]
    rows = [_rows(s, d) for s in sources]
    t = rows[0].shape[0]
    out = torch.empty((t, d), dtype=first.dtype, device=first.device)
    if t > 0:
        spec = KernelSpec("fwd", d=d, dtype=SUPPORTED_DTYPES[first.dtype], m=len(sources),
                          block_t=block_t or choose_block_t(d, "fwd"), variant=variant)
        _launch(spec, [*rows, *[r.stride(0) for r in rows], query, norm_weight, *params, out, t, float(eps),
                       float(scale), *tail], t=t, device=first.device, num_programs=num_programs)
    return out.view(first.shape)


def forward_partial(blocks: Sequence[Tensor], prev: Tensor, add: Tensor, query: Tensor, norm_weight: Tensor,
                    eps: float, scale: float, *, block_t: int | None = None,
                    num_programs: int | None = None) -> tuple[Tensor, Tensor]:
    """``(h, new_partial)``: the block partial-sum add ``new_partial = prev + add`` fused into
    the site over ``[*blocks, new_partial]`` that follows it. Per token: reads the blocks, ``prev``
    and ``add`` once and writes ``new_partial`` and ``h``; apart, the site would read
    ``new_partial`` back (``D`` more read per token)."""
    first = prev
    d = first.shape[-1]
    query, norm_weight = _vec(query), _vec(norm_weight)
    rows = [_rows(b, d) for b in blocks]
    p_rows, a_rows = _rows(prev, d), _rows(add, d)
    t = p_rows.shape[0]
    new_partial = torch.empty((t, d), dtype=first.dtype, device=first.device)
    out = torch.empty((t, d), dtype=first.dtype, device=first.device)
    if t > 0:
        spec = KernelSpec("fwd", d=d, dtype=SUPPORTED_DTYPES[first.dtype], m=len(blocks) + 1,
                          block_t=block_t or choose_block_t(d, "fwd"), variant="partial")
        _launch(spec, [*rows, p_rows, a_rows, new_partial, *[r.stride(0) for r in rows], p_rows.stride(0),
                       a_rows.stride(0), query, norm_weight, out, t, float(eps), float(scale)],
                t=t, device=first.device, num_programs=num_programs)
    return out.view(first.shape), new_partial.view(first.shape)


def _resident_block_t(rows: int, d: int, dtype: str, bt: int) -> int:
    """Shrink the token tile (not below 1) until ``rows`` source rows of it fit on chip."""
    while bt > 1 and not resident_fits(rows, d, dtype, bt):
        bt //= 2
    return bt


def backward_variant(m: int, d: int, dtype: torch.dtype, block_t: int) -> str:
    return "resident" if resident_fits(m, d, SUPPORTED_DTYPES[dtype], block_t) else "twopass"


def backward(grad_out: Tensor, sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
             scale: float, *, block_t: int | None = None, num_programs: int | None = None,
             variant: str | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
    """Gradients of every source, of the query and of the norm gain."""
    first = sources[0]
    query, norm_weight = _vec(query), _vec(norm_weight)
    d = first.shape[-1]
    m = len(sources)
    dtype = SUPPORTED_DTYPES[first.dtype]
    rows = [_rows(s, d) for s in sources]
    t = rows[0].shape[0]
    grad = grad_out.reshape(-1, d)  # expanded grads keep their (zero) strides
    grads = [torch.empty((t, d), dtype=first.dtype, device=first.device) for _ in range(m)]
    dq = torch.empty(d, dtype=query.dtype, device=query.device)
    dg = torch.empty(d, dtype=norm_weight.dtype, device=norm_weight.device)
    if t == 0:
        dq.zero_()
        dg.zero_()
        return [g.view(first.shape) for g in grads], dq, dg
    bt = block_t or _resident_block_t(m, d, dtype, choose_block_t(d, "bwd"))
    var = variant or backward_variant(m, d, first.dtype, bt)
    p = _grid(_cdiv(t, bt), first.device, num_programs)
    partial = torch.empty((p, d), dtype=torch.float32, device=first.device)
    _launch(KernelSpec("bwd", d=d, dtype=dtype, m=m, block_t=bt, variant=var),
            [grad, grad.stride(0), grad.stride(1), *rows, *[r.stride(0) for r in rows], *grads,
             query, norm_weight, partial, t, float(eps), float(scale)],
            t=t, device=first.device, num_programs=num_programs, programs=p)
    bc = min(next_power_of_2(d), 1024)  # the per-program partial gradients of query and gain, summed
    _launch(KernelSpec("reduce", d=d, block_t=bc), [partial, query, norm_weight, dq, dg, p],
            t=d, device=first.device, num_programs=None, programs=_cdiv(d, bc), num_warps=4)
    return [g.view(first.shape) for g in grads], dq, dg


def phase1_variant(n: int, d: int, dtype: torch.dtype, block_t: int) -> str:
    return "resident" if resident_fits(n, d, SUPPORTED_DTYPES[dtype], block_t) else "twopass"


def phase1(blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, eps: float, *, block_t: int | None = None,
           num_programs: int | None = None, variant: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(o [S, ..., D] unnormalised, m [S, ...], z [S, ...])``: one read of every block."""
    first = blocks[0]
    d = first.shape[-1]
    n = len(blocks)
    s = queries.shape[0]
    lead = first.shape[:-1]
    dtype = SUPPORTED_DTYPES[first.dtype]
    rows = [_rows(b, d) for b in blocks]
    t = rows[0].shape[0]
    o = torch.empty((s, t, d), dtype=first.dtype, device=first.device)
    mx = torch.empty((s, t), dtype=torch.float32, device=first.device)
    z = torch.empty((s, t), dtype=torch.float32, device=first.device)
    if t > 0:
        bt = block_t or _resident_block_t(n, d, dtype, choose_block_t(d, "phase1"))
        var = variant or phase1_variant(n, d, first.dtype, bt)
        _launch(KernelSpec("phase1", d=d, dtype=dtype, m=n, s=s, block_t=bt, variant=var),
                [*rows, *[r.stride(0) for r in rows], queries.contiguous(), gains.contiguous(), o, mx, z, t,
                 float(eps)], t=t, device=first.device, num_programs=num_programs)
    return o.view(s, *lead, d), mx.view(s, *lead), z.view(s, *lead)


def phase2(o: Tensor, m: Tensor, z: Tensor, partial: Tensor | None, query: Tensor, gain: Tensor, eps: float,
           scale: float, *, block_t: int | None = None, num_programs: int | None = None) -> Tensor:
    """``h [..., D]``: phase 1's state of one site merged with the running partial (if any)."""
    d = o.shape[-1]
    query, gain = _vec(query), _vec(gain)
    dtype = SUPPORTED_DTYPES[o.dtype]
    o_rows = _rows(o, d)
    t = o_rows.shape[0]
    m_flat = m.reshape(-1).contiguous()
    z_flat = z.reshape(-1).contiguous()
    out = torch.empty((t, d), dtype=o.dtype, device=o.device)
    if t > 0:
        variant = "partial" if partial is not None else "nopartial"
        args: list = [o_rows, o_rows.stride(0), m_flat, z_flat]
        if partial is not None:
            p_rows = _rows(partial, d)
            args += [p_rows, p_rows.stride(0)]
        _launch(KernelSpec("phase2", d=d, dtype=dtype, block_t=block_t or choose_block_t(d, "phase2"),
                           variant=variant), [*args, query, gain, out, t, float(eps), float(scale)],
                t=t, device=o.device, num_programs=num_programs)
    return out.view(o.shape)
