"""The fused ops (site + norm, partial-sum add + site) and the graph pass that emits them:
float64 parity forward and backward on the plain path and on the Triton kernels (interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch

import attnres_compile as ac
from attnres_compile.ops import depth_attention_norm, depth_attention_partial, depth_attention_reference
from attnres_compile.ops.kernels import dispatch as _dispatch
from attnres_compile.compile.passes.fuse_epilogues import fuse_epilogues

from .models import TinyPreNormLM

needs_triton = pytest.mark.skipif(not _dispatch.triton_importable(), reason="triton is part of the test extra")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _paths():
    yield "plain"
    if _dispatch.triton_importable():
        yield "triton"


def _on(path):
    import contextlib
    return _dispatch.triton_on_cpu() if path == "triton" else contextlib.nullcontext()


@pytest.mark.parametrize("path", list(_paths()))
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("m,d", [(1, 8), (3, 40), (9, 33)], ids=str)
def test_site_norm_op_matches_float64(m, d, kind, path):
    gen = torch.Generator().manual_seed(m * d)
    src = [torch.randn(2, 5, d, generator=gen) for _ in range(m)]
    q, g = 0.5 * torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen)
    w, b = 1 + 0.2 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen)
    dy = torch.randn(2, 5, d, generator=gen)
    bias = b if kind == "layernorm" else None
    leaves = _leaves([*src, q, g, w] + ([b] if bias is not None else []))
    with _on(path):
        y = depth_attention_norm(leaves[:m], leaves[m], leaves[m + 1], eps=1e-6, scale=float(m), weight=leaves[m + 2],
                                 bias=leaves[m + 3] if bias is not None else None, norm_eps=1e-5, kind=kind)
        y.backward(dy)
    l64 = _leaves([t.double() for t in [*src, q, g, w] + ([b] if bias is not None else [])])
    h = depth_attention_reference(l64[:m], l64[m], l64[m + 1], eps=1e-6, scale=float(m))
    if kind == "rmsnorm":
        y64 = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5) * l64[m + 2]
    else:
        y64 = torch.nn.functional.layer_norm(h, (d,), l64[m + 2], l64[m + 3], 1e-5)
    y64.backward(dy.double())
    assert rel(y, y64) < 1e-5
    for i, (a, r) in enumerate(zip(leaves, l64)):
        if m == 1 and i in (m, m + 1):         # one source: query and gain have zero gradient
            assert a.grad.abs().max() < 1e-6
            continue
        assert rel(a.grad, r.grad) < 1e-4, i


@pytest.mark.parametrize("path", list(_paths()))
@pytest.mark.parametrize("n,d", [(1, 8), (4, 40)], ids=str)
def test_partial_op_matches_float64(n, d, path):
    gen = torch.Generator().manual_seed(n + d)
    blocks = [torch.randn(3, d, generator=gen) for _ in range(n)]
    prev, add = torch.randn(3, d, generator=gen), torch.randn(3, d, generator=gen)
    q, g = 0.5 * torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen)
    dh, dnew = torch.randn(3, d, generator=gen), torch.randn(3, d, generator=gen)
    leaves = _leaves([*blocks, prev, add, q, g])
    with _on(path):
        h, new = depth_attention_partial(leaves[:n], leaves[n], leaves[n + 1], leaves[n + 2], leaves[n + 3],
                                         eps=1e-6, scale=2.0)
        torch.autograd.backward([h, new], [dh, dnew])
    l64 = _leaves([t.double() for t in [*blocks, prev, add, q, g]])
    p64 = l64[n] + l64[n + 1]
    h64 = depth_attention_reference([*l64[:n], p64], l64[n + 2], l64[n + 3], eps=1e-6, scale=2.0)
    torch.autograd.backward([h64, p64], [dh.double(), dnew.double()])
    assert rel(h, h64) < 1e-5 and rel(new, p64) < 1e-6
    for i, (a, r) in enumerate(zip(leaves, l64)):
        assert rel(a.grad, r.grad) < 1e-4, i


@pytest.mark.parametrize("path", list(_paths()))
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_pass_fuses_a_converted_model_and_keeps_its_results(norm, path):
    """A Dynamo graph of a converted model: the pass fuses every site (the partial-sum add into
    the site inside a block, the norm into the site at block boundaries) and the fused graph gives
    the unfused model's output and gradients."""
    torch.manual_seed(5)
    model = TinyPreNormLM(d=24, layers=4, norm=norm)
    ids = torch.randint(0, 37, (2, 7))
    conv = ac.convert(model, (ids,), num_blocks=2)
    with torch.no_grad():
        for p in conv.attnres.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(conv)
    counts = []

    def backend(gm, example_inputs):
        counts.append(fuse_epilogues(gm))
        return gm

    def run(module):
        module.zero_grad(set_to_none=True)
        out = module(ids)
        out.square().mean().backward()
        return out.detach(), {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}

    torch._dynamo.reset()
    with _on(path):
        out, grads = run(torch.compile(conv, backend=backend, fullgraph=True))
    out_ref, grads_ref = run(ref)
    assert counts and counts[0]["partial"] > 0 and counts[0]["norm"] > 0, counts
    assert rel(out, out_ref) < 1e-5
    for n, gr in grads_ref.items():
        assert rel(grads[n], gr) < 1e-4, n
