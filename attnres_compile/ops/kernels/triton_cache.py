"""Generated Triton kernels on disk: each specialisation's source (triton_codegen.py) written
once to the cache folder, imported as a module and kept per process."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

from .triton_codegen import KernelSpec, generate_source

__all__ = ["cache_dir", "load_kernel", "source_path"]


def cache_dir() -> Path:
    """``$ATTNRES_COMPILE_CACHE`` or ``~/.cache/attnres_compile``."""
    root = os.environ.get("ATTNRES_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "attnres_compile"
    )
    return Path(root)


_LOCK = threading.Lock()
_LOADED: dict[KernelSpec, object] = {}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_path(spec: KernelSpec) -> Path:
    text = generate_source(spec)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    return cache_dir() / "triton" / f"{spec.name}_{digest}.py"


def load_kernel(spec: KernelSpec):
    """Generate (once), write to the cache dir, import and return the ``@triton.jit`` kernel."""
    kernel = _LOADED.get(spec)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _LOADED.get(spec)
        if kernel is not None:
            return kernel
        text = generate_source(spec)
        path = source_path(spec)
        if not path.exists() or path.read_text() != text:
            _write_atomic(path, text)
        mod_name = f"attnres_compile_generated_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # inspect.getsource / Inductor need to find it
        module_spec.loader.exec_module(module)
        kernel = getattr(module, spec.name)
        _LOADED[spec] = kernel
        _register_with_torch(spec, kernel)
        return kernel


def _register_with_torch(spec: KernelSpec, kernel: object) -> None:
    """Let AOTAutogradCache key on generated kernels of our triton_ops (best effort)."""
    op = {
        "fwd": "attnres::depth_attention",
        "bwd": "attnres::depth_attention_backward",
        "reduce": "attnres::depth_attention_backward",
        "phase1": "attnres::depth_attention_phase1",
        "phase2": "attnres::depth_attention_phase2",
    }[spec.kind]
    try:
        from torch._library import triton as _lib_triton

        _lib_triton.triton_ops_to_kernels.setdefault(op, []).append(kernel)
    except Exception:  # pragma: no cover - private API moved
        pass
