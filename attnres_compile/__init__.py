"""attnres-compile: retrofit Block Attention Residuals into traced PyTorch models.

The data's journey, one folder each (README.md, Layout):

    conversion/  capture the model (torch.export), find its residual streams, fix the plan
    plan/        the plan: data classes, the saved format, AttnResConfig  <- the hinge
    runtime/     install the plan in the model's code, serve every call
    ops/         the depth-attention op, its reference and its kernels (ops/kernels/)
    compile/ onnx/ serving/ parallel/ cli/   the front ends

`api.py` holds the public verbs; everything public is re-exported here.
"""

from .api import (
    AttnResConfig,
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
from .onnx import export_decoder, export_for_generation, export_onnx, ort_generate
from .conversion.report import ConversionReport
from .checks import VerifyReport, verify
from .parallel.pipeline import PipelineSplitError, pipeline_stages
from .training import param_groups

__all__ = [
    "convert",
    "AttnResConfig",
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
