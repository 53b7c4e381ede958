"""Generated Triton kernels and the compiled CPU fast path (SPEC.md sections 2, 4, 7).

Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set here
before triton is used). Covered:

* the code generator: source specialised per (M, D, dtype, tile), one pointer per source,
  cached on disk and memoised; the package imports and works without triton;
* forward / backward (both variants) vs the float64 reference on small odd shapes, float32 /
  bfloat16 / float16, expanded ``grad_out``, a peaked softmax;
* byte counting in the interpreter: each kernel moves exactly the SPEC section 4 floor plus
  what docs/kernels.md accounts for (per-token scalars, per-program parameter reads, the
  ``[P, D]`` partial sums of the deterministic reduction);
* op registration: ``torch.library.triton_op`` ops whose Triton path runs end to end (with
  autograd) under ``triton_on_cpu()``; CPU tensors stay one opaque node;
* the compiled C CPU path vs the reference, thread-count independence, fallback.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import textwrap

import pytest
import torch

from attnres_compile.ops.kernels import cpu as cpu_kernels
from attnres_compile.ops.kernels.triton_codegen import (
    KernelSpec,
    generate_source,
    next_power_of_2,
    resident_fits,
)
from attnres_compile.ops import depth_attention, depth_attention_reference
from attnres_compile.ops.kernels import dispatch as _dispatch
from attnres_compile.ops.depth_attention import plain_cpu_path

from attnres_compile.ops.kernels import triton_launch as tk  # imports triton lazily
from attnres_compile.ops.kernels.triton_interpret import count_bytes, round_bf16_to_nearest

# Triton tests run the kernels in the interpreter; the CPU-path and generator tests do not need it.
needs_triton = pytest.mark.skipif(
    not (_dispatch.triton_importable() and tk.interpreter_enabled()),
    reason="needs triton and TRITON_INTERPRET=1 (no GPU here)",
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(autouse=True)
def _gpu_like_bf16_rounding():
    """The interpreter truncates float32 -> bfloat16; the GPU rounds to nearest even."""
    if not _dispatch.triton_importable():
        yield
        return
    with round_bf16_to_nearest():
        yield


def assert_close(out, ref, tol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    ref = ref.double()
    err = (out.double() - ref).norm().item()
    norm = ref.norm().item()
    assert norm > 0, f"{what}: reference is all zero"
    assert err / norm < tol, f"{what}: relative error {err / norm:.3e} >= {tol:g}"


def make_inputs(t, d, m, dtype, seed, lead=None):
    gen = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (t,)
    sources = [torch.randn(*shape, d, generator=gen).to(dtype) for _ in range(m)]
    query = (0.5 * torch.randn(d, generator=gen)).to(dtype)
    gain = (1.0 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    grad_out = torch.randn(*shape, d, generator=gen).to(dtype)
    eps = 1e-6 if m % 2 else 1e-2
    return sources, query, gain, grad_out, eps


def reference64(sources, query, gain, grad_out, eps, scale):
    srcs = [s.detach().double().requires_grad_() for s in sources]
    q = query.detach().double().requires_grad_()
    g = gain.detach().double().requires_grad_()
    out = depth_attention_reference(srcs, q, g, eps=eps, scale=scale)
    out.backward(grad_out.double())
    return out, [s.grad for s in srcs], q.grad, g.grad


def check_backward(got, ref, tol, m):
    grads, dq, dg = got
    _, r_src, r_q, r_g = ref
    for j, (a, b) in enumerate(zip(grads, r_src)):
        assert_close(a, b, tol, f"grad of sources[{j}]")
    if m == 1:
        assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dg, torch.zeros_like(dg))
    else:
        assert_close(dq, r_q, tol, "grad of query")
        assert_close(dg, r_g, tol, "grad of norm_weight")


# --------------------------------------------------------------------------------------------
# (a) the code generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,d,dtype", [(1, 5, "fp32"), (3, 48, "bf16"), (9, 100, "fp16"), (33, 7168, "bf16")])
def test_generated_source_is_specialised(m, d, dtype):
    bd = next_power_of_2(d)
    fwd = generate_source(KernelSpec("fwd", d=d, dtype=dtype, m=m, block_t=4))
    assert f"def attnres_fwd_m{m}_d{d}_{dtype}_bt4(" in fwd
    signature = fwd[fwd.index("def attnres_fwd"):].split(":", 1)[0]
    assert [f"src{j}" in signature for j in range(m)] == [True] * m and f"src{m}," not in signature
    assert f"tl.arange(0, {bd})" in fwd and f"cols < {d}" in fwd
    assert fwd.count("tl.load(src") == m  # every source read exactly once, unrolled
    assert "stack" not in fwd and "atomic" not in fwd
    if dtype != "fp32":
        assert {"bf16": ".to(tl.bfloat16)", "fp16": ".to(tl.float16)"}[dtype] in fwd
    for variant, loads in (("resident", m), ("twopass", 2 * m)):
        bwd = generate_source(KernelSpec("bwd", d=d, dtype=dtype, m=m, block_t=1, variant=variant))
        assert bwd.count("tl.load(src") == loads
        assert "atomic" not in bwd and "partial_ptr + pid" in bwd
    # distinct specialisations give distinct sources
    assert fwd != generate_source(KernelSpec("fwd", d=d, dtype=dtype, m=m + 1, block_t=4))
    assert fwd != generate_source(KernelSpec("fwd", d=d + 1, dtype=dtype, m=m, block_t=4))


@needs_triton
def test_kernels_are_cached_on_disk_and_memoised(tmp_path, monkeypatch):
    from attnres_compile.ops.kernels import triton_cache

    monkeypatch.setenv("ATTNRES_COMPILE_CACHE", str(tmp_path))
    spec = KernelSpec("fwd", d=7, dtype="fp32", m=2, block_t=2)
    monkeypatch.setattr(triton_cache, "_LOADED", {})
    k1 = triton_cache.load_kernel(spec)
    k2 = triton_cache.load_kernel(spec)
    assert k1 is k2
    files = list((tmp_path / "triton").glob("attnres_fwd_m2_d7_fp32_bt2_*.py"))
    assert len(files) == 1 and files[0].read_text() == generate_source(spec)


def test_resident_budget():
    assert resident_fits(9, 7168, "bf16", 1)  # Kimi-like Block AttnRes backward keeps rows on chip
    assert not resident_fits(33, 7168, "bf16", 1)
    assert tk.backward_variant(64, 48, torch.float32, 1) == "resident"


def test_package_imports_and_runs_without_triton():
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, Block())
        import torch
        import attnres_compile
        from attnres_compile.ops import depth_attention, depth_attention_reference
        from attnres_compile.ops.kernels import dispatch as _dispatch
        from attnres_compile.ops.kernels import triton_codegen
        assert not _dispatch.is_triton_op("attnres::depth_attention")
        assert "triton" not in sys.modules
        src = triton_codegen.generate_source(triton_codegen.KernelSpec("fwd", d=5, m=2))
        xs = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
        q, g = torch.randn(5), torch.ones(5)
        out = depth_attention(xs, q, g, eps=1e-6)
        ref = depth_attention_reference(xs, q, g, eps=1e-6)
        assert torch.allclose(out, ref, atol=1e-6), (out, ref)
        out.sum().backward()
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# (b) forward and backward vs the float64 reference
# --------------------------------------------------------------------------------------------

SHAPES = [(5, 1, 7), (48, 2, 19), (100, 3, 37), (5, 9, 23), (48, 33, 11), (100, 9, 13)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d,m,t", SHAPES, ids=lambda v: str(v))
def test_forward_matches_reference(d, m, t, dtype):
    sources, query, gain, _, eps = make_inputs(t, d, m, dtype, seed=1000 * d + m)
    scale = float(m) if m % 2 else 1.0
    out = tk.forward(sources, query, gain, eps, scale, block_t=4, num_programs=3)
    ref = depth_attention_reference([s.double() for s in sources], query.double(), gain.double(), eps=eps, scale=scale)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, TOL[dtype], "output")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d,m,t", SHAPES, ids=lambda v: str(v))
def test_backward_matches_reference(d, m, t, dtype):
    sources, query, gain, grad_out, eps = make_inputs(t, d, m, dtype, seed=2000 * d + m)
    scale = float(m) if m % 2 else 1.0
    ref = reference64(sources, query, gain, grad_out, eps, scale)
    variants = ["resident", "twopass"] if dtype == torch.float32 else ["resident"]
    for variant in variants:
        got = tk.backward(grad_out, sources, query, gain, eps, scale, block_t=4, num_programs=2, variant=variant)
        assert all(g.dtype == dtype for g in got[0]) and got[1].dtype == dtype
        check_backward(got, ref, TOL[dtype], m)


@needs_triton
def test_sixty_four_sources():
    sources, query, gain, grad_out, eps = make_inputs(9, 48, 64, torch.float32, seed=64)
    ref = reference64(sources, query, gain, grad_out, eps, 1.0)
    out = tk.forward(sources, query, gain, eps, 1.0)
    assert_close(out, ref[0], 1e-5, "output")
    check_backward(tk.backward(grad_out, sources, query, gain, eps, 1.0), ref, 1e-5, 64)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_expanded_and_strided_grad_out(dtype):
    sources, query, gain, _, eps = make_inputs(None, 48, 3, dtype, seed=5, lead=(2, 5))
    expanded = torch.ones((), dtype=dtype).expand(2, 5, 48)  # what .sum() produces
    strided = torch.randn(48, 5, 2).to(dtype).permute(2, 1, 0)  # non-contiguous, non-mergeable
    for grad_out in (expanded, strided):
        ref = reference64(sources, query, gain, grad_out, eps, 2.0)
        check_backward(tk.backward(grad_out, sources, query, gain, eps, 2.0, block_t=2), ref, TOL[dtype], 3)


@needs_triton
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_strided_and_expanded_query_gain_and_sources(layout):
    """The launchers read query and gain as ``ptr + d``: a strided or expanded [D] parameter
    must give the same result as its contiguous copy (it gave rel err 1.1 before the fix);
    sources strided or expanded over the tokens are read through their row stride."""
    gen = torch.Generator().manual_seed(11)
    d, m = 40, 3
    sources = [torch.randn(9, d, generator=gen) for _ in range(m)]
    grad_out = torch.randn(9, d, generator=gen)
    if layout == "strided":
        q = torch.randn(2 * d, generator=gen)[::2]
        g = (1.0 + 0.1 * torch.randn(d, 3, generator=gen))[:, 1]
    else:   # one value broadcast to [D], stride 0
        q = torch.full((1,), 0.7).expand(d)
        g = torch.full((1,), 1.3).expand(d)
    assert q.stride(0) != 1 and g.stride(0) != 1
    if layout == "expanded":   # and one source broadcast over the tokens (row stride 0)
        sources[1] = torch.randn(1, d, generator=gen).expand(9, d)
    else:                      # and one source strided in both dims
        sources[1] = torch.randn(18, 2 * d, generator=gen)[::2, ::2]
    ref = reference64(sources, q, g, grad_out, 1e-6, 2.0)
    assert_close(tk.forward(sources, q, g, 1e-6, 2.0, block_t=4), ref[0], 1e-5, "output")
    got = tk.backward(grad_out, sources, q, g, 1e-6, 2.0, block_t=4)
    assert got[1].is_contiguous() and got[2].is_contiguous()
    check_backward(got, ref, 1e-5, m)
    # two-phase: phase 2 reads the site's query and gain the same way
    o, mx, z = tk.phase1(sources[:-1], q.unsqueeze(0), g.unsqueeze(0), 1e-6, block_t=4)
    h = tk.phase2(o[0], mx[0], z[0], sources[-1], q, g, 1e-6, 2.0, block_t=4)
    assert_close(h, ref[0], 1e-5, "two-phase output")


@needs_triton
def test_non_contiguous_sources_are_read_in_place_or_copied():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 3, 40, generator=gen)
    sources = [base[:, j] for j in range(3)]  # row-strided views: read in place
    transposed = [torch.randn(40, 6, generator=gen).t() for _ in range(2)]  # unit column stride lost
    for srcs in (sources, transposed):
        q, g = torch.randn(40, generator=gen), torch.ones(40)
        ref = reference64(srcs, q, g, torch.ones(srcs[0].shape), 1e-6, 1.0)
        assert_close(tk.forward(srcs, q, g, 1e-6, 1.0), ref[0], 1e-5, "output")
        check_backward(tk.backward(torch.ones(srcs[0].shape), srcs, q, g, 1e-6, 1.0), ref, 1e-5, len(srcs))


@needs_triton
@pytest.mark.parametrize("variant", ["resident", "twopass"])
def test_peaked_softmax_gradients_stay_accurate(variant):
    sources, query, gain, grad_out, eps = make_inputs(8, 64, 4, torch.float32, seed=17)
    u = query * gain
    sources[0] = sources[0] + 1.2 * u / u.pow(2).mean().sqrt()
    ref = reference64(sources, query, gain, grad_out, eps, 1.0)
    check_backward(tk.backward(grad_out, sources, query, gain, eps, 1.0, block_t=4, variant=variant), ref, 1e-5, 4)


@needs_triton
def test_zero_tokens():
    sources = [torch.randn(0, 8) for _ in range(2)]
    assert tk.forward(sources, torch.ones(8), torch.ones(8), 1e-6, 1.0).shape == (0, 8)
    grads, dq, dg = tk.backward(torch.randn(0, 8), sources, torch.ones(8), torch.ones(8), 1e-6, 1.0)
    assert [g.shape for g in grads] == [(0, 8)] * 2 and dq.abs().sum() == 0 and dg.abs().sum() == 0


# --------------------------------------------------------------------------------------------
# (c) bytes moved (SPEC section 4), counted in the interpreter
# --------------------------------------------------------------------------------------------


def _named(sources, **extra):
    named = {f"src{j}": s for j, s in enumerate(sources)}
    named.update(extra)
    return named


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,d,t,bt,p", [(1, 5, 7, 4, 2), (3, 100, 13, 4, 3), (9, 48, 37, 8, 4)])
def test_forward_moves_exactly_the_floor(m, d, t, bt, p, dtype):
    sources, query, gain, _, eps = make_inputs(t, d, m, dtype, seed=m)
    out = torch.empty(t, d, dtype=dtype)  # registered so its stores are attributed
    e = sources[0].element_size()
    tiles = -(-t // bt)
    with count_bytes(_named(sources, query=query, gain=gain, out=out), track_elements=True) as c:
        h = tk.forward(sources, query, gain, eps, 1.0, block_t=bt, num_programs=p)
    programs = min(p, tiles)
    for j in range(m):  # M*D read per token, every element exactly once
        assert c.loaded(f"src{j}") == t * d * e
        assert c.distinct_loaded_elements(f"src{j}") == t * d
    assert c.loaded("query") == c.loaded("gain") == programs * d * e  # once per program
    assert c.total_loaded == m * t * d * e + 2 * programs * d * e
    assert c.total_stored == t * d * e  # D written per token, no per-token scalars saved
    assert set(c.stores) == {"<other>"}  # h (allocated by the launcher)
    assert h.shape == (t, d)


@needs_triton
@pytest.mark.parametrize("variant", ["resident", "twopass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,d,t,bt,p", [(2, 5, 7, 4, 2), (3, 100, 13, 4, 3), (9, 48, 37, 8, 4)])
def test_backward_moves_exactly_the_floor(m, d, t, bt, p, dtype, variant):
    sources, query, gain, grad_out, eps = make_inputs(t, d, m, dtype, seed=m)
    e = sources[0].element_size()
    programs = min(p, -(-t // bt))
    with count_bytes(_named(sources, query=query, gain=gain, grad=grad_out), track_elements=True) as c:
        grads, dq, dg = tk.backward(grad_out, sources, query, gain, eps, 1.0, block_t=bt, num_programs=p, variant=variant)
    reads = 1 if variant == "resident" else 2
    for j in range(m):
        assert c.loaded(f"src{j}") == reads * t * d * e
        assert c.distinct_loaded_elements(f"src{j}") == t * d
    assert c.loaded("grad") == t * d * e
    # parameters: once per program in the main kernel, once more in the reduction kernel
    assert c.loaded("query") == c.loaded("gain") == (programs + 1) * d * e
    # the deterministic reduction: P partial rows of D float32 written, then read once
    partial = programs * d * 4
    assert c.loaded("<other>") == partial
    param_out = 2 * d * dq.element_size()
    assert c.total_stored == m * t * d * e + partial + param_out  # M*D written per token
    assert c.total_loaded == (reads * m + 1) * t * d * e + 2 * (programs + 1) * d * e + partial


# --------------------------------------------------------------------------------------------
# (d) registration: triton_op ops, Triton path through the ops, CPU stays one node
# --------------------------------------------------------------------------------------------


@needs_triton
def test_ops_are_triton_ops():
    from torch._library.triton import triton_ops_to_kernels

    for name in ("depth_attention", "depth_attention_backward", "depth_attention_phase1", "depth_attention_phase2"):
        assert _dispatch.is_triton_op(f"attnres::{name}")
        assert f"attnres::{name}" in triton_ops_to_kernels


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_runs_the_triton_path_with_autograd(dtype):
    sources, query, gain, grad_out, eps = make_inputs(None, 48, 3, dtype, seed=9, lead=(2, 3))
    ref = reference64(sources, query, gain, grad_out, eps, 3.0)
    leaves = [s.clone().requires_grad_() for s in sources]
    q, g = query.clone().requires_grad_(), gain.clone().requires_grad_()
    calls = []
    orig_fwd, orig_bwd = tk.forward, tk.backward
    try:
        tk.forward = lambda *a, **k: calls.append("fwd") or orig_fwd(*a, **k)
        tk.backward = lambda *a, **k: calls.append("bwd") or orig_bwd(*a, **k)
        with _dispatch.triton_on_cpu():
            out = depth_attention(leaves, q, g, eps=eps, scale=3.0)
            out.backward(grad_out)
    finally:
        tk.forward, tk.backward = orig_fwd, orig_bwd
    assert calls == ["fwd", "bwd"]
    assert_close(out, ref[0], TOL[dtype], "output")
    check_backward(([s.grad for s in leaves], q.grad, g.grad), ref, TOL[dtype], 3)


def test_fake_tensors_trace_the_plain_body():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xs = [torch.empty(4, 16) for _ in range(3)]
        out = torch.ops.attnres.depth_attention(xs, torch.empty(16), torch.empty(16), 1e-6, 1.0)
        grads, dq, dg = torch.ops.attnres.depth_attention_backward(out, xs, torch.empty(16), torch.empty(16), 1e-6, 1.0)
    assert out.shape == (4, 16) and [g.shape for g in grads] == [(4, 16)] * 3 and dq.shape == (16,)


# --------------------------------------------------------------------------------------------
# (e) the compiled CPU fast path
# --------------------------------------------------------------------------------------------

@pytest.fixture(params=["base", "avx2", "avx512"])
def isa(request):
    """Each kernel build the package compiled (at install) that this CPU can run."""
    prev = cpu_kernels.isa()
    try:
        cpu_kernels.select_isa(request.param)
    except RuntimeError as exc:
        assert "not supported on this CPU" in str(exc)
        pytest.skip(f"this CPU cannot run the {request.param} build")
    yield request.param
    cpu_kernels.select_isa(prev)


def test_native_kernels_were_built_at_install():
    """The package's build compiled attnres_compile._C; nothing is compiled at run time."""
    assert cpu_kernels.available(), cpu_kernels.load_error()
    assert cpu_kernels.isa() in ("base", "avx2", "avx512")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d,m,t", [(5, 1, 7), (48, 2, 130), (100, 9, 37), (1000, 5, 70), (48, 33, 11)], ids=str)
