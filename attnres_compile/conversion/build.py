"""Building the conversion plan (plan/types.py) from the chains found on a captured graph.

The match step (find_chains.py) runs on a captured graph; this names what it found by things
that outlive the graph: modules by path, adds by file, line and text, sites by schedule.
The plan's classes are re-exported here for code and pickles that name them at this path.
"""

from __future__ import annotations

import sys
from torch.fx import Node

from ..plan.schedule import SiteSchedule, block_schedule
from ..plan.types import AddSite, ChainPlan, ConversionPlan, LinkPlan, SitePlan
from .find_chains import Chain
from .graph_utils import COPY_OPS, call_site, module_path, static_int, tensor_meta

__all__ = ["AddSite", "ChainPlan", "ConversionPlan", "LinkPlan", "SitePlan", "SiteSchedule", "add_site",
           "chain_owner", "chain_plan", "link_plan", "plan_chain", "portable_file"]


def plan_chain(chain: Chain, chain_index: int, block_size: int, *, preserve: str,
               eps: float | None) -> list[SitePlan]:
    """Sites of a chain with their eps and scale."""
    val = tensor_meta(chain.start)
    dim = static_int(val.shape[chain.feature_axis])
    plans = []
    for sched in block_schedule(len(chain.links), block_size):
        if sched.sublayer is None:
            name, module, found = "final", "", chain.final.eps if chain.final else None
        else:
            link = chain.links[sched.sublayer]
            name, module = f"site{sched.sublayer}", link.module
            found = link.prenorm.eps if link.prenorm else None
        site_eps = eps if eps is not None else (found if found else 1e-6)
        m = sched.num_sources
        plans.append(SitePlan(
            chain=chain_index, name=name, schedule=sched, eps=float(site_eps),
            scale=float(m) if preserve == "exact" else 1.0, module=module, dim=dim,
            dtype=val.dtype, device=val.device,
            param_prefix=None if m == 1 else f"attnres.chain{chain_index}.{name}",
        ))
    return plans


# -- from a captured chain ---------------------------------------------------------------------

def _module_of_file(path: str) -> str | None:
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and f == path:
            return name
    return None


def portable_file(path: str, module_name: str | None) -> str:
    """`path` as a plan stores it: relative to the folder of its module (`modeling_llama.py`
    for transformers.models.llama.modeling_llama), or to the working directory; generated code
    ("<...>") as it is. Never absolute: a checkpoint must not carry the converting machine's paths."""
    import os

    if path.startswith("<") or not os.path.isabs(path):
        return path
    if module_name:
        return os.path.basename(path)
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.basename(path)


def add_site(add: Node, branch: Node, calls: dict | None = None) -> AddSite:
    """The AddSite of a residual add node whose sublayer-output operand is `branch`.

    `calls` maps add nodes to the calls recorded at capture (capture.add_calls): where the code
    really ran. Without one, the node's stack trace and module stack say it (lines only).
    """
    site = call_site(add)
    call = (calls or {}).get(add)
    if site is None and call is None:
        raise RuntimeError(f"internal error: residual add {add.name} carries no stack trace to find it at call time")
    path, line, func, code = site if site is not None else (call.file, call.line, "", "")
    container, lasti = module_path(add), None
    if call is not None:
        if (call.file, call.line) != (path, line):  # e.g. a GraphModule's code, whose nodes quote the original
            import linecache

            path, line, code = call.file, call.line, linecache.getline(call.file, call.line).strip()
        container = call.container if call.container is not None else container
        lasti, cols = call.lasti, call.cols
    else:
        cols = None
    first = add.args[0]
    branch_first = first is branch or (isinstance(first, Node) and first.target in COPY_OPS and first.args
                                       and first.args[0] is branch)  # `y = f(x).clone(); y += x`
    module_name = _module_of_file(path)
    return AddSite(container=container, file=portable_file(path, module_name), module_name=module_name, line=line,
                   func=func, code=code, stream_arg=1 if branch_first else 0,
                   inplace="add_" in str(add.target), lasti=lasti, cols=cols)


def _call_stack(node: Node) -> list[str]:
    from .graph_utils import _clean_path

    return [_clean_path(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def chain_owner(chain: Chain) -> str:
    """The innermost module on the call stack of every link's add: its forward runs the chain."""
    stacks = [_call_stack(a) for link in chain.links for a in link.adds]
    common = stacks[0] if stacks else []
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ""


def link_plan(link, calls: dict | None = None) -> LinkPlan:
    """The LinkPlan of a find_chains Link: a parallel link's k-th add adds branch k."""
    adds = link.adds  # absorbed inner adds first, the outer add last
    sites = [add_site(a, b, calls) for a, b in zip(adds, link.branches)]
    return LinkPlan(add=sites[-1], absorbed=tuple(sites[:-1]), sublayer=link.module)


def chain_plan(chain: Chain, index: int, block_size: int, sites: list[SitePlan],
               calls: dict | None = None, root=None) -> ChainPlan:
    """`root`: the captured module; an owner path it lacks (a graph module's nodes quote the
    original model's module paths) falls back to the root."""
    owner = chain_owner(chain)
    if root is not None and owner:
        try:
            root.get_submodule(owner)
        except AttributeError:
            owner = ""
    return ChainPlan(index=index, owner=owner, block_size=block_size,
                     feature_axis=chain.feature_axis, dim=sites[0].dim,
                     links=[link_plan(lk, calls) for lk in chain.links], sites=sites)
