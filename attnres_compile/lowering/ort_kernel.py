"""The fused onnxruntime kernel for `attnres::DepthAttention` (SPEC section 6).

`ort_kernel.c` beside this file is an onnxruntime custom-op library (C API, CPU, float32)
that claims the node by domain and name, so that onnxruntime runs one fused kernel per site
instead of the model-local function body. It is compiled on first use with the system C
compiler (``-O3 -march=native``, as the PyTorch CPU kernels in ``cpu_kernels.py``) into
``<cache>/ort/<hash>.so`` and registered per session with
``SessionOptions.register_custom_ops_library``.

The onnxruntime wheel ships no C headers. ``ort_include/`` holds the three C API headers
(``onnxruntime_c_api.h``, ``onnxruntime_ep_c_api.h``, ``onnxruntime_error_code.h``) of
onnxruntime 1.29.0 (``ORT_API_VERSION`` 29), unchanged, with onnxruntime's MIT license; the C
API is versioned, so a library built against them loads in any onnxruntime >= 1.29. See
docs/onnx.md for where they come from.

Everything is optional: without a C compiler (or with ``ATTNRES_ORT_KERNEL=0``)
:func:`available` is false and sessions run the function body.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import threading
from pathlib import Path

from .cpu_kernels import _compiler, _machine_tag
from .triton_codegen import cache_dir

__all__ = ["available", "library_path", "calls", "HEADER_API_VERSION", "SOURCE", "INCLUDE_DIR"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ort_kernel.c")
INCLUDE_DIR = Path(__file__).with_name("ort_include")
HEADER_API_VERSION = 29  # ORT_API_VERSION of the headers in ort_include/
_CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def available() -> bool:
    """True when the fused kernel can be built: a C compiler, the headers, and not disabled."""
    if os.environ.get("ATTNRES_ORT_KERNEL", "1") in ("0", "false", "False", ""):
        return False
    if not (INCLUDE_DIR / "onnxruntime_c_api.h").exists() or not SOURCE.exists():
        return False
    try:
        import onnxruntime
        major, minor = (int(x) for x in onnxruntime.__version__.split(".")[:2])
        if (major, minor) < (1, HEADER_API_VERSION):
            return False
    except Exception:  # noqa: BLE001 - no or odd onnxruntime: no fused path
        return False
    return _compiler() is not None


def library_path() -> str:
    """Path of the compiled custom-op library (compiled on first call, then cached on disk)."""
    path = _STATE.get("path")
    if path is not None:
        return path  # type: ignore[return-value]
    with _LOCK:
        if "path" in _STATE:
            return _STATE["path"]  # type: ignore[return-value]
        if "error" in _STATE:
            raise RuntimeError(_STATE["error"])
        if not available():
            _STATE["error"] = ("the fused attnres::DepthAttention kernel is unavailable "
                               "(no C compiler, onnxruntime < 1.29, or ATTNRES_ORT_KERNEL=0)")
            raise RuntimeError(_STATE["error"])
        cc = _compiler()
        text = SOURCE.read_text()
        headers = "".join(p.read_text() for p in sorted(INCLUDE_DIR.glob("*.h")))
        key = hashlib.sha256("\0".join([text, headers, cc, *_CFLAGS, _machine_tag()]).encode()).hexdigest()[:20]
        out_dir = cache_dir() / "ort"
        so_path = out_dir / f"attnres_ort_{key}.so"
        if not so_path.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f".{so_path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                subprocess.run([cc, *_CFLAGS, f"-I{INCLUDE_DIR}", str(SOURCE), "-o", str(tmp), "-lm"],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(tmp, so_path)
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                _STATE["error"] = f"compiling the fused attnres::DepthAttention kernel failed: {detail}"
                raise RuntimeError(_STATE["error"]) from exc
        _STATE["path"] = str(so_path)
        return str(so_path)


def calls() -> int:
    """How many times onnxruntime ran the fused kernel in this process (for tests)."""
    lib = _STATE.get("ctypes")
    if lib is None:
        lib = ctypes.CDLL(library_path())  # the same handle onnxruntime's dlopen got
        lib.attnres_ort_calls.restype = ctypes.c_int64
        _STATE["ctypes"] = lib
    return int(lib.attnres_ort_calls())  # type: ignore[attr-defined]
