"""AttnResConfig: every option of a conversion, declared once and validated once.

`convert(model, x, num_blocks=4)` builds one (so do the `attnres` compile backend from its
`options`, the command line from its flags, and a re-derivation from a saved plan), and the
plan stores what a re-derivation needs of it (`ConversionPlan.options`). One frozen object,
as torchao's `quantize_(model, config)` takes one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from .limits import MAX_EPS, MAX_SUBLAYERS, MIN_EPS

PRESERVE_MODES = ("scale", "exact")


@dataclass(frozen=True)
class AttnResConfig:
    """The options of a conversion (each field's `metadata["help"]` is its documentation, which
    the command line shows too)."""

    num_blocks: int | None = field(default=None, metadata={
        "help": "blocks per residual stream, counted in layers (default 8): S = k * ceil(layers / N) for "
                "k sublayers per layer, else ceil(sublayers / N)", "cli": "--num-blocks", "metavar": "N"})
    block_size: int | None = field(default=None, metadata={
        "help": "sublayers per block, as given (1 = Full AttnRes)", "cli": "--block-size", "metavar": "S"})
    preserve: str = field(default="scale", metadata={
        "help": "'scale' (the paper) or 'exact' (the original's outputs at step 0, up to float32 summation "
                "order; also converts non-PreNorm chains)", "cli": "--preserve"})
    eps: float | None = field(default=None, metadata={
        "help": "RMS eps of every site (default: the eps of the norm each site feeds, else 1e-6)"})
    dynamic: bool = field(default=True, metadata={
        "help": "capture every input dimension as Dim.AUTO (False: the example's shapes); the converted model "
                "runs on any shape either way"})
    filter_fn: Callable | None = field(default=None, compare=False, metadata={
        "help": "filter_fn(ChainInfo) -> bool chooses which chains to convert (not saved: a plan holds no code)"})
    # -- the `attnres` torch.compile backend (compile/backend.py)
    two_phase: bool = field(default=False, metadata={
        "help": "compiled no-grad sites by the two-phase schedule on CPU too (always on CUDA)"})
    decompose: bool = field(default=True, metadata={
        "help": "compiled CPU sites as plain arithmetic that Inductor generates and fuses"})
    fuse: bool = field(default=True, metadata={
        "help": "compiled CUDA sites fused with the partial-sum add before them or the norm after them"})

    #: The fields a plan saves (ConversionPlan.options; `preserve` is a field of the plan itself).
    SAVED = ("num_blocks", "block_size", "eps", "dynamic")

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            if value > MAX_SUBLAYERS:  # the saved plan's range (plan/limits.py)
                raise ValueError(f"{name} must be <= {MAX_SUBLAYERS} (the most a saved plan holds), got {value}")
        if self.num_blocks is not None and self.block_size is not None:
            raise ValueError(f"set either num_blocks or block_size, not both (got num_blocks={self.num_blocks}, "
                             f"block_size={self.block_size})")
        if self.preserve not in PRESERVE_MODES:
            raise ValueError(f"preserve must be one of {PRESERVE_MODES}, got {self.preserve!r}")
        eps = self.eps
        if eps is not None:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
                raise ValueError(f"eps must be a positive float or None, got {eps!r}")
            if not MIN_EPS <= eps <= MAX_EPS:  # the saved plan's range (plan/limits.py)
                raise ValueError(f"eps must be in [{MIN_EPS:g}, {MAX_EPS:g}] (the range a saved plan holds), "
                                 f"got {eps!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable (chain -> bool), got {type(self.filter_fn).__name__}")
        for name in ("dynamic", "two_phase", "decompose", "fuse"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: dict, *, what: str = "options", **defaults) -> AttnResConfig:
        """A config from a dict of options (the compile backend's `options`), `defaults` first;
        an unknown key is a TypeError naming it and the known ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown {what} {unknown}; known: {sorted(cls.names())}")
        return cls(**{**defaults, **options})

    def saved(self) -> dict:
        """What a plan stores for a re-derivation (ConversionPlan.options)."""
        return {name: getattr(self, name) for name in self.SAVED}

    @classmethod
    def of_plan(cls, options: dict, preserve: str) -> AttnResConfig:
        """The config a saved plan was made with (its `options` and `preserve`)."""
        return cls(preserve=preserve, **{k: v for k, v in options.items() if k in cls.SAVED})

    def replace(self, **changes) -> AttnResConfig:
        return dataclasses.replace(self, **changes)
