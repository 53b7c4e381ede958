"""The Block AttnRes schedule (SPEC section 2): which sources each site of a chain attends over.

Sources are named: "b0" is the chain's start (the embedding), "b<n>" the n-th completed block,
"partial" the running sum of the current block. A plan stores each site's schedule, and a
saved plan's schedules must equal `block_schedule` of its chain (plan/format.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from .limits import MAX_SUBLAYERS

SourceName = Annotated[str, Field(pattern=r"^(b[0-9]{1,5}|partial)$",
                                  description='"b0" the stream\'s start, "b<n>" the n-th completed block, '
                                              '"partial" the running sum of the current block')]


@dataclass(frozen=True)
class SiteSchedule:
    """Where a site sits in the block schedule and what it attends over."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    sublayer: Annotated[int | None, Field(ge=0, lt=MAX_SUBLAYERS, description=(
        "0-based index of the sublayer the site feeds; null for the chain's final site"))]
    block: Annotated[int, Field(ge=0, le=MAX_SUBLAYERS, description=(
        "the block the sublayer's output joins (1-based; b0 is the stream's start)"))]
    sources: Annotated[tuple[SourceName, ...], Field(min_length=1, max_length=MAX_SUBLAYERS + 1, description=(
        "what the site attends over, in order"))]

    @property
    def num_sources(self) -> int:
        return len(self.sources)


def block_schedule(num_sublayers: int, block_size: int) -> list[SiteSchedule]:
    """Sites 0..L-1 then the final site, each with the sources the SPEC schedule gives it."""
    if num_sublayers < 1 or block_size < 1:
        raise ValueError(f"need num_sublayers >= 1 and block_size >= 1, got {num_sublayers}, {block_size}")
    sites = []
    blocks = ["b0"]      # b0 is pushed at l = 0 (the l % S == 0 boundary)
    partial = False      # whether the current block has a running sum yet
    for l in range(num_sublayers):
        if l % block_size == 0 and l > 0:
            blocks.append(f"b{len(blocks)}")
            partial = False
        sources = tuple(blocks) + (("partial",) if partial else ())
        sites.append(SiteSchedule(l, len(blocks), sources))
        partial = True
    blocks.append(f"b{len(blocks)}")
    sites.append(SiteSchedule(None, len(blocks) - 1, tuple(blocks)))
    return sites
