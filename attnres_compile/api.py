"""The public verbs: convert a model, install a saved plan, and the AttnRes parameters' forms.

`convert` composes the two halves of the package that never import each other: conversion
(conversion/: capture, streams, the plan) and the runtime (runtime/: install and serve the plan);
`apply_plan` installs a saved plan, re-deriving it (conversion/rederive.py) where the model's code
moved. Everything else public is re-exported from the package (`attnres_compile.*`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .conversion.capture import normalize_inputs, without_cache
from .conversion.derive import derive_graph_plan, derive_plan
from .conversion.rederive import rederive
from .conversion.report import ConversionReport
from .conversion.select import ChainInfo
from .plan import ConversionPlan, read_plan
from .plan.config import AttnResConfig
from .runtime import install
from .runtime.params import (AttnResParameters, AttnResSequential, attnres_parameters, attnres_state_dict,
                             build_parameters, is_converted, load_attnres_state_dict, read_attnres_file,
                             save_attnres)

__all__ = ["AttnResConfig", "AttnResParameters", "ChainInfo", "apply_plan", "attnres_parameters",
           "attnres_state_dict", "convert", "is_converted", "load_attnres_state_dict", "read_attnres_file",
           "save_attnres"]

_UNSET = object()


def convert(model: nn.Module, example_inputs, *, kwargs: dict | None = None, config: AttnResConfig | None = None,
            num_blocks=_UNSET, block_size=_UNSET, preserve=_UNSET, eps=_UNSET, dynamic=_UNSET,
            filter_fn=_UNSET) -> nn.Module:
    """Convert the PreNorm residual streams of `model` into Block Attention Residuals.

    The model is captured once per mode (torch.export, non-strict) on `example_inputs` to find
    its residual streams and fix a plan; the result is a private copy of the model, of the same
    class and module tree, that runs those streams as depth attention at every call. It takes
    whatever the original takes (other keywords, `None`s, shapes, caches, autocast, dtype and
    device moves, train and eval), keeps the original's methods (`generate`, `save_pretrained`)
    and hooks, and pickles.

    Args:
        model: any module torch.export (non-strict) can trace. It is never modified.
        example_inputs: positional arguments for `model.forward` (a tuple, or one tensor),
            used for the capture only.
        kwargs: keyword arguments for the capture (e.g. ``{"attention_mask": mask}``); a
            forward that takes `use_cache` is captured with ``use_cache=False`` unless given.
        num_blocks: N, blocks per stream (block size S = ceil(L / N) sublayers). Default 8.
        block_size: S in sublayers (each attention and each MLP is one); 1 is Full AttnRes.
        preserve: "scale" (the paper: zero queries give each sublayer the stream / M, which a
            PreNorm consumer cannot tell apart) or "exact" (site output times M: at step 0 the
            original stream up to float32 summation order, for any consumer; also admits
            non-PreNorm chains).
        eps: RMS eps of every site; default the eps of the norm each site feeds, else 1e-6.
        dynamic: capture every input dimension as `Dim.AUTO` (False: the example's shapes).
            The converted model runs on any shape either way.
        filter_fn: ``filter_fn(chain) -> bool`` chooses which chains to convert; `chain` is a
            `ChainInfo` (module paths of its sublayers, owner, start). The rest are reported
            "not selected".
        config: an AttnResConfig holding these options at once (the keyword options then
            replace its fields).

    Returns:
        The converted copy. `converted.attnres` holds the new parameters
        (`attnres.chain<c>.<site>.{query,norm_weight}`), the plan and the report;
        `converted.attnres_report` is the ConversionReport.
    """
    options = {k: v for k, v in dict(num_blocks=num_blocks, block_size=block_size, preserve=preserve, eps=eps,
                                     dynamic=dynamic, filter_fn=filter_fn).items() if v is not _UNSET}
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = (config or AttnResConfig()).replace(**options)  # validated once, here
    args, kwargs = normalize_inputs(example_inputs, kwargs)
    if isinstance(getattr(model, "attnres", None), AttnResParameters):
        raise TypeError(f"{type(model).__name__} is already converted by attnres_compile; convert the original")
    kwargs = without_cache(model, kwargs)
    if isinstance(model, torch.fx.GraphModule):
        return _convert_graph_module(model, args, kwargs, config)
    work = copy.deepcopy(model)
    plan, report = derive_plan(work, args, kwargs, config)
    return _install_plan(work, plan, report=report, trusted=True)


def _convert_graph_module(gm, args, kwargs, config: AttnResConfig):
    """A torch.fx GraphModule (e.g. the graph Dynamo hands the `attnres` backend) is its own
    program: its captured ATen graph is rewritten node by node (conversion/graph_rewrite.py) and
    returned, with the AttnRes parameters as its `attnres` submodule."""
    conversion = derive_graph_plan(gm, args, kwargs, config)
    params = build_parameters(conversion.plan)
    params.plan, params.report = conversion.plan, conversion.report
    conversion.module.add_module("attnres", params)
    return conversion.rewrite()


def apply_plan(model: nn.Module, plan: ConversionPlan | dict, *, report: ConversionReport | None = None) -> nn.Module:
    """Install a conversion plan on `model` in place (no capture): the new parameters at their
    initial values, the runtime that serves them. `from_pretrained()` uses it; call it on a
    model built like the one the plan was made for.

    `plan` is a ConversionPlan or its saved form (`plan.to_dict()`, read and validated by
    plan/format.py). Its code is found only among the source files of `model`'s own classes:
    a plan naming another module or file is refused (PlanFormatError), nothing it names is
    imported. A plan whose lines moved (another version of the model's library) is re-derived
    from the model's code first, and installed when it has the saved layout
    (conversion/rederive.py); LayoutChangedError names the first difference otherwise."""
    if not isinstance(plan, ConversionPlan):
        plan = read_plan(plan)
    return _install_plan(model, plan, report=report, trusted=False)


def _install_plan(model: nn.Module, plan: ConversionPlan, *, report, trusted: bool) -> nn.Module:
    """apply_plan; `trusted`: the plan was made in this process by convert() (runtime/replay.ModelCode)."""
    from .runtime.replay import install_saved

    if "attnres" in model._modules or hasattr(type(model), "attnres"):
        raise TypeError(f"{type(model).__name__} already has an attribute 'attnres'; cannot convert it")
    if not trusted:
        plan = install_saved(model, plan, rederive)
    if type(model) is nn.Sequential:
        # Sequential runs every child in order: one that skips the attnres child (same class otherwise)
        model.__class__ = AttnResSequential
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    params = build_parameters(plan, device=ref.device if ref is not None else None)
    model.add_module("attnres", params)
    params.plan = plan
    params.report = report
    params.runtime = install(model, plan, params, trusted=trusted, rederive=rederive)
    if report is not None:
        report.installed = params.runtime.installed()
        _warn_checkpoint_regions(params.runtime, report)
        model.attnres_report = report
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.attnres = plan.to_dict()  # save_pretrained writes it; from_pretrained rebuilds from it
    return model


def _warn_checkpoint_regions(runtime, report: ConversionReport) -> None:
    """A chain installed in code recomputes through its recompiled code; one watched by the mode
    cannot re-enter the mode for a plain function's recompute in backward: warn, naming it."""
    for ci, sublayer, func in report.checkpointed:
        if not runtime.chains[ci].watched:
            continue
        msg = (f"chain {ci}, sublayer {sublayer}: its residual add runs inside an activation checkpoint "
               f"of a plain function ({func}), whose recompute in backward runs the original add (the chain is "
               f"watched by a torch function mode: {runtime.chains[ci].watched}); checkpoint a module instead "
               f"(torch.utils.checkpoint.checkpoint(module, ...) or checkpoint_wrapper)")
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)
