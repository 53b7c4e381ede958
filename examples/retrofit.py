"""Retrofit study: convert an already trained model and keep training it (issue 13).

    python -m examples.retrofit study --seeds 0         # pretrain, then every arm (~25 min on one idle core)
    python -m examples.retrofit pretrain --seed 0      # the baseline to retrofit -> .attnres_runs/retrofit/
    python -m examples.retrofit arm --arm exact --seed 0   # one arm -> docs/results/retrofit/
    python -m examples.retrofit plot                   # docs/figures/retrofit*.png + docs/results/retrofit/summary.json
    attnres train retrofit ...                         # the same, from the CLI (records under ./attnres_runs)

A plain PreNorm GPT (examples/gpt.py, 16 layers, d 96: the configuration where Block AttnRes
trained from scratch wins in docs/results.md) is trained for the study's 1,000 steps with the
study's recipe. From that checkpoint, K more steps (default 500) in five arms, all on the same
batches in the same order, with the same continuation schedule (warm-up to `--lr`, cosine to
0.1x) and a fresh AdamW:

    continue       (a) the baseline, every parameter trained
    exact          (b) convert(preserve="exact", num_blocks=4), every parameter trained
    adapter        (c) the same conversion, the base frozen, only the AttnRes parameters trained
    lora           (d) PEFT LoRA (rank 1 on attn.c_attn: 6,144 parameters, as many as (c)) on the frozen base
    adapter_lora   (e) (c) and (d) together

In exact mode every arm computes the same function at the retrofit point, which each record
checks (`retrofit_val_loss` is the same number for every arm of a seed). Each arm records the
validation curve, the per-sublayer gradient norms of the base parameters (measured even where
the base is frozen: on measurement steps its gradients are computed and thrown away, and
clipping only ever sees the trained parameters), the RMS of every sublayer's input and the
learned depth weights, as examples/train_lm.py does.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import attnres_compile
from examples.data import get_batch, load_corpus
from examples.gpt import cosine_lr, loss_fn, param_groups
from examples.train_lm import RunConfig, build_model, cv, evaluate, sublayer_grad_norms, sublayer_input_rms, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "retrofit"
FIGURES = ROOT / "docs" / "figures"
STATES = ROOT / ".attnres_runs" / "retrofit"     # git-ignored: the pretrained baselines' weights
ARMS = ("continue", "exact", "adapter", "lora", "adapter_lora")
LORA_RANK, LORA_ALPHA, LORA_TARGET = 1, 2, "c_attn"


@dataclass
class RetrofitConfig:
    arm: str = "exact"
    seed: int = 0
    n_layer: int = 16
    n_embd: int = 96
    n_head: int = 4
    context: int = 128
    batch_size: int = 16
    pretrain_steps: int = 1000       # the study's recipe (examples/train_lm.py RunConfig)
    steps: int = 500                 # K: steps after the retrofit point
    lr: float = 1e-3                 # continuation peak, the same for every arm
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1        # the model's matrices and embeddings; AttnRes and LoRA get 0
    grad_clip: float = 1.0
    num_blocks: int = 4
    eval_interval: int = 50
    eval_batches: int = 8
    final_eval_batches: int = 32
    grad_every: int = 10
    threads: int = 1

    @property
    def shape(self) -> str:
        return f"L{self.n_layer}d{self.n_embd}"

    @property
    def name(self) -> str:
        return f"{self.shape}_{self.arm}_s{self.seed}"

    def pretrain_config(self) -> RunConfig:
        return RunConfig(variant="baseline", seed=self.seed, n_layer=self.n_layer, n_embd=self.n_embd,
                         n_head=self.n_head, context=self.context, batch_size=self.batch_size,
                         steps=self.pretrain_steps, threads=self.threads)


def tiny_config(arm: str, seed: int = 0) -> RetrofitConfig:
    """A few steps of a 2-layer model, for CI."""
    return RetrofitConfig(arm=arm, seed=seed, n_layer=2, n_embd=32, n_head=2, context=32, batch_size=4,
                          pretrain_steps=6, steps=6, warmup=2, eval_interval=3, eval_batches=2,
                          final_eval_batches=2, grad_every=1, num_blocks=2)


def _tiny_pretrain(cfg: RetrofitConfig) -> RunConfig:
    from examples.train_lm import tiny_config as tiny_run

    return replace(tiny_run("baseline", cfg.seed), steps=cfg.pretrain_steps)


# -- the retrofit point ---------------------------------------------------------------------------

def state_path(cfg: RetrofitConfig, states: Path = STATES) -> Path:
    return states / f"{cfg.shape}_pretrained_s{cfg.seed}.pt"


def pretrain(cfg: RetrofitConfig, out_dir: Path = RESULTS, states: Path = STATES, console: Console | None = None,
             run_cfg: RunConfig | None = None) -> Path:
    """Train the baseline with the study's recipe; its weights go to `state_path`, its record beside them
    (the same run as docs/results/runs/<shape>_baseline_s<seed>.json, which it reproduces)."""
    path = state_path(cfg, states)
    run_cfg = run_cfg or cfg.pretrain_config()
    train(run_cfg, states / "pretrain", console, checkpoint=False, state_out=path)
    return path


def build_arm(cfg: RetrofitConfig, state: dict) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.nn.Parameter],
                                                         set[str]]:
    """(model to train, the converted or plain model inside it, trainable parameters by name,
    the names of the added ones: AttnRes and LoRA)."""
    base_cfg = RunConfig(variant="baseline", seed=cfg.seed, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                         n_head=cfg.n_head, context=cfg.context)
    gpt, example = build_model(base_cfg)
    gpt.load_state_dict(state)
    inner = gpt
    if cfg.arm in ("exact", "adapter", "adapter_lora"):
        inner = attnres_compile.convert(gpt, (example,), num_blocks=cfg.num_blocks, preserve="exact")
    model = inner
    if cfg.arm in ("lora", "adapter_lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(inner, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=[LORA_TARGET]))
    named = dict(model.named_parameters())
    added = set(attnres_compile.attnres_parameters(model) if inner is not gpt else ()) | {n for n in named if "lora_" in n}
    trainable = named if cfg.arm in ("continue", "exact") else {n: p for n, p in named.items() if n in added}
    for n, p in named.items():
        p.requires_grad_(n in trainable)
    return model, inner, trainable, added


def make_optimizer(trainable: dict[str, torch.nn.Parameter], added: set[str], cfg: RetrofitConfig) -> torch.optim.AdamW:
    """nanoGPT groups for the base; AttnRes and LoRA parameters undecayed (docs/results.md's finding)."""
    extra = [p for n, p in trainable.items() if n in added]
    groups = [g for g in param_groups((p for n, p in trainable.items() if n not in added), cfg.weight_decay)
              if g["params"]]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def base_drift(inner: torch.nn.Module, state: dict) -> float:
    """Largest |change| of any pretrained weight (0 exactly where the base is frozen)."""
    now = {k.replace(".base_layer", ""): v for k, v in inner.state_dict().items()}
    return max(float((now[k] - v).abs().max()) for k, v in state.items())


# -- one arm --------------------------------------------------------------------------------------

def run_arm(cfg: RetrofitConfig, out_dir: Path = RESULTS, states: Path = STATES,
            console: Console | None = None) -> dict:
    """Continue from the pretrained baseline in one arm; writes `<out_dir>/<name>.json`."""
    console = console or Console()
    torch.set_num_threads(cfg.threads)
    path = state_path(cfg, states)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pretrained baseline for seed {cfg.seed}; run "
                                f"`python -m examples.retrofit pretrain --seed {cfg.seed}` first")
    corpus = load_corpus()
    state = torch.load(path, weights_only=True)
    model, inner, trainable, added = build_arm(cfg, state)
    model.train()
    opt = make_optimizer(trainable, added, cfg)
    frozen = [p for n, p in model.named_parameters() if n not in trainable and n not in added]
    n_sub = 2 * cfg.n_layer

    data_gen = torch.Generator().manual_seed(2000 + cfg.seed)   # the continuation's batches, same for every arm
    val_gen = torch.Generator().manual_seed(999)                 # the study's validation batches
    val = [get_batch("val", cfg.batch_size, cfg.context, val_gen, corpus) for _ in range(cfg.final_eval_batches)]
    retrofit_val = evaluate(model, val)

    curve = {"step": [], "val_loss": []}
    grad_log, step_times = [], []
    t0 = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            curve["step"].append(step)
            curve["val_loss"].append(evaluate(model, val[: cfg.eval_batches]))
        if step == cfg.steps:
            break
        x, y = get_batch("train", cfg.batch_size, cfg.context, data_gen, corpus)
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        measure = step % cfg.grad_every == 0
        for p in frozen:                       # the frozen base's gradients, only to measure them
            p.requires_grad_(measure)
        ts = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if measure:
            grad_log.append((step, sublayer_grad_norms(model, n_sub)))   # the base's own parameters
            for p in frozen:
                p.grad = None
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.grad_clip)
        opt.step()
        step_times.append(time.perf_counter() - ts)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{cfg.name}: loss {loss.item()} at step {step}")
    for p in frozen:
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0

    final_val = evaluate(model, val)
    drift = base_drift(inner, state)
    tail = [g for s, g in grad_log if s >= 0.8 * cfg.steps] or [grad_log[-1][1]]
    grad_mean = [statistics.fmean(col) for col in zip(*tail)]
    variant = "baseline" if cfg.arm in ("continue", "lora") else "block4"
    rms = sublayer_input_rms(inner, replace(cfg.pretrain_config(), variant=variant), val[:8])
    record = {
        "name": cfg.name,
        "config": asdict(cfg),
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "target": LORA_TARGET} if "lora" in cfg.arm else None,
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "retrofit_val_loss": retrofit_val,
        "final_val_loss": final_val,
        "base_max_abs_change": drift,
        "curve": curve,
        "grad_norms": grad_mean,
        "grad_norm_cv": cv(grad_mean),
        "grad_log": {"step": [s for s, _ in grad_log], "norms": [[round(v, 6) for v in g] for _, g in grad_log]},
        "input_rms": rms["rms"],
        "final_input_rms": rms["final"],
        "depth_weights": rms["weights"],
        "ms_per_step_median": 1000 * statistics.median(step_times),
        "seconds": seconds,
        "torch": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{cfg.name}.json").write_text(json.dumps(record))
    console.print(f"{cfg.name}: val loss {retrofit_val:.4f} -> {final_val:.4f}, grad-norm CV "
                  f"{record['grad_norm_cv']:.3f}, {seconds:.0f} s")
    return record


