"""Rewrite depth-attention sites to two-phase inference (SPEC section 3, paper Algorithm 1).

Match: every `attnres::depth_attention(sources, w, g, eps, scale)` node. Sites whose sources
share the same prefix (all but the last source) form a group: the sublayers of one block
attend over the same completed blocks, and the first sublayer of the next block attends over
those blocks plus the just-completed one.

Replace: per group, one `depth_attention_phase1(prefix, stack(w), stack(g), eps)` reads the
prefix once for all the group's sites; per site, `depth_attention_phase2` merges the last
source (the running partial) into that site's statistics. Exact to rounding, forward only:
the pass is applied only where gradients are off.

Works on export graphs (parameters as get_attr) and Dynamo graphs (parameters as inputs).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .match import is_depth_attention, site_args


def to_two_phase(gm: GraphModule) -> int:
    """Rewrite `gm` in place; returns the number of sites rewritten."""
    phase1 = torch.ops.attnres.depth_attention_phase1.default
    phase2 = torch.ops.attnres.depth_attention_phase2.default
    graph = gm.graph
    groups: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        if is_depth_attention(node):
            sources, w, g, eps, scale = site_args(node)
            if len(sources) < 2:
                continue
            groups.setdefault((tuple(sources[:-1]), eps), []).append(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for (prefix, eps), sites in groups.items():
        first = min(sites, key=order.__getitem__)
        params = [(site_args(s)[1], site_args(s)[2]) for s in sites]
        # Parameters fetched after `first` (get_attr nodes next to each site) move up: they
        # have no inputs, so any position is valid.
        for w, g in params:
            for p in (w, g):
                if isinstance(p, Node) and p.op == "get_attr" and order[p] > order[first]:
                    first.prepend(p)
        with graph.inserting_before(first):
            qs = graph.call_function(torch.ops.aten.stack.default, ([w for w, _ in params],))
            gs = graph.call_function(torch.ops.aten.stack.default, ([g for _, g in params],))
            stats = graph.call_function(phase1, (list(prefix), qs, gs, eps))
            o = graph.call_function(operator.getitem, (stats, 0))
            m = graph.call_function(operator.getitem, (stats, 1))
            z = graph.call_function(operator.getitem, (stats, 2))
        for i, site in enumerate(sites):
            sources, w, g, _, scale = site_args(site)
            with graph.inserting_before(site):
                oi = graph.call_function(torch.ops.aten.select.int, (o, 0, i))
                mi = graph.call_function(torch.ops.aten.select.int, (m, 0, i))
                zi = graph.call_function(torch.ops.aten.select.int, (z, 0, i))
                h = graph.call_function(phase2, (oi, mi, zi, sources[-1], w, g, eps, scale))
            h.meta.update(site.meta)
            site.replace_all_uses_with(h)
            graph.erase_node(site)
            count += 1
    graph.lint()
    gm.recompile()
    return count
