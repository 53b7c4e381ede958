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

import os
import sys

from .commands import cmd_check, cmd_convert, cmd_export, cmd_inspect, cmd_plot_weights
from .parser import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, BadInput, Failed, build_parser
from .ui import UI, one_line

__all__ = ["build_parser", "main"]

COMMANDS = {"inspect": cmd_inspect, "convert": cmd_convert, "export": cmd_export, "check": cmd_check,
            "plot-weights": cmd_plot_weights}


def _quiet_libraries() -> None:
    """Library warnings (torch.export, the ONNX exporter) are noise on a CI log; --debug keeps them."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `attnres`: the usage, as a bad-arguments exit
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    if argv[0] == "train":  # the studies are examples, not part of the package (docs/results.md)
        sys.stderr.write("attnres train: error: the training studies moved out of the package: run "
                         "`python -m examples.train_lm ...` or `python -m examples.retrofit ...` from a source "
                         "checkout (docs/results.md)\n")
        return EXIT_BAD_INPUT
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argument errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    debug = bool(getattr(args, "debug", False))
    if not debug:
        _quiet_libraries()
    ui = UI(debug)
    try:
        return COMMANDS[args.command](args, ui)
    except KeyboardInterrupt:
        ui.err.print("attnres: interrupted", markup=False)
        return 130
    except Exception as exc:  # every failure is one line; --debug shows where it came from
        from ..checks import VerificationError
        from ..errors import AttnResError

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
        sys.stderr.write(f"attnres {args.command}: {kind}: {one_line(str(exc))}{hint}\n")
        return code


if __name__ == "__main__":
    sys.exit(main())
