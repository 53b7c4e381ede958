"""Model-level cost of AttnRes: step time of the converted model over the same model with
plain residuals, eager and compiled, training and inference, timed in one run.

    python benchmarks/bench_models.py [--model gpt|llama] [--layers 12] [--d 256] [--batch 8] [--seq 128]
                                      [--num-blocks 8] [--device cpu|cuda] [--no-compile]

``--model gpt`` is examples/gpt.py; ``--model llama`` a Hugging Face LlamaForCausalLM built from a
config of the same size (intermediate 8/3 d rounded to 64, vocab 32000, grouped KV heads).
Compiled inference runs under no_grad, which on CUDA serves the sites two-phase (SPEC section 3).

Variants are timed interleaved (baseline step, AttnRes step, baseline step, ...) so that
machine load hits both alike; medians are reported. Writes benchmarks/results/models_<device>.json.
On a machine without CUDA, `--device cuda` records the CUDA rows as unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnres_compile  # noqa: E402
from examples.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()


@torch.no_grad()
def infer_step(model, x, y):
    model(x)


def time_pair(fns: dict, iters: int, warmup: int, device) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


class _Logits(torch.nn.Module):
    """A Hugging Face causal LM called like examples GPT: ids -> logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, idx):
        return self.lm(input_ids=idx, use_cache=False).logits


def build(args, device):
    torch.manual_seed(0)
    if args.model == "gpt":
        cfg = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.d)
        return GPT(cfg).to(device), cfg.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 32000
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.d, intermediate_size=64 * round(8 * args.d / 3 / 64),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=max(1, args.heads // 4), max_position_embeddings=args.seq)
    return _Logits(LlamaForCausalLM(cfg)).to(device), vocab


def run(args) -> dict:
    device = torch.device(args.device)
    base, vocab = build(args, device)
    x = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    conv = attnres_compile.convert(base, (x,), num_blocks=args.num_blocks).to(device)
    rows = {}
    modes = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    for mode, compiled in modes:
        b, a = base, conv
        if compiled:
            torch._dynamo.reset()
            b = torch.compile(base, backend="inductor")
            a = torch.compile(conv, backend="attnres", options={"decompose": args.decompose})
        b.train(), a.train()
        ob = torch.optim.AdamW(base.parameters(), lr=1e-4)
        oa = torch.optim.AdamW(conv.parameters(), lr=1e-4)
        ms = time_pair({"baseline": lambda: train_step(b, ob, x, y), "attnres": lambda: train_step(a, oa, x, y)},
                       args.iters, args.warmup, device)
        rows[f"{mode} training"] = ms | {"ratio": ms["attnres"] / ms["baseline"]}
        b.eval(), a.eval()
        ms = time_pair({"baseline": lambda: infer_step(b, x, y), "attnres": lambda: infer_step(a, x, y)},
                       args.iters, args.warmup, device)
        rows[f"{mode} inference"] = ms | {"ratio": ms["attnres"] / ms["baseline"]}
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["gpt", "llama"], default="gpt")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--num-blocks", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-decompose", dest="decompose", action="store_false",
                    help="compiled CPU: keep each site one opaque op (its native kernel) instead of Inductor code")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or RESULTS / f"models_{args.device}{'' if args.model == 'gpt' else '_' + args.model}.json")
    result = {
        "device": args.device,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": vars(args) | {"sublayers": 2 * args.layers},
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None,
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        result["rows"] = "unmeasured (no GPU on this machine)"
        print(result["rows"])
    else:
        result["rows"] = run(args)
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{args.model} {args.layers} layers d {args.d}, batch {args.batch} x {args.seq}, "
                        f"{args.num_blocks} blocks, {args.device}")
        for col in ("", "baseline ms", "AttnRes ms", "AttnRes / baseline"):
            t.add_column(col, justify="right")
        for k, r in result["rows"].items():
            t.add_row(k, f"{r['baseline']:.1f}", f"{r['attnres']:.1f}", f"{r['ratio']:.3f}x")
        Console().print(t)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
