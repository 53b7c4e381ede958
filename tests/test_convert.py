"""convert(): site discovery, step-0 equivalence, gradients, training, the SPEC schedule, errors.

Equivalence in the paper's mode ("scale") holds only up to the consumer norm's eps: zero
queries hand each norm the stream divided by M. Hugging Face's random init gives hidden
states of RMS ~0.02, where the default eps (1e-5) is comparable to variance / M^2, so the
configs below use eps = 1e-12 for the scale-mode check. Exact mode needs no such care.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

import attnres_compile as ac
from attnres_compile.conversion.blocks import block_schedule

from .models import (
    DataDependentNet, NoResidualNet, PostNormNet, TinyPreNormLM, hf_configs, main_output,
)

HF = hf_configs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def examples_gpt():
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(cfg)
    for m in model.modules():  # see the module docstring: eps small against nanoGPT's 0.02 init
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-12
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    return model, (idx,), {}, 3


def tiny():
    torch.manual_seed(0)
    return TinyPreNormLM(), (torch.randint(0, 37, (2, 11)),), {}, 3


def build(name):
    if name == "examples_gpt":
        return examples_gpt()
    if name == "tiny":
        return tiny()
    factory, args, kwargs, layers = HF[name]
    torch.manual_seed(0)
    return factory(), args, kwargs, layers


MODELS = ["tiny", "examples_gpt", "hf_gpt2", "hf_llama", "hf_vit"]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"user model parameter {k} was modified"


def _forward(model, args, kwargs):
    with torch.no_grad():
        return main_output(model(*args, **kwargs))


@pytest.fixture(scope="module", params=MODELS)
def converted_pair(request):
    model, args, kwargs, layers = build(request.param)
    model.eval()
    before = snapshot(model)
    ref = _forward(model, args, kwargs)
    exact = ac.convert(model, args, kwargs=kwargs, num_blocks=2, preserve="exact")
    scale = ac.convert(model, args, kwargs=kwargs, num_blocks=2)
    assert_unchanged(model, before)
    assert torch.equal(_forward(model, args, kwargs), ref)
    return request.param, model, args, kwargs, layers, exact, scale, ref


def test_site_count(converted_pair):
    name, model, args, kwargs, layers, exact, scale, ref = converted_pair
    for conv in (exact, scale):
        rep = conv.attnres_report
        assert len(rep.chains) == 1, rep
        assert rep.num_sites == 2 * layers + 1
        assert [s.name for s in rep.chains[0].sites] == [f"site{i}" for i in range(2 * layers)] + ["final"]


def test_step0_equivalence(converted_pair):
    name, model, args, kwargs, layers, exact, scale, ref = converted_pair
    exact.eval(), scale.eval()
    assert rel_err(_forward(exact, args, {}), ref) <= 1e-5
    assert rel_err(_forward(scale, args, {}), ref) <= 1e-3


def test_every_query_gets_gradient_and_adamw_lowers_loss(converted_pair):
    name, model, args, kwargs, layers, exact, scale, ref = converted_pair
    conv = copy.deepcopy(scale).train()
    params = ac.attnres_parameters(conv)
    assert len(params) == 2 * (2 * layers)  # every site but site0 (one source) has query + gain
    target = torch.randn_like(ref)

    def loss_fn():
        return ((main_output(conv(*args)) - target) ** 2).mean()

    loss = loss_fn()
    loss.backward()
    for n, p in params.items():
        assert p.grad is not None, n
        if n.endswith("query"):
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        assert loss_fn().item() < loss.item()
    moved = [n for n, p in params.items() if n.endswith("query") and p.abs().sum() > 0]
    assert moved, "no query moved after an AdamW step"


def test_state_dict_round_trip(converted_pair):
    name, model, args, kwargs, layers, exact, scale, ref = converted_pair
    sd = scale.state_dict()
    orig_keys = set(model.state_dict().keys())
    assert orig_keys <= set(sd.keys()), orig_keys - set(sd.keys())
    assert all(k in orig_keys or k.startswith("attnres.") for k in sd)
    trained = copy.deepcopy(scale)
    with torch.no_grad():
        for p in ac.attnres_parameters(trained).values():
            p.add_(torch.randn_like(p))
    fresh = ac.convert(model, args, kwargs=kwargs, num_blocks=2)
    fresh.load_state_dict(trained.state_dict())
    trained.eval(), fresh.eval()
    assert torch.equal(_forward(fresh, args, {}), _forward(trained, args, {}))
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))


def test_report_renders_and_serialises(converted_pair):
    name, model, args, kwargs, layers, exact, scale, ref = converted_pair
    rep = scale.attnres_report
    text = str(rep)
    assert "site1" in text and "final" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["num_sites"] == 2 * layers + 1
    assert set(d["parameters"]) == set(ac.attnres_parameters(scale))
    for la in d["left_alone"]:
        assert la["reason"], la


# -- the SPEC schedule, implemented independently ---------------------------------------

def ref_depth_attention(sources, w, g, eps, scale):
    v = torch.stack([s.double() for s in sources])
    rms = torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    logits = (v / rms * (w.double() * g.double())).sum(-1)
    alpha = torch.softmax(logits, dim=0)
    return scale * (alpha.unsqueeze(-1) * v).sum(0)


def ref_block_attnres(model: TinyPreNormLM, idx, params, S, eps, exact):
    """SPEC section 2, written from the spec's pseudocode in float64."""
    m = copy.deepcopy(model).double()
    subs = m.sublayers()
    blocks, partial = [], m.embed(idx)
    for l, f in enumerate(subs):
        if l % S == 0:
            blocks.append(partial)
            partial = None
        sources = blocks + ([partial] if partial is not None else [])
        if len(sources) == 1:
            h = sources[0]
        else:
            w, g = params[f"site{l}"]
            h = ref_depth_attention(sources, w, g, eps, len(sources) if exact else 1.0)
        out = f(h)
        partial = out if partial is None else partial + out
    blocks.append(partial)
    w, g = params["final"]
    return m.readout(ref_depth_attention(blocks, w, g, eps, len(blocks) if exact else 1.0))


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("preserve", ["scale", "exact"])
def test_matches_independent_schedule(block_size, preserve):
    torch.manual_seed(block_size)
    model = TinyPreNormLM(layers=3).eval()  # 6 sublayers: S=4 leaves a partial last block
    idx = torch.randint(0, 37, (2, 9))
    conv = ac.convert(model, (idx,), block_size=block_size, preserve=preserve).eval()
    params = {}
    with torch.no_grad():
        for name, site in conv.attnres.chain0.named_children():
            site.query.normal_(0, 1.0)
            site.norm_weight.uniform_(0.5, 1.5)
            params[name] = (site.query.detach(), site.norm_weight.detach())
    expected_sites = {f"site{s.sublayer}" if s.sublayer is not None else "final"
                      for s in block_schedule(6, block_size) if s.num_sources > 1}
    assert set(params) == expected_sites
    eps = conv.attnres.chain0.final.eps
    assert eps == 1e-5  # read off the model's LayerNorm
    ref = ref_block_attnres(model, idx, params, block_size, eps, preserve == "exact")
    with torch.no_grad():
        out = conv(idx)
    assert rel_err(out, ref) <= 1e-5