def test_cpu_kernels_match_reference(d, m, t, dtype, isa):
    sources, query, gain, grad_out, eps = make_inputs(t, d, m, dtype, seed=3000 * d + m)
    scale = float(m)
    ref = reference64(sources, query, gain, grad_out, eps, scale)
    out = cpu_kernels.forward(sources, query, gain, eps, scale)
    assert out is not None and out.dtype == dtype
    assert_close(out, ref[0], TOL[dtype], "output")
    check_backward(cpu_kernels.backward(grad_out, sources, query, gain, eps, scale), ref, TOL[dtype], m)
    expanded = torch.ones((), dtype=dtype).expand(t, d)
    ref_e = reference64(sources, query, gain, expanded, eps, scale)
    check_backward(cpu_kernels.backward(expanded, sources, query, gain, eps, scale), ref_e, TOL[dtype], m)


def test_cpu_op_uses_the_fast_path_and_agrees_with_plain():
    sources, query, gain, grad_out, eps = make_inputs(300, 64, 4, torch.float32, seed=4)
    fast = depth_attention(sources, query, gain, eps=eps)
    with plain_cpu_path():
        plain = depth_attention(sources, query, gain, eps=eps)
    assert_close(fast, plain, 1e-5, "fast vs plain CPU path")


def test_cpu_backward_does_not_depend_on_thread_count():
    sources, query, gain, grad_out, eps = make_inputs(4000, 64, 3, torch.float32, seed=8)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.backward(grad_out, sources, query, gain, eps, 1.0)
        torch.set_num_threads(max(2, prev))
        many = cpu_kernels.backward(grad_out, sources, query, gain, eps, 1.0)
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(one[0], many[0]))
    assert torch.equal(one[1], many[1]) and torch.equal(one[2], many[2])


