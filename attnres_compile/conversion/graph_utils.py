"""Small helpers over captured ATen graphs: op classes, node metadata, ancestry.

Everything here reads a graph; nothing mutates it.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable

import torch
from torch.fx import Node

aten = torch.ops.aten


def _overloads(*packets) -> frozenset:
    """All overloads of the given op packets (so `aten.view` covers view.default, view.dtype...)."""
    out = set()
    for packet in packets:
        for name in packet.overloads():
            out.add(getattr(packet, name))
    return frozenset(out)


# Ops that make a sublayer a sublayer: a residual branch must hold one of them (SPEC section 5).
WEIGHT_OPS = _overloads(
    aten.linear, aten.addmm, aten.mm, aten.bmm, aten.baddbmm, aten.matmul, aten.einsum,
    aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution,
    aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
    aten.scaled_dot_product_attention,
)

# Convolutions read channels-first tensors: [N, C, *spatial].
CONV_OPS = _overloads(
    aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution,
    aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
)

# Ops that return their input's value unchanged when shape and dtype are unchanged.
IDENTITY_WHEN_SAME_META = _overloads(
    aten.to, aten._to_copy, aten.view, aten.reshape, aten._unsafe_view, aten.contiguous,
    aten.clone, aten.alias, aten.type_as, aten.flatten, aten.lift_fresh_copy,
)

CASTS = _overloads(aten.to, aten._to_copy, aten.type_as)

# Identity ops that always return fresh storage: a clone is the same *value*, not the same tensor.
COPY_OPS = _overloads(aten.clone, aten._to_copy, aten.lift_fresh_copy)

METADATA_ONLY = _overloads(
    aten._assert_tensor_metadata, aten.sym_size, aten.sym_stride, aten.sym_numel,
    aten.sym_storage_offset,
)

# Ops that read some tensor arguments for their metadata only (dtype, shape, device): the
# position of those arguments. `y.type_as(x)` does not read x's values, nor `zeros_like(x)`.
METADATA_ARGS = {
    **{op: frozenset({1}) for op in _overloads(aten.type_as)},
    **{op: frozenset({0}) for op in _overloads(
        aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like,
        aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided)},
}


def is_guard(node: Node) -> bool:
    """torch.export's `_guards_fn` call: checks input shapes, reads no values."""
    return node.op == "call_module" and str(node.target) == "_guards_fn"


def reads_values(user: Node, node: Node) -> bool:
    """Whether `user` reads the values of `node` (not only its dtype, shape or device)."""
    if is_guard(user) or (user.op == "call_function" and user.target in METADATA_ONLY):
        return False
    positions = METADATA_ARGS.get(user.target) if user.op == "call_function" else None
    if positions is None:
        return True
    return (any(a is node for i, a in enumerate(user.args) if i not in positions)
            or any(v is node for v in user.kwargs.values()))


ADD_OPS = _overloads(aten.add)
INPLACE_ADD_OPS = frozenset({aten.add_.Tensor, aten.add_.Scalar})


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor recorded for `node` by torch.export, or None."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def static_int(x) -> int | None:
    """`x` as an int when it is one, or a SymInt export specialised to a constant; else None."""
    if isinstance(x, int):
        return x
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(x) if is_concrete_int(x) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dim() != b.dim():
        return False
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif str(x) != str(y):
            return False
    return True


def same_meta(a: Node, b: Node) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    return ta is not None and tb is not None and ta.dtype == tb.dtype and same_shape(ta, tb)


def _arg(node: Node, i: int, name: str):
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


def _schema(node: Node):
    t = node.target
    return t._schema if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) else None


def written_inputs(node: Node) -> list[Node]:
    """Inputs `node` modifies in place (`Tensor(a!)` in its schema: add_, copy_, index_put_...)."""
    schema = _schema(node)
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = _arg(node, i, a.name)
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, Node):
                    out.append(x)
    return out


