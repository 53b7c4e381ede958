"""Depth attention over `DTensor` sources: the sites of a tensor- or sequence-parallel stream.

Depth attention is per token, so a site computes on each rank's own tokens: whatever the
stream's placement on a mesh dimension, `Replicate` (a tensor-parallel region: every rank holds
every token and computes the same site) or `Shard(d)` on a token dimension (sequence or data
parallel: each rank computes the sites of its slice), the site needs no collective in forward.
What does need one is the gradient of the site's replicated parameters (the pseudo-query and the
key-norm gain): on a mesh dimension where the tokens are sharded each rank's gradient is the
partial sum over its tokens, so it is all-reduced there (one all-reduce of the `2 x D` values per
site and step, query and gain concatenated). On a `Replicate` dimension every rank computed the
same gradient, and nothing moves.

Refused, with `ParallelPlanError` naming the site and source: a source sharded on the feature
dimension (a site needs whole tokens: the parallel plan should leave the stream `Replicate` or
`Shard` it on the sequence between sublayers), sources on different meshes, a plain tensor among
DTensor sources, a query or gain that is a DTensor with a non-`Replicate` placement. A `Partial`
source (a row-parallel output not reduced yet) is reduced to `Replicate` first, and sources whose
placements differ are redistributed to the newest source's placement, both through DTensor's own
differentiable `redistribute`; the unconverted model's next nonlinear op would pay the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ParallelPlanError


def dtensor_type():
    """The DTensor class, or None where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def sharded_depth_attention(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
                            scale: float, *, describe: Callable[[int | None], str]) -> Tensor:
    """The site over DTensor `sources` (each `[..., D]`, features last, same global shape).

    query, norm_weight: `[D]`, plain tensors or all-`Replicate` DTensors. Returns a DTensor with
    the (aligned) sources' placements. `describe(k)` names source k, `describe(None)` the site,
    for errors. Differentiable in every argument; the parameters' gradients are reduced over
    the mesh dimensions on which the sources are sharded."""
    from torch.distributed.tensor import DTensor, Replicate

    sources = _aligned(list(sources), describe)
    mesh, placements = sources[0].device_mesh, sources[0].placements
    for name, p in (("query", query), ("norm_weight", norm_weight)):
        if isinstance(p, DTensor) and not all(isinstance(q, Replicate) for q in p.placements):
            raise ParallelPlanError(
                f"{describe(None)}: its {name} is a DTensor with placements {tuple(p.placements)}; a site's "
                "parameters must be whole on every rank (Replicate, or plain tensors as the conversion made them)")
    reduce_over = tuple(i for i, p in enumerate(placements) if p.is_shard())
    return _ShardedSite.apply(mesh, placements, reduce_over, float(eps), float(scale), query, norm_weight,
                              *sources)


def check_branch_placement(branch: Tensor, feature_axis: int, where: Callable[[], str]) -> None:
    """A sublayer's output (a DTensor) must not be sharded on the stream's features: the next
    site reads whole tokens, and DTensor would silently re-shard it (an all-to-all per add)."""
    feature = feature_axis % branch.ndim
    if _shards_dim(branch, feature):
        raise ParallelPlanError(
            f"the output of {where()} is a DTensor with placements {tuple(branch.placements)}, which shards "
            f"the residual stream's feature dimension (dim {feature}) between sublayers; depth-attention sites "
            "need whole tokens: shard the stream on the sequence or batch instead (e.g. "
            "RowwiseParallel(output_layouts=Shard(1)) on the sublayer's output projection), or keep it Replicate")


def _shards_dim(t: Tensor, dim: int) -> bool:
    """Whether the DTensor `t` is sharded on its (non-negative) dimension `dim` on any mesh dim."""
    return any(p.is_shard() and p.dim % t.ndim == dim for p in t.placements)


