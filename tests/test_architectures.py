"""convert() across architectures (tests/models.py `architectures()`), shapes and dtypes.

For every architecture: the chains and sites found, step-0 equivalence in exact mode (and
scale mode where the chains are PreNorm), a gradient for every new parameter, and the adds
left alone checked against what the architecture really has: every add of the captured graph
is either a residual link or listed with its reason, and the reasons are counted by kind.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import attnres_compile as ac
from attnres_compile.conversion.capture import capture
from attnres_compile.conversion.find_chains import analyse_streams
from attnres_compile.conversion.graph_utils import ADD_OPS, INPLACE_ADD_OPS

from .models import PreActResNet, TinyPreNormLM, architectures, main_output, reason_kind

ARCH = architectures()

# What each architecture really has. chains: sublayers per chain (one per attention, MLP,
# cross-attention; one per layer for parallel attention + MLP). left: adds left alone, by kind.
EXPECT = {
    "gpt2": dict(chains=[6], scale=True,
                 left={"integer": 3, "broadcast": 1, "elementwise": 3, "scalar": 3}),  # GELU-tanh: x + c x^3, 1 + tanh
    "llama": dict(chains=[4], scale=True, left={"integer": 3, "eps": 5, "rotary": 4}),
    "mistral": dict(chains=[4], scale=True, left={"integer": 3, "eps": 5, "rotary": 4}),
    "qwen2": dict(chains=[4], scale=True, left={"integer": 3, "eps": 5, "rotary": 4}),
    "gpt_neox_parallel": dict(chains=[2], scale=True, left={"integer": 3, "rotary": 4, "independent": 2}),
    "vit": dict(chains=[6], scale=True, left={"integer": 2, "broadcast": 1}),
    "t5": dict(chains=[4, 6], scale=True, left={"integer": 12, "non-floating": 1, "eps": 12}),
    "preact_resnet_bn": dict(chains=[3], scale=False, left={"buffer": 7}),  # BN num_batches_tracked += 1
    "preact_resnet_gn": dict(chains=[3], scale=True, left={}),
    "llama_hidden_states": dict(chains=[4], scale=False, left={"integer": 3, "eps": 5, "rotary": 4}),
}
CONVERTED = list(EXPECT)

kind = reason_kind


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a.float()).all(), "non-finite output"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def call_kwargs(kwargs: dict) -> dict:
    """What a converted model is called with: the original's keywords, all of them."""
    return dict(kwargs)


def outputs(out) -> dict[str, torch.Tensor]:
    """Every tensor worth comparing: the main output plus hidden states and encoder output."""
    got = {"main": main_output(out)}
    for i, h in enumerate(getattr(out, "hidden_states", None) or ()):
        got[f"hidden_states[{i}]"] = h
    enc = getattr(out, "encoder_last_hidden_state", None)
    if enc is not None:
        got["encoder_last_hidden_state"] = enc
    return got


@pytest.fixture(scope="module", params=CONVERTED)
def arch(request):
    name = request.param
    spec = ARCH[name]
    torch.manual_seed(0)
    model = spec["factory"]().eval()
    args, kwargs = spec["args"], spec["kwargs"]
    with torch.no_grad():
        ref = outputs(model(*args, **kwargs))
    exact = ac.convert(model, args, kwargs=kwargs, preserve="exact").eval()
    if EXPECT[name]["scale"]:
        scale = ac.convert(model, args, kwargs=kwargs).eval()
    else:
        with pytest.raises(ac.NoEligibleChainError) as ei:
            ac.convert(model, args, kwargs=kwargs)
        scale = ei.value
    return name, model, args, kwargs, ref, exact, scale


def test_chains_and_sites(arch):
    name, model, args, kwargs, ref, exact, scale = arch
    rep = exact.attnres_report
    assert [c.num_sublayers for c in rep.chains] == EXPECT[name]["chains"], str(rep)
    assert rep.num_sites == sum(n + 1 for n in EXPECT[name]["chains"])
    for c in rep.chains:
        assert [s.name for s in c.sites] == [f"site{i}" for i in range(c.num_sublayers)] + ["final"]
    if name == "gpt_neox_parallel":  # attention + MLP read one stream: one sublayer per layer
        assert rep.num_sites == ARCH[name]["layers"] + 1
        assert [s.module for s in rep.chains[0].sites[:-1]] == ["gpt_neox.layers.0", "gpt_neox.layers.1"]
    if name == "t5":
        enc, dec = rep.chains
        assert all(s.module.startswith("encoder.") for s in enc.sites[:-1])
        assert all(s.module.startswith("decoder.") for s in dec.sites[:-1])
        assert [s.module.rsplit(".", 1)[1] for s in dec.sites[:3]] == ["SelfAttention", "EncDecAttention",
                                                                       "DenseReluDense"]
    if name.startswith("preact_resnet"):  # NCHW: depth attention over the 8 channels
        assert exact.attnres.chain0.final.query.shape == (8,)


