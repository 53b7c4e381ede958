"""The `attnres` command line (also `python -m attnres_compile`): inspect, convert, export, check.

A model is named `package.module:attr` (imported with the current directory on sys.path), where
`attr` (dotted paths allowed) is either

- a zero-argument factory returning `(model, example_inputs)` or `(model, example_inputs, kwargs)`,
- or an nn.Module instance, with `--input-shape 2,16 [--input-dtype long]` for its inputs.

Exit codes: 0 success; 1 a check failed (or the command failed past its input); 2 bad input
(unknown module, missing attribute, not a module or factory, untraceable model, no eligible
residual stream, bad arguments). Errors are one line on stderr; `--debug` shows the traceback.

torch and the package are imported only once the arguments parse, so `--help`, `--version`
and argument errors are quick.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

DTYPES = {
    "long": "int64", "int64": "int64", "int": "int32", "int32": "int32", "int16": "int16",
    "uint8": "uint8", "bool": "bool",
    "float": "float32", "float32": "float32", "double": "float64", "float64": "float64",
    "half": "float16", "float16": "float16", "bfloat16": "bfloat16",
}


class BadInput(Exception):
    """The user's input cannot be used: exit 2 with this one-line message."""


class Failed(Exception):
    """The command ran into a failure that is not the input's fault: exit 1."""


# -- argument parsing ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (plus a pointer to --help) and exit 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _number(text: str, kind: type, what: str, ok) -> int | float:
    """Parse an argparse value of type `kind`; `ok(value)` says whether it is in range."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def _nonneg_int(text: str) -> int:
    return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def _positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0 and not math.isinf(v))


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 2,16, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected a shape of positive sizes like 2,16, got {text!r}")
    return dims


def _dim_bound(text: str) -> tuple[str, int | None, int | None]:
    """`NAME=MIN:MAX` (either bound may be empty) for --dim."""
    name, sep, bounds = text.partition("=")
    lo, sep2, hi = bounds.partition(":")
    if not sep or not sep2 or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=MIN:MAX (e.g. seq=1:32), got {text!r}")
    try:
        lo_v, hi_v = (int(lo) if lo else None), (int(hi) if hi else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bounds of {name} must be integers, got {bounds!r}") from None
    if lo_v is not None and hi_v is not None and lo_v > hi_v:
        raise argparse.ArgumentTypeError(f"{name}: MIN {lo_v} is larger than MAX {hi_v}")
    return name, lo_v, hi_v


def _bounds(args) -> dict[str, tuple[int | None, int | None]]:
    """The --dim / --max-batch / --max-seq bounds by dim name; any of them turns --dynamic on."""
    out = {name: (lo, hi) for name, lo, hi in getattr(args, "dim", []) or []}
    for name, flag in (("batch", "max_batch"), ("seq", "max_seq")):
        if getattr(args, flag, None) is not None:
            out[name] = (out.get(name, (None, None))[0], getattr(args, flag))
    if out:
        args.dynamic = True
    return out


def _suggested_fix(exc: BaseException) -> str:
    """torch.export's "Suggested fixes" lines (e.g. `seq = Dim('seq', max=32)`), as one line."""
    text = str(exc)
    if "Suggested fixes:" not in text:
        return ""
    lines = [ln.strip() for ln in text.split("Suggested fixes:", 1)[1].splitlines() if "Dim(" in ln]
    return "; torch suggests " + ", ".join(lines[:4]) + " (set bounds with --dim NAME=MIN:MAX)" if lines else ""


