"""Checkpoint replay: a saved plan installed on code that may have moved.

A plan names each residual add by module, file (relative to its module's folder), line and the
line's text. A checkpoint outlives the library version it was saved under: when `transformers`
edits a modeling file, the planned lines move. So installing a saved plan

1. `locate`s every add: finds its file among the source files of the model's own classes (the
   module the plan names must be one of theirs: nothing a plan names is imported, opened or
   run) and checks the line still holds the planned code;
2. when a line no longer matches (`StalePlanError`), `rederive`s the plan from the model's
   code as it is now: captures the freshly built model again (from example inputs rebuilt from
   the shapes and dtypes the plan recorded, or, for a Hugging Face model, from `input_ids`
   synthesized from its config) with the options the plan recorded;
3. checks the new plan has the saved layout (`layout_difference`: the same chains, sublayer
   module paths, sites, parameter names and shapes), so the saved AttnRes weights mean what
   they meant, installs it, and says so once (a warning). Only a real change of the model's
   structure is an error (`LayoutChangedError`, naming the first difference).
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import math
import os
import sys
import warnings

import torch
from torch import nn

from ..errors import LayoutChangedError, PlanFormatError, PlanMismatchError, StalePlanError
from ..convert.build import AddSite, ConversionPlan
from ..plan.limits import MAX_INPUT_DEPTH, MAX_INT, MAX_NAME, MAX_TENSOR_DIMS, MAX_TENSOR_NUMEL, MAX_TEXT


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


# -- 2. re-derive --------------------------------------------------------------------------------

def input_spec(value, depth: int = 1):
    """A JSON-able description of one example input (tensor shape and dtype, or a plain value);
    what a saved plan cannot hold (plan/limits.py) is recorded as unsupported."""
    if depth > MAX_INPUT_DEPTH:
        return {"unsupported": "nested too deep"}
    if isinstance(value, torch.Tensor):
        if value.dim() > MAX_TENSOR_DIMS or value.numel() > MAX_TENSOR_NUMEL:
            return {"unsupported": f"tensor of shape {list(value.shape)}"}
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) >= MAX_INT \
            or isinstance(value, str) and len(value) > MAX_TEXT:
        return {"unsupported": type(value).__name__}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [input_spec(v, depth + 1) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) and len(k) <= MAX_NAME for k in value):
        return {"dict": {k: input_spec(v, depth + 1) for k, v in value.items()}}
    return {"unsupported": type(value).__name__}


def inputs_spec(args: tuple, kwargs: dict) -> dict:
    return {"args": [input_spec(a) for a in args], "kwargs": {k: input_spec(v) for k, v in kwargs.items()}}


def _build(spec, where: str, device):
    if "tensor" in spec:
        dtype = getattr(torch, spec["dtype"])
        shape = spec["tensor"]
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(shape, dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)  # indices: 0 is valid for any table
    if "value" in spec:
        return spec["value"]
    if "list" in spec or "tuple" in spec:
        items = [_build(s, f"{where}[{i}]", device) for i, s in enumerate(spec.get("list", spec.get("tuple")))]
        return items if "list" in spec else tuple(items)
    if "dict" in spec:
        return {k: _build(s, f"{where}[{k!r}]", device) for k, s in spec["dict"].items()}
    raise StalePlanError(f"example input {where} was a {spec.get('unsupported', '?')}, which the plan cannot "
                         "record; convert the model again")


def _hf_inputs(model: nn.Module, device):
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    try:
        takes_ids = "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_ids = False
    if not (isinstance(vocab, int) and vocab > 0 and takes_ids):
        return None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=gen).to(device)
    return (), {"input_ids": ids}


def example_inputs(model: nn.Module, plan: ConversionPlan) -> tuple[tuple, dict]:
    """Inputs to capture `model` with again: the plan's recorded example inputs, else (a Hugging
    Face model) `input_ids` synthesized from its config."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None and ref.device.type != "meta" else None
    if plan.inputs is not None:
        args = tuple(_build(s, f"args[{i}]", device) for i, s in enumerate(plan.inputs.get("args", [])))
        kwargs = {k: _build(s, f"kwargs[{k!r}]", device) for k, s in plan.inputs.get("kwargs", {}).items()}
        return args, kwargs
    found = _hf_inputs(model, device)
    if found is None:
        raise StalePlanError(f"the plan of {plan.model} records no example inputs and {type(model).__name__} is "
                             "not a Hugging Face model with a vocab_size to synthesize input_ids from")
    return found