def test_exact_equivalence(arch):
    name, model, args, kwargs, ref, exact, scale = arch
    with torch.no_grad():
        got = outputs(exact(*args, **call_kwargs(kwargs)))
    assert got.keys() == ref.keys()
    for key in ref:
        assert rel_err(got[key], ref[key]) <= 1e-5, key
    if name == "llama_hidden_states":
        assert len(got) == 1 + ARCH[name]["layers"] + 1


def test_scale_mode(arch):
    name, model, args, kwargs, ref, exact, scale = arch
    if not EXPECT[name]["scale"]:
        msg = str(scale)
        assert "not PreNorm" in msg and "preserve='exact'" in msg, msg
        if name == "preact_resnet_bn":
            assert "batch_norm" in msg and "running statistics" in msg
        if name == "llama_hidden_states":
            assert "outside the chain" in msg
        return
    with torch.no_grad():
        got = main_output(scale(*args, **call_kwargs(kwargs)))
    assert rel_err(got, ref["main"]) <= 1e-3


def test_every_new_parameter_gets_gradient(arch):
    name, model, args, kwargs, ref, exact, scale = arch
    conv = copy.deepcopy(exact).train()
    out = main_output(conv(*args, **call_kwargs(kwargs)))
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum()
    loss.backward()
    params = ac.attnres_parameters(conv)
    assert len(params) == 2 * sum(n for n in EXPECT[name]["chains"])  # all sites but site0
    for n, p in params.items():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if n.endswith(".query"):
            assert p.grad.abs().sum() > 0, n


def test_adds_left_alone_match_the_architecture(arch):
    name, model, args, kwargs, ref, exact, scale = arch
    rep = exact.attnres_report
    assert all(la.reason for la in rep.left_alone)
    assert dict(Counter(kind(la.reason) for la in rep.left_alone)) == EXPECT[name]["left"], \
        [(la.node, la.reason) for la in rep.left_alone]
    # Nothing silently missing: every add of the graph is a residual link or left alone.
    graph = capture(model, args, kwargs, training=True, dynamic=False).module.graph
    an = analyse_streams(graph)
    adds = {n for n in graph.nodes if n.op == "call_function" and (n.target in ADD_OPS or n.target in INPLACE_ADD_OPS)}
    links = {a for c in an.chains for lk in c.links for a in lk.adds}
    left = {la.node for la in an.left_alone}
    assert not links & left
    assert adds == links | left, sorted(n.name for n in adds - links - left)
    assert len(links) == sum(EXPECT[name]["chains"]) + (0 if name != "gpt_neox_parallel" else 0)
    assert len(left) == len(rep.left_alone)


def test_bert_postnorm_refused_with_reasons():
    spec = ARCH["bert"]
    model = spec["factory"]().eval()
    for preserve in ("scale", "exact"):
        with pytest.raises(ac.NoEligibleChainError, match="PostNorm") as ei:
            ac.convert(model, spec["args"], preserve=preserve)
        rep = ei.value.report
        kinds = Counter(kind(la.reason) for la in rep.left_alone)
        assert kinds == Counter({"postnorm": 4, "integer": 2, "broadcast": 1, "independent": 1}), \
            [(la.node, la.reason) for la in rep.left_alone]
        assert len(rep.refused_chains) == 4 and all("PostNorm" in r["reason"] for r in rep.refused_chains)


# -- shapes and dtypes -------------------------------------------------------------------------

def test_other_batch_and_sequence_sizes():
    for name, new_args in [
        ("llama", (torch.randint(0, 64, (3, 11)),)),
        ("vit", (torch.randn(5, 3, 16, 16),)),
        ("preact_resnet_gn", (torch.randn(3, 3, 6, 10),)),
    ]:
        spec = ARCH[name]
        torch.manual_seed(0)
        model = spec["factory"]().eval()
        conv = ac.convert(model, spec["args"], kwargs=spec["kwargs"], preserve="exact").eval()
        with torch.no_grad():
            ref = main_output(model(*new_args, **spec["kwargs"]))
            got = main_output(conv(*new_args))
        assert got.shape == ref.shape and rel_err(got, ref) <= 1e-5, name


