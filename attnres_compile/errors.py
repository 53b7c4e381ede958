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
