"""Public API: `convert(model, example_inputs, ...)` and friends."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .convert.capture import add_calls, capture, normalize_inputs, without_cache
from .errors import ModeMismatchError, NoEligibleChainError, PlanFormatError
from .ops.site import DepthAttentionSite
from .convert.find_chains import StreamAnalysis, analyse_streams
from .convert.graph_utils import module_path, source_line
from .convert.build import ConversionPlan, SitePlan, chain_owner, chain_plan, plan_chain
from .plan import read_plan
from .plan.format import layout_difference, plan_layout, read_layout
from .plan.limits import MAX_EPS, MAX_SUBLAYERS, MIN_EPS
from .convert.graph_rewrite import rewrite_chain
from .runtime import install
from .convert.blocks import layer_structure, resolve_block_size
from .convert.report import ChainReport, ConversionReport, LeftAloneReport, SiteReport

PRESERVE_MODES = ("scale", "exact")


@dataclass(frozen=True)
class ChainInfo:
    """What `convert(filter_fn=...)` sees of a residual chain."""

    owner: str                  # module path whose forward runs the chain ('' for the root)
    sublayers: tuple[str, ...]  # module path of each sublayer, in order
    start: str                  # where the stream starts (source line)

    @classmethod
    def of(cls, chain) -> ChainInfo:
        return cls(owner=chain_owner(chain), sublayers=tuple(lk.module for lk in chain.links),
                   start=source_line(chain.start) or chain.start.name)


def _check_positive_int(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > MAX_SUBLAYERS:  # the saved plan's range (plan/limits.py)
        raise ValueError(f"{name} must be <= {MAX_SUBLAYERS} (the most a saved plan holds), got {value}")


def _validate(model, num_blocks, block_size, preserve, eps) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_positive_int("num_blocks", num_blocks)
    _check_positive_int("block_size", block_size)
    if num_blocks is not None and block_size is not None:
        raise ValueError(
            f"set either num_blocks or block_size, not both (got num_blocks={num_blocks}, block_size={block_size})"
        )
    if preserve not in PRESERVE_MODES:
        raise ValueError(f"preserve must be one of {PRESERVE_MODES}, got {preserve!r}")
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float or None, got {eps!r}")
        if not MIN_EPS <= eps <= MAX_EPS:  # the saved plan's range (plan/limits.py)
            raise ValueError(f"eps must be in [{MIN_EPS:g}, {MAX_EPS:g}] (the range a saved plan holds), got {eps!r}")


def convert(model: nn.Module, example_inputs, *, kwargs: dict | None = None,
            num_blocks: int | None = None, block_size: int | None = None,
            preserve: str = "scale", eps: float | None = None, dynamic: bool = True,
            filter_fn=None) -> nn.Module:
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

    Returns:
        The converted copy. `converted.attnres` holds the new parameters
        (`attnres.chain<c>.<site>.{query,norm_weight}`), the plan and the report;
        `converted.attnres_report` is the ConversionReport.
    """
    _validate(model, num_blocks, block_size, preserve, eps)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (chain -> bool), got {type(filter_fn).__name__}")
    args, kwargs = normalize_inputs(example_inputs, kwargs)
    if hasattr(model, "attnres") and isinstance(getattr(model, "attnres"), AttnResParameters):
        raise TypeError(f"{type(model).__name__} is already converted by attnres_compile; convert the original")
    kwargs = without_cache(model, kwargs)
    if isinstance(model, torch.fx.GraphModule):
        return _convert_graph_module(model, args, kwargs, num_blocks=num_blocks, block_size=block_size,
                                     preserve=preserve, eps=eps, filter_fn=filter_fn)

    work = copy.deepcopy(model)
    plan, report = derive_plan(work, args, kwargs, num_blocks=num_blocks, block_size=block_size,
                               preserve=preserve, eps=eps, dynamic=dynamic, filter_fn=filter_fn)
    return _install_plan(work, plan, report=report, trusted=True)