def test_static_capture_still_runs_other_sizes():
    """dynamic=False only changes the capture the plan is made from: the converted model runs
    the model's own code, so it takes any size the model takes."""
    model = TinyPreNormLM().eval()
    idx = torch.randint(0, 37, (2, 9))
    conv = ac.convert(model, (idx,), preserve="exact", dynamic=False).eval()
    assert rel_err(conv(idx), model(idx)) <= 1e-5
    other = torch.randint(0, 37, (3, 5))
    assert rel_err(conv(other), model(other)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama", "gpt2", "preact_resnet_gn"])
def test_low_precision_models_convert_and_run(name, dtype):
    spec = ARCH[name]
    torch.manual_seed(0)
    model = spec["factory"]().eval().to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in spec["args"])
    with torch.no_grad():
        ref = main_output(model(*args, **spec["kwargs"]))
    conv = ac.convert(model, args, kwargs=spec["kwargs"], preserve="exact").eval()
    assert all(p.dtype == dtype for p in ac.attnres_parameters(conv).values())
    with torch.no_grad():
        got = main_output(conv(*args))
    assert got.dtype == dtype
    assert norm_rel_err(got, ref) <= 1e-2
    conv.train()
    out = main_output(conv(*args))
    out.float().square().mean().backward()
    for n, p in ac.attnres_parameters(conv).items():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_to_dtype_on_converted_module(dtype):
    """`.to(dtype)` after conversion on a model whose graph has no dtype-valued arguments."""
    torch.manual_seed(0)
    model = TinyPreNormLM().eval()
    idx = torch.randint(0, 37, (2, 9))
    conv = ac.convert(model, (idx,), preserve="exact").eval()
    conv_d = copy.deepcopy(conv).to(dtype)
    assert all(p.dtype == dtype for p in conv_d.parameters())
    ref = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        got, want = conv_d(idx), ref(idx)
    assert got.dtype == dtype
    assert norm_rel_err(got, want) <= (1e-2 if dtype != torch.float64 else 1e-12)
    # and back: the float32 result is the original again
    back = conv_d.to(torch.float32)
    with torch.no_grad():
        assert norm_rel_err(back(idx), model(idx)) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["gpt2", "llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_to_dtype_on_converted_hf_decoder(name, dtype):
    """Hugging Face code casts to the model's dtype and fills masks with finfo.min; after
    `.to(dtype)` the converted model runs that code in the new dtype. Checked against the
    original model cast the same way, there and back (float32 -> dtype -> float32), in both
    modes, without touching the model."""
    spec = ARCH[name]
    torch.manual_seed(0)
    model = spec["factory"]().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = ac.convert(model, spec["args"], kwargs=spec["kwargs"], preserve="exact").eval()
    kw = call_kwargs(spec["kwargs"])
    conv_d = conv.to(dtype)
    assert conv_d is conv and all(p.dtype == dtype for p in conv.parameters())
    ref = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        got, want = main_output(conv(*spec["args"], **kw)), main_output(ref(*spec["args"], **spec["kwargs"]))
    assert got.dtype == dtype
    assert norm_rel_err(got, want) <= (2e-2 if dtype == torch.bfloat16 else 1e-6)
    conv.train()  # gradients in the new dtype
    main_output(conv(*spec["args"], **kw)).float().square().mean().backward()
    for n, p in ac.attnres_parameters(conv).items():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), n
    conv.eval().to(torch.float32)
    ref32 = ref.to(torch.float32)
    with torch.no_grad():
        back, want32 = main_output(conv(*spec["args"], **kw)), main_output(ref32(*spec["args"], **spec["kwargs"]))
    assert back.dtype == torch.float32 and rel_err(back, want32) <= 1e-5
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_to_device_on_converted_hf_decoder():
    """`device=` arguments (arange, masks) follow `.to(device)`: on the meta device the graph runs
    on meta inputs (on CUDA machines also to cuda and back, against the original)."""
    spec = ARCH["llama"]
    torch.manual_seed(0)
    model = spec["factory"]().eval()
    conv = ac.convert(model, spec["args"], kwargs=spec["kwargs"], preserve="exact").eval()
    ids = spec["args"][0]
    meta = copy.deepcopy(conv).to("meta")
    out = main_output(meta(ids.to("meta")))
    assert out.device.type == "meta" and out.shape == main_output(conv(ids)).shape
    if torch.cuda.is_available():
        cuda = copy.deepcopy(conv).cuda()
        with torch.no_grad():
            got = main_output(cuda(ids.cuda()))
            want = main_output(copy.deepcopy(model).cuda()(ids.cuda(), **spec["kwargs"]))
        assert got.is_cuda and rel_err(got.cpu(), want.cpu()) <= 1e-4
        with torch.no_grad():
            assert rel_err(main_output(cuda.cpu()(ids)), main_output(model(ids, **spec["kwargs"]))) <= 1e-5


