"""Install a plan into the code: recompile a planned function with its residual adds replaced.

The plan names each residual add by file, line and column span (the span Python's own
`co_positions` gives the add instruction). For the function that runs it (a method of the
module that holds the add), this module parses the function's source, replaces exactly those
add expressions with a call into the runtime and compiles the result with the function's own
globals, closure cells, defaults and line numbers:

    hidden_states = residual + hidden_states
    ->  hidden_states = __attnres_link__(KEY, residual, hidden_states, BINOP)

Everything else of the function is its own code, so an unplanned op costs what it costs in the
original (no torch function mode watches it), and Dynamo, torch.export and ONNX trace the
recompiled function as ordinary Python. `__attnres_link__` is a closure cell of each installed
copy: one compiled code object per function and plan, one function object per module instance
(`link_function`). Decorators that wrap the function (`functools.wraps` closures, as
transformers' `deprecate_kwarg`) are rebuilt around the new function with the same closure.

What cannot be rewritten (no source, an add this parser cannot find at its recorded span, a
function that is not the module's own method, a wrapper that does not hold its function in a
closure) raises `CannotRewrite` with the reason; the runtime then watches that chain with a
torch function mode instead (runtime/mode.py) and the report says so.
"""

from __future__ import annotations

import __future__ as _future
import ast
import copy
import linecache
import threading
import types

LINK_NAME = "__attnres_link__"

# Kinds of add expression: how the runtime falls back to the plain op when the add is not a link.
BINOP, IADD, CALL, METHOD, METHOD_INPLACE = 0, 1, 2, 3, 4
_ADD_METHODS = {"add": METHOD, "__add__": METHOD, "add_": METHOD_INPLACE, "__iadd__": METHOD_INPLACE}


class CannotRewrite(Exception):
    """A planned add whose function cannot be recompiled (the reason is the message)."""


Position = tuple  # (file, line, col_offset, end_col_offset)


def plain_add(kind: int, a, b, fn=None):
    """The original expression, for a call of the link that is not a planned residual add."""
    if kind == BINOP:
        return a + b
    if kind == IADD:
        a += b
        return a
    if kind == CALL:
        return fn(a, b)
    if kind == METHOD:
        return fn(b)
    return fn(b)  # METHOD_INPLACE: `a.add_` bound, called with b


# -- finding the function ----------------------------------------------------------------------

def _code_lines(code: types.CodeType) -> set[int]:
    return {ln for _, _, ln in code.co_lines() if ln is not None}


def _unwrap_chain(attr) -> list:
    """`attr` and the functions it wraps (`__wrapped__`), outermost first."""
    chain, seen = [], set()
    f = attr
    while f is not None and id(f) not in seen:
        seen.add(id(f))
        chain.append(f)
        f = getattr(f, "__wrapped__", None)
    return chain


def find_method(cls: type, file: str, line: int) -> tuple[str, list] | None:
    """(attribute name, wrapper chain ending at the function) of the method of `cls` (its MRO)
    whose own code runs `file:line`; only a method that `cls` resolves that name to counts (a
    base method reached through `super()` would be shadowed by an instance attribute)."""
    for klass in cls.__mro__:
        for name, attr in vars(klass).items():
            if isinstance(attr, (staticmethod, classmethod, property)) or not callable(attr):
                continue
            chain = _unwrap_chain(attr)
            for f in chain:
                code = getattr(f, "__code__", None)
                if isinstance(code, types.CodeType) and code.co_filename == file and line in _code_lines(code):
                    if getattr(cls, name, None) is not attr:
                        raise CannotRewrite(f"{klass.__name__}.{name} runs it, but {cls.__name__}.{name} is "
                                            "another method (it calls the base one through super())")
                    if not isinstance(f, types.FunctionType):
                        raise CannotRewrite(f"{name} is not a plain Python function")
                    return name, chain[: chain.index(f) + 1]
    return None


# -- parsing and replacing -------------------------------------------------------------------

_TREES: dict[tuple[str, int], ast.Module] = {}
_LOCK = threading.Lock()