def _dtype(text: str) -> str:
    key = text.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("attnres-compile")
    except PackageNotFoundError:
        own = "unknown"
    try:
        torch_v = version("torch")
    except PackageNotFoundError:
        torch_v = "not installed"
    return f"attnres {own} (torch {torch_v})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnres",
        description="Inspect, convert, export and check Block Attention Residual conversions of a "
                    "PyTorch model named as package.module:attr.",
        epilog="exit codes: 0 success, 1 a check failed, 2 bad input. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")

    common = _Parser(add_help=False)
    common.add_argument("model", metavar="MODEL",
                        help="package.module:attr; attr is a zero-argument factory returning "
                             "(model, example_inputs[, kwargs]) or an nn.Module instance")
    layout = common.add_mutually_exclusive_group()
    layout.add_argument("--num-blocks", type=_positive_int, metavar="N",
                        help="blocks per residual stream (default 8); block size = ceil(sublayers / N)")
    layout.add_argument("--block-size", type=_positive_int, metavar="S",
                        help="sublayers per block (1 = Full AttnRes)")
    inputs = common.add_argument_group("example inputs for a bare module instance")
    inputs.add_argument("--input-shape", type=_shape, action="append", metavar="SHAPE",
                        help="shape of one positional input, e.g. 2,16 (repeat for more inputs)")
    inputs.add_argument("--input-dtype", type=_dtype, action="append", metavar="DTYPE",
                        help="dtype of each input (one for all, or one per --input-shape): long, float, "
                             "bfloat16, ... (default float32). Integer inputs are drawn from "
                             "[0, num_embeddings) of the model's first nn.Embedding, else [0, 2)")
    common.add_argument("--seed", type=_nonneg_int, default=0,
                        help="torch seed set before building the model and inputs (default 0)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library warnings")

    def preserve_arg(p, default):
        p.add_argument("--preserve", choices=("scale", "exact"), default=default,
                       help=f"'scale' (the paper) or 'exact' (the original's outputs at step 0, up to "
                            f"float32 summation order; also converts non-PreNorm chains); default {default!r}")

    def dynamic_arg(p, what):
        p.add_argument("--dynamic", action="store_true",
                       help=f"{what} with a dynamic dim 0 of every tensor input (and dim 1 of 2-D "
                            "integer inputs, e.g. token ids) via torch.export.Dim")
        p.add_argument("--dim", action="append", type=_dim_bound, default=[], metavar="NAME=MIN:MAX",
                       help="bounds of a dynamic dim (names: batch, seq; e.g. seq=1:32); implies --dynamic")
        p.add_argument("--max-batch", type=_positive_int, metavar="N", help="shorthand for --dim batch=1:N")
        p.add_argument("--max-seq", type=_positive_int, metavar="N", help="shorthand for --dim seq=1:N")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", parents=[common],
                       help="show residual chains, sites, block layout and every add left alone",
                       description="Convert (in memory) and print the conversion report: residual "
                                   "chains, depth-attention sites, block layout, and every add left "
                                   "alone with its reason. Exits 2 (after printing the report) when "
                                   "no chain is eligible.")
    preserve_arg(p, "scale")
    p.add_argument("--json", metavar="FILE", help="write the report (plus a status) as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", parents=[common],
                       help="convert and save the program (torch.export) and the AttnRes weights",
                       description="Convert, save the converted program with torch.export.save "
                                   "(eval mode) and the new AttnRes parameters alone as safetensors "
                                   "next to it (FILE with suffix .attnres.safetensors); then load the "
                                   "program back and check it reproduces the converted module.")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the program (.pt2)")
    preserve_arg(p, "scale")
    dynamic_arg(p, "export")
    p.add_argument("--max-rel-err", type=_positive_float, default=1e-5, metavar="X",
                   help="largest relative error of the reloaded program (default 1e-5)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", parents=[common],
                       help="convert and export to ONNX, then compare onnxruntime with PyTorch",
                       description="Convert, export to ONNX (one attnres::DepthAttention node per "
                                   "site), run onnxruntime on the example inputs and compare with "
                                   "PyTorch. Exits 1 when the relative error exceeds --max-rel-err.")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the .onnx file")
    preserve_arg(p, "scale")
    p.add_argument("--inline", action="store_true",
                   help="expand each DepthAttention node into standard ONNX ops (no functions)")
    p.add_argument("--fused", action="store_true",
                   help="also check onnxruntime with the fused DepthAttention kernel registered "
                        "(attnres_compile.onnx.export.ort_session; CPU, float32)")
    p.add_argument("--with-cache", action="store_true",
                   help="export a decoder with past for generation (inputs past_key_values.*, outputs "
                        "present.*) plus genai_config.json beside it, and check that onnxruntime "
                        "generates the tokens PyTorch generates")
    p.add_argument("--new-tokens", type=_positive_int, default=8, metavar="N",
                   help="with --with-cache: how many tokens the generation check makes (default 8)")
    dynamic_arg(p, "export")
    p.add_argument("--max-rel-err", type=_positive_float, default=1e-4, metavar="X",
                   help="largest accepted relative error, onnxruntime vs PyTorch (default 1e-4)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", parents=[common],
                       help="the CI gate: step-0 equivalence, gradient flow, sites, ONNX parity",
                       description="Convert (exact mode by default) and check: step-0 equivalence "
                                   "with the original (eval mode), gradient flow to every new "
                                   "parameter, the number of sites (--expect-sites) and, with --onnx, "
                                   "onnxruntime parity. One PASS/FAIL line per check; exit 0 only "
                                   "when all pass, 1 when one fails.")
    preserve_arg(p, "exact")
    p.add_argument("--expect-sites", type=_nonneg_int, metavar="N",
                   help="the number of depth-attention sites the conversion must find")
    p.add_argument("--max-rel-err", type=_positive_float, default=1e-5, metavar="X",
                   help="largest accepted relative error of the converted model's output vs the "
                        "original at step 0 (default 1e-5)")
    p.add_argument("--onnx", action="store_true",
                   help="also export to ONNX (random non-zero queries) and compare onnxruntime with PyTorch")
    p.add_argument("--onnx-max-rel-err", type=_positive_float, default=1e-4, metavar="X",
                   help="largest accepted relative error of the ONNX parity check (default 1e-4)")
    p.add_argument("--generate", type=_positive_int, metavar="N",
                   help="also generate N greedy tokens from the example prompt with the original, the "
                        "converted model (PyTorch generate) and a decoder with past in onnxruntime; "
                        "all three must agree")
    p.add_argument("--json", metavar="FILE", help="write the checks and the report as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plot-weights",
                       help="draw the site x source heatmap of a converted program's depth weights",
                       description="Load a converted program saved by `attnres convert` (or by "
                                   "`python -m examples.train_lm`), run it on its saved example inputs "
                                   "(or on --tokens random token ids) and draw the mean softmax weight "
                                   "every depth-attention site puts on each source. Source labels come "
                                   "from the .attnres.safetensors file next to the program when present.")
    p.add_argument("checkpoint", metavar="CONVERTED_CHECKPOINT", help="a .pt2 file from torch.export.save")
    p.add_argument("-o", "--output", metavar="FILE", help="the PNG to write (default: CHECKPOINT with .weights.png)")
    p.add_argument("--json", metavar="FILE", help="also write the weights as JSON")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(func=cmd_plot_weights)

    p = sub.add_parser("train", add_help=False,
                       help="the training-dynamics study (examples/train_lm.py; needs a source checkout)",
                       description="Runs examples/train_lm.py with the remaining arguments: "
                                   "`attnres train run --variant block4`, `attnres train study`, "
                                   "`attnres train plot`, `attnres train retrofit study` (examples/retrofit.py); run records go to ./attnres_runs/ unless "
                                   "--out says otherwise. See docs/results.md.")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)
    return parser


