"""Self-check of the generated Triton kernels on first use (SPEC.md section 8, docs/kernels.md).

The kernels are generated per shape and dtype and compiled by whatever Triton and GPU the user
has; we cannot test every pair. So the first time an op would launch a kernel variant (see
:data:`VARIANTS`) for a given dtype and device, :func:`kernel_ok` runs that variant once on a
small probe (a few tiles of tokens at the call's feature width ``D``, several sources, a strided
source, a non-unit scale; every sub-kernel of the variant) and compares it with the op's math
(ops/reference.py) evaluated in float64: ``||out - ref|| / ||ref||`` must stay
under the SPEC section 7 tolerance of the dtype (:data:`TOLERANCE`), and NaN/inf never pass. A
compile error, a launch error or a mismatch disables the variant for the rest of the process:
one :class:`KernelSelfCheckWarning` names the variant, the dtype, the device and the measured
error (or the exception's first line), and the op runs its PyTorch implementation instead.
:func:`status` lists every probed variant.

Where it applies: real CUDA tensors always. CPU tensors routed to the kernels by
``ops.kernels.dispatch.triton_on_cpu()`` (the Triton interpreter, tests) only inside
:func:`forced` or with ``ATTNRES_SELFCHECK=1``, so that the tests that count the interpreter's
launches and bytes are not disturbed by probe launches.

Under ``torch.compile`` the op bodies are traced with fake/functional tensors. The decision is
still taken at trace time, on real tensors: the probe runs with every dispatch mode (fake,
functional, proxy) and functorch transform switched off, so it neither reads the traced
tensors nor records anything into the graph, and the traced graph then holds the kernel or the
PyTorch path accordingly. (Deferring the decision to run time would need a kernel in the graph
that we have not checked, or a PyTorch-only graph for ever.) During CUDA graph capture no probe
can run; an undecided variant then takes the PyTorch path for that call without caching.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .. import reference

__all__ = ["VARIANTS", "TOLERANCE", "KernelSelfCheckWarning", "kernel_ok", "disabled_reason", "status", "reset",
           "forced"]

#: The kernel variants checked, as the ops name them in ``use_triton(t, variant)``.
VARIANTS = ("forward", "backward", "phase1", "phase2", "forward_norm_rmsnorm", "forward_norm_layernorm",
            "forward_partial")

#: ``||out - ref|| / ||ref||`` against float64 (SPEC.md section 7; float16 as tested in the suite).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

_EPS = 1e-6
_SCALE = 1.5
_NORM_EPS = 1e-5


class KernelSelfCheckWarning(RuntimeWarning):
    """A generated Triton kernel failed its first-use self-check and was disabled."""


#: (variant, dtype, device) -> whether the kernel runs; _REASON holds why not.
_OK: dict[tuple, bool] = {}
_REASON: dict[tuple, str] = {}
_LOCK = threading.RLock()
_FORCED = [0]


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Self-check kernels run on CPU tensors too inside this block (``triton_on_cpu()`` tests)."""
    with _LOCK:
        _FORCED[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _FORCED[0] -= 1


def _forced() -> bool:
    return bool(_FORCED[0]) or os.environ.get("ATTNRES_SELFCHECK", "0") not in ("", "0", "false", "False")


def kernel_ok(variant: str, t: Tensor) -> bool:
    """Whether the generated kernel ``variant`` may run for tensors like ``t`` (its dtype and
    device); probes it on first use (module docstring). Cheap after the first call: a dict lookup."""
    key = (variant, t.dtype, t.device)
    ok = _OK.get(key)
    if ok is not None:
        return ok
    if key[2].type != "cuda" and not _forced():
        return True
    return _decide(key, t)


def disabled_reason(variant: str, t: Tensor) -> str | None:
    """Why ``variant`` is disabled for ``t``'s dtype and device, or None (ok or never probed)."""
    return _REASON.get((variant, t.dtype, t.device))


def status() -> dict[str, str]:
    """Every probed variant, ``"<variant> <dtype> <device>"`` -> ``"ok"`` or ``"disabled: <reason>"``."""
    with _LOCK:
        return {_key_text(k): "ok" if ok else f"disabled: {_REASON.get(k, '?')}" for k, ok in _OK.items()}


def reset() -> None:
    """Forget every decision (tests): the next use of each variant probes again."""
    with _LOCK:
        _OK.clear()
        _REASON.clear()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key_text(key: tuple) -> str:
    variant, dtype, device = key
    return f"{variant} {_dtype_name(dtype)} {device}"


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # pragma: no cover - a broken driver; the name is only for the message
            return str(device)
    return f"{device} (Triton interpreter)" if device.type == "cpu" else str(device)


def _decide(key: tuple, t: Tensor) -> bool:
    variant, dtype, device = key
    if variant not in _PROBES:
        raise ValueError(f"unknown Triton kernel variant {variant!r}; expected one of {VARIANTS}")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # no probe can run inside a CUDA graph capture; PyTorch is always right
    with _LOCK:
        ok = _OK.get(key)
        if ok is not None:  # another thread probed it meanwhile
            return ok
        d = t.shape[-1] if t.dim() else 0
        d = d if isinstance(d, int) and 0 < d <= 65536 else 64  # a SymInt (dynamic D) is not read
        try:
            with _real_tensors(device):
                what, err = _worst(_PROBES[variant](dtype, device, d))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            tol = TOLERANCE[dtype]
            reason = None if err <= tol else (
                f"{what}: non-finite values" if not math.isfinite(err) else
                f"{what}: relative error {err:.3g} > {tol:g} against ops/reference.py (float64)")
        except Exception as exc:  # compile errors, launch errors, out-of-resources ...
            from ...errors import first_line

            reason = f"raised {type(exc).__name__}: {first_line(exc)}"
        _OK[key] = reason is None
        if reason is not None:
            _REASON[key] = reason
            warnings.warn(
                f"attnres_compile: the generated Triton kernel {variant!r} ({_dtype_name(dtype)}, "
                f"{_device_label(device)}) failed its first-use self-check: {reason}. It is disabled for "
                f"this process; the op runs its PyTorch implementation instead.",
                KernelSelfCheckWarning, stacklevel=4)
        return reason is None


@contextlib.contextmanager
def _real_tensors(device: torch.device) -> Iterator[None]:
    """Outside any tracing: no fake/functional/proxy mode, no functorch transform, no autograd,
    no autocast (the probe's tensors are real and nothing it does is recorded)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes

    with contextlib.ExitStack() as stack:
        stack.enter_context(unset_fake_temporarily())
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch._C._DisableFuncTorch())
        stack.enter_context(torch.no_grad())
        if device.type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        yield


# -- the probes ----------------------------------------------------------------------------------
# Each returns [(what, kernel output, float64 reference)]; inputs come from a private generator.

def _rel(out: Tensor, ref: Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"shape {list(out.shape)} where ops/reference.py gives {list(ref.shape)}")
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    norm = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(out - ref).item()
    return diff / norm if norm > 0 else diff


def _worst(pairs: list[tuple[str, Tensor, Tensor]]) -> tuple[str, float]:
    worst = ("output", 0.0)
    for what, out, ref in pairs:
        err = _rel(out, ref)
        if not err <= worst[1]:
            worst = (what, err)
            if not math.isfinite(err):
                break
    return worst


class _Inputs:
    def __init__(self, dtype: torch.dtype, device: torch.device, d: int, kind: str):
        from .triton_spec import choose_block_t

        self.gen = torch.Generator().manual_seed(20260519)
        self.dtype, self.device, self.d = dtype, device, d
        self.t = 2 * choose_block_t(d, kind) + 3  # three tiles, the last partial, on two programs

    def randn(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        x = mean + std * torch.randn(shape, generator=self.gen, dtype=torch.float32)
        return x.to(self.dtype).to(self.device)

    def rows(self, m: int) -> list[Tensor]:
        """m sources [t, d]; the second a strided view (row stride d + 3)."""
        out = [self.randn(self.t, self.d) for _ in range(m)]
        if m > 1:
            out[1] = self.randn(self.t, self.d + 3)[:, : self.d]
        return out

    def param(self) -> tuple[Tensor, Tensor]:
        """A query of logits of order 1 at any d, and a gain near one."""
        return self.randn(self.d, std=2.0 / math.sqrt(self.d)), self.randn(self.d, std=0.1, mean=1.0)


def _f64(ts):
    return [t.double() for t in ts]


def _probe_forward(dtype, device, d):
    from . import triton_launch as tk

    x = _Inputs(dtype, device, d, "fwd")
    srcs, (q, g) = x.rows(3), x.param()
    out = tk.forward(srcs, q, g, _EPS, _SCALE, num_programs=2)
    return [("output", out, reference.depth_attention_reference(_f64(srcs), q.double(), g.double(), eps=_EPS, scale=_SCALE))]


def _probe_backward(dtype, device, d):
    from . import triton_launch as tk

    x = _Inputs(dtype, device, d, "bwd")
    srcs, (q, g) = x.rows(3), x.param()
    grad = x.randn(x.t, d)
    r_src, r_q, r_g = reference.depth_attention_backward_reference(grad.double(), _f64(srcs), q.double(), g.double(),
                                                            eps=_EPS, scale=_SCALE)
    pairs = []
    for var in ("resident", "twopass"):
        gs, dq, dg = tk.backward(grad, srcs, q, g, _EPS, _SCALE, num_programs=2, variant=var)
        pairs += [(f"{var} grad of sources[{j}]", a, b) for j, (a, b) in enumerate(zip(gs, r_src))]
        pairs += [(f"{var} grad of query", dq, r_q), (f"{var} grad of norm_weight", dg, r_g)]
    return pairs


def _probe_phase1(dtype, device, d):
    from . import triton_launch as tk

    x = _Inputs(dtype, device, d, "phase1")
    blocks = x.rows(3)
    (q0, g0), (q1, g1) = x.param(), x.param()
    qs, gs = torch.stack([q0, q1]), torch.stack([g0, g1])
    want = reference.phase1_reference(_f64(blocks), qs.double(), gs.double(), eps=_EPS)
    pairs = []
    for var in ("resident", "twopass"):
        got = tk.phase1(blocks, qs, gs, _EPS, num_programs=2, variant=var)
        pairs += [(f"{var} {name}", a, b) for name, a, b in zip(("o", "m", "z"), got, want)]
    return pairs


def _probe_phase2(dtype, device, d):
    from . import triton_launch as tk

    x = _Inputs(dtype, device, d, "phase2")
    blocks, partial = x.rows(2), x.randn(x.t, d)
    q, g = x.param()
    o, m, z = reference.phase1_reference(blocks, q[None], g[None], eps=_EPS)  # o in dtype, m and z float32
    o, m, z = o[0], m[0], z[0]
    pairs = []
    for name, p in (("with partial", partial), ("no partial", None)):
        got = tk.phase2(o, m, z, p, q, g, _EPS, _SCALE, num_programs=2)
        want = reference.phase2_reference(o.double(), m.double(), z.double(), None if p is None else p.double(),
                                    q.double(), g.double(), eps=_EPS, scale=_SCALE)
        pairs.append((f"output ({name})", got, want))
    return pairs


def _probe_norm(kind: str) -> Callable:
    def probe(dtype, device, d):
        from . import triton_launch as tk

        x = _Inputs(dtype, device, d, "fwd")
        srcs, (q, g) = x.rows(3), x.param()
        weight = x.randn(d, std=0.1, mean=1.0)
        bias = x.randn(d, std=0.1) if kind == "layernorm" else None
        out = tk.forward_norm(srcs, q, g, _EPS, _SCALE, weight, bias, _NORM_EPS, kind=kind, num_programs=2)
        h = reference.depth_attention_reference(_f64(srcs), q.double(), g.double(), eps=_EPS, scale=_SCALE)
        want = reference.norm_reference(h, kind, weight.double(), None if bias is None else bias.double(), _NORM_EPS)
        return [(f"{kind}(site)", out, want)]

    return probe


def _probe_partial(dtype, device, d):
    from . import triton_launch as tk

    x = _Inputs(dtype, device, d, "fwd")
    blocks, prev, add = x.rows(2), x.randn(x.t, d), x.randn(x.t, d)
    q, g = x.param()
    h, new_partial = tk.forward_partial(blocks, prev, add, q, g, _EPS, _SCALE, num_programs=2)
    p64 = prev.double() + add.double()
    want = reference.depth_attention_reference([*_f64(blocks), p64], q.double(), g.double(), eps=_EPS, scale=_SCALE)
    return [("new partial", new_partial, p64), ("output", h, want)]


_PROBES: dict[str, Callable] = {
    "forward": _probe_forward,
    "backward": _probe_backward,
    "phase1": _probe_phase1,
    "phase2": _probe_phase2,
    "forward_norm_rmsnorm": _probe_norm("rmsnorm"),
    "forward_norm_layernorm": _probe_norm("layernorm"),
    "forward_partial": _probe_partial,
}
