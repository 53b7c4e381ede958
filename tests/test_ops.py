"""Parity tests for ``attnres::depth_attention`` and its analytic backward (SPEC.md sections 2, 7).

* the op against a float64 autograd reference, forward and backward, on fresh random inputs:
  ||out - ref|| / ||ref|| < 1e-5 in float32 and < 1e-2 in bfloat16; NaN never passes;
* agreement with fla-core's ``naive_attnres`` (written by one of the paper's authors);
* gradcheck in float64 through the custom op; ``torch.library.opcheck`` on both ops;
* bad inputs raise errors naming the argument; a zero query gives the uniform mean.
"""

from __future__ import annotations

import pytest
import torch

from attnres_compile.ops import depth_attention, depth_attention_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DIMS = [1, 48, 100, 128]
NUM_SOURCES = list(range(1, 10))
LEADING = [(), (3,), (2, 5)]


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Norm-wise relative error; NaN/inf in either side fails."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the op's result"
    assert torch.isfinite(ref).all(), f"{what}: non-finite values in the reference"
    ref = ref.double()
    err = (out.double() - ref).norm().item()
    norm = ref.norm().item()
    assert norm > 0, f"{what}: reference is all zero, relative error undefined"
    assert err / norm < tol, f"{what}: relative error {err / norm:.3e} >= {tol:g}"


def make_inputs(lead, dim, m, dtype, seed):
    """Sources ``[*lead, D]`` x M, a non-zero query and gain, all of ``dtype``, and eps.

    For D = 1 the RMS of a scalar is |v|, so with a tiny eps every key is sign(v) and the
    query/gain gradients are pure cancellation (no float32 code can meet 1e-5 on them).
    D = 1 therefore uses eps = 1 and positive log-normal sources (so keys spread over (0, 1)
    and the output is a sum of positive terms), which keeps every quantity well-conditioned
    while still exercising the single-feature edge case.
    """
    gen = torch.Generator().manual_seed(seed)
    if dim == 1:
        sources = [torch.randn(*lead, dim, generator=gen).exp() for _ in range(m)]
        eps = 1.0
    else:
        sources = [torch.randn(*lead, dim, generator=gen) for _ in range(m)]
        eps = 1e-6 if m % 2 else 1e-2  # a visible eps on half the cases, so eps bugs show
    query = 0.5 * torch.randn(dim, generator=gen)
    gain = 1.0 + 0.1 * torch.randn(dim, generator=gen)
    grad_out = torch.randn(*lead, dim, generator=gen)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return [cast(s) for s in sources], cast(query), cast(gain), cast(grad_out), eps


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run_op(sources, query, gain, grad_out, eps, scale):
    srcs = [leaf(s) for s in sources]
    q, g = leaf(query), leaf(gain)
    out = depth_attention(srcs, q, g, eps=eps, scale=scale)
    out.backward(grad_out)
    return out, [s.grad for s in srcs], q.grad, g.grad


def run_reference64(sources, query, gain, grad_out, eps, scale):
    srcs = [leaf(s.double()) for s in sources]
    q, g = leaf(query.double()), leaf(gain.double())
    out = depth_attention_reference(srcs, q, g, eps=eps, scale=scale)
    out.backward(grad_out.double())
    return out, [s.grad for s in srcs], q.grad, g.grad


# --------------------------------------------------------------------------------------------
# (a) op vs float64 reference, forward and backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale_mode", ["one", "M"])
@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "x".join(map(str, s)) or "none")
@pytest.mark.parametrize("M", NUM_SOURCES)
@pytest.mark.parametrize("D", DIMS)
def test_parity_with_float64_reference(D, M, lead, scale_mode, dtype):
    scale = 1.0 if scale_mode == "one" else float(M)
    seed = 100_000 * D + 1_000 * M + 10 * len(lead) + (dtype == torch.bfloat16)
    sources, query, gain, grad_out, eps = make_inputs(lead, D, M, dtype, seed)
    tol = TOL[dtype]

    out, g_src, g_q, g_g = run_op(sources, query, gain, grad_out, eps, scale)
    ref, r_src, r_q, r_g = run_reference64(sources, query, gain, grad_out, eps, scale)

    assert out.dtype == dtype and out.shape == (*lead, D) and out.is_contiguous()
    assert_close(out, ref, tol, "output")
    for j, (a, b) in enumerate(zip(g_src, r_src)):
        assert a.dtype == dtype
        assert_close(a, b, tol, f"grad of sources[{j}]")
    assert g_q.dtype == dtype and g_g.dtype == dtype
    if M == 1:
        # One source: alpha == 1 whatever the logits, so query and gain get exactly zero grad.
        assert torch.equal(g_q, torch.zeros_like(g_q)) and torch.equal(g_g, torch.zeros_like(g_g))
        assert r_q.abs().max() == 0 and r_g.abs().max() == 0
    else:
        assert_close(g_q, r_q, tol, "grad of query")
        assert_close(g_g, r_g, tol, "grad of norm_weight")


