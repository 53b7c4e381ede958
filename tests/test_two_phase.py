"""Two-phase Block AttnRes inference (SPEC.md section 3, PAPER.md section d).

* the plain-PyTorch reference of Algorithm 1 equals the plain depth-attention op to float32
  rounding, for several numbers of completed blocks N and sites S;
* ``attnres::depth_attention_phase1`` / ``_phase2`` on every path (compiled CPU kernels, plain
  PyTorch, generated Triton kernels in the interpreter) against the float64 reference, float32 /
  bfloat16 / float16; phase 2 with no partial is ``o / z``;
* a whole Block AttnRes schedule served two-phase equals the plain ops site by site;
* bytes moved by the phase 1 / phase 2 Triton kernels, counted in the interpreter;
* ``torch.library.opcheck`` on both ops; bad input raises errors naming the argument.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from attnres_compile.ops import (
    depth_attention,
    depth_attention_phase1,
    depth_attention_phase2,
    depth_attention_reference,
    two_phase_block,
    two_phase_reference,
)
from attnres_compile.ops.kernels import dispatch as _dispatch
from attnres_compile.ops.depth_attention import plain_cpu_path

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values"
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_block(n, s, d, dtype, seed, lead=(2, 7)):
    """N completed blocks, S sites (queries/gains), S partials (None for the first site)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(*lead, d, generator=gen).to(dtype) for _ in range(n)]
    queries = (0.5 * torch.randn(s, d, generator=gen)).to(dtype)
    gains = (1 + 0.1 * torch.randn(s, d, generator=gen)).to(dtype)
    partials = [None] + [torch.randn(*lead, d, generator=gen).to(dtype) for _ in range(s - 1)]
    return blocks, queries, gains, partials


def expected64(blocks, queries, gains, partials, eps, scale):
    out = []
    for l, p in enumerate(partials):
        srcs = [b.double() for b in blocks] + ([p.double()] if p is not None else [])
        out.append(depth_attention_reference(srcs, queries[l].double(), gains[l].double(), eps=eps, scale=scale))
    return out


@pytest.fixture(params=["cpu_kernels", "plain", "triton"])
def path(request):
    """Which implementation the ops run on CPU tensors."""
    if request.param == "plain":
        with plain_cpu_path():
            yield request.param
    elif request.param == "triton":
        pytest.importorskip("triton")
        from attnres_compile.ops.kernels.triton_interpret import round_bf16_to_nearest
        from attnres_compile.ops.kernels.triton_launch import interpreter_enabled

        if not interpreter_enabled():
            pytest.skip("needs TRITON_INTERPRET=1 (no GPU here)")

        with _dispatch.triton_on_cpu(), round_bf16_to_nearest():
            yield request.param
    else:
        yield request.param


# --------------------------------------------------------------------------------------------
# (a) the reference algorithm equals the plain op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,s", [(1, 1), (1, 3), (2, 2), (4, 4), (8, 16), (9, 3)])
def test_reference_two_phase_equals_plain_op(n, s):
    blocks, queries, gains, partials = make_block(n, s, 48, torch.float32, seed=10 * n + s)
    hs = two_phase_reference(blocks, queries, gains, partials, eps=1e-6, scale=2.0)
    with plain_cpu_path():
        for l, (h, p) in enumerate(zip(hs, partials)):
            srcs = blocks + ([p] if p is not None else [])
            plain = depth_attention(srcs, queries[l], gains[l], eps=1e-6, scale=2.0)
            assert rel_err(h, plain) < 2e-6, f"site {l}"


# --------------------------------------------------------------------------------------------
# (b) the ops on every path vs float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,s,d", [(1, 2, 5), (2, 3, 48), (3, 1, 100), (5, 4, 33), (9, 2, 48)], ids=str)
def test_ops_match_reference(n, s, d, dtype, path):
    blocks, queries, gains, partials = make_block(n, s, d, dtype, seed=100 * n + 10 * s + d)
    eps, scale = (1e-6, 1.0) if n % 2 else (1e-2, float(n + 1))
    hs = two_phase_block(blocks, queries, gains, partials, eps=eps, scale=scale)
    for l, (h, ref) in enumerate(zip(hs, expected64(blocks, queries, gains, partials, eps, scale))):
        assert h.dtype == dtype and h.is_contiguous()
        assert rel_err(h, ref) < TOL[dtype], f"site {l} ({path})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_phase1_outputs(dtype, path):
    blocks, queries, gains, _ = make_block(3, 2, 40, dtype, seed=7, lead=(5,))
    o, m, z = depth_attention_phase1(blocks, queries, gains, eps=1e-6)
    assert o.shape == (2, 5, 40) and o.dtype == dtype
    assert m.shape == z.shape == (2, 5) and m.dtype == z.dtype == torch.float32
    V = torch.stack([b.double() for b in blocks])
    for l in range(2):
        u = queries[l].double() * gains[l].double()
        s = (V * u).sum(-1) / torch.sqrt(V.pow(2).mean(-1) + 1e-6)
        m_ref = s.max(0).values
        e = torch.exp(s - m_ref)
        assert rel_err(m[l], m_ref) < 1e-5
        assert rel_err(z[l], e.sum(0)) < 1e-5
        assert rel_err(o[l], (e.unsqueeze(-1) * V).sum(0)) < TOL[dtype]
        assert (z[l] >= 1 - 1e-6).all()  # the max term contributes exp(0) = 1


