"""Generate Triton kernel *source* for depth attention, specialised per shape and dtype.

Every kernel here is written out as Python/Triton text for one specialisation (number of
sources ``M`` or blocks ``N``, sites ``S``, feature size ``D``, storage dtype, token tile),
written to ``<cache>/triton/<hash>.py``, imported, and memoised. The per-source loop is
unrolled in the text: every source is its own pointer argument (read in place, never
stacked), ``D`` is a literal padded to the next power of two with masks, and all math runs in
float32 whatever the storage dtype.

Kernels (see docs/kernels.md for the design and the byte accounting):

* ``fwd``      training/inference forward: one pass over the sources per token tile with an
               online softmax (running max, running sum, running accumulator); each source
               element is read once; writes ``h`` and nothing else.
* ``bwd``      analytic backward: gradients of every source plus per-program partial sums of
               ``du`` (``[num_programs, D]`` float32, no atomics). Variant ``resident`` keeps
               the ``M`` source rows of a tile on chip between the score pass and the gradient
               pass (reads ``M*D + D``, writes ``M*D`` per token: the SPEC floor); variant
               ``twopass`` re-reads them (``2*M*D + D``) when they do not fit.
* ``reduce``   the second, deterministic reduction of the ``du`` partials into the query and
               norm-gain gradients.
* ``phase1``   two-phase inference, phase 1: one read of the ``N`` completed blocks serves all
               ``S`` sites of the next block (``resident`` or D-chunked ``twopass``).
* ``phase2``   two-phase inference, phase 2: merge the running partial into phase 1's state.

Importing this module does not import triton; generating source does not need it either.
Only :func:`load_kernel` (and the launchers in ``triton_kernels.py``) do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CODEGEN_VERSION",
    "KernelSpec",
    "SUPPORTED_DTYPES",
    "RESIDENT_MAX_BYTES",
    "cache_dir",
    "generate_source",
    "load_kernel",
    "next_power_of_2",
    "choose_block_t",
    "choose_num_warps",
    "resident_fits",
]

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


# --------------------------------------------------------------------------------------------
# Source generation
# --------------------------------------------------------------------------------------------


class _Src:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 0

    def __call__(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.lines.append(("    " * self.level + line) if line else "")

    def indent(self) -> "_Src":
        self.level += 1
        return self

    def dedent(self) -> None:
        self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _header(spec: KernelSpec) -> _Src:
    src = _Src()
    src(f'"""Generated by attnres_compile.ops.kernels.triton_codegen (version {CODEGEN_VERSION}). Do not edit.')
    src("")
    src(f"Specialisation: {spec}")
    src('"""')
    src("import triton")
    src("import triton.language as tl")
    src("")
    src("")
    return src


def _tile_loop_open(src: _Src, bt: int, bd: int, d: int) -> None:
    """Persistent loop over token tiles; defines rows/rmask/mask/r64 for the tile."""
    src(f"num_tiles = tl.cdiv(T, {bt})")
    src("for tile in range(pid, num_tiles, nprog):")
    src.indent()
    src(f"rows = tile * {bt} + tl.arange(0, {bt})")
    src("rmask = rows < T")
    src("mask = rmask[:, None] & cmask[None, :]")
    src("r64 = rows.to(tl.int64)")


def _program_prologue(src: _Src, bd: int, d: int) -> None:
    src("pid = tl.program_id(0)")
    src("nprog = tl.num_programs(0)")
    src(f"cols = tl.arange(0, {bd})")
    src(f"cmask = cols < {d}")


def _cast(spec: KernelSpec) -> str:
    """Cast of a float32 value to the storage dtype (round to nearest even on the GPU)."""
    if spec.dtype == "fp32":
        return ""
    return {"bf16": ".to(tl.bfloat16)", "fp16": ".to(tl.float16)"}[spec.dtype]


