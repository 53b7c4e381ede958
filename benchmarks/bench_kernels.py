"""Depth-attention kernel bandwidth: achieved bytes/s over the machine's copy bandwidth.

Bytes are the SPEC.md section 4 floor, per token and site with M sources of D elements:

    forward   reads M*D, writes D           backward  reads M*D + D, writes M*D
    phase 1   reads N*D, writes S*D (+ 8 B per site and token: m, z)
    phase 2   reads 2*D (o, partial), writes D (+ 8 B per token)

Rows (each with its own copy baseline of the same number of bytes, timed interleaved with
it, so a busy machine moves both):

* ``op``: the eager op as a user calls it (``torch.ops.attnres.*``), which allocates its
  outputs; baseline ``clone()`` (also allocates).
* ``kernel``: the same kernel writing into preallocated outputs; baseline ``copy_()`` into a
  preallocated tensor.
* CPU: the native kernels built at install (``attnres_compile._C``, ``ops/kernels/cpu.py``;
  ``--isa`` picks a build), the plain PyTorch implementation of
  the op, and the naive stacked reference (``ops/reference.py``); with ``--inductor`` also
  ``torch.compile`` of the reference formula.
* CUDA: the generated Triton kernels through the ops, and fla's fused ``fused_attnres`` on the
  same inputs when fla is importable. Without a GPU these rows are recorded as
  "unmeasured (no GPU)", never estimated.

Writes ``benchmarks/results/kernels_<device>.json`` and prints a table.

    python benchmarks/bench_kernels.py            # CPU rows always; CUDA rows when a GPU exists
    python benchmarks/bench_kernels.py --quick    # small shapes only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnres_compile.ops.kernels import cpu as cpu_kernels  # noqa: E402
from attnres_compile.ops import depth_attention_reference  # noqa: E402
from attnres_compile.ops.reference import (  # noqa: E402
    depth_attention_backward_reference,
    phase1_reference,
    phase2_reference,
)

RESULTS = Path(__file__).resolve().parent / "results"

# (label, D, M sources, tokens on CUDA, tokens on CPU, dtype)
TRAIN_SHAPES = [
    ("kimi-block", 7168, 9, 4096, 2048, torch.bfloat16),
    ("kimi-block-33", 7168, 33, 4096, 512, torch.bfloat16),
    ("d4096-m17", 4096, 17, 4096, 1024, torch.bfloat16),
    ("d2048-m9", 2048, 9, 4096, 4096, torch.bfloat16),
    ("small-fp32", 768, 5, 4096, 8192, torch.float32),
    ("d2048-m9-fp32", 2048, 9, 4096, 2048, torch.float32),
]
QUICK = {"d2048-m9", "small-fp32", "d2048-m9-fp32"}
# (label, D, N completed blocks, S sites, tokens CUDA, tokens CPU, dtype)
TWO_PHASE_SHAPES = [
    ("kimi-n8-s16", 7168, 8, 16, 4096, 512, torch.bfloat16),
    ("d2048-n4-s8", 2048, 4, 8, 4096, 2048, torch.bfloat16),
]


@dataclass
class Row:
    device: str
    kernel: str
    shape: str
    dtype: str
    impl: str
    floor_bytes: int
    status: str = "measured"
    seconds: float | None = None
    gbps: float | None = None
    copy_gbps: float | None = None
    ratio_to_copy: float | None = None
    baseline: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


COPY_BYTES = 512 << 20  # one 512 MiB copy (1 GiB moved): larger than this machine's caches


class BigCopy:
    """``dst.copy_(src)`` of ``COPY_BYTES``: the copy-bandwidth baseline, timed next to each row."""

    def __init__(self, device: str, nbytes: int = COPY_BYTES):
        self.src = torch.ones(nbytes // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.moved = 2 * nbytes

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def paired(fn, baseline: BigCopy, floor: int, device: str, reps: int) -> tuple[float, float, float]:
    """Interleave baseline and kernel ``reps`` times. Returns the kernel's median time, the
    median baseline bandwidth, and the median over pairs of (kernel GB/s / copy GB/s), so a
    machine that gets busier or quieter moves both sides of each ratio."""
    fn()
    baseline()
    _sync(device)
    ts, copy_bw, ratios = [], [], []
    for _ in range(reps):
        b = _time_once(baseline, device)
        t = _time_once(fn, device)
        ts.append(t)
        copy_bw.append(baseline.moved / b)
        ratios.append((floor / t) / (baseline.moved / b))
    return statistics.median(ts), statistics.median(copy_bw), statistics.median(ratios)


def copy_bandwidth(device: str, nbytes: int = COPY_BYTES, reps: int = 5) -> dict:
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    x.clone()
    y.copy_(x)
    clone = statistics.median(_time_once(lambda: x.clone(), device) for _ in range(reps))
    copy = statistics.median(_time_once(lambda: y.copy_(x), device) for _ in range(reps))
    return {
        "bytes_moved": 2 * nbytes,
        "copy_into_preallocated_gbps": 2 * nbytes / copy / 1e9,
        "clone_gbps": 2 * nbytes / clone / 1e9,
        "note": "ratios use copy_ into a preallocated tensor (clone also pays first-touch page faults)",
    }


def _row(device, kernel, shape, dtype, impl, floor, fn, baseline, reps, note="") -> Row:
    t, copy_bw, ratio = paired(fn, baseline, floor, device, reps)
    return Row(
        device=device, kernel=kernel, shape=shape, dtype=str(dtype).replace("torch.", ""), impl=impl,
        floor_bytes=floor, seconds=t, gbps=floor / t / 1e9, copy_gbps=copy_bw / 1e9,
        ratio_to_copy=ratio, baseline="copy_ 512 MiB", note=note,
    )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def train_inputs(d, m, t, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    sources = [torch.randn(t, d, generator=gen).to(device=device, dtype=dtype) for _ in range(m)]
    query = (0.02 * torch.randn(d, generator=gen)).to(device=device, dtype=dtype)
    gain = torch.ones(d, device=device, dtype=dtype)
    grad = torch.randn(t, d, generator=gen).to(device=device, dtype=dtype)
    return sources, query, gain, grad


def floors(d, m, t, e):
    return {"fwd": (m + 1) * t * d * e, "bwd": (2 * m + 1) * t * d * e}


# --------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------


def train_cases(device: str, quick: bool = False):
    """(shape text, label, D, M, T, dtype) for each TRAIN_SHAPES row, with the device's token count."""
    for label, d, m, t_cuda, t_cpu, dtype in TRAIN_SHAPES:
        if quick and label not in QUICK:
            continue
        t = t_cpu if device == "cpu" else t_cuda
        yield f"{label} D={d} M={m} T={t}", label, d, m, t, dtype