def _module_tree(file: str, glob: dict) -> ast.Module:
    lines = linecache.getlines(file, glob)
    if not lines:
        raise CannotRewrite(f"the source of {file} is not available")
    key = (file, hash("".join(lines)))
    tree = _TREES.get(key)
    if tree is None:
        try:
            tree = ast.parse("".join(lines), filename=file)
        except SyntaxError as exc:
            raise CannotRewrite(f"{file} does not parse: {exc}") from exc
        _TREES[key] = tree
    return tree


def _function_node(tree: ast.Module, code: types.CodeType):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            if first == code.co_firstlineno or node.lineno == code.co_firstlineno:
                return node
    raise CannotRewrite(f"the definition of {code.co_name} (line {code.co_firstlineno}) is not in its source")


class _Replace(ast.NodeTransformer):
    """Replaces the add expressions at the planned spans of one function (not nested ones)."""

    def __init__(self, spans: dict[tuple[int, int, int], Position], root):
        self.spans, self.root, self.done = spans, root, set()

    def _span(self, node):
        return node.lineno, node.col_offset, node.end_col_offset

    def _link(self, node, key, a, b, kind, fn=None):
        args = [ast.Constant(key), a, b, ast.Constant(kind)] + ([fn] if fn is not None else [])
        call = ast.Call(func=ast.Name(LINK_NAME, ast.Load()), args=args, keywords=[])
        return ast.copy_location(call, node)

    def visit_FunctionDef(self, node):
        return self.generic_visit(node) if node is self.root else node  # nested defs are other code

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        return node

    def visit_ClassDef(self, node):
        return node

    def visit_BinOp(self, node):
        node = self.generic_visit(node)
        key = self.spans.get(self._span(node))
        if key is None or not isinstance(node.op, ast.Add):
            return node
        self.done.add(key)
        return self._link(node, key, node.left, node.right, BINOP)

    def visit_AugAssign(self, node):
        node = self.generic_visit(node)
        key = self.spans.get(self._span(node))
        if key is None or not isinstance(node.op, ast.Add):
            return node
        if not isinstance(node.target, ast.Name):
            raise CannotRewrite(f"line {node.lineno}: `+=` on {type(node.target).__name__.lower()} target")
        self.done.add(key)
        value = self._link(node, key, ast.Name(node.target.id, ast.Load()), node.value, IADD)
        return ast.copy_location(ast.Assign(targets=[ast.Name(node.target.id, ast.Store())], value=value), node)

    def visit_Call(self, node):
        node = self.generic_visit(node)
        key = self.spans.get(self._span(node))
        if key is None:
            return node
        f = node.func
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) or not isinstance(f, ast.Attribute):
            raise CannotRewrite(f"line {node.lineno}: an add call with keywords or starred arguments")
        if len(node.args) == 2 and f.attr == "add":  # torch.add(a, b)
            self.done.add(key)
            return self._link(node, key, node.args[0], node.args[1], CALL, f)
        if len(node.args) == 1 and f.attr in _ADD_METHODS:  # a.add(b), a.add_(b)
            self.done.add(key)
            # The bound method `a.add` is passed (a is evaluated once); the runtime reads the
            # tensor from its __self__ and calls it for an add that is not a link.
            args = [ast.Constant(key), ast.Constant(None), node.args[0], ast.Constant(_ADD_METHODS[f.attr]), f]
            call = ast.Call(func=ast.Name(LINK_NAME, ast.Load()), args=args, keywords=[])
            return ast.copy_location(call, node)
        raise CannotRewrite(f"line {node.lineno}: an add call of an unknown form")


_CODES: dict[tuple, types.CodeType] = {}


def planned_code(fn: types.FunctionType, positions: list[Position]) -> types.CodeType:
    """The code of `fn` with the adds at `positions` calling `__attnres_link__` (cached)."""
    code = fn.__code__
    key = (code, tuple(sorted(positions)))
    got = _CODES.get(key)
    if got is not None:
        return got
    with _LOCK:
        got = _CODES.get(key)
        if got is not None:
            return got
        got = _compile(fn, positions)
        _CODES[key] = got
    return got


