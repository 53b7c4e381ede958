"""The example inputs and versions a plan records (`ConversionPlan.inputs`, `.versions`), and
the example inputs a re-derivation rebuilds from them."""

from __future__ import annotations

import inspect
import math
import sys

import torch
from torch import nn

from ..errors import StalePlanError
from ..plan.limits import MAX_INPUT_DEPTH, MAX_INT, MAX_NAME, MAX_TENSOR_DIMS, MAX_TENSOR_NUMEL, MAX_TEXT
from ..plan.types import ConversionPlan


def input_spec(value, depth: int = 1):
    """A JSON-able description of one example input (tensor shape and dtype, or a plain value);
    what a saved plan cannot hold (plan/limits.py) is recorded as unsupported."""
    if depth > MAX_INPUT_DEPTH:
        return {"unsupported": "nested too deep"}
    if isinstance(value, torch.Tensor):
        if value.dim() > MAX_TENSOR_DIMS or value.numel() > MAX_TENSOR_NUMEL:
            return {"unsupported": f"tensor of shape {list(value.shape)}"}
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) >= MAX_INT \
            or isinstance(value, str) and len(value) > MAX_TEXT:
        return {"unsupported": type(value).__name__}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [input_spec(v, depth + 1) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) and len(k) <= MAX_NAME for k in value):
        return {"dict": {k: input_spec(v, depth + 1) for k, v in value.items()}}
    return {"unsupported": type(value).__name__}


def inputs_spec(args: tuple, kwargs: dict) -> dict:
    return {"args": [input_spec(a) for a in args], "kwargs": {k: input_spec(v) for k, v in kwargs.items()}}


def _build(spec, where: str, device):
    if "tensor" in spec:
        dtype = getattr(torch, spec["dtype"])
        shape = spec["tensor"]
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(shape, dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)  # indices: 0 is valid for any table
    if "value" in spec:
        return spec["value"]
    if "list" in spec or "tuple" in spec:
        items = [_build(s, f"{where}[{i}]", device) for i, s in enumerate(spec.get("list", spec.get("tuple")))]
        return items if "list" in spec else tuple(items)
    if "dict" in spec:
        return {k: _build(s, f"{where}[{k!r}]", device) for k, s in spec["dict"].items()}
    raise StalePlanError(f"example input {where} was a {spec.get('unsupported', '?')}, which the plan cannot "
                         "record; convert the model again")


def _hf_inputs(model: nn.Module, device):
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    try:
        takes_ids = "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_ids = False
    if not (isinstance(vocab, int) and vocab > 0 and takes_ids):
        return None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=gen).to(device)
    return (), {"input_ids": ids}


def example_inputs(model: nn.Module, plan: ConversionPlan) -> tuple[tuple, dict]:
    """Inputs to capture `model` with again: the plan's recorded example inputs, else (a Hugging
    Face model) `input_ids` synthesized from its config."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None and ref.device.type != "meta" else None
    if plan.inputs is not None:
        args = tuple(_build(s, f"args[{i}]", device) for i, s in enumerate(plan.inputs.get("args", [])))
        kwargs = {k: _build(s, f"kwargs[{k!r}]", device) for k, s in plan.inputs.get("kwargs", {}).items()}
        return args, kwargs
    found = _hf_inputs(model, device)
    if found is None:
        raise StalePlanError(f"the plan of {plan.model} records no example inputs and {type(model).__name__} is "
                             "not a Hugging Face model with a vocab_size to synthesize input_ids from")
    return found


def versions() -> dict:
    """The versions a plan is made under: Python, torch, and transformers when it is loaded."""
    out = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "torch": torch.__version__.split("+")[0]}
    tf = sys.modules.get("transformers")
    if tf is not None and getattr(tf, "__version__", None):
        out["transformers"] = tf.__version__
    return out


def versions_text(v: dict) -> str:
    """`versions()` as text for messages: "python 3.11, torch 2.13.0, transformers 5.24.0"."""
    return ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers") if k in v)
