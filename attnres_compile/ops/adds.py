"""What adds two tensors at call time: the torch functions a residual add runs through.

Conversion records them while it captures a model (conversion/capture.py), and the runtime's
torch function mode intercepts them in code it cannot recompile (runtime/mode.py); both name
the same functions, so they live below both.
"""

from __future__ import annotations

import torch

_TB = torch._C.TensorBase
ADD_FUNCS = frozenset({
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
    torch.Tensor.__iadd__, _TB.add, _TB.__add__, _TB.__radd__, _TB.add_, _TB.__iadd__,
})
INPLACE_ADD_FUNCS = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__, _TB.add_, _TB.__iadd__})
IADD_FUNCS = frozenset({torch.Tensor.__iadd__, _TB.__iadd__})  # `x += y`: Python rebinds x to the result
REVERSED_ADD_FUNCS = frozenset({torch.Tensor.__radd__, _TB.__radd__})
