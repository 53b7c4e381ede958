"""Find residual streams in a captured graph (SPEC section 5).

Match step of the rewrite: classify every `add` of the graph as a residual link or as left
alone (with the reason), group links into chains, and decide per chain whether it is PreNorm.
Nothing here mutates the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from . import prenorm
from .links import LeftAlone, Link, describe_node, find_links, op_name
from .graph_utils import (
    ADD_OPS,
    CONV_OPS,
    WEIGHT_OPS,
    alias_closure,
    alias_root,
    common_module_path,
    forward_closure,
    is_layout_alias,
    module_path,
    mutation_of,
    node_index,
    reads_values,
    same_shape,
    static_int,
    tensor_meta,
)

MIN_LINKS = 2  # a lone residual add is a skip connection, not a stream worth attending over


@dataclass
class Chain:
    links: list[Link]
    final: prenorm.DegreeResult | None = None
    prenorm_reason: str | None = None   # None when the chain is PreNorm
    extra_uses: list[tuple[int, Node]] = field(default_factory=list)  # (site, user) outside the chain
    feature_axis: int = -1   # the axis depth attention normalises over: -1, or 1 for NCHW conv streams

    @property
    def start(self) -> Node:
        return self.links[0].root

    @property
    def end(self) -> Node:
        return self.links[-1].add

    @property
    def is_prenorm(self) -> bool:
        return self.prenorm_reason is None

    @property
    def reshaped(self) -> bool:
        """Whether the stream changes its token layout between links (`is_layout_alias`)."""
        return any(is_layout_alias(a) for v in self.stream_values() for a in alias_closure(v))

    def stream_values(self) -> list[Node]:
        """a_0 .. a_L: the stream before each link and after the last."""
        return [self.links[0].root] + [lk.add for lk in self.links]


@dataclass
class StreamAnalysis:
    chains: list[Chain]
    left_alone: list[LeftAlone]
    refused_chains: list[tuple[Chain, str]]


def _link_prenorm(link: Link, index) -> prenorm.DegreeResult:
    aliases = alias_closure(link.root)
    nodes = sorted(link.region, key=index.__getitem__)
    return prenorm.analyse(aliases, nodes, link.branches)


def _stream_users(value: Node, exclude: set[Node]) -> list[Node]:
    """Users of `value` and its identity aliases, minus aliases, `exclude` and metadata asserts."""
    aliases = alias_closure(value)
    members = set(aliases)
    out = []
    for a in aliases:
        for u in a.users:
            if u in members or u in exclude or u in out:
                continue
            if not reads_values(u, a):  # asserts, guards, `y.type_as(x)`: x's metadata only
                continue
            out.append(u)
    return out


_BATCH_NORMS = frozenset(
    getattr(torch.ops.aten, n).default for n in (
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
    ) if hasattr(torch.ops.aten, n) and hasattr(getattr(torch.ops.aten, n), "default")
)


def _why_not_prenorm(where: str, res: prenorm.DegreeResult) -> str:
    if res.offending is not None and res.offending.target in _BATCH_NORMS:
        return (f"{where} reads the stream through {op_name(res.offending)} at {describe_node(res.offending)}, "
                "which is not scale invariant (eval mode normalises with running statistics)")
    if res.offending is not None:
        return f"{where} reads the stream through {op_name(res.offending)} at {describe_node(res.offending)} before any norm"
    if res.leak is not None:
        return f"{where} reaches {describe_node(res.leak)} without a scale-invariant norm"
    return f"{where} is not normalized"


def analyse_streams(graph: Graph) -> StreamAnalysis:
    index = node_index(graph)
    links, left = find_links(graph, index)

    # Group links into chains: link k+1 reads (through casts/views) the output of link k.
    followers: dict[Node, list[Link]] = {}
    for link in links.values():
        followers.setdefault(link.root, []).append(link)
    forked: set[Node] = set()
    for root, fl in followers.items():
        if len(fl) > 1:
            for lk in fl:
                forked.add(lk.add)
    chains: list[Chain] = []
    for link in sorted(links.values(), key=lambda lk: index[lk.add]):
        if link.root in links and link.add not in forked:
            continue  # continues an earlier chain
        seq = [link]
        while True:
            nxt = followers.get(seq[-1].add, [])
            if len(nxt) != 1 or nxt[0].add in forked:
                break
            seq.append(nxt[0])
        chains.append(Chain(seq))

    refused: list[tuple[Chain, str]] = []
    kept: list[Chain] = []
    for chain in chains:
        if len(chain.links) < MIN_LINKS:
            refused.append((chain, _single_link_reason(chain, links, index)))
            continue
        chain.feature_axis = _feature_axis(chain)
        why = _feature_dim_problem(chain) or _dead_end(chain, index) or _mutated_stream(chain)
        if why is not None:
            refused.append((chain, why))
            continue
        kept.append(chain)

    for chain in kept:
        reasons = []
        for i, link in enumerate(chain.links):
            link.module = common_module_path(
                [n for n in link.region if n.op == "call_function" and n.target in WEIGHT_OPS]
            ) or module_path(link.branches[0])
            link.prenorm = _link_prenorm(link, index)
            if not link.prenorm.ok and not reasons:
                reasons.append(_why_not_prenorm(f"sublayer {i} ({link.module or link.add.name})", link.prenorm))
        end_aliases = alias_closure(chain.end)
        chain.final = prenorm.output_leaks(end_aliases, forward_closure(end_aliases, index))
        if not chain.final.ok and not reasons:
            reasons.append(_why_not_prenorm("the chain's final consumer", chain.final))
        # Other readers of intermediate stream values (e.g. returned hidden states).
        for i, link in enumerate(chain.links):
            exclude = set(link.region) | set(link.adds)
            for u in _stream_users(link.root, exclude):
                chain.extra_uses.append((i, u))
        for i, u in chain.extra_uses:
            res = prenorm.output_leaks(alias_closure(chain.links[i].root), forward_closure([u], index))
            if not res.ok and not reasons:
                reasons.append(_why_not_prenorm(f"a use of the stream outside the chain ({describe_node(u)})", res))
        chain.prenorm_reason = reasons[0] if reasons else None

    # Adds inside an accepted sublayer get that as their reason.
    inside: dict[Node, str] = {}
    for chain in kept:
        for i, link in enumerate(chain.links):
            for n in link.region:
                if n.op == "call_function" and n.target in ADD_OPS:
                    inside[n] = f"inside sublayer {i} ({link.module or link.add.name}) of the chain from {chain.start.name}"

    def with_place(n: Node, reason: str) -> str:
        return f"{inside[n]}: {reason}" if n in inside else reason

    left_alone = [LeftAlone(n, with_place(n, reason)) for n, reason in left.items()]
    for chain, reason in refused:
        for link in chain.links:
            for a in link.adds:
                left_alone.append(LeftAlone(a, with_place(a, reason)))
    left_alone.sort(key=lambda la: index[la.node])
    return StreamAnalysis(kept, left_alone, refused)


def _feature_axis(chain: Chain) -> int:
    """-1 (the last dim, [..., D]) unless a sublayer convolves the stream: then 1 (NCHW channels).

    PyTorch convolutions are channels-first, so when a sublayer runs a convolution on a tensor
    of the stream's shape, the stream's features are its channels (dim 1), not its last dim
    (a spatial one). Depth attention then runs over the channels of each position.
    """
    val = tensor_meta(chain.start)
    if val is None or val.dim() < 3:
        return -1
    for link in chain.links:
        for n in link.region:
            if n.op == "call_function" and n.target in CONV_OPS and isinstance(n.args[0], Node):
                inp = tensor_meta(n.args[0])
                if inp is not None and same_shape(inp, val) and not _permuted_on_the_way(n.args[0], link.region):
                    return 1
    return -1


_PERMUTES = frozenset({
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.t.default,
    torch.ops.aten.movedim.int, torch.ops.aten.swapaxes.default, torch.ops.aten.swapdims.default,
})


def _permuted_on_the_way(node: Node, region: set[Node]) -> bool:
    """Whether a transpose/permute lies between the stream and `node` inside the sublayer
    (a [B, T, D] stream transposed to [B, D, T] for a conv is still features-last, even when
    T == D makes the shapes look alike)."""
    seen, stack = set(), [node]
    while stack:
        cur = stack.pop()
        if cur in seen or cur not in region:
            continue
        seen.add(cur)
        if cur.op == "call_function" and cur.target in _PERMUTES:
            return True
        stack.extend(cur.all_input_nodes)
    return False


def _feature_dim_problem(chain: Chain) -> str | None:
    val = tensor_meta(chain.start)
    if val is None or val.dim() == 0:
        return "the stream is not a tensor with a feature dimension"
    axis = chain.feature_axis
    size = val.shape[axis]
    if static_int(size) is None:
        where = "last dimension" if axis == -1 else f"dimension {axis}"
        return (f"the stream's feature dimension ({where}, size {size}) is dynamic; depth-attention "
                "parameters need a fixed width (capture with dynamic=False, or give that dimension a fixed size)")
    return None


def _mutated_stream(chain: Chain) -> str | None:
    """In-place writes to a stream value a_0..a_{L-1} (or a view of one) cannot be preserved.

    After the rewrite a_l no longer exists: its readers get the site output and the next
    stream value is a partial sum that does not read a_l, so an in-place change of a_l would
    reach neither. (The chain's end may be modified: all its readers share the final site.)
    """
    for i, v in enumerate(chain.stream_values()[:-1]):
        for a in alias_closure(v):
            m = mutation_of(a)
            if m is not None:
                return (f"the stream value before sublayer {i} is modified in place by {op_name(m)} at "
                        f"{describe_node(m)}, which the rewrite cannot preserve")
    return None


def _dead_end(chain: Chain, index) -> str | None:
    """A chain whose end reaches no graph output is dead code: its sites could never learn."""
    closure = forward_closure(alias_closure(chain.end), index)
    if any(n.op == "output" for n in closure):
        return None
    return "the stream's final value reaches no output of the model (dead code), so its sites could not be trained"


def _single_link_reason(chain: Chain, links: dict[Node, Link], index) -> str:
    link = chain.links[0]
    # PostNorm: the add feeds a norm whose output is the stream of another residual add.
    for u in _stream_users(link.add, set()):
        if u.op == "call_function" and u.target in prenorm.NORM_OPS:
            normed = [u] + [g for g in u.users if g.op == "call_function" and "getitem" in str(g.target)]
            for other in links.values():
                if alias_root(other.stream) in normed or other.root in normed:
                    return (f"PostNorm block: the residual output goes through the norm {describe_node(u)} "
                            "before the next residual add, which breaks the stream")
    # A norm right after the add in the add's own module (BERT's `LayerNorm(x + f(x))`) is
    # PostNorm too; a norm elsewhere after a lone add is the model's final norm.
    here = module_path(link.add)
    for u in _stream_users(link.add, set()):
        if u.op == "call_function" and u.target in prenorm.NORM_OPS and here:
            there = module_path(u)
            if there == here or there.startswith(here + "."):
                return f"PostNorm block: the residual output is normalized by {describe_node(u)}"
    # A transpose of the tokens between two links: the next link reads the stream in another order.
    for u in _stream_users(link.add, set()):
        if u.op == "call_function" and u.target in _PERMUTES:
            moved = alias_closure(u)
            for other in links.values():
                if other.root in moved or alias_root(other.stream) in moved:
                    return (f"the stream is transposed between sublayers ({describe_node(u)}): the next residual add "
                            "reads its tokens in another order, which the rewrite does not follow")
    return f"a single residual add, not a stream (a chain needs at least {MIN_LINKS} links)"
