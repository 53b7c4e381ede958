"""onnxruntime speed: the converted model against the same model exported without AttnRes.

    python benchmarks/bench_onnx.py [--layers 12] [--d 256] [--batch 4] [--seq 128] [--num-blocks 8]

Both models are exported from one GPT (examples/gpt.py) in one run and timed alternately in
onnxruntime (CPU provider) so that machine load hits both alike. Writes
benchmarks/results/onnx_cpu.json and prints the ratio. The AttnRes model is timed as exported
(function body, stock onnxruntime), inlined (plain ops), and with the fused
`attnres::DepthAttention` kernel registered (`ort_session(path, fused=True)`), which claims
every DepthAttention node from the function: `attnres_fused_stacked` runs it on the exported
graph as is (the Concat that stacks the sources stays), `attnres_fused` also drops that Concat
(`unstack_sources`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnres_compile  # noqa: E402
from attnres_compile.onnx import ort_kernel  # noqa: E402
from attnres_compile.onnx import count_depth_attention_nodes, ort_session  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def session(path: str, threads: int, fused: bool = False, unstack: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort_session(path, fused=fused, unstack=unstack, sess_options=opts)


def time_sessions(sessions: dict, feed: dict, iters: int, warmup: int = 3) -> dict:
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    samples = {k: [] for k in sessions}
    for _ in range(iters):
        for k, s in sessions.items():  # interleaved: load drift hits every variant alike
            t = time.perf_counter()
            s.run(None, feed)
            samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--num-blocks", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(RESULTS / "onnx_cpu.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.d)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    conv = attnres_compile.convert(model, (idx,), num_blocks=args.num_blocks).eval()
    with torch.no_grad():  # trained-looking depth weights (the speed does not depend on them)
        for p in attnres_compile.attnres_parameters(conv).values():
            p.add_(0.1 * torch.randn_like(p))

    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, f"{k}.onnx") for k in ("baseline", "attnres", "attnres_inlined")}
        torch.onnx.export(model, (idx,), paths["baseline"], dynamo=True, opset_version=20, verbose=False)
        nodes = count_depth_attention_nodes(attnres_compile.export_onnx(conv, (idx,), paths["attnres"]))
        attnres_compile.export_onnx(conv, (idx,), paths["attnres_inlined"], inline=True)
        sessions = {k: session(p, args.threads) for k, p in paths.items()}
        fused = ort_kernel.available()
        if fused:
            sessions["attnres_fused_stacked"] = session(paths["attnres"], args.threads, fused=True, unstack=False)
            sessions["attnres_fused"] = session(paths["attnres"], args.threads, fused=True)
        feed = {"idx": idx.numpy()}
        outs, fused_calls = {}, {}
        for k, s in sessions.items():  # one run each; the fused kernel's call count per run
            c0 = ort_kernel.calls() if fused else 0
            outs[k] = s.run(None, feed)[0]
            fused_calls[k] = ort_kernel.calls() - c0 if fused else 0
        with torch.no_grad():
            ref = conv(idx).numpy()
        errs = {k: float(np.abs(outs[k] - ref).max() / np.abs(ref).max()) for k in outs if k != "baseline"}
        load_before = os.getloadavg()[0]
        ms = time_sessions(sessions, feed, args.iters)
        load_after = os.getloadavg()[0]

    result = {
        "device": "cpu",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "onnxruntime": ort.__version__,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],  # before / after timing
        "config": vars(args) | {"sublayers": 2 * args.layers},
        "ms_per_run": ms,
        "ratio_attnres_over_baseline": ms["attnres"] / ms["baseline"],
        "ratio_inlined_over_baseline": ms["attnres_inlined"] / ms["baseline"],
        "ratio_fused_over_baseline": ms["attnres_fused"] / ms["baseline"] if fused else None,
        "ratio_fused_stacked_over_baseline": ms["attnres_fused_stacked"] / ms["baseline"] if fused else None,
        "fused_kernel_calls_per_run": fused_calls,
        "depth_attention_nodes": nodes,
        "rel_err_vs_torch": errs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"onnxruntime CPU, GPT {args.layers} layers d {args.d}, batch {args.batch} x {args.seq}, "
                    f"{args.num_blocks} blocks")
    for col in ("model", "ms / run", "vs baseline", "rel err vs torch"):
        t.add_column(col, justify="right")
    for k in ms:
        t.add_row(k, f"{ms[k]:.2f}", f"{ms[k] / ms['baseline']:.3f}x", f"{errs.get(k, 0):.1e}" if k in errs else "-")
    Console().print(t)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