def _load_u(src: _Src, q: str, g: str, name: str = "u", off: str = "") -> None:
    src(
        f"{name} = tl.load({q}{off} + cols, mask=cmask, other=0.0).to(tl.float32)"
        f" * tl.load({g}{off} + cols, mask=cmask, other=0.0).to(tl.float32)"
    )


#: Forward variants: "" (h), fused epilogues "rmsnorm" / "layernorm" (the site, then the norm
#: that reads it: only the normalised row is written), and "partial" (the block partial-sum add
#: fused into the site: the last source is prev + add, written once as the new partial).
FWD_VARIANTS = ("", "rmsnorm", "layernorm", "partial")


def _gen_fwd(spec: KernelSpec) -> str:
    m, d, bt = spec.m, spec.d, spec.block_t
    bd = next_power_of_2(d)
    var = spec.variant
    fused_add = var == "partial"
    src = _header(spec)
    blocks = [f"src{j}" for j in range(m - 1 if fused_add else m)]
    strides = [f"rs{j}" for j in range(len(blocks))]
    args = [*blocks, *(["prev_ptr", "add_ptr", "newp_ptr"] if fused_add else []), *strides,
            *(["rsp", "rsa"] if fused_add else []), "q_ptr", "g_ptr"]
    if var in ("rmsnorm", "layernorm"):
        args += ["nw_ptr"] + (["nb_ptr"] if var == "layernorm" else [])
    args += ["out_ptr", "T", "eps", "scale"] + (["norm_eps"] if var in ("rmsnorm", "layernorm") else [])
    src("@triton.jit")
    src(f"def {spec.name}({', '.join(args)}):")
    src.indent()
    what = {"": "writes h", "rmsnorm": "writes RMSNorm(h) * w, not h", "layernorm": "writes LayerNorm(h), not h",
            "partial": f"source {m - 1} = prev + add, written once to newp"}[var]
    src(f'"""h = scale * softmax_j(u . v_j / rms(v_j)) @ v over {m} sources; D = {d} (padded to {bd}); {what}."""')
    _program_prologue(src, bd, d)
    _load_u(src, "q_ptr", "g_ptr")
    if var in ("rmsnorm", "layernorm"):
        src("nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)")
        if var == "layernorm":
            src("nb = tl.load(nb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)")
    _tile_loop_open(src, bt, bd, d)
    for j in range(m):
        if fused_add and j == m - 1:
            src("# the running partial sum of the block: prev + add, stored once, then used as the last source")
            src("v = (tl.load(prev_ptr + r64[:, None] * rsp + cols[None, :], mask=mask, other=0.0).to(tl.float32)"
                " + tl.load(add_ptr + r64[:, None] * rsa + cols[None, :], mask=mask, other=0.0).to(tl.float32))")
            if spec.dtype != "fp32":   # the partial is a stored tensor: round it as the unfused add would
                src(f"v = v{_cast(spec)}")
                src(f"tl.store(newp_ptr + r64[:, None] * {d} + cols[None, :], v, mask=mask)")
                src("v = v.to(tl.float32)")
            else:
                src(f"tl.store(newp_ptr + r64[:, None] * {d} + cols[None, :], v, mask=mask)")
        else:
            src(f"# source {j}: read once, folded into the running softmax")
            src(f"v = tl.load(src{j} + r64[:, None] * rs{j} + cols[None, :], mask=mask, other=0.0).to(tl.float32)")
        src(f"inv_r = tl.rsqrt(tl.sum(v * v, axis=1) * {1.0 / d!r} + eps)")
        src("s = tl.sum(v * u[None, :], axis=1) * inv_r")
        if j == 0:
            src("run_max = s")
            src(f"run_sum = tl.full([{bt}], 1.0, tl.float32)")
            src("acc = v")
        else:
            src("new_max = tl.maximum(run_max, s)")
            src("decay = tl.exp(run_max - new_max)")
            src("p = tl.exp(s - new_max)")
            src("run_sum = run_sum * decay + p")
            src("acc = acc * decay[:, None] + v * p[:, None]")
            src("run_max = new_max")
    src("h = acc * (scale / run_sum)[:, None]")
    if var in ("rmsnorm", "layernorm"):
        # the norm reads h in storage precision in the unfused graph: round it the same way
        if spec.dtype != "fp32":
            src(f"h = h{_cast(spec)}.to(tl.float32)")
        if var == "rmsnorm":
            src(f"y = h * tl.rsqrt(tl.sum(h * h, axis=1) * {1.0 / d!r} + norm_eps)[:, None] * nw[None, :]")
        else:
            src(f"mean = tl.sum(h, axis=1) * {1.0 / d!r}")
            src("hc = tl.where(cmask[None, :], h - mean[:, None], 0.0)")
            src(f"y = hc * tl.rsqrt(tl.sum(hc * hc, axis=1) * {1.0 / d!r} + norm_eps)[:, None] * nw[None, :] + nb[None, :]")
        src(f"tl.store(out_ptr + r64[:, None] * {d} + cols[None, :], y{_cast(spec)}, mask=mask)")
    else:
        src(f"tl.store(out_ptr + r64[:, None] * {d} + cols[None, :], h{_cast(spec)}, mask=mask)")
    return src.text()


