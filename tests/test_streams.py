"""Which adds make a stream (issue 14): metadata-only reads, scaled residuals, reshaped streams,
rotary labels, the refusal summary, and block boundaries on layer boundaries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnres_compile as ac

from .models import architectures, main_output


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class CastingRMSNorm(nn.Module):
    """An RMSNorm that computes in float32 and casts back the Hugging Face way."""

    def __init__(self, d: int, how: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.how = how

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        y = self.weight * (x.float() * torch.rsqrt(v + 1e-6))
        return y.type_as(x) if self.how == "type_as" else y.to(x.dtype)


class Stack(nn.Module):
    """x = c * x + c2 * lin(norm(x)), three times; the stream starts at the input."""

    def __init__(self, d=8, n=3, c=None, c2=None, norm=lambda d: nn.LayerNorm(d, eps=1e-12)):
        super().__init__()
        self.c, self.c2 = c, c2
        self.norms = nn.ModuleList(norm(d) for _ in range(n))
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.final = norm(d)

    def forward(self, x):
        x = x * 2
        for n, lin in zip(self.norms, self.lins):
            b = lin(n(x))
            b = b if self.c2 is None else self.c2 * b
            x = x + b if self.c is None else self.c * x + b
        return self.final(x)


@pytest.mark.parametrize("how", ["type_as", "to_dtype"])
def test_a_norm_that_casts_back_to_the_streams_dtype_is_prenorm(how):
    """`.type_as(x)` / `.to(x.dtype)` read x's dtype only: the chain is PreNorm (scale mode)."""
    model = Stack(norm=lambda d: CastingRMSNorm(d, how)).eval()
    x = torch.randn(2, 8)
    conv = ac.convert(model, (x,))
    rep = conv.attnres_report
    assert len(rep.chains) == 1 and rep.chains[0].prenorm and rep.chains[0].num_sublayers == 3
    with torch.no_grad():
        assert rel_err(conv(x), model(x)) <= 1e-4  # up to the norms' eps


def test_unit_scaled_stream_is_the_plain_stream():
    model = Stack(c=1.0).eval()
    x = torch.randn(2, 8)
    conv = ac.convert(model, (x,))
    assert conv.attnres_report.chains[0].num_sublayers == 3
    with torch.no_grad():
        assert rel_err(conv(x), model(x)) <= 1e-5
    also = ac.convert(Stack(c=1.0, c2=0.7).eval(), (x,))  # `1.0 * x + c2 * f(x)`: branch c2 * f
    assert also.attnres_report.chains[0].num_sublayers == 3


@pytest.mark.parametrize("c2", [None, 0.7])
def test_a_decaying_stream_is_refused_with_its_own_reason(c2):
    model = Stack(c=0.5, c2=c2).eval()
    with pytest.raises(ac.NoEligibleChainError) as info:
        ac.convert(model, (torch.randn(2, 8),), preserve="exact")
    msg = str(info.value)
    assert "scaled residual: the stream (mul" in msg and "multiplied by 0.5" in msg
    assert "rotary" not in msg and "the closest: add" in msg
    reasons = [la.reason for la in info.value.report.left_alone]
    assert sum("scaled residual" in r for r in reasons) == 3 and not any("rotary" in r for r in reasons)


def test_rotary_adds_are_still_labelled_rotary():
    model = architectures()["llama"]["factory"]().eval()
    conv = ac.convert(model, (torch.randint(0, 64, (1, 5)),))
    rotary = [la for la in conv.attnres_report.left_alone if "rotary" in la.reason]
    assert len(rotary) == 4 and all("apply_rotary_pos_emb" in la.where for la in rotary)


def test_global_init_loop_reaches_the_models_modules_but_not_the_queries():
    from .models import TinyPreNormLM

    torch.manual_seed(0)
    model = TinyPreNormLM()
    conv = ac.convert(model, (torch.randint(0, 37, (2, 9)),))
    linears = [m for m in conv.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    weights = [m.weight.clone() for m in linears]

    def init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    conv.apply(init)
    assert linears and all(not torch.equal(w, m.weight) for w, m in zip(weights, linears))  # the loop ran
    queries = {n: p for n, p in ac.attnres_parameters(conv).items() if n.endswith("query")}
    assert queries and all(torch.count_nonzero(p) == 0 for p in queries.values())


# -- block boundaries on layer boundaries (SPEC section 2) ---------------------------------------

def test_num_blocks_counts_layers_and_boundaries_fall_on_layers():
    from examples.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, n_layer=12, n_head=2, n_embd=32))
    conv = ac.convert(model, (torch.randint(0, 256, (2, 8)),), num_blocks=8)
    chain = conv.attnres_report.chains[0]
    assert (chain.block_size, chain.num_blocks, chain.layers, chain.sublayers_per_layer) == (4, 6, 12, 2)
    assert "S = 2 x ceil(12/8) = 4, 6 blocks (fewer than 8" in chain.schedule
    assert "schedule: num_blocks=8 over 12 layers" in str(conv.attnres_report)
    # every block's first sublayer is an attention sublayer
    firsts = [s.module for s in chain.sites[:-1] if s.sublayer % chain.block_size == 0]
    assert firsts and all(m.endswith(".attn") for m in firsts)


@pytest.mark.parametrize("name,per_layer", [("gpt_neox_parallel", 1), ("vit", 2), ("t5", None)])
def test_layer_structure_of_architectures(name, per_layer):
    spec = architectures()[name]
    conv = ac.convert(spec["factory"]().eval(), spec["args"], kwargs=spec["kwargs"], preserve="exact", num_blocks=1)
    chains = conv.attnres_report.chains
    if name == "t5":  # encoder: self-attention + FF; decoder: + cross-attention
        assert [c.sublayers_per_layer for c in chains] == [2, 3] and [c.block_size for c in chains] == [4, 6]
    else:
        assert chains[0].sublayers_per_layer == per_layer
        assert chains[0].block_size == per_layer * chains[0].layers


