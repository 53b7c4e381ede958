"""Choosing the block size of a chain (SPEC section 2): its layer structure and the user's option.

The schedule a block size gives (SiteSchedule, block_schedule) lives with the plan
(plan/schedule.py) and is re-exported here.
"""

from __future__ import annotations

import math

from ..plan.schedule import SiteSchedule, block_schedule  # noqa: F401 (the schedule lives with the plan)


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
