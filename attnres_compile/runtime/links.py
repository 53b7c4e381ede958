"""The runtime's link logic, per call: which planned add an add is, and what it returns.

At a link a_{l+1} = a_l + f_l(h_l) the runtime returns the site h_{l+1} =
depth_attention(sources_{l+1}) instead (the final site after the last link), while the block
partial sums live in the run (state.py `Run`). `ChainCalls` is the part of AttnResRuntime
(core.py) that serves calls: opening and closing a call of a chain, picking the link an add is,
advancing the block state and running the site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import PlanMismatchError
from ..ops.sharded import check_branch_placement
from .mode import wrap_checkpoint_funcs
from .sites import _Describe, _is_dtensor, _two_phase_site, site_output
from .state import START, Run, _set_start, dynamo_compiling, get_tag, in_backward, set_tag, _Tag

if TYPE_CHECKING:  # annotations only: core.py imports this module
    from .core import _ChainRuntime, _Entry



class ChainCalls:
    """Calls and links of AttnResRuntime (its `entries`, `chains`, `calls`, `watcher`, `_expected`)."""

    two_phase: bool | None = None
    """None (default): the two-phase schedule serves sites in eager no-grad calls on CUDA, where
    its one read of the completed blocks per block pays; on CPU the single-pass op measured
    faster (docs/performance.md). True / False force it on / off (eager no-grad calls only:
    training needs the single-pass op's backward, and captures keep one node per site)."""

    def _two_phase_now(self, t: Tensor) -> bool:
        want = self.two_phase if self.two_phase is not None else t.is_cuda
        if not want or type(t) is not Tensor:  # first: the usual answer on CPU; subclasses (DTensor) run single-pass
            return False
        return not (torch.is_grad_enabled() or dynamo_compiling() or torch.compiler.is_exporting())

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
                    return e, Run(e.chain, operands[e.site.stream_arg], True), False
                if call is None:  # a layer called on its own, outside its owner
                    call = self.calls.loose(e.chain.index)
                start = operands[e.site.stream_arg]
                run = Run(e.chain, start, False, call)
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

    def _advance(self, chain: _ChainRuntime, run: Run, l: int, blocks: tuple, partial, branches, x, replay):
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