def _gen_bwd(spec: KernelSpec) -> str:
    m, d, bt = spec.m, spec.d, spec.block_t
    bd = next_power_of_2(d)
    resident = spec.variant == "resident"
    src = _header(spec)
    srcs = ", ".join(f"src{j}" for j in range(m))
    strides = ", ".join(f"rs{j}" for j in range(m))
    dsrcs = ", ".join(f"dsrc{j}" for j in range(m))
    src("@triton.jit")
    src(
        f"def {spec.name}(grad_ptr, grs, gcs, {srcs}, {strides}, {dsrcs}, q_ptr, g_ptr, "
        "partial_ptr, T, eps, scale):"
    )
    src.indent()
    src(
        f'"""Backward over {m} sources, D = {d}; {"rows stay on chip" if resident else "rows are re-read"}'
        ' between the score pass and the gradient pass."""'
    )
    _program_prologue(src, bd, d)
    _load_u(src, "q_ptr", "g_ptr")
    src(f"du = tl.zeros([{bd}], dtype=tl.float32)")
    _tile_loop_open(src, bt, bd, d)
    src("G = tl.load(grad_ptr + r64[:, None] * grs + cols[None, :] * gcs, mask=mask, other=0.0).to(tl.float32) * scale")
    src("# pass 1: per-source scalars (inverse rms, logit, da = G . v)")
    for j in range(m):
        src(f"v{j} = tl.load(src{j} + r64[:, None] * rs{j} + cols[None, :], mask=mask, other=0.0)")
        src(f"f = v{j}.to(tl.float32)")
        src(f"ir{j} = tl.rsqrt(tl.sum(f * f, axis=1) * {1.0 / d!r} + eps)")
        src(f"s{j} = tl.sum(f * u[None, :], axis=1) * ir{j}")
        src(f"da{j} = tl.sum(f * G, axis=1)")
    src("# softmax over depth; da measured from the winning source (stable when peaked)")
    src("mx = s0")
    for j in range(1, m):
        src(f"mx = tl.maximum(mx, s{j})")
    for j in range(m):
        src(f"e{j} = tl.exp(s{j} - mx)")
    src("z = " + " + ".join(f"e{j}" for j in range(m)))
    src("rz = 1.0 / z")
    src("best = s0")
    src("daw = da0")
    for j in range(1, m):
        src(f"take = s{j} > best")
        src(f"best = tl.where(take, s{j}, best)")
        src(f"daw = tl.where(take, da{j}, daw)")
    for j in range(m):
        src(f"a{j} = e{j} * rz")
        src(f"dd{j} = da{j} - daw")
    src("delta = " + " + ".join(f"a{j} * dd{j}" for j in range(m)))
    src("# pass 2: gradients of every source, and this program's share of du")
    for j in range(m):
        src(f"cu = a{j} * (dd{j} - delta) * ir{j}")
        src(f"cv = cu * s{j} * ir{j} * {1.0 / d!r}")
        if resident:
            src(f"f = v{j}.to(tl.float32)")
        else:
            src(f"f = tl.load(src{j} + r64[:, None] * rs{j} + cols[None, :], mask=mask, other=0.0).to(tl.float32)")
        src(f"dv = a{j}[:, None] * G + cu[:, None] * u[None, :] - cv[:, None] * f")
        src(
            f"tl.store(dsrc{j} + r64[:, None] * {d} + cols[None, :], dv{_cast(spec)}, mask=mask)"
        )
        src("du += tl.sum(cu[:, None] * f, axis=0)")
    src.dedent()
    src(f"tl.store(partial_ptr + pid.to(tl.int64) * {d} + cols, du, mask=cmask)")
    return src.text()


