"""What the runtime itself costs at call time (issue 19's targets), timed in one run:

    python benchmarks/bench_runtime.py [--iters 30] [--only per_op decode forward] [--device cpu|cuda]

1. per_op: the cost per *unplanned* torch op. A PreNorm LM whose sublayers each run K extra
   cheap ops (on a 1-element tensor) besides their real work, original and converted, at K = 0
   and K = 400: (converted - original at K) - (converted - original at 0), over the number of
   extra ops per call. Goal: under 0.2 us. (A torch function mode, the previous design, paid
   about 1 us per op.)
2. decode: eager decode per token, batch 1, of a Qwen3-style Hugging Face model (12 layers,
   d 512, 8 heads of 64, GQA 4 kv heads), converted with 4 blocks (exact), one token against a
   64-token cache, as generate() runs it. Target: <= 1.10x the original's.
3. forward: eager no-grad forward of the examples GPT (12 layers, d 256, batch 8, seq 128, 8
   blocks), as benchmarks/bench_models.py's "eager inference" row. Target: <= 1.12x.

Original and converted run interleaved (call for call), medians reported. Writes
benchmarks/results/runtime_<device>.json. Run on an idle machine: timings of parallel jobs mean
nothing. On a machine without CUDA, --device cuda records every row as unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import attnres_compile as ac  # noqa: E402
from bench_models import time_pair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _no_grad_call(model, *args):
    """A zero-argument function that runs `model(*args)` without gradients (what time_pair times)."""
    def call():
        with torch.no_grad():
            model(*args)
    return call


# -- 1. per unplanned op ---------------------------------------------------------------------------

class _Busy(nn.Module):
    """A PreNorm sublayer that also runs `extra` cheap torch ops that the plan does not name."""

    def __init__(self, d: int, extra: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.extra = extra

    def forward(self, x):
        t = x.new_zeros(1)
        for _ in range(self.extra):
            t = torch.neg(t)
        return self.fc(self.norm(x)) + t


class _BusyLM(nn.Module):
    def __init__(self, layers: int, d: int, extra: int):
        super().__init__()
        self.emb = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(_Busy(d, extra) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = x + b(x)
        return self.norm(x)


def per_op(args, device) -> dict:
    layers, d, extra = 8, 32, 400
    idx = torch.randint(0, 64, (1, 4), device=device)
    out = {}
    for k in (0, extra):
        torch.manual_seed(0)
        model = _BusyLM(layers, d, k).to(device).eval()
        conv = ac.convert(model, (idx,), num_blocks=4)
        out[k] = time_pair({"baseline": _no_grad_call(model, idx), "attnres": _no_grad_call(conv, idx)},
                           args.iters, args.warmup, device)
    gap0 = out[0]["attnres"] - out[0]["baseline"]
    gap = out[extra]["attnres"] - out[extra]["baseline"]
    ops = layers * extra
    return {"layers": layers, "extra_ops_per_call": ops, "ms_at_0": out[0], f"ms_at_{extra}": out[extra],
            "us_per_unplanned_op": (gap - gap0) * 1e3 / ops, "goal_us": 0.2}


# -- 2. eager decode --------------------------------------------------------------------------------

def qwen3(layers: int, d: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=8192, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                      num_attention_heads=d // 64, num_key_value_heads=d // 128, head_dim=64,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def decode(args, device) -> dict:
    from bench_generate import torch_steps

    model = qwen3(12, 512).to(device)
    ids = torch.randint(0, 8192, (1, 64), device=device)
    conv = ac.convert(model, (ids[:, :8],), num_blocks=4, preserve="exact")
    _, dec_base = torch_steps(model, ids)
    _, dec_conv = torch_steps(conv, ids)
    ms = time_pair({"baseline": dec_base, "attnres": dec_conv}, args.iters * 4, args.warmup, device)
    return {"model": "Qwen3ForCausalLM, 12 layers, d 512, 8 heads (4 kv), 4 blocks, exact", "batch": 1,
            "cache": 64, "ms_per_token": ms, "ratio": ms["attnres"] / ms["baseline"], "target": 1.10}


# -- 3. examples GPT forward ------------------------------------------------------------------------

def forward(args, device) -> dict:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, n_layer=12, n_head=4, n_embd=256)
    model = GPT(cfg).to(device).eval()
    x = torch.randint(0, cfg.vocab_size, (8, 128), device=device)
    conv = ac.convert(model, (x,), num_blocks=8)
    ms = time_pair({"baseline": _no_grad_call(model, x), "attnres": _no_grad_call(conv, x)}, args.iters, args.warmup,
                   device)
    return {"model": "examples GPT, 12 layers, d 256, batch 8, seq 128, 8 blocks", "ms": ms,
            "ratio": ms["attnres"] / ms["baseline"], "target": 1.12}


ROWS = {"per_op": per_op, "decode": decode, "forward": forward}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    result = {"device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": {}}
    if device.type == "cuda" and not torch.cuda.is_available():
        result["rows"] = {name: "unmeasured: no CUDA device" for name in args.only}
    else:
        for name in args.only:
            result["rows"][name] = ROWS[name](args, device)
            print(name, json.dumps(result["rows"][name]), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"runtime_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
