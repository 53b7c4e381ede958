"""Replace step on a graph: rewrite one residual chain of a captured graph into Block AttnRes.

A converted *module* runs its plan at call time (rewrite.py); a captured *graph* that is all
there is (a Dynamo graph handed to the `attnres` backend unconverted) is rewritten here, node
by node, following the same SPEC section 2 schedule.

For chain links l = 0..L-1 with stream values a_0..a_L, the rewrite

* keeps each sublayer f_l but feeds it h_l = depth_attention(sources_l) instead of a_l,
* replaces the residual adds by the block partial sums (`partial = partial + f_l(h_l)`),
* replaces every reader of the chain's end a_L by the final site over all blocks,
* hands any other reader of a_l (returned hidden states, shape queries) the site's h_l.

All of this by turning each a_l node (l >= 1) into its site in place, so readers follow.
Sites with one source are the identity and get no node and no parameters.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .find_chains import Chain
from .graph_utils import alias_closure, tensor_meta
from .build import SitePlan

DEPTH_ATTENTION = None  # resolved lazily: importing ops registers torch.ops.attnres


def _depth_attention_op():
    global DEPTH_ATTENTION
    if DEPTH_ATTENTION is None:
        from .. import ops  # noqa: F401  (registers attnres::depth_attention)

        DEPTH_ATTENTION = torch.ops.attnres.depth_attention.default
    return DEPTH_ATTENTION


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
    """Rewrite `chain` in `gm`'s graph.

    Each stream value a_l (l >= 1, the node of link l-1's residual add) is turned *in place*
    into its site h_l (the final site for a_L): same node object, new op and arguments. So
    every reader of a_l — its sublayer, returned hidden states, another chain that starts
    from it, a sublayer of an enclosing chain — reads h_l without being found and redirected,
    and references held by other chains' analyses stay valid whatever order chains are
    rewritten in. a_0 (the chain's start) is site 0, the identity, and stays as it is. The
    residual adds' arithmetic moves to new partial-sum nodes inserted before them.
    """
    graph = gm.graph
    stream_values = chain.stream_values()
    op = _depth_attention_op()

    for i, (plan, value) in enumerate(zip(plans, stream_values)):
        skip = set(chain.links[i].adds) if i < len(chain.links) else set()
        readers, _ = _stream_readers(value, skip)
        plan.reads = [u.name for u in readers]

    blocks: list[Node] = [chain.start]
    partial: Node | None = None
    absorbed: list[Node] = []
    for l, (link, plan) in enumerate(zip(chain.links, plans)):
        if l % block_size == 0 and l > 0:
            blocks.append(partial)
            partial = None
        sources = blocks + ([partial] if partial is not None else [])
        assert len(sources) == plan.schedule.num_sources, (sources, plan.schedule)
        if l > 0:
            _become_site(graph, stream_values[l], plan, sources, chain.feature_axis, op)
        else:
            assert len(sources) == 1 and plan.param_prefix is None

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
        absorbed += link.absorbed

    blocks.append(partial)
    _become_site(graph, stream_values[-1], plans[-1], blocks, chain.feature_axis, op)

    for n in reversed(absorbed):  # inner adds of parallel links: read only by their outer add
        if n.users:
            raise RuntimeError(f"internal error: residual add {n.name} still read after rewrite")
        graph.erase_node(n)


def _become_site(graph, node: Node, plan: SitePlan, sources: list[Node], axis: int, op) -> None:
    """Turn the stream value `node` into depth attention over `sources` (same node, same value meta)."""
    assert plan.param_prefix is not None and len(sources) > 1
    with graph.inserting_before(node):
        if axis != -1:  # channels-first stream: attend over dim `axis`, moved last, and back
            moved = []
            for src in sources:
                m = graph.call_function(torch.ops.aten.movedim.int, (src, axis, -1))
                m.meta["val"] = torch.ops.aten.movedim.int(tensor_meta(src), axis, -1)
                moved.append(m)
            sources = moved
        q = graph.get_attr(f"{plan.param_prefix}.query")
        g = graph.get_attr(f"{plan.param_prefix}.norm_weight")
        if axis != -1:
            h = graph.call_function(op, (list(sources), q, g, plan.eps, plan.scale))
            h.meta["val"] = tensor_meta(sources[0]).contiguous()
            h.meta["attnres_site"] = plan.param_prefix
            node.target, node.args = torch.ops.aten.movedim.int, (h, -1, axis)
        else:
            node.target, node.args = op, (list(sources), q, g, plan.eps, plan.scale)
            node.meta["attnres_site"] = plan.param_prefix
    node.kwargs = {}
    node.meta.pop("nn_module_stack", None)
    node._rename("depth_attention" if axis == -1 else "depth_attention_out")
