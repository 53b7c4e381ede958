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


def layer_structure(layer_paths: list[str]) -> tuple[int, int] | None:
    """(layers, sublayers per layer) of a chain whose sublayers come k to a layer, else None.

    `layer_paths[l]` is the path of the module that runs link l's residual add. A layer is the
    shallowest indexed container on that path (`model.layers.3`, `encoder.block.0` for T5's
    `encoder.block.0.layer.1`): the links group into runs of one such module each, k links long.
    """
    def indexed_prefixes(path: str) -> list[str]:
        parts = path.split(".") if path else []
        return [".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit()]

    prefixes = [indexed_prefixes(p) for p in layer_paths]
    if not prefixes or any(not p for p in prefixes):
        return None
    for depth in range(min(len(p) for p in prefixes)):
        keys = [p[depth] for p in prefixes]
        runs: list[tuple[str, int]] = []
        for k in keys:
            if runs and runs[-1][0] == k:
                runs[-1] = (k, runs[-1][1] + 1)
            else:
                runs.append((k, 1))
        sizes = {n for _, n in runs}
        if len(sizes) == 1 and len({k for k, _ in runs}) == len(runs):
            return len(runs), sizes.pop()
    return None


def resolve_block_size(num_sublayers: int, num_blocks: int | None, block_size: int | None,
                       layers: tuple[int, int] | None = None) -> int:
    """S from the user's choice (SPEC section 2).

    An explicit `block_size` is taken as given. `num_blocks=N` (default 8) counts layers: with
    sublayers k to a layer (`layers` = (number of layers, k)), S = k * ceil(layers / N), so every
    block boundary falls on a layer's first sublayer; without a layer structure, S = ceil(L / N).
    """
    if block_size is not None:
        return block_size
    n = 8 if num_blocks is None else num_blocks
    if layers is not None:
        count, per_layer = layers
        return per_layer * max(1, math.ceil(count / n))
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
