"""The graph passes the `attnres` backend runs on a converted graph, in order.

Each is a small match/replace over the `attnres::depth_attention` site nodes of the Dynamo
graph (match.py), reports how many sites it rewrote, and says when it applies, as Inductor's
fx_passes do:

1. `two_phase_sites` (gradients off, on CUDA or `two_phase=True`): sites of one block share
   one phase-1 read of their completed blocks (SPEC section 3);
2. `fuse_epilogues` (CUDA, `fuse=True`): a site fused with the partial-sum add before it or
   the norm after it, one generated Triton kernel each;
3. `decompose_sites` (CPU, `decompose=True`): the site as plain arithmetic (ops/reference.py),
   which Inductor generates and fuses with its neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import GraphModule

from ...plan.config import AttnResConfig
from .decompose_sites import decompose_sites
from .fuse_epilogues import fuse_epilogues
from .match import is_depth_attention
from .two_phase_sites import to_two_phase

__all__ = ["PASSES", "GraphPass", "PassContext", "is_depth_attention", "run_passes"]

log = logging.getLogger("attnres_compile")


@dataclass(frozen=True)
class PassContext:
    """What decides which passes apply to a graph."""

    cuda: bool              # the graph's inputs are on CUDA
    grad: bool              # gradients are on (training graphs keep the single-pass op's backward)
    config: AttnResConfig   # the backend's options


@dataclass(frozen=True)
class GraphPass:
    name: str
    applies: Callable[[PassContext], bool]
    run: Callable[[GraphModule], int | dict]   # sites rewritten (or counts by kind)


PASSES: tuple[GraphPass, ...] = (
    GraphPass("two_phase_sites", lambda c: not c.grad and (c.cuda or c.config.two_phase), to_two_phase),
    GraphPass("fuse_epilogues", lambda c: c.cuda and c.config.fuse, fuse_epilogues),
    GraphPass("decompose_sites", lambda c: not c.cuda and c.config.decompose, decompose_sites),
)


def run_passes(gm: GraphModule, context: PassContext) -> dict[str, int]:
    """Run every pass that applies, in order; returns {pass name: sites rewritten} of those that ran."""
    fired = {}
    for p in PASSES:
        if p.applies(context):
            n = p.run(gm)
            fired[p.name] = sum(n.values()) if isinstance(n, dict) else n
    log.debug("attnres backend passes: %s", fired)
    return fired
