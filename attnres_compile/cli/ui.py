"""Output of the command line: results on stdout, progress and errors on stderr, JSON files."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

from ..errors import first_line as _errors_first_line

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


def one_line(text: str) -> str:
    """A multi-line message as one line: sentences joined by a space, other lines by '; '."""
    out = ""
    for ln in (ln.strip() for ln in str(text).strip().splitlines()):
        if not ln:
            continue
        out = ln if not out else out + (" " if out.endswith((".", ":", ";")) else "; ") + ln
    return out


def first_line(exc: BaseException, limit: int = 300) -> str:
    return _errors_first_line(exc, limit)


def write_json(path: str, data: dict, ui: UI) -> None:
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


def summary(report) -> str:
    chains = len(report.chains)
    return (f"{report.model}: {chains} chain{'s' if chains != 1 else ''}, {report.num_sites} sites, "
            f"{len(report.parameters)} new parameters, preserve={report.preserve!r}")
