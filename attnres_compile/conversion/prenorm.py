"""Is a use of the residual stream PreNorm? A homogeneity-degree analysis.

Zero-initialised depth attention hands every consumer the stream divided by its source count
(SPEC section 2). A consumer computes the same function iff it is invariant to a positive
scale of the stream, which holds when every path from the stream first passes through a
scale-invariant norm (LayerNorm, RMSNorm, GroupNorm, or their decompositions).

Rather than pattern-match each norm's decomposition, we propagate the *degree* of
homogeneity in the stream: a value v(x) has degree k if v(c*x) = c^k v(x) for c > 0.
The stream has degree 1, `pow(x, 2)` degree 2, `mean` keeps it, `rsqrt` halves and negates
it, `x * rsqrt(mean(x^2) + eps)` lands on degree 0: normalized. Anything non-homogeneous
(a linear with bias, an activation, a bias add) reached before degree 0 breaks PreNorm, and
we report that node. The eps added to a statistic is accepted ("up to the norm's eps").
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch.fx import Node

from .graph_utils import METADATA_ARGS, METADATA_ONLY, _overloads, aten, is_guard

NORM_OPS = {
    # op overload -> (index of the eps argument, default eps)
    aten.layer_norm.default: (4, 1e-5),
    aten.native_layer_norm.default: (4, 1e-5),
    aten.rms_norm.default: (3, None),
    aten.group_norm.default: (4, 1e-5),
    aten.native_group_norm.default: (7, 1e-5),
}
if hasattr(aten, "_fused_rms_norm"):
    NORM_OPS[aten._fused_rms_norm.default] = (3, None)

# degree(out) = degree(first input)
_SAME_DEGREE = _overloads(
    aten.to, aten._to_copy, aten.type_as, aten.view, aten.reshape, aten._unsafe_view,
    aten.contiguous, aten.clone, aten.alias, aten.flatten, aten.unflatten, aten.expand,
    aten.permute, aten.transpose, aten.t, aten.slice, aten.select, aten.unsqueeze,
    aten.squeeze, aten.neg, aten.abs, aten.dropout, aten.native_dropout, aten.feature_dropout,
    aten.alpha_dropout, aten.lift_fresh_copy, aten.detach, aten.repeat, aten.narrow,
    aten.split, aten.chunk, aten.unbind, aten.split_with_sizes,
)
_REDUCTIONS_SAME = _overloads(aten.mean, aten.sum, aten.amax, aten.amin, aten.std, aten.linalg_vector_norm, aten.norm)
_VARIANCE = _overloads(aten.var)
_VAR_MEAN = _overloads(aten.var_mean)
_MUL = _overloads(aten.mul)
_DIV = _overloads(aten.div)
_ADD_SUB = _overloads(aten.add, aten.sub)
_POW = _overloads(aten.pow)
_RSQRT = _overloads(aten.rsqrt)
_SQRT = _overloads(aten.sqrt)
_RECIPROCAL = _overloads(aten.reciprocal)
_SQUARE = _overloads(aten.square)
_TUPLE_NORMS = {aten.native_layer_norm.default, aten.native_group_norm.default}


@dataclass
class DegreeResult:
    ok: bool
    offending: Node | None = None  # first node that breaks scale invariance
    norm: Node | None = None        # first norm (or normalising node) met
    eps: float | None = None        # eps read off that norm, when readable
    leak: Node | None = None        # a node of non-zero degree that escapes (output or target)


class _Break(Exception):
    def __init__(self, node: Node):
        self.node = node


def _is_small_constant(arg) -> bool:
    if isinstance(arg, (int, float)):
        return True
    if isinstance(arg, Node):
        val = arg.meta.get("val")
        return isinstance(val, torch.Tensor) and val.numel() == 1
    return False


def _const_value(arg):
    return float(arg) if isinstance(arg, (int, float)) else None


class DegreeAnalysis:
    """Propagates homogeneity degrees from a stream through a set of nodes."""

    def __init__(self, stream_aliases: list[Node]):
        self.deg: dict[Node, Fraction | tuple] = {a: Fraction(1) for a in stream_aliases}
        self.reduced: set[Node] = set()
        self.norm: Node | None = None
        self.eps: float | None = None

    def degree(self, n) -> Fraction | None:
        if not isinstance(n, Node) or n not in self.deg:
            return None
        d = self.deg[n]
        return d if isinstance(d, Fraction) else None

    def _note_norm(self, node: Node, eps):
        if self.norm is None:
            self.norm = node
            self.eps = eps

    def visit(self, node: Node) -> None:
        """Assign node's degree from its inputs, or raise _Break."""
        dep_inputs = [i for i in node.all_input_nodes if i in self.deg]
        if not dep_inputs:
            return
        if all(self.deg[i] == Fraction(0) for i in dep_inputs):
            self.deg[node] = Fraction(0)
            return
        t = node.target
        if t in METADATA_ONLY or is_guard(node):
            return  # shapes and dtype asserts do not see the stream's scale
        args = node.args
        meta = METADATA_ARGS.get(t) if node.op == "call_function" else None
        if meta is not None:  # `y.type_as(x)`, `zeros_like(x)`: x's dtype/shape only
            values = [a for i, a in enumerate(args) if i not in meta and isinstance(a, Node)]
            values += [v for v in node.kwargs.values() if isinstance(v, Node)]
            dep = [v for v in values if v in self.deg]
            if not dep:
                return  # independent of the stream's values
            if len(dep) == 1 and dep[0] is args[0] and self.degree(args[0]) is not None:
                self.deg[node] = self.degree(args[0])  # a cast of the value argument
                self._inherit_reduced(node, args[0])
                return
            raise _Break(node)
        d0 = self.degree(args[0]) if args else None

        if node.op == "call_function" and t is operator.getitem:
            src = args[0]
            val = self.deg.get(src)
            if isinstance(val, tuple):
                self.deg[node] = val[args[1]]
                if src in self.reduced:
                    self.reduced.add(node)
                return
            if isinstance(val, Fraction):  # getitem of split/chunk output list
                self.deg[node] = val
                return
            raise _Break(node)

        if node.op != "call_function":
            raise _Break(node)

        if t in NORM_OPS:
            if d0 is None or d0 == 0:
                raise _Break(node)
            if any(i in self.deg and self.deg[i] != 0 for i in node.all_input_nodes if i is not args[0]):
                raise _Break(node)
            idx, default = NORM_OPS[t]
            eps = args[idx] if len(args) > idx else node.kwargs.get("eps", default)
            if eps is None and t is aten.rms_norm.default:
                val = args[0].meta.get("val")
                eps = torch.finfo(val.dtype).eps if isinstance(val, torch.Tensor) else None
            self._note_norm(node, eps)
            if t in _TUPLE_NORMS:
                # (out, mean, rstd): out is normalized; mean ~ x, rstd ~ 1/x
                self.deg[node] = (Fraction(0), d0, -d0)
                self.reduced.add(node)
            else:
                self.deg[node] = Fraction(0)
            return

        if t in _SAME_DEGREE and d0 is not None:
            if any(i in self.deg for i in node.all_input_nodes if i is not args[0]):
                raise _Break(node)
            self.deg[node] = d0
            if args[0] in self.reduced:
                self.reduced.add(node)
            return

        if t in _REDUCTIONS_SAME and d0 is not None:
            self.deg[node] = d0
            self.reduced.add(node)
            return
        if t in _VARIANCE and d0 is not None:
            self.deg[node] = 2 * d0
            self.reduced.add(node)
            return
        if t in _VAR_MEAN and d0 is not None:
            self.deg[node] = (2 * d0, d0)
            self.reduced.add(node)
            return
        if t in _SQUARE and d0 is not None:
            self.deg[node] = 2 * d0
            self._inherit_reduced(node, args[0])
            return
        if t in _POW and d0 is not None and isinstance(args[1], (int, float)):
            self.deg[node] = d0 * Fraction(args[1]).limit_denominator(64)
            self._inherit_reduced(node, args[0])
            return
        if t in _RSQRT and d0 is not None:
            self.deg[node] = -d0 / 2
            self._inherit_reduced(node, args[0])
            return
        if t in _SQRT and d0 is not None:
            self.deg[node] = d0 / 2
            self._inherit_reduced(node, args[0])
            return
        if t in _RECIPROCAL and d0 is not None:
            self.deg[node] = -d0
            self._inherit_reduced(node, args[0])
            return
        if t in _MUL or t in _DIV:
            a, b = args[0], args[1]
            da, db = self._deg_or_const(a), self._deg_or_const(b)
            if da is None or db is None:
                raise _Break(node)
            out = da + db if t in _MUL else da - db
            self.deg[node] = out
            if out == 0 and self.norm is None:
                self._note_norm(node, self.eps)
            if any(isinstance(x, Node) and x in self.reduced for x in (a, b)) and out != 0:
                self.reduced.add(node)
            return
        if t in _ADD_SUB:
            a, b = args[0], args[1]
            alpha = node.kwargs.get("alpha", 1)
            da, db = self.degree(a), self.degree(b)
            if da is not None and db is not None:
                if da != db:
                    raise _Break(node)
                self.deg[node] = da
                if a in self.reduced and b in self.reduced:
                    self.reduced.add(node)
                return
            # one side is stream-independent: only an eps added to a statistic keeps invariance
            dep, other = (a, b) if da is not None else (b, a)
            if dep in self.reduced and _is_small_constant(other):
                self.deg[node] = self.degree(dep)
                self.reduced.add(node)
                const = _const_value(other)
                if const is not None and self.eps is None:
                    self.eps = abs(const * alpha)
                return
            raise _Break(node)
        raise _Break(node)

    def _inherit_reduced(self, node, src):
        if src in self.reduced:
            self.reduced.add(node)

    def _deg_or_const(self, arg):
        if isinstance(arg, Node):
            if arg in self.deg:
                d = self.deg[arg]
                return d if isinstance(d, Fraction) else None
            return Fraction(0)  # stream-independent tensor (a weight): degree 0
        return Fraction(0)      # python scalar