def _compile(fn: types.FunctionType, positions: list[Position]) -> types.CodeType:
    code = fn.__code__
    for p in positions:
        if p[0] != code.co_filename:
            raise CannotRewrite(f"internal: add at {p} is not in {code.co_filename}")
        if p[2] is None:
            raise CannotRewrite(f"line {p[1]}: its column span is unknown (plan made without it)")
    tree = _module_tree(code.co_filename, fn.__globals__)
    node = copy.deepcopy(_function_node(tree, code))
    node.decorator_list = []
    spans = {(p[1], p[2], p[3]): p for p in positions}
    rep = _Replace(spans, node)
    node = rep.visit(node)
    missing = [p for p in positions if p not in rep.done]
    if missing:
        p = missing[0]
        raise CannotRewrite(f"no add expression at line {p[1]}, columns {p[2]}-{p[3]} of {code.co_name}")
    # Compile inside a function that binds the closure names (so they stay free variables of
    # the new code) and, for a method, inside a class of the same name (so `super()` gets its
    # `__class__` cell and private names mangle as in the original).
    free = [n for n in code.co_freevars if n != "__class__"]
    body: list[ast.stmt] = [node]
    qual = fn.__qualname__.split(".")
    if len(qual) >= 2 and qual[-2] != "<locals>":
        body = [_with_type_params(ast.ClassDef(name=qual[-2], bases=[], keywords=[], body=[node], decorator_list=[]))]
    binds = [ast.Assign(targets=[ast.Name(n, ast.Store())], value=ast.Constant(None)) for n in [LINK_NAME, *free]]
    outer = ast.FunctionDef(name="__attnres_scope__", args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                                                                           kw_defaults=[], defaults=[]),
                            body=[*binds, *body], decorator_list=[], returns=None)
    _with_type_params(outer)
    module = ast.Module(body=[outer], type_ignores=[])
    ast.fix_missing_locations(module)
    flags = code.co_flags & _FUTURE_FLAGS
    compiled = compile(module, code.co_filename, "exec", flags=flags, dont_inherit=True)
    new = _find_code(compiled, code.co_name, node.lineno)
    if new is None:
        raise CannotRewrite(f"internal: recompiled {code.co_name} not found")
    return new


def _with_type_params(node):
    if "type_params" in type(node)._fields:  # Python 3.12+
        node.type_params = []
    return node


_FUTURE_FLAGS = 0
for _name in _future.all_feature_names:
    _FUTURE_FLAGS |= getattr(_future, _name).compiler_flag


def _find_code(code: types.CodeType, name: str, line: int) -> types.CodeType | None:
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            if c.co_name == name and c.co_firstlineno == line:
                return c
            found = _find_code(c, name, line)
            if found is not None:
                return found
    return None


# -- building the installed function ----------------------------------------------------------

def link_function(chain: list, new_code: types.CodeType, link) -> types.FunctionType:
    """The outermost function of `chain` (wrappers ... fn) rebuilt around `fn` with `new_code`,
    `__attnres_link__` bound to `link`."""
    fn = chain[-1]
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    cells[LINK_NAME] = types.CellType(link)
    try:
        closure = tuple(cells[n] for n in new_code.co_freevars)
    except KeyError as exc:
        raise CannotRewrite(f"{fn.__qualname__}: closure name {exc} has no cell") from exc
    new = types.FunctionType(new_code, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    new.__dict__.update(fn.__dict__)
    for attr in ("__qualname__", "__module__", "__doc__", "__annotations__"):
        setattr(new, attr, getattr(fn, attr))
    inner_old, inner_new = fn, new
    for w in reversed(chain[:-1]):
        if not isinstance(w, types.FunctionType) or not w.__closure__:
            raise CannotRewrite(f"the decorator {getattr(w, '__qualname__', w)!r} of {fn.__qualname__} "
                                "does not hold it in a closure")
        cl = list(w.__closure__)
        hit = [i for i, c in enumerate(cl) if _cell_value(c) is inner_old]
        if not hit:
            raise CannotRewrite(f"the decorator {w.__qualname__} of {fn.__qualname__} does not hold it in a closure")
        for i in hit:
            cl[i] = types.CellType(inner_new)
        nw = types.FunctionType(w.__code__, w.__globals__, w.__name__, w.__defaults__, tuple(cl))
        nw.__kwdefaults__ = copy.copy(w.__kwdefaults__)
        nw.__dict__.update(w.__dict__)
        nw.__wrapped__ = inner_new
        for attr in ("__qualname__", "__module__", "__doc__", "__annotations__"):
            setattr(nw, attr, getattr(w, attr))
        inner_old, inner_new = w, nw
    return inner_new


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return None
