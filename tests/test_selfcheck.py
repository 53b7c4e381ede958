"""First-use self-check of the generated Triton kernels (ops/kernels/selfcheck.py), run on CPU in the
Triton interpreter (``TRITON_INTERPRET=1``, ``triton_on_cpu()`` + ``selfcheck.forced()``):

* a correct kernel passes its probe and is used;
* a kernel that returns wrong values, or raises (a compile/launch error), is disabled for the
  process with exactly one warning naming the variant, dtype, device and the measured error; the
  op returns the PyTorch result; later calls neither warn nor launch it; every variant;
* the probe runs on real tensors when the op is traced with fake tensors;
* verify() reports which implementation each site ran;
* the native eager path refuses tensor subclasses anywhere among its arguments.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import pytest
import torch

import attnres_compile as ac
from attnres_compile.checks import site_paths
from attnres_compile.ops.kernels import selfcheck
from attnres_compile.ops import depth_attention, depth_attention_reference
from attnres_compile.ops.kernels import dispatch as _dispatch
from attnres_compile.ops.depth_attention import plain_cpu_path
from attnres_compile.ops.paths import record_site_paths

from .models import TinyPreNormLM

da = sys.modules["attnres_compile.ops.depth_attention"]

try:
    from attnres_compile.ops.kernels import triton_launch as tk
except Exception:  # pragma: no cover
    tk = None

needs_interpreter = pytest.mark.skipif(
    not (_dispatch.triton_importable() and tk is not None and tk.interpreter_enabled()),
    reason="needs triton and TRITON_INTERPRET=1 (the kernels run in the interpreter)",
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
D = 24


@pytest.fixture(autouse=True)
def _fresh():
    selfcheck.reset()
    yield
    selfcheck.reset()


@contextlib.contextmanager
def kernels_checked():
    """CPU tensors to the Triton kernels, self-checked; the fallback is the plain PyTorch path."""
    with _dispatch.triton_on_cpu(), selfcheck.forced(), plain_cpu_path():
        yield


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def inputs(dtype=torch.float32, m=3, seed=0, lead=(2, 5)):
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(*lead, D, generator=gen).to(dtype) for _ in range(m)]
    query = (0.4 * torch.randn(D, generator=gen)).to(dtype)
    gain = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype)
    return sources, query, gain


def ref64(sources, query, gain, eps, scale=1.0):
    return depth_attention_reference([s.double() for s in sources], query.double(), gain.double(), eps=eps,
                                     scale=scale)


def selfcheck_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, selfcheck.KernelSelfCheckWarning)]


@contextlib.contextmanager
def recorded():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def counting(monkeypatch, name: str, wrong=None, raises=None) -> list:
    """Replace launcher ``tk.<name>`` by one that counts its calls and optionally is faulty."""
    real = getattr(tk, name)
    calls = []

    def launcher(*args, **kwargs):
        calls.append(name)
        if raises is not None:
            raise raises
        out = real(*args, **kwargs)
        return out if wrong is None else wrong(out)

    monkeypatch.setattr(tk, name, launcher)
    return calls


def _scaled(out, factor=1.01):
    if isinstance(out, torch.Tensor):
        return out * factor
    if isinstance(out, list):
        return [_scaled(o, factor) for o in out]
    return tuple(_scaled(o, factor) for o in out)


class FakeCompilationError(Exception):
    """Stands for triton.compiler.errors.CompilationError (multi-line message)."""


# -- (1) a correct kernel passes and is used ---------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_correct_kernel_passes_and_is_used(monkeypatch, dtype):
    calls = counting(monkeypatch, "forward")
    sources, q, g = inputs(dtype)
    with kernels_checked(), recorded() as record, record_site_paths() as paths:
        out = depth_attention(sources, q, g, eps=1e-6, scale=2.0)
        again = depth_attention(sources, q, g, eps=1e-6, scale=2.0)
    assert selfcheck_warnings(record) == []
    assert calls == ["forward"] * 3  # the probe, then both calls
    name = str(dtype).removeprefix("torch.")
    assert selfcheck.status() == {f"forward {name} cpu": "ok"}
    assert paths.of(q) == "triton"
    assert rel(out, ref64(sources, q, g, 1e-6, 2.0)) < TOL[dtype] and torch.equal(out, again)


@needs_interpreter
def test_every_variant_passes_its_probe():
    t = torch.randn(3, D)
    with kernels_checked():
        assert all(selfcheck.kernel_ok(v, t) for v in selfcheck.VARIANTS)
    assert selfcheck.status() == {f"{v} float32 cpu": "ok" for v in selfcheck.VARIANTS}


def test_cpu_tensors_are_not_probed_unless_forced(monkeypatch):
    monkeypatch.delenv("ATTNRES_SELFCHECK", raising=False)
    probes = []
    monkeypatch.setitem(selfcheck._PROBES, "forward", lambda *a: probes.append(a) or [])
    assert selfcheck.kernel_ok("forward", torch.randn(2, D)) and probes == [] and selfcheck.status() == {}
    monkeypatch.setenv("ATTNRES_SELFCHECK", "1")
    assert selfcheck.kernel_ok("forward", torch.randn(2, D)) and len(probes) == 1
    assert selfcheck.status() == {"forward float32 cpu": "ok"}
    with pytest.raises(ValueError, match="unknown Triton kernel variant"):
        selfcheck.kernel_ok("sideways", torch.randn(2, D))


# -- (2) a faulty kernel is disabled, once, and the PyTorch path runs ---------------------------

@needs_interpreter
def test_wrong_forward_kernel_is_disabled_with_one_warning(monkeypatch):
    calls = counting(monkeypatch, "forward", wrong=_scaled)
    sources, q, g = inputs()
    with kernels_checked(), recorded() as record, record_site_paths() as paths:
        out = depth_attention(sources, q, g, eps=1e-6)
        first = selfcheck_warnings(record)
        again = depth_attention(sources, q, g, eps=1e-6)
    assert len(first) == 1, first
    msg = first[0]
    assert msg.startswith("attnres_compile: the generated Triton kernel 'forward' (float32, cpu")
    assert "relative error 1e-02 > 1e-05" in msg or "relative error 0.01 > 1e-05" in msg, msg
    assert "PyTorch implementation instead" in msg
    assert selfcheck_warnings(record) == first  # the second call did not warn
    assert calls == ["forward"]                 # only the probe launched the faulty kernel
    assert rel(out, ref64(sources, q, g, 1e-6)) < 1e-5 and torch.equal(out, again)
    status = selfcheck.status()["forward float32 cpu"]
    assert status.startswith("disabled: output: relative error")
    assert paths.of(q).startswith("PyTorch (triton forward disabled: output: relative error")


@needs_interpreter
def test_forward_kernel_that_raises_is_disabled_with_one_warning(monkeypatch):
    err = FakeCompilationError("at 14:8: unsupported tensor index\n    x = tl.load(src0 + offs)\n    ^")
    calls = counting(monkeypatch, "forward", raises=err)
    sources, q, g = inputs(torch.bfloat16)
    with kernels_checked(), recorded() as record:
        out = depth_attention(sources, q, g, eps=1e-6)
        out2 = depth_attention(sources, q, g, eps=1e-6)
    msgs = selfcheck_warnings(record)
    assert len(msgs) == 1 and calls == ["forward"]
    assert "kernel 'forward' (bfloat16, cpu" in msgs[0]
    assert "raised FakeCompilationError: at 14:8: unsupported tensor index." in msgs[0]
    assert "tl.load" not in msgs[0]  # the first line only
    assert rel(out, ref64(sources, q, g, 1e-6)) < TOL[torch.bfloat16] and torch.equal(out, out2)
    # the decision is kept per (variant, dtype, device): no second probe
    with kernels_checked():
        assert not selfcheck.kernel_ok("forward", sources[0])
    assert set(selfcheck.status()) == {"forward bfloat16 cpu"}


@needs_interpreter
def test_wrong_backward_kernel_is_disabled_and_gradients_stay_right(monkeypatch):
    calls = counting(monkeypatch, "backward", wrong=_scaled)
    sources, q, g = inputs()
    grad_out = torch.randn_like(sources[0])
    want = [t.double().requires_grad_() for t in (*sources, q, g)]
    ref = depth_attention_reference(want[:3], want[3], want[4], eps=1e-6, scale=3.0)
    ref.backward(grad_out.double())
    for step in range(2):
        leaves = [t.clone().requires_grad_() for t in (*sources, q, g)]
        with kernels_checked(), recorded() as record:
            depth_attention(leaves[:3], leaves[3], leaves[4], eps=1e-6, scale=3.0).backward(grad_out)
        msgs = selfcheck_warnings(record)
        if step == 0:
            assert len(msgs) == 1 and "kernel 'backward' (float32, cpu" in msgs[0], msgs
            assert "grad of" in msgs[0] and "relative error" in msgs[0]
        else:
            assert msgs == []
        for got, exp in zip(leaves, want):
            assert rel(got.grad, exp.grad) < 1e-5
    assert calls == ["backward"] * 2  # the probe only: the resident and the twopass kernel
    status = selfcheck.status()
    assert status["forward float32 cpu"] == "ok" and status["backward float32 cpu"].startswith("disabled: ")


def _run_variant(variant: str, dtype=torch.float32):
    """Call the op that launches ``variant``; return (output, PyTorch result, query)."""
    from attnres_compile.ops import (depth_attention_norm, depth_attention_partial, depth_attention_phase1,
                                     depth_attention_phase2)
    from attnres_compile.ops.reference import norm_reference, phase1_reference, phase2_reference

    sources, q, g = inputs(dtype)
    eps = 1e-6
    if variant == "forward":
        return depth_attention(sources, q, g, eps=eps), ref64(sources, q, g, eps), q
    if variant == "backward":
        leaves = [s.clone().requires_grad_() for s in sources]
        depth_attention(leaves, q, g, eps=eps).sum().backward()
        want = [s.double().requires_grad_() for s in sources]
        depth_attention_reference(want, q.double(), g.double(), eps=eps).sum().backward()
        return torch.cat([s.grad for s in leaves]), torch.cat([s.grad for s in want]), q
    if variant.startswith("forward_norm_"):
        kind = variant.removeprefix("forward_norm_")
        w, b = torch.ones(D) * 1.1, (torch.full((D,), 0.1) if kind == "layernorm" else None)
        out = depth_attention_norm(sources, q, g, eps=eps, weight=w, bias=b, norm_eps=1e-5, kind=kind)
        h = ref64(sources, q, g, eps)
        return out, norm_reference(h, kind, w.double(), None if b is None else b.double(), 1e-5), q
    if variant == "forward_partial":
        h, p = depth_attention_partial(sources[:2], sources[2], sources[0], q, g, eps=eps)
        return h, ref64([*sources[:2], sources[2].double() + sources[0].double()], q, g, eps), q
    qs, gs = torch.stack([q, 0.5 * q]), torch.stack([g, g])
    if variant == "phase1":
        o, m, z = depth_attention_phase1(sources, qs, gs, eps=eps)
        want = phase1_reference([s.double() for s in sources], qs.double(), gs.double(), eps=eps)
        return torch.cat([o.flatten(), m.flatten(), z.flatten()]), torch.cat([t.flatten() for t in want]), q
    o, m, z = phase1_reference(sources[:2], qs, gs, eps=eps)
    out = depth_attention_phase2(o[0], m[0], z[0], sources[2], q, g, eps=eps)
    want = phase2_reference(o[0].double(), m[0].double(), z[0].double(), sources[2].double(), q.double(),
                            g.double(), eps=eps)
    return out, want, q


_LAUNCHER = {"forward": "forward", "backward": "backward", "phase1": "phase1", "phase2": "phase2",
             "forward_norm_rmsnorm": "forward_norm", "forward_norm_layernorm": "forward_norm",
             "forward_partial": "forward_partial"}


@needs_interpreter
@pytest.mark.parametrize("fault", ["wrong", "raises"])
@pytest.mark.parametrize("variant", selfcheck.VARIANTS)
def test_every_faulty_variant_falls_back_to_pytorch(monkeypatch, variant, fault):
    calls = counting(monkeypatch, _LAUNCHER[variant], wrong=_scaled if fault == "wrong" else None,
                     raises=FakeCompilationError("boom\nsecond line") if fault == "raises" else None)
    with kernels_checked(), recorded() as record, record_site_paths() as paths:
        out, want, q = _run_variant(variant)
        out2, _, _ = _run_variant(variant)
    msgs = selfcheck_warnings(record)
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(f"attnres_compile: the generated Triton kernel {variant!r} (float32, cpu")
    assert ("relative error" if fault == "wrong" else "raised FakeCompilationError: boom") in msgs[0]
    # the probe only; it runs two kernels of backward (resident, twopass), phase1 (the same) and
    # phase2 (with and without a partial), and stops at the first that raises
    probe_launches = 2 if fault == "wrong" and variant in ("backward", "phase1", "phase2") else 1
    assert calls == [_LAUNCHER[variant]] * probe_launches
    assert rel(out, want) < 1e-5 and torch.equal(out, out2)
    assert selfcheck.status()[f"{variant} float32 cpu"].startswith("disabled: ")
    if variant not in ("backward", "phase1"):  # (phase 1 is reported with its sites' phase 2)
        path = paths.of(q)
        assert f"PyTorch (triton {variant} disabled: " in path, path
        if variant.startswith("phase"):
            assert path.startswith("two-phase: ")


# -- tracing: the probe runs on real tensors -----------------------------------------------------

@needs_interpreter
def test_probe_runs_on_real_tensors_under_fake_and_functional_modes(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    seen = []
    real = tk.forward

    def launcher(sources, *args, **kwargs):
        seen.append(type(sources[0]))
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(tk, "forward", launcher)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(4, D))
        with selfcheck.forced(), FunctionalTensorMode():
            assert selfcheck.kernel_ok("forward", fake)
    assert seen == [torch.Tensor]
    assert selfcheck.status() == {"forward float32 cpu": "ok"}


# -- (3) verify() reports the path of every site -------------------------------------------------

def _tiny():
    torch.manual_seed(0)
    model = TinyPreNormLM()
    idx = torch.randint(0, 37, (2, 8))
    return ac.convert(model, (idx,), num_blocks=2), idx


def test_verify_reports_the_path_of_every_site():
    from attnres_compile.ops.kernels import cpu as cpu_kernels

    conv, idx = _tiny()
    sites = ["chain0.site1", "chain0.site2", "chain0.site3", "chain0.site4", "chain0.site5", "chain0.final"]
    native = "native CPU kernel" if cpu_kernels.available() else "PyTorch"
    report = ac.verify(conv, (idx,))
    assert report.site_paths == dict.fromkeys(sites, native)
    assert [c.name for c in report.checks] == ["gradient flow"]  # information, not a check
    assert f"INFO  kernel paths         {native}: chain0.site1" in str(report) and "(6 sites)" in str(report)
    d = report.to_dict()
    assert d["site_paths"] == report.site_paths and d["kernel_selfcheck"] == {}
    with plain_cpu_path():
        assert ac.verify(conv, (idx,)).site_paths == dict.fromkeys(sites, "PyTorch")


@needs_interpreter
def test_verify_names_the_disabled_kernel(monkeypatch):
    counting(monkeypatch, "forward", raises=FakeCompilationError("no such intrinsic"))
    conv, idx = _tiny()
    with kernels_checked(), recorded() as record:
        paths = site_paths(conv, (idx,), {})
    assert len(selfcheck_warnings(record)) == 1
    want = "PyTorch (triton forward disabled: raised FakeCompilationError: no such intrinsic)"
    assert set(paths.values()) == {want} and len(paths) == 6
    monkeypatch.undo()
    selfcheck.reset()
    with kernels_checked():
        report = ac.verify(conv, (idx,))
    assert set(report.site_paths.values()) == {"triton"}, report.site_paths
    assert report.kernel_selfcheck == {"forward float32 cpu": "ok", "backward float32 cpu": "ok"}


# -- (4) the native eager path takes plain dense CPU tensors only --------------------------------

class _Sub(torch.Tensor):
    """A trivial tensor subclass (the real case: AsyncCollectiveTensor, DTensor)."""


def test_native_eager_refuses_a_subclass_anywhere(monkeypatch):
    sources, q, g = inputs()
    if not da.native_eager(sources, q, g):
        pytest.skip("the native CPU kernels are not built")
    assert da.native_eager(sources, torch.nn.Parameter(q), torch.nn.Parameter(g))
    mixed = [sources[0], sources[1].as_subclass(_Sub), sources[2]]
    assert not da.native_eager(mixed, q, g)
    assert not da.native_eager(sources, q.as_subclass(_Sub), g)
    assert not da.native_eager(sources, q, g.as_subclass(_Sub))
    assert not da.native_eager([sources[0], sources[1].to_sparse(), sources[2]], q, g)

    def entry(*args):
        raise AssertionError("a subclass reached the native eager entry")

    monkeypatch.setattr(da, "_ENTRY", [entry])
    want = ref64(sources, q, g, 1e-6)
    assert rel(depth_attention(mixed, q, g, eps=1e-6), want) < 1e-5
    assert rel(da.depth_attention_call(mixed, q, g, 1e-6, 1.0), want) < 1e-5
    assert rel(depth_attention(sources, q.as_subclass(_Sub), g, eps=1e-6), want) < 1e-5
