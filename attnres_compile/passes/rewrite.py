"""Replace step: rewrite one residual chain into Block AttnRes (SPEC section 2).

For chain links l = 0..L-1 with stream values a_0..a_L, the rewrite

* keeps each sublayer f_l but feeds it h_l = depth_attention(sources_l) instead of a_l,
* replaces the residual adds by the block partial sums (`partial = partial + f_l(h_l)`),
* replaces every reader of the chain's end a_L by the final site over all blocks,
* hands any other reader of a_l (returned hidden states, shape queries) the site's h_l.

Sites with one source are the identity and get no node and no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .find_chains import Chain
from .graph_utils import alias_closure, tensor_meta
from .schedule import SiteSchedule, block_schedule

DEPTH_ATTENTION = None  # resolved lazily: importing ops registers torch.ops.attnres


def _depth_attention_op():
    global DEPTH_ATTENTION
    if DEPTH_ATTENTION is None:
        from .. import ops  # noqa: F401  (registers attnres::depth_attention)

        DEPTH_ATTENTION = torch.ops.attnres.depth_attention.default
    return DEPTH_ATTENTION


@dataclass
class SitePlan:
    """What the rewrite created for one site (reported, and used to build parameters)."""

    chain: int
    name: str                 # "site3" or "final"
    schedule: SiteSchedule
    eps: float
    scale: float
    module: str               # sublayer module path ("" for final)
    dim: int
    dtype: torch.dtype
    device: torch.device
    param_prefix: str | None  # "attnres.chain0.site3" or None for an identity site
    reads: list[str] = field(default_factory=list)  # node names whose stream input became h


def plan_chain(chain: Chain, chain_index: int, block_size: int, *, preserve: str,
               eps: float | None) -> list[SitePlan]:
    """Sites of a chain with their eps and scale, before touching the graph."""
    val = tensor_meta(chain.start)
    dim = int(val.shape[-1])
    plans = []
    schedule = block_schedule(len(chain.links), block_size)
    for sched in schedule:
        if sched.sublayer is None:
            name, module, found = "final", "", chain.final.eps if chain.final else None
        else:
            link = chain.links[sched.sublayer]
            name, module = f"site{sched.sublayer}", link.module
            found = link.prenorm.eps if link.prenorm else None
        site_eps = eps if eps is not None else (found if found else 1e-6)
        m = sched.num_sources
        prefix = None if m == 1 else f"attnres.chain{chain_index}.{name}"
        plans.append(SitePlan(
            chain=chain_index, name=name, schedule=sched, eps=float(site_eps),
            scale=float(m) if preserve == "exact" else 1.0, module=module, dim=dim,
            dtype=val.dtype, device=val.device, param_prefix=prefix,
        ))
    return plans


def _stream_readers(value: Node, skip: set[Node]) -> tuple[list[Node], list[Node]]:
    """(readers, metadata asserts) of `value` through its identity aliases."""
    aliases = alias_closure(value)
    members = set(aliases)
    readers, asserts = [], []
    for a in aliases:
        for u in a.users:
            if u in members or u in skip:
                continue
            if u.op == "call_function" and u.target is torch.ops.aten._assert_tensor_metadata.default:
                asserts.append(u)
            elif u not in readers:
                readers.append(u)
    return readers, asserts


def rewrite_chain(gm: GraphModule, chain: Chain, plans: list[SitePlan], block_size: int) -> None:
    graph = gm.graph
    index = {n: i for i, n in enumerate(graph.nodes)}
    old_adds = {a for link in chain.links for a in link.adds}
    stream_values = chain.stream_values()
    op = _depth_attention_op()

    blocks: list[Node] = [chain.start]
    partial: Node | None = None
    dead_asserts: list[Node] = []

    def site_node(plan: SitePlan, sources: list[Node], readers: list[Node]) -> Node:
        if len(sources) == 1:
            return sources[0]
        first = min(readers, key=index.__getitem__) if readers else None
        ctx = graph.inserting_before(first) if first is not None else graph.inserting_before(graph.output_node())
        with ctx:
            q = graph.get_attr(f"{plan.param_prefix}.query")
            g = graph.get_attr(f"{plan.param_prefix}.norm_weight")
            h = graph.call_function(op, (list(sources), q, g, plan.eps, plan.scale))
        h.meta["val"] = tensor_meta(chain.start)
        h.meta["attnres_site"] = plan.param_prefix
        return h

    def redirect(value: Node, h: Node, readers: list[Node]) -> None:
        members = set(alias_closure(value))
        for u in readers:
            for inp in list(u.all_input_nodes):
                if inp in members:
                    u.replace_input_with(inp, h)

    for link, plan, value in zip(chain.links, plans, stream_values):
        sched = plan.schedule
        if sched.sublayer % block_size == 0 and sched.sublayer > 0:
            blocks.append(partial)
            partial = None
        sources = blocks + ([partial] if partial is not None else [])
        assert len(sources) == sched.num_sources, (sources, sched)
        readers, asserts = _stream_readers(value, set(link.adds))
        dead_asserts += asserts
        h = site_node(plan, sources, readers)
        plan.reads = [u.name for u in readers]
        redirect(value, h, readers)

        with graph.inserting_before(link.add):
            out = link.branches[0]
            for extra in link.branches[1:]:
                out = graph.call_function(torch.ops.aten.add.Tensor, (out, extra))
                out.meta["val"] = tensor_meta(link.add)
            if partial is not None:
                out = graph.call_function(torch.ops.aten.add.Tensor, (partial, out))
                out.meta["val"] = tensor_meta(link.add)
                out.meta["nn_module_stack"] = link.add.meta.get("nn_module_stack", {})
                out.meta["stack_trace"] = link.add.meta.get("stack_trace")
        partial = out

    blocks.append(partial)
    final_plan = plans[-1]
    readers, asserts = _stream_readers(stream_values[-1], set())
    dead_asserts += asserts
    h_final = site_node(final_plan, blocks, readers)
    final_plan.reads = [u.name for u in readers]
    redirect(stream_values[-1], h_final, readers)

    for n in dead_asserts:
        graph.erase_node(n)
    _erase_dead(graph, old_adds, stream_values)


def _erase_dead(graph, old_adds: set[Node], stream_values: list[Node]) -> None:
    """Remove the old adds and their identity aliases, now unread, last first."""
    candidates = set(old_adds)
    for v in stream_values[1:]:
        candidates.update(alias_closure(v))
    for v in stream_values[:1]:
        candidates.update(a for a in alias_closure(v) if a is not v)
    for n in reversed(list(graph.nodes)):
        if n in candidates and not n.users:
            graph.erase_node(n)
    left = [n.name for n in graph.nodes if n in old_adds]
    if left:
        raise RuntimeError(f"internal error: residual adds still read after rewrite: {left}")

