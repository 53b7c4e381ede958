"""The depth-attention operator ``attnres::depth_attention`` and its analytic backward.

Math (SPEC.md section 2), per token, with sources ``v_1..v_M`` of shape ``[..., D]``,
pseudo-query ``w`` and key-norm gain ``g`` (both ``[D]``)::

    r_j     = rms(v_j) = sqrt(mean_d(v_jd^2) + eps)
    s_j     = sum_d w_d * g_d * v_jd / r_j
    alpha   = softmax_j(s_j)
    h       = scale * sum_j alpha_j * v_j

Two custom ops are registered, so that graphs captured by ``torch.export`` or aot_autograd see
one node for the forward and one for the backward:

* ``attnres::depth_attention(Tensor[] sources, Tensor query, Tensor norm_weight, float eps,
  float scale) -> Tensor``
* ``attnres::depth_attention_backward(Tensor grad_out, Tensor[] sources, Tensor query,
  Tensor norm_weight, float eps, float scale) -> (Tensor[], Tensor, Tensor)``

The backward is analytic (it does not autograd through the forward). With ``u = w * g``,
``k_j = v_j / r_j`` and ``G = scale * grad_out``::

    da_j           = G . v_j
    ds_j           = alpha_j * (da_j - sum_i alpha_i * da_i)
    grad v_j       = alpha_j * G + ds_j * (u / r_j - s_j * v_j / (D * r_j^2))
    du             = sum over tokens of sum_j ds_j * k_j
    grad query     = du * g
    grad norm_wt   = du * w

All math runs in float32 (float64 when the sources are float64); results are cast back to
each input's dtype.

Where the work runs (``kernels/dispatch.py``, docs/kernels.md):

* CUDA tensors: generated Triton kernels (``ops/kernels/triton_codegen.py``), launched through
  ``torch.library.wrap_triton`` from ``torch.library.triton_op`` bodies, so Inductor sees them.
  Each kernel variant checks itself on first use against ops/reference.py and is
  disabled, with one warning, when it fails (``ops/kernels/selfcheck.py``).
* CPU tensors: the native kernels built at install (``attnres_compile._C``,
  ``ops/kernels/cpu.py``), falling back to ops/reference.py when the
  package was installed without them (one warning); the plain path can be forced with
  :func:`plain_cpu_path`.
* Eager CPU calls outside any capture (no Dynamo, export, dispatch mode, functorch transform
  or tensor subclass) skip the Python op altogether: :func:`depth_attention` and the converted
  models' sites call ``attnres_native::depth_attention``, whose forward and analytic backward are
  C++ (one dispatcher call per site). Every capture still records ``attnres::depth_attention``.
* Everything else, and fake tensors: the plain PyTorch functions of ``ops/reference.py``,
  the one statement of the math, which the kernels are tested against.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .kernels import cpu as cpu_kernels
from .kernels import dispatch as _dispatch
from .paths import NATIVE_CPU, TRITON, pytorch_path, record_path, recording
from .reference import depth_attention_backward_reference, depth_attention_reference

__all__ = ["depth_attention", "depth_attention_call", "native_eager", "plain_cpu_path"]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_param(name: str, t: object, dim: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [D] = [{dim}], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if tuple(t.shape) != (dim,):
        raise ValueError(
            f"{name} must have shape [D] = [{dim}] (D is the last dimension of the sources), "
            f"got {list(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the sources are on {device}")


def check_tensor_sequence(name: str, seq: object, count: str) -> Tensor:
    """`seq` must be a non-empty list/tuple of floating tensors [..., D] (D >= 1) that agree in
    shape, dtype and device; raise TypeError/ValueError naming `name[i]` otherwise. Returns seq[0]."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(seq) == 0:
        raise ValueError(f"{name} must contain at least one tensor ({count} >= 1), got an empty sequence")
    for i, s in enumerate(seq):
        if not isinstance(s, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(s).__name__}")
    first = seq[0]
    if first.dim() == 0:
        raise ValueError(f"{name}[0] must have shape [..., D] with at least one dimension, got a 0-d tensor")
    if not first.is_floating_point():
        raise TypeError(f"{name} must be floating-point tensors, got {name}[0] of dtype {first.dtype}")
    if first.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension D, got shape {list(first.shape)}")
    for i, s in enumerate(seq[1:], start=1):
        for what, mine, theirs, exc in (("shape", list(s.shape), list(first.shape), ValueError),
                                        ("dtype", s.dtype, first.dtype, TypeError),
                                        ("device", s.device, first.device, ValueError)):
            if mine != theirs:
                raise exc(f"{name}[{i}] has {what} {mine} but {name}[0] has {what} {theirs}; "
                          f"all {name} must have the same {what}")
    return first


