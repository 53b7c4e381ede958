"""Training-dynamics study: baseline vs Full vs Block AttnRes on a byte-level LM (issue 5).

    python -m examples.train_lm run --variant block4 --seed 0      # one run -> docs/results/runs/
    python -m examples.train_lm study                              # every run of the study
    python -m examples.train_lm timing                             # step time over the baseline
    python -m examples.train_lm plot                               # docs/figures/*.png + summary

The model is examples/gpt.py (nanoGPT-style PreNorm GPT, written plainly); the AttnRes
variants are `attnres_compile.convert()` of that same model with the same initial weights:
"full" is block_size=1, "block4" is num_blocks=4. Every variant of a seed sees the same
batches in the same order (batch offsets come from a generator seeded by the seed alone),
with the same AdamW groups and schedule. The new parameters get their own optimizer group
through `attnres_compile.attnres_parameters(converted)`, with a learning-rate multiplier and
weight decay of their own (`--attnres-lr-mult`, `--attnres-wd`).

Each run writes one JSON file: train and validation loss curves, per-layer gradient norms
(mean over the last fifth of training, pre-clipping), the RMS of every sublayer's input on
validation batches at the end (baseline: the residual stream at the norm's input; AttnRes:
the depth-attention mixture), the learned depth weights (site x source, mean over
validation tokens) and the run's own step time. It also saves the converted program
(`torch.export.save`, plus the AttnRes safetensors) for `attnres plot-weights`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import attnres_compile
from attnres_compile.analysis import record_sites
from examples.data import get_batch, load_corpus
from examples.gpt import GPT, GPTConfig, cosine_lr, loss_fn, param_groups

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
RUNS = RESULTS / "runs"
FIGURES = ROOT / "docs" / "figures"
CHECKPOINTS = ROOT / ".attnres_runs"   # git-ignored: converted programs for plot-weights
VARIANTS = ("baseline", "full", "block4")
ABLATION = ((0.3, 0.0), (0.1, 0.0), (3.0, 0.0), (1.0, 0.1))   # (AttnRes lr multiplier, AttnRes weight decay)


@dataclass
class RunConfig:
    variant: str = "block4"          # baseline | full (block_size=1) | block4 (num_blocks=4)
    seed: int = 0
    n_layer: int = 8
    n_embd: int = 128
    n_head: int = 4
    context: int = 128
    batch_size: int = 16
    steps: int = 1000
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1        # matrices and embeddings of the model (nanoGPT groups)
    grad_clip: float = 1.0
    attnres_lr_mult: float = 1.0     # AttnRes queries and key-norm gains: lr = lr * mult
    attnres_wd: float = 0.0          # ... and their weight decay
    eval_interval: int = 50
    eval_batches: int = 8            # fixed validation batches for the curve
    final_eval_batches: int = 32
    grad_every: int = 5              # per-layer gradient norms every N steps
    threads: int = 1

    @property
    def name(self) -> str:
        base = f"L{self.n_layer}d{self.n_embd}_{self.variant}"
        if self.variant != "baseline" and (self.attnres_lr_mult != 1.0 or self.attnres_wd != 0.0):
            base += f"_lr{self.attnres_lr_mult:g}_wd{self.attnres_wd:g}"
        return f"{base}_s{self.seed}"

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.context


def tiny_config(variant: str, seed: int = 0) -> RunConfig:
    """A few steps of a small model, for CI."""
    return RunConfig(variant=variant, seed=seed, n_layer=2, n_embd=32, n_head=2, context=32, batch_size=4,
                     steps=8, warmup=2, eval_interval=4, eval_batches=2, final_eval_batches=2, grad_every=1,
                     lr=3e-3)


# -- models and optimizer -------------------------------------------------------------------------

def build_model(cfg: RunConfig) -> tuple[torch.nn.Module, torch.Tensor]:
    """The variant's model: the plain GPT, or its conversion (same initial weights for every variant)."""
    torch.manual_seed(cfg.seed)
    gpt = GPT(GPTConfig(vocab_size=256, block_size=cfg.context, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, dropout=0.0, bias=True))
    example = torch.randint(0, 256, (2, cfg.context), generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.variant == "baseline":
        return gpt, example
    if cfg.variant == "full":
        return attnres_compile.convert(gpt, (example,), block_size=1), example
    if cfg.variant == "block4":
        return attnres_compile.convert(gpt, (example,), num_blocks=4), example
    raise ValueError(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """nanoGPT groups for the model's own parameters, plus one group for the AttnRes ones."""
    if cfg.variant == "baseline":
        groups = param_groups(model.parameters(), cfg.weight_decay)
        for g in groups:
            g["lr_mult"] = 1.0
    else:
        groups = attnres_compile.param_groups(model, cfg.lr, weight_decay=cfg.weight_decay,
                                              attnres_lr_mult=cfg.attnres_lr_mult,
                                              attnres_weight_decay=cfg.attnres_wd)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step: int, cfg: RunConfig) -> float:
    return cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def sublayer_of(name: str) -> int | None:
    """Parameter name -> sublayer index (2i: ln_1 + attention of block i, 2i+1: ln_2 + MLP).

    PEFT's names of the same parameters count too (`base_model.model.` prefix, `.base_layer`);
    LoRA factors are not the model's parameters and count nowhere."""
    if "lora_" in name:
        return None
    parts = name.removeprefix("base_model.model.").replace(".base_layer", "").split(".")
    if len(parts) < 4 or parts[0] != "transformer" or parts[1] != "h":
        return None
    i = int(parts[2])
    if parts[3] in ("ln_1", "attn"):
        return 2 * i
    if parts[3] in ("ln_2", "mlp"):
        return 2 * i + 1
    return None


def sublayer_grad_norms(model: torch.nn.Module, n_sublayers: int) -> list[float]:
    sq = [0.0] * n_sublayers
    for name, p in model.named_parameters():
        k = sublayer_of(name)
        if k is not None and p.grad is not None:
            sq[k] += float(p.grad.detach().pow(2).sum())
    return [math.sqrt(s) for s in sq]


def cv(xs: list[float]) -> float:
    """Coefficient of variation (population std / mean)."""
    m = statistics.fmean(xs)
    return statistics.pstdev(xs) / m if m else float("nan")


# -- measurements at the end ----------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> float:
    model.eval()
    out = statistics.fmean(loss_fn(model(x), y).item() for x, y in batches)
    model.train()
    return out


class _MeanSquare:
    """Running sum of squares and element count of the tensors added; `rms()` of them all."""

    def __init__(self):
        self.sq, self.count = 0.0, 0

    def add(self, t: torch.Tensor) -> None:
        self.sq += float(t.detach().double().pow(2).sum())
        self.count += t.numel()

    def rms(self) -> float:
        return math.sqrt(self.sq / self.count)


@torch.no_grad()
def sublayer_input_rms(model: torch.nn.Module, cfg: RunConfig, batches) -> dict:
    """RMS of what each sublayer's norm receives, per sublayer (and the final norm), on `batches`.

    Baseline: the residual stream h_l (forward pre-hooks on ln_1 / ln_2 / ln_f).
    AttnRes: the depth-attention mixture (recorded at the op, per site).
    """
    model.eval()
    n = 2 * cfg.n_layer
    if cfg.variant == "baseline":
        acc = [_MeanSquare() for _ in range(n + 1)]
        norms = [ln for block in model.transformer.h for ln in (block.ln_1, block.ln_2)] + [model.transformer.ln_f]
        hooks = [ln.register_forward_pre_hook(lambda mod, args, a=a: a.add(args[0])) for ln, a in zip(norms, acc)]
        try:
            for x, _ in batches:
                model(x)
        finally:
            for h in hooks:
                h.remove()
        rms = [a.rms() for a in acc]
        result = {"rms": rms[:n], "final": rms[n], "weights": None}
    else:
        records = record_sites(model, batches=[(x,) for x, _ in batches])
        by_sub = {r.sublayer: r for r in records}
        # Sublayer 0 reads the embedding alone (an identity site with no op): its input is b0.
        result = {"rms": [by_sub[k].input_rms if k in by_sub else None for k in range(n)],
                  "final": by_sub[None].input_rms if None in by_sub else None,
                  "weights": [{"site": r.name, "sublayer": r.sublayer, "sources": r.sources, "weights": r.weights}
                              for r in records]}
    if result["rms"][0] is None:   # identity site: the embedding itself
        result["rms"][0] = _embedding_rms(model, batches)
    model.train()
    return result


@torch.no_grad()
def _embedding_rms(model, batches) -> float:
    params = model.state_dict(keep_vars=True)   # keeps both names of the tied embedding
    wte, wpe = params["transformer.wte.weight"], params["transformer.wpe.weight"]
    acc = _MeanSquare()
    for x, _ in batches:
        acc.add(wte[x] + wpe[: x.shape[1]])
    return acc.rms()


def save_checkpoint(model: torch.nn.Module, cfg: RunConfig, example: torch.Tensor, out_dir: Path = RUNS) -> str | None:
    """The converted program (torch.export.save) + AttnRes safetensors, for `attnres plot-weights`."""
    if cfg.variant == "baseline":
        return None
    folder = CHECKPOINTS if out_dir == RUNS else out_dir / "checkpoints"  # beside the records written
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.name}.pt2"
    model.eval()
    program = torch.export.export(model, (example,), strict=False)
    torch.export.save(program, path)
    attnres_compile.save_attnres(model, path.with_suffix(".attnres.safetensors"))
    model.train()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- one run --------------------------------------------------------------------------------------