def test_cpu_fast_path_can_be_disabled():
    """ATTNRES_CPU_KERNELS=0 (read at import): the plain PyTorch path everywhere, no warning."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        # torch 2.11's profiler warns on entering that it clears events per cycle: not ours
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        import torch
        from attnres_compile.ops.kernels import cpu as cpu_kernels
        from attnres_compile.ops import depth_attention, depth_attention_reference
        assert not cpu_kernels.available()
        assert cpu_kernels.forward([torch.randn(3, 4)], torch.ones(4), torch.ones(4), 1e-6, 1.0) is None
        src = [torch.randn(5, 8, requires_grad=True) for _ in range(2)]
        q, g = torch.randn(8), torch.ones(8)
        with torch.profiler.profile() as prof:
            out = depth_attention(src, q, g, eps=1e-6)
            out.sum().backward()
        names = {e.name for e in prof.events()}
        assert not any("attnres_native" in n for n in names), names
        ref = depth_attention_reference(src, q, g, eps=1e-6)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, ATTNRES_CPU_KERNELS="0"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_cpu_fast_path_is_not_traced_by_compile():
    """torch.compile of a function calling the op: the op stays an opaque node (fake impl),
    and the real CPU kernel runs at run time without recursing into compilation."""
    sources, query, gain, _, eps = make_inputs(16, 32, 3, torch.float32, seed=6)

    def f(a, b, c, q, g):
        return depth_attention([a, b, c], q, g, eps=eps) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*sources, query, gain)
    ref = depth_attention_reference(sources, query, gain, eps=eps) * 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# (f) fused epilogues: site + norm, partial-sum add + site (interpreter)
# --------------------------------------------------------------------------------------------


def _norm64(h, kind, w, b, norm_eps):
    h = h.double()
    if kind == "rmsnorm":
        return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + norm_eps) * w.double()
    return torch.nn.functional.layer_norm(h, h.shape[-1:], w.double(), b.double(), norm_eps)


@needs_triton
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,d,t", [(1, 5, 7), (3, 100, 13), (9, 48, 37)], ids=str)
def test_site_then_norm_matches_float64(m, d, t, dtype, kind):
    sources, query, gain, _, eps = make_inputs(t, d, m, dtype, seed=7 * m + d)
    gen = torch.Generator().manual_seed(d)
    w = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(d, generator=gen)).to(dtype) if kind == "layernorm" else None
    y = tk.forward_norm(sources, query, gain, eps, float(m), w, b, 1e-5, kind=kind, block_t=4)
    h64 = depth_attention_reference([s.double() for s in sources], query.double(), gain.double(), eps=eps,
                                    scale=float(m))
    assert y.dtype == dtype
    assert_close(y, _norm64(h64, kind, w, b, 1e-5), TOL[dtype], f"{kind}(site)")


@needs_triton
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("m,d,t,bt,p", [(1, 5, 7, 4, 2), (9, 48, 37, 8, 4)])
def test_site_then_norm_saves_the_norms_round_trip(m, d, t, bt, p, kind):
    """Fused: exactly the plain forward's traffic plus the norm's parameters once per program,
    i.e. the norm's read of h and its write of y (2*D per token) are gone, and h is never stored."""
    sources, query, gain, _, eps = make_inputs(t, d, m, torch.float32, seed=m)
    w, b = torch.ones(d), (torch.zeros(d) if kind == "layernorm" else None)
    named = _named(sources, query=query, gain=gain, w=w, **({"b": b} if b is not None else {}))
    with count_bytes(named) as plain:
        tk.forward(sources, query, gain, eps, 1.0, block_t=bt, num_programs=p)
    with count_bytes(named) as fused:
        tk.forward_norm(sources, query, gain, eps, 1.0, w, b, 1e-5, kind=kind, block_t=bt, num_programs=p)
    programs, e = min(p, -(-t // bt)), 4
    n_params = 1 if kind == "rmsnorm" else 2
    assert fused.loaded("w") == programs * d * e
    assert fused.total_loaded == plain.total_loaded + n_params * programs * d * e
    assert fused.total_stored == plain.total_stored == t * d * e        # y instead of h, nothing else
    unfused = plain.total_loaded + plain.total_stored + 2 * t * d * e   # + the norm reading h, writing y
    assert unfused - (fused.total_loaded + fused.total_stored) == 2 * t * d * e - n_params * programs * d * e


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,d,t", [(1, 5, 7), (2, 100, 13), (8, 48, 37)], ids=str)
def test_partial_sum_add_fused_into_the_site_matches_float64(n, d, t, dtype):
    gen = torch.Generator().manual_seed(n + d)
    blocks = [torch.randn(t, d, generator=gen).to(dtype) for _ in range(n)]
    prev = torch.randn(t, d, generator=gen).to(dtype)
    add = torch.randn(2 * t, d, generator=gen).to(dtype)[::2]       # row-strided, as a sublayer view can be
    q, g = (0.5 * torch.randn(d, generator=gen)).to(dtype), torch.ones(d, dtype=dtype)
    h, new_partial = tk.forward_partial(blocks, prev, add, q, g, 1e-6, 2.0, block_t=4)
    assert torch.equal(new_partial, prev + add)                      # the add, rounded as torch rounds it
    ref = depth_attention_reference([b.double() for b in blocks] + [(prev + add).double()], q.double(), g.double(),
                                    eps=1e-6, scale=2.0)
    assert h.dtype == dtype
    assert_close(h, ref, TOL[dtype], "site over [blocks, prev + add]")


@needs_triton
@pytest.mark.parametrize("n,d,t,bt,p", [(1, 5, 7, 4, 2), (8, 48, 37, 8, 4)])
def test_partial_sum_add_fused_saves_the_partials_reread(n, d, t, bt, p):
    """Fused: reads blocks, prev, add once and writes new_partial and h; apart, the add moves
    3*D per token and the site reads new_partial back: D per token more."""
    gen = torch.Generator().manual_seed(n)
    blocks = [torch.randn(t, d, generator=gen) for _ in range(n)]
    prev, add = torch.randn(t, d, generator=gen), torch.randn(t, d, generator=gen)
    q, g = torch.randn(d, generator=gen), torch.ones(d)
    with count_bytes(_named(blocks, prev=prev, add=add, query=q, gain=g)) as fused:
        tk.forward_partial(blocks, prev, add, q, g, 1e-6, 1.0, block_t=bt, num_programs=p)
    new_partial = prev + add
    with count_bytes(_named(blocks, new_partial=new_partial, query=q, gain=g)) as site:
        tk.forward([*blocks, new_partial], q, g, 1e-6, 1.0, block_t=bt, num_programs=p)
    e = 4
    for name in ("prev", "add", *[f"src{j}" for j in range(n)]):
        assert fused.loaded(name) == t * d * e, name
    assert fused.total_stored == 2 * t * d * e                          # new_partial and h
    unfused = site.total_loaded + site.total_stored + 3 * t * d * e      # + the add: read 2*D, write D
    assert unfused - (fused.total_loaded + fused.total_stored) == t * d * e
