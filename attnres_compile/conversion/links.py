"""Residual links in a captured graph: the adds `x + f(x)` where f holds a matmul, linear or
convolution (SPEC section 5), each classified, and everything else left alone with its reason.
find_chains.py strings the links into streams."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from .graph_utils import (
    ADD_OPS,
    COPY_OPS,
    INPLACE_ADD_OPS,
    WEIGHT_OPS,
    alias_closure,
    alias_root,
    ancestors_after,
    descendants_within,
    same_meta,
    scale_of,
    same_shape,
    source_line,
    storage_inputs,
    tensor_meta,
)


@dataclass
class Link:
    """One residual add `a_{l+1} = a_l + f_l(a_l)`."""

    add: Node                   # the add producing the next stream value
    stream: Node                # the add's operand that carries the stream (maybe an alias)
    root: Node                  # the value the stream really is (through identity casts/views)
    branches: list[Node]        # f_l's output(s); two for parallel attention + MLP
    region: set[Node]           # nodes on the paths stream -> branches (the sublayer)
    absorbed: list[Node] = field(default_factory=list)  # inner add of a parallel residual
    module: str = ""
    prenorm: prenorm.DegreeResult | None = None

    @property
    def adds(self) -> list[Node]:
        return [*self.absorbed, self.add]


@dataclass
class LeftAlone:
    node: Node
    reason: str


def describe_node(node: Node) -> str:
    loc = source_line(node)
    return f"{node.name} ({loc})" if loc else node.name


def op_name(node: Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


_STAT_READERS = frozenset({
    torch.ops.aten.rsqrt.default, torch.ops.aten.sqrt.default, torch.ops.aten.reciprocal.default,
    torch.ops.aten.log.default,
})


def _scalar_reason(node: Node) -> str:
    a = node.args[0]
    val = tensor_meta(a) if isinstance(a, Node) else None
    if val is not None and not val.dtype.is_floating_point:
        return "scalar operand on integers (positions, indices or a mask)"
    for u in node.users:
        if u.op == "call_function" and (u.target in _STAT_READERS or (
                u.target in (torch.ops.aten.div.Tensor,) and u.args[1] is node)):
            return "eps added to a norm statistic (scalar operand)"
    return "scalar operand (an offset or constant add)"


def _private_copy(t: Node, node: Node) -> bool:
    """`t` is a fresh tensor (an op's output, not a view) that only `node` reads."""
    return (t.op == "call_function" and len(t.users) == 1 and node in t.users
            and not storage_inputs(t) and tensor_meta(t) is not None)


def _inplace_operands(node: Node):
    """An in-place add that behaves like `add(a, b)`: (a, b), or a reason string.

    `y = f(x); y += x` writes into the branch output, and `x = x.clone(); x += f(x)` into a
    private copy of the stream; when nothing else reads the written tensor, the add is
    functional and can be a residual link (the rewrite turns it into a depth-attention site).
    """
    if node.target is not torch.ops.aten.add_.Tensor or not isinstance(node.args[0], Node):
        return "in-place add (add_) with a scalar operand"
    t, other = node.args[0], node.args[1]
    if t.op in ("get_attr", "placeholder"):
        return "in-place update of a model buffer or input (e.g. BatchNorm's num_batches_tracked counter)"
    if not _private_copy(t, node):
        return "in-place add (add_) that modifies a tensor read elsewhere is not rewritten"
    if t.target in COPY_OPS and isinstance(t.args[0], Node) and same_meta(t, t.args[0]):
        t = t.args[0]  # x = x.clone(); x += y  ==  x + y
    return t, other


def _classify_add(node: Node, index: dict[Node, int]):
    """Return a Link candidate or a reason string."""
    if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2 and node.args[2] != 1):
        return "add with alpha != 1"
    if node.target in INPLACE_ADD_OPS:
        res = _inplace_operands(node)
        if isinstance(res, str):
            return res
        a, b = res
    else:
        a, b = node.args[0], node.args[1]
    if not isinstance(a, Node) or not isinstance(b, Node):
        return _scalar_reason(node)
    ta, tb = tensor_meta(a), tensor_meta(b)
    if ta is None or tb is None:
        return "operands are not tensors"
    if not (ta.dtype.is_floating_point and tb.dtype.is_floating_point):
        return f"non-floating operands ({ta.dtype}, {tb.dtype})"
    if ta.dtype != tb.dtype:
        return f"mixed dtypes ({ta.dtype} + {tb.dtype})"
    if not same_shape(ta, tb):
        return f"broadcasting or bias add (shapes {tuple(ta.shape)} and {tuple(tb.shape)})"
    x, y = (a, b) if index[a] < index[b] else (b, a)
    root = alias_root(x)
    anc = ancestors_after(y, index[root], index)
    if root not in anc:
        # The stream operand usually comes first; `1.0 * x + b` with b computed earlier does not.
        swapped = alias_root(y)
        if swapped is not y and index[swapped] < index[x]:
            anc_x = ancestors_after(x, index[swapped], index)
            if swapped in anc_x:
                x, y, root, anc = y, x, swapped, anc_x
    if root not in anc:
        return ("independent", x, y)
    aliases = alias_closure(root)
    region = set(descendants_within(aliases, anc, index))
    region.discard(node)
    if not any(n.op == "call_function" and n.target in WEIGHT_OPS for n in region):
        return "the branch holds no matmul, linear or convolution (an elementwise add, e.g. inside an activation)"
    return Link(add=node, stream=x, root=root, branches=[y], region=region)