# -- output ------------------------------------------------------------------------------------------

class UI:
    """stdout for results, stderr for progress and errors (rich; plain text when not a terminal).

    Library calls run inside `step()`, which also swallows what torch and the ONNX exporter
    print straight to stdout/stderr (e.g. the partial graph torch.export prints on failure),
    unless --debug.
    """

    def __init__(self, debug: bool):
        from rich.console import Console

        self.debug = debug
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=False,
                           width=None if sys.stdout.isatty() else 140)
        self.err = Console(file=sys.stderr, stderr=True, highlight=False)

    def print(self, *objects, style=None):
        self.out.print(*objects, style=style, markup=False)

    def print_report(self, report):
        if self.out.is_terminal:
            self.out.print(report)
        else:  # CI logs: no trailing padding
            self.out.file.write("\n".join(ln.rstrip() for ln in str(report).splitlines()) + "\n")

    @contextlib.contextmanager
    def step(self, message: str):
        """A spinner on stderr while a long step runs (terminals only), then a timed tick."""
        import io

        start = time.perf_counter()
        quiet = contextlib.ExitStack()
        if not self.debug:
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        with quiet:
            if not self.err.is_terminal:
                yield
                return
            with self.err.status(f"{message} ..."):
                yield
        elapsed = time.perf_counter() - start
        if elapsed >= 1.0:
            self.err.print(f"[dim]{message}: {elapsed:.1f} s[/dim]")


