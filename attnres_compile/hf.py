"""Hugging Face integration: a converted model saves with its own `save_pretrained`; this rebuilds it.

`convert()` keeps the model's class, so `converted.save_pretrained(dir)` writes the config
(with an `attnres` section: the conversion plan, docs/plan-format.md) and every weight, the AttnRes
parameters included (`attnres.chain<c>.<site>.*` and `attnres._extra_state`, the layout).
`from_pretrained(dir)` builds the model class the config names, loads its weights, installs the
plan without capturing anything (no example inputs) and loads the AttnRes weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .api import apply_plan
from .runtime.params import find_params
from .errors import PlanFormatError
from .plan import read_plan
from .plan.format import read_layout, weights_difference
from .plan.types import ConversionPlan

_EXTRA = "attnres._extra_state"


def model_class_of(config, model_class=None):
    """`model_class`, else the transformers class `config.architectures` names (a PreTrainedModel)."""
    if model_class is not None:
        return model_class
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise PlanFormatError(f"config.architectures ({names}) names no model class transformers has; pass model_class=",
                          field="architectures")


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanFormatError(f"{index}: not a safetensors index with a 'weight_map' ({exc})",
                                  field="weight_map") from None
        for f in files:  # a checkpoint names files in its own folder only
            if not isinstance(f, str) or not f or f != os.path.basename(f) or f in (".", ".."):
                raise PlanFormatError(f"{index}: weight_map names {f!r}, not a file of the checkpoint's folder",
                                      field="weight_map")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path} holds no model.safetensors (or its index): save with save_pretrained()")


def _attnres_entries(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict | None]:
    """The `attnres.*` parameter tensors of a checkpoint (name under `attnres.` -> shape and
    dtype, from the files' headers) and the layout saved with them (None when absent)."""
    from safetensors import SafetensorError, safe_open

    tensors, layout = {}, None
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key == _EXTRA:
                        raw = st.get_tensor(key)
                        if raw.dtype != torch.uint8 or raw.dim() != 1:
                            raise PlanFormatError(f"{f.name}: {_EXTRA} is a {raw.dtype} tensor of shape "
                                                  f"{list(raw.shape)}, not the uint8 JSON of an AttnRes layout",
                                                  field=_EXTRA)
                        layout = read_layout(bytes(raw.tolist()), _EXTRA, f.name)
                    elif key.startswith("attnres."):
                        sl = st.get_slice(key)
                        tensors[key] = (sl.get_shape(), sl.get_dtype())
        except SafetensorError as exc:
            raise PlanFormatError(f"{f}: not a readable safetensors file ({exc})", field="weights") from None
    return tensors, layout


def checkpoint_plan(path: str | os.PathLike, doc) -> ConversionPlan:
    """The plan `doc` of the checkpoint folder `path`, read (plan/format.py: schema, relations,
    digest) and checked against the AttnRes tensors and layout saved beside it, before any
    model is built. The vLLM plugin's engine process runs the same.

    Raises PlanFormatError naming the field, or the first difference with the weights."""
    plan = read_plan(doc)
    tensors, layout = _attnres_entries(Path(path))
    diff = weights_difference(plan, tensors, layout)
    if diff is not None:
        raise PlanFormatError(f"{path}: the AttnRes weights do not fit the plan in config.json: {diff}",
                              field="weights")
    return plan


def from_pretrained(path: str | os.PathLike, *, model_class=None, **kwargs) -> nn.Module:
    """Load a converted Hugging Face model written by `converted.save_pretrained(path)`.

    The plan in config.json is data: it is validated in full (docs/plan-format.md), checked
    against the AttnRes weights beside it, and installed on the class transformers builds,
    finding code only among that class's source files; nothing the checkpoint names is
    imported or run.

    Args:
        path: the directory save_pretrained wrote.
        model_class: the class to build (default: the config's `architectures[0]`).
        kwargs: passed to `model_class.from_pretrained` (e.g. ``dtype=torch.bfloat16``).

    Raises:
        PlanFormatError (a ValueError) naming the field when the directory holds no plan, a
        plan that fails its schema or digest, one made for another model class, or weights of
        another layout; LayoutChangedError when the model's code has another structure now.
    """
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    plan_d = getattr(config, "attnres", None)
    if not plan_d:
        raise PlanFormatError(f"{path}/config.json has no 'attnres' section: it was not saved from a model converted "
                              "by attnres_compile (load it with transformers as a plain model)", field="attnres")
    plan = checkpoint_plan(path, plan_d)
    cls = model_class_of(config, model_class)
    if plan.model != cls.__name__:
        raise PlanFormatError(f"the attnres plan in {path} was made for {plan.model}, not {cls.__name__}; "
                              f"load it with model_class={plan.model}", field="model")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the attnres.* weights are "unexpected" to the plain class
    try:
        model = cls.from_pretrained(path, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    apply_plan(model, plan)
    own = find_params(model)
    if ref is not None:
        own.to(device=ref.device, dtype=ref.dtype)
    state = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.startswith("attnres."):
                    t = st.get_tensor(key)
                    if key != _EXTRA and not torch.isfinite(t).all():
                        raise PlanFormatError(f"{f.name}: the AttnRes tensor {key} holds NaN or infinite values",
                                              field=key)
                    state[key[len("attnres."):]] = t
    with torch.no_grad():
        own.load_state_dict(state, strict=False)  # every name and shape was checked against the plan above
    return model
