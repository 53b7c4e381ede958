"""Native code built at install: the CPU kernels (attnres_compile._C) and the fused onnxruntime
kernel (attnres_compile._ort_kernel); the eager fast path through attnres_native::depth_attention;
and what happens without them (one warning, the PyTorch path, the ONNX function body)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnres_compile as ac
from attnres_compile.ops.kernels import cpu as cpu_kernels
from attnres_compile.onnx import ort_kernel
from attnres_compile.ops import depth_attention, depth_attention_reference
from attnres_compile.ops.depth_attention import plain_cpu_path
from tests.models import TinyPreNormLM as TinyLM

ROOT = Path(__file__).resolve().parents[1]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def test_built_libraries_ship_in_the_package_and_headers_do_not():
    pkg = Path(ac.__file__).parent
    assert cpu_kernels.available(), cpu_kernels.load_error()
    assert Path(ort_kernel.library_path()).parent == pkg
    import attnres_compile._C as native
    assert Path(native.__file__).parent == pkg
    assert not list(pkg.rglob("*.h")) and not list(pkg.rglob("*.c")), "build inputs must stay out of the package"
    # the vendored onnxruntime headers are the ones their README and SHA256SUMS name
    vendored = ROOT / "third_party" / "onnxruntime"
    for line in (vendored / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((vendored / name).read_bytes()).hexdigest() == digest, name


def test_runs_with_no_c_compiler_on_path(tmp_path):
    """Nothing is compiled at run time: convert, train a step, export and run the fused
    onnxruntime kernel with a PATH that holds only the Python interpreter."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    env["PATH"] = str(bindir)
    env["PYTHONPATH"] = str(ROOT)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    env["ATTNRES_CACHE_DIR"] = str(tmp_path / "attnres")
    proc = _run("""
        import shutil, warnings
        import torch
        warnings.simplefilter("error", RuntimeWarning)
        assert shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("c++") is None
        import attnres_compile as ac
        from attnres_compile.ops.kernels import cpu as cpu_kernels
        from attnres_compile.onnx import ort_kernel
        from attnres_compile.onnx import ort_session
        from tests.models import TinyPreNormLM as TinyLM
        assert cpu_kernels.available(), cpu_kernels.load_error()
        model = TinyLM(d=32, layers=4)
        ids = torch.randint(0, 37, (2, 9))
        conv = ac.convert(model, (ids,), num_blocks=2)
        loss = conv(ids).square().mean()
        loss.backward()
        assert all(p.grad is not None for p in conv.attnres.parameters())
        proto = ac.export_onnx(conv, (ids,))
        sess = ort_session(proto, fused=True)
        calls = ort_kernel.calls()
        out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
        assert ort_kernel.calls() > calls
        with torch.no_grad():
            ref = conv(ids).numpy()
        err = abs(out - ref).max() / abs(ref).max()
        assert err < 1e-4, err
        print("ok", cpu_kernels.isa())
    """, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_without_the_native_build_one_warning_and_the_pytorch_path():
    proc = _run("""
        import sys, warnings
        sys.modules["attnres_compile._C"] = None       # as if the build had skipped it
        import torch
        import attnres_compile as ac
        from attnres_compile.ops.kernels import cpu as cpu_kernels
        from attnres_compile.ops import depth_attention_reference
        from tests.models import TinyPreNormLM as TinyLM
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = TinyLM(d=16, layers=4)
            ids = torch.randint(0, 37, (2, 5))
            conv = ac.convert(model, (ids,), num_blocks=2, preserve="exact")
            for _ in range(3):
                out = conv(ids)
                out.sum().backward()
            with torch.no_grad():
                same = (out - model(ids)).abs().max().item()
        mine = [w for w in caught if "native CPU kernels" in str(w.message)]
        assert not cpu_kernels.available() and "attnres_compile._C" in cpu_kernels.load_error(), cpu_kernels.load_error()
        assert len(mine) == 1, [str(w.message) for w in caught]
        assert "pip install --no-build-isolation" in str(mine[0].message)
        assert same < 1e-5, same
        print("ok")
    """, dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ort_session_falls_back_to_the_function_body(monkeypatch):
    from attnres_compile.onnx import ort_session

    torch.manual_seed(0)
    model = TinyLM(d=16, layers=2)
    ids = torch.randint(0, 37, (2, 5))
    conv = ac.convert(model, (ids,))
    with torch.no_grad():
        for p in conv.attnres.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ref = conv(ids).numpy()
    proto = ac.export_onnx(conv, (ids,))
    before = ort_kernel.calls()                               # (loads the built library's counter)
    monkeypatch.setattr(ort_kernel, "_built_path", lambda: None)
    with pytest.warns(RuntimeWarning, match="not built when the package was installed"):
        sess = ort_session(proto, fused=True)
    out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    assert abs(out - ref).max() / abs(ref).max() < 1e-4
    assert ort_kernel.calls() == before                       # the function body ran, not the kernel
    monkeypatch.setenv("ATTNRES_ORT_KERNEL", "0")          # off on purpose: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ort_session(proto, fused=True)


def test_eager_sites_run_the_native_op_and_captures_record_the_graph_op():
    model = TinyLM(d=16, layers=4)
    ids = torch.randint(0, 37, (2, 5))
    conv = ac.convert(model, (ids,), num_blocks=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        conv(ids).sum().backward()
    names = {e.name for e in prof.events()}
    assert "attnres_native::depth_attention" in names
    assert "attnres::depth_attention" not in names            # the Python op is not on the eager path
    ep = torch.export.export(conv, (ids,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "attnres.depth_attention.default" in targets
    assert not any("attnres_native" in t for t in targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("lead,m", [((7,), 1), ((2, 9), 3), ((1, 1), 9), ((3, 4), 12)], ids=str)
def test_native_eager_autograd_matches_float64(lead, m, dtype):
    gen = torch.Generator().manual_seed(m + len(lead))
    d = 40
    sources = [torch.randn(*lead, d, generator=gen).to(dtype).requires_grad_() for _ in range(m)]
    q = (0.5 * torch.randn(d, generator=gen)).requires_grad_()     # float32 parameters, as models hold them
    g = (1 + 0.1 * torch.randn(d, generator=gen)).requires_grad_()
    grad = torch.randn(*lead, d, generator=gen).to(dtype)
    out = depth_attention(sources, q, g, eps=1e-6, scale=float(m))
    out.backward(grad)
    s64 = [s.detach().double().requires_grad_() for s in sources]
    q64, g64 = q.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    ref = depth_attention_reference(s64, q64, g64, eps=1e-6, scale=float(m))
    ref.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and rel(out, ref) < tol
    for a, b in zip(sources, s64):
        assert a.grad.dtype == dtype and rel(a.grad, b.grad) < tol
    if m > 1:
        assert q.grad.dtype == torch.float32 and rel(q.grad, q64.grad) < tol and rel(g.grad, g64.grad) < tol


def test_native_eager_path_checks_inputs_and_refuses_double_backward():
    sources = [torch.randn(3, 8, requires_grad=True) for _ in range(2)]
    q, g = torch.zeros(8, requires_grad=True), torch.ones(8)
    with pytest.raises(ValueError, match=r"query must have shape \[D\] = \[8\]"):
        depth_attention(sources, torch.zeros(7), g, eps=1e-6)
    with pytest.raises(ValueError, match=r"sources\[1\] has shape"):
        depth_attention([sources[0], torch.randn(3, 9)], q, g, eps=1e-6)
    out = depth_attention(sources, q, g, eps=1e-6)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out.sum(), [sources[0]], create_graph=True)


def test_native_and_plain_paths_agree_on_a_converted_model():
    torch.manual_seed(1)
    model = TinyLM(d=24, layers=6)
    ids = torch.randint(0, 37, (3, 11))
    conv = ac.convert(model, (ids,), num_blocks=3)
    with torch.no_grad():
        for p in conv.attnres.parameters():
            p.add_(0.2 * torch.randn_like(p))

    def grads():
        conv.zero_grad(set_to_none=True)
        out = conv(ids)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in conv.named_parameters()}

    fast_out, fast = grads()
    with plain_cpu_path():
        plain_out, plain = grads()
    assert rel(fast_out, plain_out) < 1e-5
    for n in fast:
        assert rel(fast[n], plain[n]) < 1e-4, n


def test_native_kernels_read_strided_and_expanded_inputs():
    gen = torch.Generator().manual_seed(2)
    d = 24
    base = torch.randn(1, d, generator=gen, requires_grad=True)
    wide = torch.randn(9, 2 * d, generator=gen, requires_grad=True)
    sources = [base.expand(9, d), wide[:, ::2], torch.randn(d, 9, generator=gen).t()]   # stride 0, 2, transposed
    qbig = torch.randn(2 * d, generator=gen, requires_grad=True)
    q, g = qbig[::2], torch.full((1,), 1.1).expand(d)
    out = depth_attention(sources, q, g, eps=1e-6, scale=3.0)
    out.square().sum().backward()
    got = [base.grad.clone(), wide.grad.clone(), qbig.grad.clone()]
    for t in (base, wide, qbig):
        t.grad = None
    with plain_cpu_path():
        ref = depth_attention(sources, q, g, eps=1e-6, scale=3.0)
        ref.square().sum().backward()
    assert rel(out, ref) < 1e-5
    for a, b in zip(got, [base.grad, wide.grad, qbig.grad]):
        assert rel(a, b) < 1e-5
