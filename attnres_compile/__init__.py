"""attnres-compile: retrofit Block Attention Residuals into traced PyTorch models.

Pipeline: capture (torch.export) -> passes/ (find and rewrite residual streams)
-> ops/ (the depth-attention op) -> lowering/ (kernels, torch.compile, ONNX).
"""

from .api import attnres_parameters, convert
from .errors import AttnResError, CaptureError, NoEligibleChainError
from .lowering.onnx_export import export_onnx
from .module import AttnResModule
from .report import ConversionReport

__all__ = [
    "convert",
    "attnres_parameters",
    "export_onnx",
    "AttnResModule",
    "ConversionReport",
    "AttnResError",
    "CaptureError",
    "NoEligibleChainError",
]
