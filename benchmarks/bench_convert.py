"""How long convert() takes as depth grows, and what a new kind of call costs afterwards.

    python benchmarks/bench_convert.py [--layers 6 12 24 48] [--d 256] [--dynamic/--static]

A LLaMA-style model (Hugging Face LlamaForCausalLM, d_model 256, random weights) at each depth
is converted once from `(input_ids,)` (preserve="exact", default num_blocks); the stages of the
real convert() are timed by wrapping the functions conversion/derive.py, conversion/select.py and api.py call. Writes
benchmarks/results/convert.json.

Stages: capture = the two torch.export runs (train and eval); analyse = residual-stream
analysis of both graphs; plan = sites, add locations and owners of every chain; install =
parameters and the runtime on the copy (apply_plan); total = convert(), deep copy included.

First calls: the converted model captures nothing per call (runtime/), so the first
call of each new call structure (padding mask, hidden states, a cache) is timed against the
same first call of the original model, each on a fresh copy.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnres_compile as ac  # noqa: E402
from attnres_compile import api  # noqa: E402
from attnres_compile.conversion import derive, select  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "convert.json"
# stage -> (module that calls it, the function's name there)
STAGES = {"capture": (derive, "capture"), "analyse": (derive, "analyse_streams"), "plan": (select, "plan_chain"),
          "plan_links": (derive, "chain_plan"), "install": (api, "_install_plan")}
CALLS = {  # new call structures after a conversion from (input_ids,)
    "attention_mask": lambda ids: {"attention_mask": torch.ones_like(ids)},
    "output_hidden_states": lambda ids: {"output_hidden_states": True},
    "use_cache": lambda ids: {"use_cache": True},
}


def llama(layers: int, d: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=d, intermediate_size=int(d * 8 / 3) // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 128),
                      max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class Timers:
    def __init__(self):
        self.t = defaultdict(float)
        self.saved = {}

    def __enter__(self):
        for stage, (module, attr) in STAGES.items():
            fn = getattr(module, attr)
            self.saved[module, attr] = fn

            def timed(*a, __fn=fn, __stage=stage, **k):
                t0 = time.perf_counter()
                try:
                    return __fn(*a, **k)
                finally:
                    self.t[__stage] += time.perf_counter() - t0

            setattr(module, attr, functools.wraps(fn)(timed) if not isinstance(fn, type) else _timed_class(fn, self, stage))
        return self

    def __exit__(self, *exc):
        for (module, attr), fn in self.saved.items():
            setattr(module, attr, fn)


def _timed_class(cls, timers, stage):
    def make(*a, **k):
        t0 = time.perf_counter()
        try:
            return cls(*a, **k)
        finally:
            timers.t[stage] += time.perf_counter() - t0
    return make


def run(layers: int, d: int, dynamic: bool) -> dict:
    model = llama(layers, d)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with Timers() as tm:
        t0 = time.perf_counter()
        conv = ac.convert(model, (ids,), preserve="exact", dynamic=dynamic)
        total = time.perf_counter() - t0
    rep = conv.attnres_report
    stages = {k: round(v, 4) for k, v in tm.t.items()}
    stages["plan"] = round(stages.get("plan", 0.0) + stages.pop("plan_links", 0.0), 4)
    row = {"layers": layers, "d_model": d, "dynamic": dynamic, "sublayers": 2 * layers, "sites": rep.num_sites,
           "total_s": round(total, 3), **{f"{k}_s": v for k, v in stages.items()}}
    row["pass_s"] = round(row.get("analyse_s", 0) + row.get("plan_s", 0) + row.get("install_s", 0), 4)
    row["first_call_ms"] = first_calls(model, conv, ids)
    return row


def first_calls(model, conv, ids) -> dict:
    """First call of each new call structure: converted vs original, ms (fresh copies each)."""
    import copy

    out = {}
    for name, kw in CALLS.items():
        times = {}
        for who, m in (("original", model), ("converted", conv)):
            m = copy.deepcopy(m)
            t0 = time.perf_counter()
            with torch.no_grad():
                m(ids, **kw(ids))
            times[who] = round(1000 * (time.perf_counter() - t0), 1)
        times["ratio"] = round(times["converted"] / times["original"], 2)
        out[name] = times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24, 48])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--static", action="store_true", help="capture with dynamic=False")
    args = ap.parse_args()
    run(2, args.d, not args.static)  # warm-up: imports, first export
    rows = []
    for n in args.layers:
        row = run(n, args.d, not args.static)
        rows.append(row)
        firsts = "  ".join(f"{k} {v['converted']:.0f}/{v['original']:.0f} ms" for k, v in row["first_call_ms"].items())
        print(f"layers {n:3d}: total {row['total_s']:7.2f}s  capture {row['capture_s']:7.2f}s  "
              f"analyse {row['analyse_s']:6.3f}s  plan {row['plan_s']:6.3f}s  install {row['install_s']:6.3f}s  "
              f"first calls (converted/original): {firsts}")
    base = rows[0]
    for r in rows:
        scale = r["layers"] / base["layers"]
        r["pass_per_layer_ms"] = round(1000 * r["pass_s"] / r["layers"], 2)
        r["capture_growth_vs_linear"] = round(r["capture_s"] / (base["capture_s"] * scale), 2)
        r["pass_growth_vs_linear"] = round(r["pass_s"] / (base["pass_s"] * scale), 2) if base["pass_s"] else None
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
