"""Pipeline-parallel stages of a converted model, with cross-stage block caching.

Block AttnRes makes a pipeline stage need more than the hidden state: every sublayer reads the
completed block summaries of all earlier layers, so what crosses a stage boundary is the chain's
state, `blocks` (b_0 = the embedding, b_1, ...) and the running `partial` sum of the current
block. `pipeline_stages` cuts a converted model at layer boundaries into `AttnResStage` modules
for `torch.distributed.pipelining.PipelineStage`; each stage's forward takes the state tensors
as positional arguments and returns the next state (the last stage returns the head's output).
The hidden state itself never crosses: the receiving stage computes its first sublayer's input
from the state with that sublayer's own depth-attention site.

Cross-stage caching (paper, section on pipeline parallelism): with V virtual stages per rank
(interleaved schedules), a rank that ran stage s - P for a micro-batch still holds the blocks of
that micro-batch when stage s's turn comes, so the sender leaves them out:

    cache="none"      every boundary sends all blocks (and the partial sum)
    cache="received"  the paper's scheme: a rank keeps the blocks it received
    cache="held"      a rank also keeps the blocks it produced (fewer bytes again)

Cached blocks enter the later stage as detached leaves; their gradients are routed back into the
earlier stage's graph by an identity on its first output, so gradients equal the uncut model's
(the earlier stage's backward always runs after the later one's for the same micro-batch). Each
stage keeps a FIFO of the micro-batches in flight, which the schedules run in order per stage.

Shapes: a state tensor is the stream's shape ([B_micro, T, D] for a decoder). `bytes_sent`
counts what each stage's forward returned per micro-batch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import AttnResError
from ..runtime import site_output as _site_output
from ..runtime.state import Run

CACHE_POLICIES = ("none", "received", "held")


class PipelineSplitError(AttnResError, ValueError):
    """The stages asked for cannot be cut from this converted model."""


class _RouteCachedGrads(torch.autograd.Function):
    """Identity on `out`; in backward, also hands the gradients that cached copies of `originals`
    collected in later stages to the originals themselves."""

    @staticmethod
    def forward(ctx, out, leaves, *originals):
        ctx.leaves = leaves
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        leaf_grads = [leaf.grad for leaf in ctx.leaves]
        for leaf in ctx.leaves:
            leaf.grad = None
        return (grad, None, *leaf_grads)


class _RankCache:
    """Blocks a rank keeps per micro-batch between its virtual stages: FIFO per stage index."""

    def __init__(self):
        self.queues: dict[int, collections.deque] = collections.defaultdict(collections.deque)


class AttnResStage(nn.Module):
    """Layers `layers[start:stop]` of a converted model as one pipeline stage.

    forward(*inputs):
      first stage: the model's inputs, passed to `embed`; later stages: the state tensors the
      previous stage returned (the blocks it sends, then the partial sum if the boundary is
      inside a block).
    Returns the state tensors for the next stage, or `head(h_final)` for the last stage.
    """

    def __init__(self, converted: nn.Module, layers: Sequence[nn.Module], index: int, bounds: Sequence[int],
                 links: Sequence[tuple[int, int]], embed: nn.Module | None, head: nn.Module | None, chain: int,
                 cache: str, ranks: int, rank_cache: _RankCache, state_in: tuple[int, bool], skip_out: int):
        super().__init__()
        self.index, self.num_stages = index, len(bounds) - 1
        self.layers = nn.ModuleList(layers[bounds[index]:bounds[index + 1]])
        self.embed = embed if index == 0 else None
        self.head = head if index == self.num_stages - 1 else None
        self._runtime = converted.attnres.runtime
        self._chain = chain
        self.first_link, self.stop_link = links[index][0], links[index][1]
        # Only the sites whose outputs this stage uses: a parameter registered in two stages of
        # one rank would be scaled twice by the schedules (scale_grads). The site after the
        # stage's last sublayer is computed here too, but its output is recomputed (and used)
        # by the next stage.
        sites = self._runtime.chains[chain].sites
        plan = self._runtime.chains[chain].plan
        names = {j: plan.sites[j].name for j in range(self.first_link, self.stop_link) if sites[j] is not None}
        if index == self.num_stages - 1 and sites[-1] is not None:
            names[len(sites) - 1] = plan.sites[-1].name
        self.sites = nn.ModuleDict({names[j]: sites[j] for j in sorted(names)})
        self.cache, self.ranks = cache, ranks
        self._rank_cache = rank_cache
        self.state_layout_in = state_in       # (blocks, partial present) this stage receives in all
        self.skip_out = skip_out              # leading blocks it leaves out: the receiver holds them
        self.bytes_sent: list[int] = []       # per forward (micro-batch)
        self.blocks_sent: list[int] = []

    def forward(self, *inputs):
        rt = self._runtime
        chain = rt.chains[self._chain]
        # One call of the chain per stage forward, owned by this thread (runtime/state.py).
        call = rt.calls.push(self._chain, torch.is_grad_enabled())
        try:
            return self._run(chain, call, inputs)
        finally:
            rt.calls.pop(self._chain)

    def _run(self, chain, call, inputs):
        if self.index == 0:
            x = self.embed(*inputs)
        else:
            cached = self._take_cached()
            x = self._enter(chain, call, cached, list(inputs))
        for layer in self.layers:
            x = layer(x)
        if self.index == self.num_stages - 1:
            if call.current is not None:
                raise PipelineSplitError(f"stage {self.index}: the chain did not end in the last stage "
                                         f"(sublayer {call.current.next} was next)")
            return self.head(x)
        run = call.current
        if run is None or run.next != self.stop_link:
            raise PipelineSplitError(f"stage {self.index} should end before sublayer {self.stop_link} of chain "
                                     f"{self._chain}, but the chain is at "
                                     f"{'its end' if run is None else run.next}")
        call.current = None
        blocks, partial = list(run.blocks), run.partial
        return self._leave(blocks, partial)

    # -- entering: the state in, the first sublayer's input out ----------------------------
    def _enter(self, chain, call, cached: list[Tensor], received: list[Tensor]) -> Tensor:
        n_blocks, has_partial = self.state_layout_in
        new = n_blocks - len(cached)
        blocks = cached + received[:new]
        partial = received[new] if has_partial else None
        run = Run(chain, blocks[0], detached=False, call=call)
        run.blocks, run.partial, run.next = blocks, partial, self.first_link
        call.current = run
        sources = [*blocks] if partial is None else [*blocks, partial]
        return _site_output(chain.sites[self.first_link], sources, chain.plan.feature_axis)

    def _take_cached(self) -> list[Tensor]:
        if self.cache == "none" or self.index < self.ranks:
            return []
        return self._rank_cache.queues[self.index].popleft()

    # -- leaving: which state tensors go out, which stay ------------------------------------
    def _leave(self, blocks: list[Tensor], partial: Tensor | None):
        skip = self.skip_out
        out = blocks[skip:] + ([partial] if partial is not None else [])
        later = self.index + self.ranks      # the stage this rank runs next for the same micro-batch
        if self.cache != "none" and later < self.num_stages:
            held = blocks[: self.state_layout_in[0]] if self.cache == "received" else blocks
            leaves = [b.detach().requires_grad_(b.requires_grad) for b in held]
            self._rank_cache.queues[later].append(leaves)
            if any(b.requires_grad for b in held):
                out[0] = _RouteCachedGrads.apply(out[0], leaves, *held)
        self.bytes_sent.append(sum(t.numel() * t.element_size() for t in out))
        self.blocks_sent.append(len(blocks) - skip)
        return tuple(out)


def pipeline_stages(converted: nn.Module, layers: nn.ModuleList | Sequence[nn.Module], bounds: Sequence[int], *,
                    embed: nn.Module, head: nn.Module, ranks: int | None = None, cache: str = "held",
                    chain: int = 0, stages: Sequence[int] | None = None) -> list[AttnResStage]:
    """Cut `converted` into pipeline stages at layer boundaries.

    Args:
        converted: a model returned by `attnres_compile.convert()`.
        layers: its decoder layers in order (e.g. `converted.transformer.h`); every residual add
            of the chain must be inside one of them.
        bounds: layer indices where stages start, with the end: `[0, 2, 4]` is 2 stages of 2
            layers. Stage k runs layers[bounds[k]:bounds[k+1]]; block boundaries need not align.
        embed: module for the first stage, model inputs -> the stream's start (b_0).
        head: module for the last stage, the final site's output -> the model's output.
        ranks: pipeline ranks P (stage k runs on rank k % P); default: one stage per rank.
        cache: "held" (default), "received" (the paper's scheme) or "none"; see the module doc.
        chain: which converted chain the layers carry.
        stages: which stage indices to build (this rank's); default all.

    Returns:
        AttnResStage modules, in stage order, sharing `converted`'s modules and parameters.

    Raises:
        PipelineSplitError naming the stage, layer or residual add that prevents the cut.
    """
    if cache not in CACHE_POLICIES:
        raise PipelineSplitError(f"cache must be one of {CACHE_POLICIES}, got {cache!r}")
    runtime = getattr(getattr(converted, "attnres", None), "runtime", None)
    if runtime is None:
        raise PipelineSplitError(f"{type(converted).__name__} is not a model returned by attnres_compile.convert()")
    if not 0 <= chain < len(runtime.chains):
        raise PipelineSplitError(f"chain {chain} does not exist (the model has {len(runtime.chains)})")
    layers = list(layers)
    bounds = list(bounds)
    if len(bounds) < 3 or bounds[0] != 0 or bounds[-1] != len(layers) or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise PipelineSplitError(f"bounds must rise strictly from 0 to the {len(layers)} layers with at least 2 stages, "
                                 f"got {bounds}")
    ranks = ranks or len(bounds) - 1
    c = runtime.chains[chain]
    # which layer each of the chain's links (and their inner adds) sits in
    link_layer: list[int] = []
    for e in [e for e in runtime.entries if e.chain is c and e.inner == -1]:
        at = [i for i, layer in enumerate(layers) if _contains(layer, e.container)]
        if not at:
            raise PipelineSplitError(
                f"chain {chain}, sublayer {e.link} ({c.plan.links[e.link].sublayer}): its residual add at "
                f"{e.site.where()} is in {type(e.container).__name__}.forward, outside the layers given; a stage "
                "boundary there would cut a sublayer, so this model's stream cannot be split by layers")
        link_layer.append(at[0])
    for e in runtime.entries:
        if e.chain is c and e.inner >= 0 and not any(_contains(layer, e.container) for layer in layers):
            raise PipelineSplitError(f"chain {chain}, sublayer {e.link}: an inner add at {e.site.where()} is outside "
                                     "the layers given")
    if link_layer != sorted(link_layer):
        raise PipelineSplitError(f"chain {chain}: the layers given are not in the order the sublayers run")
    links = []
    for k in range(len(bounds) - 1):
        idx = [i for i, layer_i in enumerate(link_layer) if bounds[k] <= layer_i < bounds[k + 1]]
        if not idx:
            raise PipelineSplitError(f"stage {k} (layers {bounds[k]}..{bounds[k + 1] - 1}) holds no sublayer of "
                                     f"chain {chain}")
        links.append((idx[0], idx[-1] + 1))
    layout = _state_layouts(c.plan, links)
    rank_caches: dict[int, _RankCache] = {}
    built = []
    for k in (range(len(bounds) - 1) if stages is None else stages):
        built.append(AttnResStage(
            converted, layers, k, bounds, links, embed, head, chain, cache, ranks,
            rank_caches.setdefault(k % ranks, _RankCache()), state_in=layout[k - 1] if k > 0 else (0, False),
            skip_out=_skip(k, layout, ranks, cache) if k < len(bounds) - 2 else 0))
    return built


def _contains(root: nn.Module, m: nn.Module) -> bool:
    return any(sub is m for sub in root.modules())


def _state_layouts(plan, links) -> list[tuple[int, bool]]:
    """(completed blocks, partial present) after each stage but the last."""
    out = []
    for _, stop in links[:-1]:
        out.append((1 + stop // plan.block_size, stop % plan.block_size != 0))
    return out


def _skip(k: int, layout, ranks: int, cache: str) -> int:
    """Blocks stage k leaves out of what it sends: those the rank of stage k+1 holds already."""
    if cache == "none" or k + 1 - ranks < 0:
        return 0
    prev = k + 1 - ranks                               # the receiver's previous stage
    held_in = layout[prev - 1][0] if prev > 0 else 0    # blocks it received
    held_out = layout[prev][0]                         # blocks it had when it ended
    return held_in if cache == "received" else held_out


def run_locally(stages: Sequence[AttnResStage], *inputs, loss_fn: Callable | None = None, target=None,
                backward: bool = True):
    """Run `stages` in one process as a pipeline runs them: each boundary detached, backward
    stage by stage from the last, so a split can be checked against the uncut model before
    launching ranks. Returns the last stage's output, or the loss when `loss_fn` is given."""
    ins, outs = [inputs], []
    for k, st in enumerate(stages):
        o = st(*ins[-1])
        outs.append(o)
        if k < len(stages) - 1:
            ins.append(tuple(t.detach().requires_grad_(t.requires_grad) for t in o))
    result = outs[-1] if loss_fn is None else loss_fn(outs[-1], target)
    if backward and loss_fn is not None and result.requires_grad:
        result.backward()
        for k in range(len(stages) - 2, -1, -1):
            pairs = [(o, i.grad) for o, i in zip(outs[k], ins[k + 1]) if i.grad is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return result