def test_num_blocks_sets_block_size():
    """num_blocks counts layers (3 here, of 2 sublayers): S = 2 * ceil(3 / N) (SPEC section 2)."""
    model, args, _, _ = tiny()
    for n, s in [(1, 6), (2, 4), (3, 2), (4, 2), (100, 2), (None, 2)]:
        conv = ac.convert(model, args, num_blocks=n)
        assert conv.attnres_report.chains[0].block_size == s, (n, s)


def test_train_eval_modes_follow_module():
    torch.manual_seed(0)
    model = TinyPreNormLM(dropout=0.5).train()
    idx = torch.randint(0, 37, (2, 9))
    conv = ac.convert(model, (idx,), preserve="exact")
    assert conv.training and conv.attnres_report.modes == ["train", "eval"]
    a, b = conv(idx), conv(idx)
    assert not torch.equal(a, b), "dropout inactive in train mode"
    conv.eval()
    model.eval()
    assert torch.equal(conv(idx), conv(idx))
    assert rel_err(conv(idx), model(idx)) <= 1e-5
    # other batch and sequence sizes than the example's
    idx2 = torch.randint(0, 37, (3, 5))
    assert rel_err(conv(idx2), model(idx2)) <= 1e-5


# -- refusals and bad input ------------------------------------------------------------------

def test_postnorm_bert_refused_with_reason():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    before = snapshot(bert)
    for preserve in ("scale", "exact"):
        with pytest.raises(ac.NoEligibleChainError, match="PostNorm") as ei:
            ac.convert(bert, (ids,), preserve=preserve)
        assert "BertModel" in str(ei.value)
        reasons = [la.reason for la in ei.value.report.left_alone]
        assert sum("PostNorm" in r for r in reasons) == 4  # 2 layers x (attention, MLP)
    assert_unchanged(bert, before)


def test_postnorm_custom_refused():
    with pytest.raises(ac.NoEligibleChainError, match="PostNorm"):
        ac.convert(PostNormNet(), (torch.randn(2, 5, 16),), preserve="exact")


def test_no_residual_refused():
    model = NoResidualNet()
    before = snapshot(model)
    with pytest.raises(ac.NoEligibleChainError, match="no add operations"):
        ac.convert(model, (torch.randn(2, 16),))
    assert_unchanged(model, before)


