"""Re-deriving a saved plan whose code moved (another release of the model's library edited the
planned lines): capture the freshly built model again with the saved options, and keep the new
plan only when it has the saved layout, so the saved AttnRes weights mean what they meant.

The runtime locates a saved plan (runtime/replay.py) and calls `rederive` when a line moved;
it is handed this function, and never imports conversion.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import LayoutChangedError, NoEligibleChainError
from ..plan.config import AttnResConfig
from ..plan.types import ConversionPlan
from .derive import derive_plan
from .inputs import example_inputs, versions, versions_text


def rederive(model: nn.Module, saved: ConversionPlan, reason: str) -> ConversionPlan:
    """The plan of `model` (unconverted) as its code is now, with the saved plan's options and
    layout; raises LayoutChangedError naming the first difference when the structure changed."""
    args, kwargs = example_inputs(model, saved)
    config = AttnResConfig.of_plan(saved.options, saved.preserve)
    wanted = {tuple(lk.sublayer for lk in cp.links) for cp in saved.chains}

    def derive(filter_fn):
        return derive_plan(model, args, kwargs, config.replace(filter_fn=filter_fn))[0]

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
    then = versions_text(saved.versions)
    warnings.warn(
        f"attnres_compile: the plan saved with this {saved.model}{' (' + then + ')' if then else ''} names code "
        f"that moved ({reason}); it was re-derived from the model's code as it is now ({versions_text(versions())})"
        ", with the saved layout: the saved AttnRes weights load unchanged", stacklevel=3)
    return new


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
