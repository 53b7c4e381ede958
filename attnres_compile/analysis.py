"""What the depth-attention sites of a converted model do on real inputs.

`record_sites(model, args)` runs a converted model (what `convert()` returns, or the module of a
program saved with `torch.export.save`) and records, for every depth-attention site, the
softmax weights it puts on each source (averaged over tokens) and the RMS of the mixed
input it hands to its sublayer. `plot_depth_weights` draws the site x source heatmap the
paper shows; `attnres plot-weights` wraps both for a saved program.

Sites are found by intercepting `attnres::depth_attention` at the dispatcher, so any graph
that runs the op (eager module, exported program, either training mode) can be inspected
without hooks in the model; a call is matched to its site by the identity of its query
parameter. Identity sites (one source, no parameters) do not run the op and are not listed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .conversion.blocks import block_schedule

__all__ = ["SiteRecord", "record_sites", "depth_weights", "plot_depth_weights", "site_sources",
           "schedules_from_report", "schedules_from_layout"]

_SITE_PARAM = re.compile(r"(?:^|\.)attnres\.chain(\d+)\.(site\d+|final)\.query$")


@dataclass
class SiteRecord:
    """One site over all recorded calls.

    weights: [M] mean softmax weight per source (tokens and calls averaged).
    input_rms: RMS of the site's output (the sublayer's mixed input), over all tokens.
    """

    chain: int
    name: str                  # "site3" or "final"
    sublayer: int | None       # 0-based sublayer the site feeds; None for the final site
    sources: list[str]         # "b0" (the embedding), "b1", ..., "partial"
    weights: list[float] = field(default_factory=list)
    input_rms: float = float("nan")
    calls: int = 0

    @property
    def key(self) -> str:
        return f"chain{self.chain}.{self.name}"


def depth_weights(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """Softmax weights over depth, SPEC section 2: shape [M, ...] (float32, or float64 inputs)."""
    compute = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    v = torch.stack([s.to(compute) for s in sources])                         # [M, ..., D]
    rms = torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    logits = ((v / rms) * (norm_weight.to(compute) * query.to(compute))).sum(-1)  # [M, ...]
    return torch.softmax(logits, dim=0)


def site_sources(num_sublayers: int, block_size: int) -> dict[str, tuple[int | None, list[str]]]:
    """Site name -> (sublayer, source labels) for a chain, from the SPEC schedule."""
    out = {}
    for s in block_schedule(num_sublayers, block_size):
        out["final" if s.sublayer is None else f"site{s.sublayer}"] = (s.sublayer, list(s.sources))
    return out


class _Recorder(TorchDispatchMode):
    def __init__(self, by_ptr: dict[int, SiteRecord]):
        super().__init__()
        self.by_ptr = by_ptr
        self.sums: dict[str, list] = {}   # key -> [weight sums [M], tokens, sum of squares, elements]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.attnres.depth_attention.default:
            sources, query, norm_weight, eps = args[0], args[1], args[2], args[3]
            rec = self.by_ptr.get(query.data_ptr())
            if rec is None:   # a query that is not an attnres parameter of this model
                return out
            with torch.no_grad():
                w = depth_weights(list(sources), query, norm_weight, float(eps))
                w = w.reshape(w.shape[0], -1)
                o = out.detach().double()
            acc = self.sums.setdefault(rec.key, [torch.zeros(w.shape[0], dtype=torch.float64), 0, 0.0, 0])
            acc[0] += w.double().sum(1).cpu()
            acc[1] += w.shape[1]
            acc[2] += float(o.pow(2).sum())
            acc[3] += o.numel()
            rec.calls += 1
        return out


def schedules_from_report(report) -> dict[tuple[int, str], tuple[int | None, list[str]]]:
    """(chain, site) -> (sublayer, source labels) from a ConversionReport."""
    return {(c.index, s.name): (s.sublayer, list(s.sources)) for c in report.chains for s in c.sites}


def schedules_from_layout(layout: dict) -> dict[tuple[int, str], tuple[int | None, list[str]]]:
    """The same from the `attnres_layout` metadata `save_attnres` writes into safetensors."""
    out = {}
    for i, c in enumerate(layout["chains"]):
        for site, value in site_sources(c["num_sublayers"], c["block_size"]).items():
            out[(i, site)] = value
    return out


def _site_records(model: nn.Module, schedules: dict) -> dict[int, SiteRecord]:
    """query data_ptr -> SiteRecord, for every site with parameters in `model`."""
    by_ptr = {}
    for name, p in model.state_dict(keep_vars=True).items():
        m = _SITE_PARAM.search(name)
        if not m:
            continue
        chain, site = int(m.group(1)), m.group(2)
        sublayer, sources = schedules.get((chain, site), (None if site == "final" else int(site[4:]), []))
        by_ptr[p.data_ptr()] = SiteRecord(chain, site, sublayer, sources)
    return by_ptr


@torch.no_grad()
def record_sites(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, schedules=None,
                 batches: list[tuple] | None = None) -> list[SiteRecord]:
    """Run `model` on `args` (or on each args tuple in `batches`) and summarise every site.

    Args:
        model: a converted model, or `torch.export.load(path).module()` of a converted program.
        args, kwargs: inputs for one forward.
        schedules: (chain, site) -> (sublayer, source labels "b0", ..., "partial"), from
            `schedules_from_report` or `schedules_from_layout`; a converted model's own report
            is used when not given. Without either, sources are labelled "v<i>".
        batches: more argument tuples to average over (args is then ignored).

    Returns:
        SiteRecords in chain, then sublayer order (the final site last).

    Raises:
        ValueError if `model` has no AttnRes parameters or none of its sites ran.
    """
    if schedules is None:
        report = getattr(model, "attnres_report", None)
        schedules = schedules_from_report(report) if report is not None else {}
    by_ptr = _site_records(model, schedules)
    if not by_ptr:
        raise ValueError(f"{type(model).__name__} has no attnres.chain<c>.<site>.query parameters: "
                         "not a converted model")
    recorder = _Recorder(by_ptr)
    with recorder:
        for a in (batches if batches is not None else [args]):
            model(*a, **(kwargs or {}))
    records = []
    for rec in by_ptr.values():
        acc = recorder.sums.get(rec.key)
        if acc is None:
            continue
        weights = (acc[0] / max(1, acc[1])).tolist()
        rec.weights = weights
        rec.input_rms = math.sqrt(acc[2] / max(1, acc[3]))
        if len(rec.sources) != len(weights):
            rec.sources = [f"v{i}" for i in range(len(weights))]
        records.append(rec)
    if not records:
        raise ValueError("no depth-attention site ran: is this a converted model's forward?")
    records.sort(key=lambda r: (r.chain, math.inf if r.sublayer is None else r.sublayer))
    return records


def _columns(rows: list[SiteRecord]) -> list[str]:
    """Source labels of a chain's sites in depth order: b0, b1, ..., then partial (v<i> by index)."""
    names = {n for r in rows for n in r.sources}

    def order(n: str):
        if n == "partial":
            return (1, 0)
        return (0, int(n[1:]))

    return sorted(names, key=order)