# -- loading the model ---------------------------------------------------------------------------------

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
            raise BadInput(f"{spec}() raised {type(exc).__name__}: {_one_line(str(exc))}") from exc
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


def _one_line(text: str) -> str:
    """A multi-line message as one line: sentences joined by a space, other lines by '; '."""
    out = ""
    for ln in (ln.strip() for ln in str(text).strip().splitlines()):
        if not ln:
            continue
        out = ln if not out else out + (" " if out.endswith((".", ":", ";")) else "; ") + ln
    return out


def _first_line(exc: BaseException, limit: int = 300) -> str:
    from ..errors import first_line

    return first_line(exc, limit)


def _v():
    """attnres_compile.checks, imported on first use (it imports torch)."""
    from .. import checks

    return checks


# -- shared helpers --------------------------------------------------------------------------------------

def convert_target(target: Target, args, ui: UI, preserve: str):
    from .. import convert

    with ui.step(f"converting {target.name} (capture with torch.export, train and eval)"):
        return convert(target.model, target.args, kwargs=target.kwargs, num_blocks=args.num_blocks,
                       block_size=args.block_size, preserve=preserve)


def _write_json(path: str, data: dict, ui: UI) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    if ui.err.is_terminal:
        ui.err.print(f"wrote {p}", markup=False, highlight=False)


