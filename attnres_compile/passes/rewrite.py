"""Replace step: make a module run its residual streams as Block AttnRes, at every call.

The match step finds each residual add on a captured graph and the plan names it by where it
runs (plan.py: module, file, line). Installing a plan leaves the model's own code, modules
and methods in place and changes one thing: while a chain's owner runs, a torch function mode
(`_LinkMode`) watches `add` calls, and an add that is link l of a planned chain

    a_{l+1} = a_l + f_l(h_l)

returns the site h_{l+1} = depth_attention(sources_{l+1}) instead (the final site after the
last link), while the block partial sums live beside it (`_Run`). Every reader of a_{l+1}
(the next sublayer, returned hidden states, the final norm) so reads h_{l+1}, exactly as in a
graph rewrite that turns each stream value into its site, and nothing else of the model
changes: any keyword, cache, shape, dtype, autocast, mode, hook, adapter or sharding the model
supports keeps working, and every capture of the converted model (torch.export, ONNX,
torch.compile) records one `attnres::depth_attention` node per site.

Matching at call time. An add is a link when its caller's code location (file, line) and the
module whose forward runs it (`self` of that frame or one it was called from) are the plan's.
In eager and in non-strict capture the frames are Python's own; under Dynamo the same
information comes from the frames Dynamo is tracing (`_dynamo_location`), evaluated once per
trace as a constant. Which link of a chain an add is (one module may run several, a shared
layer runs its lines more than once) follows the chain's order: each site output carries a
tag naming its run and link, and otherwise the run in progress says which link comes next.

Activation checkpointing. A recomputed region runs its adds again, in backward: the wrappers
that enter the mode sit on the modules' forwards and on Hugging Face's
`_gradient_checkpointing_func`, so the recompute is converted too, and a link whose stream
operand is tagged by an earlier link replays that link from the run's snapshot instead of
advancing it. Reentrant checkpoints cannot carry gradients to sources outside the region, so a
link inside one is an error that says so.
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import PlanMismatchError
from ..ops.depth_attention import depth_attention_call
from .plan import AddSite, ChainPlan, ConversionPlan

_TB = torch._C.TensorBase
_ADD_FUNCS = frozenset({
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
    torch.Tensor.__iadd__, _TB.add, _TB.__add__, _TB.__radd__, _TB.add_, _TB.__iadd__,
})
_INPLACE = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__, _TB.add_, _TB.__iadd__})
_IADD = frozenset({torch.Tensor.__iadd__, _TB.__iadd__})  # `x += y`: Python rebinds x to the result
_REVERSED = frozenset({torch.Tensor.__radd__, _TB.__radd__})
_FRAME_WALK = 8  # frames searched upward for the module that runs an add (helpers in between)


def _dynamo_compiling() -> bool:
    return torch.compiler.is_dynamo_compiling()


# -- the per-call state of one chain -------------------------------------------------------------

class _Run:
    """One pass of a chain: completed blocks, the running partial sum, the next link."""

    __slots__ = ("chain", "blocks", "partial", "next", "snaps", "pending", "detached", "phase1", "__weakref__")

    def __init__(self, chain: _ChainRuntime, start: Tensor, detached: bool):
        self.chain = chain
        self.blocks = [start]
        self.partial = None
        self.next = 0
        self.snaps: list[tuple[tuple, Tensor | None]] = []  # (blocks, partial) before each link
        self.pending: list[Tensor] = []  # branches held by the inner adds of a parallel link
        self.detached = detached  # started inside backward (a recompute): not the chain's current run
        self.phase1: dict[int, tuple] = {}  # first site of a two-phase group -> (o, m, z)


@dataclass(frozen=True)
class _Tag:
    """Set on tensors the mode returns, so a later add knows which run and link produced them."""

    run: _Run
    link: int
    inner: int = -1                  # >= 0: the k-th inner add of a parallel link
    branches: tuple = ()             # that inner add's branches so far


_TAG = "_attnres_tag"


class _ChainRuntime:
    def __init__(self, plan: ChainPlan, owner: nn.Module, sites: list):
        self.plan = plan
        self.owner = owner
        self.sites = sites            # per site index (0..L, L = final): DepthAttentionSite or None
        self.current: _Run | None = None
        self.last = None              # weakref to the last run started: what a recompute replays
        self.completed = 0
        self.grad_at_start = True
        # Two-phase groups (SPEC section 3): sites whose sources share all but the last one
        # (the completed blocks), and eps; phase 1 reads the shared blocks once for all of them.
        groups: dict[tuple, list[int]] = {}
        for j, sp in enumerate(plan.sites):
            if sp.param_prefix is not None:
                groups.setdefault((sp.schedule.sources[:-1], sp.eps), []).append(j)
        self.group_of = {j: members for members in groups.values() if len(members) > 1 for j in members}

    def __getstate__(self):
        d = self.__dict__.copy()
        d["current"], d["last"], d["completed"] = None, None, 0
        return d


@dataclass(frozen=True)
class _Entry:
    """One add the plan knows, at one code location."""

    container: nn.Module
    chain: _ChainRuntime
    link: int
    inner: int            # -1: the link's (outer) add; k >= 0: its k-th absorbed inner add
    site: AddSite


# -- the torch function mode ---------------------------------------------------------------------

class _LinkMode(TorchFunctionMode):
    """Active while a chain's owner (or a container, or a checkpoint recompute) runs."""

    def __init__(self, runtime: AttnResRuntime):
        super().__init__()
        self.runtime = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _ADD_FUNCS:
            out = self.runtime._on_add(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **(kwargs or {}))


