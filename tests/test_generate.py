"""Generation after conversion (issue 15): generate() with the ordinary KV cache in PyTorch, and a
decoder with past in onnxruntime (stock, fused kernel, onnxruntime-genai)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import attnres_compile as ac
from attnres_compile.onnx.decoder import (
    GenerationExportError,
    export_decoder,
    export_for_generation,
    ort_generate,
)

from .models import architectures

ARCH = architectures()
FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox_parallel"]


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def build(name):
    torch.manual_seed(0)
    return ARCH[name]["factory"]().eval()


def perturb(conv, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ac.attnres_parameters(conv).values():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return conv


def prompt(batch=3, length=6):
    ids = torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = build(request.param)
    return request.param, model, ac.convert(model, (torch.randint(3, 64, (1, 4)),), preserve="exact", num_blocks=2)


class Collect:
    """A streamer: what generate() puts, step by step."""

    def __init__(self):
        self.steps, self.ended = [], False

    def put(self, value):
        self.steps.append(value.clone())

    def end(self):
        self.ended = True


# -- PyTorch ------------------------------------------------------------------------------------

def test_exact_mode_generates_the_originals_tokens(family):
    name, model, conv = family
    ids, mask = prompt()
    common = dict(attention_mask=mask, max_new_tokens=7, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(conv.generate(ids, do_sample=False, **common), model.generate(ids, do_sample=False, **common))
        sampled = []
        for m in (model, conv):
            torch.manual_seed(5)
            sampled.append(m.generate(ids, do_sample=True, temperature=0.8, top_k=12, top_p=0.9, **common))
        assert torch.equal(*sampled)


def test_static_cache_eos_and_streamer():
    model = build("llama")
    conv = ac.convert(model, (torch.randint(3, 64, (1, 4)),), preserve="exact")
    ids, mask = prompt()
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(free[2, -3])  # a token the original emits: generation stops there
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
    with torch.no_grad():
        want = model.generate(ids, cache_implementation="static", **kw)
        streamer = Collect()
        got = conv.generate(ids, cache_implementation="static", streamer=streamer, **kw)
    assert torch.equal(got, want) and (got[2] == eos).any()
    assert streamer.ended and torch.equal(torch.cat([streamer.steps[0]] + [s[:, None] for s in streamer.steps[1:]], 1),
                                          got)


def _recompute_greedy(model, ids, mask, steps):
    """A greedy loop with no cache: the whole prefix each step. Returns tokens and per-step logits."""
    tokens, m, logits = ids, mask, []
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        out = model(tokens, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
        logits.append(out)
        tokens = torch.cat([tokens, out.argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return tokens, logits


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox_parallel"])
def test_cached_generation_equals_recompute_with_random_queries(name):
    conv = perturb(ac.convert(build(name), (torch.randint(3, 64, (1, 4)),), preserve="exact", num_blocks=2))
    ids, mask = prompt()
    with torch.no_grad():
        out = conv.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
        tokens, logits = _recompute_greedy(conv, ids, mask, 6)
        plain = build(name).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, tokens)
    assert not torch.equal(out.sequences, plain)  # the trained queries change what it says
    for got, want in zip(out.logits, logits):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", ["eager", pytest.param("attnres", marks=pytest.mark.slow)])
def test_compiled_generate_matches_eager(backend):
    """Dynamo traces prefill and decode steps (runtime mode included); the attnres backend's
    Inductor compile of both takes about a minute here, so that variant is marked slow."""
    torch._dynamo.reset()
    model = build("llama")
    conv = perturb(ac.convert(model, (torch.randint(3, 64, (1, 4)),), preserve="exact", num_blocks=2))
    twin = copy.deepcopy(conv)
    twin.compile(backend=backend, dynamic=True)
    ids, mask = prompt()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(twin.generate(ids, **kw), conv.generate(ids, **kw))


# -- onnxruntime ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory):
    conv = perturb(ac.convert(build(request.param), (torch.randint(3, 64, (1, 4)),), preserve="exact", num_blocks=2))
    folder = tmp_path_factory.mktemp(request.param)
    export_for_generation(conv, folder)
    return request.param, conv, folder


def test_decoder_with_past_names_and_parity(exported):
    import onnx
    import onnxruntime as ort

    name, conv, folder = exported
    proto = onnx.load(folder / "model.onnx")
    layers = conv.config.num_hidden_layers if name != "gpt2" else conv.config.n_layer
    inputs = [i.name for i in proto.graph.input]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [o.name for o in proto.graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    sites = sum(1 for c in conv.attnres_report.chains for s in c.sites if s.parameters)
    assert sum(1 for n in proto.graph.node if n.domain == "attnres" and n.op_type == "DepthAttention") == sites
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = prompt()
    with torch.no_grad():  # prefill (past length 0), then one decode step from that cache
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        pre = conv(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        empty = {n: np.zeros((3, i.shape[1], 0, i.shape[3]), np.float32)
                 for n, i in ((i.name, i) for i in session.get_inputs()) if n.startswith("past_")}
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                 "position_ids": pos.numpy(), **empty})
        real = mask.bool()  # padding positions attend to nothing: runtimes fill those rows differently
        assert rel_err(torch.from_numpy(got[0])[real], pre.logits[real]) <= 1e-5
        nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        dec = conv(nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1, past_key_values=pre.past_key_values,
                   use_cache=True)
        past = dict(zip([n for n in empty], got[1:]))
        got2 = session.run(None, {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(),
                                  "position_ids": (pos[:, -1:] + 1).numpy(), **past})
    assert rel_err(torch.from_numpy(got2[0]), dec.logits) <= 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["stock", "fused"])
def test_ort_generate_equals_pytorch_generate(exported, fused):
    name, conv, folder = exported
    ids, mask = prompt()
    kw = dict(attention_mask=mask, max_new_tokens=7, pad_token_id=0, eos_token_id=conv.generation_config.eos_token_id)
    with torch.no_grad():
        want = conv.generate(ids, do_sample=False, **kw)
        assert torch.equal(ort_generate(folder / "model.onnx", ids, fused=fused, **kw), want)
        torch.manual_seed(9)
        want_s = conv.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, **kw)
        torch.manual_seed(9)
        got_s = ort_generate(folder / "model.onnx", ids, do_sample=True, temperature=0.9, top_p=0.95,
                             fused=fused, **kw)
    assert torch.equal(got_s, want_s)


def test_ort_generate_without_past_recomputes():
    """A full-sequence export (export_onnx, no cache inputs) generates too, recomputing the prefix."""
    conv = perturb(ac.convert(build("llama"), (torch.randint(3, 64, (1, 4)),), preserve="exact", num_blocks=2))
    ids, mask = prompt()
    proto = ac.export_onnx(conv, (ids,), kwargs={"attention_mask": mask},
                           dynamic_shapes={"input_ids": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")},
                                           "attention_mask": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}})
    with torch.no_grad():
        want = conv.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ort_generate(proto, ids, mask, max_new_tokens=4, pad_token_id=0), want)


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_onnxruntime_genai_generates_the_same_greedy_tokens(tmp_path, name):
    og = pytest.importorskip("onnxruntime_genai")
    conv = perturb(ac.convert(build(name), (torch.randint(3, 64, (1, 4)),), preserve="exact", num_blocks=2))
    export_for_generation(conv, tmp_path)
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = conv.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=want.shape[1], do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    got = torch.tensor(gen.get_sequence(0)).long()
    eos = conv.generation_config.eos_token_id
    trimmed = want[0][: len(got)]  # onnxruntime-genai leaves a final EOS out of the sequence
    assert torch.equal(got, trimmed) and (len(got) == want.shape[1] or int(want[0, len(got)]) == eos)


def test_a_model_without_a_cache_argument_is_refused():
    model = build("vit")
    conv = ac.convert(model, ARCH["vit"]["args"])
    with pytest.raises(GenerationExportError, match=r"ViTModel\.forward takes no cache argument .* ort_generate"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_decoder(conv)
