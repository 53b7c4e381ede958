"""Hugging Face integration: a converted model saves with its own `save_pretrained`; this rebuilds it.

`convert()` keeps the model's class, so `converted.save_pretrained(dir)` writes the config
(with an `attnres` section: the conversion plan, passes/plan.py) and every weight, the AttnRes
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

from .api import _find_params, apply_plan
from .passes.plan import ConversionPlan


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"config.architectures ({names}) names no class transformers has; pass model_class=")


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path} holds no model.safetensors (or its index): save with save_pretrained()")


def from_pretrained(path: str | os.PathLike, *, model_class=None, **kwargs) -> nn.Module:
    """Load a converted Hugging Face model written by `converted.save_pretrained(path)`.

    Args:
        path: the directory save_pretrained wrote.
        model_class: the class to build (default: the config's `architectures[0]`).
        kwargs: passed to `model_class.from_pretrained` (e.g. ``dtype=torch.bfloat16``).

    Raises:
        ValueError naming both sides when the directory holds no plan, or a plan made for
        another model class or another layout than its weights.
    """
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    plan_d = getattr(config, "attnres", None)
    if not plan_d:
        raise ValueError(f"{path}/config.json has no 'attnres' section: it was not saved from a model converted "
                         "by attnres_compile")
    plan = ConversionPlan.from_dict(plan_d)
    cls = _model_class(config, model_class)
    if plan.model != cls.__name__:
        raise ValueError(f"the attnres plan in {path} was made for {plan.model}, not {cls.__name__}; "
                         f"load it with model_class={plan.model}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the attnres.* weights are "unexpected" to the plain class
    try:
        model = cls.from_pretrained(path, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    apply_plan(model, plan)
    own = _find_params(model)
    if ref is not None:
        own.to(device=ref.device, dtype=ref.dtype)
    state = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.startswith("attnres."):
                    state[key[len("attnres."):]] = st.get_tensor(key)
    missing = sorted(k for k in own.state_dict() if k not in state)
    if missing:
        raise ValueError(f"{path} lacks AttnRes weights the plan needs: {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    with torch.no_grad():
        own.load_state_dict(state, strict=True)
    return model
