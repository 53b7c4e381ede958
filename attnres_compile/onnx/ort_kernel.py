"""The fused onnxruntime kernel for `attnres::DepthAttention` (SPEC section 6).

``csrc/ort_kernel.c`` is an onnxruntime custom-op library (C API, CPU, float32) that claims
the node by domain and name, so that onnxruntime runs one fused kernel per site instead of
the model-local function body. The package's build (``setup.py``) compiles it once, at
install, into ``attnres_compile/_ort_kernel*.so`` (no ``-march=native``: it runs on any CPU
of its architecture), against the onnxruntime C API headers vendored in
``third_party/onnxruntime`` (onnxruntime 1.29.0, ``ORT_API_VERSION`` 29, MIT; used by the
build only). The C API is versioned, so the library loads in any onnxruntime >= 1.29. It is
registered per session with ``SessionOptions.register_custom_ops_library``.

Everything is optional: when the library was not built (no compiler at install), with
onnxruntime < 1.29, or with ``ATTNRES_ORT_KERNEL=0``, :func:`available` is false and
``ort_session()`` runs the function body (with a warning unless disabled on purpose).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

__all__ = ["available", "unavailable_reason", "library_path", "calls", "HEADER_API_VERSION"]

HEADER_API_VERSION = 29  # ORT_API_VERSION of the headers the library is built against

_STATE: dict[str, object] = {}


def disabled() -> bool:
    return os.environ.get("ATTNRES_ORT_KERNEL", "1") in ("0", "false", "False", "")


def _built_path() -> str | None:
    spec = importlib.util.find_spec("attnres_compile._ort_kernel")  # locates the file, loads nothing
    origin = getattr(spec, "origin", None) if spec is not None else None
    return origin if origin and os.path.exists(origin) else None


def unavailable_reason() -> str | None:
    """Why the fused kernel cannot run (None when it can)."""
    if disabled():
        return "disabled by ATTNRES_ORT_KERNEL=0"
    try:
        import onnxruntime
        major, minor = (int(x) for x in onnxruntime.__version__.split(".")[:2])
    except Exception as exc:  # noqa: BLE001 - no or odd onnxruntime: no fused path
        return f"onnxruntime is not importable ({exc})"
    if (major, minor) < (1, HEADER_API_VERSION):
        return f"onnxruntime {onnxruntime.__version__} is older than 1.{HEADER_API_VERSION}"
    if _built_path() is None:
        return "attnres_compile._ort_kernel was not built when the package was installed (no C compiler?)"
    return None


def available() -> bool:
    """True when the fused kernel can be registered: built at install, onnxruntime >= 1.29, not disabled."""
    return unavailable_reason() is None


def library_path() -> str:
    """Path of the custom-op library built at install; RuntimeError naming the reason otherwise."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the fused attnres::DepthAttention kernel is unavailable: {reason}")
    return _built_path()  # type: ignore[return-value]


def calls() -> int:
    """How many times onnxruntime ran the fused kernel in this process (for tests)."""
    lib = _STATE.get("ctypes")
    if lib is None:
        lib = ctypes.CDLL(library_path())  # the same handle onnxruntime's dlopen got
        lib.attnres_ort_calls.restype = ctypes.c_int64
        _STATE["ctypes"] = lib
    return int(lib.attnres_ort_calls())  # type: ignore[attr-defined]
