"""Output tokens per second of a converted model in vLLM, over the same model unconverted.

    python benchmarks/bench_vllm.py        # main venv; needs `make vllm-venv` -> benchmarks/results/vllm_cpu.json

A Llama from a config (8 layers, d 512, 16 heads of 32, vocab 256), converted with num_blocks=4
(queries moved off zero), and the same weights unconverted, each saved once here. Every engine
runs in the serving venv (.venv-vllm, a subprocess per engine) and generates greedy tokens for a
batch of 1 and a batch of 8 prompts (32 prompt tokens, 64 new tokens each, ignore_eos), after
one warm-up batch; the figure is new tokens / wall seconds of the timed generate() call, the
best of `--repeats`. Engines:

    unconverted, vLLM's own implementation (the default path), compiled and eager
    unconverted, vLLM's Transformers backend (model_impl="transformers"), compiled and eager
    converted (the plugin: the Transformers backend), compiled and eager

Ratios: converted over each unconverted engine at the same batch size. Run on an idle machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
OUT = ROOT / "benchmarks" / "results" / "vllm_cpu.json"
PROMPT_TOKENS, NEW_TOKENS, BATCHES = 32, 64, (1, 8)


def engine(job: dict) -> dict:
    """In the serving venv: one engine, timed generate() per batch size."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {"model_impl": job["model_impl"]} if job.get("model_impl") else {}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=256, seed=0, gpu_memory_utilization=0.2,
              enforce_eager=job["enforce_eager"], skip_tokenizer_init=True, **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = {"enforce_eager_ran": llm.llm_engine.vllm_config.model_config.enforce_eager,
           "architecture": getattr(llm.llm_engine.vllm_config.model_config, "architecture", None)}
    for batch in BATCHES:
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 3 * j) % 256 for j in range(PROMPT_TOKENS)])
                   for i in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)          # warm-up
        best = float("inf")
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        out[f"batch{batch}"] = {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}
    return out


def make_models(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import attnres_compile as ac
    sys.path.insert(0, str(ROOT))
    from tests.models import perturb

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                                         bos_token_id=None, eos_token_id=None, tie_word_embeddings=False))
    model.save_pretrained(folder / "plain")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    perturb(ac.convert(model, (ids,), kwargs={"use_cache": False}, num_blocks=4)).save_pretrained(folder / "converted")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--engine"]:
        job = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(engine(job)))
        return 0
    repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 3
    if not VLLM_PY.exists():
        print("the serving venv is absent: make vllm-venv", file=sys.stderr)
        return 1
    engines = [("unconverted, vLLM implementation", "plain", None), ("unconverted, Transformers backend", "plain", "transformers"),
               ("converted (plugin)", "converted", None)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_models(d)
        for name, folder, impl in engines:
            for eager in (False, True):
                label = "eager" if eager else "compiled"
                job = {"model": str(d / folder), "model_impl": impl, "enforce_eager": eager, "repeats": repeats}
                (d / "job.json").write_text(json.dumps(job))
                env = dict(os.environ, VLLM_DISABLE_COMPILE_CACHE="1")
                proc = subprocess.run([str(VLLM_PY), __file__, "--engine", str(d / "job.json"), str(d / "out.json")],
                                      env=env, capture_output=True, text=True, timeout=900)
                if proc.returncode:
                    print(proc.stderr[-4000:], file=sys.stderr)
                    return 1
                r = json.loads((d / "out.json").read_text())
                rows.append({"engine": name, "mode": label, "asked_enforce_eager": eager, **r})
                print(f"{name:36s} {label:28s} " + "  ".join(
                    f"batch {b}: {r[f'batch{b}']['tokens_per_s']:7.1f} tok/s" for b in BATCHES), flush=True)
    ratios = {}
    conv = {row["mode"]: row for row in rows if row["engine"].startswith("converted")}
    for row in rows:
        if row["engine"].startswith("converted"):
            continue
        mine = conv["eager"] if row["asked_enforce_eager"] else conv["compiled"]
        for b in BATCHES:
            key = f"converted / {row['engine']}, {row['mode']}, batch {b}"
            ratios[key] = mine[f"batch{b}"]["tokens_per_s"] / row[f"batch{b}"]["tokens_per_s"]
    for k, v in ratios.items():
        print(f"{k:75s} {v:.3f}x")
    OUT.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "repeats": repeats,
                               "target": "converted / unconverted >= 0.90 at batch 8, compiled",
                               "rows": rows, "ratios": ratios}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