_TORCH_FUNCTION_CODE = _LinkMode.__torch_function__.__code__
_RUNTIMES: weakref.WeakValueDictionary[int, AttnResRuntime] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


@torch.compiler.assume_constant_result
def _dynamo_location(token: int) -> tuple[int, ...]:
    """Indices of the plan entries an add being traced by Dynamo can be (a trace-time constant).

    Dynamo inlines `_LinkMode.__torch_function__`; the frame it was called from, and the
    modules (`self`) of the frames above it, are Dynamo's own translators' state.
    """
    rt = _RUNTIMES.get(token)
    if rt is None:
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
        while tx is not None and len(frames) < _FRAME_WALK:
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
    return rt._match(file, line, None, [s for *_, s in frames], cols=cols)


# -- the runtime ---------------------------------------------------------------------------------

class _ForwardInMode:
    """`module.forward` of an owner or container: the model's own forward, run inside the mode.

    Set on the instance, so hooks, `module.forward(...)` called directly (PEFT does) and
    wrappers that others install later all go through it; `inspect.signature` sees the
    model's own signature.
    """

    def __init__(self, runtime: AttnResRuntime, module: nn.Module, chains: list[int]):
        self.runtime = runtime
        self.module = module
        self.inner = module.__dict__.get("forward")  # an instance forward set before ours
        self.chains = chains                         # chains this module owns

    def _target(self):
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    # Look like the model's forward to whoever inspects it (inspect.signature, torch.export's
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
        return getattr(self._target(), "__name__", "forward")

    @property
    def __doc__(self):
        return self._target().__doc__

    def __call__(self, *args, **kwargs):
        rt = self.runtime
        if self.chains:
            rt._begin(self.chains)
            try:
                out = rt._in_mode(self._target(), args, kwargs)
            except BaseException:
                rt._abort(self.chains)
                raise
            rt._end(self.chains)
            return out
        return rt._in_mode(self._target(), args, kwargs)


class _RecomputeInMode:
    """The function Hugging Face checkpoints, entering the mode when it runs (also in recompute)."""

    def __init__(self, runtime: AttnResRuntime, fn):
        self.runtime, self.fn = runtime, fn

    def __call__(self, *args, **kwargs):
        return self.runtime._in_mode(self.fn, args, kwargs)


class _CheckpointFunc:
    """Wraps a module's `_gradient_checkpointing_func` so the checkpointed function enters the mode."""

    def __init__(self, runtime: AttnResRuntime, func):
        self.runtime, self.func = runtime, func

    def __call__(self, fn, *args, **kwargs):
        return self.func(_RecomputeInMode(self.runtime, fn), *args, **kwargs)


