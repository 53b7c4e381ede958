"""What the installed code calls: the instance attributes a converted model's modules get.

`_Planned` replaces a planned method (`forward`, or a helper) on the module instance and runs
the module's own function (recompiled with its planned adds, recompile.py); an owner opens a
call of its chains around it. `_Links` is what the recompiled code's residual adds call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import inspect

from torch import Tensor

from . import recompile as codegen

if TYPE_CHECKING:  # annotations only: core.py imports this module
    from torch import nn

    from .core import AttnResRuntime



class _Links:
    """`__attnres_link__` of one module instance: its planned adds, by position."""

    __slots__ = ("runtime", "cands")

    def __init__(self, runtime: AttnResRuntime, cands: dict[tuple, tuple[int, ...]]):
        self.runtime, self.cands = runtime, cands

    def __call__(self, key, a, b, kind, fn=None):
        if kind >= codegen.METHOD:
            a = fn.__self__
        cands = self.cands.get(key)
        if cands is None or not isinstance(a, Tensor) or not isinstance(b, Tensor):
            return codegen.plain_add(kind, a, b, fn)
        inplace = "iadd" if kind == codegen.IADD else ("method" if kind == codegen.METHOD_INPLACE else None)
        return self.runtime.link(cands, a, b, inplace)


class _Planned:
    """An instance attribute (`forward`, or a helper method) of a module the plan names.

    It calls the module's own function: recompiled with the planned adds (`code` set), or as
    it is (an owner whose forward holds no planned add); an owner opens a call of its chains
    around it, and a module whose adds are watched runs it inside the mode. Set on the
    instance, so hooks, `module.forward(...)` called directly (PEFT does) and wrappers that
    others install later all go through it; `inspect.signature` sees the model's own signature.
    """

    def __init__(self, runtime: AttnResRuntime, module: nn.Module, attr: str, chains: list[int],
                 recompiled: bool, watched: bool):
        self.runtime = runtime
        self.module = module
        self.attr = attr
        self.inner = module.__dict__.get(attr)  # an instance attribute set before ours
        self.chains = chains                    # chains this module owns
        self.recompiled = recompiled            # runs planned adds (its code is recompiled)
        self.watched = watched
        self._fn = None

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_fn"] = None  # rebuilt when unpickled: functions do not pickle, and a copy needs its own
        return d

    def __setstate__(self, state):
        # Unpickling (or a deepcopy) restores the runtime and its modules in an order set by
        # the reference cycles: whichever of the two is restored last builds the function.
        self.__dict__.update(state)
        rt = self.runtime
        if rt.__dict__.get("_ready") and rt.stale is None:
            self._fn = rt._build_function(self)

    def _target(self):
        if self.inner is not None:
            return self.inner
        return getattr(type(self.module), self.attr).__get__(self.module)

    def _function(self):
        """What a call runs: a function of (module, *args, **kwargs)."""
        fn = self._fn
        if fn is None:  # install and unpickling build it (Dynamo cannot trace the recompilation)
            fn = self._fn = self.runtime._build_function(self)
        return fn

    # Look like the model's method to whoever inspects it (inspect.signature, torch.export's
    # code fields, Hugging Face's argument checks).
    @property
    def __wrapped__(self):
        return self._target()

    @property
    def __signature__(self):
        return inspect.signature(self._target())

    @property
    def __code__(self):
        t = self._target()
        return getattr(t, "__code__", None) or t.__func__.__code__

    @property
    def __name__(self):
        return getattr(self._target(), "__name__", self.attr)

    @property
    def __doc__(self):
        return self._target().__doc__

    def __call__(self, *args, **kwargs):
        rt = self.runtime
        if rt.stale is not None:  # unpickled on moved code: re-derive, then call what is installed now
            rt._reinstall()
            return getattr(self.module, self.attr)(*args, **kwargs)
        fn = self._function()
        if self.watched:
            run = rt.watcher.run
            call = lambda: run(fn, (self.module, *args), kwargs)  # noqa: E731
        else:
            call = None
        if self.chains:
            rt._begin(self.chains)
            try:
                out = call() if call is not None else fn(self.module, *args, **kwargs)
            except BaseException:
                rt._abort(self.chains)
                raise
            rt._end(self.chains)
            return out
        return call() if call is not None else fn(self.module, *args, **kwargs)


def _bound_call(target):
    def call(module, *args, **kwargs):
        return target(*args, **kwargs)
    return call


def is_planned(module) -> bool:
    """Whether `module`'s forward is a converted model's (an owner or a planned module)."""
    return isinstance(getattr(module, "__dict__", {}).get("forward"), _Planned)


def remove_owner_wrappers(model) -> None:
    """Remove the runtime's wrappers of functions that hold no planned add (the chains' owners,
    e.g. `LlamaModel.forward`), leaving the recompiled ones.

    vLLM calls the decoder model through its compile wrapper, which after the first (traced)
    call runs the compiled code of the class's forward: an owner's wrapper around that call,
    which opens a call of its chains and checks at its end that every planned add ran, would see
    none run. Without it the decoder layers' recompiled forwards open and close each chain run
    themselves, as when a layer is called on its own (a "loose" call, links.py)."""
    for module in model.modules():
        planned = module.__dict__.get("forward")
        if isinstance(planned, _Planned) and not planned.recompiled:
            if planned.inner is not None:
                module.forward = planned.inner
            else:
                del module.forward