def _check_inputs(sources: object, query: object, norm_weight: object, eps: object, scale: object) -> None:
    """Raise TypeError/ValueError naming the offending argument; return None when all is well."""
    first = check_tensor_sequence("sources", sources, "M")
    dim = first.shape[-1]
    _check_param("query", query, dim, first.device)
    _check_param("norm_weight", norm_weight, dim, first.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------
#
# Each op has one device-generic body (CUDA -> generated Triton kernels through wrap_triton;
# other devices and fake tensors -> ops/reference.py) and a CPU kernel (the compiled C fast
# path, falling back to ops/reference.py). See ``kernels/dispatch.py``.


def _forward(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float,
             *, c_kernels: bool) -> Tensor:
    """Checks, then the first available of: Triton kernel, generated C kernel (CPU), plain PyTorch."""
    _check_inputs(sources, query, norm_weight, eps, scale)
    if _dispatch.use_triton(sources[0], "forward"):
        from .kernels import triton_launch as triton_kernels

        if recording:
            record_path(query, TRITON)
        return triton_kernels.forward(sources, query, norm_weight, eps, scale)
    if c_kernels and _FAST_CPU[0]:
        out = cpu_kernels.forward(sources, query, norm_weight, eps, scale)
        if out is not None:
            if recording:
                record_path(query, NATIVE_CPU)
            return out
    if recording:
        record_path(query, pytorch_path(sources[0], "forward"))
    return depth_attention_reference(sources, query, norm_weight, eps=eps, scale=scale).contiguous()


def _backward_dispatch(grad_out: Tensor, sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
                       scale: float, *, c_kernels: bool) -> tuple[list[Tensor], Tensor, Tensor]:
    """As `_forward`, for the backward op."""
    _check_inputs(sources, query, norm_weight, eps, scale)
    _check_grad_out(grad_out, sources)
    if _dispatch.use_triton(sources[0], "backward"):
        from .kernels import triton_launch as triton_kernels

        return triton_kernels.backward(grad_out, sources, query, norm_weight, eps, scale)
    if c_kernels and _FAST_CPU[0]:
        out = cpu_kernels.backward(grad_out, sources, query, norm_weight, eps, scale)
        if out is not None:
            return out
    return depth_attention_backward_reference(grad_out, sources, query, norm_weight, eps=eps, scale=scale)


def _depth_attention_body(
    sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float
) -> Tensor:
    return _forward(sources, query, norm_weight, eps, scale, c_kernels=False)


def _depth_attention_cpu(
    sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float
) -> Tensor:
    return _forward(sources, query, norm_weight, eps, scale, c_kernels=True)


def _check_grad_out(grad_out: object, sources: list[Tensor]) -> None:
    if not isinstance(grad_out, Tensor):
        raise TypeError(f"grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    if grad_out.shape != sources[0].shape:
        raise ValueError(f"grad_out has shape {list(grad_out.shape)}, expected {list(sources[0].shape)}")


def _depth_attention_backward_body(
    grad_out: Tensor, sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor, Tensor]:
    return _backward_dispatch(grad_out, sources, query, norm_weight, eps, scale, c_kernels=False)


def _depth_attention_backward_cpu(
    grad_out: Tensor, sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor, Tensor]:
    return _backward_dispatch(grad_out, sources, query, norm_weight, eps, scale, c_kernels=True)


#: Whether CPU tensors use the native kernels (``ops/kernels/cpu.py``) when available.
_FAST_CPU = [True]
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: What the native eager path accepts: plain dense CPU tensors (a Parameter is one; a subclass
#: such as DTensor or AsyncCollectiveTensor, a fake, meta, sparse or nested tensor is not).
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_STRIDED = torch.strided


def native_eager(sources: Sequence[object], query: object, norm_weight: object) -> bool:
    """Whether a site over ``sources`` can run the native eager op: every source, the query and
    the gain plain dense CPU tensors (``_PLAIN_TYPES``, strided layout, not nested: native code
    must never receive a tensor it cannot read, e.g. a subclass), a native dtype, the native
    kernels built, and nothing recording or transforming the call (a capture must see
    ``attnres::depth_attention``). Runs once per eager site, so every check is a cheap attribute
    or C call."""
    if not _FAST_CPU[0] or torch.compiler.is_compiling():  # Dynamo folds this to True and traces nothing after
        return False
    for t in (*sources, query, norm_weight):
        if type(t) not in _PLAIN_TYPES or t.layout is not _STRIDED or not t.is_cpu or t.is_nested:
            return False
    if sources[0].dtype not in _NATIVE_DTYPES:
        return False
    if (_len_dispatch_stack() or _functorch_active() or torch.jit.is_tracing()
            or _dispatch.triton_on_cpu_enabled()):    # (tests route CPU tensors to the Triton kernels)
        return False
    if not _CPU_KERNELS:
        _CPU_KERNELS.append(cpu_kernels)
    return _CPU_KERNELS[0].available()


_CPU_KERNELS: list = []
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def depth_attention_call(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
                         scale: float) -> Tensor:
    """The site as converted models run it (arguments already checked by construction): the
    native eager op when :func:`native_eager` allows, else the ``attnres::depth_attention`` op."""
    if native_eager(sources, query, norm_weight):
        if recording:
            record_path(query, NATIVE_CPU)
        return _native_entry()(sources, query, norm_weight, eps, scale)
    return torch.ops.attnres.depth_attention.default(sources, query, norm_weight, eps, scale)


_ENTRY: list = []


def _native_entry():
    """``attnres_compile._C.depth_attention``: the eager site without the boxed op dispatch."""
    if not _ENTRY:
        _ENTRY.append(cpu_kernels.native_module().depth_attention)
    return _ENTRY[0]


@contextlib.contextmanager
def plain_cpu_path() -> Iterator[None]:
    """Run the CPU ops with the plain PyTorch implementation inside this block (for tests and
    benchmarks that compare the two paths)."""
    prev = _FAST_CPU[0]
    _FAST_CPU[0] = False
    try:
        yield
    finally:
        _FAST_CPU[0] = prev


_depth_attention_op = _dispatch.define_op("attnres::depth_attention", _depth_attention_body, _depth_attention_cpu)
_depth_attention_backward_op = _dispatch.define_op(
    "attnres::depth_attention_backward", _depth_attention_backward_body, _depth_attention_backward_cpu
)


def _setup_context(ctx, inputs, output) -> None:
    sources, query, norm_weight, eps, scale = inputs
    ctx.save_for_backward(*sources, query, norm_weight)
    ctx.num_sources = len(sources)
    ctx.eps = eps
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor):
    *sources, query, norm_weight = ctx.saved_tensors
    # For a list argument, needs_input_grad holds a list of bools (one per source).
    need_sources, need_query, need_norm_weight = ctx.needs_input_grad[:3]
    if not (any(need_sources) or need_query or need_norm_weight):
        return [None] * ctx.num_sources, None, None, None, None
    grad_sources, grad_query, grad_norm_weight = torch.ops.attnres.depth_attention_backward(
        grad_out, list(sources), query, norm_weight, ctx.eps, ctx.scale
    )
    grad_sources = [gs if need else None for gs, need in zip(grad_sources, need_sources)]
    return (
        grad_sources,
        grad_query if need_query else None,
        grad_norm_weight if need_norm_weight else None,
        None,
        None,
    )


_depth_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def depth_attention(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Tensor,
    *,
    eps: float,
    scale: float = 1.0,
) -> Tensor:
    """Depth attention over ``M`` sources (SPEC.md section 2), as one ``attnres::depth_attention`` op.

    Args:
        sources: ``M >= 1`` tensors ``v_1..v_M`` of shape ``[..., D]``, all with the same shape,
            floating dtype and device (any number of leading dims, including none).
        query: pseudo-query ``w``, shape ``[D]``.
        norm_weight: key-norm gain ``g``, shape ``[D]``.
        eps: added to the mean square inside the RMS; must be > 0.
        scale: output multiplier (1 in the paper's mode, ``M`` in exact-retrofit mode).

    Returns:
        ``h = scale * sum_j softmax_j(w . (g * v_j) / rms(v_j)) * v_j``, shape ``[..., D]``, in the
        sources' dtype (math in float32, or float64 for float64 sources). Differentiable with
        respect to every source, ``query`` and ``norm_weight`` through an analytic backward op.

    Raises:
        TypeError / ValueError naming the argument on bad input.
    """
    if isinstance(sources, (list, tuple)) and sources and native_eager(sources, query, norm_weight) \
            and type(eps) is float and type(scale) is float:
        if recording:
            record_path(query, NATIVE_CPU)
        try:
            return _native_entry()(list(sources), query, norm_weight, eps, scale)
        except (RuntimeError, TypeError, ValueError):
            _check_inputs(sources, query, norm_weight, eps, scale)  # the same error, worded as everywhere else
            raise
    _check_inputs(sources, query, norm_weight, eps, scale)
    return torch.ops.attnres.depth_attention(list(sources), query, norm_weight, float(eps), float(scale))
