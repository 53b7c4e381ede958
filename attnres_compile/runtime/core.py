"""The installed plan of a converted model: what runs at every call.

`install(root, plan, params)` (on the private copy `convert()` made) sets, per module the plan
names, one instance attribute (planned.py): the owner of a chain gets a `forward` that opens a
call of the chain (state.py) around the model's own forward; a module that runs planned adds
gets its method (`forward` or a helper) recompiled with those adds calling the runtime
(recompile.py). This module installs; links.py serves the calls; sites.py runs the sites.
Nothing else of the model changes: any keyword, cache, shape, dtype, autocast, mode, hook,
adapter or sharding the model supports keeps working, and every capture of the converted model
(torch.export, ONNX, torch.compile) records one `attnres::depth_attention` node per site.

At a link a_{l+1} = a_l + f_l(h_l) the runtime returns the site h_{l+1} =
depth_attention(sources_{l+1}) instead (the final site after the last link), while the block
partial sums live in the run (`Run`). Every reader of a_{l+1} (the next sublayer, returned
hidden states, the final norm) so reads h_{l+1}, exactly as in a graph rewrite that turns each
stream value into its site.

Which link an add is. The recompiled code names its add (file, line, columns) and the module
instance is known, so the candidates are the plan's entries at that add in that module; one
module may run several links (a shared layer runs its lines more than once), so the chain's
order picks: each site output carries a tag naming its run and link, and otherwise the call's
run in progress says which link comes next.

Activation checkpointing. A recomputed region runs its adds again, in backward, through the
same recompiled code; a link whose stream operand is tagged by an earlier link replays that
link from the run's snapshot instead of advancing it. Reentrant checkpoints cannot carry
gradients to sources outside the region, so a link inside one is an error that says so.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from torch import nn

from ..errors import PlanMismatchError, StalePlanError
from ..plan.types import AddSite, ChainPlan, ConversionPlan
from . import recompile as codegen
from .links import ChainCalls
from .mode import ModeWatcher
from .planned import _bound_call, _Links, _Planned
from .replay import ModelCode, Rederive, add_field, locate
from .sites import site_output
from .state import CallStacks

__all__ = ["AttnResRuntime", "install", "site_output"]


class _ChainRuntime:
    def __init__(self, plan: ChainPlan, owner: nn.Module, sites: list):
        self.plan = plan
        self.index = plan.index
        self.owner = owner
        self.sites = sites            # per site index (0..L, L = final): DepthAttentionSite or None
        self.watched = ""             # why its adds are watched by the mode ("" when installed in code)
        # Two-phase groups (SPEC section 3): sites whose sources share all but the last one
        # (the completed blocks), and eps; phase 1 reads the shared blocks once for all of them.
        groups: dict[tuple, list[int]] = {}
        for j, sp in enumerate(plan.sites):
            if sp.param_prefix is not None:
                groups.setdefault((sp.schedule.sources[:-1], sp.eps), []).append(j)
        self.group_of = {j: members for members in groups.values() if len(members) > 1 for j in members}


@dataclass(frozen=True)
class _Entry:
    """One add the plan knows, at one code location."""

    container: nn.Module
    chain: _ChainRuntime
    link: int
    inner: int            # -1: the link's (outer) add; k >= 0: its k-th absorbed inner add
    site: AddSite

    @property
    def position(self) -> tuple:
        cols = self.site.cols or (None, None)
        return (self.site.file, self.site.line, cols[0], cols[1])


class AttnResRuntime(ChainCalls):
    """The installed plan of one converted model (`converted.attnres.runtime`)."""

    def __init__(self, root: nn.Module, plan: ConversionPlan, params: nn.Module, *, trusted: bool = False,
                 rederive: Rederive | None = None):
        self.plan = plan
        self.rederive = rederive  # re-derives the plan of an unpickled model whose code moved
        self.model_name = plan.model
        self.chains: list[_ChainRuntime] = []
        self.entries: list[_Entry] = []
        code = ModelCode(root.modules(), trusted=trusted)
        for cp in plan.chains:
            owner = _module_at(root, cp.owner, f"chains[{cp.index}].owner")
            sites = []
            chain_params = getattr(params, f"chain{cp.index}", None)
            for sp in cp.sites:
                sites.append(None if sp.param_prefix is None else getattr(chain_params, sp.name))
            chain = _ChainRuntime(cp, owner, sites)
            self.chains.append(chain)
            for li, link in enumerate(cp.links):
                for k, add in enumerate([*link.absorbed, link.add]):
                    inner = k if k < len(link.absorbed) else -1
                    container = _module_at(root, add.container, add_field(cp.index, li, inner) + ".container")
                    add = locate(add, container, cp.index, li, code, inner)
                    self.entries.append(_Entry(container, chain, li, inner, add))
        self.root = root
        self.stale = None  # set on unpickling where a planned line moved: re-derived at the first call
        self._install(root)
        self._setup()
        self._ready = True

    # -- install ---------------------------------------------------------------------------
    def _install(self, root: nn.Module) -> None:
        """Decide, per planned add, its recompiled function or the mode; set the attributes."""
        self.planned: list[_Planned] = []            # the instance attributes set, built at once
        functions: dict[tuple[int, str], dict] = {}  # (id(module), attr) -> {"module", "attr", "entries"}
        self.attr_of: dict[int, str] = {}            # entry index -> the attribute whose code runs it
        watched: dict[int, str] = {}                # chain index -> reason
        for i, e in enumerate(self.entries):
            try:
                attr = self._method_of(e)
            except codegen.CannotRewrite as exc:
                watched.setdefault(e.chain.index, f"{e.site.where()}: {exc}")
                continue
            slot = functions.setdefault((id(e.container), attr), {"module": e.container, "attr": attr,
                                                                   "entries": []})
            slot["entries"].append(i)
            self.attr_of[i] = attr
        for slot in list(functions.values()):
            ents = [self.entries[i] for i in slot["entries"]]
            positions = sorted({e.position for e in ents})
            try:
                _, chain = codegen.find_method(type(slot["module"]), ents[0].site.file, ents[0].site.line)
                codegen.planned_code(chain[-1], positions)
            except codegen.CannotRewrite as exc:
                for e in ents:
                    watched.setdefault(e.chain.index, f"{e.site.where()}: {exc}")
        # A chain is served one way: in code, or (any add that cannot be recompiled) by the mode.
        for c in self.chains:
            c.watched = watched.get(c.index, "")
        self._make_watcher()

        owned: dict[int, list[int]] = {}
        modules: dict[int, nn.Module] = {}
        for c in self.chains:
            owned.setdefault(id(c.owner), []).append(c.index)
            modules[id(c.owner)] = c.owner
        watched_modules = set()
        for i in self.watcher.entry_ids if self.watcher is not None else ():
            e = self.entries[i]
            modules.setdefault(id(e.container), e.container)
            watched_modules.add(id(e.container))
            watched_modules.add(id(e.chain.owner))
        code_slots: set[tuple[int, str]] = set()  # (id(module), attr) recompiled: holds adds of unwatched chains
        for (mid, attr), slot in functions.items():
            if any(not self.entries[i].chain.watched for i in slot["entries"]):
                code_slots.add((mid, attr))
                modules.setdefault(mid, slot["module"])
        for mid, m in modules.items():
            attrs = {attr for (k, attr) in code_slots if k == mid} | {"forward"}
            for attr in sorted(attrs):
                cur = m.__dict__.get(attr)
                if isinstance(cur, _Planned):
                    raise PlanMismatchError(f"{type(m).__name__} at {_path_of(root, m)!r} is already converted "
                                            "by attnres_compile; convert the original model instead")
                recompiled = (mid, attr) in code_slots
                chains = owned.get(mid, []) if attr == "forward" else []
                is_watched = attr == "forward" and mid in watched_modules
                if not recompiled and not chains and not is_watched:
                    continue
                planned = m.__dict__[attr] = _Planned(self, m, attr, chains, recompiled, is_watched)
                planned._fn = self._build_function(planned)
                self.planned.append(planned)
        if self.watcher is not None:
            self._checkpointed = [m for m in modules.values()]

    def _method_of(self, e: _Entry) -> str:
        """The attribute of e.container whose function runs e's add (CannotRewrite if none)."""
        if e.site.file.startswith("<") and not e.site.file.startswith("<ipython"):
            raise codegen.CannotRewrite("generated code")
        found = codegen.find_method(type(e.container), e.site.file, e.site.line)
        if found is None:
            raise codegen.CannotRewrite(f"it is not in a method of {type(e.container).__name__}")
        attr = found[0]
        if attr in e.container.__dict__ and not isinstance(e.container.__dict__[attr], _Planned):
            raise codegen.CannotRewrite(f"{type(e.container).__name__}.{attr} is replaced on the instance")
        return attr

    def _build_function(self, planned: _Planned):
        if not planned.recompiled:
            target = planned.inner
            if target is not None:
                return _bound_call(target)
            return getattr(type(planned.module), planned.attr)
        positions = sorted({e.position for i, e in enumerate(self.entries)
                            if e.container is planned.module and self.attr_of.get(i) == planned.attr
                            and not e.chain.watched})
        _, chain = codegen.find_method(type(planned.module), positions[0][0], positions[0][1])
        code = codegen.planned_code(chain[-1], positions)
        cands: dict[tuple, list[int]] = {}
        for i, e in enumerate(self.entries):
            if e.container is planned.module and not e.chain.watched:
                cands.setdefault(e.position, []).append(i)
        return codegen.link_function(chain, code, _Links(self, {k: tuple(v) for k, v in cands.items()}))

    def _setup(self) -> None:
        self.calls = CallStacks(len(self.chains))
        self._lock = threading.Lock()
        self._expected = [self._expected_tag(e) for e in self.entries]  # per entry, for _pick

    def _make_watcher(self) -> None:
        watched_ids = [i for i, e in enumerate(self.entries) if e.chain.watched]
        self.watcher = ModeWatcher(self, watched_ids, self.plan.python == _python()) if watched_ids else None

    # -- pickling (torch.save of the converted model) ---------------------------------------
    def __getstate__(self):
        # No code locations travel: the entries are re-located from the plan (whose files are
        # relative) when unpickled, in whatever environment that is.
        d = self.__dict__.copy()
        for k in ("calls", "_lock", "watcher", "_ready", "_expected"):
            d.pop(k, None)
        d["entries"] = [(e.container, e.chain.index, e.link, e.inner) for e in self.entries]
        return d

    def __setstate__(self, state):
        self.__dict__.update(state)
        entries = []
        # A pickle is trusted (it can run code anyway): its modules may be any this process imported.
        code = ModelCode([c for c, *_ in state["entries"]], trusted=True)
        for container, ci, li, inner in state["entries"]:
            chain = self.chains[ci]
            link = chain.plan.links[li]
            add = link.add if inner == -1 else link.absorbed[inner]
            if self.stale is None:
                try:
                    add = locate(add, container, ci, li, code, inner)
                except StalePlanError as exc:
                    self.stale = str(exc)
            entries.append(_Entry(container, chain, li, inner, add))
        self.entries = entries
        self._setup()
        self._make_watcher()
        self._ready = True
        if self.stale is None:
            for p in self.planned:
                if "runtime" in p.__dict__ and p._fn is None:
                    p._fn = self._build_function(p)

    def _reinstall(self) -> None:
        """Re-derive the plan on the unpickled model whose code moved, and install it (replay.py)."""
        with self._lock:
            if self.stale is None:
                return
            root = self.root
            params = root._modules.get("attnres")
            for m in root.modules():
                for attr, v in list(m.__dict__.items()):
                    if isinstance(v, _Planned) and v.runtime is self:
                        if v.inner is not None:
                            m.__dict__[attr] = v.inner
                        else:
                            del m.__dict__[attr]
            del root._modules["attnres"]
            try:
                if self.rederive is None:
                    raise StalePlanError(self.stale)
                plan = self.rederive(root, self.plan, self.stale)
            finally:
                root._modules["attnres"] = params
            runtime = AttnResRuntime(root, plan, params, trusted=True, rederive=self.rederive)
            params.plan, params.runtime = plan, runtime
            config = getattr(root, "config", None)
            if config is not None and hasattr(config, "to_dict"):
                config.attnres = plan.to_dict()
            self.stale = None

    def installed(self) -> list[str]:
        """Per chain, how its adds are served: in code, or watched by the mode (and why)."""
        return [f"chain {c.index}: " + ("installed in code" if not c.watched else
                                        f"watched by a torch function mode ({c.watched})") for c in self.chains]

    # -- two-phase inference ---------------------------------------------------------------




# -- helpers -------------------------------------------------------------------------------------

def _python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _module_at(root: nn.Module, path: str, field: str) -> nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError as exc:
        raise PlanMismatchError(f"the plan's field {field} names module {path!r}, which {type(root).__name__} "
                                f"does not have") from exc


def _path_of(root: nn.Module, m: nn.Module) -> str:
    for name, sub in root.named_modules():
        if sub is m:
            return name
    return "?"


def install(root: nn.Module, plan: ConversionPlan, params: nn.Module, *, trusted: bool = False,
            rederive: Rederive | None = None) -> AttnResRuntime:
    """Install `plan` on `root` (mutates it: call on a private copy). Returns the runtime.

    trusted: the plan was made in this process (replay.ModelCode: what its adds may name);
    rederive: what re-derives the plan when an unpickled model's code moved (replay.Rederive)."""
    return AttnResRuntime(root, plan, params, trusted=trusted, rederive=rederive)