_TRIG = frozenset({torch.ops.aten.cos.default, torch.ops.aten.sin.default})


def _from_trig_table(node: Node, depth: int = 24) -> bool:
    """Whether `node` derives (within a few steps) from a cos or sin: a rotary table."""
    seen, stack = set(), [(node, 0)]
    while stack:
        cur, d = stack.pop()
        if cur in seen or d > depth:
            continue
        seen.add(cur)
        if cur.op == "call_function" and (cur.target in _TRIG or _subgraph_has_trig(cur)):
            return True
        stack.extend((i, d + 1) for i in cur.all_input_nodes)
    return False


def _subgraph_has_trig(node: Node) -> bool:
    """A higher-order op whose subgraph computes a cos or sin: torch 2.11's export keeps a
    `@torch.no_grad()` forward (Hugging Face's rotary embedding) as `wrap_with_set_grad_enabled`
    over a submodule, where 2.13 inlines it."""
    if not isinstance(node.target, torch._ops.HigherOrderOperator):
        return False
    root = node.graph.owning_module
    for arg in node.args:
        if isinstance(arg, Node) and arg.op == "get_attr" and root is not None:
            sub = getattr(root, str(arg.target), None)
            graph = getattr(sub, "graph", None)
            if graph is not None and any(n.op == "call_function" and (n.target in _TRIG or _subgraph_has_trig(n))
                                         for n in graph.nodes):
                return True
    return False


def _scaled_residual(x: Node, y: Node, index) -> str | None:
    """`c * s + f(s)` with c != 1: the stream is scaled before it is added to (a decaying stream)."""
    for scaled, other in ((x, y), (y, x)):
        sc = scale_of(scaled)
        if sc is None:
            continue
        s, c = sc
        root = alias_root(s)
        if root in ancestors_after(other, index[root], index):
            return (f"scaled residual: the stream ({s.name}) is multiplied by {c:g} before the add ({describe_node(scaled)}), "
                    "so each link decays the stream; block sums would not be its value, so it is not converted")
    return None


def _independent_reason(x: Node, y: Node, index) -> str:
    """Why an add of two values that do not depend on each other is not residual."""
    scaled = _scaled_residual(x, y, index)
    if scaled is not None:
        return scaled

    def mul(n):
        return n.op == "call_function" and n.target in (torch.ops.aten.mul.Tensor,)
    if mul(x) and mul(y) and any(_from_trig_table(o) for n in (x, y) for o in n.all_input_nodes):
        for p in x.all_input_nodes:
            for r in y.all_input_nodes:
                if p is not r and p in ancestors_after(r, index[p], index):
                    return "rotary position embedding (x * cos + rotate_half(x) * sin), not a residual add"
    return "operands are independent (no residual dependence, e.g. a sum of branches or of embeddings)"


def _try_parallel(node: Node, x: Node, y: Node, links_by_add: dict[Node, Link], index) -> Link | None:
    """`(a + f(a)) + g(a)`: two branches reading one stream, added in one step (SPEC section 5)."""
    for inner, other in ((x, y), (y, x)):
        link = links_by_add.get(inner)
        if link is None or len(inner.users) != 1:
            continue
        anc = ancestors_after(other, index[link.root], index)
        if link.root not in anc or inner in anc:
            continue
        region = set(descendants_within(alias_closure(link.root), anc, index))
        if not any(n.op == "call_function" and n.target in WEIGHT_OPS for n in region):
            continue
        return Link(
            add=node, stream=link.stream, root=link.root, branches=[*link.branches, other],
            region=link.region | region, absorbed=[*link.absorbed, inner],
        )
    return None


def find_links(graph: Graph, index: dict[Node, int]):
    links: dict[Node, Link] = {}
    left: dict[Node, str] = {}
    for node in graph.nodes:
        if node.op != "call_function" or not (node.target in ADD_OPS or node.target in INPLACE_ADD_OPS):
            continue
        res = _classify_add(node, index)
        if isinstance(res, Link):
            links[node] = res
            continue
        if isinstance(res, tuple):
            _, x, y = res
            merged = _try_parallel(node, x, y, links, index)
            if merged is not None:
                for inner in merged.absorbed:
                    links.pop(inner, None)
                links[node] = merged
                continue
            res = _independent_reason(x, y, index)
        left[node] = res
    return links, left
