"""Deriving the plan: capture the model in both modes, find its streams, choose the chains,
fix the plan and the report. What convert() runs once and a re-derivation runs again."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.fx import GraphModule

from ..errors import ModeMismatchError, NoEligibleChainError
from ..plan.config import AttnResConfig
from ..plan.types import ConversionPlan, SitePlan
from .build import chain_plan
from .capture import add_calls, capture, restore_forward, without_cache
from .find_chains import analyse_streams
from .graph_rewrite import rewrite_chain
from .inputs import inputs_spec, versions
from .report import ConversionReport, build_report, no_chain_message
from .select import match_modes, select_chains


def derive_plan(work: nn.Module, args: tuple, kwargs: dict, config: AttnResConfig
                ) -> tuple[ConversionPlan, ConversionReport]:
    """Capture `work` (unconverted; left as it was) in both modes and fix its conversion plan:
    convert()'s match step, and what a re-derivation of a saved plan runs again (rederive.py)."""
    name = type(work).__name__
    kwargs = without_cache(work, kwargs)
    was_training = work.training
    train_cap = capture(work, args, kwargs, training=True, copy_model=False, dynamic=config.dynamic)
    # The eval capture only pairs each train chain with its eval twin (same sublayers, same
    # layout): static shapes do for that, at half the time of a dynamic capture.
    eval_cap = capture(work, args, kwargs, training=False, copy_model=False, dynamic=False)
    restore_forward(work)
    work.train(was_training)
    train_gm, eval_gm = train_cap.module, eval_cap.module
    same = train_gm.code == eval_gm.code
    if same:
        eval_gm = None

    train_an = analyse_streams(train_gm.graph)
    eval_an = analyse_streams(eval_gm.graph) if eval_gm is not None else None
    mode_refused, eval_refused = [], []
    if eval_an is not None:
        if eval_gm._in_spec != train_gm._in_spec or eval_gm._out_spec != train_gm._out_spec:
            what, t, e = (("inputs", train_gm._in_spec, eval_gm._in_spec) if eval_gm._in_spec != train_gm._in_spec
                          else ("outputs", train_gm._out_spec, eval_gm._out_spec))
            raise ModeMismatchError(
                f"cannot convert {name}: its forward has a different structure of {what} in train mode "
                f"({' '.join(str(t).split())}) and in eval mode ({' '.join(str(e).split())}); one conversion "
                f"serves both modes, so both must take and return the same structure"
            )
        mode_refused, eval_refused, pairs = match_modes(train_an, eval_an, config)
    else:
        pairs = {}
    chains, plans, refused = select_chains(train_an, config, skip=mode_refused, pairs=pairs)
    refused += mode_refused
    report = build_report(name, train_an, chains, plans, refused, config, same, eval_refused=eval_refused)
    if not chains:
        raise NoEligibleChainError(no_chain_message(name, train_an, refused, config.preserve), report)

    calls = add_calls(train_gm.graph, train_cap.adds)
    plan = ConversionPlan(model=name, preserve=config.preserve, chains=[
        chain_plan(chain, cp[0].chain, s, cp, calls, root=work) for (chain, s), cp in zip(chains, plans)])
    plan.options = config.saved()
    plan.inputs = inputs_spec(args, kwargs)
    plan.versions = versions()
    report.checkpointed = _checkpoint_regions(plan, chains, calls)
    return plan, report


def _checkpoint_regions(plan: ConversionPlan, chains, calls: dict) -> list[tuple[int, str, str]]:
    """(chain, sublayer, function) of links inside an activation checkpoint of a plain function
    (not a module call, not Hugging Face's layer checkpointing)."""
    found = []
    for (chain, _), cp in zip(chains, plan.chains):
        for link, lp in zip(chain.links, cp.links):
            call = calls.get(link.add)
            if call is not None and call.checkpointed is not None:
                found.append((cp.index, lp.sublayer, call.checkpointed))
    return found


@dataclass
class GraphConversion:
    """A torch.fx GraphModule converted as its own program (what the `attnres` backend hands
    convert()): its captured ATen graph, the plan and report, and the chains to rewrite."""

    module: GraphModule
    plan: ConversionPlan
    report: ConversionReport
    chains: list                  # (captured chain, block size), selected
    sites: list[list[SitePlan]]   # per selected chain

    def rewrite(self) -> GraphModule:
        """Replace every selected chain's adds with its depth-attention sites, node by node
        (graph_rewrite.py), reading the AttnRes parameters from the `attnres` submodule the
        caller added; returns the recompiled module."""
        out = self.module
        for (chain, s), sites in zip(self.chains, self.sites):
            rewrite_chain(out, chain, sites, s)
        out.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure())
        out.graph.lint()
        out.recompile()
        out.attnres_report = self.report
        return out


def derive_graph_plan(gm: GraphModule, args: tuple, kwargs: dict, config: AttnResConfig) -> GraphConversion:
    """The plan of a GraphModule, captured once in its own mode."""
    name = type(gm).__name__
    cap = capture(gm, args, kwargs, training=gm.training, dynamic=False)
    out = cap.module
    analysis = analyse_streams(out.graph)
    chains, plans, refused = select_chains(analysis, config, graph=True)
    report = build_report(name, analysis, chains, plans, refused, config, True)
    if not chains:
        raise NoEligibleChainError(no_chain_message(name, analysis, refused, config.preserve), report)
    plan = ConversionPlan(model=name, preserve=config.preserve, chains=[
        chain_plan(chain, cp[0].chain, s, cp, root=out) for (chain, s), cp in zip(chains, plans)])
    return GraphConversion(out, plan, report, chains, plans)