def storage_inputs(node: Node) -> list[Node]:
    """Inputs whose storage `node`'s output may share (views, no-op casts), from the schema."""
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:  # an element of a list of views (split, unbind)
        return [node.args[0]] if isinstance(node.args[0], Node) else []
    schema = _schema(node)
    if schema is None:
        return []
    sets = set()
    for r in schema.returns:
        if r.alias_info is not None and not r.alias_info.is_write:
            sets |= set(r.alias_info.before_set) | set(r.alias_info.after_set)
    if not sets:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and set(a.alias_info.before_set) & sets:
            v = _arg(node, i, a.name)
            if isinstance(v, Node):
                out.append(v)
    return out


def mutation_of(node: Node) -> Node | None:
    """The first node that modifies `node`'s storage in place (directly or through a view), or None."""
    seen = {node}
    queue = deque([node])
    while queue:
        cur = queue.popleft()
        for u in cur.users:
            if cur in written_inputs(u):
                return u
            if u not in seen and cur in storage_inputs(u):
                seen.add(u)
                queue.append(u)
    return None


def is_identity_alias(node: Node) -> bool:
    """True if `node` is a cast/view that leaves its first input's value untouched.

    A copy (clone, _to_copy) that is later modified in place is not: its readers must keep a
    private tensor, so the rewrite may not hand them the stream (or a site output) instead.
    """
    if node.op != "call_function":
        return False
    if unit_scale_operand(node) is not None:  # `1.0 * x`, `x / 1`: the plain stream
        src = unit_scale_operand(node)
        return same_meta(node, src) and mutation_of(node) is None
    if node.target not in IDENTITY_WHEN_SAME_META:
        return False
    if not node.args or not isinstance(node.args[0], Node):
        return False
    if not same_meta(node, node.args[0]):
        return False
    return not (node.target in COPY_OPS and mutation_of(node) is not None)


_MUL_OPS = frozenset({aten.mul.Tensor, aten.mul.Scalar})
_DIV_OPS = frozenset({aten.div.Tensor, aten.div.Scalar})


def scale_of(node: Node) -> tuple[Node, float] | None:
    """(x, c) when `node` is `c * x`, `x * c` or `x / (1/c)` with c a Python number, else None."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.target in _MUL_OPS:
        if isinstance(a, Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
            return a, float(b)
        if isinstance(b, Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
            return b, float(a)
    if node.target in _DIV_OPS and isinstance(a, Node) and isinstance(b, (int, float)) and b not in (0, False):
        return a, 1.0 / float(b)
    return None


def unit_scale_operand(node: Node) -> Node | None:
    """x when `node` is `1.0 * x` (or `x * 1`, `x / 1`)."""
    sc = scale_of(node)
    return sc[0] if sc is not None and sc[1] == 1.0 else None


LAYOUT_VIEWS = _overloads(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)


def _statically_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an expression the shape env cannot decide
        return False


def is_layout_alias(node: Node) -> bool:
    """True if `node` reshapes a stream's tokens without touching any token's features: a view,
    reshape, flatten or unflatten that keeps the last (feature) dim and merges or splits the
    leading (token) dims, so each token's features stay together and in order (`h.reshape(-1, D)`
    around an MLP, and `.view(B, T, D)` back). A view that mixes tokens into features changes
    the last dim and is not one."""
    if node.op != "call_function" or node.target not in LAYOUT_VIEWS:
        return False
    if not node.args or not isinstance(node.args[0], Node):
        return False
    out, src = tensor_meta(node), tensor_meta(node.args[0])
    if out is None or src is None or out.dim() < 1 or src.dim() < 1 or out.dtype != src.dtype:
        return False
    if same_shape(out, src):
        return False  # an identity alias, handled by is_identity_alias
    last_out, last_src = static_int(out.shape[-1]), static_int(src.shape[-1])
    if last_out is None or last_out != last_src:
        return False
    return _statically_equal(out.numel(), src.numel()) and mutation_of(node) is None


def is_stream_alias(node: Node) -> bool:
    """An identity cast/view, or a layout view of the tokens (`is_layout_alias`)."""
    return is_identity_alias(node) or is_layout_alias(node)


def alias_root(node: Node) -> Node:
    """Walk back through identity casts/views and token reshapes to the node that really
    produced the value."""
    while is_stream_alias(node):
        node = alias_source(node)
    return node


def alias_source(node: Node) -> Node:
    """The input an identity alias (`is_identity_alias`) passes on."""
    return unit_scale_operand(node) or node.args[0]


def alias_closure(node: Node) -> list[Node]:
    """`node` and every identity cast/view or token reshape of it (transitively), in graph order."""
    seen = [node]
    queue = deque([node])
    members = {node}
    while queue:
        cur = queue.popleft()
        for user in cur.users:
            if user not in members and is_stream_alias(user) and alias_source(user) is cur:
                members.add(user)
                seen.append(user)
                queue.append(user)
    return seen


def source_line(node: Node) -> str:
    """Where `node` came from in the user's code: 'file.py:12 in forward: <code>', or ''.

    Takes the innermost frame outside torch itself, so a LayerNorm reports the model line
    that called it rather than torch/nn/functional.py.
    """
    trace = node.meta.get("stack_trace") or ""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    frames = []
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith("File "):
            frames.append((s, lines[i + 1].strip() if i + 1 < len(lines) else ""))
    if not frames:
        return ""
    user = [f for f in frames if "/torch/" not in f[0]]
    location, code = (user or frames)[-1]
    try:
        _, path, rest = location.split('"', 2)
        lineno = rest.split("line", 1)[1].split(",")[0].strip()
        func = rest.split(" in ")[-1].strip()
        short = "/".join(path.split("/")[-2:])
        location = f"{short}:{lineno} in {func}"
    except (IndexError, ValueError):
        pass
    return f"{location}: {code}" if code else location


def module_path(node: Node) -> str:
    """Dotted path of the innermost module that produced `node` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_path(path)


