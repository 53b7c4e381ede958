"""Generation cost of AttnRes: prefill time and decode tokens/s of the converted model over the
original, timed in one run, in PyTorch (eager and compiled) and in onnxruntime.

    python benchmarks/bench_generate.py [--layers 12] [--d 512] [--prompt 64] [--new 32]
                                        [--batches 1 8] [--compile-batches 1] [--device cpu|cuda]
                                        [--no-compile] [--no-onnx]

A Hugging Face LLaMA config (random weights) and its conversion (exact mode, default blocks)
run the same prompt: the prefill is one forward of the prompt with `use_cache=True`, a decode
step one forward of one token against that cache (what `generate()` does per token, without its
logits processing). Original and converted are timed interleaved (step for step), medians
reported. Eager decode is also timed with the two-phase schedule forced on (on CPU it is off by
default). onnxruntime runs each model's decoder with past (`export_decoder`: stock function body
and the fused kernel for the converted one). Writes benchmarks/results/generate_<device>.json;
on a machine without CUDA, `--device cuda` records the CUDA rows as unmeasured.

The full run takes under 10 minutes on two CPU cores: most of it is Inductor compiling four
graphs per batch (prefill and decode of both models; a batch of 1 is specialised by Dynamo, so
no graph serves two batch sizes) and the two ONNX exports, so the compiled rows are measured at
`--compile-batches` (default: batch 1, the decode target's) only. Each row prints when done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnres_compile as ac  # noqa: E402
from attnres_compile.onnx.decoder import _export_decoder  # noqa: E402
from bench_models import time_pair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def llama(layers: int, d: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(d * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=d // 64, num_key_value_heads=max(1, d // 128),
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def torch_steps(model, ids):
    """(prefill fn, decode fn) of a model on a prompt: the decode step reuses the prefill's cache."""
    with torch.no_grad():
        pre = model(ids, use_cache=True)
    cache = pre.past_key_values
    nxt = pre.logits[:, -1:].argmax(-1)

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)

    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode():
        with torch.no_grad():
            model(nxt, use_cache=True, **{name: cache})
            cache.crop(-1)  # drop the token just added: the same past length every step

    return prefill, decode


def ort_steps(session, ids, layers_past: dict):
    batch, prompt = ids.shape
    inputs = {i.name: i for i in session.get_inputs()}
    empty = {n: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for n, i in inputs.items()
             if n.startswith("past_")}
    mask = np.ones((batch, prompt), np.int64)
    pos = np.broadcast_to(np.arange(prompt), (batch, prompt)).copy()
    feed_pre = {"input_ids": ids.numpy(), "attention_mask": mask, "position_ids": pos, **empty}
    outs = session.run(None, feed_pre)
    names = [o.name for o in session.get_outputs()][1:]
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs[1:])}
    feed_dec = {"input_ids": outs[0][:, -1:].argmax(-1).astype(np.int64),
                "attention_mask": np.ones((batch, prompt + 1), np.int64),
                "position_ids": np.full((batch, 1), prompt, np.int64), **past}
    return (lambda: session.run(None, feed_pre)), (lambda: session.run(None, feed_dec))


def run(args) -> dict:
    import onnxruntime as ort

    device = torch.device(args.device)
    base = llama(args.layers, args.d, args.vocab).to(device)
    conv = ac.convert(base, (torch.randint(0, args.vocab, (1, 8)),), preserve="exact",
                      num_blocks=args.num_blocks).to(device)
    rows = {}
    t0 = time.perf_counter()

    def done(name):
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {rows[name]['ratio']:.3f}x", flush=True)

    for batch in args.batches:
        ids = torch.randint(0, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        bp, bd = torch_steps(base, ids)
        cp, cd = torch_steps(conv, ids)
        ms = time_pair({"original": bp, "attnres": cp}, args.iters, args.warmup, device)
        rows[f"eager prefill, batch {batch}"] = ms | {"ratio": ms["attnres"] / ms["original"]}
        done(f"eager prefill, batch {batch}")
        ms = time_pair({"original": bd, "attnres": cd}, args.iters * 4, args.warmup, device)
        rows[f"eager decode, batch {batch}"] = ms | {"ratio": ms["attnres"] / ms["original"],
                                                   "tokens_per_s": {k: 1e3 * batch / v for k, v in ms.items()}}
        done(f"eager decode, batch {batch}")
        conv.attnres.runtime.two_phase = True
        ms2 = time_pair({"original": bd, "attnres": cd}, args.iters * 4, args.warmup, device)
        conv.attnres.runtime.two_phase = None
        rows[f"eager decode two-phase, batch {batch}"] = ms2 | {"ratio": ms2["attnres"] / ms2["original"]}
        done(f"eager decode two-phase, batch {batch}")
        if args.compile and batch in args.compile_batches:
            torch._dynamo.reset()
            cb = torch.compile(base, backend="inductor", dynamic=True)
            cc = torch.compile(conv, backend="attnres", dynamic=True)
            bp, bd = torch_steps(cb, ids)
            cp, cd = torch_steps(cc, ids)
            ms = time_pair({"original": bp, "attnres": cp}, args.iters, args.warmup, device)
            rows[f"compiled prefill, batch {batch}"] = ms | {"ratio": ms["attnres"] / ms["original"]}
            done(f"compiled prefill, batch {batch}")
            ms = time_pair({"original": bd, "attnres": cd}, args.iters * 4, args.warmup, device)
            rows[f"compiled decode, batch {batch}"] = ms | {"ratio": ms["attnres"] / ms["original"]}
            done(f"compiled decode, batch {batch}")
        if args.onnx and device.type == "cpu":
            if batch == args.batches[0]:
                protos = {"original": _export_decoder(base), "attnres": _export_decoder(conv)}
                sessions = {k: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
                            for k, p in protos.items()}
                sessions["attnres fused"] = ac.onnx.ort_session(protos["attnres"], fused=True)
            steps = {k: ort_steps(s, ids.cpu(), {}) for k, s in sessions.items()}
            ms = time_pair({k: v[0] for k, v in steps.items()}, args.iters, args.warmup, device)
            rows[f"onnxruntime prefill, batch {batch}"] = ms | {
                "ratio": ms["attnres"] / ms["original"], "ratio_fused": ms["attnres fused"] / ms["original"]}
            done(f"onnxruntime prefill, batch {batch}")
            ms = time_pair({k: v[1] for k, v in steps.items()}, args.iters * 4, args.warmup, device)
            rows[f"onnxruntime decode, batch {batch}"] = ms | {
                "ratio": ms["attnres"] / ms["original"], "ratio_fused": ms["attnres fused"] / ms["original"]}
            done(f"onnxruntime decode, batch {batch}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--compile-batches", type=int, nargs="+", default=[1],
                    help="batches to time compiled (each costs four Inductor compiles)")
    ap.add_argument("--num-blocks", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or RESULTS / f"generate_{args.device}.json")
    result = {
        "device": args.device,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": vars(args),
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        result["rows"] = "unmeasured (no GPU on this machine)"
        print(result["rows"])
    else:
        result["rows"] = run(args)
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"LLaMA {args.layers} layers d {args.d}, prompt {args.prompt}, {args.device}")
        for col in ("", "original ms", "AttnRes ms", "AttnRes / original", "fused kernel / original"):
            t.add_column(col, justify="right")
        for k, r in result["rows"].items():
            fused = f"{r['ratio_fused']:.3f}x" if "ratio_fused" in r else ""
            t.add_row(k, f"{r['original']:.2f}", f"{r['attnres']:.2f}", f"{r['ratio']:.3f}x", fused)
        Console(width=150).print(t)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
