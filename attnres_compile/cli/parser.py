"""The command line's arguments: one parser, its value types and exit codes.

The layout options (`--num-blocks`, `--block-size`, `--preserve`) are AttnResConfig's fields
(plan/config.py), whose help they show.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from ..plan.config import PRESERVE_MODES, AttnResConfig

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


def dim_bounds(args) -> dict[str, tuple[int | None, int | None]]:
    """The --dim / --max-batch / --max-seq bounds by dim name; any of them turns --dynamic on."""
    out = {name: (lo, hi) for name, lo, hi in getattr(args, "dim", []) or []}
    for name, flag in (("batch", "max_batch"), ("seq", "max_seq")):
        if getattr(args, flag, None) is not None:
            out[name] = (out.get(name, (None, None))[0], getattr(args, flag))
    if out:
        args.dynamic = True
    return out


def suggested_fix(exc: BaseException) -> str:
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


def _config_field(name: str) -> dict:
    """The metadata (help, flag, metavar) of one AttnResConfig field."""
    return next(f.metadata for f in dataclasses.fields(AttnResConfig) if f.name == name)


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
    for name in ("num_blocks", "block_size"):
        meta = _config_field(name)
        layout.add_argument(meta["cli"], type=_positive_int, metavar=meta["metavar"], help=meta["help"])
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
        p.add_argument("--preserve", choices=PRESERVE_MODES, default=default,
                       help=f"{_config_field('preserve')['help']}; default {default!r}")

    def dynamic_arg(p, what):
        p.add_argument("--dynamic", action="store_true",
                       help=f"{what} with a dynamic dim 0 of every tensor input (and dim 1 of 2-D "
                            "integer inputs, e.g. token ids) via torch.export.Dim")
        p.add_argument("--dim", action="append", type=_dim_bound, default=[], metavar="NAME=MIN:MAX",
                       help="bounds of a dynamic dim (names: batch, seq; e.g. seq=1:32); implies --dynamic")
        p.add_argument("--max-batch", type=_positive_int, metavar="N", help="shorthand for --dim batch=1:N")
        p.add_argument("--max-seq", type=_positive_int, metavar="N", help="shorthand for --dim seq=1:N")

    def export_args(p, what: str, max_err: float, err_help: str):
        p.add_argument("-o", "--output", required=True, metavar="FILE", help=f"where to write {what}")
        preserve_arg(p, "scale")
        dynamic_arg(p, "export")
        p.add_argument("--max-rel-err", type=_positive_float, default=max_err, metavar="X",
                       help=f"{err_help} (default {max_err:g})")

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

    p = sub.add_parser("convert", parents=[common],
                       help="convert and save the program (torch.export) and the AttnRes weights",
                       description="Convert, save the converted program with torch.export.save "
                                   "(eval mode) and the new AttnRes parameters alone as safetensors "
                                   "next to it (FILE with suffix .attnres.safetensors); then load the "
                                   "program back and check it reproduces the converted module.")
    export_args(p, "the program (.pt2)", 1e-5, "largest relative error of the reloaded program")

    p = sub.add_parser("export", parents=[common],
                       help="convert and export to ONNX, then compare onnxruntime with PyTorch",
                       description="Convert, export to ONNX (one attnres::DepthAttention node per "
                                   "site), run onnxruntime on the example inputs and compare with "
                                   "PyTorch. Exits 1 when the relative error exceeds --max-rel-err.")
    export_args(p, "the .onnx file", 1e-4, "largest accepted relative error, onnxruntime vs PyTorch")
    p.add_argument("--inline", action="store_true",
                   help="expand each DepthAttention node into standard ONNX ops (no functions)")
    p.add_argument("--fused", action="store_true",
                   help="also check onnxruntime with the fused DepthAttention kernel registered "
                        "(attnres_compile.onnx.ort_session; CPU, float32)")
    p.add_argument("--with-cache", action="store_true",
                   help="export a decoder with past for generation (inputs past_key_values.*, outputs "
                        "present.*) plus genai_config.json beside it, and check that onnxruntime "
                        "generates the tokens PyTorch generates")
    p.add_argument("--new-tokens", type=_positive_int, default=8, metavar="N",
                   help="with --with-cache: how many tokens the generation check makes (default 8)")

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

    return parser