# -- summary and figures --------------------------------------------------------------------------

def load_records(out_dir: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.name != "summary.json"]


def summarise(records: list[dict]) -> dict:
    """Per arm: loss at the retrofit point and after K steps, delta to (a) per seed, dynamics."""
    by = {(r["config"]["arm"], r["config"]["seed"]): r for r in records}
    seeds = sorted({s for _, s in by})
    out = {"seeds": seeds, "arms": {}}
    for arm in ARMS:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        deltas = [by[(arm, s)]["final_val_loss"] - by[("continue", s)]["final_val_loss"]
                  for s in seeds if (arm, s) in by and ("continue", s) in by]
        ratio = [r["input_rms"][-1] / r["input_rms"][1] for r in rs]
        out["arms"][arm] = {
            "trainable_parameters": rs[0]["trainable_parameters"],
            "retrofit_val_loss": [r["retrofit_val_loss"] for r in rs],
            "final_val_loss": [r["final_val_loss"] for r in rs],
            "final_mean": statistics.fmean(r["final_val_loss"] for r in rs),
            "final_std": statistics.pstdev([r["final_val_loss"] for r in rs]) if len(rs) > 1 else 0.0,
            "delta_vs_continue": deltas,
            "grad_norm_cv": [r["grad_norm_cv"] for r in rs],
            "input_rms_last_over_2nd": ratio,
            "ms_per_step": [r["ms_per_step_median"] for r in rs],
        }
    return out