def test_explicit_block_size_is_taken_as_given():
    from .models import TinyPreNormLM

    conv = ac.convert(TinyPreNormLM(), (torch.randint(0, 37, (2, 9)),), block_size=3)
    chain = conv.attnres_report.chains[0]
    assert chain.block_size == 3 and chain.schedule == "block_size=3 as given: 2 blocks"


def test_no_layer_structure_falls_back_to_sublayers():
    class Loop(nn.Module):  # the adds run in the root's own forward: no layer modules
        def __init__(self, d=8, n=6):
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
            self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

        def forward(self, x):
            for n, lin in zip(self.norms, self.lins):
                x = x + lin(n(x))
            return x

    model = Loop().eval()
    x = torch.randn(2, 8)
    conv = ac.convert(model, (x,), preserve="exact", num_blocks=4)
    chain = conv.attnres_report.chains[0]
    assert chain.block_size == 2 and "no layer structure found" in chain.schedule
    with torch.no_grad():
        assert rel_err(main_output(conv(x)), model(x)) <= 1e-5


# -- reshaped streams -------------------------------------------------------------------------------

class FlatMLPBlock(nn.Module):
    """Attention-like sublayer on [B, T, D], MLP on the tokens flattened to [B*T, D], its residual
    add in the flat layout, `.view(B, T, D)` back: several decoder implementations do this."""

    def __init__(self, d):
        super().__init__()
        self.ln1, self.mix, self.ln2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def attn(self, h):
        return self.mix(self.ln1(h))

    def mlp(self, h):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))

    def forward(self, x):
        B, T, D = x.shape
        x = x + self.attn(x)
        h = self.mlp(x.reshape(-1, D))
        return (x.reshape(-1, D) + h).view(B, T, D)


class FlatNet(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(FlatMLPBlock(d) for _ in range(n))
        self.lnf = nn.LayerNorm(d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lnf(x)


def _flat_reference(model, params, x, block_size):
    """The SPEC loop over FlatNet's sublayers on [B, T, D] (flattening moves no feature)."""
    from attnres_compile.ops.reference import depth_attention_reference

    subs = [f for b in model.blocks for f in (b.attn, b.mlp)]

    def site(name, sources):
        if len(sources) == 1:
            return sources[0]
        q, g = params[f"attnres.chain0.{name}.query"], params[f"attnres.chain0.{name}.norm_weight"]
        return depth_attention_reference([s.double() for s in sources], q.double(), g.double(),
                                         eps=1e-5).float() * len(sources)

    blocks, partial = [], x
    for i, f in enumerate(subs):
        if i % block_size == 0:
            blocks.append(partial)
            partial = None
        out = f(site(f"site{i}", blocks + ([partial] if partial is not None else [])))
        partial = out if partial is None else partial + out
    blocks.append(partial)
    return model.lnf(site("final", blocks))


def test_a_stream_flattened_around_the_mlp_is_one_chain():
    torch.manual_seed(0)
    model = FlatNet().eval()
    x = torch.randn(2, 5, 8)
    conv = ac.convert(model, (x,), preserve="exact", block_size=2)
    chain = conv.attnres_report.chains[0]
    assert chain.num_sublayers == 6 and not conv.attnres_report.left_alone
    with torch.no_grad():
        assert rel_err(conv(x), model(x)) <= 1e-5
        for p in ac.attnres_parameters(conv).values():
            p.add_(0.5 * torch.randn_like(p))
        other = torch.randn(3, 7, 8)
        want = _flat_reference(model, ac.attnres_state_dict(conv), other, 2)
        assert rel_err(conv(other), want) <= 1e-5


def test_a_view_that_mixes_tokens_into_features_is_not_a_stream():
    class Mixing(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(2 * d) for _ in range(3))
            self.lins = nn.ModuleList(nn.Linear(2 * d, 2 * d) for _ in range(3))

        def forward(self, x):  # [B, 2, D] -> [B, 2D]: tokens into features
            y = x.reshape(x.shape[0], -1)
            for n, lin in zip(self.norms, self.lins):
                y = y + lin(n(y))
            return y

    conv = ac.convert(Mixing().eval(), (torch.randn(3, 2, 8),), preserve="exact", dynamic=False)
    assert conv.attnres_report.chains[0].start != "x"  # the chain starts at the reshape, not the input
    start = conv.attnres_report.chains[0].start
    assert "view" in start or "reshape" in start


def test_a_transposed_stream_names_the_transpose():
    class Transposing(nn.Module):  # [T, B, D] <-> [B, T, D] between the two sublayers of each layer
        def __init__(self, d=8, n=3):
            super().__init__()
            self.n1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
            self.f1 = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
            self.n2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
            self.f2 = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

        def forward(self, x):
            for a, f, b, g in zip(self.n1, self.f1, self.n2, self.f2):
                x = x + f(a(x))
                x = x.transpose(0, 1)
                x = x + g(b(x))
                x = x.transpose(0, 1)
            return x

    with pytest.raises(ac.NoEligibleChainError) as info:
        ac.convert(Transposing().eval(), (torch.randn(2, 5, 8),), preserve="exact", dynamic=False)
    reasons = [r["reason"] for r in info.value.report.refused_chains]
    assert any("the stream is transposed between sublayers (transpose" in r for r in reasons), reasons