def train(cfg: RunConfig, out_dir: Path = RUNS, console: Console | None = None, checkpoint: bool = True,
          state_out: Path | None = None) -> dict:
    """Train one variant and write `<out_dir>/<name>.json`; returns the record.

    `state_out`: also save the trained model's state_dict there (examples/retrofit.py starts from it).
    """
    console = console or Console()
    torch.set_num_threads(cfg.threads)
    corpus = load_corpus()
    model, _ = build_model(cfg)
    model.train()
    opt = make_optimizer(model, cfg)
    n_sub = 2 * cfg.n_layer
    n_params = sum(p.numel() for p in model.parameters())
    n_new = sum(p.numel() for p in attnres_compile.attnres_parameters(model).values()) if cfg.variant != "baseline" else 0

    data_gen = torch.Generator().manual_seed(1000 + cfg.seed)   # same batches for every variant of a seed
    val_gen = torch.Generator().manual_seed(999)                 # same validation batches for every run
    val = [get_batch("val", cfg.batch_size, cfg.context, val_gen, corpus) for _ in range(cfg.final_eval_batches)]
    val_curve_batches = val[: cfg.eval_batches]

    curve = {"step": [], "val_loss": [], "train_loss": []}
    grad_log = []        # (step, [per-sublayer grad norms])
    step_times = []
    ema = None
    t0 = time.perf_counter()
    columns = [TextColumn(f"[bold]{cfg.name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss [cyan]{task.fields[loss]}[/] val [magenta]{task.fields[val]}[/]"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and
                  os.environ.get("ATTNRES_PROGRESS") != "1") as progress:
        task = progress.add_task("train", total=cfg.steps, loss="-", val="-")
        for step in range(cfg.steps + 1):
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                v = evaluate(model, val_curve_batches)
                curve["step"].append(step)
                curve["val_loss"].append(v)
                curve["train_loss"].append(ema)
                progress.update(task, val=f"{v:.3f}")
            if step == cfg.steps:
                break
            x, y = get_batch("train", cfg.batch_size, cfg.context, data_gen, corpus)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            ts = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step % cfg.grad_every == 0:
                grad_log.append((step, sublayer_grad_norms(model, n_sub)))
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step_times.append(time.perf_counter() - ts)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{cfg.name}: loss {value} at step {step}")
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            progress.update(task, advance=1, loss=f"{ema:.3f}")
    train_seconds = time.perf_counter() - t0

    final_val = evaluate(model, val)
    tail = [g for s, g in grad_log if s >= 0.8 * cfg.steps] or [grad_log[-1][1]]
    grad_mean = [statistics.fmean(col) for col in zip(*tail)]
    rms = sublayer_input_rms(model, cfg, val[:8])
    # saved with validation text as its example inputs, so `attnres plot-weights` shows real bytes
    ckpt = save_checkpoint(model, cfg, val[0][0][:4], out_dir) if checkpoint else None
    if state_out is not None:
        Path(state_out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), state_out)
    warm = min(10, len(step_times) // 2)
    record = {
        "name": cfg.name,
        "config": asdict(cfg),
        "tokens": cfg.tokens,
        "parameters": n_params,
        "attnres_parameters": n_new,
        "report": None if cfg.variant == "baseline" else model.attnres_report.to_dict(),
        "curve": curve,
        "final_val_loss": final_val,
        "final_train_loss_ema": ema,
        "grad_norms": grad_mean,
        "grad_norm_cv": cv(grad_mean),
        "grad_log": {"step": [s for s, _ in grad_log], "norms": [g for _, g in grad_log]},
        "input_rms": rms["rms"],
        "final_input_rms": rms["final"],
        "depth_weights": rms["weights"],
        "ms_per_step_median": 1000 * statistics.median(step_times[warm:]),
        "train_seconds": train_seconds,
        "threads": torch.get_num_threads(),
        "checkpoint": ckpt,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{cfg.name}.json").write_text(json.dumps(record, indent=1))
    console.print(f"{cfg.name}: val loss {final_val:.4f}, grad-norm CV {record['grad_norm_cv']:.3f}, "
                  f"{record['ms_per_step_median']:.0f} ms/step, {train_seconds:.0f} s -> {out_dir / (cfg.name + '.json')}")
    return record


# -- the study ------------------------------------------------------------------------------------

def study_runs(steps: int) -> list[RunConfig]:
    """Every run of docs/results.md, in the order they are run."""
    runs = []
    for seed in (0, 1):                                   # main comparison, 2 seeds
        for v in VARIANTS:
            runs.append(RunConfig(variant=v, seed=seed, steps=steps))
    # The AttnRes group's lr multiplier (x1 is in the main runs) and weight decay 0.1 at x1, Block,
    # both seeds (the lr x wd corners were not run for lack of time, docs/results.md).
    for seed in (0, 1):
        for mult, wd in ABLATION:
            runs.append(RunConfig(variant="block4", seed=seed, steps=steps, attnres_lr_mult=mult, attnres_wd=wd))
    return runs


def deep_runs(steps: int, lr_mult: float, wd: float) -> list[RunConfig]:
    """Deeper, narrower: 16 layers, d_model 96 (4 heads), baseline and Block with the chosen setting."""
    out = []
    for seed in (0, 1):
        out.append(RunConfig(variant="baseline", seed=seed, steps=steps, n_layer=16, n_embd=96))
        out.append(RunConfig(variant="block4", seed=seed, steps=steps, n_layer=16, n_embd=96,
                             attnres_lr_mult=lr_mult, attnres_wd=wd))
    return out


def run_many(runs: list[RunConfig], out_dir: Path, console: Console, force: bool) -> None:
    for i, cfg in enumerate(runs):
        if (out_dir / f"{cfg.name}.json").exists() and not force:
            console.print(f"[{i + 1}/{len(runs)}] {cfg.name}: exists, skipped (--force reruns)")
            continue
        console.print(f"[{i + 1}/{len(runs)}] {cfg.name}")
        train(cfg, out_dir, console)


# -- step time, one process -----------------------------------------------------------------------

def timing(configs: list[RunConfig], steps: int, warm: int, console: Console) -> dict:
    """Median training-step time of each config, interleaved step by step in one process."""
    torch.set_num_threads(configs[0].threads)
    corpus = load_corpus()
    entries = []
    for cfg in configs:
        model, _ = build_model(cfg)
        model.train()
        entries.append((cfg, model, make_optimizer(model, cfg), []))
    g = torch.Generator().manual_seed(0)
    for step in range(warm + steps):
        x, y = get_batch("train", configs[0].batch_size, configs[0].context, g, corpus)
        order = entries if step % 2 == 0 else entries[::-1]
        for cfg, model, opt, times in order:
            t = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= warm:
                times.append(time.perf_counter() - t)
    out = {}
    for cfg, _, _, times in entries:
        out[cfg.name.rsplit("_s", 1)[0]] = 1000 * statistics.median(times)
    return out


# -- command line ---------------------------------------------------------------------------------

def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=VARIANTS, default="block4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=RunConfig.steps, help="training steps (batch 16 x 128 tokens)")
    p.add_argument("--attnres-lr-mult", type=float, default=1.0)
    p.add_argument("--attnres-wd", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (CI)")
    p.add_argument("--out", type=Path, default=RUNS, help="folder for the run's JSON")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.train_lm", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="train one variant")
    _run_args(p)
    p = sub.add_parser("study", help="all runs of docs/results.md (skips runs already written)")
    p.add_argument("--steps", type=int, default=RunConfig.steps)
    p.add_argument("--part", choices=("main", "deep", "all"), default="all")
    p.add_argument("--deep-lr-mult", type=float, default=None, help="AttnRes lr multiplier for the deep runs")
    p.add_argument("--deep-wd", type=float, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", type=Path, default=RUNS)
    p = sub.add_parser("timing", help="step time of each variant over the baseline, in one process")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "step_time.json")
    p = sub.add_parser("plot", help="figures and summary from the runs' JSON")
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--figures", type=Path, default=FIGURES)
    args = ap.parse_args(argv)
    console = Console()

    if args.cmd == "run":
        if args.tiny:
            cfg = tiny_config(args.variant, args.seed)
            cfg.attnres_lr_mult, cfg.attnres_wd = args.attnres_lr_mult, args.attnres_wd
        else:
            cfg = RunConfig(variant=args.variant, seed=args.seed, n_layer=args.layers, n_embd=args.d_model,
                            n_head=args.heads, steps=args.steps, attnres_lr_mult=args.attnres_lr_mult,
                            attnres_wd=args.attnres_wd, threads=args.threads)
        train(cfg, args.out, console, checkpoint=not args.tiny)
        return 0
    if args.cmd == "study":
        if args.part in ("main", "all"):
            run_many(study_runs(args.steps), args.out, console, args.force)
        if args.part in ("deep", "all"):
            mult, wd = args.deep_lr_mult, args.deep_wd
            if mult is None or wd is None:
                from examples.plot_results import best_block_setting

                best = best_block_setting(args.out)
                mult = best[0] if mult is None else mult
                wd = best[1] if wd is None else wd
            run_many(deep_runs(args.steps, mult, wd), args.out, console, args.force)
        return 0
    if args.cmd == "timing":
        from examples.plot_results import best_block_setting

        mult, wd = best_block_setting(RUNS)
        shallow = [RunConfig(variant=v, threads=args.threads) for v in VARIANTS]
        deep = [RunConfig(variant="baseline", n_layer=16, n_embd=96, threads=args.threads),
                RunConfig(variant="block4", n_layer=16, n_embd=96, attnres_lr_mult=mult, attnres_wd=wd,
                          threads=args.threads)]
        result = {"steps": args.steps, "threads": args.threads, "torch": torch.__version__,
                  "note": "eager PyTorch on CPU; variants interleaved step by step in one process; median ms/step",
                  "L8d128": timing(shallow, args.steps, 5, console),
                  "L16d96": timing(deep, args.steps, 5, console)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        console.print_json(json.dumps(result))
        return 0
    if args.cmd == "plot":
        from examples.plot_results import plot_all

        plot_all(args.runs, args.figures, console)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