class _MixedDtypes(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(3))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3))
        self.register_buffer("scale", torch.ones(d, dtype=torch.float64))

    def forward(self, x):
        for n, lin in zip(self.norms, self.lins):
            x = x + lin(n(x))
        return x * self.scale.to(x.dtype)


def test_to_dtype_of_a_mixed_dtype_model_follows_the_original():
    """A model with float32 and float64 tensors: .to(bfloat16) moves both, as on the original
    (the converted model runs the model's own code, casts included)."""
    model = _MixedDtypes().eval()
    x = torch.randn(2, 8)
    conv = ac.convert(model, (x,), preserve="exact", dynamic=False).eval()
    assert rel_err(conv(x), model(x)) <= 1e-5
    low = conv.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters()) and low.scale.dtype == torch.bfloat16
    want = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16())
    assert norm_rel_err(low(x.bfloat16()), want) <= 1e-2


def test_channels_first_conv_stream_attends_over_channels():
    """NCHW streams: sites normalise over the channels (dim 1) of each position, so parameters
    are [C] and any spatial size runs, also with trained (non-zero) queries."""
    torch.manual_seed(0)
    model = PreActResNet(c=8, blocks=3, norm="group").eval()
    conv = ac.convert(model, (torch.randn(2, 3, 8, 8),), preserve="exact").eval()
    with torch.no_grad():
        for site in conv.attnres.chain0.children():
            assert site.query.shape == (8,)
            site.query.normal_()
        for shape in [(2, 3, 8, 8), (1, 3, 5, 12)]:
            x = torch.randn(*shape)
            out = conv(x)
            assert out.shape == (shape[0], 10) and torch.isfinite(out).all()
    graph = torch.export.export(conv, (torch.randn(2, 3, 8, 8),), strict=False).graph
    sites = [n for n in graph.nodes if n.target is torch.ops.attnres.depth_attention.default]
    assert len(sites) == 3  # site1, site2, final (site0 is the identity)
    for n in sites:  # every source is [N, H, W, C]: channels moved last
        assert all(src.meta["val"].shape[-1] == 8 and src.meta["val"].shape[1:3] == (8, 8) for src in n.args[0])


def test_to_dtype_on_converted_vit():
    spec = ARCH["vit"]
    torch.manual_seed(0)
    model = spec["factory"]().eval()
    conv = ac.convert(model, spec["args"], preserve="exact").eval().to(torch.bfloat16)
    x = spec["args"][0].to(torch.bfloat16)
    with torch.no_grad():
        got = main_output(conv(x))
        want = main_output(copy.deepcopy(model).to(torch.bfloat16)(x))
    assert got.dtype == torch.bfloat16 and norm_rel_err(got, want) <= 1e-2



class _TimeConvBlock(torch.nn.Module):
    """Features-last [B, T, D] block with a depthwise conv over time on the transposed tensor."""

    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.conv = torch.nn.Conv1d(d, d, 3, padding=1, groups=d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.out(self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2))


