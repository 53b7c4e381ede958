"""Figures and a summary for docs/results.md, from the JSON files examples/train_lm.py writes.

    python -m examples.train_lm plot          # docs/figures/*.png and docs/results/summary.json

Every figure is drawn from the committed run records alone, so it can be redrawn without
training. Groups are (model shape, variant, AttnRes lr multiplier, AttnRes weight decay);
seeds are averaged and their spread reported.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

COLORS = {"baseline": "#444444", "full": "#d62728", "block4": "#1f77b4"}
LABELS = {"baseline": "baseline (plain residuals)", "full": "Full AttnRes (block_size=1)",
          "block4": "Block AttnRes (4 blocks)"}


def load_runs(runs_dir: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*.json"))]
    if not runs:
        raise FileNotFoundError(f"no run records in {runs_dir}: run `python -m examples.train_lm study` first")
    return runs


def shape_of(run: dict) -> str:
    c = run["config"]
    return f"L{c['n_layer']}d{c['n_embd']}"


def group_key(run: dict) -> tuple:
    c = run["config"]
    setting = (None, None) if c["variant"] == "baseline" else (c["attnres_lr_mult"], c["attnres_wd"])
    return (shape_of(run), c["variant"], *setting)


def group_name(key: tuple) -> str:
    shape, variant, mult, wd = key
    if variant == "baseline":
        return f"{shape} baseline"
    return f"{shape} {variant} (AttnRes lr x{mult:g}, wd {wd:g})"


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in runs:
        out[group_key(r)].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["config"]["seed"])
    return dict(out)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def best_block_setting(runs_dir: Path, shape: str = "L8d128") -> tuple[float, float]:
    """(lr multiplier, weight decay) of the Block AttnRes setting with the lowest validation loss,
    averaged over the seeds every setting ran (so no setting is favoured by a lucky seed)."""
    by_setting = defaultdict(dict)
    for r in load_runs(runs_dir):
        c = r["config"]
        if shape_of(r) == shape and c["variant"] == "block4":
            by_setting[(c["attnres_lr_mult"], c["attnres_wd"])][c["seed"]] = r["final_val_loss"]
    if not by_setting:
        raise FileNotFoundError(f"no {shape} block4 runs in {runs_dir}")
    common = set.intersection(*(set(v) for v in by_setting.values()))
    return min(by_setting, key=lambda k: statistics.fmean(
        v for seed, v in by_setting[k].items() if not common or seed in common))


def summary(runs: list[dict]) -> dict:
    """Per group: validation loss, gradient-norm CV, input-RMS growth, step time; mean and spread over seeds."""
    out = {}
    for key, rs in groups(runs).items():
        val = [r["final_val_loss"] for r in rs]
        cvs = [r["grad_norm_cv"] for r in rs]
        growth = [r["input_rms"][-1] / r["input_rms"][1] for r in rs]   # last sublayer's input vs the 2nd's
        out[group_name(key)] = {
            "shape": key[0], "variant": key[1], "attnres_lr_mult": key[2], "attnres_wd": key[3],
            "seeds": [r["config"]["seed"] for r in rs],
            "val_loss": val, "val_loss_mean": _mean_std(val)[0], "val_loss_std": _mean_std(val)[1],
            "grad_norm_cv": cvs, "grad_norm_cv_mean": statistics.fmean(cvs),
            "input_rms_last_over_second": growth, "input_rms_growth_mean": statistics.fmean(growth),
            "ms_per_step_in_run": [r["ms_per_step_median"] for r in rs],
            "tokens": rs[0]["tokens"], "parameters": rs[0]["parameters"],
            "attnres_parameters": rs[0]["attnres_parameters"],
        }
    return out


# -- figures --------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _main_groups(gs: dict, shape: str) -> list[tuple]:
    """Baseline and the variants at their default setting (lr x1, wd 0), plus tuned Block if present."""
    keys = [k for k in gs if k[0] == shape and (k[1] == "baseline" or (k[2], k[3]) == (1.0, 0.0))]
    return sorted(keys, key=lambda k: ("baseline", "full", "block4").index(k[1]))


def _main_shape(gs: dict) -> str:
    """The study's main shape (L8d128), or for other run sets the shape with the most groups."""
    shapes = [k[0] for k in gs]
    return "L8d128" if "L8d128" in shapes else max(set(shapes), key=shapes.count)


def _deep_keys(gs: dict) -> list[tuple]:
    main = _main_shape(gs)
    keys = [k for k in gs if k[0] != main]
    return sorted(keys, key=lambda k: (k[0], ("baseline", "full", "block4").index(k[1]), k[2] or 0, k[3] or 0))