class AttnResRuntime:
    """The installed plan of one converted model (`converted.attnres.runtime`)."""

    def __init__(self, root: nn.Module, plan: ConversionPlan, params: nn.Module):
        self.plan = plan
        self.model_name = plan.model
        self.chains: list[_ChainRuntime] = []
        self.entries: list[_Entry] = []
        for cp in plan.chains:
            owner = _module_at(root, cp.owner, f"chain {cp.index}'s owner")
            sites = []
            chain_params = getattr(params, f"chain{cp.index}", None)
            for sp in cp.sites:
                sites.append(None if sp.param_prefix is None else getattr(chain_params, sp.name))
            chain = _ChainRuntime(cp, owner, sites)
            self.chains.append(chain)
            for li, link in enumerate(cp.links):
                for k, add in enumerate([*link.absorbed, link.add]):
                    inner = k if k < len(link.absorbed) else -1
                    container = _module_at(root, add.container, f"chain {cp.index}, sublayer {li}")
                    add = _located(add, cp.index, li)
                    self.entries.append(_Entry(container, chain, li, inner, add))
        self._wrap(root)
        self._setup()

    # -- install ---------------------------------------------------------------------------
    def _wrap(self, root: nn.Module) -> None:
        owned: dict[int, list[int]] = {}
        modules: dict[int, nn.Module] = {}
        for i, c in enumerate(self.chains):
            owned.setdefault(id(c.owner), []).append(i)
            modules[id(c.owner)] = c.owner
        for e in self.entries:
            modules.setdefault(id(e.container), e.container)
        for key, m in modules.items():
            fwd = m.__dict__.get("forward")
            if isinstance(fwd, _ForwardInMode):
                raise PlanMismatchError(f"{type(m).__name__} at {_path_of(root, m)!r} is already converted "
                                        "by attnres_compile; convert the original model instead")
            m.forward = _ForwardInMode(self, m, owned.get(key, []))

    def _setup(self) -> None:
        self.token = next(_TOKENS)
        _RUNTIMES[self.token] = self
        self._tls = threading.local()
        self._by_line: dict[tuple[str, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            self._by_line.setdefault((e.site.file, e.site.line), []).append(i)
        # Bytecode offsets hold for the Python that made the plan; another one matches lines only.
        self._use_lasti = self.plan.python == f"{sys.version_info[0]}.{sys.version_info[1]}"

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in ("_tls", "_by_line", "token"):
            d.pop(k, None)
        return d

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    # -- two-phase inference ---------------------------------------------------------------
    two_phase: bool | None = None
    """None (default): the two-phase schedule serves sites in eager no-grad calls on CUDA, where
    its one read of the completed blocks per block pays; on CPU the single-pass op measured
    faster (docs/performance.md). True / False force it on / off (eager no-grad calls only:
    training needs the single-pass op's backward, and captures keep one node per site)."""

    def _two_phase_now(self, t: Tensor) -> bool:
        if torch.is_grad_enabled() or _dynamo_compiling() or torch.compiler.is_exporting():
            return False
        want = self.two_phase if self.two_phase is not None else t.is_cuda
        if not want:
            return False
        from .two_phase import two_phase_available

        return two_phase_available()

    # -- scopes ----------------------------------------------------------------------------
    def _in_mode(self, fn, args, kwargs):
        if _dynamo_compiling():
            with _LinkMode(self):
                return fn(*args, **kwargs)
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        if depth:
            return fn(*args, **kwargs)
        tls.depth = 1
        try:
            with _LinkMode(self):
                return fn(*args, **kwargs)
        finally:
            tls.depth = 0

    def _begin(self, chain_ids: list[int]) -> None:
        grad = torch.is_grad_enabled()
        for i in chain_ids:
            c = self.chains[i]
            c.current, c.completed, c.grad_at_start = None, 0, grad
        if not _dynamo_compiling():
            self._wrap_checkpoint_funcs()

    def _abort(self, chain_ids: list[int]) -> None:
        for i in chain_ids:
            self.chains[i].current = None

    def _end(self, chain_ids: list[int]) -> None:
        for i in chain_ids:
            c = self.chains[i]
            run, done = c.current, c.completed
            c.current, c.completed = None, 0
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

    def _wrap_checkpoint_funcs(self) -> None:
        seen = set()
        for e in self.entries:
            m = e.container
            if id(m) in seen:
                continue
            seen.add(id(m))
            f = m.__dict__.get("_gradient_checkpointing_func")
            if f is not None and not isinstance(f, _CheckpointFunc):
                m._gradient_checkpointing_func = _CheckpointFunc(self, f)

    # -- matching --------------------------------------------------------------------------
    def _match(self, file: str, line: int, lasti: int | None, selves: list, cols=None) -> tuple[int, ...]:
        """Entries planned at (file, line) for the innermost module among `selves`; `lasti`
        (eager: the frame's bytecode offset) or `cols` (Dynamo: the instruction's column span)
        picks among several adds on one line."""
        idx = self._by_line.get((file, line))
        if not idx:
            return ()
        if self._use_lasti and lasti is not None:
            idx = [i for i in idx if self.entries[i].site.lasti in (None, lasti)]
        if cols is not None:
            idx = [i for i in idx if self.entries[i].site.cols in (None, cols)]
        for s in selves:
            if s is None:
                continue
            found = tuple(i for i in idx if self.entries[i].container is s)
            if found:
                return found
        return ()

    def _locate(self) -> tuple[int, ...]:
        if _dynamo_compiling():
            return _dynamo_location(self.token)
        f = sys._getframe(3)  # _locate <- _on_add <- __torch_function__ <- the add's caller
        while f is not None and f.f_code.co_name == "__torch_function__":  # modes entered above ours
            f = f.f_back
        if f is None:
            return ()
        idx = self._by_line.get((f.f_code.co_filename, f.f_lineno))
        if not idx:
            return ()
        selves = []
        g = f
        while g is not None and len(selves) < _FRAME_WALK:
            selves.append(g.f_locals.get("self"))
            g = g.f_back
        return self._match(f.f_code.co_filename, f.f_lineno, f.f_lasti, selves)

    def _on_add(self, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return NotImplemented
        a, b = args
        if func in _REVERSED:
            a, b = b, a
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return NotImplemented
        cands = self._locate()
        if not cands:
            return NotImplemented
        inplace = None if func not in _INPLACE else ("iadd" if func in _IADD else "method")
        return self._link(cands, a, b, inplace)

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
        eager = not _dynamo_compiling()
        if eager:
            for i in cands:
                e = self.entries[i]
                tag = getattr(operands[e.site.stream_arg], _TAG, None)
                if tag is not None and tag.run.chain is e.chain and (tag.link, tag.inner) == self._expected_tag(e):
                    return e, tag.run, tag.run.next > e.link
            if torch._C._current_graph_task_id() != -1:
                # A recompute in backward whose stream operand lost its tag (saved-tensor hooks
                # such as save_on_cpu hand back other tensor objects): replay the chain's last run.
                for i in cands:
                    e = self.entries[i]
                    last = e.chain.last() if e.chain.last is not None else None
                    if last is not None and e.link < len(last.snaps):
                        return e, last, True
        # an untagged stream operand (Dynamo, or a cast in between): the run in progress says
        for i in cands:
            e = self.entries[i]
            run = e.chain.current
            pending = len(e.chain.plan.links[e.link].absorbed) if e.inner == -1 else e.inner
            if run is not None and run.next == e.link and len(run.pending) == pending:
                return e, run, False
            if run is None and self._expected_tag(e) is None:
                detached = eager and torch._C._current_graph_task_id() != -1
                run = _Run(e.chain, operands[e.site.stream_arg], detached)
                if not detached:  # a recompute in backward replays; it is not this call's run
                    e.chain.current = run
                    e.chain.last = weakref.ref(run)
                return e, run, False
        e = self.entries[cands[0]]
        run = e.chain.current
        raise PlanMismatchError(
            f"chain {e.chain.plan.index} of the converted {self.model_name}: the residual add at {e.site.where()} "
            f"(sublayer {e.link}, {e.chain.plan.links[e.link].sublayer}) ran out of order ("
            + (f"sublayer {run.next} was next" if run is not None else "the chain had not started")
            + "); the model ran its sublayers in another order than the one it was converted on")

    def _link(self, cands, a: Tensor, b: Tensor, inplace: str | None):
        """inplace: None, "iadd" (`a += b`, rebinds a) or "method" (`a.add_(b)`, writes a)."""
        operands = (a, b)
        e, run, replay = self._pick(cands, operands)
        if inplace == "method" and not replay and run.blocks[0] is a:
            run.blocks[0] = a.clone()  # the chain's start is about to be written: keep b0 apart
        chain = e.chain
        eager = not _dynamo_compiling()
        if eager and chain.grad_at_start and not torch.is_grad_enabled() and run is chain.current \
                and torch._C._current_graph_task_id() == -1:
            raise PlanMismatchError(
                f"chain {chain.plan.index} of the converted {self.model_name}: sublayer {e.link} "
                f"({chain.plan.links[e.link].sublayer}) runs with gradients off inside a forward that has them on, "
                "as in a reentrant activation checkpoint (use_reentrant=True), which cannot carry gradients to the "
                "depth-attention sources of earlier layers; checkpoint with use_reentrant=False")
        x, y = operands[e.site.stream_arg], operands[1 - e.site.stream_arg]
        dtype = x.dtype if x.dtype == y.dtype else torch.promote_types(x.dtype, y.dtype)  # as the add would
        if y.dtype != dtype:
            y = y.to(dtype)
        tag = getattr(x, _TAG, None) if eager else None
        held = tag.branches if (tag is not None and tag.inner >= 0) else ()
        if e.inner >= 0:  # inner add of a parallel link: hold its branch, pass the plain sum on
            out = x.add_(y) if inplace == "method" else torch.add(x, y)
            if not replay:
                run.pending.append(y)
            if eager:
                _set_tag(out, _Tag(run, e.link, e.inner, (*held, y)))
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
            _set_tag(h, _Tag(run, e.link))
        return h

    def _advance(self, chain: _ChainRuntime, run: _Run, l: int, blocks: tuple, partial, branches, x, replay):
        plan = chain.plan
        canon = blocks[0].shape
        out = branches[0]
        for extra in branches[1:]:
            out = out + extra
        if out.shape != canon:
            out = out.reshape(canon)
        new_partial = out if partial is None else partial + out
        last = l + 1 == len(plan.links)
        if last:
            nblocks, npartial = (*blocks, new_partial), None
            sources = list(nblocks)
        elif (l + 1) % plan.block_size == 0:
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
            h = _site_output(site, sources, plan.feature_axis)
        if not replay:
            if not _dynamo_compiling() and torch.is_grad_enabled():
                run.snaps.append((blocks, partial))
            run.blocks, run.partial, run.next = list(nblocks), npartial, l + 1
            if last:
                if chain.current is run:
                    chain.current = None
                chain.completed += 1
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
    if axis != -1:
        h = h.movedim(-1, axis)
    return h


def _common_dtype(sources: list[Tensor]) -> list[Tensor]:
    dtype = sources[0].dtype
    for s in sources[1:]:
        if s.dtype != dtype:
            dtype = torch.promote_types(dtype, s.dtype)
    return [s if s.dtype == dtype else s.to(dtype) for s in sources]


def _site_output(site, sources: list[Tensor], axis: int) -> Tensor:
    if site is None:  # one source: the identity
        return sources[0]
    sources = _common_dtype(sources)
    if axis != -1:
        sources = [s.movedim(axis, -1) for s in sources]
    h = depth_attention_call(sources, site.query, site.norm_weight, site.eps, site.scale)
    if axis != -1:
        h = h.movedim(-1, axis)
    return h


def _set_tag(t: Tensor, tag: _Tag) -> None:
    try:
        setattr(t, _TAG, tag)
    except (AttributeError, TypeError):  # a tensor type without a __dict__: order decides alone
        pass


# -- helpers -------------------------------------------------------------------------------------

def _module_at(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError as exc:
        raise PlanMismatchError(f"the plan names module {path!r} for {what}, which {type(root).__name__} "
                                f"does not have") from exc


def _path_of(root: nn.Module, m: nn.Module) -> str:
    for name, sub in root.named_modules():
        if sub is m:
            return name
    return "?"


def _located(add: AddSite, chain: int, link: int) -> AddSite:
    """The plan's add, with its file as this process names it (a plan saved on another machine or
    in another environment names the module's file elsewhere), checked to still hold the code."""
    import dataclasses
    import importlib
    import linecache

    if add.file.startswith("<"):  # generated code (an fx GraphModule): nothing to find or check
        return add
    path = add.file
    if not os.path.exists(path) and add.module_name:
        try:
            found = getattr(importlib.import_module(add.module_name), "__file__", None)
        except ImportError:
            found = None
        if found:
            path = found
    if not os.path.exists(path):
        raise PlanMismatchError(f"chain {chain}, sublayer {link}: the plan's residual add is in {add.file} "
                                f"(module {add.module_name or 'unknown'}), which this environment does not have")
    text = linecache.getline(path, add.line).strip()
    if add.code and text != add.code:
        raise PlanMismatchError(
            f"chain {chain}, sublayer {link}: the plan expects `{add.code}` at {path}:{add.line}, but that line "
            f"is `{text}`; the model's code changed since it was converted (another version of its library?)")
    return add if path == add.file else dataclasses.replace(add, file=path)


def install(root: nn.Module, plan: ConversionPlan, params: nn.Module) -> AttnResRuntime:
    """Install `plan` on `root` (mutates it: call on a private copy). Returns the runtime."""
    return AttnResRuntime(root, plan, params)