def bench_cpu(quick: bool, reps: int, inductor: bool) -> list[Row]:
    rows: list[Row] = []
    dev = "cpu"
    big = BigCopy(dev)
    fast = cpu_kernels.available()
    plain_reps = max(2, reps // 3)
    eps = 1e-6
    for shape, label, d, m, t, dtype in train_cases(dev, quick):
        sources, query, gain, grad = train_inputs(d, m, t, dtype, dev)
        fl = floors(d, m, t, sources[0].element_size())
        print(f"  {shape} {str(dtype)[6:]}", flush=True)

        def add(kernel, impl, fn, n=reps):
            rows.append(_row(dev, kernel, shape, dtype, impl, fl["fwd" if kernel == "forward" else "bwd"], fn, big, n))

        if fast:
            out = torch.empty(t, d, dtype=dtype)
            outs = [torch.empty(t, d, dtype=dtype) for _ in range(m)]
            add("forward", "op: native C++ (allocates h)",
                lambda: torch.ops.attnres.depth_attention(sources, query, gain, eps, 1.0))
            add("forward", "kernel: native C++ (preallocated h)",
                lambda: cpu_kernels.forward(sources, query, gain, eps, 1.0, out=out))
            add("backward", "op: native C++ (allocates grads)",
                lambda: torch.ops.attnres.depth_attention_backward(grad, sources, query, gain, eps, 1.0))
            add("backward", "kernel: native C++ (preallocated grads)",
                lambda: cpu_kernels.backward(grad, sources, query, gain, eps, 1.0, out=outs))
            del out, outs
        add("forward", "plain PyTorch op body", lambda: depth_attention_reference(sources, query, gain, eps=eps),
            plain_reps)
        add("backward", "plain PyTorch op body",
            lambda: depth_attention_backward_reference(grad, sources, query, gain, eps=eps), plain_reps)
        add("forward", "naive stacked reference", lambda: depth_attention_reference(sources, query, gain, eps=eps),
            plain_reps)
        if inductor and label == "d2048-m9":
            rows.extend(_bench_inductor(sources, query, gain, eps, shape, dtype, fl["fwd"], big, plain_reps))
        del sources, grad
    for label, d, n, s, _, t, dtype in TWO_PHASE_SHAPES:
        if quick and not label.startswith("d2048"):
            continue
        rows.extend(_bench_two_phase(dev, label, d, n, s, t, dtype, reps, big, fast, plain=True))
    return rows


def _bench_inductor(sources, query, gain, eps, shape, dtype, floor, big, reps) -> list[Row]:
    try:
        compiled = torch.compile(lambda *xs: depth_attention_reference(list(xs[:-2]), xs[-2], xs[-1], eps=eps),
                                 dynamic=False)
        t0 = time.perf_counter()
        compiled(*sources, query, gain)
        compile_s = time.perf_counter() - t0
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        return [Row("cpu", "forward", shape, str(dtype).replace("torch.", ""), "torch.compile(reference)", floor,
                    status=f"failed: {type(exc).__name__}: {exc}"[:200])]
    row = _row("cpu", "forward", shape, dtype, "torch.compile(reference), Inductor C++", floor,
               lambda: compiled(*sources, query, gain), big, reps)
    row.extra["compile_seconds"] = compile_s
    return [row]


def _bench_two_phase(dev, label, d, n, s, t, dtype, reps, big, fast, plain) -> list[Row]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randn(t, d, generator=gen).to(device=dev, dtype=dtype) for _ in range(n)]
    queries = (0.02 * torch.randn(s, d, generator=gen)).to(device=dev, dtype=dtype)
    gains = torch.ones(s, d, device=dev, dtype=dtype)
    partial = torch.randn(t, d, generator=gen).to(device=dev, dtype=dtype)
    e = blocks[0].element_size()
    p1_floor = n * t * d * e + s * t * d * e + 2 * s * t * 4  # read N*D, write S*D (+ m, z)
    p2_floor = 3 * t * d * e + 2 * t * 4  # read o, partial, write h (+ m, z)
    shape = f"{label} D={d} N={n} S={s} T={t}"
    print(f"  {shape} {str(dtype)[6:]}", flush=True)
    impl = "generated Triton (op)" if dev == "cuda" else "op: native C++"
    o, m, z = torch.ops.attnres.depth_attention_phase1(blocks, queries, gains, 1e-6)
    if fast:
        rows.append(_row(dev, "phase1", shape, dtype, impl + (" (allocates o)" if dev == "cpu" else ""), p1_floor,
                         lambda: torch.ops.attnres.depth_attention_phase1(blocks, queries, gains, 1e-6), big, reps))
        rows.append(_row(dev, "phase2", shape, dtype, impl, p2_floor,
                         lambda: torch.ops.attnres.depth_attention_phase2(o[1], m[1], z[1], partial, queries[1],
                                                                          gains[1], 1e-6, 1.0), big, reps))
    if plain:
        n_plain = max(2, reps // 3)
        rows.append(_row(dev, "phase1", shape, dtype, "plain PyTorch op body", p1_floor,
                         lambda: phase1_reference(blocks, queries, gains, eps=1e-6), big, n_plain))
        rows.append(_row(dev, "phase2", shape, dtype, "plain PyTorch op body", p2_floor,
                         lambda: phase2_reference(o[1], m[1], z[1], partial, queries[1], gains[1], eps=1e-6), big, n_plain))
    return rows


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


def _fla():
    try:
        from fla.ops.attnres import fused_attnres

        return fused_attnres
    except Exception:
        return None


def bench_cuda(quick: bool, reps: int) -> list[Row]:
    rows: list[Row] = []
    dev = "cuda"
    big = BigCopy(dev, 2 << 30)
    fused = _fla()
    for shape, _, d, m, t, dtype in train_cases(dev, quick):
        sources, query, gain, grad = train_inputs(d, m, t, dtype, dev)
        fl = floors(d, m, t, sources[0].element_size())
        rows.append(_row(dev, "forward", shape, dtype, "generated Triton (op)", fl["fwd"],
                         lambda: torch.ops.attnres.depth_attention(sources, query, gain, 1e-6, 1.0), big, reps))
        rows.append(_row(dev, "backward", shape, dtype, "generated Triton (op)", fl["bwd"],
                         lambda: torch.ops.attnres.depth_attention_backward(grad, sources, query, gain, 1e-6, 1.0),
                         big, reps))
        if fused is not None:
            rows.append(_row(dev, "forward", shape, dtype, "fla fused_attnres", fl["fwd"],
                             lambda: fused(query, sources, gain, rms_eps=1e-6), big, reps))
            leaves = [x.detach().requires_grad_() for x in sources]

            def fla_fwd_bwd():
                out = fused(query, leaves, gain, rms_eps=1e-6)
                torch.autograd.grad(out, leaves, grad)

            rows.append(_row(dev, "forward+backward", shape, dtype, "fla fused_attnres", fl["fwd"] + fl["bwd"],
                             fla_fwd_bwd, big, reps))
        del sources, grad
    for label, d, n, s, t, _, dtype in TWO_PHASE_SHAPES:
        if quick and not label.startswith("d2048"):
            continue
        rows.extend(_bench_two_phase(dev, label, d, n, s, t, dtype, reps, big, True, plain=False))
    return rows


def unmeasured_cuda_rows() -> list[Row]:
    rows = []
    for shape, _, d, m, t, dtype in train_cases("cuda"):
        e = torch.empty((), dtype=dtype).element_size()
        fl = floors(d, m, t, e)
        for kernel, impl in (("forward", "generated Triton (op)"), ("backward", "generated Triton (op)"),
                             ("forward", "fla fused_attnres"), ("forward+backward", "fla fused_attnres")):
            floor = {"forward": fl["fwd"], "backward": fl["bwd"], "forward+backward": fl["fwd"] + fl["bwd"]}[kernel]
            rows.append(Row("cuda", kernel, shape, str(dtype).replace("torch.", ""), impl, floor,
                            status="unmeasured (no GPU)"))
    for label, d, n, s, t, _, dtype in TWO_PHASE_SHAPES:
        e = torch.empty((), dtype=dtype).element_size()
        shape1 = f"{label} D={d} N={n} S={s} T={t}"
        rows.append(Row("cuda", "phase1", shape1, str(dtype).replace("torch.", ""), "generated Triton (op)",
                        n * t * d * e + s * t * d * e + 2 * s * t * 4, status="unmeasured (no GPU)"))
        rows.append(Row("cuda", "phase2", shape1, str(dtype).replace("torch.", ""), "generated Triton (op)",
                        3 * t * d * e + 2 * t * 4, status="unmeasured (no GPU)"))
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_table(rows: list[Row], copy: dict, title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in rows:
            print(asdict(r))
        return
    console = Console(width=170)
    table = Table(title=title)
    for col in ("kernel", "shape", "dtype", "implementation", "floor MB", "GB/s", "copy GB/s", "of copy"):
        table.add_column(col, justify="right" if col in ("floor MB", "GB/s", "copy GB/s", "of copy") else "left",
                         no_wrap=True)
    for r in rows:
        if r.status != "measured":
            table.add_row(r.kernel, r.shape, r.dtype, r.impl, f"{r.floor_bytes / 1e6:.0f}", r.status, "", "")
            continue
        table.add_row(r.kernel, r.shape, r.dtype, r.impl, f"{r.floor_bytes / 1e6:.0f}", f"{r.gbps:.2f}",
                      f"{r.copy_gbps:.2f}", f"{100 * r.ratio_to_copy:.0f}%")
    console.print(table)
    console.print(
        f"copy bandwidth ({copy['bytes_moved'] >> 20} MiB moved): copy_ into preallocated "
        f"{copy['copy_into_preallocated_gbps']:.1f} GB/s (the baseline; re-timed next to every row), "
        f"clone {copy['clone_gbps']:.1f} GB/s (pays first-touch page faults)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per row (median reported)")
    ap.add_argument("--no-inductor", action="store_true", help="skip the torch.compile(reference) row")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--devices", default="cpu,cuda", help="cpu, cuda or both (cuda rows need a GPU)")
    ap.add_argument("--isa", default="best", help="native CPU kernel build: base, avx2, avx512 or best")
    args = ap.parse_args(argv)
    devices = set(args.devices.split(","))
    if cpu_kernels.available():
        cpu_kernels.select_isa(args.isa)

    threads = torch.get_num_threads()
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().machine,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_fast_path_available": cpu_kernels.available(),
        "cpu_kernel_isa": cpu_kernels.isa() if cpu_kernels.available() else None,
        "note": "CPU rows use fewer tokens than the CUDA rows (see each row's T) to keep the CPU run short.",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if "cuda" in devices and torch.cuda.is_available():
        cuda_copy = copy_bandwidth("cuda")
        cuda_rows = bench_cuda(args.quick, args.reps)
        cuda_json = {"meta": {**meta, "gpu": torch.cuda.get_device_name()}, "device": "cuda",
                     "copy_bandwidth": cuda_copy, "rows": [asdict(r) for r in cuda_rows]}
        (args.out_dir / "kernels_cuda.json").write_text(json.dumps(cuda_json, indent=2))
        print_table(cuda_rows, cuda_copy, "CUDA kernels")
        print(f"wrote {args.out_dir / 'kernels_cuda.json'}")
    if "cpu" in devices:
        print(f"[bench_kernels] CPU: {os.cpu_count()} cores, {threads} torch threads; fewer tokens on CPU than on CUDA")
        cpu_copy = copy_bandwidth("cpu")
        cpu_rows = bench_cpu(args.quick, args.reps, not args.no_inductor)
        cpu_json = {"meta": meta, "device": "cpu", "copy_bandwidth": cpu_copy, "rows": [asdict(r) for r in cpu_rows]}
        if not torch.cuda.is_available():
            cpu_json["cuda"] = {"status": "unmeasured (no GPU)", "rows": [asdict(r) for r in unmeasured_cuda_rows()]}
        (args.out_dir / "kernels_cpu.json").write_text(json.dumps(cpu_json, indent=2))
        print_table(cpu_rows, cpu_copy, "CPU kernels")
        if not torch.cuda.is_available():
            print("CUDA rows: unmeasured (no GPU) — recorded as such in kernels_cpu.json, not estimated")
        print(f"wrote {args.out_dir / 'kernels_cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