def _json_default(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _summary(report) -> str:
    chains = len(report.chains)
    return (f"{report.model}: {chains} chain{'s' if chains != 1 else ''}, {report.num_sites} sites, "
            f"{len(report.parameters)} new parameters, preserve={report.preserve!r}")


# -- commands --------------------------------------------------------------------------------------------

def cmd_inspect(args, ui: UI) -> int:
    from ..errors import NoEligibleChainError

    target = load_target(args, ui)
    try:
        converted = convert_target(target, args, ui, args.preserve)
    except NoEligibleChainError as exc:
        if exc.report is not None:
            ui.print_report(exc.report)
        if args.json:
            data = {"status": "no_eligible_chain", "target": target.spec, "message": str(exc)}
            if exc.report is not None:
                data.update(exc.report.to_dict())
            _write_json(args.json, data, ui)
        raise
    report = converted.attnres_report
    ui.print_report(report)
    if args.json:
        _write_json(args.json, {"status": "ok", "target": target.spec, **report.to_dict()}, ui)
    return EXIT_OK


def cmd_convert(args, ui: UI) -> int:
    import torch

    from .. import load_attnres_state_dict, save_attnres
    from .inputs import dynamic_shapes_for, resized_inputs

    target = load_target(args, ui)
    converted = convert_target(target, args, ui, args.preserve).eval()
    out = Path(args.output)
    weights = out.with_suffix(".attnres.safetensors")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    bounds = _bounds(args)
    dynamic = dynamic_shapes_for(converted, target.args, target.kwargs, bounds) if args.dynamic else None
    with ui.step("exporting the converted program (torch.export)"):
        try:
            program = torch.export.export(converted, target.args, kwargs=target.kwargs, strict=False,
                                          dynamic_shapes=dynamic)
        except Exception as exc:
            raise Failed(f"torch.export of the converted model failed: {type(exc).__name__}: "
                         f"{_first_line(exc)}{_suggested_fix(exc)}") from exc
        torch.export.save(program, out)
        save_attnres(converted, weights)
    with ui.step("verifying the saved files"):
        loaded = torch.export.load(out).module()
        runs = [("example inputs", target.args, target.kwargs)]
        if dynamic:
            r_args, r_kwargs = resized_inputs(target.args, target.kwargs, dynamic, converted)
            runs.append(("resized inputs " + _shapes_text(r_args, r_kwargs), r_args, r_kwargs))
        results = [(label, _program_err(loaded, converted, a, k)) for label, a, k in runs]
        load_attnres_state_dict(converted, weights)  # layout and names fit the converted model
    ui.print(f"converted {_summary(converted.attnres_report)}")
    ui.print(f"program: {out}" + (f" (dynamic {_dyn_text(dynamic)})" if dynamic else ""))
    ui.print(f"attnres weights: {weights} ({len(converted.attnres_report.parameters)} tensors)")
    ok = True
    for label, err in results:
        passed = err <= args.max_rel_err
        ok &= passed
        ui.print(f"{'PASS' if passed else 'FAIL'}  torch.export.load(program) vs converted module on {label}: "
                 f"max rel err {_v().fmt(err)} (limit {args.max_rel_err:g})", style=None if passed else "red")
    return EXIT_OK if ok else EXIT_FAILED


def _program_err(loaded, converted, args: tuple, kwargs: dict) -> float:
    import torch

    with torch.no_grad():
        ref = converted(*args, **kwargs)
        got = loaded(*args, **kwargs)
    ref_l, got_l = _v().tensor_leaves(ref), _v().tensor_leaves(got)
    if len(ref_l) == len(got_l):
        return max(_v().rel_err(g, r) for g, r in zip(got_l, ref_l))
    return _v().rel_err(_v().main_output(got), _v().main_output(ref))


def cmd_export(args, ui: UI) -> int:
    from .inputs import dynamic_shapes_for, resized_inputs
    from ..onnx.export import count_depth_attention_nodes, export_onnx

    if args.fused and args.inline:
        raise BadInput("--fused needs DepthAttention nodes; it cannot be combined with --inline")
    if args.with_cache and args.dynamic:
        raise BadInput("--with-cache exports dynamic batch, sequence and past length already; drop --dynamic")
    target = load_target(args, ui)
    if args.with_cache:
        return _export_with_cache(target, args, ui)
    converted = convert_target(target, args, ui, args.preserve).eval()
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    bounds = _bounds(args)
    dynamic = dynamic_shapes_for(converted, target.args, target.kwargs, bounds) if args.dynamic else None
    with ui.step("exporting to ONNX"):
        try:
            proto = export_onnx(converted, target.args, out, kwargs=target.kwargs,
                                dynamic_shapes=dynamic, inline=args.inline)
        except Exception as exc:
            raise Failed(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}{_suggested_fix(exc)}") from exc
    nodes = count_depth_attention_nodes(proto)
    ui.print(f"converted {_summary(converted.attnres_report)}")
    ui.print(f"onnx: {out} ({'inlined, no DepthAttention nodes' if args.inline else f'{nodes} attnres::DepthAttention nodes'}"
             f"{', dynamic ' + _dyn_text(dynamic) if dynamic else ''})")
    ok = True
    with ui.step("running onnxruntime"):
        runs = [("example inputs", target.args, target.kwargs)]
        if dynamic:
            r_args, r_kwargs = resized_inputs(target.args, target.kwargs, dynamic, converted)
            runs.append(("resized inputs " + _shapes_text(r_args, r_kwargs), r_args, r_kwargs))
        sessions = [("onnxruntime", False)]
        if args.fused:
            try:
                from ..onnx import ort_kernel

                ort_kernel.library_path()
            except Exception as exc:
                raise Failed(f"the fused onnxruntime kernel is unavailable: {_first_line(exc)}") from exc
            sessions.append(("onnxruntime + fused kernel", True))
        results = [(f"{who} vs PyTorch on {label}", _v().onnx_parity(proto, converted, a, k, fused=fused))
                   for who, fused in sessions for label, a, k in runs]
    for label, err in results:
        passed = err <= args.max_rel_err
        ok &= passed
        ui.print(f"{'PASS' if passed else 'FAIL'}  {label}: max rel err {_v().fmt(err)} "
                 f"(limit {args.max_rel_err:g})", style=None if passed else "red")
    return EXIT_OK if ok else EXIT_FAILED


def _export_with_cache(target: Target, args, ui: UI) -> int:
    import torch

    from ..onnx.decoder import decoder_spec, export_decoder, ort_generate, write_genai_config

    converted = convert_target(target, args, ui, args.preserve).eval()
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    with ui.step("exporting the decoder with past to ONNX"):
        spec = decoder_spec(converted)  # a model without a cache argument: bad input, exit 2
        try:
            proto = export_decoder(converted, out, inline=args.inline)
        except Exception as exc:
            raise Failed(f"ONNX export with cache failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        config = None
        if getattr(converted, "config", None) is not None:
            config = write_genai_config(converted, out.parent, filename=out.name, spec=spec)
    ui.print(f"converted {_summary(converted.attnres_report)}")
    ui.print(f"onnx: {out} (decoder with past: {spec.num_layers} layers of past_key_values.*.key/value in, "
             f"present.* out; dynamic batch, sequence and past length)")
    if config is not None:
        ui.print(f"onnxruntime-genai config: {config}")
    prompt = target.args[0]
    gen = getattr(converted, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    with torch.no_grad():
        want = converted.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=pad if pad is not None else eos)
    sessions = [("onnxruntime", False)] + ([("onnxruntime + fused kernel", True)] if args.fused else [])
    ok = True
    with ui.step("generating in onnxruntime"):
        results = [(who, ort_generate(proto, prompt, max_new_tokens=args.new_tokens, eos_token_id=eos,
                                      pad_token_id=pad, fused=fused)) for who, fused in sessions]
    for who, got in results:
        passed = got.shape == want.shape and bool(torch.equal(got, want))
        ok &= passed
        ui.print(f"{'PASS' if passed else 'FAIL'}  {who} generates PyTorch's {args.new_tokens} greedy tokens"
                 + ("" if passed else f": {got[0].tolist()} vs {want[0].tolist()}"), style=None if passed else "red")
    return EXIT_OK if ok else EXIT_FAILED


def _dyn_text(dynamic: dict) -> str:
    parts = []
    for name, spec in dynamic.items():
        if isinstance(spec, dict) and spec and all(isinstance(k, int) for k in spec):
            parts.append(f"{name}[" + ", ".join(f"{a}:{d.__name__}" for a, d in sorted(spec.items())) + "]")
    return " ".join(parts)


def _shapes_text(args: tuple, kwargs: dict) -> str:
    return ", ".join("x".join(str(s) for s in t.shape) for t in _v().tensor_leaves((args, kwargs)))


def cmd_check(args, ui: UI) -> int:
    from ..checks import verify

    target = load_target(args, ui)
    converted = convert_target(target, args, ui, args.preserve)
    report = converted.attnres_report
    ui.print(f"attnres check of {target.spec}: {_summary(report)}")

    def show(c):
        ui.out.print(f"[{'green' if c.passed else 'red'}]{'PASS' if c.passed else 'FAIL'}[/]  "
                     f"{c.name:<20} ", end="", highlight=False)
        ui.out.print(c.detail, markup=False, highlight=False)

    what = ["step-0 equivalence", "gradient flow", *(["onnx parity"] if args.onnx else []),
            *(["generation"] if args.generate else [])]
    with ui.step(f"checking ({', '.join(what)})"):
        result = verify(converted, target.args, kwargs=target.kwargs, original=target.model,
                        expect_sites=args.expect_sites, max_rel_err=args.max_rel_err, onnx=args.onnx,
                        onnx_max_rel_err=args.onnx_max_rel_err, generate=args.generate,
                        on_check=show if ui.debug else None)
    if not ui.debug:
        for c in result.checks:
            show(c)
    for name, text in result.info():
        ui.out.print(f"[cyan]INFO[/]  {name:<20} ", end="", highlight=False)
        ui.out.print(text, markup=False, highlight=False)
    passed = sum(c.passed for c in result.checks)
    ok = result.passed
    ui.out.print(f"[{'green' if ok else 'red'}]{'check passed' if ok else 'check FAILED'}[/]: "
                 f"{passed}/{len(result.checks)} checks pass", highlight=False)
    if args.json:
        _write_json(args.json, {
            "status": "pass" if ok else "fail",
            "target": args.model,
            "checks": [c.__dict__ for c in result.checks],
            "site_paths": result.site_paths,
            "kernel_selfcheck": result.kernel_selfcheck,
            "report": report.to_dict(),
        }, ui)
    return EXIT_OK if ok else EXIT_FAILED


# -- entry point ------------------------------------------------------------------------------------------

def _quiet_libraries() -> None:
    """Library warnings (torch.export, the ONNX exporter) are noise on a CI log; --debug keeps them."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _load_program(path: Path):
    """torch.export.load, importing the modules of output types the program's pytree names (a
    Hugging Face ModelOutput registers itself when its module is imported)."""
    import importlib
    import logging
    import re

    import torch

    class Catch(logging.Handler):
        def __init__(self):
            super().__init__()
            self.text = []

        def emit(self, record):
            self.text.append(logging.Formatter().format(record))  # the message and its traceback

    tried: set[str] = set()
    while True:
        catch = Catch()
        logger = logging.getLogger("torch.export")
        level, propagate, handlers = logger.level, logger.propagate, logger.handlers[:]
        logger.handlers = [catch]  # the warning names the type; the user gets one line instead
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        try:
            return torch.export.load(path)
        except Exception as exc:
            found = re.search(r"Deserializing ([\w.]+) in pytree is not registered", " ".join(catch.text) + str(exc))
            module = found.group(1).rsplit(".", 1)[0] if found else None
            if module and module not in tried:
                tried.add(module)
                try:
                    importlib.import_module(module)
                    continue
                except ImportError:
                    raise BadInput(f"{path}: its outputs are {found.group(1)}, whose module {module} cannot be "
                                   "imported here (install the library that defines it)") from exc
            if found:
                raise BadInput(f"{path}: its outputs are {found.group(1)}, which is not registered as a pytree "
                               "type in this process") from exc
            raise BadInput(f"{path} is not a program saved with torch.export.save: {_first_line(exc)}") from exc
        finally:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def cmd_plot_weights(args, ui: UI) -> int:
    from ..analysis import plot_depth_weights, record_sites, schedules_from_layout

    path = Path(args.checkpoint)
    if not path.is_file():
        raise BadInput(f"CONVERTED_CHECKPOINT {path} does not exist (expected a .pt2 from torch.export.save)")
    with ui.step(f"loading {path}"):
        program = _load_program(path)
    example = program.example_inputs
    if example is None:
        raise BadInput(f"{path} holds no example inputs to run the program on; re-save it with torch 2.6 or later")
    ex_args, ex_kwargs = example
    schedules = None
    weights_file = path.with_suffix(".attnres.safetensors")
    if weights_file.is_file():
        from ..api import read_attnres_file

        _, layout = read_attnres_file(weights_file, tensors=False)
        if layout is not None:
            schedules = schedules_from_layout(layout)
    with ui.step("running the program and recording the depth weights"):
        try:
            records = record_sites(program.module(), ex_args, ex_kwargs, schedules=schedules)
        except ValueError as exc:
            raise BadInput(f"{path}: {exc}") from exc
    out = Path(args.output) if args.output else path.with_suffix(".weights.png")
    plot_depth_weights(records, out, title=f"{path.name}: mean depth-attention weights on its example inputs")
    if args.json:
        _write_json(args.json, {"checkpoint": str(path), "sites": [
            {"chain": r.chain, "site": r.name, "sublayer": r.sublayer, "sources": r.sources,
             "weights": r.weights, "input_rms": r.input_rms} for r in records]}, ui)
    ui.print(f"{len(records)} sites, {sum(len(r.weights) for r in records)} weights -> {out}")
    for r in records:
        top = max(range(len(r.weights)), key=r.weights.__getitem__)
        ui.print(f"  chain{r.chain}.{r.name:<7} most weight on {r.sources[top]} ({r.weights[top]:.2f}) of "
                 f"{len(r.weights)} sources")
    return EXIT_OK


def cmd_train(args, ui: UI) -> int:
    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "train_lm.py"
    if not script.is_file():
        raise BadInput(f"attnres train runs examples/train_lm.py from a source checkout; {script} is missing "
                       "(install the package from its repository with pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from examples.train_lm import main as train_main

    rest = [a for a in args.rest if a != "--"]
    # Run records go under the working directory (not into the package's checkout) unless --out says
    out = Path.cwd() / "attnres_runs"
    if rest and rest[0] == "retrofit":   # examples/retrofit.py: `attnres train retrofit study|recipe|arm|...`
        from examples.retrofit import RECIPE_ARMS, main as retrofit_main

        rest = rest[1:]
        sub = rest[0] if rest else None
        recipe = sub in ("recipe", "recipe-plot") or any(a in RECIPE_ARMS for a in rest)
        records = out / ("retrofit_recipe" if recipe else "retrofit")
        if sub is not None:
            rest += [] if "--out" in rest else ["--out", str(records)]
        if sub in ("plot", "recipe-plot"):
            rest += [] if "--figures" in rest else ["--figures", str(out / "figures")]
            if sub == "recipe-plot":
                rest += [] if "--first" in rest else ["--first", str(out / "retrofit")]
        elif sub is not None:
            rest += [] if "--states" in rest else ["--states", str(out / "retrofit" / "states")]
        try:
            return retrofit_main(rest)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if rest and rest[0] in ("run", "study") and "--out" not in rest:
        rest += ["--out", str(out)]
    elif rest and rest[0] == "timing" and "--out" not in rest:
        rest += ["--out", str(out / "step_time.json")]
    elif rest and rest[0] == "plot":
        rest += [] if "--runs" in rest else ["--runs", str(out)]
        rest += [] if "--figures" in rest else ["--figures", str(out / "figures")]
    try:
        return train_main(rest)
    except SystemExit as exc:   # argparse inside the script: --help or an argument error
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `attnres`: the usage, as a bad-arguments exit
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if argv[0] == "train":  # everything after `train` belongs to examples/train_lm.py, --help too
            args = argparse.Namespace(command="train", rest=argv[1:], func=cmd_train, debug=False)
        else:
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argument errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    debug = bool(getattr(args, "debug", False))
    if not debug:
        _quiet_libraries()
    ui = UI(debug)
    try:
        return args.func(args, ui)
    except KeyboardInterrupt:
        ui.err.print("attnres: interrupted", markup=False)
        return 130
    except Exception as exc:  # every failure is one line; --debug shows where it came from
        from ..errors import AttnResError
        from ..checks import VerificationError

        if isinstance(exc, VerificationError):
            code, kind = EXIT_FAILED, "failed"
        elif isinstance(exc, (BadInput, AttnResError)):
            code, kind = EXIT_BAD_INPUT, "error"
        elif isinstance(exc, Failed):
            code, kind = EXIT_FAILED, "failed"
        else:
            code, kind = EXIT_FAILED, f"failed: {type(exc).__name__}"
        if debug:
            import traceback

            traceback.print_exc()
        hint = "" if debug or code == EXIT_BAD_INPUT else " (run with --debug for the traceback)"
        sys.stderr.write(f"attnres {args.command}: {kind}: {_one_line(str(exc))}{hint}\n")
        return code


if __name__ == "__main__":
    sys.exit(main())