def derive_plan(work: nn.Module, args: tuple, kwargs: dict, *, num_blocks, block_size, preserve, eps,
                dynamic=True, filter_fn=None) -> tuple[ConversionPlan, ConversionReport]:
    """Capture `work` (unconverted; left as it was) in both modes and fix its conversion plan:
    convert()'s match step, and what a checkpoint replay runs again (runtime/replay.py)."""
    from .runtime.replay import inputs_spec, versions

    name = type(work).__name__
    kwargs = without_cache(work, kwargs)
    was_training = work.training
    train_cap = capture(work, args, kwargs, training=True, copy_model=False, dynamic=dynamic)
    # The eval capture only pairs each train chain with its eval twin (same sublayers, same
    # layout): static shapes do for that, at half the time of a dynamic capture.
    eval_cap = capture(work, args, kwargs, training=False, copy_model=False, dynamic=False)
    _restore_forward(work)
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
        mode_refused, eval_refused, pairs = _match_modes(train_an, eval_an, preserve, num_blocks, block_size, eps)
    else:
        pairs = {}
    chains, plans, refused = _select(train_an, preserve, num_blocks, block_size, eps, skip=mode_refused,
                                     pairs=pairs, filter_fn=filter_fn)
    refused += mode_refused
    report = _report(name, train_an, chains, plans, refused, preserve, num_blocks, block_size, same,
                     eval_refused=eval_refused)
    if not chains:
        raise NoEligibleChainError(_no_chain_message(name, train_an, refused, preserve), report)

    calls = add_calls(train_gm.graph, train_cap.adds)
    plan = ConversionPlan(model=name, preserve=preserve, chains=[
        chain_plan(chain, cp[0].chain, s, cp, calls, root=work) for (chain, s), cp in zip(chains, plans)])
    plan.options = {"num_blocks": num_blocks, "block_size": block_size, "eps": eps, "dynamic": dynamic}
    plan.inputs = inputs_spec(args, kwargs)
    plan.versions = versions()
    report.checkpointed = _checkpoint_regions(plan, chains, calls)
    return plan, report


def _convert_graph_module(gm, args, kwargs, *, num_blocks, block_size, preserve, eps, filter_fn):
    """A torch.fx GraphModule (e.g. the graph Dynamo hands the `attnres` backend) is its own
    program: its captured ATen graph is rewritten node by node (convert/graph_rewrite.py) and
    returned, with the AttnRes parameters as its `attnres` submodule."""
    name = type(gm).__name__
    cap = capture(gm, args, kwargs, training=gm.training, dynamic=False)
    out = cap.module
    analysis = analyse_streams(out.graph)
    chains, plans, refused = _select(analysis, preserve, num_blocks, block_size, eps, filter_fn=filter_fn,
                                     graph=True)
    report = _report(name, analysis, chains, plans, refused, preserve, num_blocks, block_size, True)
    if not chains:
        raise NoEligibleChainError(_no_chain_message(name, analysis, refused, preserve), report)
    plan = ConversionPlan(model=name, preserve=preserve, chains=[
        chain_plan(chain, cp[0].chain, s, cp, root=out) for (chain, s), cp in zip(chains, plans)])
    params = _build_parameters(plan)
    params.layout, params.plan, params.report = plan_layout(plan), plan, report
    out.add_module("attnres", params)
    for (chain, s), chain_plans in zip(chains, plans):
        rewrite_chain(out, chain, chain_plans, s)
    out.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure())
    out.graph.lint()
    out.recompile()
    out.attnres_report = report
    return out


def apply_plan(model: nn.Module, plan: ConversionPlan | dict, *, report: ConversionReport | None = None) -> nn.Module:
    """Install a conversion plan on `model` in place (no capture): the new parameters at their
    initial values, the runtime that serves them. `from_pretrained()` uses it; call it on a
    model built like the one the plan was made for.

    `plan` is a ConversionPlan or its saved form (`plan.to_dict()`, read and validated by
    plan/format.py). Its code is found only among the source files of `model`'s own classes:
    a plan naming another module or file is refused (PlanFormatError), nothing it names is
    imported. A plan whose lines moved (another version of the model's library) is re-derived
    from the model's code first, and installed when it has the saved layout (runtime/replay.py);
    LayoutChangedError names the first difference otherwise."""
    if not isinstance(plan, ConversionPlan):
        plan = read_plan(plan)
    return _install_plan(model, plan, report=report, trusted=False)


