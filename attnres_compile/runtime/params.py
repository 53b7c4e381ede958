"""The AttnRes parameters of a converted model (`converted.attnres`), built from its plan, and
their checkpoint forms: the state_dict entries, `save_attnres` / `load_attnres_state_dict`."""

from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import PlanFormatError
from ..ops.site import DepthAttentionSite
from ..plan.format import layout_difference, plan_layout, read_layout
from ..plan.types import ConversionPlan

__all__ = ["AttnResParameters", "AttnResSequential", "attnres_parameters", "attnres_state_dict", "build_parameters",
           "find_params", "is_converted", "load_attnres_state_dict", "read_attnres_file", "save_attnres"]


class AttnResParameters(nn.Module):
    """`converted.attnres`: the new parameters. Its state_dict entry `attnres._extra_state`
    holds the layout they were made for, so loading a state_dict of another layout (other
    block size, other model) into a conversion fails with the mismatch named."""

    plan: ConversionPlan | None = None   # what convert() decided (plan/types.py)
    report: object = None                # the ConversionReport (None after from_pretrained)
    runtime: object = None               # the installed plan (runtime/)

    @property
    def layout(self) -> dict | None:
        """What these weights fit (plan/format.py `plan_layout`): chains, block sizes, sites, eps."""
        return plan_layout(self.plan) if self.plan is not None else None

    def extra_repr(self) -> str:
        if self.plan is None:
            return ""
        sites = sum(1 for c in self.plan.chains for s in c.sites if s.param_prefix)
        return f"chains={len(self.plan.chains)}, sites={sites}, preserve={self.plan.preserve!r}"

    def get_extra_state(self):
        # A uint8 tensor of the layout's JSON, not a dict: safetensors (save_pretrained) and
        # torch.distributed.checkpoint store tensors only.
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


def build_parameters(plan: ConversionPlan, device=None) -> AttnResParameters:
    """The AttnRes parameters of `plan` at their initial values (queries zero, gains one): one
    DepthAttentionSite per site with more than one source, `chain<c>.<site>`."""
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


def is_converted(model: nn.Module) -> bool:
    """Whether `model` (or a wrapper of it, e.g. a PEFT model) holds an attnres conversion."""
    return find_params(model) is not None


def find_params(model: nn.Module) -> AttnResParameters | None:
    """The AttnResParameters of a converted model, or of a wrapper of one (PEFT, DDP); None if none."""
    if not isinstance(model, nn.Module):
        return None
    for m in model.modules():
        if isinstance(m, AttnResParameters):
            return m
    return None


def attnres_parameters(converted: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters `convert()` added, by their names in `converted` (for their own optimizer
    group). Works on a converted model and on wrappers of it (PEFT, DDP)."""
    own = find_params(converted)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    ids = {id(p) for p in own.parameters()}
    return {n: p for n, p in converted.named_parameters(remove_duplicate=False) if id(p) in ids}


def _layout_of(converted: nn.Module) -> dict:
    """What a set of AttnRes weights fits: the sites, their source counts and widths."""
    own = find_params(converted)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    return own.layout


def attnres_state_dict(converted: nn.Module) -> dict[str, torch.Tensor]:
    """The AttnRes parameters alone (`attnres.chain<c>.<site>.{query,norm_weight}`), detached."""
    return {n: p.detach() for n, p in _own_parameters(converted).items()}


def _own_parameters(converted: nn.Module) -> dict[str, nn.Parameter]:
    """The AttnRes parameters named `attnres.chain<c>.<site>.*`, wherever the module sits."""
    own = find_params(converted)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(converted).__name__}")
    return {f"attnres.{n}": p for n, p in own.named_parameters()}


def save_attnres(converted: nn.Module, path) -> None:
    """Write the AttnRes parameters to a safetensors file, with the layout they belong to."""
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
