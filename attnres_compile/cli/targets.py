"""The model a command works on: `package.module:attr`, imported and built, with its inputs."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field

from .parser import BadInput
from .ui import UI, one_line

@dataclass
class Target:
    spec: str
    model: object
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return type(self.model).__name__


def _import(module_name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script does not add it; `python -m` does
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise BadInput(f"cannot import {module_name!r}: no module named {missing!r} "
                           f"(run from the directory that contains it, or install it)") from exc
        raise BadInput(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the module itself raised while importing
        raise BadInput(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc


def _resolve(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"MODEL must be package.module:attr (e.g. examples.cli_models:gpt_small), got {spec!r}")
    obj = _import(module_name)
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"module {where!r} has no attribute {part!r}")
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    return obj


def load_target(args, ui: UI) -> Target:
    """Import MODEL, build the model and its example inputs (BadInput when that cannot be done)."""
    with ui.step(f"loading {args.model}"):
        return _load_target(args)


def _load_target(args) -> Target:
    import torch
    from torch import nn

    torch.manual_seed(args.seed)
    spec = args.model
    obj = _resolve(spec)
    if isinstance(obj, nn.Module):
        model, example, kwargs = obj, None, {}
    elif callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise BadInput(f"{spec} is a callable that needs arguments; name a zero-argument factory "
                           f"returning (model, example_inputs) or an nn.Module instance") from None
        except ValueError:
            pass  # no signature (builtins): just call it
        try:
            result = obj()
        except Exception as exc:
            raise BadInput(f"{spec}() raised {type(exc).__name__}: {one_line(str(exc))}") from exc
        if isinstance(result, nn.Module):
            model, example, kwargs = result, None, {}
        elif (isinstance(result, (tuple, list)) and len(result) in (2, 3)
              and isinstance(result[0], nn.Module)):
            model, example = result[0], result[1]
            kwargs = result[2] if len(result) == 3 else {}
            if kwargs is None:
                kwargs = {}
            if not isinstance(kwargs, dict):
                raise BadInput(f"{spec}() returned kwargs of type {type(kwargs).__name__}; expected a dict")
            if isinstance(example, torch.Tensor):
                example = (example,)
            elif isinstance(example, list):
                example = tuple(example)
            if not isinstance(example, tuple):
                raise BadInput(f"{spec}() returned example_inputs of type {type(example).__name__}; "
                               "expected a tuple of positional arguments (or one tensor)")
        else:
            raise BadInput(f"{spec}() returned {_describe(result)}; a factory must return "
                           "(model, example_inputs) or (model, example_inputs, kwargs) with an nn.Module model")
    else:
        raise BadInput(f"{spec} is {_describe(obj)}, not an nn.Module or a zero-argument factory "
                       "returning (model, example_inputs)")

    if example is None:
        if not args.input_shape:
            raise BadInput(f"{spec} is a module instance without example inputs: pass --input-shape "
                           "(and --input-dtype), or name a factory returning (model, example_inputs)")
        try:
            from .inputs import make_inputs

            example = make_inputs(model, args.input_shape, args.input_dtype)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    elif args.input_shape or args.input_dtype:
        raise BadInput(f"--input-shape/--input-dtype are for module instances; {spec} supplies its own example inputs")
    return Target(spec, model, example, dict(kwargs))


def _describe(obj) -> str:
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(obj, (tuple, list)):
        return f"{article} {name} of {len(obj)} ({', '.join(type(o).__name__ for o in obj[:3])})"
    return f"{article} {name}"


def checks_module():
    """attnres_compile.checks, imported on first use (it imports torch)."""
    from .. import checks

    return checks


# -- shared helpers --------------------------------------------------------------------------------------

def convert_target(target: Target, args, ui: UI, preserve: str):
    from ..api import convert

    with ui.step(f"converting {target.name} (capture with torch.export, train and eval)"):
        return convert(target.model, target.args, kwargs=target.kwargs, num_blocks=args.num_blocks,
                       block_size=args.block_size, preserve=preserve)