def _install_plan(model: nn.Module, plan: ConversionPlan, *, report, trusted: bool) -> nn.Module:
    """apply_plan; `trusted`: the plan was made in this process by convert() (runtime/replay.ModelCode)."""
    from .runtime.replay import install_saved

    if "attnres" in model._modules or hasattr(type(model), "attnres"):
        raise TypeError(f"{type(model).__name__} already has an attribute 'attnres'; cannot convert it")
    if not trusted:
        plan = install_saved(model, plan)
    if type(model) is nn.Sequential:
        # Sequential runs every child in order: one that skips the attnres child (same class otherwise)
        model.__class__ = AttnResSequential
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    params = _build_parameters(plan, device=ref.device if ref is not None else None)
    params.layout = plan_layout(plan)
    model.add_module("attnres", params)
    params.plan = plan
    params.report = report
    params.runtime = install(model, plan, params, trusted=trusted)
    if report is not None:
        report.installed = params.runtime.installed()
        _warn_checkpoint_regions(params.runtime, report)
        model.attnres_report = report
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.attnres = plan.to_dict()  # save_pretrained writes it; from_pretrained rebuilds from it
    return model


class AttnResSequential(nn.Sequential):
    """A converted `nn.Sequential`: runs, counts and indexes its layers without the `attnres` child."""

    def _layers(self):
        return [m for k, m in self._modules.items() if k != "attnres"]

    def forward(self, input):
        for module in self._layers():
            input = module(input)
        return input

    def __iter__(self):
        return iter(self._layers())

    def __len__(self):
        return len(self._layers())

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.Sequential(*self._layers()[idx])
        return self._layers()[idx]


def _restore_forward(model: nn.Module) -> None:
    """Undo capture's keyword-naming forward on the private copy (convert/capture.py)."""
    fwd = model.__dict__.get("forward")
    if fwd is not None and hasattr(fwd, "_attnres_wrapped"):
        del model.forward


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


def _warn_checkpoint_regions(runtime, report: ConversionReport) -> None:
    """A chain installed in code recomputes through its recompiled code; one watched by the mode
    cannot re-enter the mode for a plain function's recompute in backward: warn, naming it."""
    import warnings

    for ci, sublayer, func in report.checkpointed:
        if not runtime.chains[ci].watched:
            continue
        msg = (f"chain {ci}, sublayer {sublayer}: its residual add runs inside an activation checkpoint "
               f"of a plain function ({func}), whose recompute in backward runs the original add (the chain is "
               f"watched by a torch function mode: {runtime.chains[ci].watched}); checkpoint a module instead "
               f"(torch.utils.checkpoint.checkpoint(module, ...) or checkpoint_wrapper)")
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)


def is_converted(model: nn.Module) -> bool:
    """Whether `model` (or a wrapper of it, e.g. a PEFT model) holds an attnres conversion."""
    return _find_params(model) is not None


def _find_params(model: nn.Module):
    if not isinstance(model, nn.Module):
        return None
    for m in model.modules():
        if isinstance(m, AttnResParameters):
            return m
    return None


