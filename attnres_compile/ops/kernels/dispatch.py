"""How the ``attnres::*`` ops are registered and where their tensors go.

Every op has one device-generic body ``fn`` (CUDA tensors -> the generated Triton kernels,
launched through ``torch.library.wrap_triton``; anything else -> the plain PyTorch
implementation, which also serves as the fake/meta implementation) and one CPU kernel (the
compiled C fast path, falling back to plain PyTorch).

With triton importable the op is a ``torch.library.triton_op``: under ``torch.compile`` /
aot_autograd (``FunctionalTensorMode``) the op is decomposed into its body, so Inductor sees
the ``triton_kernel_wrapper`` calls and schedules the generated kernels itself. That
decomposition is restricted to CUDA tensors here: on any other device the op stays one opaque
node (and runs its CPU kernel), which is what graph passes, ONNX export and the one-node
tests expect. Without triton it is a plain ``torch.library.custom_op`` with the same body.

Each kernel variant checks itself on first use (``ops/kernels/selfcheck.py``): :func:`use_triton`
is false for a variant whose probe failed, and the body runs its PyTorch implementation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import selfcheck

log = logging.getLogger(__name__)

__all__ = ["define_op", "use_triton", "triton_disabled_reason", "triton_on_cpu", "is_triton_op"]

_TRITON_ON_CPU = [False]


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Route CPU tensors to the Triton kernels inside this block (needs ``TRITON_INTERPRET=1``;
    used by tests to run the Triton path of the ops on a machine without a GPU)."""
    from .triton_launch import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    prev = _TRITON_ON_CPU[0]
    _TRITON_ON_CPU[0] = True
    try:
        yield
    finally:
        _TRITON_ON_CPU[0] = prev


def triton_on_cpu_enabled() -> bool:
    return _TRITON_ON_CPU[0]


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake

        return is_fake(t)
    except Exception:  # pragma: no cover
        return False


_TRITON_OK: list[bool] = []


def triton_importable() -> bool:
    if not _TRITON_OK:
        try:
            ok = importlib.util.find_spec("triton") is not None
            if ok:
                import triton  # noqa: F401
        except Exception:  # not installed, broken install, or blocked
            ok = False
        _TRITON_OK.append(ok)
    return _TRITON_OK[0]


def _triton_eligible(t: Tensor) -> bool:
    from .triton_spec import SUPPORTED_DTYPES

    if t.dtype not in SUPPORTED_DTYPES or not triton_importable():
        return False
    if t.device.type == "cuda":
        from .triton_launch import interpreter_enabled

        # The interpreter cannot run on fake tensors; let the plain body trace instead.
        return not (interpreter_enabled() and _is_fake(t))
    return t.device.type == "cpu" and _TRITON_ON_CPU[0] and not _is_fake(t)


def use_triton(t: Tensor, variant: str) -> bool:
    """Whether an op body should launch the generated Triton kernel ``variant`` (one of
    ``lowering.selfcheck.VARIANTS``) for tensor ``t``: a CUDA tensor (or a CPU tensor under
    :func:`triton_on_cpu`) of a supported dtype, and the variant has passed its first-use
    self-check for that dtype and device (``ops/kernels/selfcheck.py``; it runs on the first call)."""
    return _triton_eligible(t) and selfcheck.kernel_ok(variant, t)


def triton_disabled_reason(t: Tensor, variant: str) -> str | None:
    """Why the kernel ``variant`` does not run for ``t`` although it could (its self-check
    failed), else None. Never probes."""
    return selfcheck.disabled_reason(variant, t) if _triton_eligible(t) else None


def is_triton_op(name: str) -> bool:
    """Whether op ``name`` (e.g. ``"attnres::depth_attention"``) was registered as a triton_op."""
    from torch._library.custom_ops import OPDEFS

    return bool(getattr(OPDEFS.get(name), "_attnres_triton_op", False))


def define_op(name: str, fn: Callable, cpu_kernel: Callable):
    """Register ``name`` with body ``fn`` (device generic, also the fake impl) and CPU kernel."""
    op = None
    if triton_importable():
        try:
            op = torch.library.triton_op(name, fn, mutates_args=())
            _decompose_only_on_cuda(op)
            op._attnres_triton_op = True
        except Exception as exc:  # pragma: no cover - depends on the torch/triton pair
            log.warning("attnres_compile: torch.library.triton_op(%s) failed (%s); using custom_op", name, exc)
            op = None
    if op is None:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        op._attnres_triton_op = False
    op.register_kernel("cpu", cpu_kernel)
    return op


def _decompose_only_on_cuda(op) -> None:
    """Keep triton_op's FunctionalTensorMode decomposition for CUDA inputs only."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    decompose = op._torch_dispatch_fns[FunctionalTensorMode]

    def functional_rule(mode, func, types, args, kwargs):
        if _all_cuda((args, kwargs)):
            return decompose(mode, func, types, args, kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional_rule)


def _all_cuda(tree) -> bool:
    leaves = [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, Tensor)]
    return bool(leaves) and all(x.device.type == "cuda" for x in leaves)
