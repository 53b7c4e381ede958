"""The fallback interception: a torch function mode, for adds whose code cannot be recompiled.

Most planned adds are installed into their function's code (codegen.py). An add that cannot be
(its function has no source, is not the module's own method, ...) is served as before the code
install existed: while its chain's owner or its container runs, `_LinkMode` sees every torch
call and picks out the planned adds by their caller's code location (file, line and bytecode
offset or column span) and the module (`self`) of that frame or one it was called from. This
costs a Python call per torch op while such a chain runs, so the report names every chain that
uses it. Under Dynamo the location comes from the frames Dynamo is tracing (`_dynamo_location`),
evaluated once per trace as a constant.
"""

from __future__ import annotations

import itertools
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

from ..errors import PlanMismatchError
from ..ops.adds import ADD_FUNCS, IADD_FUNCS, INPLACE_ADD_FUNCS, REVERSED_ADD_FUNCS
from .state import dynamo_compiling

FRAME_WALK = 8  # frames searched upward for the module that runs an add (helpers in between)


class LinkMode(TorchFunctionMode):
    """Active while a chain with watched adds runs (its owner, a container, a recompute)."""

    def __init__(self, watcher: ModeWatcher):
        super().__init__()
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ADD_FUNCS:
            out = self.watcher.on_add(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **(kwargs or {}))


_TORCH_FUNCTION_CODE = LinkMode.__torch_function__.__code__
_WATCHERS: weakref.WeakValueDictionary[int, ModeWatcher] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


@torch.compiler.assume_constant_result
def _dynamo_location(token: int) -> tuple[int, ...]:
    """Indices of the watched entries an add being traced by Dynamo can be (a trace-time constant).

    Dynamo inlines `LinkMode.__torch_function__`; the frame it was called from, and the
    modules (`self`) of the frames above it, are Dynamo's own translators' state.
    """
    w = _WATCHERS.get(token)
    if w is None:
        return ()
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        tx = getattr(tx.output, "current_tx", tx)
        while tx is not None and tx.f_code is not _TORCH_FUNCTION_CODE:
            tx = tx.parent
        if tx is None:
            return ()
        tx = tx.parent
        frames = []
        while tx is not None and len(frames) < FRAME_WALK:
            inst = getattr(tx, "current_instruction", None)
            pos = getattr(inst, "positions", None)
            line = getattr(pos, "lineno", None) or tx.lineno
            cols = None if getattr(pos, "col_offset", None) is None else (pos.col_offset, pos.end_col_offset)
            var = tx.symbolic_locals.get("self")
            frames.append((tx.f_code.co_filename, line, cols, getattr(var, "value", None)))
            tx = tx.parent
    except AttributeError as exc:  # another torch: its Dynamo internals differ
        raise PlanMismatchError(
            "torch.compile of a model converted by attnres_compile cannot read Dynamo's frames in this "
            f"torch ({torch.__version__}): {exc}; run the converted model eagerly, or export it"
        ) from exc
    if not frames:
        return ()
    file, line, cols = frames[0][:3]  # Dynamo renumbers bytecode: match the column span, not the offset
    return w.match(file, line, None, [s for *_, s in frames], cols=cols)


class ModeWatcher:
    """The watched entries of one runtime, and the scope that enters the mode for them."""

    def __init__(self, runtime, entry_ids: list[int], use_lasti: bool):
        self.runtime = runtime
        self.entry_ids = entry_ids
        self.use_lasti = use_lasti
        self.token = next(_TOKENS)
        _WATCHERS[self.token] = self
        import threading

        self._tls = threading.local()
        self.by_line: dict[tuple[str, int], list[int]] = {}
        for i in entry_ids:
            e = runtime.entries[i]
            self.by_line.setdefault((e.site.file, e.site.line), []).append(i)

    def __getstate__(self):
        return {"runtime": self.runtime, "entry_ids": self.entry_ids, "use_lasti": self.use_lasti}

    def __setstate__(self, state):
        self.__init__(state["runtime"], state["entry_ids"], state["use_lasti"])

    def run(self, fn, args, kwargs):
        """fn(*args, **kwargs) inside the mode (once per thread: nested scopes share it)."""
        if dynamo_compiling():
            with LinkMode(self):
                return fn(*args, **kwargs)
        tls = self._tls
        if getattr(tls, "depth", 0):
            return fn(*args, **kwargs)
        tls.depth = 1
        try:
            with LinkMode(self):
                return fn(*args, **kwargs)
        finally:
            tls.depth = 0

    def match(self, file: str, line: int, lasti: int | None, selves: list, cols=None) -> tuple[int, ...]:
        """Entries watched at (file, line) for the innermost module among `selves`; `lasti`
        (eager: the frame's bytecode offset) or `cols` (Dynamo: the instruction's column span)
        picks among several adds on one line."""
        idx = self.by_line.get((file, line))
        if not idx:
            return ()
        entries = self.runtime.entries
        if self.use_lasti and lasti is not None:
            idx = [i for i in idx if entries[i].site.lasti in (None, lasti)]
        if cols is not None:
            idx = [i for i in idx if entries[i].site.cols in (None, cols)]
        for s in selves:
            if s is None:
                continue
            found = tuple(i for i in idx if entries[i].container is s)
            if found:
                return found
        return ()

    def _locate(self) -> tuple[int, ...]:
        if dynamo_compiling():
            return _dynamo_location(self.token)
        f = sys._getframe(3)  # _locate <- on_add <- __torch_function__ <- the add's caller
        while f is not None and f.f_code.co_name == "__torch_function__":  # modes entered above ours
            f = f.f_back
        if f is None:
            return ()
        if (f.f_code.co_filename, f.f_lineno) not in self.by_line:
            return ()
        selves = []
        g = f
        while g is not None and len(selves) < FRAME_WALK:
            selves.append(g.f_locals.get("self"))
            g = g.f_back
        return self.match(f.f_code.co_filename, f.f_lineno, f.f_lasti, selves)

    def on_add(self, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return NotImplemented
        a, b = args
        if func in REVERSED_ADD_FUNCS:
            a, b = b, a
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return NotImplemented
        cands = self._locate()
        if not cands:
            return NotImplemented
        inplace = None if func not in INPLACE_ADD_FUNCS else ("iadd" if func in IADD_FUNCS else "method")
        return self.runtime.link(cands, a, b, inplace)


class RecomputeInMode:
    """The function Hugging Face checkpoints, entering the mode when it runs (also in recompute)."""

    def __init__(self, watcher: ModeWatcher, fn):
        self.watcher, self.fn = watcher, fn

    def __call__(self, *args, **kwargs):
        return self.watcher.run(self.fn, args, kwargs)


class CheckpointFunc:
    """Wraps a module's `_gradient_checkpointing_func` so the checkpointed function enters the mode."""

    def __init__(self, watcher: ModeWatcher, func):
        self.watcher, self.func = watcher, func

    def __call__(self, fn, *args, **kwargs):
        return self.func(RecomputeInMode(self.watcher, fn), *args, **kwargs)


def wrap_checkpoint_funcs(watcher: ModeWatcher, modules) -> None:
    for m in modules:
        f = m.__dict__.get("_gradient_checkpointing_func")
        if f is not None and not isinstance(f, CheckpointFunc):
            m._gradient_checkpointing_func = CheckpointFunc(watcher, f)