def attnres_parameters(converted: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters `convert()` added, by their names in `converted` (for their own optimizer
    group). Works on a converted model and on wrappers of it (PEFT, DDP)."""
    own = _find_params(converted)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    ids = {id(p) for p in own.parameters()}
    return {n: p for n, p in converted.named_parameters(remove_duplicate=False) if id(p) in ids}


# -- helpers -----------------------------------------------------------------------------------

def _select(analysis: StreamAnalysis, preserve, num_blocks, block_size, eps, skip=(), pairs=None,
            filter_fn=None, graph=False):
    skip_ids = {id(c) for c, _ in skip}
    chains, plans, refused = [], [], []
    for chain in analysis.chains:
        if id(chain) in skip_ids:
            continue
        if graph and chain.reshaped:
            refused.append((chain, "the stream changes its token layout between sublayers (a reshape of the "
                                   "tokens); a converted module follows that, a graph rewrite does not: "
                                   "convert() the model, then torch.compile it"))
            continue
        if filter_fn is not None and not filter_fn(ChainInfo.of(chain)):
            refused.append((chain, "not selected (filter_fn returned False)"))
            continue
        if not chain.is_prenorm and preserve != "exact":
            refused.append((chain, f"not PreNorm: {chain.prenorm_reason}; convert it with preserve='exact'"))
            continue
        other = pairs.get(id(chain)) if pairs else None
        if other is not None and not other.is_prenorm and preserve != "exact":
            refused.append((chain, f"not PreNorm in eval mode: {other.prenorm_reason}; "
                                   f"convert it with preserve='exact'"))
            continue
        s = resolve_block_size(len(chain.links), num_blocks, block_size, chain_layers(chain))
        chains.append((chain, s))
        plans.append(plan_chain(chain, len(plans), s, preserve=preserve, eps=eps))
    return chains, plans, refused


def chain_layers(chain) -> tuple[int, int] | None:
    """(layers, sublayers per layer) of a captured chain (passes/schedule.layer_structure)."""
    return layer_structure([module_path(a) for link in chain.links for a in link.adds[-1:]])


def _chain_key(chain) -> tuple:
    """What identifies a chain across the train and eval captures: its sublayers' modules and
    source lines (node names differ between captures)."""
    return tuple((link.module, source_line(link.add)) for link in chain.links)


def _describe_chain(chain) -> str:
    mods = [link.module or link.add.name for link in chain.links]
    span = mods[0] if len(mods) == 1 else f"{mods[0]} .. {mods[-1]}"
    return f"a chain of {len(mods)} sublayer(s) ({span})"


def _match_modes(train_an: StreamAnalysis, eval_an: StreamAnalysis, preserve, num_blocks, block_size, eps):
    """Pair each train chain with the eval chain of the same sublayers and block layout.

    Returns (train chains refused, eval chains refused, {id(train chain): eval chain}). A chain
    found in one mode only, or laid out differently in the other, is refused in both: one set
    of AttnRes parameters serves both graphs.
    """
    def layout(chain):
        s = resolve_block_size(len(chain.links), num_blocks, block_size, chain_layers(chain))
        return _layout([plan_chain(chain, 0, s, preserve=preserve, eps=eps)]), [
            (p.eps, p.scale, p.dtype) for p in plan_chain(chain, 0, s, preserve=preserve, eps=eps)]

    by_key: dict[tuple, list] = {}
    for c in eval_an.chains:
        by_key.setdefault(_chain_key(c), []).append(c)
    pairs, train_refused, matched = {}, [], set()
    for c in train_an.chains:
        cands = by_key.get(_chain_key(c), [])
        other = cands.pop(0) if cands else None
        if other is not None and layout(other) == layout(c):
            pairs[id(c)] = other
            matched.add(id(other))
            continue
        first = c.links[0].module or c.links[0].add.name
        if other is not None:
            matched.add(id(other))
            why = "the sites get a different layout or eps in eval mode"
        else:
            why = _where_in_other_mode(c, eval_an, "eval")
        train_refused.append((c, f"the residual stream differs between train and eval mode at {first}: "
                                 f"in train mode {_describe_chain(c)}, {why}; one set of AttnRes parameters "
                                 f"must serve both modes"))
    eval_refused = []
    for c in eval_an.chains:
        if id(c) in matched:
            continue
        first = c.links[0].module or c.links[0].add.name
        eval_refused.append((c, f"the residual stream differs between train and eval mode at {first}: "
                                f"in eval mode {_describe_chain(c)}, {_where_in_other_mode(c, train_an, 'train')}"))
    return train_refused, eval_refused, pairs


def _where_in_other_mode(chain, other: StreamAnalysis, mode: str) -> str:
    mods = {link.module for link in chain.links if link.module}
    for o in other.chains:
        if mods & {link.module for link in o.links}:
            return f"in {mode} mode {_describe_chain(o)}"
    return f"no such chain in {mode} mode"


def _layout(plans: list[list[SitePlan]]):
    return [(p.chain, p.name, p.schedule.sources, p.dim) for ps in plans for p in ps]


class AttnResParameters(nn.Module):
    """`converted.attnres`: the new parameters. Its state_dict entry `attnres._extra_state`
    holds the layout they were made for, so loading a state_dict of another layout (other
    block size, other model) into a conversion fails with the mismatch named."""

    layout: dict | None = None
    plan: ConversionPlan | None = None   # what convert() decided (convert/build.py)
    report: object = None                # the ConversionReport (None after from_pretrained)
    runtime: object = None               # the installed plan (runtime/)

    def extra_repr(self) -> str:
        if self.plan is None:
            return ""
        sites = sum(1 for c in self.plan.chains for s in c.sites if s.param_prefix)
        return f"chains={len(self.plan.chains)}, sites={sites}, preserve={self.plan.preserve!r}"

    def get_extra_state(self):
        # A uint8 tensor of the layout's JSON, not a dict: safetensors (save_pretrained) and
        # torch.distributed.checkpoint store tensors only.
        import json

        return torch.frombuffer(bytearray(json.dumps(self.layout).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None or self.layout is None:
            return
        if isinstance(state, torch.Tensor):
            if state.dtype != torch.uint8 or state.dim() != 1:
                raise PlanFormatError(f"attnres._extra_state: a {state.dtype} tensor of shape {list(state.shape)}, "
                                      "not the uint8 JSON of an AttnRes layout", field="attnres._extra_state")
            state = bytes(state.cpu().tolist())
        state = read_layout(state, "attnres._extra_state")
        diff = layout_difference(state, self.layout)
        if diff is not None:
            raise PlanFormatError(f"AttnRes weights in this state_dict were made for another layout "
                                  f"({state['model']}): {diff}", field="attnres._extra_state")


def _build_parameters(plan: ConversionPlan, device=None) -> nn.Module:
    root = AttnResParameters()
    for cp in plan.chains:
        chain_mod = nn.Module()
        for p in cp.sites:
            if p.param_prefix is None:
                continue
            chain_mod.add_module(p.name, DepthAttentionSite(
                p.dim, num_sources=p.schedule.num_sources, eps=p.eps, scale=p.scale,
                dtype=p.dtype, device=device if device is not None else p.device,
            ))
        root.add_module(f"chain{cp.index}", chain_mod)
    return root


def _report(name, analysis, chains, plans, refused, preserve, num_blocks, block_size, same,
            eval_refused=()) -> ConversionReport:
    chain_reports = []
    for (chain, s), chain_plans in zip(chains, plans):
        sites = [
            SiteReport(
                name=p.name, sublayer=p.schedule.sublayer, module=p.module, block=p.schedule.block,
                sources=list(p.schedule.sources), eps=p.eps, scale=p.scale,
                parameters=[f"{p.param_prefix}.query", f"{p.param_prefix}.norm_weight"] if p.param_prefix else [],
                reads=[],
            )
            for p in chain_plans
        ]
        layers = chain_layers(chain)
        chain_reports.append(ChainReport(
            index=chain_plans[0].chain, start=chain.start.name, start_where=source_line(chain.start),
            num_sublayers=len(chain.links), block_size=s, prenorm=chain.is_prenorm,
            note=None if chain.is_prenorm else f"converted with preserve='exact' although {chain.prenorm_reason}",
            sites=sites,
            extra_uses=[f"{u.name} (site{i})" for i, u in chain.extra_uses],
            layers=layers[0] if layers else None, sublayers_per_layer=layers[1] if layers else None,
            schedule=_schedule_text(len(chain.links), s, num_blocks, block_size, layers),
        ))
    left = [LeftAloneReport(la.node.name, source_line(la.node), module_path(la.node), la.reason)
            for la in analysis.left_alone]
    refused_d = [{"start": c.start.name, "num_sublayers": len(c.links), "reason": r}
                 for c, r in [*analysis.refused_chains, *refused]]
    # Chains of the eval graph alone (node names are the eval capture's).
    refused_d += [{"start": f"{c.start.name} (eval graph)", "num_sublayers": len(c.links), "reason": r}
                  for c, r in eval_refused]
    for c, r in refused:  # adds of chains refused for not being PreNorm are left alone too
        for link in c.links:
            for a in link.adds:
                left.append(LeftAloneReport(a.name, source_line(a), module_path(a), r))
    return ConversionReport(
        model=name, preserve=preserve, num_blocks=num_blocks, block_size=block_size,
        modes=["train+eval"] if same else ["train", "eval"], chains=chain_reports,
        left_alone=left, refused_chains=refused_d,
    )


def _schedule_text(num_sublayers, s, num_blocks, block_size, layers) -> str:
    count_ = -(-num_sublayers // s)
    blocks = f"{count_} block{'s' if count_ != 1 else ''}"
    if block_size is not None:
        return f"block_size={block_size} as given: {blocks}"
    n = 8 if num_blocks is None else num_blocks
    if layers is not None:
        count, k = layers
        text = (f"num_blocks={n} over {count} layers of {k} sublayer{'s' if k != 1 else ''}: "
                f"S = {k} x ceil({count}/{n}) = {s}, {blocks}")
        if count_ < n:
            text += f" (fewer than {n}: every block starts at a layer's first sublayer)"
        return text
    return f"num_blocks={n} over {num_sublayers} sublayers (no layer structure found): S = ceil({num_sublayers}/{n}) = {s}"


# Left-alone reasons from most to least like a residual add, for the one a refusal quotes.
_RESIDUAL_LIKE = ("scaled residual", "single residual add", "PostNorm", "in-place add", "mixed dtypes",
                  "alpha", "holds no matmul", "broadcasting or bias", "independent", "rotary")


def _residual_rank(reason: str) -> int:
    return next((i for i, key in enumerate(_RESIDUAL_LIKE) if key in reason), len(_RESIDUAL_LIKE))


def _no_chain_message(name, analysis, refused, preserve) -> str:
    reasons = Counter()
    example = {}
    for c, r in [*analysis.refused_chains, *refused]:
        key = r.split(":")[0] if r.startswith("PostNorm") else r
        reasons[key] += 1
        example.setdefault(key, r)
    if not reasons:
        left = analysis.left_alone
        if not left:
            why = "the graph has no add operations at all (no residual connections)"
        else:
            best = min(left, key=lambda la: _residual_rank(la.reason))
            why = (f"none of its {len(left)} add(s) is a residual add of a stream "
                   f"(the closest: {best.node.name} at {source_line(best.node) or '?'}: {best.reason})")
    else:
        parts = []
        for key, n in reasons.most_common(3):
            if key == "PostNorm block":
                parts.append(f"{n} PostNorm residual add(s): each add's output goes through a norm before "
                             f"the next residual add, so there is no stream to attend over "
                             f"(e.g. {example[key].split(': ', 1)[1]})")
            else:
                parts.append(f"{n} x {key}" if n > 1 else key)
        why = "; ".join(parts)
    msg = f"no residual stream of {name} is eligible for AttnRes: {why}"
    if preserve != "exact" and any("not PreNorm" in r for _, r in refused):
        msg += " (preserve='exact' converts additive chains that are not PreNorm)"
    return msg


# -- the AttnRes parameters alone ----------------------------------------------------------------

def _layout_of(converted: nn.Module) -> dict:
    """What a set of AttnRes weights fits: the sites, their source counts and widths."""
    own = _find_params(converted)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    return own.layout


def attnres_state_dict(converted: nn.Module) -> dict[str, torch.Tensor]:
    """The AttnRes parameters alone (`attnres.chain<c>.<site>.{query,norm_weight}`), detached."""
    return {n: p.detach() for n, p in _own_parameters(converted).items()}


def _own_parameters(converted: nn.Module) -> dict[str, nn.Parameter]:
    """The AttnRes parameters named `attnres.chain<c>.<site>.*`, wherever the module sits."""
    own = _find_params(converted)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    return {f"attnres.{n}": p for n, p in own.named_parameters()}


def save_attnres(converted: nn.Module, path) -> None:
    """Write the AttnRes parameters to a safetensors file, with the layout they belong to."""
    import json

    from safetensors.torch import save_file

    tensors = {n: t.contiguous().cpu() for n, t in attnres_state_dict(converted).items()}
    save_file(tensors, str(path), metadata={"attnres_layout": json.dumps(_layout_of(converted))})


def read_attnres_file(path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a safetensors file from `save_attnres` and the layout it was saved for
    (None when the file carries none); `tensors=False` reads the layout alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    raw = meta.get("attnres_layout")
    return weights, (read_layout(raw, "attnres_layout", str(path)) if raw is not None else None)


def load_attnres_state_dict(converted: nn.Module, weights) -> None:
    """Load AttnRes parameters (a dict, or a safetensors file from save_attnres) into `converted`.

    Raises PlanFormatError (a ValueError) naming the mismatch when the weights were made for
    another layout (other block size, other model, other sites, widths or eps), or hold
    tensors that are not finite floats.
    """
    own = _own_parameters(converted)
    layout = None
    if not isinstance(weights, dict):
        weights, layout = read_attnres_file(weights)
    if layout is not None:
        diff = layout_difference(layout, _layout_of(converted))
        if diff is not None:
            raise PlanFormatError(f"AttnRes weights were saved for another layout ({layout['model']}): {diff}",
                                  field="attnres_layout")
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise PlanFormatError(
            "AttnRes weights do not fit this model: "
            + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}" if unexpected else ""),
            field=(missing or unexpected)[0])
    bad = [n for n, p in own.items() if tuple(weights[n].shape) != tuple(p.shape)]
    if bad:
        raise PlanFormatError("AttnRes weights have the wrong shapes: " + "; ".join(
            f"{n}: {tuple(weights[n].shape)} in the weights, {tuple(own[n].shape)} here" for n in bad[:4]), field=bad[0])
    for n in own:
        t = weights[n]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise PlanFormatError(f"AttnRes weight {n}: {what}" + (" with NaN or infinite values" if isinstance(
                t, torch.Tensor) and t.is_floating_point() else "") + "; AttnRes parameters are finite floats",
                field=n)
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n].to(dtype=p.dtype, device=p.device))
