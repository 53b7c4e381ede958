"""The model classes the vLLM plugin registers (imported by vLLM in its worker processes only).

`AttnResTransformersForCausalLM` is vLLM's `TransformersForCausalLM` (and the MoE variant)
with the conversion plan of `config.attnres` installed on the model vLLM built, and the AttnRes
weights loaded from the checkpoint's `attnres.*` tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.transformers import TransformersForCausalLM, TransformersMoEForCausalLM

from ..api import apply_plan
from ..runtime.params import find_params
from ..runtime.planned import remove_owner_wrappers
from ..errors import PlanFormatError

_PREFIX = "attnres."


class _AttnResMixin:
    """Installs the plan after vLLM has built (and swapped the leaves of) the Hugging Face model."""

    def _install_attnres(self) -> None:
        # the plugin re-derived it in the engine's first process if this transformers release
        # moved the planned lines (vllm_plugin.serving_plan), and handed it over in hf_overrides
        apply_plan(self, self.config.attnres)  # read and validated in full (plan/format.py)
        find_params(self).to(device=next(self.model.parameters()).device, dtype=self.model_config.dtype)
        remove_owner_wrappers(self)  # vLLM's compiled decoder: runtime/planned.py

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own = find_params(self)
        params = dict(own.named_parameters())
        loaded: set[str] = set()

        def others():
            for name, tensor in weights:
                if not name.startswith(_PREFIX):
                    yield name, tensor
                    continue
                key = name[len(_PREFIX):]
                if key == "_extra_state":        # the layout: must match the installed plan
                    own.set_extra_state(tensor)
                    continue
                if key not in params:
                    raise PlanFormatError(f"checkpoint tensor {name} is not an AttnRes parameter of the installed plan "
                                          f"(it has {sorted(params)[:4]} ...)", field=name)
                if tuple(tensor.shape) != tuple(params[key].shape) or not tensor.is_floating_point() \
                        or not torch.isfinite(tensor).all():
                    raise PlanFormatError(f"checkpoint tensor {name}: {tensor.dtype} {list(tensor.shape)}, the plan "
                                          f"needs finite floats of shape {list(params[key].shape)}", field=name)
                with torch.no_grad():
                    params[key].copy_(tensor.to(params[key].dtype))
                loaded.add(name)

        loaded |= super().load_weights(others())
        missing = sorted(_PREFIX + k for k in params if _PREFIX + k not in loaded)
        if missing:
            raise PlanFormatError(f"the checkpoint lacks AttnRes weights the plan needs: {missing[:4]}", field=missing[0])
        return loaded


class AttnResTransformersForCausalLM(_AttnResMixin, TransformersForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_attnres()


class AttnResTransformersMoEForCausalLM(_AttnResMixin, TransformersMoEForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_attnres()