def _aligned(sources: list[Tensor], describe: Callable[[int | None], str]) -> list[Tensor]:
    """Sources on one mesh with one placement, none `Partial` and none sharding the features."""
    from torch.distributed.tensor import DTensor, Replicate

    last = len(sources) - 1
    for k, s in enumerate(sources):
        if not isinstance(s, DTensor):
            raise ParallelPlanError(
                f"{describe(None)}: {describe(k)} is a plain {type(s).__name__} of shape {list(s.shape)} while "
                f"{describe(last)} is a DTensor with placements {tuple(sources[last].placements)}; every source of "
                "a site must be a DTensor on the same mesh (parallelize the module that makes the stream start, "
                "e.g. the embedding, with output_layouts and use_local_output=False)")
        feature = s.ndim - 1
        if _shards_dim(s, feature):
            raise ParallelPlanError(
                f"{describe(None)}: {describe(k)} is a DTensor with placements {tuple(s.placements)}, which "
                f"shards the stream's feature dimension (dim {feature}); a depth-attention site needs whole "
                "tokens, so the stream between sublayers must be Replicate or Shard on the sequence or batch "
                "(e.g. RowwiseParallel(output_layouts=Shard(1)) on the sublayer's output projection, not "
                "ColwiseParallel)")
    mesh = sources[last].device_mesh
    for k, s in enumerate(sources):
        if s.device_mesh != mesh:
            raise ParallelPlanError(f"{describe(None)}: {describe(k)} lives on mesh {s.device_mesh}, "
                                    f"{describe(last)} on {mesh}; a site's sources must share one mesh")
    target = tuple(Replicate() if p.is_partial() else p for p in sources[last].placements)
    return [s if tuple(s.placements) == target else s.redistribute(mesh, target) for s in sources]


class _ShardedSite(torch.autograd.Function):
    """The site on each rank's local tokens; backward reduces the parameters' gradients."""

    @staticmethod
    def forward(ctx, mesh, placements, reduce_over, eps, scale, query, norm_weight, *sources):
        from torch.distributed.tensor import DTensor

        from .depth_attention import depth_attention_call

        local = [_local(s) for s in sources]
        q, g = _local(query), _local(norm_weight)
        out = depth_attention_call(local, q, g, eps, scale)
        ctx.save_for_backward(q, g, *local)
        ctx.mesh, ctx.placements, ctx.reduce_over, ctx.eps, ctx.scale = mesh, placements, reduce_over, eps, scale
        ctx.param_specs = [(p.device_mesh, p.placements) if isinstance(p, DTensor) else None
                           for p in (query, norm_weight)]
        ctx.shape, ctx.stride = sources[0].shape, sources[0].stride()
        return DTensor.from_local(out, mesh, placements, run_check=False, shape=ctx.shape, stride=ctx.stride)

    @staticmethod
    def backward(ctx, grad_out):
        from torch.distributed.tensor import DTensor

        q, g, *local = ctx.saved_tensors
        if isinstance(grad_out, DTensor):
            if tuple(grad_out.placements) != tuple(ctx.placements):
                grad_out = grad_out.redistribute(ctx.mesh, ctx.placements)
            grad_out = grad_out.to_local()
        grad_out = _local(grad_out).contiguous()
        grad_sources, grad_q, grad_g = torch.ops.attnres.depth_attention_backward.default(
            grad_out, local, q, g, ctx.eps, ctx.scale)
        if ctx.reduce_over and (ctx.needs_input_grad[5] or ctx.needs_input_grad[6]):
            import torch.distributed._functional_collectives as funcol

            both = torch.cat([grad_q, grad_g])      # one collective per site for both parameters
            for dim in ctx.reduce_over:
                both = funcol.all_reduce(both, "sum", (ctx.mesh, dim))
            grad_q, grad_g = _local(both).split(grad_q.shape[0])
        grads = []
        for grad, spec in zip((grad_q, grad_g), ctx.param_specs):
            grads.append(grad if spec is None else DTensor.from_local(grad, spec[0], spec[1], run_check=False))
        dsources = [DTensor.from_local(gs, ctx.mesh, ctx.placements, run_check=False, shape=ctx.shape,
                                       stride=ctx.stride) for gs in grad_sources]
        return (None, None, None, None, None, *grads, *dsources)


def _local(t: Tensor) -> Tensor:
    """The rank's own plain tensor of `t` (a DTensor's local shard; a waited collective's result)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    if isinstance(t, AsyncCollectiveTensor):
        t = t.wait()
    return t
