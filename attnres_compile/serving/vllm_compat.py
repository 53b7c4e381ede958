"""The vLLM internals the plugin depends on, in one place.

The plugin replaces two methods of vLLM's classes and extends two of its model classes; none
of them is a public extension point, so each is named here, checked to exist before anything is
patched, and an error names the vLLM release. `make vllm-venv` installs the release these were
read from (TESTED_VLLM).
"""

from __future__ import annotations

import importlib

from ..errors import AttnResError

#: vLLM releases this plugin was tested with (tests/test_vllm.py, `make vllm-venv`).
TESTED_VLLM = ("0.32.0",)

#: (module, class, method) the plugin replaces: how vLLM resolves the Transformers backend's
#: class for a config, and how it turns engine arguments into its config.
PATCHED = (
    ("vllm.config.model", "ModelConfig", "_get_transformers_backend_cls"),
    ("vllm.engine.arg_utils", "EngineArgs", "create_engine_config"),
)

#: (module, class) the plugin's model classes subclass (serving/vllm_models.py).
EXTENDED = (
    ("vllm.model_executor.models.transformers", "TransformersForCausalLM"),
    ("vllm.model_executor.models.transformers", "TransformersMoEForCausalLM"),
)


class ServingError(AttnResError):
    """A converted model cannot be served as asked (unknown vLLM, an architecture the
    Transformers backend cannot build, a conflicting option); the message says which and why."""


def check_vllm_version(version: str) -> None:
    if version not in TESTED_VLLM:
        raise ServingError(f"attnres_compile's vLLM plugin was tested with vLLM {', '.join(TESTED_VLLM)}, not {version}; "
                           "it patches vLLM's engine arguments and model resolution, which change between releases: "
                           "install a tested release (make vllm-venv) to serve a converted model")


def _member(module: str, cls: str, attr: str | None = None):
    import vllm

    try:
        owner = getattr(importlib.import_module(module), cls)
        return owner if attr is None else (owner, getattr(owner, attr))
    except (ImportError, AttributeError) as exc:
        what = f"{module}.{cls}" + (f".{attr}" if attr else "")
        raise ServingError(f"vLLM {vllm.__version__} has no {what}, which attnres_compile's plugin replaces or extends "
                           f"(tested with vLLM {', '.join(TESTED_VLLM)}): {exc}") from None


def check_members() -> None:
    """Every vLLM member the plugin touches exists (ServingError naming the first that does not)."""
    for module, cls, attr in PATCHED:
        _member(module, cls, attr)
    for module, cls in EXTENDED:
        _member(module, cls)


def replace_method(module: str, cls: str, attr: str, make) -> None:
    """`cls.attr = make(cls.attr)` for one of PATCHED, once (a replaced method is marked)."""
    owner, original = _member(module, cls, attr)
    if getattr(original, "__attnres__", False):
        return
    new = make(original)
    new.__attnres__ = True
    setattr(owner, attr, new)
