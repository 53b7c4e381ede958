"""Per-call state: owned by the call, never by the shared model.

A converted model is called from many threads at once (a web server, a pool of `generate()`
calls), inside hooks of itself, and recomputed in backward by activation checkpointing, maybe
on an autograd worker thread. So nothing about a call in progress lives on the model:

* a `Run` is one pass of one chain (its completed blocks, the running partial sum, the next
  link); it lives in the call that started it and on the tensors it produced (`_Tag`);
* a `_ChainCall` is one call of a chain's owner: which run is in progress and whether the
  chain ran; calls of one chain on one thread nest as a stack (a model called inside a hook
  of itself gets a fresh run and gives the outer one back when it returns);
* the stacks are per thread (`threading.local`) in eager code; while Dynamo traces they are a
  plain attribute of the runtime, which Dynamo tracks as a side effect of the frame (a trace
  runs one frame at a time, and the stack is empty again when the frame returns).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor


def dynamo_compiling() -> bool:
    return torch.compiler.is_dynamo_compiling()


def in_backward() -> bool:
    """Whether this code runs inside autograd's backward (a checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


class Run:
    """One pass of a chain: completed blocks, the running partial sum, the next link."""

    __slots__ = ("chain", "blocks", "partial", "next", "snaps", "pending", "detached", "phase1", "call",
                 "__weakref__")

    def __init__(self, chain, start: Tensor, detached: bool, call: _ChainCall | None = None):
        self.chain = chain
        self.blocks = [start]
        self.partial = None
        self.next = 0
        self.snaps: list[tuple[tuple, Tensor | None]] = []  # (blocks, partial) before each link
        self.pending: list[Tensor] = []  # branches held by the inner adds of a parallel link
        self.detached = detached  # started inside backward (a recompute): no call's current run
        self.phase1: dict[int, tuple] = {}  # first site of a two-phase group -> (o, m, z)
        self.call = call  # the owner call this run belongs to (None: detached)


class _ChainCall:
    """One call of a chain's owner (or a pipeline stage): its run in progress and what ran."""

    __slots__ = ("current", "completed", "grad_at_start", "loose")

    def __init__(self, grad_at_start: bool, loose: bool = False):
        self.current: Run | None = None
        self.completed = 0
        self.grad_at_start = grad_at_start
        self.loose = loose  # joined by layers called outside their owner: never ended


class _Tag:
    """Set on tensors a link returns, so a later add knows which run and link produced them.
    (A plain slotted class, not a frozen dataclass: one is made per planned add.)"""

    __slots__ = ("run", "link", "inner", "branches")

    def __init__(self, run: Run, link: int, inner: int = -1, branches: tuple = ()):
        self.run = run
        self.link = link
        self.inner = inner        # >= 0: the k-th inner add of a parallel link
        self.branches = branches  # that inner add's branches so far


TAG = "_attnres_tag"


def set_tag(t: Tensor, tag: _Tag) -> None:
    try:
        setattr(t, TAG, tag)
    except (AttributeError, TypeError):  # a tensor type without a __dict__: order decides alone
        pass


START = "_attnres_start"


def _set_start(t: Tensor, run: Run) -> None:
    """Mark the tensor a run started from (weakly: a user's input must not keep a run alive)."""
    try:
        setattr(t, START, weakref.ref(run))
    except (AttributeError, TypeError):
        pass


def get_tag(t) -> _Tag | None:
    return getattr(t, TAG, None)


class CallStacks:
    """The `_ChainCall` stacks of every chain, per thread (eager) or per trace (Dynamo)."""

    def __init__(self, num_chains: int):
        self.num_chains = num_chains
        self._tls = threading.local()
        self.trace: list[list[_ChainCall]] = [[] for _ in range(num_chains)]

    def stacks(self) -> list[list[_ChainCall]]:
        if dynamo_compiling():
            return self.trace
        s = getattr(self._tls, "stacks", None)
        if s is None:
            s = self._tls.stacks = [[] for _ in range(self.num_chains)]
            self._tls.last = [None] * self.num_chains
        return s

    def top(self, chain: int) -> _ChainCall | None:
        s = self.stacks()[chain]
        return s[-1] if s else None

    def push(self, chain: int, grad: bool) -> _ChainCall:
        call = _ChainCall(grad)
        self.stacks()[chain].append(call)
        return call

    def pop(self, chain: int) -> _ChainCall | None:
        s = self.stacks()[chain]
        return s.pop() if s else None

    def loose(self, chain: int) -> _ChainCall:
        """The call a chain start joins when no owner call is active on this thread (a layer
        called on its own): a thread-wide one that is never ended."""
        if dynamo_compiling():
            s = self.trace[chain]
            if not s:
                s.append(_ChainCall(torch.is_grad_enabled(), loose=True))
            return s[-1]
        self.stacks()
        loose = getattr(self._tls, "loose", None)
        if loose is None:
            loose = self._tls.loose = [None] * self.num_chains
        if loose[chain] is None:
            loose[chain] = _ChainCall(torch.is_grad_enabled(), loose=True)
        return loose[chain]

    def remember(self, chain: int, run: Run) -> None:
        if dynamo_compiling():
            return
        self.stacks()
        self._tls.last[chain] = weakref.ref(run)

    def last(self, chain: int) -> Run | None:
        """The last run this thread started of `chain`, while something still holds it. A
        recompute whose stream operand lost its tag replays it (a CPU backward runs on the
        thread of its forward; never another thread's run: that would mix two calls)."""
        self.stacks()
        ref = self._tls.last[chain]
        return ref() if ref is not None else None
