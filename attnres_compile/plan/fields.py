"""The value types of the plan's fields: strings of a given shape, dtypes and devices.

Annotated types shared by the plan's data classes (types.py) and the layout saved with the
weights (format.py); each carries its constraints, which pydantic checks and the JSON Schema
states.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema

from .limits import MAX_NAME

STRICT = ConfigDict(extra="forbid", strict=True)
"""Every class of the format: no unknown fields, no coercion ("3" is not 3, true is not 1)."""

# -- value types -------------------------------------------------------------------------------

ModulePath = Annotated[str, Field(max_length=MAX_NAME, pattern=r"^([^.\x00-\x1f]+(\.[^.\x00-\x1f]+)*)?$",
                                  description="a module's path in the model (`model.layers.3.mlp`; empty: the model)")]
Identifier = Annotated[str, Field(max_length=MAX_NAME, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
PythonModule = Annotated[str, Field(max_length=MAX_NAME, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
                                    description="a dotted Python module name")]
SiteName = Annotated[str, Field(pattern=r"^(site[0-9]{1,5}|final)$")]


def _relative_file(path: str) -> str:
    if path.startswith("<"):
        if not path.endswith(">"):
            raise ValueError("a generated file name is written <...>")
        return path
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise ValueError("must be a path relative to its module's folder (a checkpoint holds no machine path)")
    if ".." in path.split("/"):
        raise ValueError("must not leave its module's folder ('..')")
    return path


SourceFile = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[^\x00-\x1f]+$"),
                       AfterValidator(_relative_file)]

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_INPUT_DTYPES = (*_FLOAT_DTYPES, "complex64", "complex128", "int8", "int16", "int32", "int64", "uint8", "bool")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _float_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str) or value not in _FLOAT_DTYPES:
        raise ValueError(f"must be one of {', '.join(_FLOAT_DTYPES)}")
    return getattr(torch, value)


def _device(value) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError("must be a device name such as 'cpu' or 'cuda:0'")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError("must be a device name such as 'cpu' or 'cuda:0'") from None


FloatDType = Annotated[torch.dtype, PlainValidator(_float_dtype), PlainSerializer(_dtype_name, return_type=str),
                       WithJsonSchema({"enum": list(_FLOAT_DTYPES)})]
Device = Annotated[torch.device, PlainValidator(_device), PlainSerializer(str, return_type=str),
                   WithJsonSchema({"type": "string", "pattern": r"^[a-z_]+(:[0-9]+)?$"})]


VersionText = Annotated[str, Field(max_length=64, pattern=r"^[0-9A-Za-z.+_-]+$")]