def _gen_reduce(spec: KernelSpec) -> str:
    d, bc = spec.d, spec.block_t  # block_t doubles as the column block here
    src = _header(spec)
    src("@triton.jit")
    src(f"def {spec.name}(partial_ptr, q_ptr, g_ptr, dq_ptr, dg_ptr, P):")
    src.indent()
    src(f'"""du = sum over the P partial rows, in order; dq = du * g, dg = du * w. D = {d}."""')
    src(f"cols = tl.program_id(0) * {bc} + tl.arange(0, {bc})")
    src(f"cmask = cols < {d}")
    src(f"acc = tl.zeros([{bc}], dtype=tl.float32)")
    src("for p in range(0, P):")
    src(f"    acc += tl.load(partial_ptr + p * {d} + cols, mask=cmask, other=0.0)")
    src("w = tl.load(q_ptr + cols, mask=cmask, other=0.0).to(tl.float32)")
    src("g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)")
    src("tl.store(dq_ptr + cols, (acc * g).to(dq_ptr.dtype.element_ty), mask=cmask)")
    src("tl.store(dg_ptr + cols, (acc * w).to(dg_ptr.dtype.element_ty), mask=cmask)")
    return src.text()


def phase1_chunk(d: int, s: int) -> int:
    """Column chunk of the D-chunked (``twopass``) phase 1: ``s`` float32 accumulators of it."""
    bd = next_power_of_2(d)
    return max(16, min(bd, 4096 // next_power_of_2(s)))


def _gen_phase1(spec: KernelSpec) -> str:
    n, s, d, bt = spec.m, spec.s, spec.d, spec.block_t
    bd = next_power_of_2(d)
    resident = spec.variant == "resident"
    src = _header(spec)
    blks = ", ".join(f"blk{j}" for j in range(n))
    strides = ", ".join(f"rs{j}" for j in range(n))
    src("@triton.jit")
    src(f"def {spec.name}({blks}, {strides}, q_ptr, g_ptr, o_ptr, m_ptr, z_ptr, T, eps):")
    src.indent()
    src(
        f'"""Phase 1 over {n} completed blocks for {s} sites, D = {d}: o_l = sum_j exp(s_lj - m_l) b_j,'
        ' m_l = max_j s_lj, z_l = sum_j exp(s_lj - m_l)."""'
    )
    if resident:
        _program_prologue(src, bd, d)
        _tile_loop_open(src, bt, bd, d)
        for j in range(n):
            src(f"b{j} = tl.load(blk{j} + r64[:, None] * rs{j} + cols[None, :], mask=mask, other=0.0)")
            src(f"f = b{j}.to(tl.float32)")
            src(f"ir{j} = tl.rsqrt(tl.sum(f * f, axis=1) * {1.0 / d!r} + eps)")
        for l in range(s):
            src(f"# site {l}")
            _load_u(src, "q_ptr", "g_ptr", off=f" + {l * d}")
            for j in range(n):
                src(f"sc{j} = tl.sum(b{j}.to(tl.float32) * u[None, :], axis=1) * ir{j}")
            src("mx = sc0")
            for j in range(1, n):
                src(f"mx = tl.maximum(mx, sc{j})")
            src("e = tl.exp(sc0 - mx)")
            src("z = e")
            src("o = b0.to(tl.float32) * e[:, None]")
            for j in range(1, n):
                src(f"e = tl.exp(sc{j} - mx)")
                src("z += e")
                src(f"o += b{j}.to(tl.float32) * e[:, None]")
            src(
                f"tl.store(o_ptr + (r64 + {l} * T)[:, None] * {d} + cols[None, :], o{_cast(spec)}, mask=mask)"
            )
            src(f"tl.store(m_ptr + {l} * T + rows, mx, mask=rmask)")
            src(f"tl.store(z_ptr + {l} * T + rows, z, mask=rmask)")
        return src.text()

    # D-chunked two-pass variant: pass A accumulates sums of squares and the S x N dots chunk
    # by chunk (each block element read once); pass B re-reads the blocks chunk by chunk and
    # accumulates the S unnormalised outputs of that chunk.
    ch = phase1_chunk(d, s)
    nch = -(-bd // ch)
    src("pid = tl.program_id(0)")
    src("nprog = tl.num_programs(0)")
    src(f"num_tiles = tl.cdiv(T, {bt})")
    src("for tile in range(pid, num_tiles, nprog):")
    src.indent()
    src(f"rows = tile * {bt} + tl.arange(0, {bt})")
    src("rmask = rows < T")
    src("r64 = rows.to(tl.int64)")
    for j in range(n):
        src(f"ss{j} = tl.zeros([{bt}], dtype=tl.float32)")
        for l in range(s):
            src(f"dot{l}_{j} = tl.zeros([{bt}], dtype=tl.float32)")
    src(f"for c in range(0, {nch}):")
    src.indent()
    src(f"cols = c * {ch} + tl.arange(0, {ch})")
    src(f"cmask = cols < {d}")
    src("mask = rmask[:, None] & cmask[None, :]")
    for l in range(s):
        _load_u(src, "q_ptr", "g_ptr", name=f"u{l}", off=f" + {l * d}")
    for j in range(n):
        src(f"f = tl.load(blk{j} + r64[:, None] * rs{j} + cols[None, :], mask=mask, other=0.0).to(tl.float32)")
        src(f"ss{j} += tl.sum(f * f, axis=1)")
        for l in range(s):
            src(f"dot{l}_{j} += tl.sum(f * u{l}[None, :], axis=1)")
    src.dedent()
    for j in range(n):
        src(f"ir{j} = tl.rsqrt(ss{j} * {1.0 / d!r} + eps)")
    for l in range(s):
        src(f"mx{l} = dot{l}_0 * ir0")
        for j in range(1, n):
            src(f"mx{l} = tl.maximum(mx{l}, dot{l}_{j} * ir{j})")
        for j in range(n):
            src(f"e{l}_{j} = tl.exp(dot{l}_{j} * ir{j} - mx{l})")
        src(f"z{l} = " + " + ".join(f"e{l}_{j}" for j in range(n)))
        src(f"tl.store(m_ptr + {l} * T + rows, mx{l}, mask=rmask)")
        src(f"tl.store(z_ptr + {l} * T + rows, z{l}, mask=rmask)")
    src(f"for c in range(0, {nch}):")
    src.indent()
    src(f"cols = c * {ch} + tl.arange(0, {ch})")
    src(f"cmask = cols < {d}")
    src("mask = rmask[:, None] & cmask[None, :]")
    for j in range(n):
        src(f"f = tl.load(blk{j} + r64[:, None] * rs{j} + cols[None, :], mask=mask, other=0.0).to(tl.float32)")
        for l in range(s):
            if j == 0:
                src(f"o{l} = f * e{l}_0[:, None]")
            else:
                src(f"o{l} += f * e{l}_{j}[:, None]")
    for l in range(s):
        src(
            f"tl.store(o_ptr + (r64 + {l} * T)[:, None] * {d} + cols[None, :], o{l}{_cast(spec)}, mask=mask)"
        )
    return src.text()


def _gen_phase2(spec: KernelSpec) -> str:
    d, bt = spec.d, spec.block_t
    bd = next_power_of_2(d)
    has_partial = spec.variant == "partial"
    src = _header(spec)
    src("@triton.jit")
    args = "o_ptr, ors, m_ptr, z_ptr, " + ("p_ptr, prs, " if has_partial else "") + "q_ptr, g_ptr, out_ptr, T, eps, scale"
    src(f"def {spec.name}({args}):")
    src.indent()
    if has_partial:
        src(f'"""Phase 2, D = {d}: merge the running partial p into (o, m, z) and normalise."""')
    else:
        src(f'"""Phase 2 for the first site of a block, D = {d}: h = scale * o / z."""')
    _program_prologue(src, bd, d)
    if has_partial:
        _load_u(src, "q_ptr", "g_ptr")
    _tile_loop_open(src, bt, bd, d)
    src("o = tl.load(o_ptr + r64[:, None] * ors + cols[None, :], mask=mask, other=0.0).to(tl.float32)")
    src("z = tl.load(z_ptr + rows, mask=rmask, other=1.0)")
    if has_partial:
        src("m1 = tl.load(m_ptr + rows, mask=rmask, other=0.0)")
        src("p = tl.load(p_ptr + r64[:, None] * prs + cols[None, :], mask=mask, other=0.0).to(tl.float32)")
        src(f"sp = tl.sum(p * u[None, :], axis=1) * tl.rsqrt(tl.sum(p * p, axis=1) * {1.0 / d!r} + eps)")
        src("mx = tl.maximum(m1, sp)")
        src("a = tl.exp(m1 - mx)")
        src("b = tl.exp(sp - mx)")
        src("h = (o * a[:, None] + p * b[:, None]) * (scale / (a * z + b))[:, None]")
    else:
        src("h = o * (scale / z)[:, None]")
    src(f"tl.store(out_ptr + r64[:, None] * {d} + cols[None, :], h{_cast(spec)}, mask=mask)")
    return src.text()


_GENERATORS = {"fwd": _gen_fwd, "bwd": _gen_bwd, "reduce": _gen_reduce, "phase1": _gen_phase1, "phase2": _gen_phase2}


def generate_source(spec: KernelSpec) -> str:
    """The Triton source text of one specialisation (pure string work; triton not needed)."""
    if spec.kind == "fwd" and spec.variant not in FWD_VARIANTS:
        raise ValueError(f"fwd kernels take variant {FWD_VARIANTS}, got {spec.variant!r}")
    if spec.kind == "fwd" and spec.variant == "partial" and spec.m < 2:
        raise ValueError("the fused partial-sum forward needs m >= 2 (at least one completed block)")
    if spec.kind == "bwd" and spec.variant not in ("resident", "twopass"):
        raise ValueError("bwd kernels need variant 'resident' or 'twopass'")
    if spec.kind == "phase1" and spec.variant not in ("resident", "twopass"):
        raise ValueError("phase1 kernels need variant 'resident' or 'twopass'")
    if spec.kind == "phase2" and spec.variant not in ("partial", "nopartial"):
        raise ValueError("phase2 kernels need variant 'partial' or 'nopartial'")
    return _GENERATORS[spec.kind](spec)


# --------------------------------------------------------------------------------------------
# Cache + import
# --------------------------------------------------------------------------------------------


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
