"""The CPU kernels of depth attention: ``attnres_compile._C``, built once at install.

``csrc/attnres_cpu.cpp`` (with the kernels in ``csrc/attnres_kernels.h``) is compiled by the
package's build (``setup.py``, a torch C++ extension) into ``attnres_compile._C``, which
registers the ``attnres_native::*`` PyTorch ops: ``forward``, ``backward``, ``phase1``,
``phase2`` (kernels only, the CPU kernels of the ``attnres::*`` ops call them) and
``depth_attention`` (forward with a C++ autograd node, the eager fast path of
``ops/depth_attention.py``: one dispatcher call per site and no Python in between).

The kernels make one pass over memory per token (docs/kernels.md): each source row is swept
once for its sum of squares and ``u . v``, the M logits go through a softmax, and the
weighted sum runs over ``d`` with up to 8 rows as unrolled streams while they are in L1/L2.
The backward's ``du`` is summed per fixed 64-token chunk and the chunks in order, so results
do not depend on the thread count. Threads are ATen's intra-op pool (``torch.set_num_threads``).

Portability: no ``-march=native``. The kernels are compiled for baseline x86-64, AVX2+FMA and
AVX-512 and the widest the CPU supports is chosen when the library loads (:func:`isa`,
:func:`select_isa`); no C compiler is needed at run time.

Without the built library (an isolated build without torch, no compiler at install, another
torch than the one it was built against) :func:`available` is false, the ops run their plain
PyTorch implementation and one warning says why (:func:`warn_once`). ``ATTNRES_CPU_KERNELS=0``
(read when this module is imported) turns the native path off on purpose (no warning).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["available", "load_error", "supports", "forward", "backward", "phase1", "phase2", "isa",
           "select_isa", "warn_once"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


_DISABLED = os.environ.get("ATTNRES_CPU_KERNELS", "1") in ("0", "false", "False", "")


def _load() -> bool:
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    with _LOCK:
        if "ok" not in _STATE:
            try:
                _STATE["module"] = native_module()  # registers the attnres_native ops
                _STATE["ok"] = hasattr(torch.ops.attnres_native, "forward")
                if not _STATE["ok"]:
                    _STATE["error"] = "attnres_compile._C loaded but registered no attnres_native ops"
            except ImportError as exc:  # not built, or built against another torch
                _STATE["ok"] = False
                _STATE["error"] = f"{type(exc).__name__}: {exc}"
    return bool(_STATE["ok"])


def native_module():
    """The compiled extension `attnres_compile._C` (ImportError when it was not built).

    Imported by its name: it is a compiled module at the package's root (setup.py builds it
    there), not Python code of a room of the package, and `from ... import _C` would read as an
    import of the package itself."""
    return importlib.import_module("attnres_compile._C")


def available() -> bool:
    """Whether the native CPU kernels run (built at install, loadable, not disabled)."""
    ok = _STATE.get("ok")   # the per-call check of every eager site: keep it a dict lookup
    if ok is None:
        ok = _load()
    return ok and not _DISABLED


def load_error() -> str | None:
    """Why the native kernels did not load (None when they did, or were never tried)."""
    _load()
    return _STATE.get("error")  # type: ignore[return-value]


def warn_once() -> None:
    """One warning per process when the native kernels are missing (not when disabled)."""
    if _DISABLED or _load() or _STATE.get("warned"):
        return
    _STATE["warned"] = True
    warnings.warn(
        "attnres_compile: the native CPU kernels (attnres_compile._C) are not available "
        f"({load_error()}); depth attention runs its plain PyTorch implementation on CPU, which is "
        "slower. Reinstall with torch already installed: pip install --no-build-isolation attnres-compile",
        RuntimeWarning, stacklevel=3)


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPES


def isa() -> str:
    """The kernel build in use: ``"base"`` (x86-64), ``"avx2"`` or ``"avx512"``."""
    if not _load():
        raise RuntimeError(f"the native CPU kernels are not available ({load_error()})")
    return torch.ops.attnres_native.isa()


def select_isa(name: str) -> str:
    """Use the kernel build ``name`` (``"base"``, ``"avx2"``, ``"avx512"`` or ``"best"``), for tests
    and benchmarks; returns the one in use."""
    if not _load():
        raise RuntimeError(f"the native CPU kernels are not available ({load_error()})")
    return torch.ops.attnres_native.select_isa(name)


def _usable(t: Tensor) -> bool:
    if not available():
        warn_once()
        return False
    return t.dtype in _DTYPES


def forward(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float, *,
            out: Tensor | None = None) -> Tensor | None:
    """``h`` [..., D] (contiguous; written into ``out`` when given), or None when the native
    kernels cannot run (caller falls back)."""
    if not _usable(sources[0]):
        return None
    if out is not None:
        torch.ops.attnres_native.forward_out.default(list(sources), query, norm_weight, float(eps), float(scale), out)
        return out
    return torch.ops.attnres_native.forward.default(list(sources), query, norm_weight, float(eps), float(scale))


def backward(grad_out: Tensor, sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
             scale: float, *, out: Sequence[Tensor] | None = None) -> tuple[list[Tensor], Tensor, Tensor] | None:
    """Gradients of every source (into ``out`` when given), of the query and of the norm gain, or
    None (caller falls back)."""
    if not _usable(sources[0]):
        return None
    if out is not None:
        dq, dg = torch.ops.attnres_native.backward_out.default(grad_out, list(sources), query, norm_weight,
                                                                float(eps), float(scale), list(out))
        return list(out), dq, dg
    grads, dq, dg = torch.ops.attnres_native.backward.default(grad_out, list(sources), query, norm_weight,
                                                             float(eps), float(scale))
    return list(grads), dq, dg


def phase1(blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(o [S, ..., D], m [S, ...], z [S, ...])`` of two-phase inference, or None."""
    if not _usable(blocks[0]):
        return None
    return torch.ops.attnres_native.phase1.default(list(blocks), queries, gains, float(eps))


def phase2(o: Tensor, m: Tensor, z: Tensor, partial: Tensor | None, query: Tensor, gain: Tensor, eps: float,
           scale: float) -> Tensor | None:
    """``h [..., D]``: phase 1's state of one site merged with its partial sum (if any), or None."""
    if not _usable(o):
        return None
    return torch.ops.attnres_native.phase2.default(o, m, z, partial, query, gain, float(eps), float(scale))
