"""attnres-compile: retrofit Block Attention Residuals into traced PyTorch models.

Pipeline: capture (torch.export) -> passes/ (find residual streams, fix the plan) -> runtime/
(install the plan into the model's code, serve every call, replay saved plans) -> ops/ (the
depth-attention op) -> lowering/ (kernels, torch.compile, ONNX).
"""

from .api import (
    ChainInfo,
    apply_plan,
    attnres_parameters,
    attnres_state_dict,
    convert,
    is_converted,
    load_attnres_state_dict,
    save_attnres,
)
from .errors import (AttnResError, CaptureError, LayoutChangedError, ModeMismatchError, NoEligibleChainError,
                     PlanFormatError, PlanMismatchError, StalePlanError)
from .hf import from_pretrained
from .onnx.export import export_onnx
from .onnx.decoder import export_decoder, export_for_generation, ort_generate
from .convert.report import ConversionReport
from .checks import VerifyReport, verify
from .parallel.pipeline import PipelineSplitError, pipeline_stages
from .training import param_groups

__all__ = [
    "convert",
    "apply_plan",
    "from_pretrained",
    "is_converted",
    "ChainInfo",
    "attnres_parameters",
    "param_groups",
    "export_onnx",
    "export_decoder",
    "export_for_generation",
    "ort_generate",
    "attnres_state_dict",
    "save_attnres",
    "load_attnres_state_dict",
    "ConversionReport",
    "verify",
    "VerifyReport",
    "pipeline_stages",
    "PipelineSplitError",
    "AttnResError",
    "CaptureError",
    "NoEligibleChainError",
    "ModeMismatchError",
    "PlanMismatchError",
    "PlanFormatError",
    "StalePlanError",
    "LayoutChangedError",
]
