"""The conversion report: what was rewritten, how, and every add left alone with its reason.

`print(report)` renders rich tables; `report.to_dict()` gives JSON-ready data.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import asdict, dataclass, field

from .graph_utils import module_path, source_line
from .select import chain_layers


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


# -- building the report of a conversion ------------------------------------------------------------

def build_report(name, analysis, chains, plans, refused, config, same, eval_refused=()) -> ConversionReport:
    """The report of a conversion of `name`: its selected `chains` (with their block sizes) and
    their site `plans`, the chains `refused` with the reason, every add left alone, under
    `config`; `same`: one capture served train and eval."""
    preserve, num_blocks, block_size = config.preserve, config.num_blocks, config.block_size
    chain_reports = []
    for (chain, s), chain_plans in zip(chains, plans):
        sites = [
            SiteReport(
                name=p.name, sublayer=p.schedule.sublayer, module=p.module, block=p.schedule.block,
                sources=list(p.schedule.sources), eps=p.eps, scale=p.scale,
                parameters=[f"{p.param_prefix}.query", f"{p.param_prefix}.norm_weight"] if p.param_prefix else [],
                reads=[],
            )
            for p in chain_plans
        ]
        layers = chain_layers(chain)
        chain_reports.append(ChainReport(
            index=chain_plans[0].chain, start=chain.start.name, start_where=source_line(chain.start),
            num_sublayers=len(chain.links), block_size=s, prenorm=chain.is_prenorm,
            note=None if chain.is_prenorm else f"converted with preserve='exact' although {chain.prenorm_reason}",
            sites=sites,
            extra_uses=[f"{u.name} (site{i})" for i, u in chain.extra_uses],
            layers=layers[0] if layers else None, sublayers_per_layer=layers[1] if layers else None,
            schedule=_schedule_text(len(chain.links), s, num_blocks, block_size, layers),
        ))
    left = [LeftAloneReport(la.node.name, source_line(la.node), module_path(la.node), la.reason)
            for la in analysis.left_alone]
    refused_d = [{"start": c.start.name, "num_sublayers": len(c.links), "reason": r}
                 for c, r in [*analysis.refused_chains, *refused]]
    # Chains of the eval graph alone (node names are the eval capture's).
    refused_d += [{"start": f"{c.start.name} (eval graph)", "num_sublayers": len(c.links), "reason": r}
                  for c, r in eval_refused]
    for c, r in refused:  # adds of chains refused for not being PreNorm are left alone too
        for link in c.links:
            for a in link.adds:
                left.append(LeftAloneReport(a.name, source_line(a), module_path(a), r))
    return ConversionReport(
        model=name, preserve=preserve, num_blocks=num_blocks, block_size=block_size,
        modes=["train+eval"] if same else ["train", "eval"], chains=chain_reports,
        left_alone=left, refused_chains=refused_d,
    )


def _schedule_text(num_sublayers, s, num_blocks, block_size, layers) -> str:
    count_ = -(-num_sublayers // s)
    blocks = f"{count_} block{'s' if count_ != 1 else ''}"
    if block_size is not None:
        return f"block_size={block_size} as given: {blocks}"
    n = 8 if num_blocks is None else num_blocks
    if layers is not None:
        count, k = layers
        text = (f"num_blocks={n} over {count} layers of {k} sublayer{'s' if k != 1 else ''}: "
                f"S = {k} x ceil({count}/{n}) = {s}, {blocks}")
        if count_ < n:
            text += f" (fewer than {n}: every block starts at a layer's first sublayer)"
        return text
    return f"num_blocks={n} over {num_sublayers} sublayers (no layer structure found): S = ceil({num_sublayers}/{n}) = {s}"


# Left-alone reasons from most to least like a residual add, for the one a refusal quotes.
_RESIDUAL_LIKE = ("scaled residual", "single residual add", "PostNorm", "in-place add", "mixed dtypes",
                  "alpha", "holds no matmul", "broadcasting or bias", "independent", "rotary")


def _residual_rank(reason: str) -> int:
    return next((i for i, key in enumerate(_RESIDUAL_LIKE) if key in reason), len(_RESIDUAL_LIKE))


def no_chain_message(name, analysis, refused, preserve) -> str:
    """Why no stream of `name` was converted, in one sentence (the NoEligibleChainError)."""
    reasons = Counter()
    example = {}
    for c, r in [*analysis.refused_chains, *refused]:
        key = r.split(":")[0] if r.startswith("PostNorm") else r
        reasons[key] += 1
        example.setdefault(key, r)
    if not reasons:
        left = analysis.left_alone
        if not left:
            why = "the graph has no add operations at all (no residual connections)"
        else:
            best = min(left, key=lambda la: _residual_rank(la.reason))
            why = (f"none of its {len(left)} add(s) is a residual add of a stream "
                   f"(the closest: {best.node.name} at {source_line(best.node) or '?'}: {best.reason})")
    else:
        parts = []
        for key, n in reasons.most_common(3):
            if key == "PostNorm block":
                parts.append(f"{n} PostNorm residual add(s): each add's output goes through a norm before "
                             f"the next residual add, so there is no stream to attend over "
                             f"(e.g. {example[key].split(': ', 1)[1]})")
            else:
                parts.append(f"{n} x {key}" if n > 1 else key)
        why = "; ".join(parts)
    msg = f"no residual stream of {name} is eligible for AttnRes: {why}"
    if preserve != "exact" and any("not PreNorm" in r for _, r in refused):
        msg += " (preserve='exact' converts additive chains that are not PreNorm)"
    return msg
