"""Example inputs, as the CLI and the checks need them: built from shapes and dtypes, the
dynamic dimensions torch.export should treat as symbolic, and copies of other sizes along them
(to show a program is not specialised to the example's shapes)."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..checks import bound_arguments


def embedding_size(model) -> int:
    """Rows of the model's first nn.Embedding (2 when it has none): the range of integer inputs."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return 2


def make_inputs(model, shapes, dtypes) -> tuple:
    """Random example inputs of the given shapes and dtype names (default float32): integer
    inputs index the model's first embedding table, bool inputs are random masks."""
    dtypes = dtypes or ["float32"]
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise ValueError(f"give one --input-dtype for all inputs or one per --input-shape "
                         f"({len(shapes)} shapes, {len(dtypes)} dtypes)")
    out = []
    for shape, name in zip(shapes, dtypes):
        dtype = getattr(torch, name)
        if dtype == torch.bool:
            out.append(torch.randint(0, 2, shape).bool())
        elif dtype.is_floating_point:
            out.append(torch.randn(shape).to(dtype))
        else:
            out.append(torch.randint(0, embedding_size(model), shape).to(dtype))
    return tuple(out)


def dynamic_shapes_for(module, args: tuple, kwargs: dict, bounds: dict | None = None) -> dict:
    """torch.export dynamic_shapes: dim 0 of every tensor input, and dim 1 of 2-D integer inputs.

    Inputs whose dims have the same size share one Dim (e.g. input_ids and attention_mask);
    `bounds` gives a dim's (min, max) by name ("batch", "seq", "seq_1", ...).
    """
    dims: dict = {}

    def dim(role: str, size: int):
        key = (role, size)
        if key not in dims:
            n = sum(1 for r, _ in dims if r == role)
            name = role if n == 0 else f"{role}_{n}"
            lo, hi = (bounds or {}).get(name, (None, None))
            dims[key] = Dim(name, **({"min": lo} if lo is not None else {}), **({"max": hi} if hi is not None else {}))
        return dims[key]

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        s = {0: dim("batch", x.shape[0])}
        if x.dim() == 2 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
            s[1] = dim("seq", x.shape[1])
        return s

    sig, bound = bound_arguments(module, args, kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        else:
            out[name] = pytree.tree_map(spec, value)
    return out


def resized_inputs(args: tuple, kwargs: dict, dynamic: dict, module):
    """Inputs of other sizes along the dynamic dims (batch + 1, seq - 1), values like the examples."""
    sig, bound = bound_arguments(module, args, kwargs)
    new_size = {}
    g = torch.Generator().manual_seed(1)

    def resize(x, spec):
        if not isinstance(x, torch.Tensor) or not spec:
            return x
        shape = list(x.shape)
        for axis, d in spec.items():
            if d not in new_size:
                old = x.shape[axis]
                new_size[d] = old + 1 if d.__name__.startswith("batch") or old <= 2 else old - 1
            shape[axis] = new_size[d]
        if x.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        if x.is_floating_point():
            return torch.randn(shape, generator=g).to(x.dtype)
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, shape, generator=g).to(x.dtype)

    new_args, new_kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        spec = dynamic.get(name)
        if kind == inspect.Parameter.VAR_POSITIONAL:
            new_args.extend(_resize_tree(resize, tuple(value), spec))
        elif kind == inspect.Parameter.VAR_KEYWORD:
            new_kwargs.update(_resize_tree(resize, dict(value), spec))
        elif kind == inspect.Parameter.KEYWORD_ONLY or name in kwargs:
            new_kwargs[name] = _resize_tree(resize, value, spec)
        else:
            new_args.append(_resize_tree(resize, value, spec))
    return tuple(new_args), new_kwargs


def _resize_tree(resize, value, spec):
    if isinstance(value, torch.Tensor):
        return resize(value, spec)
    if isinstance(value, (tuple, list)) and isinstance(spec, (tuple, list)):
        return type(value)(_resize_tree(resize, v, s) for v, s in zip(value, spec))
    if isinstance(value, dict) and isinstance(spec, dict):
        return {k: _resize_tree(resize, v, spec.get(k)) for k, v in value.items()}
    return value
