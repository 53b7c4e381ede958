"""vLLM plugin: serve a folder written by `converted.save_pretrained()` with no code from the user.

    python -m vllm.entrypoints.openai.api_server --model DIR        # or vllm.LLM(DIR)

Installed with the package, it is the `vllm.general_plugins` entry point `attnres`, which vLLM
runs in every one of its processes. For a model folder whose config.json has an `attnres`
section (the conversion plan) it

* selects vLLM's Transformers modeling backend (`model_impl="transformers"`): vLLM builds the
  Hugging Face model from the config and runs its decoder layers' own `forward`, the residual
  adds included, on the flattened tokens of every scheduled request (batch 1, one sequence of
  all tokens), after swapping its Linear, embedding and norm modules for vLLM's;
* builds it as `AttnResTransformersForCausalLM` (or the MoE variant), vLLM's class plus the
  plan: the plan's module paths (`model.layers.3`, ...) are those of the Hugging Face
  `*ForCausalLM` the plan was made on, and the backend keeps the base model at `model`, so the
  runtime installs on vLLM's model as on the user's; the AttnRes parameters load from the
  checkpoint's `attnres.*` tensors;
* puts the plan's hash into vLLM's `additional_config`, which vLLM's compile cache key covers,
  so a compiled graph of the folder before it was converted, or under another plan, is never
  served (tests/test_vllm.py serves a folder compiled, converts it, serves it again).

Compiled mode (vLLM's default: Dynamo traces the decoder once and drops every guard) runs the
sites in the traced graph: the runtime's decisions during that trace hold for every later call
(single-pass sites, the `attnres::depth_attention` op), and the chain runs start and end in the
decoder layers' recompiled forwards (vllm_models.py `_unwrap_owners`).

Depth attention is per token, so flattened tokens, chunked prefill and continuous batching need
nothing from the runtime: every request's tokens get their own mixtures. A folder without a plan
takes vLLM's usual path untouched.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .vllm_compat import TESTED_VLLM, ServingError, check_members, check_vllm_version, replace_method  # noqa: F401

_ARCHS = {"TransformersForCausalLM": "AttnResTransformersForCausalLM",
          "TransformersMoEForCausalLM": "AttnResTransformersMoEForCausalLM"}
logger = logging.getLogger("attnres_compile.vllm")
_PATCHED: list = []


def plan_of_folder(model: object) -> dict | None:
    """The `attnres` section of `model`'s config.json when `model` is a local folder, else None."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("attnres") or None
    except (OSError, ValueError):
        return None


def check_architecture(config: dict) -> None:
    """One error line naming the class and the reason when the Transformers backend cannot build it."""
    import transformers

    archs = config.get("architectures") or []
    if not archs:
        raise ServingError("config.json names no architecture; the plan needs the model's Hugging Face class")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise ServingError(f"{archs[0]}: transformers {transformers.__version__} has no such class, so vLLM's Transformers "
                           "backend cannot build it (a converted model is served through that backend)")
    if not (cls.is_backend_compatible() or cls._can_set_attn_implementation()):
        raise ServingError(f"{archs[0]}: its Transformers implementation cannot take vLLM's attention (it neither declares "
                           "backend compatibility nor lets the attention implementation be set), so vLLM's Transformers "
                           "backend cannot build it")


def _prepare_engine_args(args) -> None:
    """For a converted folder: the checks above, the Transformers backend, the plan for this
    transformers release and in the compile cache key."""
    if plan_of_folder(args.model) is None:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    check_architecture(json.loads((Path(args.model) / "config.json").read_text()))
    impl = str(getattr(args.model_impl, "value", args.model_impl))
    if impl not in ("auto", "transformers"):
        raise ServingError(f"{args.model} is a converted model (its config has an attnres plan), which runs only on vLLM's "
                           f"Transformers backend; model_impl={impl!r} would build vLLM's own implementation, whose "
                           "fused residual adds the plan cannot reach")
    args.model_impl = "transformers"
    plan, moved = serving_plan(args.model)
    if moved:      # every vLLM process applies hf_overrides to the config it reads
        overrides = args.hf_overrides
        if callable(overrides):
            args.hf_overrides = lambda config: _with_plan(overrides(config), plan)
        else:
            args.hf_overrides = {**(overrides or {}), "attnres": plan}
    # vLLM's compile cache is keyed by its config hash. vLLM 0.32's already changes with the
    # model's config (checked: two plans in one folder hash apart); the plan's digest goes into
    # additional_config, which the key covers too, so the key holds the plan explicitly (a
    # re-derived plan, a later vLLM) and a folder converted after a compiled run of it never
    # gets the earlier graph.
    extra = args.additional_config if isinstance(args.additional_config, dict) else {}
    args.additional_config = {**extra, "attnres_plan": plan["digest"].removeprefix("sha256:")}


def _with_plan(config, plan: dict):
    config.attnres = plan
    return config


def serving_plan(folder) -> tuple[dict, bool]:
    """The plan to serve the converted folder with, and whether it was re-derived.

    The folder's plan is data: read and validated in full and checked against its AttnRes
    weights (hf.checkpoint_plan), then located on the checkpoint's own Hugging Face class built
    on the meta device, here in the engine's first process (vLLM's workers build the model
    inside the engine and decorate its classes for compilation, which a capture cannot go
    through). Where this transformers release moved the planned lines, the plan is re-derived
    from its code with the saved layout (runtime/replay.py), so the checkpoint's AttnRes weights
    load unchanged. Nothing the plan names is imported. Raises the library's errors."""
    import torch
    import transformers

    from ..errors import StalePlanError
    from ..hf import checkpoint_plan, model_class_of
    from ..conversion.rederive import rederive
    from ..runtime.replay import check

    doc = plan_of_folder(folder)
    plan = checkpoint_plan(folder, doc)
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = model_class_of(config)
    if plan.model != cls.__name__:
        raise ServingError(f"the attnres plan in {folder} was made for {plan.model}, but config.json names {cls.__name__}")
    with torch.device("meta"):
        model = cls(config)
    try:
        check(model, plan)
        return plan.to_dict(), False
    except StalePlanError as exc:
        logger.warning("attnres: %s was converted under another transformers release; re-deriving its plan for "
                       "transformers %s", folder, transformers.__version__)
        return rederive(model, plan, str(exc)).to_dict(), True


def _backend_cls(original):
    def _get_transformers_backend_cls(self) -> str:
        name = original(self)
        if getattr(self.hf_config, "attnres", None) is None:
            return name
        if name not in _ARCHS:
            raise ServingError(f"{(self.architectures or ['?'])[0]}: vLLM would build it as {name}, which the attnres plugin "
                               f"does not extend (only {', '.join(_ARCHS)}: causal language models)")
        return _ARCHS[name]
    return _get_transformers_backend_cls


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process, before any model."""
    if _PATCHED:
        return
    from vllm import ModelRegistry

    check_members()
    for name in _ARCHS.values():
        ModelRegistry.register_model(name, f"attnres_compile.serving.vllm_models:{name}")
    replace_method("vllm.config.model", "ModelConfig", "_get_transformers_backend_cls", _backend_cls)

    def engine_config(create):
        def create_engine_config(self, *args, **kwargs):
            _prepare_engine_args(self)
            return create(self, *args, **kwargs)
        return create_engine_config

    replace_method("vllm.engine.arg_utils", "EngineArgs", "create_engine_config", engine_config)
    _PATCHED.append(True)
