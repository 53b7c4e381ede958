"""torch.compile(backend="attnres") on CPU: converted and unconverted models, eager parity."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import attnres_compile as ac

from .models import TinyPreNormLM, hf_configs, main_output


def rel_err(a, b) -> float:
    assert torch.isfinite(a).all()
    return ((a - b).abs().max() / b.abs().max()).item()


def test_backend_registered_by_entry_point():
    import torch._dynamo

    assert "attnres" in torch._dynamo.list_backends()


def _perturbed(conv):
    with torch.no_grad():
        for p in ac.attnres_parameters(conv).values():
            p.add_(0.3 * torch.randn_like(p))
    return conv


def _grads(module, args, target):
    module.zero_grad(set_to_none=True)
    out = main_output(module(*args))
    ((out - target) ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _examples_gpt():
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)), (torch.randint(0, 256, (2, 12)),), {}


def _llama():
    factory, args, kwargs, _ = hf_configs()["hf_llama"]
    torch.manual_seed(0)
    return factory(), args, kwargs


@pytest.mark.parametrize("build", [_examples_gpt, pytest.param(_llama, marks=pytest.mark.slow)],
                         ids=["examples_gpt", "hf_llama"])  # HF LLaMA compiled on a GPU: tests/test_cuda.py
def test_compiled_matches_eager_forward_and_backward(build):
    torch._dynamo.reset()
    model, args, kwargs = build()
    conv = _perturbed(ac.convert(model.eval(), args, kwargs=kwargs, num_blocks=2)).train()
    twin = copy.deepcopy(conv)
    compiled = torch.compile(twin, backend="attnres")
    target = torch.randn_like(main_output(conv(*args)))
    out_e, g_e = _grads(conv, args, target)
    out_c, g_c = _grads(compiled, args, target)
    assert rel_err(out_c, out_e) <= 1e-5
    assert g_e.keys() == {n.removeprefix("_orig_mod.") for n in g_c} or g_e.keys() == g_c.keys()
    for name, g in g_e.items():
        gc = g_c.get(name, g_c.get(f"_orig_mod.{name}"))
        assert gc is not None, name
        assert rel_err(gc, g) <= 1e-4, name
    with torch.no_grad():  # the no-grad path (two-phase when its ops are available)
        conv.eval(), twin.eval()
        assert rel_err(main_output(compiled(*args)), main_output(conv(*args))) <= 1e-5


def test_unconverted_zero_weights_reproduce_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyPreNormLM(layers=2).eval()
    idx = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        ref = model(idx)
        out = torch.compile(model, backend="attnres")(idx)
    assert rel_err(out, ref) <= 1e-5


def test_unconverted_with_saved_weights_reproduces_converted(tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyPreNormLM(layers=2).eval()
    idx = torch.randint(0, 37, (2, 9))
    conv = _perturbed(ac.convert(model, (idx,), num_blocks=2)).eval()
    path = tmp_path / "w.safetensors"
    ac.save_attnres(conv, path)
    with torch.no_grad():
        ref = conv(idx)
        out = torch.compile(model, backend="attnres", options={"weights": str(path)})(idx)
        plain = model(idx)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, plain) > 1e-3  # the weights really were applied


@pytest.mark.slow  # 23 s of compiling for one warning (CI time)
def test_unconverted_training_warns():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyPreNormLM(layers=2).train()
    idx = torch.randint(0, 37, (2, 9))
    with pytest.warns(UserWarning, match="do not train"):
        torch.compile(model, backend="attnres")(idx).sum().backward()


def test_unknown_option_is_rejected():
    torch._dynamo.reset()
    model = TinyPreNormLM(layers=2).eval()
    with pytest.raises(Exception, match="unknown option"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(model, backend="attnres", options={"wieghts": "x"})(torch.randint(0, 37, (1, 4)))


@pytest.mark.parametrize("block_size", [1, 2, 3, 4])
def test_two_phase_pass_matches_plain(block_size):
    from attnres_compile.compile.passes import is_depth_attention
    from attnres_compile.compile.passes.two_phase_sites import to_two_phase

    torch.manual_seed(block_size)
    model = TinyPreNormLM(layers=3).eval()
    idx = torch.randint(0, 37, (2, 9))
    conv = _perturbed(ac.convert(model, (idx,), block_size=block_size)).eval()
    gm = torch.export.export(conv, (idx,), strict=False).module()  # a captured graph of the converted model
    n_sites = sum(1 for n in gm.graph.nodes if is_depth_attention(n))
    assert to_two_phase(gm) == n_sites
    assert not any(is_depth_attention(n) for n in gm.graph.nodes)
    phase1 = [n for n in gm.graph.nodes if "phase1" in str(n.target)]
    # one phase-1 read per distinct prefix of completed blocks, far fewer than sites for S > 1
    assert 1 <= len(phase1) <= n_sites
    if block_size > 1:
        assert len(phase1) < n_sites
    with torch.no_grad():
        assert rel_err(gm(idx), conv(idx)) <= 1e-5


def test_compiled_two_phase_under_no_grad():
    from attnres_compile.compile import backend as be

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyPreNormLM(layers=2).eval()
    idx = torch.randint(0, 37, (2, 9))
    conv = _perturbed(ac.convert(model, (idx,), block_size=2)).eval()
    rewritten = []
    orig = be._inductor

    def spy(gm, example_inputs):
        rewritten.append(sum(1 for n in gm.graph.nodes if "phase2" in str(n.target)))
        return orig(gm, example_inputs)

    be._inductor = spy
    try:
        with torch.no_grad():
            out = torch.compile(conv, backend="attnres", options={"two_phase": True})(idx)
            ref = conv(idx)
    finally:
        be._inductor = orig
    assert rewritten and rewritten[0] == sum(1 for s in conv.attnres_report.chains[0].sites if s.num_sources > 1)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("name", ["llama", *[pytest.param(n, marks=pytest.mark.slow) for n in ("gpt2", "gpt_neox_parallel", "t5")]])
def test_dynamo_traces_converted_models_in_one_graph(name):
    """Dynamo traces the converted model's own code with the runtime's mode: every residual add
    is found from Dynamo's frames (parallel residuals: by column span within the line), in one
    graph (fullgraph=True) that any backend runs, on the example's and other shapes."""
    from torch._dynamo.testing import CompileCounter

    from .models import architectures

    torch._dynamo.reset()
    spec = architectures()[name]
    torch.manual_seed(0)
    model = spec["factory"]().eval()
    conv = _perturbed(ac.convert(model, spec["args"], kwargs=spec["kwargs"], preserve="exact", num_blocks=2))
    counter = CompileCounter()
    compiled = torch.compile(conv, backend=counter, fullgraph=True)
    ids = spec["args"][0]
    other = torch.randint(0, 64, (3, 9))
    kw = {k: v for k, v in spec["kwargs"].items() if k != "decoder_input_ids"}
    for x in (ids, other):
        extra = {"decoder_input_ids": x[:, :5]} if name == "t5" else {}
        with torch.no_grad():
            want = main_output(conv(x, **kw, **extra))
            got = main_output(compiled(x, **kw, **extra))
        assert rel_err(got, want) <= 1e-5
    assert counter.frame_count >= 1
    sites = sum(1 for c in conv.attnres_report.chains for s in c.sites if s.parameters)
    assert counter.op_count >= sites