@pytest.mark.parametrize("M", [1, 4])
def test_single_source_is_scaled_identity(M):
    sources, query, gain, _, eps = make_inputs((2, 3), 16, 1, torch.float32, seed=7)
    out = depth_attention(sources, query, gain, eps=eps, scale=float(M))
    torch.testing.assert_close(out, M * sources[0], rtol=1e-6, atol=0)
    assert out.data_ptr() != sources[0].data_ptr()


def test_noncontiguous_sources_and_expanded_grad():
    """Transposed sources, expanded grad_out (from .sum()), mixed requires_grad."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(48, 6, generator=gen) for _ in range(3)]
    query = 0.5 * torch.randn(48, generator=gen)
    gain = 1.0 + 0.1 * torch.randn(48, generator=gen)

    srcs = [leaf(b).t() for b in base]  # [6, 48], non-contiguous views of leaves
    leaves_op = [s._base for s in srcs]
    q = leaf(query)
    out = depth_attention(srcs, q, gain, eps=1e-5, scale=3.0)  # gain does not require grad
    assert out.is_contiguous()
    out.sum().backward()  # grad_out is an expanded scalar

    r_srcs = [leaf(b.double()) for b in base]
    r_q = leaf(query.double())
    ref = depth_attention_reference([s.t() for s in r_srcs], r_q, gain.double(), eps=1e-5, scale=3.0)
    ref.sum().backward()

    assert_close(out, ref, 1e-5, "output")
    for j in range(3):
        assert_close(leaves_op[j].grad, r_srcs[j].grad, 1e-5, f"grad of sources[{j}]")
    assert_close(q.grad, r_q.grad, 1e-5, "grad of query")
    assert gain.grad is None


def test_grads_only_where_needed():
    sources, query, gain, grad_out, eps = make_inputs((4,), 32, 3, torch.float32, seed=11)
    s0 = leaf(sources[0])
    g = leaf(gain)
    out = depth_attention([s0, sources[1], sources[2]], query, g, eps=eps)
    grads = torch.autograd.grad(out, [s0, g], grad_out)
    _, r_src, _, r_g = run_reference64(sources, query, gain, grad_out, eps, 1.0)
    assert_close(grads[0], r_src[0], 1e-5, "grad of sources[0]")
    assert_close(grads[1], r_g, 1e-5, "grad of norm_weight")

    with torch.no_grad():  # no autograd graph at all
        assert depth_attention([s0, s0], query, g, eps=eps).grad_fn is None


# --------------------------------------------------------------------------------------------
# (b) agreement with fla-core's naive_attnres
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,D,M", [((), 64, 1), ((5,), 48, 3), ((2, 7), 128, 6), ((3, 4), 100, 9)])
def test_matches_fla_naive_attnres(lead, D, M, dtype):
    naive = pytest.importorskip("fla.ops.attnres.naive").naive_attnres
    sources, query, gain, _, _ = make_inputs(lead, D, M, dtype, seed=D + M)
    eps = 1e-6
    ours = depth_attention(sources, query, gain, eps=eps)
    theirs = naive(query, sources, gain, rms_eps=eps)
    assert ours.dtype == theirs.dtype == dtype
    # Both compute in float32 and cast once: float32 agrees to rounding, bfloat16 to one ulp.
    assert_close(ours, theirs, 1e-6 if dtype == torch.float32 else 1e-2, "output vs fla naive_attnres")


# --------------------------------------------------------------------------------------------
# (c) gradcheck in float64 through the custom op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead,D,M,scale", [((), 5, 1, 1.0), ((), 6, 3, 3.0), ((3,), 4, 2, 1.0), ((2, 2), 5, 3, 0.5)])
def test_gradcheck_float64(lead, D, M, scale):
    gen = torch.Generator().manual_seed(M * 31 + D)
    sources = [torch.randn(*lead, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(M)]
    query = (0.5 * torch.randn(D, generator=gen, dtype=torch.float64)).requires_grad_()
    gain = (1 + 0.1 * torch.randn(D, generator=gen, dtype=torch.float64)).requires_grad_()

    def fn(*args):
        return torch.ops.attnres.depth_attention(list(args[:M]), args[M], args[M + 1], 1e-6, scale)

    assert torch.autograd.gradcheck(fn, (*sources, query, gain), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# (d) torch.library.opcheck (schema, fake tensor, autograd registration, aot_autograd dynamic)
# --------------------------------------------------------------------------------------------


def _opcheck_samples():
    gen = torch.Generator().manual_seed(5)
    out = []
    for lead, D, M, dtype, scale, grad in [
        ((2, 3), 16, 3, torch.float32, 3.0, True),
        ((), 8, 1, torch.float32, 1.0, True),
        ((4,), 12, 5, torch.bfloat16, 1.0, False),
        ((2, 2, 2), 10, 2, torch.float64, 2.0, True),
    ]:
        srcs = [torch.randn(*lead, D, generator=gen).to(dtype).requires_grad_(grad) for _ in range(M)]
        q = (0.5 * torch.randn(D, generator=gen)).to(dtype).requires_grad_(grad)
        g = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype).requires_grad_(grad)
        out.append((lead, D, srcs, q, g, scale))
    # non-contiguous (transposed) sources: the real kernel must return the contiguous layout
    # the fake kernel promises
    srcs = [torch.randn(9, 4, generator=gen).t().requires_grad_() for _ in range(3)]
    out.append(((4,), 9, srcs, torch.randn(9, generator=gen), torch.ones(9), 3.0))
    return out


@pytest.mark.parametrize("sample", range(5))
def test_opcheck_forward(sample):
    _, _, srcs, q, g, scale = _opcheck_samples()[sample]
    result = torch.library.opcheck(torch.ops.attnres.depth_attention.default, (srcs, q, g, 1e-6, scale))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("sample", range(5))
def test_opcheck_backward(sample):
    lead, D, srcs, q, g, scale = _opcheck_samples()[sample]
    srcs = [s.detach() for s in srcs]
    grad_out = torch.randn(*lead, D).to(srcs[0].dtype)
    if sample in (1, 4):
        grad_out = torch.ones(()).to(srcs[0].dtype).expand(*lead, D)  # as produced by .sum()
    # No requires_grad here: the backward op has no autograd formula (no double backward),
    # so opcheck's aot_autograd test would fail trying to differentiate it.
    args = (grad_out, srcs, q.detach(), g.detach(), 1e-6, scale)
    result = torch.library.opcheck(torch.ops.attnres.depth_attention_backward.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_aot_autograd_sees_one_node_each_way():
    from functorch.compile import aot_function, make_boxed_func

    seen = []

    def compiler(gm, _):
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm)

    sources, query, gain, grad_out, eps = make_inputs((3,), 8, 3, torch.float32, seed=2)
    srcs = [leaf(s) for s in sources]
    fn = aot_function(lambda a, b, c, q, g: depth_attention([a, b, c], q, g, eps=eps, scale=3.0),
                      fw_compiler=compiler, bw_compiler=compiler)
    fn(*srcs, leaf(query), leaf(gain)).backward(grad_out)
    fw, bw = seen
    assert fw == [torch.ops.attnres.depth_attention.default]
    assert [t for t in bw if t.__name__ != "getitem"] == [torch.ops.attnres.depth_attention_backward.default]


# --------------------------------------------------------------------------------------------
# (e) bad input
# --------------------------------------------------------------------------------------------


def _good():
    return [torch.randn(2, 8), torch.randn(2, 8)], torch.zeros(8), torch.ones(8)


@pytest.mark.parametrize(
    "case,exc,needle",
    [
        ("empty", ValueError, "sources"),
        ("not_list", TypeError, "sources"),
        ("not_tensor", TypeError, "sources[1]"),
        ("shape_mismatch", ValueError, "sources[1]"),
        ("dtype_mismatch", TypeError, "sources[1]"),
        ("zero_dim", ValueError, "sources[0]"),
        ("int_sources", TypeError, "sources"),
        ("query_shape", ValueError, "query"),
        ("query_2d", ValueError, "query"),
        ("norm_weight_shape", ValueError, "norm_weight"),
        ("query_not_tensor", TypeError, "query"),
        ("eps_zero", ValueError, "eps"),
        ("eps_negative", ValueError, "eps"),
        ("scale_nan", ValueError, "scale"),
    ],
)
def test_bad_input_raises_naming_argument(case, exc, needle):
    sources, query, gain = _good()
    eps, scale = 1e-6, 1.0
    if case == "empty":
        sources = []
    elif case == "not_list":
        sources = sources[0]
    elif case == "not_tensor":
        sources = [sources[0], 3.0]
    elif case == "shape_mismatch":
        sources = [sources[0], torch.randn(3, 8)]
    elif case == "dtype_mismatch":
        sources = [sources[0], sources[1].double()]
    elif case == "zero_dim":
        sources = [torch.tensor(1.0)]
    elif case == "int_sources":
        sources = [torch.ones(2, 8, dtype=torch.long)]
    elif case == "query_shape":
        query = torch.zeros(7)
    elif case == "query_2d":
        query = torch.zeros(8, 1)
    elif case == "norm_weight_shape":
        gain = torch.ones(2, 8)
    elif case == "query_not_tensor":
        query = [0.0] * 8
    elif case == "eps_zero":
        eps = 0.0
    elif case == "eps_negative":
        eps = -1e-6
    elif case == "scale_nan":
        scale = float("nan")
    with pytest.raises(exc) as info:
        depth_attention(sources, query, gain, eps=eps, scale=scale)
    assert needle in str(info.value)


def test_op_called_directly_validates_too():
    sources, query, gain = _good()
    with pytest.raises(ValueError, match="query"):
        torch.ops.attnres.depth_attention([*sources], torch.zeros(3), gain, 1e-6, 1.0)
    with pytest.raises(ValueError, match="sources"):
        torch.ops.attnres.depth_attention([], query, gain, 1e-6, 1.0)


# --------------------------------------------------------------------------------------------
# (f) zero query: uniform weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("scale_mode", ["one", "M"])
def test_zero_query_gives_uniform_mean(M, scale_mode, dtype):
    scale = 1.0 if scale_mode == "one" else float(M)
    gen = torch.Generator().manual_seed(M)
    sources = [torch.randn(3, 4, 32, generator=gen).to(dtype) for _ in range(M)]
    gain = (1 + 0.1 * torch.randn(32, generator=gen)).to(dtype)
    out = depth_attention(sources, torch.zeros(32, dtype=dtype), gain, eps=1e-6, scale=scale)
    expected = scale * torch.stack([s.double() for s in sources]).mean(0)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-14}[dtype]
    assert_close(out, expected, tol, "zero-query output")
    if scale_mode == "M" and dtype == torch.float32:
        # Exact retrofit: M * mean == sum of the sources (the original stream) to rounding.
        torch.testing.assert_close(out, sum(sources), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lead", [(), (4,)], ids=["none", "4"])
def test_peaked_softmax_gradients_stay_accurate(lead):
    """Source 0 aligned with the query: 1 - alpha_0 is 1e-9..1e-8 on every token (float32 rounds
    alpha_0 to 1). A naive ds_j = alpha_j * (da_j - sum_i alpha_i da_i) cancels to float32
    noise there; the op measures da from the winning source instead."""
    sources, query, gain, grad_out, eps = make_inputs(lead, 64, 4, torch.float32, seed=17)
    u = query * gain
    sources[0] = sources[0] + 1.2 * u / u.pow(2).mean().sqrt()
    out, g_src, g_q, g_g = run_op(sources, query, gain, grad_out, eps, 1.0)
    ref, r_src, r_q, r_g = run_reference64(sources, query, gain, grad_out, eps, 1.0)
    assert_close(out, ref, 1e-5, "output")
    for j, (a, b) in enumerate(zip(g_src, r_src)):
        assert_close(a, b, 1e-5, f"grad of sources[{j}]")
    assert_close(g_q, r_q, 1e-5, "grad of query")
    assert_close(g_g, r_g, 1e-5, "grad of norm_weight")
