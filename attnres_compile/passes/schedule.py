"""The Block AttnRes schedule (SPEC section 2), independent of any graph.

Sources are named: "b0" is the chain's start (the embedding), "b<n>" the n-th completed block,
"partial" the running sum of the current block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SiteSchedule:
    sublayer: int | None      # 0-based sublayer index; None for the chain's final site
    block: int                # block the sublayer's output joins (1-based; b0 is the start)
    sources: tuple[str, ...]  # what the site attends over, in order

    @property
    def num_sources(self) -> int:
        return len(self.sources)


def resolve_block_size(num_sublayers: int, num_blocks: int | None, block_size: int | None) -> int:
    """S from the user's choice: explicit block_size, or ceil(L / num_blocks) (default 8 blocks)."""
    if block_size is not None:
        return block_size
    n = 8 if num_blocks is None else num_blocks
    return max(1, math.ceil(num_sublayers / n))


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