@pytest.mark.slow  # 46 s; the unconverted path's conversion is checked at one shape by the tests above (CI time)
def test_unconverted_path_across_shapes_and_later_compiles():
    """A second input shape recompiles with dynamic sizes: converted per concrete shape at call
    time; a later compile of another model in the same process is unaffected."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyPreNormLM(layers=2).eval()
    compiled = torch.compile(model, backend="attnres")
    with torch.no_grad():
        for shape in [(2, 9), (3, 5), (1, 12)]:
            idx = torch.randint(0, 37, shape)
            assert rel_err(compiled(idx), model(idx)) <= 1e-5
        other = TinyPreNormLM(layers=3).eval()
        idx = torch.randint(0, 37, (2, 7))
        assert rel_err(torch.compile(other, backend="attnres")(idx), other(idx)) <= 1e-5


class _BreakInLoop(TinyPreNormLM):
    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            torch._dynamo.graph_break()
            x = b(x)
        return self.readout(x)


@pytest.mark.slow  # 14 s (CI time)
def test_unconverted_model_split_by_a_graph_break_is_refused_with_the_fix():
    torch._dynamo.reset()
    model = _BreakInLoop(layers=2).eval()
    with pytest.raises(Exception, match=r"split the unconverted model into frames: it compiles _BreakInLoop.embed "
                                        r"on its own, called from _BreakInLoop.forward at .*test_backend.py:\d+.*"
                                        r"fullgraph=True.*attnres_compile.convert\(\) first"):
        with torch.no_grad():
            torch.compile(model, backend="attnres")(torch.randint(0, 37, (2, 9)))
    torch._dynamo.reset()
    # the fix: convert first; the converted model compiles frame by frame and keeps one stream
    conv = _perturbed(ac.convert(model, (torch.randint(0, 37, (2, 9)),), preserve="exact", block_size=2))
    idx = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        assert rel_err(torch.compile(conv, backend="attnres")(idx), conv(idx)) <= 1e-5


@pytest.mark.parametrize("decompose", [pytest.param(True, marks=pytest.mark.slow), False])   # True: 46 s (CI time)
def test_compiled_cpu_sites_are_generated_by_inductor_and_match_float64(decompose):
    """On CPU the backend decomposes each site into ATen arithmetic, so Inductor's code holds no
    attnres call; forward and backward agree with the same model in float64 (eager)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(3)
    model = TinyPreNormLM(d=24, layers=4)
    ids = torch.randint(0, 37, (2, 9))
    conv = _perturbed(ac.convert(model, (ids,), num_blocks=2))
    ref64 = copy.deepcopy(conv).double()
    target = torch.randn(2, 9, 37)
    out64, grads64 = _grads(ref64, (ids,), target.double())
    compiled = torch.compile(conv, backend="attnres", options={"decompose": decompose})

    def step():
        return _grads(compiled, (ids,), target)

    (out, grads), codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert ("torch.ops.attnres." in code) is (not decompose), "decompose=True leaves no opaque site in the code"
    assert rel_err(out, out64.float()) < 1e-5
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert grads.keys() == grads64.keys() and any(n.startswith("attnres") for n in grads)
    for n, g in grads.items():
        assert rel_err(g, grads64[n].float()) < 1e-4, n


@pytest.mark.slow  # a strict xfail that records a known Inductor behaviour, 23 s (CI time)
@pytest.mark.xfail(strict=True, reason="since the runtime installs the plan in code (issue 19), the graph Dynamo hands "
                   "the backend is the same but Inductor recomputes b0 in each fused site kernel instead of realising "
                   "it once; the previous graph kept it realised only through dead `x.is_cpu` reads")
def test_compiled_cpu_realises_the_embedding_block_once():
    """b0 (token + position embedding) is a source of every site; with the sites decomposed,
    Inductor computes it in one kernel instead of once per consuming site (7 buffers for 7
    sites when each opaque op realised its own inputs)."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = TinyPreNormLM(d=48, layers=4)
    ids = torch.randint(0, 37, (2, 16))
    conv = ac.convert(model, (ids,), num_blocks=4)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(conv, backend="attnres"), ids)
        ref = conv(ids)
    kernels = re.findall(r"(cpp_fused_\w+) = async_compile", codes[0])
    assert len([k for k in kernels if "embedding" in k]) == 1, kernels
    assert rel_err(out, ref) < 1e-5