def test_features_last_stream_with_transposed_conv_and_input_as_start():
    """The stream is the model's input (its last dim is Dim.AUTO at capture, specialised by the
    LayerNorm) and a conv runs on a transposed copy: D stays the last dim, even when T == D."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_TimeConvBlock(8) for _ in range(3)]).eval()
    x = torch.randn(2, 8, 8)
    for dynamic in (False, True):
        conv = ac.convert(model, (x,), preserve="exact", dynamic=dynamic).eval()
        assert conv.attnres.chain0.final.query.shape == (8,)
        with torch.no_grad():
            assert rel_err(conv(x), model(x)) <= 1e-5
    x2 = torch.randn(3, 13, 8)  # the dynamic capture runs other batch and sequence sizes
    with torch.no_grad():
        assert rel_err(conv(x2), model(x2)) <= 1e-5


# -- depth ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_48_layer_llama_converts_in_time():
    """benchmarks/bench_convert.py's deepest config: d_model 256, 48 layers (96 sublayers).

    The pass itself is linear in depth (~0.1 s here); torch.export's two captures dominate
    (~25 s on 2 CPU cores). The bound leaves room for a loaded CI machine.
    """
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_convert import llama

    model = llama(48, 256)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    conv = ac.convert(model, (ids,), kwargs={"use_cache": False}, preserve="exact").eval()
    seconds = time.perf_counter() - t0
    assert conv.attnres_report.num_sites == 97
    with torch.no_grad():
        assert rel_err(main_output(conv(ids)), main_output(model(ids, use_cache=False))) <= 1e-5
    assert seconds < 90, f"48-layer conversion took {seconds:.1f}s"


# -- streams that differ between train and eval mode -------------------------------------------------

class _ModeDependentStream(torch.nn.Module):
    """Noise added to the stream after layer 1 in train mode only: the train graph has two
    chains of 2 sublayers, the eval graph one chain of 4. With `stable=True` a second stream
    (its own layers, same in both modes) is added to the output."""

    def __init__(self, d=8, stable=False):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(4))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(4))
        self.stable = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3)) if stable else None
        self.snorm = torch.nn.LayerNorm(d)

    def forward(self, x):
        y = x * 2
        for i, (n, lin) in enumerate(zip(self.norms, self.lins)):
            x = x + lin(n(x))
            if self.training and i == 1:
                x = x + 0.01 * torch.randn_like(x)
        if self.stable is None:
            return x
        for lin in self.stable:
            y = y + lin(self.snorm(y))
        return x + y


def test_mode_dependent_stream_is_refused():
    model = _ModeDependentStream().eval()
    x = torch.randn(2, 8)
    with pytest.raises(ac.NoEligibleChainError,
                       match=r"differs between train and eval mode at lins\.0: in train mode a chain of 2 "
                             r"sublayer\(s\) \(lins\.0 \.\. lins\.1\), in eval mode a chain of 4") as info:
        ac.convert(model, (x,), preserve="exact", dynamic=False)
    reasons = [r["reason"] for r in info.value.report.refused_chains]
    assert len(reasons) == 3 and all("differs between train and eval mode" in r for r in reasons)
    assert any(r["start"].endswith("(eval graph)") for r in info.value.report.refused_chains)
    # the four residual adds of the train graph are left alone with that reason
    assert sum("differs between train and eval" in la.reason for la in info.value.report.left_alone) == 4


def test_mode_dependent_stream_converts_the_shared_chain():
    """The stream both modes share is converted (in both graphs, one set of parameters); the
    mode-dependent one is left alone with the reason."""
    torch.manual_seed(0)
    model = _ModeDependentStream(stable=True).eval()
    x = torch.randn(2, 8)
    conv = ac.convert(model, (x,), preserve="exact", dynamic=False).eval()
    rep = conv.attnres_report
    assert rep.modes == ["train", "eval"]
    assert [c.num_sublayers for c in rep.chains] == [3]
    assert [s.module for s in rep.chains[0].sites if s.sublayer is not None] == ["stable.0", "stable.1", "stable.2"]
    assert len(rep.refused_chains) == 3
    assert all("differs between train and eval mode" in r["reason"] for r in rep.refused_chains)
    with torch.no_grad():
        assert rel_err(conv(x), model(x)) <= 1e-5
        for p in ac.attnres_parameters(conv).values():
            p.normal_()  # trained queries: both graphs read the same parameters
        conv.eval()
        ev = conv(x)
        conv.train()
        torch.manual_seed(1)
        tr = conv(x)
    assert 0 < (tr - ev).abs().max() < 0.5  # train adds the noise, same AttnRes weights otherwise
    def sites(training):
        conv.train(training)
        g = torch.export.export(conv, (x,), strict=False).graph
        return sum(n.target is torch.ops.attnres.depth_attention.default for n in g.nodes)
    assert sites(True) == sites(False) == 3


class _ModeDependentOutputs(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(3))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        for n, lin in zip(self.norms, self.lins):
            x = x + lin(n(x))
        return (x, x.square().mean()) if self.training else x


def test_mode_dependent_output_structure_is_refused():
    with pytest.raises(ac.ModeMismatchError, match=r"structure of outputs in train mode \(TreeSpec\(tuple.* and in eval mode \(\*\)"):
        ac.convert(_ModeDependentOutputs(), (torch.randn(2, 8),), dynamic=False)
