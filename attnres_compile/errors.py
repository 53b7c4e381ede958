"""Errors raised for bad input. Each names the argument, module or graph node at fault."""


class AttnResError(Exception):
    """Base class of every error attnres_compile raises on purpose."""


class CaptureError(AttnResError):
    """The model could not be traced with torch.export (non-strict)."""


class NoEligibleChainError(AttnResError):
    """The model has no residual stream that can be converted; the message says why."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ModeMismatchError(AttnResError):
    """The model's train and eval modes cannot share one conversion (e.g. they return different
    output structures); the message says what differs."""


class PlanMismatchError(AttnResError):
    """A call of a converted model does not run its residual streams the way the conversion plan
    says (another code path, order or model code); the message names the chain and sublayer."""


class StalePlanError(PlanMismatchError):
    """A saved plan names code that is no longer where it was (another version of the model's
    library moved or edited a planned line). Loading re-derives the plan instead (runtime/replay.py);
    raised only where that is not possible."""


class LayoutChangedError(PlanMismatchError):
    """A saved plan was re-derived from the model's current code, and the new plan has another
    layout (chains, sublayers, sites or parameters) than the saved weights: a real change of the
    model's structure. The message names the first difference."""


class PlanFormatError(AttnResError, ValueError):
    """A saved plan (or the AttnRes weights beside it) is not a valid plan of a format this
    package reads: a field of the wrong type or out of range, fields that disagree, a digest
    that does not match, code named outside the model's own classes, weights of another layout.
    The message names the field (`chains[0].sites[3].eps`); `field` holds it."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class ParallelPlanError(AttnResError, ValueError):
    """A tensor/sequence-parallel plan gives a depth-attention site sources it cannot read (e.g.
    a stream sharded on its feature dimension between sublayers); the message names the site,
    the source and its placement."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, shortened to `limit` characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
