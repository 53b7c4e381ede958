"""Command-line entry point `attnres` (placeholder: the real commands are planned)."""

from __future__ import annotations

import sys

USAGE = """\
usage: attnres <command> MODULE:ATTR [options]

commands (planned, not implemented yet):
  inspect   list residual streams and the adds left alone
  convert   convert to Block AttnRes and save
  check     compare the converted model against the original
  export    export the converted model to ONNX

Until then, use the Python API: attnres_compile.convert(model, example_inputs, num_blocks=...)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
