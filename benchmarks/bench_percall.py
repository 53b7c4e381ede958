"""Per-call cost of one depth-attention site in eager PyTorch on CPU, and where it goes.

    python benchmarks/bench_percall.py [--d 4096] [--m 9] [--threads 1]

Decode size by default: one token, D 4096, 9 sources (147 KB of sources, in cache). Each row is
the best of 5 runs of 20,000 calls under no_grad, so it measures the fixed cost of a call (the
kernel's share is the difference to the D 16 row). Rows:

* ``torch.add`` of two sources and ``torch.stack`` of the M sources: what a plain op costs here;
* ``attnres_native.isa()``: a dispatcher call with no tensors;
* the native kernel op (``attnres_native.forward``), the registered autograd op
  (``attnres_native.depth_attention``), the pybind11 entry the converted models' eager sites
  call (``attnres_compile._C.depth_attention``: the same autograd kernel without the boxed
  dispatch), and the public ``depth_attention()`` (Python checks skipped, the C++ ones run);
* the Python custom op ``torch.ops.attnres.depth_attention`` (what every capture records), on the
  native kernels and on the plain PyTorch path (``plain_cpu_path()``), for the before/after.

Writes ``benchmarks/results/percall_cpu.json``. No assertion: tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnres_compile.ops.kernels import cpu as cpu_kernels  # noqa: E402
from attnres_compile.ops import depth_attention  # noqa: E402
from attnres_compile.ops.depth_attention import plain_cpu_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_us(fn, calls: int, runs: int = 5) -> float:
    for _ in range(min(1000, calls)):
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def rows_for(d: int, m: int, calls: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(1, 1, d, generator=gen) for _ in range(m)]
    q, g = 0.01 * torch.randn(d, generator=gen), torch.ones(d)
    native = torch.ops.attnres_native
    rows = {}
    with torch.no_grad():
        rows["torch.add (2 sources)"] = best_us(lambda: torch.add(src[0], src[1]), calls)
        rows[f"torch.stack ({m} sources)"] = best_us(lambda: torch.stack(src), calls)
        if cpu_kernels.available():
            rows["attnres_native.isa() (no tensors)"] = best_us(lambda: native.isa.default(), calls)
            rows["attnres_native.forward (kernel op)"] = best_us(
                lambda: native.forward.default(src, q, g, 1e-6, 1.0), calls)
            rows["attnres_native.depth_attention (registered op)"] = best_us(
                lambda: native.depth_attention.default(src, q, g, 1e-6, 1.0), calls)
            from attnres_compile import _C
            rows["attnres_compile._C.depth_attention (the eager site's call)"] = best_us(
                lambda: _C.depth_attention(src, q, g, 1e-6, 1.0), calls)
            rows["depth_attention() public function"] = best_us(lambda: depth_attention(src, q, g, eps=1e-6), calls)
        rows["torch.ops.attnres.depth_attention (Python op, native kernel)"] = best_us(
            lambda: torch.ops.attnres.depth_attention(src, q, g, 1e-6, 1.0), calls // 4)
        with plain_cpu_path():
            rows["torch.ops.attnres.depth_attention (Python op, plain PyTorch)"] = best_us(
                lambda: torch.ops.attnres.depth_attention(src, q, g, 1e-6, 1.0), calls // 4)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--m", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: no thread handoff)")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=RESULTS / "percall_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": args.threads,
        "native_isa": cpu_kernels.isa() if cpu_kernels.available() else None,
        "method": "best of 5 runs of N calls, no_grad, one token",
        "us_per_call": {f"D={args.d} M={args.m}": rows_for(args.d, args.m, args.calls),
                        f"D=16 M={args.m}": rows_for(16, args.m, args.calls)},
    }
    from rich.console import Console
    from rich.table import Table

    shapes = list(result["us_per_call"])
    t = Table(title=f"one depth-attention site per eager call, CPU, {args.threads} thread(s), us")
    t.add_column("call")
    for s in shapes:
        t.add_column(s, justify="right")
    for name in result["us_per_call"][shapes[0]]:
        t.add_row(name, *[f"{result['us_per_call'][s][name]:.1f}" for s in shapes])
    Console().print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
