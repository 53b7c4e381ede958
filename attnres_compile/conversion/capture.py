"""Capture: trace a model into an ATen graph with torch.export (non-strict).

Non-strict export is the capture that works on Hugging Face models today (SPEC section 5);
`torch.fx.symbolic_trace` does not. Every batch and sequence dimension is captured as
`Dim.AUTO`, so converted models accept other sizes whenever the model allows it.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from ..ops.adds import ADD_FUNCS


@dataclass
class Captured:
    module: GraphModule         # unlifted graph module (parameters as attributes)
    training: bool
    adds: list = field(default_factory=list)  # AddCall per add the trace ran, in order


@dataclass(frozen=True)
class AddCall:
    """Where one add call ran, as the converted model will see it at call time."""

    file: str
    line: int
    lasti: int         # bytecode offset: a line can hold several adds
    container: str | None  # path of the module whose forward frame (or a caller's) ran it
    checkpointed: str | None = None  # the plain function an activation checkpoint runs it in, if any
    cols: tuple[int, int] | None = None  # the add's column span: Dynamo's frames name it this way


def instruction_columns(code, lasti: int) -> tuple[int, int] | None:
    """(col_offset, end_col_offset) of the instruction at byte offset `lasti` of `code`."""
    try:
        pos = list(code.co_positions())[lasti // 2]
    except (AttributeError, IndexError):
        return None
    return None if pos[2] is None else (pos[2], pos[3])


class _AddRecorder(TorchFunctionMode):
    """Records where each `add` call runs while torch.export traces the model.

    A graph node's stack trace names a line, and the line's text; a line can hold several adds
    (`h = mlp_out + attn_out + h`: the first is no residual add, the second is), and a graph
    module's code runs at other lines than the ones its nodes' traces quote. Non-strict export
    runs the model's Python, so this mode sees each add as it is traced, in graph order;
    `add_calls` pairs the calls with the graph's add nodes.
    """

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self.paths = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
        # torch.export may hand forwards a proxy of a submodule (`_AttrProxy`) that shares the
        # module's __dict__: found by that dict.
        self.dicts = {id(m.__dict__): name for name, m in root.named_modules(remove_duplicate=False)}
        self.adds: list[AddCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ADD_FUNCS:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_name == "__torch_function__":  # export's own mode
                f = f.f_back
            if f is not None:
                container, g = None, f
                for _ in range(8):
                    if g is None:
                        break
                    owner = g.f_locals.get("self")
                    container = self.paths.get(id(owner))
                    if container is None and isinstance(owner, torch.nn.Module):
                        container = self.dicts.get(id(owner.__dict__))
                    if container is not None:
                        break
                    g = g.f_back
                self.adds.append(AddCall(f.f_code.co_filename, f.f_lineno, f.f_lasti, container,
                                         _checkpointed_function(f), instruction_columns(f.f_code, f.f_lasti)))
        return func(*args, **(kwargs or {}))


def _checkpointed_function(f) -> str | None:
    """The function a torch.utils.checkpoint region below frame `f` runs, when it is a plain
    function: the converted model re-enters its mode for a recompute through a module call or
    Hugging Face's layer checkpointing, not through anything else (runtime/)."""
    below = None
    g = f
    for _ in range(64):
        if g is None:
            return None
        if g.f_code.co_filename.endswith("torch/utils/checkpoint.py"):
            break
        below, g = g, g.f_back
    else:
        return None
    if below is None or below.f_code.co_filename.endswith("torch/nn/modules/module.py"):
        return None
    owner = below.f_locals.get("self")
    if below.f_code.co_name == "forward" and hasattr(owner, "_gradient_checkpointing_func"):
        return None  # Hugging Face's GradientCheckpointingLayer
    return f"{below.f_code.co_filename}:{below.f_code.co_firstlineno} in {below.f_code.co_name}"


def add_calls(graph, adds: list[AddCall]) -> dict:
    """{add node: AddCall}: the recorded calls paired with the graph's add nodes, in order.

    Every add call makes one add node, so when the counts agree they pair in order. Otherwise
    (an op that adds inside a decomposition) they pair line by line where a line's counts agree.
    """
    from .graph_utils import ADD_OPS, INPLACE_ADD_OPS, call_site

    nodes = [n for n in graph.nodes
             if n.op == "call_function" and (n.target in ADD_OPS or n.target in INPLACE_ADD_OPS)]
    if len(nodes) == len(adds):
        return dict(zip(nodes, adds))
    by_line: dict[tuple[str, int], list[AddCall]] = {}
    for a in adds:
        by_line.setdefault((a.file, a.line), []).append(a)
    by_node_line: dict[tuple[str, int], list] = {}
    for n in nodes:
        site = call_site(n)
        if site is not None:
            by_node_line.setdefault((site[0], site[1]), []).append(n)
    out = {}
    for key, ns in by_node_line.items():
        rec = by_line.get(key, [])
        if len(rec) == len(ns):
            out.update(zip(ns, rec))
    return out


