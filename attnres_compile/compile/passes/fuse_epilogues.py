"""Fuse each depth-attention site with its neighbours in a Dynamo graph (the CUDA path).

Two matches, each replaced by one op of ``ops/fused.py`` whose generated Triton kernel moves
fewer bytes (docs/kernels.md section 5b):

* **partial-sum add, then site**: a site whose last source is ``prev + add`` (the block's
  running partial, ``operator.add`` / ``torch.add`` / ``Tensor.add`` of two tensors of the site's
  shape) becomes
  ``depth_attention_partial(blocks, prev, add)``; the add's other readers (later sites of the
  block, the block's completion) read the op's ``new_partial`` output. Saves ``D`` per token.
* **site, then norm**: a site read by exactly one node, ``layer_norm`` / ``rms_norm`` over its
  last dimension with a weight, becomes ``depth_attention_norm``; the site is never written.
  Saves ``2*D`` per token.

A site that matches the first is not also fused with its norm (one kernel per site). Returns
the counts. The backend runs it on graphs whose inputs are on CUDA, where the Triton kernels
are the fused path; on CPU, Inductor fuses the decomposed site itself (``decompose_sites.py``).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .match import is_depth_attention, site_args

__all__ = ["fuse_epilogues"]

_ADDS = {operator.add, torch.add, torch.Tensor.add, torch.ops.aten.add.Tensor}
_LAYER_NORMS = {torch.nn.functional.layer_norm, torch.layer_norm, torch.ops.aten.layer_norm.default}
_RMS_NORMS = {torch.nn.functional.rms_norm, torch.rms_norm, torch.ops.aten.rms_norm.default}


def _shape(n) -> tuple | None:
    val = n.meta.get("example_value", n.meta.get("val")) if isinstance(n, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _plain_add(n: Node, shape: tuple | None) -> tuple[Node, Node] | None:
    """(prev, add) when ``n`` is a plain two-tensor add producing ``shape`` from operands of it."""
    is_add = (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target == "add")
    if not is_add or len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    if not (isinstance(a, Node) and isinstance(b, Node)) or shape is None:
        return None
    return (a, b) if _shape(a) == _shape(b) == _shape(n) == shape else None


def _norm_of(site: Node, d: int):
    """(kind, weight, bias, eps, norm node) when the site's only reader is a norm over D."""
    users = list(site.users)
    if len(users) != 1:
        return None
    u = users[0]
    if u.op != "call_function" or not u.args or u.args[0] is not site:
        return None
    args = list(u.args) + [None] * 5
    if u.target in _LAYER_NORMS:
        shape, weight, bias, eps = (u.kwargs.get("normalized_shape", args[1]), u.kwargs.get("weight", args[2]),
                                    u.kwargs.get("bias", args[3]), u.kwargs.get("eps", args[4]))
        kind = "layernorm"
        if bias is None:
            return None
    elif u.target in _RMS_NORMS:
        shape, weight, eps = (u.kwargs.get("normalized_shape", args[1]), u.kwargs.get("weight", args[2]),
                              u.kwargs.get("eps", args[3]))
        bias, kind = None, "rmsnorm"
        if eps is None:    # rms_norm's default: the machine epsilon of the input's dtype
            val = site.meta.get("example_value", site.meta.get("val"))
            if not isinstance(val, torch.Tensor):
                return None
            eps = torch.finfo(val.dtype).eps
    else:
        return None
    dims = [shape] if isinstance(shape, int) else list(shape) if shape is not None else None
    if weight is None or dims != [d]:
        return None
    return kind, weight, bias, float(eps if eps is not None else 1e-5), u


def fuse_epilogues(gm: GraphModule) -> dict[str, int]:
    """Rewrite ``gm`` in place; returns ``{"partial": n, "norm": n}``."""
    graph = gm.graph
    counts = {"partial": 0, "norm": 0}
    for site in [n for n in graph.nodes if is_depth_attention(n)]:
        sources, w, g, eps, scale = site_args(site)
        shape = _shape(site)
        if shape is None:
            continue
        d = shape[-1]
        last = sources[-1]
        pa = _plain_add(last, shape) if len(sources) >= 2 and isinstance(last, Node) else None
        if pa is not None:
            # the fused op replaces the add where the add was, so every reader of the partial
            # still comes after it; it needs the site's other inputs to be defined by then
            order = {n: i for i, n in enumerate(graph.nodes)}
            inputs = [x for x in (*sources[:-1], w, g) if isinstance(x, Node)]
            if any(order[x] > order[last] for x in inputs):
                pa = None
        if pa is not None:
            with graph.inserting_before(last.next):
                fused = graph.call_function(torch.ops.attnres.depth_attention_partial.default,
                                            (sources[:-1], pa[0], pa[1], w, g, eps, scale))
                h = graph.call_function(operator.getitem, (fused, 0))
                new_partial = graph.call_function(operator.getitem, (fused, 1))
            h.meta.update(site.meta)
            new_partial.meta.update(last.meta)
            site.replace_all_uses_with(h)
            graph.erase_node(site)
            last.replace_all_uses_with(new_partial)
            graph.erase_node(last)
            counts["partial"] += 1
            continue
        norm = _norm_of(site, d)
        if norm is not None:
            kind, weight, bias, norm_eps, user = norm
            with graph.inserting_before(user):
                y = graph.call_function(torch.ops.attnres.depth_attention_norm.default,
                                        (sources, w, g, eps, scale, weight, bias, norm_eps, kind))
            y.meta.update(user.meta)
            user.replace_all_uses_with(y)
            graph.erase_node(user)
            graph.erase_node(site)
            counts["norm"] += 1
    if any(counts.values()):
        graph.lint()
        gm.recompile()
    return counts