def test_phase2_without_partial_is_o_over_z(path):
    blocks, queries, gains, _ = make_block(4, 1, 24, torch.float32, seed=3)
    o, m, z = depth_attention_phase1(blocks, queries, gains, eps=1e-6)
    h = depth_attention_phase2(o[0], m[0], z[0], None, queries[0], gains[0], eps=1e-6, scale=3.0)
    torch.testing.assert_close(h, 3.0 * o[0] / z[0].unsqueeze(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path_name", ["cpu_kernels", "plain"])
def test_block_schedule_served_two_phase(path_name):
    """A Block AttnRes schedule (S sublayers per block) served two-phase equals the plain op."""
    gen = torch.Generator().manual_seed(0)
    d, num_layers, block = 32, 8, 4
    weights = [0.3 * torch.randn(d, d, generator=gen) for _ in range(num_layers)]
    queries = 0.5 * torch.randn(num_layers, d, generator=gen)
    gains = 1 + 0.1 * torch.randn(num_layers, d, generator=gen)

    def run(two_phase: bool):
        emb = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(1))
        blocks, partial, outs, stats = [], emb, [], None
        for l in range(num_layers):
            if l % block == 0:
                blocks.append(partial)
                partial = None
                lo = l
                hi = min(l + block, num_layers)
                if two_phase:
                    stats = depth_attention_phase1(blocks, queries[lo:hi], gains[lo:hi], eps=1e-6)
            if two_phase:
                o, m, z = (t[l - lo] for t in stats)
                h = depth_attention_phase2(o, m, z, partial, queries[l], gains[l], eps=1e-6)
            else:
                srcs = blocks + ([partial] if partial is not None else [])
                h = depth_attention(srcs, queries[l], gains[l], eps=1e-6)
            out = torch.tanh(h @ weights[l])
            outs.append(h)
            partial = out if partial is None else partial + out
        return outs

    ctx = plain_cpu_path() if path_name == "plain" else torch.no_grad()
    with ctx:
        plain, fast = run(False), run(True)
    for l, (a, b) in enumerate(zip(fast, plain)):
        assert rel_err(a, b) < 1e-5, f"sublayer {l}"


# --------------------------------------------------------------------------------------------
# (c) bytes moved by the Triton phase kernels
# --------------------------------------------------------------------------------------------


def _needs_interpreter() -> None:
    pytest.importorskip("triton")
    from attnres_compile.ops.kernels.triton_launch import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (no GPU here)")


@pytest.mark.parametrize("variant", ["resident", "twopass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,s,d,t,bt,p", [(1, 1, 5, 7, 4, 2), (3, 4, 100, 13, 4, 3), (5, 2, 48, 37, 8, 4)])
def test_phase1_bytes(n, s, d, t, bt, p, dtype, variant):
    _needs_interpreter()
    from attnres_compile.ops.kernels import triton_launch as tk
    from attnres_compile.ops.kernels.triton_interpret import count_bytes

    blocks, queries, gains, _ = make_block(n, s, d, dtype, seed=n, lead=(t,))
    e = blocks[0].element_size()
    tiles = -(-t // bt)
    named = {f"blk{j}": b for j, b in enumerate(blocks)}
    named.update(queries=queries, gains=gains)
    with count_bytes(named, track_elements=True) as c:
        o, m, z = tk.phase1(blocks, queries, gains, 1e-6, block_t=bt, num_programs=p, variant=variant)
    reads = 1 if variant == "resident" else 2
    for j in range(n):  # one read of every block serves all S sites (twice when D-chunked)
        assert c.loaded(f"blk{j}") == reads * t * d * e
        assert c.distinct_loaded_elements(f"blk{j}") == t * d
    # the S queries/gains are read per token tile (they are S x D: cache-resident on a GPU)
    assert c.loaded("queries") == c.loaded("gains") == tiles * s * d * e
    assert c.total_loaded == reads * n * t * d * e + 2 * tiles * s * d * e
    assert c.total_stored == s * t * d * e + 2 * s * t * 4  # o_l (D) + m_l, z_l per site and token
    ref = two_phase_reference(blocks, queries, gains, [None] * s, eps=1e-6)
    for l in range(s):
        assert rel_err(o[l] / z[l].unsqueeze(-1).to(o.dtype), ref[l]) < TOL[dtype]


@pytest.mark.parametrize("with_partial", [True, False], ids=["partial", "first_site"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_phase2_bytes(with_partial, dtype):
    _needs_interpreter()
    from attnres_compile.ops.kernels import triton_launch as tk
    from attnres_compile.ops.kernels.triton_interpret import count_bytes

    t, d, bt, p = 13, 100, 4, 3
    blocks, queries, gains, partials = make_block(2, 2, d, dtype, seed=5, lead=(t,))
    o, m, z = tk.phase1(blocks, queries, gains, 1e-6)
    partial = partials[1] if with_partial else None
    e = o.element_size()
    programs = min(p, -(-t // bt))
    named = {"o": o[1], "m": m[1], "z": z[1], "query": queries[1], "gain": gains[1]}
    if with_partial:
        named["partial"] = partial
    with count_bytes(named, track_elements=True) as c:
        h = tk.phase2(o[1], m[1], z[1], partial, queries[1], gains[1], 1e-6, 1.0, block_t=bt, num_programs=p)
    assert c.loaded("o") == t * d * e and c.distinct_loaded_elements("o") == t * d
    assert c.loaded("z") == t * 4
    if with_partial:  # reads o, partial (2D) + m, z; writes h (D)
        assert c.loaded("partial") == t * d * e and c.loaded("m") == t * 4
        assert c.loaded("query") == c.loaded("gain") == programs * d * e
        assert c.total_loaded == 2 * t * d * e + 2 * t * 4 + 2 * programs * d * e
    else:  # reads o (D) + z; writes h (D)
        assert c.total_loaded == t * d * e + t * 4
    assert c.total_stored == t * d * e
    srcs = blocks + ([partial] if with_partial else [])
    ref = depth_attention_reference([x.double() for x in srcs], queries[1].double(), gains[1].double(), eps=1e-6)
    assert rel_err(h, ref) < TOL[dtype]


# --------------------------------------------------------------------------------------------
# (d) opcheck and bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_opcheck(dtype):
    blocks, queries, gains, partials = make_block(3, 2, 16, dtype, seed=2, lead=(2, 3))
    r1 = torch.library.opcheck(torch.ops.attnres.depth_attention_phase1.default, (blocks, queries, gains, 1e-6))
    assert all(v == "SUCCESS" for v in r1.values()), r1
    o, m, z = torch.ops.attnres.depth_attention_phase1(blocks, queries, gains, 1e-6)
    for partial in (partials[1], None):
        args = (o[0], m[0], z[0], partial, queries[0], gains[0], 1e-6, 2.0)
        r2 = torch.library.opcheck(torch.ops.attnres.depth_attention_phase2.default, args)
        assert all(v == "SUCCESS" for v in r2.values()), r2


def test_float64_stays_float64():
    blocks, queries, gains, partials = make_block(2, 2, 12, torch.float64, seed=1)
    o, m, z = depth_attention_phase1(blocks, queries, gains, eps=1e-6)
    assert o.dtype == m.dtype == z.dtype == torch.float64
    hs = two_phase_block(blocks, queries, gains, partials, eps=1e-6)
    for h, ref in zip(hs, expected64(blocks, queries, gains, partials, 1e-6, 1.0)):
        assert rel_err(h, ref) < 1e-12


def _p1_args():
    blocks, queries, gains, _ = make_block(2, 2, 8, torch.float32, seed=0, lead=(3,))
    return blocks, queries, gains


@pytest.mark.parametrize(
    "case,exc,needle",
    [
        ("empty", ValueError, "blocks"),
        ("not_list", TypeError, "blocks"),
        ("mismatch", ValueError, "blocks[1]"),
        ("queries_1d", ValueError, "queries"),
        ("gains_shape", ValueError, "gains"),
        ("eps", ValueError, "eps"),
    ],
)
def test_phase1_bad_input(case, exc, needle):
    blocks, queries, gains = _p1_args()
    eps = 1e-6
    if case == "empty":
        blocks = []
    elif case == "not_list":
        blocks = blocks[0]
    elif case == "mismatch":
        blocks = [blocks[0], torch.randn(4, 8)]
    elif case == "queries_1d":
        queries = queries[0]
    elif case == "gains_shape":
        gains = gains[:1]
    elif case == "eps":
        eps = 0.0
    with pytest.raises(exc) as info:
        depth_attention_phase1(blocks, queries, gains, eps=eps)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "case,exc,needle",
    [("m_shape", ValueError, "m"), ("partial", ValueError, "partial"), ("query", ValueError, "query"),
     ("scale", ValueError, "scale")],
)
def test_phase2_bad_input(case, exc, needle):
    blocks, queries, gains = _p1_args()
    o, m, z = depth_attention_phase1(blocks, queries, gains, eps=1e-6)
    o, m, z, partial, q, g, scale = o[0], m[0], z[0], blocks[0], queries[0], gains[0], 1.0
    if case == "m_shape":
        m = m[:2]
    elif case == "partial":
        partial = partial.double()
    elif case == "query":
        q = q[:3]
    elif case == "scale":
        scale = float("inf")
    with pytest.raises(exc) as info:
        depth_attention_phase2(o, m, z, partial, q, g, eps=1e-6, scale=scale)
    assert needle in str(info.value)