def summary_table(summary: dict) -> Table:
    t = Table(title="Retrofit: K steps after the retrofit point (mean over seeds; deltas per seed vs (a))")
    for col in ("arm", "trainable", "loss at retrofit", "loss after K", "seed 0 / 1", "delta vs (a)", "grad-norm CV",
                "input RMS last / 2nd"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    for arm, a in summary["arms"].items():
        t.add_row(arm, f"{a['trainable_parameters']:,}", f"{statistics.fmean(a['retrofit_val_loss']):.4f}",
                  f"{a['final_mean']:.4f} ± {a['final_std']:.4f}", " / ".join(f"{v:.4f}" for v in a["final_val_loss"]),
                  " / ".join(f"{v:+.4f}" for v in a["delta_vs_continue"]),
                  f"{statistics.fmean(a['grad_norm_cv']):.2f}", f"{statistics.fmean(a['input_rms_last_over_2nd']):.1f}x")
    return t


def plot(out_dir: Path = RESULTS, figures: Path = FIGURES, console: Console | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnres_compile.analysis import SiteRecord, plot_depth_weights

    console = console or Console()
    records = load_records(out_dir)
    if not records:
        raise FileNotFoundError(f"no retrofit records in {out_dir}: run `python -m examples.retrofit study` first")
    summary = summarise(records)
    figures.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = dict(zip(ARMS, ("#444444", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd")))
    for r in records:
        arm, seed = r["config"]["arm"], r["config"]["seed"]
        style = "-" if seed == 0 else "--"
        label = arm if seed == 0 else None
        axes[0].plot(r["curve"]["step"], r["curve"]["val_loss"], style, color=colors[arm], label=label)
        axes[1].plot(range(len(r["grad_norms"])), r["grad_norms"], style, color=colors[arm], label=label)
        axes[2].plot(range(len(r["input_rms"])), r["input_rms"], style, color=colors[arm], label=label)
    axes[0].set(xlabel="steps after the retrofit point", ylabel="validation loss (nats/byte, 8 batches)",
                title="validation loss (solid seed 0, dashed seed 1)")
    axes[1].set(xlabel="sublayer", ylabel="grad norm of the base parameters", yscale="log",
                title="per-sublayer gradient norm, last 20%")
    axes[2].set(xlabel="sublayer", ylabel="RMS of the sublayer's input", yscale="log", title="input RMS after K steps")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "retrofit.png", dpi=110)
    plt.close(fig)
    paths = [figures / "retrofit.png"]
    for r in records:
        if r["config"]["seed"] == 0 and r["depth_weights"]:
            recs = [SiteRecord(0, w["site"], w["sublayer"], w["sources"], w["weights"]) for w in r["depth_weights"]]
            p = figures / f"retrofit_depth_weights_{r['config']['arm']}.png"
            plot_depth_weights(recs, p, title=f"{r['name']}: depth weights {r['config']['steps']} steps after "
                                               "an exact retrofit")
            paths.append(p)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(summary_table(summary))
    console.print("wrote " + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths))
    return summary


# -- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.retrofit", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("pretrain", "arm", "study"):
        p = sub.add_parser(name)
        if name == "arm":
            p.add_argument("--arm", choices=ARMS, required=True)
        if name != "study":
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
            p.add_argument("--force", action="store_true", help="rerun records that exist")
        p.add_argument("--steps", type=int, default=RetrofitConfig.steps, help="K, steps after the retrofit point")
        p.add_argument("--tiny", action="store_true", help="a few steps of a 2-layer model (CI)")
        p.add_argument("--out", type=Path, default=RESULTS)
        p.add_argument("--states", type=Path, default=STATES)
    p = sub.add_parser("plot")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--figures", type=Path, default=FIGURES)
    args = ap.parse_args(argv)
    console = Console()
    if args.cmd == "plot":
        plot(args.out, args.figures, console)
        return 0

    def config(arm: str, seed: int) -> RetrofitConfig:
        cfg = tiny_config(arm, seed) if args.tiny else RetrofitConfig(arm=arm, seed=seed)
        return cfg if args.tiny else replace(cfg, steps=args.steps)

    def ensure_pretrained(seed: int) -> None:
        cfg = config("continue", seed)
        if state_path(cfg, args.states).exists() and not getattr(args, "force", False):
            return
        pretrain(cfg, args.out, args.states, console, _tiny_pretrain(cfg) if args.tiny else None)

    if args.cmd == "pretrain":
        cfg = config("continue", args.seed)
        pretrain(cfg, args.out, args.states, console, _tiny_pretrain(cfg) if args.tiny else None)
        return 0
    if args.cmd == "arm":
        ensure_pretrained(args.seed)
        run_arm(config(args.arm, args.seed), args.out, args.states, console)
        return 0
    for seed in args.seeds:
        ensure_pretrained(seed)
        for arm in ARMS:
            cfg = config(arm, seed)
            if (args.out / f"{cfg.name}.json").exists() and not args.force:
                console.print(f"{cfg.name}: exists, skipped (--force reruns)")
                continue
            run_arm(cfg, args.out, args.states, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
