"""Checkpoint replay: a saved plan installed on code that may have moved.

A plan names each residual add by module, file (relative to its module's folder), line and the
line's text. A checkpoint outlives the library version it was saved under: when `transformers`
edits a modeling file, the planned lines move. So installing a saved plan

1. `locate`s every add: finds its file among the source files of the model's own classes (the
   module the plan names must be one of theirs: nothing a plan names is imported, opened or
   run) and checks the line still holds the planned code;
2. when a line no longer matches (`StalePlanError`), hands the plan to the `rederive` function
   it was given (conversion/rederive.py), which captures the freshly built model again and keeps
   the new plan only when it has the saved layout; only a real change of the model's structure
   is an error (`LayoutChangedError`, naming the first difference).
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import os
import sys
from collections.abc import Callable

from torch import nn

from ..errors import PlanFormatError, PlanMismatchError, StalePlanError
from ..plan.types import AddSite, ConversionPlan

#: rederive(model, saved plan, reason) -> the plan as the model's code is now (conversion/rederive.py:
#: conversion hands it to the runtime, which never imports conversion).
Rederive = Callable[[nn.Module, ConversionPlan, str], ConversionPlan]


# -- 1. locate ---------------------------------------------------------------------------------

def _matches(path: str, rel: str) -> bool:
    return path == rel or path.endswith(os.sep + rel) or os.path.basename(path) == os.path.basename(rel)


class ModelCode:
    """The code a plan may name: the source files and Python modules of the model's own classes
    (every class in the MRO of every module of the model, which the user's code already built
    and imported). A saved plan is located only among them: nothing it names is imported,
    opened or run. A plan made in this process (`trusted`: convert(), a re-derivation, an
    unpickled model, whose pickle is trusted already) may also name a module this process has
    imported (a free function's module), still without importing anything."""

    def __init__(self, modules, *, trusted: bool = False):
        self.trusted = trusted
        self.by_module: dict[str, str] = {}
        self._seen: set[int] = set()
        for m in modules:
            for klass in type(m).__mro__:
                self._add(klass)

    def _add(self, klass) -> None:
        if id(klass) in self._seen:
            return
        self._seen.add(id(klass))
        try:
            f = inspect.getsourcefile(klass)
        except (TypeError, OSError):
            f = None
        if f:
            self.by_module.setdefault(klass.__module__, os.path.abspath(f))

    def find(self, add: AddSite, container: nn.Module | None, field: str) -> str | None:
        """The file of this process that holds `add`, or None when the plan's module is not the
        model's but could be (a trusted plan whose module is not imported)."""
        if container is not None:
            for klass in type(container).__mro__:
                self._add(klass)
        if add.module_name:
            path = self.by_module.get(add.module_name)
            if path is None and self.trusted:
                path = getattr(sys.modules.get(add.module_name), "__file__", None)
            if path is None:
                if self.trusted:
                    return None
                raise PlanFormatError(
                    f"the attnres plan's field {field}.module_name: {add.module_name!r} is not the module of any class "
                    f"of the model (they are in {_listed(self.by_module)}); a plan finds code only through the model's "
                    "own classes, and imports nothing it names", field=f"{field}.module_name")
            if not _matches(path, add.file):
                raise PlanFormatError(
                    f"the attnres plan's field {field}.file: {add.file!r}, but module {add.module_name}'s file is "
                    f"{os.path.basename(path)}", field=f"{field}.file")
            return path
        found = [p for p in self.by_module.values() if _matches(p, add.file)]
        if not found and self.trusted and os.path.exists(os.path.abspath(add.file)):
            found = [os.path.abspath(add.file)]
        if not found:
            raise PlanFormatError(
                f"the attnres plan's field {field}.file: {add.file!r} is not the source file of any class of the model "
                f"(their modules: {_listed(self.by_module)}); a plan finds code only through the model's own classes",
                field=f"{field}.file")
        return next((p for p in found if p.endswith(os.sep + add.file) or p == add.file), found[0])


def _listed(by_module: dict) -> str:
    names = sorted(n for n in by_module if not n.startswith("torch."))
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "") if names else "none"


def add_field(chain: int, link: int, inner: int = -1) -> str:
    """The plan field of an add: `chains[c].links[l].add`, or `.absorbed[k]` of a parallel link."""
    return f"chains[{chain}].links[{link}]." + ("add" if inner == -1 else f"absorbed[{inner}]")


def locate(add: AddSite, container: nn.Module | None, chain: int, link: int, code: ModelCode,
           inner: int = -1) -> AddSite:
    """The plan's add with its file as this process names it, checked to still hold the code.

    Raises PlanFormatError when the plan names code outside the model's classes,
    StalePlanError when the file is the model's but the line changed (or the file is gone),
    PlanMismatchError when a trusted plan's module is not in this process."""
    if add.file.startswith("<"):  # generated code (an fx GraphModule): nothing to find or check
        return add
    path = code.find(add, container, add_field(chain, link, inner))
    if path is None:
        raise PlanMismatchError(
            f"chain {chain}, sublayer {link}: the plan's residual add is in module {add.module_name}, which is not "
            "imported in this process; import the library the model was converted with")
    if not os.path.exists(path):
        raise StalePlanError(f"chain {chain}, sublayer {link}: the plan's residual add is in {add.file} "
                             f"(module {add.module_name or 'unknown'}), which this environment does not have")
    text = linecache.getline(path, add.line).strip()
    if add.code and text != add.code:
        raise StalePlanError(f"chain {chain}, sublayer {link}: the plan expects `{add.code}` at "
                             f"{os.path.basename(path)}:{add.line}, but that line is `{text}`")
    return dataclasses.replace(add, file=path)


def check(root: nn.Module, plan: ConversionPlan, code: ModelCode | None = None) -> None:
    """Locate every add of `plan` on `root`; raises StalePlanError at the first that moved."""
    code = code if code is not None else ModelCode(root.modules())
    for cp in plan.chains:
        for li, lk in enumerate(cp.links):
            for k, add in enumerate((*lk.absorbed, lk.add)):
                try:
                    container = root.get_submodule(add.container) if add.container else root
                except AttributeError:
                    container = None  # install names the missing module
                locate(add, container, cp.index, li, code, inner=k if k < len(lk.absorbed) else -1)


def install_saved(model: nn.Module, plan: ConversionPlan, rederive: Rederive) -> ConversionPlan:
    """The plan to install on `model` (unconverted, freshly built) for a saved `plan`: itself
    when every planned line is where it was, else `rederive(model, plan, reason)`."""
    try:
        check(model, plan)
    except StalePlanError as exc:
        return rederive(model, plan, str(exc))
    return plan