def normalize_inputs(example_inputs, kwargs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            "example_inputs must be a tuple of positional arguments for the model's forward "
            f"(or a single tensor), got {type(example_inputs).__name__}"
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    return example_inputs, dict(kwargs)


def without_cache(model, kwargs: dict | None) -> dict:
    """`use_cache=False` where forward takes `use_cache` and the caller did not say: a cache in
    the outputs is no residual stream, and a full-sequence capture or export has no cache."""
    kwargs = dict(kwargs or {})
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _auto_dims(model, args: tuple, kwargs: dict):
    """One Dim.AUTO per dimension of every tensor input (export specialises what it must).

    Keyed like torch.export binds the inputs to `forward`'s signature (so `*args` forwards,
    e.g. Dynamo graph modules, get one entry for the whole tuple).
    """

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())} if x.dim() else None
        return None

    try:
        from torch.export.dynamic_shapes import _combine_args

        combined = _combine_args(model, args, kwargs)
        return {name: pytree.tree_map(spec, value) for name, value in combined.items()}
    except (ImportError, TypeError):
        return tuple(pytree.tree_map(spec, a) for a in args) + tuple(
            pytree.tree_map(spec, v) for v in kwargs.values()
        )


def _name_var_keywords(model, kwargs: dict) -> None:
    """Give keyword arguments that land in `forward(**kwargs)` a named parameter each.

    torch.export (2.13) builds the dynamic-shapes tree of a `**kwargs` forward in two
    incompatible layouts (`_check_dynamic_shapes` wants the bound `kwargs` dict,
    `_get_range_constraints` the flat keyword names), so e.g. Hugging Face's
    `output_hidden_states=True` cannot be exported with any `dynamic_shapes`. On our private
    copy we install a forward whose signature names those keywords explicitly; it calls the
    model's own forward unchanged.
    """
    forward = model.forward
    forward = getattr(forward, "_attnres_wrapped", forward)
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    extra = [k for k in kwargs if k not in sig.parameters]
    if not extra:
        return
    named = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    named += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]

    def named_forward(*args, **kw):
        return forward(*args, **kw)

    named_forward.__signature__ = inspect.Signature(named)
    named_forward._attnres_wrapped = forward
    model.forward = named_forward


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and this package: where the model failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    cause = exc.__cause__ or exc.__context__
    while cause is not None and cause.__traceback__ is not None:
        frames += traceback.extract_tb(cause.__traceback__)
        cause = cause.__cause__ or cause.__context__
    user = [f for f in frames if "/torch/" not in f.filename and "attnres_compile" not in f.filename]
    if not user:
        return ""
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _user_line_from_message(msg: str) -> str:
    # torch.export errors quote the user's code as 'File "...", line N, in fn' + code line
    lines = msg.splitlines()
    best = ""
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith('File "') and "/torch/" not in s:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            best = f"{s} :: {code}" if code else s
    return best


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, *, training: bool,
            dynamic: bool = True, copy_model: bool = True) -> Captured:
    """Export `model` in train or eval mode to an unlifted GraphModule.

    With copy_model=False the caller passes its own private copy, whose mode is changed.
    """
    if copy_model:
        model = copy.deepcopy(model)
    model.train(training)
    if dynamic:
        _name_var_keywords(model, kwargs)
    dynamic_shapes = _auto_dims(model, args, kwargs) if dynamic else None
    recorder = _AddRecorder(model)
    try:
        with recorder:
            ep = torch.export.export(model, args, kwargs=kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # export raises many types; the user needs one clear message
        raise _capture_error(model, exc) from exc
    return Captured(ep.module(), training, recorder.adds)


def _capture_error(model, exc: BaseException) -> CaptureError:
    name = type(model).__name__
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    # torch's symbolic-shape messages append "(unhinted: ...)" / "(Size-like symbols: ...)"
    # internals after the condition; the user needs the condition only.
    first = re.sub(r"\s*\((?:unhinted|Size-like symbols)(?:[^()]|\([^()]*\))*\)\.?", "", first).strip()
    where = _user_line_from_message(str(exc)) or _user_frame(exc)
    kind = type(exc).__name__
    data_dependent = any(
        key in str(exc) for key in ("data-dependent", "Could not guard on data-dependent", "GuardOnDataDependent")
    ) or "DataDependent" in kind
    if data_dependent:
        hint = ("the model has data-dependent control flow (Python branching on tensor values), "
                "which torch.export cannot capture; rewrite it with torch.cond or move it out of forward")
    elif isinstance(exc, (TypeError, ValueError, RuntimeError, IndexError, AttributeError)) and "/torch/" not in where:
        hint = "the model raised while running on example_inputs; check that they match its forward()"
    else:
        hint = "torch.export (non-strict) could not trace the model"
    msg = f"cannot capture {name}: {hint}.\n  {kind}: {first}"
    if where:
        msg += f"\n  at {where}"
    return CaptureError(msg)


def restore_forward(model) -> None:
    """Undo capture's keyword-naming forward on the private copy a conversion captured."""
    fwd = model.__dict__.get("forward")
    if fwd is not None and hasattr(fwd, "_attnres_wrapped"):
        del model.forward
