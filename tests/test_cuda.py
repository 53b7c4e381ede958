"""CUDA checks: the generated Triton kernels compiled for a real GPU, and a converted Hugging Face
LLaMA trained and served on it, against float64 references.

Marked ``cuda``: the default run deselects them (this machine has no GPU; the kernels' logic is
tested in the Triton interpreter by tests/test_triton_kernels.py). ``benchmarks/gpu_check.sh``
runs them with ``pytest -m cuda`` whenever a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch

import attnres_compile as ac
from attnres_compile.ops import depth_attention, depth_attention_reference, two_phase_block, two_phase_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(t, d, m, dtype, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    src = [torch.randn(t, d, generator=gen).to("cuda", dtype) for _ in range(m)]
    q = (0.5 * torch.randn(2 * d, generator=gen)).to("cuda", dtype)
    g = (1.0 + 0.1 * torch.randn(2 * d, generator=gen)).to("cuda", dtype)
    q, g = (q[::2], g[::2]) if layout == "strided" else (q[:d].contiguous(), g[:d].contiguous())
    grad = torch.randn(t, d, generator=gen).to("cuda", dtype)
    return src, q, g, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t,d,m,layout", [(300, 2048, 9, "contiguous"), (64, 7168, 33, "contiguous"),
                                          (129, 4096, 17, "strided"), (5, 48, 1, "contiguous")], ids=str)
def test_kernels_forward_backward_vs_float64(t, d, m, layout, dtype):
    src, q, g, grad = inputs(t, d, m, dtype, seed=t + d + m, layout=layout)
    leaves = [s.detach().requires_grad_() for s in src]
    ql, gl = q.detach().requires_grad_(), g.detach().requires_grad_()
    out = depth_attention(leaves, ql, gl, eps=1e-6, scale=float(m))
    out.backward(grad)
    s64 = [s.detach().double().requires_grad_() for s in src]
    q64, g64 = q.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    ref = depth_attention_reference(s64, q64, g64, eps=1e-6, scale=float(m))
    ref.backward(grad.double())
    assert out.dtype == dtype and out.is_cuda
    assert rel(out, ref) < TOL[dtype]
    for a, b in zip(leaves, s64):
        assert rel(a.grad, b.grad) < TOL[dtype]
    if m > 1:
        assert rel(ql.grad, q64.grad) < TOL[dtype] and rel(gl.grad, g64.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_phase_kernels_vs_float64(dtype):
    gen = torch.Generator().manual_seed(3)
    n, s, t, d = 4, 8, 257, 2048
    blocks = [torch.randn(t, d, generator=gen).to("cuda", dtype) for _ in range(n)]
    queries = (0.3 * torch.randn(s, d, generator=gen)).to("cuda", dtype)
    gains = (1 + 0.1 * torch.randn(s, d, generator=gen)).to("cuda", dtype)
    partials = [None] + [torch.randn(t, d, generator=gen).to("cuda", dtype) for _ in range(s - 1)]
    hs = two_phase_block(blocks, queries, gains, partials, eps=1e-6, scale=2.0)
    refs = two_phase_reference([b.double() for b in blocks], queries.double(), gains.double(),
                               [p.double() if p is not None else None for p in partials], eps=1e-6, scale=2.0)
    for h, r in zip(hs, refs):
        assert rel(h, r) < TOL[dtype]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, rms_norm_eps=1e-6))


def test_converted_llama_exact_at_step_0_and_compiled_training_on_cuda():
    model = _llama().cuda()
    ids = torch.randint(0, 128, (2, 33), device="cuda")
    conv = ac.convert(model, (ids,), kwargs={"use_cache": False}, preserve="exact")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        got = conv(ids, use_cache=False).logits
    assert rel(got, ref) < 1e-5                           # exact retrofit: step 0 is the model
    with torch.no_grad():
        for p in conv.attnres.parameters():               # move off the exact point
            p.add_(0.05 * torch.randn_like(p))
    eager_loss = conv(ids, labels=ids, use_cache=False).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in conv.named_parameters() if p.grad is not None}
    conv.zero_grad(set_to_none=True)
    compiled = torch.compile(conv, backend="attnres")
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert abs(loss.item() - eager_loss.item()) < 1e-4 * abs(eager_loss.item())
    for n, p in conv.named_parameters():
        if n in eager_grads:
            assert rel(p.grad, eager_grads[n]) < 1e-3, n


def test_two_phase_inference_under_compile_on_cuda():
    model = _llama().cuda().eval()
    ids = torch.randint(0, 128, (2, 17), device="cuda")
    conv = ac.convert(model, (ids,), kwargs={"use_cache": False})
    with torch.no_grad():
        for p in conv.attnres.parameters():
            p.add_(0.05 * torch.randn_like(p))
        eager = conv(ids, use_cache=False).logits
        served = torch.compile(conv, backend="attnres")(ids, use_cache=False).logits   # two-phase on CUDA
    assert rel(served, eager) < 1e-4


def test_bf16_autocast_training_step_on_cuda():
    model = _llama().cuda()
    ids = torch.randint(0, 128, (2, 33), device="cuda")
    conv = ac.convert(model, (ids,), kwargs={"use_cache": False})
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = conv(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
