"""The installed plan of a converted model: what runs at every call.

`install(root, plan, params)` (on the private copy `convert()` made) sets, per module the plan
names, one instance attribute: the owner of a chain gets a `forward` that opens a call of the
chain (state.py) around the model's own forward; a module that runs planned adds gets its
method (`forward` or a helper) recompiled with those adds calling the runtime (codegen.py).
Nothing else of the model changes: any keyword, cache, shape, dtype, autocast, mode, hook,
adapter or sharding the model supports keeps working, and every capture of the converted model
(torch.export, ONNX, torch.compile) records one `attnres::depth_attention` node per site.

At a link a_{l+1} = a_l + f_l(h_l) the runtime returns the site h_{l+1} =
depth_attention(sources_{l+1}) instead (the final site after the last link), while the block
partial sums live in the run (`_Run`). Every reader of a_{l+1} (the next sublayer, returned
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

import inspect
import sys
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PlanMismatchError
from ..ops.depth_attention import depth_attention_call
from ..ops.sharded import check_branch_placement, dtensor_type, sharded_depth_attention
from ..convert.build import AddSite, ChainPlan, ConversionPlan
from . import recompile as codegen
from .mode import ModeWatcher, wrap_checkpoint_funcs
from .replay import ModelCode, add_field, locate
from .state import START, CallStacks, _Run, _Tag, _set_start, dynamo_compiling, get_tag, in_backward, set_tag


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


# -- what the installed code calls ---------------------------------------------------------------

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


class AttnResRuntime:
    """The installed plan of one converted model (`converted.attnres.runtime`)."""

    def __init__(self, root: nn.Module, plan: ConversionPlan, params: nn.Module, *, trusted: bool = False):
        self.plan = plan
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
        from ..errors import StalePlanError

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
            from .replay import rederive

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
                plan = rederive(root, self.plan, self.stale)
            finally:
                root._modules["attnres"] = params
            runtime = AttnResRuntime(root, plan, params, trusted=True)
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
    two_phase: bool | None = None
    """None (default): the two-phase schedule serves sites in eager no-grad calls on CUDA, where
    its one read of the completed blocks per block pays; on CPU the single-pass op measured
    faster (docs/performance.md). True / False force it on / off (eager no-grad calls only:
    training needs the single-pass op's backward, and captures keep one node per site)."""

    def _two_phase_now(self, t: Tensor) -> bool:
        want = self.two_phase if self.two_phase is not None else t.is_cuda
        if not want or type(t) is not Tensor:  # first: the usual answer on CPU; subclasses (DTensor) run single-pass
            return False
        if torch.is_grad_enabled() or dynamo_compiling() or torch.compiler.is_exporting():
            return False
        from ..compile.two_phase import two_phase_available

        return two_phase_available()

    # -- calls -----------------------------------------------------------------------------
    def _begin(self, chain_ids: list[int]) -> None:
        grad = torch.is_grad_enabled()
        for i in chain_ids:
            self.calls.push(i, grad)
        if self.watcher is not None and not dynamo_compiling():
            wrap_checkpoint_funcs(self.watcher, self._checkpointed)

    def _abort(self, chain_ids: list[int]) -> None:
        for i in chain_ids:
            self.calls.pop(i)

    def _end(self, chain_ids: list[int]) -> None:
        for i in chain_ids:
            call = self.calls.pop(i)
            c = self.chains[i]
            run, done = call.current, call.completed
            links = c.plan.links
            if run is not None:
                k = run.next
                raise PlanMismatchError(
                    f"chain {c.plan.index} of the converted {self.model_name}: this call of "
                    f"{c.plan.owner or 'the model'} ran sublayers 0..{k - 1} of {len(links)} and stopped before "
                    f"sublayer {k} ({links[k].sublayer}, {links[k].add.where()}); every call must run the "
                    "whole chain the model was converted with")
            if done == 0:
                raise PlanMismatchError(
                    f"chain {c.plan.index} of the converted {self.model_name}: none of its {len(links)} residual "
                    f"adds ran in this call of {c.plan.owner or 'the model'} (the first is at "
                    f"{links[0].add.where()}); this call takes another code path than the one the model was "
                    "converted on")

    # -- links -----------------------------------------------------------------------------
    def _expected_tag(self, e: _Entry) -> tuple[int, int] | None:
        """(link, inner) of the tag the stream operand of entry `e` carries, None for a chain start."""
        absorbed = len(e.chain.plan.links[e.link].absorbed)
        if e.inner > 0:
            return e.link, e.inner - 1
        if e.inner == -1 and absorbed:
            return e.link, absorbed - 1
        return None if e.link == 0 else (e.link - 1, -1)

    def _pick(self, cands, operands):
        """(entry, run, replay) for an add that may be any of the entries `cands`."""
        eager = not dynamo_compiling()
        if eager:
            expected = self._expected
            for i in cands:
                e = self.entries[i]
                tag = get_tag(operands[e.site.stream_arg])
                if tag is not None and tag.run.chain is e.chain and (tag.link, tag.inner) == expected[i]:
                    return e, tag.run, tag.run.next > e.link
            if in_backward():
                # A recompute of the chain's start: the run whose start this tensor is.
                for i in cands:
                    e = self.entries[i]
                    ref = getattr(operands[e.site.stream_arg], START, None)
                    run = ref() if ref is not None else None
                    if run is not None and run.chain is e.chain and self._expected_tag(e) is None:
                        return e, run, True
                # A recompute in backward whose stream operand lost its tag (saved-tensor hooks
                # such as save_on_cpu hand back other tensor objects): replay the chain's last run.
                for i in cands:
                    e = self.entries[i]
                    last = self.calls.last(e.chain.index)
                    if last is not None and e.link < len(last.snaps):
                        return e, last, True
        # an untagged stream operand (Dynamo, or a cast in between): the call's run says
        for i in cands:
            e = self.entries[i]
            call = self.calls.top(e.chain.index)
            run = call.current if call is not None else None
            pending = len(e.chain.plan.links[e.link].absorbed) if e.inner == -1 else e.inner
            if run is not None and run.next == e.link and len(run.pending) == pending:
                return e, run, False
            if self._expected_tag(e) is None and (run is None or call.loose):
                detached = eager and in_backward()
                if detached:  # a recompute in backward replays; it is no call's run
                    return e, _Run(e.chain, operands[e.site.stream_arg], True), False
                if call is None:  # a layer called on its own, outside its owner
                    call = self.calls.loose(e.chain.index)
                start = operands[e.site.stream_arg]
                run = _Run(e.chain, start, False, call)
                call.current = run
                if eager and torch.is_grad_enabled():  # a recompute of this link finds its run by its start
                    _set_start(start, run)
                self.calls.remember(e.chain.index, run)
                return e, run, False
        e = self.entries[cands[0]]
        call = self.calls.top(e.chain.index)
        run = call.current if call is not None else None
        raise PlanMismatchError(
            f"chain {e.chain.plan.index} of the converted {self.model_name}: the residual add at {e.site.where()} "
            f"(sublayer {e.link}, {e.chain.plan.links[e.link].sublayer}) ran out of order ("
            + (f"sublayer {run.next} was next" if run is not None else "the chain had not started")
            + "); the model ran its sublayers in another order than the one it was converted on")

    def link(self, cands, a: Tensor, b: Tensor, inplace: str | None):
        """The value of the planned add `a + b` (one of the entries `cands`).

        inplace: None, "iadd" (`a += b`, rebinds a) or "method" (`a.add_(b)`, writes a)."""
        operands = (a, b)
        e, run, replay = self._pick(cands, operands)
        if inplace == "method" and not replay and run.blocks[0] is a:
            run.blocks[0] = a.clone()  # the chain's start is about to be written: keep b0 apart
        chain = e.chain
        eager = not dynamo_compiling()
        call = run.call
        if eager and call is not None and call.grad_at_start and not torch.is_grad_enabled() \
                and run is call.current and not in_backward():
            raise PlanMismatchError(
                f"chain {chain.plan.index} of the converted {self.model_name}: sublayer {e.link} "
                f"({chain.plan.links[e.link].sublayer}) runs with gradients off inside a forward that has them on, "
                "as in a reentrant activation checkpoint (use_reentrant=True), which cannot carry gradients to the "
                "depth-attention sources of earlier layers; checkpoint with use_reentrant=False")
        x, y = operands[e.site.stream_arg], operands[1 - e.site.stream_arg]
        dtype = x.dtype if x.dtype == y.dtype else torch.promote_types(x.dtype, y.dtype)  # as the add would
        if y.dtype != dtype:
            y = y.to(dtype)
        tag = get_tag(x) if eager else None
        held = tag.branches if (tag is not None and tag.inner >= 0) else ()
        if e.inner >= 0:  # inner add of a parallel link: hold its branch, pass the plain sum on
            out = x.add_(y) if inplace == "method" else torch.add(x, y)
            if not replay:
                run.pending.append(y)
            if eager:
                set_tag(out, _Tag(run, e.link, e.inner, (*held, y)))
            return out
        if replay:
            branches = [*held, y]
            blocks, partial = run.snaps[e.link]
        else:
            branches = [*run.pending, y]
            run.pending = []
            blocks, partial = tuple(run.blocks), run.partial
        if inplace == "method" and operands[0] is branches[-1]:
            branches[-1] = branches[-1].clone()  # `y.add_(x)` writes y: keep the block's copy apart
        h = self._advance(chain, run, e.link, blocks, partial, branches, x, replay)
        if inplace == "method":  # the code reads the written tensor afterwards
            target = operands[0]
            target.copy_(h)
            h = target
        if eager:
            set_tag(h, _Tag(run, e.link))
        return h

    def _advance(self, chain: _ChainRuntime, run: _Run, l: int, blocks: tuple, partial, branches, x, replay):
        plan = chain.plan
        canon = blocks[0].shape
        out = branches[0]
        for extra in branches[1:]:
            out = out + extra
        if type(out) is not Tensor and _is_dtensor(out):
            check_branch_placement(out, plan.feature_axis, lambda: f"sublayer {l} ({plan.links[l].sublayer}) of chain "
                                   f"{plan.index}")
        if out.shape != canon:
            out = out.reshape(canon)
        new_partial = out if partial is None else partial + out
        last = l + 1 == len(plan.links)
        if last or (l + 1) % plan.block_size == 0:
            nblocks, npartial = (*blocks, new_partial), None
            sources = list(nblocks)
        else:
            nblocks, npartial = blocks, new_partial
            sources = [*blocks, new_partial]
        j = len(plan.links) if last else l + 1
        site = chain.sites[j]
        if j in chain.group_of and self._two_phase_now(sources[0]):
            h = _two_phase_site(chain, run, j, sources, plan.feature_axis)
        else:
            h = site_output(site, sources, plan.feature_axis, _Describe(chain, l, j))
        if not replay:
            if not dynamo_compiling() and torch.is_grad_enabled():
                run.snaps.append((blocks, partial))
            run.blocks, run.partial, run.next = list(nblocks), npartial, l + 1
            if last and run.call is not None:
                if run.call.current is run:
                    run.call.current = None
                run.call.completed += 1
        if h.shape != x.shape:
            h = h.reshape(x.shape)
        return h


def _two_phase_site(chain: _ChainRuntime, run: _Run, j: int, sources: list[Tensor], axis: int) -> Tensor:
    """Site j by the two-phase schedule: phase 1 once per group over its shared blocks (at the
    group's first site), phase 2 merges this site's last source."""
    members = chain.group_of[j]
    sources = _common_dtype(sources)
    if axis != -1:
        sources = [s.movedim(axis, -1) for s in sources]
    stats = run.phase1.get(members[0])
    if stats is None or j == members[0]:
        qs = torch.stack([chain.sites[k].query for k in members])
        gs = torch.stack([chain.sites[k].norm_weight for k in members])
        stats = torch.ops.attnres.depth_attention_phase1.default(sources[:-1], qs, gs, chain.sites[j].eps)
        run.phase1[members[0]] = stats
    o, m, z = stats
    k = members.index(j)
    site = chain.sites[j]
    h = torch.ops.attnres.depth_attention_phase2.default(o[k], m[k], z[k], sources[-1], site.query,
                                                         site.norm_weight, site.eps, site.scale)
    gate = getattr(site, "gate", None)   # absent on sites pickled before gates existed
    if gate is not None:
        h = _gated(gate, h, sources)
    if axis != -1:
        h = h.movedim(-1, axis)
    return h


def _common_dtype(sources: list[Tensor]) -> list[Tensor]:
    dtype = sources[0].dtype
    for s in sources[1:]:
        if s.dtype != dtype:
            dtype = torch.promote_types(dtype, s.dtype)
    return [s if s.dtype == dtype else s.to(dtype) for s in sources]


def site_output(site, sources: list[Tensor], axis: int, describe=None) -> Tensor:
    """One site's output over `sources` (the identity for a site with one source).

    describe(k) names source k and describe(None) the site, for the errors of DTensor sources."""
    if site is None:
        return sources[0]
    sources = _common_dtype(sources)
    if axis != -1:
        sources = [s.movedim(axis, -1) for s in sources]
    for s in sources:
        if type(s) is not Tensor and _is_dtensor(s):   # a tensor/sequence-parallel stream
            h = sharded_depth_attention(sources, site.query, site.norm_weight, site.eps, site.scale,
                                        describe=describe or _anonymous)
            break
    else:
        h = depth_attention_call(sources, site.query, site.norm_weight, site.eps, site.scale)
    gate = getattr(site, "gate", None)   # absent on sites pickled before gates existed
    if gate is not None:
        h = _gated(gate, h, sources)
    if axis != -1:
        h = h.movedim(-1, axis)
    return h


def _gated(gate: Tensor, h: Tensor, sources: list[Tensor]) -> Tensor:
    """h = a + gate * (h - a), a = the plain stream (the sum of the sources), in h's dtype."""
    a = sources[0]
    for s in sources[1:]:
        a = a + s
    return torch.lerp(a.to(h.dtype), h, gate.to(h.dtype))


def _is_dtensor(t: Tensor) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def _anonymous(k: int | None) -> str:
    return "a depth-attention site" if k is None else f"source {k}"


class _Describe:
    """describe(k) for the sources of the site read after link `l` of `chain`: names for
    ParallelPlanError (built per site call, read only on error)."""

    __slots__ = ("chain", "l", "j")

    def __init__(self, chain: _ChainRuntime, l: int, j: int):
        self.chain, self.l, self.j = chain, l, j

    def __call__(self, k: int | None) -> str:
        plan, l = self.chain.plan, self.l
        links, bs = plan.links, plan.block_size
        if k is None:
            target = f"sublayer {self.j} ({links[self.j].sublayer})" if self.j < len(links) else "the final output"
            return f"the depth-attention site of chain {plan.index} that feeds {target}"
        if k == 0:
            return "source 0 (the stream's start, b_0)"
        closed = l + 1 == len(links) or (l + 1) % bs == 0
        if not closed and k * bs > l:     # the last source: the block still being summed
            return f"source {k} (the running sum of the current block, last added from {links[l].sublayer})"
        return f"source {k} (block b_{k}, whose last branch is the output of {links[min(k * bs, len(links)) - 1].sublayer})"


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


def install(root: nn.Module, plan: ConversionPlan, params: nn.Module, *, trusted: bool = False) -> AttnResRuntime:
    """Install `plan` on `root` (mutates it: call on a private copy). Returns the runtime.

    trusted: the plan was made in this process (replay.ModelCode: what its adds may name)."""
    return AttnResRuntime(root, plan, params, trusted=trusted)
