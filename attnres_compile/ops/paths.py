"""Which implementation served each depth-attention site (verify() and ``attnres check``
report it per site): a generated Triton kernel, the native CPU kernel, or PyTorch (naming the
Triton kernel whose self-check disabled it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from .kernels import dispatch as _dispatch

__all__ = ["NATIVE_CPU", "PYTORCH", "TRITON", "SitePaths", "pytorch_path", "record_path", "record_site_paths",
           "recording"]


TRITON = "triton"
NATIVE_CPU = "native CPU kernel"
PYTORCH = "PyTorch"

#: The active :class:`SitePaths` recorders; empty (the hot path's one check: ``if recording:``) when none.
recording: list = []


class SitePaths:
    """What :func:`record_site_paths` collects: per site (its query tensor), the implementations
    its forward ran, in order of first use."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Tensor, list[str]]] = {}

    def add(self, query: Tensor, path: str) -> None:
        entry = self._by_id.get(id(query))
        if entry is None or entry[0] is not query:
            self._by_id[id(query)] = (query, [path])
        elif path not in entry[1]:
            entry[1].append(path)

    def of(self, query: Tensor) -> str | None:
        """The path(s) of the site whose query is ``query`` (``" / "``-joined), None if it did not run."""
        entry = self._by_id.get(id(query))
        return " / ".join(entry[1]) if entry is not None and entry[0] is query else None


@contextlib.contextmanager
def record_site_paths() -> Iterator[SitePaths]:
    """Record, for every depth-attention site that runs inside the block, which implementation
    its forward ran: ``"triton"``, ``"native CPU kernel"``, ``"PyTorch"``, or ``"PyTorch (triton
    <variant> disabled: <reason>)"`` when the kernel failed its self-check; two-phase sites read
    ``"two-phase: ..."``. Sites are keyed by their query tensor (the parameter)."""
    rec = SitePaths()
    recording.append(rec)
    try:
        yield rec
    finally:
        recording.remove(rec)  # SitePaths compares by identity


def record_path(query: Tensor, path: str) -> None:
    for rec in list(recording):
        rec.add(query, path)


def pytorch_path(t: Tensor, variant: str) -> str:
    """``"PyTorch"``, naming the disabled Triton kernel when its self-check made it so."""
    reason = _dispatch.triton_disabled_reason(t, variant)
    return PYTORCH if reason is None else f"{PYTORCH} (triton {variant} disabled: {reason})"