def test_untraceable_model_names_source_line():
    with pytest.raises(ac.CaptureError, match="data-dependent control flow") as ei:
        ac.convert(DataDependentNet(), (torch.randn(2, 16),))
    assert "models.py" in str(ei.value) and "if x.sum() > 0" in str(ei.value)


def test_wrong_example_inputs():
    model, _, _, _ = tiny()
    with pytest.raises(ac.CaptureError, match="example_inputs") as ei:
        ac.convert(model, (torch.randint(0, 37, (2, 9, 3)),))  # a batch of 3-D ids: the position embedding cannot broadcast
    assert "models.py" in str(ei.value)
    with pytest.raises(TypeError, match="example_inputs"):
        ac.convert(model, "not a tensor")
    with pytest.raises(TypeError, match="kwargs"):
        ac.convert(model, (torch.zeros(2, 3, dtype=torch.long),), kwargs=[1])


@pytest.mark.parametrize("kw, err, match", [
    ({"num_blocks": 0}, ValueError, "num_blocks must be >= 1"),
    ({"block_size": -2}, ValueError, "block_size must be >= 1"),
    ({"num_blocks": 2.5}, TypeError, "num_blocks must be a positive int"),
    ({"num_blocks": 2, "block_size": 2}, ValueError, "either num_blocks or block_size"),
    ({"preserve": "exactly"}, ValueError, "preserve must be one of"),
    ({"eps": -1.0}, ValueError, "eps must be a positive"),
])
def test_bad_arguments(kw, err, match):
    model, args, _, _ = tiny()
    with pytest.raises(err, match=match):
        ac.convert(model, args, **kw)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ac.convert(lambda x: x, (torch.randn(2),))


def test_attnres_weights_alone_round_trip_and_layout_mismatch(tmp_path):
    model, args, _, _ = tiny()
    model.eval()
    conv = ac.convert(model, args, num_blocks=2).eval()
    with torch.no_grad():
        for p in ac.attnres_parameters(conv).values():
            p.normal_()
    path = tmp_path / "attnres.safetensors"
    ac.save_attnres(conv, path)
    fresh = ac.convert(model, args, num_blocks=2).eval()
    ac.load_attnres_state_dict(fresh, path)
    assert torch.equal(fresh(*args), conv(*args))
    other = ac.convert(model, args, num_blocks=3)
    with pytest.raises(ValueError, match="block_size 4 in the file, 2 here"):
        ac.load_attnres_state_dict(other, path)
    smaller = ac.convert(TinyPreNormLM(layers=2), args, num_blocks=2)
    with pytest.raises(ValueError, match="unexpected"):  # a plain dict: checked by names and shapes
        ac.load_attnres_state_dict(smaller, ac.attnres_state_dict(conv))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_exported_program_save_load_round_trip(tmp_path, mode):
    """torch.export of a converted module (public API, no CLI), saved with torch.export.save and
    loaded back: same outputs, trained AttnRes weights included; the mode at export picks the
    graph (train: dropout active)."""
    torch.manual_seed(0)
    model = TinyPreNormLM(dropout=0.1)
    idx = torch.randint(0, 37, (2, 11))
    conv = ac.convert(model, (idx,), num_blocks=2)
    with torch.no_grad():
        for p in ac.attnres_parameters(conv).values():
            p.normal_()
    conv.train(mode == "train")
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(conv, (idx,), dynamic_shapes=({0: batch},), strict=False)
    path = tmp_path / "converted.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    other = torch.randint(0, 37, (3, 11))
    for x in (idx, other):
        torch.manual_seed(1)
        want = conv(x)
        torch.manual_seed(1)
        got = loaded(x)
        assert torch.equal(got, want)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnres.depth_attention.default in ops
    torch.manual_seed(2)
    varies = not torch.equal(loaded(idx), loaded(idx))
    assert varies == (mode == "train")  # dropout active in the train-mode export only
    if mode == "eval":
        ref = model.eval()
        with torch.no_grad():
            assert not torch.allclose(loaded(idx), ref(idx))  # trained queries change the function


def test_state_dict_of_another_layout_names_the_mismatch():
    model, args, _, _ = tiny()
    two = ac.convert(model, args, num_blocks=2)
    three = ac.convert(model, args, num_blocks=3)
    # 6 sublayers in blocks of 3 or 2: the same parameter names and shapes, another function
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}  # noqa: E731
    assert shapes(two) == shapes(three)
    with pytest.raises(ValueError, match="another layout .*chain 0: block_size 4 in the file, 2 here"):
        three.load_state_dict(two.state_dict())
    smaller = ac.convert(TinyPreNormLM(layers=2), args, num_blocks=2)
    with pytest.raises(ValueError, match="chain 0: 6 sublayers in the file, 4 here"):
        smaller.load_state_dict(two.state_dict())
    # a checkpoint of the original model (no attnres.* entries) loads with strict=False
    missing, unexpected = three.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("attnres.") for k in missing)
