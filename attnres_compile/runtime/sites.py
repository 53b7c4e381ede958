"""One depth-attention site as the runtime runs it: single-pass (the op), two-phase (phase 1 once
per group of sites sharing their completed blocks, phase 2 per site), over DTensor sources
(ops/sharded.py), channels-first streams, and the retrofit study's optional gate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor
import torch

from ..ops.depth_attention import depth_attention_call
from ..ops.sharded import dtensor_type, sharded_depth_attention

if TYPE_CHECKING:  # annotations only: core.py imports this module
    from .core import _ChainRuntime
    from .state import Run



def _two_phase_site(chain: _ChainRuntime, run: Run, j: int, sources: list[Tensor], axis: int) -> Tensor:
    """Site j by the two-phase schedule: phase 1 once per group over its shared blocks (at the
    group's first site), phase 2 merges this site's last source."""
    members = chain.group_of[j]
    sources = _site_inputs(sources, axis)
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
    return _site_result(site, h, sources, axis)


def _site_inputs(sources: list[Tensor], axis: int) -> list[Tensor]:
    """The sources in one dtype (as the adds would promote them), features last."""
    dtype = sources[0].dtype
    for s in sources[1:]:
        if s.dtype != dtype:
            dtype = torch.promote_types(dtype, s.dtype)
    sources = [s if s.dtype == dtype else s.to(dtype) for s in sources]
    return sources if axis == -1 else [s.movedim(axis, -1) for s in sources]


def _site_result(site, h: Tensor, sources: list[Tensor], axis: int) -> Tensor:
    """The site's output h, gated where the site has a gate, features back on `axis`."""
    gate = getattr(site, "gate", None)   # absent on sites pickled before gates existed
    if gate is not None:
        h = _gated(gate, h, sources)
    return h if axis == -1 else h.movedim(-1, axis)


def site_output(site, sources: list[Tensor], axis: int, describe=None) -> Tensor:
    """One site's output over `sources` (the identity for a site with one source).

    describe(k) names source k and describe(None) the site, for the errors of DTensor sources."""
    if site is None:
        return sources[0]
    sources = _site_inputs(sources, axis)
    for s in sources:
        if type(s) is not Tensor and _is_dtensor(s):   # a tensor/sequence-parallel stream
            h = sharded_depth_attention(sources, site.query, site.norm_weight, site.eps, site.scale,
                                        describe=describe or _anonymous)
            break
    else:
        h = depth_attention_call(sources, site.query, site.norm_weight, site.eps, site.scale)
    return _site_result(site, h, sources, axis)


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
