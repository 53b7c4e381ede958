"""What one generated Triton kernel is specialised on (KernelSpec), and how its tile is chosen."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CODEGEN_VERSION = "5"

#: Storage dtypes the generated kernels accept (math is always float32).
SUPPORTED_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

#: On-chip budget for keeping a token tile's source rows resident between the two halves of
#: the backward (and phase 1). Above it the kernel re-reads the rows (``twopass``). 160 KiB
#: keeps Kimi-like Block AttnRes (M <= 9 sources of D = 7168 in bfloat16, one token per
#: program, 16 warps) resident; not tuned on a GPU yet. Override: ATTNRES_RESIDENT_MAX_BYTES.
RESIDENT_MAX_BYTES = int(os.environ.get("ATTNRES_RESIDENT_MAX_BYTES", 160 * 1024))

#: Cap on elements of one ``[BT, BD]`` float32 working tile.
_TILE_ELEMS = 4096


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def choose_block_t(d: int, kind: str) -> int:
    """Tokens per tile: fill ``_TILE_ELEMS`` float32 lanes, at most 64 tokens."""
    bd = next_power_of_2(d)
    elems = _TILE_ELEMS // 2 if kind in ("bwd", "phase1") else _TILE_ELEMS
    return max(1, min(64, elems // bd))


def choose_num_warps(block_t: int, d: int) -> int:
    elems = block_t * next_power_of_2(d)
    if elems <= 1024:
        return 4
    if elems <= 4096:
        return 8
    return 16


def resident_fits(num_rows: int, d: int, dtype: str, block_t: int) -> bool:
    """Whether ``num_rows`` source rows of a ``block_t``-token tile fit the on-chip budget."""
    return num_rows * block_t * next_power_of_2(d) * _DTYPE_BYTES[dtype] <= RESIDENT_MAX_BYTES


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation. ``m`` is the source count (``N`` blocks for phase 1), ``s`` the
    site count of phase 1, ``variant`` ``resident``/``twopass`` (bwd, phase1) or
    ``partial``/``nopartial`` (phase2)."""

    kind: str
    d: int
    dtype: str = "fp32"
    m: int = 1
    s: int = 1
    block_t: int = 1
    variant: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("fwd", "bwd", "reduce", "phase1", "phase2"):
            raise ValueError(f"unknown kernel kind {self.kind!r}")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"unsupported storage dtype {self.dtype!r}")
        if self.d < 1 or self.m < 1 or self.s < 1 or self.block_t < 1:
            raise ValueError(f"bad specialisation {self}")
        if self.block_t & (self.block_t - 1):
            raise ValueError(f"block_t must be a power of two, got {self.block_t}")

    @property
    def name(self) -> str:
        parts = [f"attnres_{self.kind}"]
        if self.kind in ("fwd", "bwd"):
            parts.append(f"m{self.m}")
        if self.kind == "phase1":
            parts.append(f"n{self.m}_s{self.s}")
        parts += [f"d{self.d}", self.dtype if self.kind != "reduce" else "", f"bt{self.block_t}", self.variant]
        return "_".join(p for p in parts if p)