def _panels(gs: dict) -> list[tuple[str, list[tuple]]]:
    main = _main_shape(gs)
    panels = [(main, _main_groups(gs, main))]
    deep = _deep_keys(gs)
    for shape in sorted({k[0] for k in deep}):
        panels.append((shape, [k for k in deep if k[0] == shape]))
    return panels


def plot_loss_curves(gs: dict, path: Path) -> None:
    plt = _plt()
    panels = _panels(gs)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (shape, keys) in zip(axes[0], panels):
        for k in keys:
            rs = gs[k]
            steps = rs[0]["curve"]["step"]
            curves = [r["curve"]["val_loss"] for r in rs]
            mean = [statistics.fmean(c) for c in zip(*curves)]
            color = COLORS[k[1]]
            for c in curves:
                ax.plot(steps, c, color=color, alpha=0.25, lw=0.8)
            label = f"{LABELS[k[1]]}" + ("" if k[1] == "baseline" else f", lr x{k[2]:g} wd {k[3]:g}")
            final = statistics.fmean(r["final_val_loss"] for r in rs)   # 32 batches, as in the table
            ax.plot(steps, mean, color=color, lw=1.8, label=f"{label}: final {final:.4f} (n={len(rs)})")
        # the first steps (loss ~5.5) would flatten the rest: start the axis a tenth of the way in
        lows, highs = [], []
        for k in keys:
            for r in gs[k]:
                v = r["curve"]["val_loss"]
                highs.append(v[len(v) // 10])
                lows.append(min(v))
        if highs and max(highs) > min(lows):
            ax.set_ylim(min(lows) - 0.02, max(highs) + 0.02)
        ax.set_xlabel(f"training step ({rs[0]['config']['batch_size']} x {rs[0]['config']['context']} bytes)")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_title(f"{shape}: validation loss (thin: seeds, thick: mean)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        # inset on the last 40% of training, where the differences are
        ins = ax.inset_axes([0.42, 0.42, 0.55, 0.3])
        for k in keys:
            rs = gs[k]
            steps = rs[0]["curve"]["step"]
            mean = [statistics.fmean(c) for c in zip(*[r["curve"]["val_loss"] for r in rs])]
            cut = int(len(steps) * 0.6)
            ins.plot(steps[cut:], mean[cut:], color=COLORS[k[1]], lw=1.5)
        ins.tick_params(labelsize=7)
        ins.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _per_layer_panel(ax, gs, keys, field: str, ylabel: str, log: bool, stat=None) -> None:
    """Mean over seeds of a per-sublayer list, one line per group."""
    for k in keys:
        rs = gs[k]
        rows = [r[field] for r in rs]
        mean = [statistics.fmean(v) for v in zip(*rows)]
        label = LABELS[k[1]] + ("" if k[1] == "baseline" else f", lr x{k[2]:g} wd {k[3]:g}")
        if stat:
            label += stat(rs)
        ax.plot(range(len(mean)), mean, "o-", color=COLORS[k[1]], ms=3, lw=1.5, label=label)
    ax.set_xlabel("sublayer (0 = first attention; even = attention, odd = MLP)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_per_layer(gs: dict, path: Path, field: str, ylabel: str, stat, title: str) -> None:
    """One panel per model shape of a per-sublayer measurement, mean over seeds, log scale."""
    plt = _plt()
    panels = _panels(gs)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (shape, keys) in zip(axes[0], panels):
        _per_layer_panel(ax, gs, keys, field, ylabel, True, stat)
        ax.set_title(f"{shape}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_input_rms(gs: dict, path: Path) -> None:
    _plot_per_layer(
        gs, path, "input_rms", "RMS of the sublayer's input (before its norm)",
        lambda rs: f" (last/2nd {statistics.fmean(r['input_rms'][-1] / r['input_rms'][1] for r in rs):.1f}x)",
        "input magnitude across depth, end of training\n"
        "baseline: residual stream h_l; AttnRes: depth-attention mixture")


def plot_grad_norms(gs: dict, path: Path) -> None:
    _plot_per_layer(
        gs, path, "grad_norms", "gradient norm of the sublayer's parameters",
        lambda rs: f" (CV {statistics.fmean(r['grad_norm_cv'] for r in rs):.2f})",
        "per-sublayer gradient norm, last 20% of training\n"
        "(pre-clipping, mean over steps and seeds; CV = std/mean across sublayers)")


def plot_weights(gs: dict, figures: Path) -> list[Path]:
    from attnres_compile.analysis import SiteRecord, plot_depth_weights

    out = []
    for k, rs in gs.items():
        if k[1] == "baseline" or (k[2], k[3]) != (1.0, 0.0) and k[0] == _main_shape(gs):
            continue
        r = rs[0]   # seed 0
        records = [SiteRecord(0, w["site"], w["sublayer"], w["sources"], w["weights"]) for w in r["depth_weights"]]
        path = figures / f"depth_weights_{k[0]}_{k[1]}.png"
        plot_depth_weights(records, path, title=f"{k[0]} {LABELS[k[1]]}, seed {r['config']['seed']}: "
                                                f"learned depth weights on validation bytes")
        out.append(path)
    return out


def plot_ablation(gs: dict, path: Path) -> None:
    plt = _plt()
    import numpy as np

    main = _main_shape(gs)
    keys = [k for k in gs if k[0] == main and k[1] == "block4"]
    mults = sorted({k[2] for k in keys}, reverse=True)
    wds = sorted({k[3] for k in keys})
    grid = np.full((len(wds), len(mults)), np.nan)
    text = {}
    for k in keys:
        vals = [r["final_val_loss"] for r in gs[k]]
        i, j = wds.index(k[3]), mults.index(k[2])
        grid[i, j] = statistics.fmean(vals)
        spread = f"\n±{statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
        text[(i, j)] = f"{grid[i, j]:.4f}{spread}\n(n={len(vals)})"
    base_runs = gs.get((main, "baseline", None, None), [])
    base = statistics.fmean(r["final_val_loss"] for r in base_runs) if base_runs else None
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(mults), 1.8 + 1.0 * len(wds)))
    im = ax.imshow(grid - (base or 0), cmap="RdBu_r", vmin=-0.03, vmax=0.03)
    for (i, j), t in text.items():
        dark = abs(grid[i, j] - (base or 0)) > 0.02
        ax.text(j, i, t, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(mults)), [f"x{m:g}" for m in mults])
    ax.set_yticks(range(len(wds)), [f"{w:g}" for w in wds])
    ax.set_xlabel("AttnRes learning-rate multiplier")
    ax.set_ylabel("AttnRes weight decay")
    ax.set_title(f"{main} Block AttnRes (4 blocks): validation loss, mean over seeds\n"
                 + (f"colour: minus baseline mean {base:.4f} (blue = better)" if base is not None else ""),
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_step_time(step_time: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels, ratios = [], []
    for shape in ("L8d128", "L16d96"):
        times = step_time.get(shape, {})
        base = next((v for k, v in times.items() if k.endswith("baseline")), None)
        for name, ms in times.items():
            if base and not name.endswith("baseline"):
                labels.append(f"{name}\n{ms:.0f} vs {base:.0f} ms")
                ratios.append(ms / base)
    ax.bar(range(len(ratios)), ratios, color="#1f77b4")
    ax.axhline(1.0, color="k", lw=0.8)
    for i, r in enumerate(ratios):
        ax.text(i, r, f"{r:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("training step time / baseline's")
    ax.set_title(f"step time over the baseline (eager CPU, {step_time.get('threads', 1)} thread, "
                 "interleaved in one process)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_all(runs_dir: Path, figures: Path, console: Console | None = None) -> dict:
    console = console or Console()
    runs = load_runs(runs_dir)
    gs = groups(runs)
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    plot_loss_curves(gs, figures / "val_loss.png")
    plot_input_rms(gs, figures / "input_rms.png")
    plot_grad_norms(gs, figures / "grad_norms.png")
    written += [figures / "val_loss.png", figures / "input_rms.png", figures / "grad_norms.png"]
    written += plot_weights(gs, figures)
    if any(k[1] == "block4" and (k[2], k[3]) != (1.0, 0.0) for k in gs):
        plot_ablation(gs, figures / "ablation.png")
        written.append(figures / "ablation.png")
    step_time_path = Path(runs_dir).parent / "step_time.json"
    if step_time_path.exists():
        plot_step_time(json.loads(step_time_path.read_text()), figures / "step_time.png")
        written.append(figures / "step_time.png")
    summ = summary(runs)
    (Path(runs_dir).parent / "summary.json").write_text(json.dumps(summ, indent=1))

    table = Table(title="runs (mean over seeds; ± is the std across seeds)")
    for col in ("group", "seeds", "val loss", "grad-norm CV", "input RMS last/2nd"):
        table.add_column(col)
    for name, s in summ.items():
        std = "" if math.isnan(s["val_loss_std"]) else f" ± {s['val_loss_std']:.4f}"
        table.add_row(name, ",".join(map(str, s["seeds"])), f"{s['val_loss_mean']:.4f}{std}",
                      f"{s['grad_norm_cv_mean']:.3f}", f"{s['input_rms_growth_mean']:.2f}x")
    console.print(table)
    for p in written:
        console.print(f"wrote {p}")
    return summ