def plot_depth_weights(records: list[SiteRecord], path, *, title: str | None = None) -> None:
    """Draw the site x source heatmap of mean depth weights (one panel per chain) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chains = sorted({r.chain for r in records})
    ncols = max(len(_columns([r for r in records if r.chain == c])) for c in chains)
    nrows = max(sum(r.chain == c for r in records) for c in chains)
    fig, axes = plt.subplots(1, len(chains), figsize=(2.5 + 0.45 * ncols * len(chains), 1.5 + 0.3 * nrows),
                             squeeze=False)
    for ax, c in zip(axes[0], chains):
        rows = [r for r in records if r.chain == c]
        labels = _columns(rows)
        col = {name: j for j, name in enumerate(labels)}
        grid = np.full((len(rows), len(labels)), np.nan)
        for i, r in enumerate(rows):
            for name, w in zip(r.sources, r.weights):
                grid[i, col[name]] = w
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(rows)), [("final" if r.sublayer is None else f"sublayer {r.sublayer}")
                                         for r in rows], fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_xlabel("source: b0 embedding, b<n> block n, partial = current block", fontsize=8)
        ax.set_ylabel("site (the sublayer its mixture feeds)", fontsize=8)
        ax.set_title(f"chain {c}" if len(chains) > 1 else "mean depth-attention weight", fontsize=9)
        if len(labels) <= 12:
            for i, j in zip(*np.nonzero(~np.isnan(grid))):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.04, label="softmax weight (mean over tokens)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
