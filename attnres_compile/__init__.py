"""attnres-compile: retrofit Block Attention Residuals into traced PyTorch models.

Pipeline: capture (torch.export) -> passes/ (find and rewrite residual streams)
-> ops/ (the depth-attention op) -> lowering/ (kernels, torch.compile, ONNX).
"""

from .api import (
    attnres_parameters,
    attnres_state_dict,
    convert,
    load_attnres_state_dict,
    save_attnres,
)
from .errors import AttnResError, CaptureError, ModeMismatchError, NoEligibleChainError
from .lowering.onnx_export import export_onnx
from .module import AttnResModule
from .report import ConversionReport

__all__ = [
    "convert",
    "attnres_parameters",
    "export_onnx",
    "attnres_state_dict",
    "save_attnres",
    "load_attnres_state_dict",
    "AttnResModule",
    "ConversionReport",
    "AttnResError",
    "CaptureError",
    "NoEligibleChainError",
    "ModeMismatchError",
]
