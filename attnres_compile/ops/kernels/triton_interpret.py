"""Instrumentation of Triton's CPU interpreter (``TRITON_INTERPRET=1``) for tests and benchmarks.

* :func:`count_bytes` counts the bytes every load and store moves while kernels run in the
  interpreter, element by element (masked-off lanes do not count), and attributes them to the
  named tensors whose memory they touch. It is how the tests check that a generated kernel
  moves exactly the SPEC section 4 floor.
* :func:`round_bf16_to_nearest` makes the interpreter's float32 -> bfloat16 cast round to
  nearest even, as the GPU's ``cvt.rn.bf16.f32`` does (the interpreter truncates), so that
  interpreted results have GPU-like accuracy.

Both patch ``triton.runtime.interpreter.InterpreterBuilder`` for the duration of a ``with``
block and restore it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["ByteCounter", "count_bytes", "round_bf16_to_nearest", "interpreter_compat"]


def interpreter_compat() -> None:
    """Make an older Triton's interpreter run our kernels (idempotent; interpreter only).

    Triton 3.6's interpreter (the GPU machine's release) converts a scalar to an index with
    `int(array)` on its one-element array, which numpy 2 refuses; `for tile in range(pid, n,
    nprog)` then fails. Triton 3.9 squeezes the array first: the same is set here. Compiled
    kernels (a GPU) never take this path."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_attnres_compat", False):
        return

    def patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._attnres_compat = True
    ti._patch_lang_tensor = patch_lang_tensor


@dataclass
class _Region:
    name: str
    start: int
    end: int  # exclusive


@dataclass
class ByteCounter:
    """Bytes loaded/stored per named tensor (``"<other>"`` for memory outside every tensor)."""

    regions: list[_Region]
    loads: dict[str, int] = field(default_factory=dict)
    stores: dict[str, int] = field(default_factory=dict)
    load_elems: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def _attribute(self, addrs: np.ndarray, nbytes: int, table: dict[str, int], keep: bool) -> None:
        remaining = np.ones(addrs.shape, dtype=bool)
        for r in self.regions:
            hit = remaining & (addrs >= r.start) & (addrs < r.end)
            n = int(hit.sum())
            if n:
                table[r.name] = table.get(r.name, 0) + n * nbytes
                remaining &= ~hit
                if keep:
                    self.load_elems.setdefault(r.name, []).append(addrs[hit])
        n = int(remaining.sum())
        if n:
            table["<other>"] = table.get("<other>", 0) + n * nbytes

    def loaded(self, name: str) -> int:
        return self.loads.get(name, 0)

    def stored(self, name: str) -> int:
        return self.stores.get(name, 0)

    def distinct_loaded_elements(self, name: str) -> int:
        parts = self.load_elems.get(name, [])
        return int(np.unique(np.concatenate(parts)).size) if parts else 0

    @property
    def total_loaded(self) -> int:
        return sum(self.loads.values())

    @property
    def total_stored(self) -> int:
        return sum(self.stores.values())


def _extent(t: Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


@contextlib.contextmanager
def count_bytes(tensors: Mapping[str, Tensor] | None = None, *, track_elements: bool = False) -> Iterator[ByteCounter]:
    """Count interpreter loads/stores, attributed to ``tensors`` (name -> tensor, CPU).

    Register output tensors too (allocate them first, or pass what the launcher returns and
    read the totals): every address is attributed to the first registered tensor containing it.
    """
    from triton.runtime import interpreter as interp

    counter = ByteCounter([_Region(n, *_extent(t)) for n, t in (tensors or {}).items()])
    builder = interp.InterpreterBuilder
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store

    # The cache arguments after `other` / `value` differ between Triton releases (3.9: a
    # cache_policy; 3.6: cache_modifier and eviction_policy): pass them on as they come.
    def masked_load(self, ptrs, mask, other, *cache_args):
        nbytes = ptrs.get_element_ty().primitive_bitwidth // 8
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        counter._attribute(ptrs.data[m].astype(np.uint64), nbytes, counter.loads, track_elements)
        return orig_load(self, ptrs, mask, other, *cache_args)

    def masked_store(self, ptrs, value, mask, *cache_args):
        nbytes = ptrs.get_element_ty().primitive_bitwidth // 8
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        counter._attribute(ptrs.data[m].astype(np.uint64), nbytes, counter.stores, False)
        return orig_store(self, ptrs, value, mask, *cache_args)

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    try:
        yield counter
    finally:
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store


@contextlib.contextmanager
def round_bf16_to_nearest() -> Iterator[None]:
    """float32 -> bfloat16 casts in the interpreter round to nearest even (like the GPU)."""
    from triton import language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    orig = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return orig(self, src, dst_type)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = orig