def _propagate(stream_aliases: list[Node], nodes: list[Node], check) -> DegreeResult:
    """Degrees from `stream_aliases` through `nodes` (graph order); `check(an, node)` returns a
    failing DegreeResult for a node (an output node, a target) or None."""
    an = DegreeAnalysis(stream_aliases)
    members = set(stream_aliases)
    try:
        for n in nodes:
            if n in members:
                continue
            if n.op == "output":
                found = check(an, n)
                if found is not None:
                    return found
                continue
            an.visit(n)
    except _Break as br:
        return DegreeResult(False, offending=br.node, norm=an.norm, eps=an.eps)
    return check(an, None) or DegreeResult(True, norm=an.norm, eps=an.eps)


def _leak(an: DegreeAnalysis, nodes) -> DegreeResult | None:
    """The first of `nodes` the stream reaches un-normalized (degree not 0), as a failure."""
    for t in nodes:
        d = an.deg.get(t)
        if d is not None and d != Fraction(0):
            return DegreeResult(False, leak=t, norm=an.norm, eps=an.eps)
    return None


def analyse(stream_aliases: list[Node], nodes: list[Node], targets: list[Node]) -> DegreeResult:
    """Propagate degrees from `stream_aliases` through `nodes` (graph order).

    PreNorm holds when nothing breaks and every node of `targets` (branch output or graph
    outputs) that depends on the stream has degree 0.
    """
    return _propagate(stream_aliases, nodes, lambda an, n: _leak(an, targets) if n is None else None)


def output_leaks(stream_aliases: list[Node], closure: list[Node]) -> DegreeResult:
    """Forward analysis to the graph outputs: the stream must reach them only normalized."""
    return _propagate(stream_aliases, closure, lambda an, n: None if n is None else _leak(an, n.all_input_nodes))