def rederive(model: nn.Module, saved: ConversionPlan, reason: str) -> ConversionPlan:
    """The plan of `model` (unconverted) as its code is now, with the saved plan's options and
    layout; raises LayoutChangedError naming the first difference when the structure changed."""
    from ..api import derive_plan
    from ..errors import NoEligibleChainError

    args, kwargs = example_inputs(model, saved)
    opts = saved.options
    wanted = {tuple(lk.sublayer for lk in cp.links) for cp in saved.chains}

    def derive(filter_fn):
        return derive_plan(model, args, kwargs, num_blocks=opts.get("num_blocks"),
                           block_size=opts.get("block_size"), preserve=saved.preserve, eps=opts.get("eps"),
                           dynamic=opts.get("dynamic", True), filter_fn=filter_fn)[0]

    # The saved chains only (convert may have been given a filter_fn, which a plan cannot hold);
    # when none of them is found, every chain, for the layout check to name what differs.
    try:
        new = derive(lambda c: tuple(c.sublayers) in wanted)
    except NoEligibleChainError:
        try:
            new = derive(None)
        except NoEligibleChainError as exc:
            raise LayoutChangedError(
                f"the AttnRes plan saved with this {saved.model} no longer fits its code ({reason}), and its "
                f"code has no convertible residual stream now: {exc}") from exc
    new.options, new.inputs = dict(saved.options), saved.inputs
    diff = layout_difference(saved, new)
    if diff is not None:
        raise LayoutChangedError(
            f"the AttnRes plan saved with this {saved.model} no longer fits its code ({reason}), and the model's "
            f"structure changed: {diff}; the saved AttnRes weights cannot be loaded into it")
    then = _versions_text(saved.versions)
    warnings.warn(
        f"attnres_compile: the plan saved with this {saved.model}{' (' + then + ')' if then else ''} names code "
        f"that moved ({reason}); it was re-derived from the model's code as it is now ({_versions_text(versions())})"
        ", with the saved layout: the saved AttnRes weights load unchanged", stacklevel=3)
    return new


# -- 3. the layout check ---------------------------------------------------------------------------

def layout_difference(saved: ConversionPlan, new: ConversionPlan) -> str | None:
    """The first difference of layout between two plans, or None when the saved AttnRes weights
    fit the new plan (the same chains, sublayer module paths, sites, parameter names and shapes)."""
    if len(saved.chains) != len(new.chains):
        return f"{len(saved.chains)} converted chain(s) when saved, {len(new.chains)} now"
    for a, b in zip(saved.chains, new.chains):
        c = f"chain {a.index}"
        if a.index != b.index:
            return f"{c} is chain {b.index} now"
        if a.owner != b.owner:
            return f"{c}: owned by {a.owner or 'the model'!r} when saved, by {b.owner or 'the model'!r} now"
        if len(a.links) != len(b.links):
            return f"{c}: {len(a.links)} sublayers when saved, {len(b.links)} now"
        for i, (la, lb) in enumerate(zip(a.links, b.links)):
            if la.sublayer != lb.sublayer:
                return f"{c}, sublayer {i}: {la.sublayer!r} when saved, {lb.sublayer!r} now"
            if len(la.absorbed) != len(lb.absorbed):
                return (f"{c}, sublayer {i} ({la.sublayer}): {len(la.absorbed) + 1} residual branch(es) when saved, "
                        f"{len(lb.absorbed) + 1} now")
        if a.block_size != b.block_size:
            return f"{c}: block size {a.block_size} when saved, {b.block_size} now"
        if a.feature_axis != b.feature_axis or a.dim != b.dim:
            return f"{c}: stream width {a.dim} (axis {a.feature_axis}) when saved, {b.dim} (axis {b.feature_axis}) now"
        for sa, sb in zip(a.sites, b.sites):
            if (sa.name, sa.param_prefix, sa.schedule.sources) != (sb.name, sb.param_prefix, sb.schedule.sources):
                return (f"{c}, site {sa.name}: parameters {sa.param_prefix} over sources {list(sa.schedule.sources)} "
                        f"when saved, {sb.param_prefix} over {list(sb.schedule.sources)} now")
            if (sa.dim, sa.eps, sa.scale) != (sb.dim, sb.eps, sb.scale):
                return (f"{c}, site {sa.name}: (dim, eps, scale) {(sa.dim, sa.eps, sa.scale)} when saved, "
                        f"{(sb.dim, sb.eps, sb.scale)} now")
    return None


# -- versions ------------------------------------------------------------------------------------

def versions() -> dict:
    """The versions a plan is made under: Python, torch, and transformers when it is loaded."""
    out = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "torch": torch.__version__.split("+")[0]}
    tf = sys.modules.get("transformers")
    if tf is not None and getattr(tf, "__version__", None):
        out["transformers"] = tf.__version__
    return out


def _versions_text(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers") if k in v)


def install_saved(model: nn.Module, plan: ConversionPlan) -> ConversionPlan:
    """The plan to install on `model` (unconverted, freshly built) for a saved `plan`: itself
    when every planned line is where it was, else the re-derived plan (see the module doc)."""
    try:
        check(model, plan)
    except StalePlanError as exc:
        return rederive(model, plan, str(exc))
    return plan
