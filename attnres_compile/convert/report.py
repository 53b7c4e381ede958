"""The conversion report: what was rewritten, how, and every add left alone with its reason.

`print(report)` renders rich tables; `report.to_dict()` gives JSON-ready data.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field


@dataclass
class SiteReport:
    name: str                 # "site3" or "final"
    sublayer: int | None      # 0-based sublayer index in the chain; None for the final site
    module: str               # module path of the sublayer it feeds
    block: int                # block this sublayer's output joins
    sources: list[str]        # "b0", "b1", ..., "partial"
    eps: float
    scale: float
    parameters: list[str]     # [] for an identity site (one source)
    reads: list[str]          # graph nodes that now read the site's output

    @property
    def num_sources(self) -> int:
        return len(self.sources)


@dataclass
class ChainReport:
    index: int
    start: str                # node the stream starts from (the embedding)
    start_where: str
    num_sublayers: int
    block_size: int
    prenorm: bool
    note: str | None
    sites: list[SiteReport]
    extra_uses: list[str] = field(default_factory=list)
    layers: int | None = None             # layers of the chain, when its sublayers come k to a layer
    sublayers_per_layer: int | None = None
    schedule: str | None = None           # how the block size was chosen (SPEC section 2)

    @property
    def num_blocks(self) -> int:
        """Blocks after b0 (the paper's N)."""
        return -(-self.num_sublayers // self.block_size)

    def block_layout(self) -> list[str]:
        out = [f"b0 = {self.start}"]
        for b in range(1, self.num_blocks + 1):
            lo = (b - 1) * self.block_size
            hi = min(b * self.block_size, self.num_sublayers) - 1
            out.append(f"b{b} = sublayers {lo}-{hi}" if hi > lo else f"b{b} = sublayer {lo}")
        return out


@dataclass
class LeftAloneReport:
    node: str
    where: str                # user source line
    module: str
    reason: str


@dataclass
class ConversionReport:
    model: str
    preserve: str
    num_blocks: int | None
    block_size: int | None
    modes: list[str]          # captured graphs: ["train", "eval"] or ["train+eval"]
    chains: list[ChainReport]
    left_alone: list[LeftAloneReport]
    refused_chains: list[dict]
    warnings: list[str] = field(default_factory=list)  # features of the original not kept, and why
    installed: list[str] = field(default_factory=list)  # per chain: its adds installed in code, or watched (why)
    checkpointed: list = field(default_factory=list)    # (chain, sublayer, function) in a plain-function checkpoint

    @property
    def num_sites(self) -> int:
        return sum(len(c.sites) for c in self.chains)

    @property
    def parameters(self) -> list[str]:
        return [p for c in self.chains for s in c.sites for p in s.parameters]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_sites"] = self.num_sites
        d["parameters"] = self.parameters
        for c, cd in zip(self.chains, d["chains"]):
            cd["num_blocks"] = c.num_blocks
            cd["block_layout"] = c.block_layout()
        return d

    # -- rendering -------------------------------------------------------------------------
    def __rich_console__(self, console, options):
        from rich.table import Table
        from rich.text import Text

        yield Text.assemble(
            ("AttnRes conversion of ", "bold"), (self.model, "bold cyan"),
            f": {len(self.chains)} chain(s), {self.num_sites} sites, "
            f"{len(self.parameters)} new parameters, preserve={self.preserve!r}",
        )
        for c in self.chains:
            title = (f"chain {c.index}: from {c.start}, {c.num_sublayers} sublayers, "
                     f"block size {c.block_size} ({c.num_blocks} blocks + b0), "
                     f"{'PreNorm' if c.prenorm else 'not PreNorm'}")
            t = Table(title=title, title_justify="left", show_lines=False)
            for col in ("site", "sublayer", "block", "sources", "eps", "scale", "parameters"):
                t.add_column(col)
            for s in c.sites:
                t.add_row(
                    s.name, s.module or "(final consumer)", f"b{s.block}", ", ".join(s.sources),
                    f"{s.eps:g}", f"{s.scale:g}",
                    s.parameters[0].rsplit(".", 1)[0] + ".{query,norm_weight}" if s.parameters
                    else "identity (one source)",
                )
            yield t
            if c.schedule:
                yield Text(f"  schedule: {c.schedule}")
            yield Text("  blocks: " + " | ".join(c.block_layout()))
            if c.note:
                yield Text(f"  note: {c.note}", style="yellow")
            if c.extra_uses:
                yield Text(f"  other readers of the stream get the site output: {', '.join(c.extra_uses)}",
                           style="yellow")
        for line in self.installed:
            yield Text(f"runtime: {line}", style="yellow" if "watched" in line else "")
        for r in self.refused_chains:
            yield Text(f"chain from {r['start']} left alone: {r['reason']}", style="yellow")
        for w in self.warnings:
            yield Text(f"warning: {w}", style="yellow")
        if self.left_alone:
            t = Table(title=f"{len(self.left_alone)} add(s) left alone", title_justify="left")
            for col in ("node", "where", "reason"):
                t.add_column(col, overflow="fold")
            for la in self.left_alone:
                t.add_row(la.node, la.where, la.reason)
            yield t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, force_terminal=False, color_system=None).print(self)
        return buf.getvalue()

    def __repr__(self) -> str:
        return (f"ConversionReport(model={self.model!r}, chains={len(self.chains)}, "
                f"sites={self.num_sites}, left_alone={len(self.left_alone)})")