def common_module_path(nodes: Iterable[Node]) -> str:
    """Longest common module path of nodes (the sublayer a branch lives in)."""
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    prefix = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    return ".".join(prefix)


def _clean_path(path: str) -> str:
    # torch.export records paths like "L['self'].layers[0].mlp" or "layers.0.mlp"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        part = part.strip("'\"")
        if part:
            out.append(part)
    return ".".join(out)


def node_index(graph: torch.fx.Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def ancestors_after(target: Node, floor: int, index: dict[Node, int]) -> set[Node]:
    """Ancestors of `target` (inclusive) whose graph position is >= floor.

    Pruning at `floor` keeps each query local to one sublayer, so analysing a chain is linear
    in graph size rather than quadratic.
    """
    seen = {target}
    queue = deque([target])
    while queue:
        cur = queue.popleft()
        for inp in cur.all_input_nodes:
            if inp not in seen and index[inp] >= floor:
                seen.add(inp)
                queue.append(inp)
    return seen


def descendants_within(sources: Iterable[Node], allowed: set[Node], index: dict[Node, int]) -> list[Node]:
    """Nodes of `allowed` that depend on any of `sources`, in graph order (sources excluded)."""
    src = set(sources)
    dep: set[Node] = set(src)
    out = []
    for n in sorted(allowed, key=index.__getitem__):
        if n in src:
            continue
        if any(i in dep for i in n.all_input_nodes):
            dep.add(n)
            out.append(n)
    return out


def forward_closure(starts: Iterable[Node], index: dict[Node, int]) -> list[Node]:
    """All descendants of `starts` (inclusive), in graph order."""
    seen = set()
    queue = deque(starts)
    while queue:
        cur = queue.popleft()
        if cur in seen:
            continue
        seen.add(cur)
        queue.extend(cur.users)
    return sorted(seen, key=index.__getitem__)


def call_site(node: Node) -> tuple[str, int, str, str] | None:
    """(file, line, function, code) of the innermost frame that ran `node`'s op, or None.

    Unlike `source_line`, torch's own files count: an add inside `nn.TransformerEncoderLayer`
    runs in torch/nn/modules/transformer.py, and that frame is where a converted model meets
    it again at call time (runtime/ matches residual adds by this location).
    """
    trace = node.meta.get("stack_trace") or ""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        s = lines[i].strip()
        if not s.startswith('File "'):
            continue
        try:
            _, path, rest = s.split('"', 2)
            lineno = int(rest.split("line", 1)[1].split(",")[0].strip())
            func = rest.split(" in ")[-1].strip()
        except (IndexError, ValueError):
            return None
        code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith('File "') else ""
        return path, lineno, func, code
    return None
