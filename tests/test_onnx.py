"""ONNX export of converted models: one DepthAttention node per site, parity in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import attnres_compile as ac
from attnres_compile.onnx import ort_kernel
from attnres_compile.onnx import DOMAIN, OP_TYPE, count_depth_attention_nodes, ort_session
from attnres_compile.onnx.session import UNSTACKED_OP_TYPE, unstack_sources

from .models import TinyPreNormLM, hf_configs, main_output

HF = hf_configs()


def _examples_gpt():
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    return model, (torch.randint(0, 256, (2, 9)),), {}, "idx", lambda b, t: torch.randint(0, 256, (b, t))


def _hf(name, input_name, make):
    factory, args, kwargs, _ = HF[name]
    torch.manual_seed(0)
    return factory(), args, kwargs, input_name, make


CASES = {
    "examples_gpt": _examples_gpt,
    "hf_gpt2": lambda: _hf("hf_gpt2", "input_ids", lambda b, t: torch.randint(0, 64, (b, t))),
    "hf_llama": lambda: _hf("hf_llama", "input_ids", lambda b, t: torch.randint(0, 64, (b, t))),
    "hf_vit": lambda: _hf("hf_vit", "pixel_values", lambda b, t: torch.randn(b, 3, 16, 16)),
}


def _ort_run(proto, inputs: dict):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: inputs[n] for n in names})


def _perturb(conv):
    with torch.no_grad():
        for p in ac.attnres_parameters(conv).values():
            p.add_(0.3 * torch.randn_like(p))


# the same export path as examples_gpt; HF LLaMA's export is also run by test_generate's decoder
# with past and the CLI's check (make test-slow runs these)
SLOW_CASES = {"hf_gpt2", "hf_vit", "hf_llama"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES])
def test_export_parity_dynamic(name, tmp_path):
    model, args, kwargs, input_name, make = CASES[name]()
    model.eval()
    conv = ac.convert(model, args, kwargs=kwargs, num_blocks=2).eval()
    _perturb(conv)  # non-trivial depth weights, so parity tests the softmax too
    if input_name == "pixel_values":
        dyn = {input_name: {0: Dim("batch")}}
    else:
        dyn = {input_name: {0: Dim("batch"), 1: Dim("seq")}}
    dyn.update({k: None for k in kwargs})
    path = tmp_path / "model.onnx"
    proto = ac.export_onnx(conv, args, path, kwargs=kwargs, dynamic_shapes=dyn)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sites = conv.attnres_report.chains[0].sites
    assert count_depth_attention_nodes(proto) == sum(1 for s in sites if s.num_sources > 1)
    assert [(f.domain, f.name) for f in proto.functions if f.domain == DOMAIN] == [(DOMAIN, OP_TYPE)]
    fn = next(f for f in proto.functions if f.domain == DOMAIN)
    assert all(n.domain in ("", "ai.onnx") for n in fn.node), "function body must use standard ops"
    node = next(n for n in proto.graph.node if n.domain == DOMAIN)
    assert {a.name for a in node.attribute} == {"eps", "scale"}

    shapes = [(2, 9), (3, 5)] if input_name != "pixel_values" else [(2, 0), (4, 0)]
    inline = ac.export_onnx(conv, args, kwargs=kwargs, dynamic_shapes=dyn, inline=True)
    assert not any(n.domain == DOMAIN for n in inline.graph.node)
    # the fused kernel, on the graph as exported and with the Concat dropped
    fused = {unstack: ort_session(path, fused=True, unstack=unstack) for unstack in (False, True)}
    nodes = count_depth_attention_nodes(proto)
    for b, t in shapes:
        x = make(b, t)
        with torch.no_grad():
            ref = main_output(conv(x, **kwargs)).numpy()
        for p in (proto, inline):
            out = _ort_run(p, {input_name: x.numpy()})[0]
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert np.isfinite(out).all() and err <= 1e-4, (b, t, err)
        for unstack, sess in fused.items():
            calls = ort_kernel.calls()
            out = sess.run(None, {input_name: x.numpy()})[0]
            assert ort_kernel.calls() - calls == nodes, "the fused kernel must run once per DepthAttention node"
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert np.isfinite(out).all() and err <= 1e-4, (unstack, b, t, err)


def test_exact_mode_scale_attribute():
    model = TinyPreNormLM().eval()
    idx = torch.randint(0, 37, (2, 6))
    conv = ac.convert(model, (idx,), num_blocks=2, preserve="exact")
    proto = ac.export_onnx(conv, (idx,))
    scales = sorted({a.f for n in proto.graph.node if n.domain == DOMAIN for a in n.attribute if a.name == "scale"})
    assert scales == sorted({float(s.num_sources) for s in conv.attnres_report.chains[0].sites if s.num_sources > 1})
    out = _ort_run(proto, {"idx": idx.numpy()})[0]
    np.testing.assert_allclose(out, model(idx).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_rejects_unconverted():
    with pytest.raises(TypeError, match="convert"):
        ac.export_onnx(TinyPreNormLM(), (torch.zeros(1, 3, dtype=torch.long),))


def test_fused_kernel_was_built_at_install():
    """setup.py compiled csrc/ort_kernel.c against the vendored headers: no compiler at run time."""
    assert ort_kernel.available(), ort_kernel.unavailable_reason()
    assert "attnres_compile" in ort_kernel.library_path()


def test_fused_kernel_claims_the_node():
    """With the kernel registered, onnxruntime runs it instead of the function: a model whose
    function body is sabotaged still gives the PyTorch result through the fused session only."""
    model = TinyPreNormLM().eval()
    idx = torch.randint(0, 37, (2, 6))
    conv = ac.convert(model, (idx,), num_blocks=2)
    _perturb(conv)
    proto = ac.export_onnx(conv, (idx,))
    fn = next(f for f in proto.functions if f.domain == DOMAIN and f.name == OP_TYPE)
    last = fn.node[-1]  # CastLike(h, sources) -> CastLike(0 * h, sources)
    zero = onnx.helper.make_node("Constant", [], ["sabotage_zero"], value_float=0.0)
    mul = onnx.helper.make_node("Mul", [last.input[0], "sabotage_zero"], ["sabotage_h"])
    last.input[0] = "sabotage_h"
    fn.node.insert(len(fn.node) - 1, mul)
    fn.node.insert(len(fn.node) - 2, zero)
    with torch.no_grad():
        ref = conv(idx).numpy()
    stock = ort_session(proto, fused=False).run(None, {"idx": idx.numpy()})[0]
    assert np.abs(stock - ref).max() > 1e-2  # the sabotaged body is what stock onnxruntime runs
    nodes = count_depth_attention_nodes(proto)
    for unstack in (False, True):
        sess = ort_session(proto, fused=True, unstack=unstack)
        calls = ort_kernel.calls()
        out = sess.run(None, {"idx": idx.numpy()})[0]
        assert ort_kernel.calls() - calls == nodes
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_fused_kernel_exact_mode_and_profile(tmp_path):
    model = TinyPreNormLM().eval()
    idx = torch.randint(0, 37, (3, 7))
    conv = ac.convert(model, (idx,), num_blocks=3, preserve="exact")
    path = tmp_path / "m.onnx"
    proto = ac.export_onnx(conv, (idx,), path)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "prof")
    sess = ort_session(path, fused=True, unstack=False, sess_options=opts)
    out = sess.run(None, {"idx": idx.numpy()})[0]
    np.testing.assert_allclose(out, model(idx).detach().numpy(), rtol=1e-4, atol=1e-5)
    import json

    events = json.loads(open(sess.end_profiling()).read())
    ops = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert OP_TYPE in ops and "ReduceSumSquare" not in ops  # the kernel ran, the body did not


def test_unstack_sources_rewrite():
    model = TinyPreNormLM().eval()
    idx = torch.randint(0, 37, (2, 6))
    conv = ac.convert(model, (idx,), num_blocks=2)
    proto = ac.export_onnx(conv, (idx,))
    nodes = count_depth_attention_nodes(proto)
    rewritten, n = unstack_sources(proto)
    assert n == nodes and count_depth_attention_nodes(rewritten) == 0
    assert sum(1 for x in rewritten.graph.node if x.op_type == UNSTACKED_OP_TYPE) == nodes
    concats = [sum(1 for x in m.graph.node if x.op_type == "Concat") for m in (proto, rewritten)]
    assert concats[0] - concats[1] == nodes  # each node's stacking Concat is gone
    assert count_depth_attention_nodes(proto) == nodes  # the input model is not modified


def test_fused_session_falls_back_for_float16_sources():
    """The kernel is float32 only; a float16 node runs the function body (with a warning)."""
    import onnx.helper as oh

    from attnres_compile.onnx import function_proto

    f16 = onnx.TensorProto.FLOAT16
    node = oh.make_node(OP_TYPE, ["s", "q", "g"], ["h"], domain=DOMAIN, eps=1e-6, scale=1.0)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("s", f16, [3, 2, 4]),
                                        oh.make_tensor_value_info("q", f16, [4]),
                                        oh.make_tensor_value_info("g", f16, [4])],
                          [oh.make_tensor_value_info("h", f16, [2, 4])])
    # IR version 10 (opset 20's): onnx's default for make_model can be newer than the
    # onnxruntime beside it reads (onnx 1.23 writes 14, onnxruntime 1.30 reads up to 13).
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20), oh.make_opsetid(DOMAIN, 1)],
                          functions=[function_proto()], ir_version=10)
    rng = np.random.default_rng(0)
    feed = {"s": rng.standard_normal((3, 2, 4)).astype(np.float16),
            "q": rng.standard_normal(4).astype(np.float16), "g": np.ones(4, np.float16)}
    stock = ort_session(model, fused=False).run(None, feed)[0]
    with pytest.warns(UserWarning, match="float32 only"):
        sess = ort_session(model, fused=True)
    calls = ort_kernel.calls()
    np.testing.assert_array_equal(sess.run(None, feed)[0], stock)
    assert ort_kernel.calls() == calls
