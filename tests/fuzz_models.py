"""Random residual architectures for the property-based tests (tests/test_fuzz.py).

A drawn *spec* is plain data (dicts, lists, strings, ints), so hypothesis prints a failing
example as something one can read and rebuild with `FuzzNet(spec)`. The builder covers what
SPEC section 5 talks about: PreNorm and PostNorm steps, LayerNorm / RMSNorm (module and
hand-written) / no norm, attention-like (matmul of projections) and MLP-like branches,
parallel branches added in one step, nested residuals inside a branch, several chains (two
streams, an encoder then a decoder reading it), broadcasting and bias adds, and the stream
read outside its chain (returned hidden states, a skip into the head, a later branch reading
the embedding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

NORMS = ["layer", "rms", "rms_manual", "none"]
BRANCHES = ["mlp", "attn", "gate", "nested", "pool"]
FORMS = ["plain", "swapped", "torch_add", "scaled", "alpha", "inplace", "inplace_branch", "postnorm",
         "parallel_left", "parallel_sum", "parallel_right", "skip_in_branch", "flat", "flat_branch",
         "unit_scaled", "decayed"]
BETWEEN = ["none", "none", "none", "bias", "scale", "view", "dropout", "cast", "inplace_scale"]
OUTSIDE = ["none", "return_all", "return_mid", "skip_to_head"]
TOPOLOGY = ["single", "single", "single", "two_streams", "shared_start", "enc_dec", "fork"]


# -- the spec ------------------------------------------------------------------------------

@st.composite
def branch_specs(draw, seq: bool):
    kinds = BRANCHES if seq else [k for k in BRANCHES if k not in ("attn", "pool")]
    return {
        "kind": draw(st.sampled_from(kinds)),
        "norm": draw(st.sampled_from(NORMS)),
        "bias_add": draw(st.booleans()),
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.1])),
        "nested": draw(st.integers(1, 2)),
    }


@st.composite
def step_specs(draw, seq: bool, cross: bool, first: bool = False):
    form = draw(st.sampled_from(FORMS))
    spec = {
        "form": form,
        "f": draw(branch_specs(seq)),
        "between": draw(st.sampled_from(BETWEEN)),
        "cross": cross and seq and (first or draw(st.booleans())),
    }
    if spec["cross"]:  # cross-attention: the decoder's branch reads the encoder's output
        spec["f"]["kind"] = "attn"
    if form.startswith("parallel"):
        spec["g"] = draw(branch_specs(seq))
    return spec


@st.composite
def stream_specs(draw, seq: bool, cross: bool = False, max_depth: int = 5):
    depth = draw(st.integers(1, max_depth))
    return {
        "steps": [draw(step_specs(seq, cross, first=(i == 0))) for i in range(depth)],
        "start": draw(st.sampled_from(["none", "none", "bias", "pos"])) if seq else "none",
    }


@st.composite
def model_specs(draw):
    seq = draw(st.booleans())
    topology = draw(st.sampled_from(TOPOLOGY))
    n_streams = {"single": 1, "fork": 3}.get(topology, 2)
    # depth 1-5 for the first stream; later ones are kept shorter so 200 examples run in CI time
    streams = [draw(stream_specs(seq, cross=(topology == "enc_dec" and i == 1), max_depth=5 if i == 0 else 3))
               for i in range(n_streams)]
    return {
        "d": draw(st.integers(4, 24)),
        "seq": seq,
        "input": draw(st.sampled_from(["tokens", "features", "raw"])),  # raw: the input is the stream
        "topology": topology,
        "streams": streams,
        "final_norm": draw(st.sampled_from(NORMS)),
        "outside": draw(st.sampled_from(OUTSIDE)),
        "seed": draw(st.integers(0, 2**16)),
    }


# -- the builder -----------------------------------------------------------------------------

class ManualRMSNorm(nn.Module):
    """Hugging Face style: cast to float32, pow, mean, add eps, rsqrt, multiply, weight."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(dtype)


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d)
    if kind == "rms":
        return nn.RMSNorm(d, eps=1e-6)
    if kind == "rms_manual":
        return ManualRMSNorm(d)
    return nn.Identity()


class Branch(nn.Module):
    """One residual branch f(x): norm, then an MLP / attention / gate / nested-residual core."""

    def __init__(self, spec: dict, d: int, cross: bool = False):
        super().__init__()
        self.kind = spec["kind"]
        self.norm = make_norm(spec["norm"], d)
        self.drop = nn.Dropout(spec["dropout"])
        self.cross = cross
        if self.kind == "mlp":
            self.fc = nn.Linear(d, 2 * d)
            self.out = nn.Linear(2 * d, d)
        elif self.kind == "attn":
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        elif self.kind == "gate":
            self.a = nn.Linear(d, d)
            self.b = nn.Linear(d, d, bias=False)
        elif self.kind == "pool":  # [B, 1, D]: broadcasts when added to the stream
            self.fc = nn.Linear(d, d)
        else:  # nested: h = lin(norm(x)); h = h + mlp_i(ln_i(h)) (an inner residual chain); out(h)
            self.inp = nn.Linear(d, d)
            self.inner = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh())
                                       for _ in range(spec["nested"]))
            self.out = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(d) * 0.1) if spec["bias_add"] else None

    def forward(self, x, memory=None):
        h = self.norm(x)
        if self.kind == "mlp":
            y = self.out(F.gelu(self.fc(h)))
        elif self.kind == "attn":
            kv = memory if (self.cross and memory is not None) else h
            q, k, v = self.q(h), self.k(kv), self.v(kv)
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            y = self.o(att @ v)
        elif self.kind == "gate":
            y = self.a(h) * torch.sigmoid(self.b(h))
        elif self.kind == "pool":
            y = self.fc(h.mean(-2, keepdim=True))
        else:
            z = self.inp(h)
            for layer in self.inner:
                z = z + layer(z)
            y = self.out(z)
        y = self.drop(y)
        if self.bias is not None:
            y = y + self.bias  # a broadcasting bias add inside the sublayer
        return y


class Step(nn.Module):
    """One residual step on the stream, in one of several syntactic forms."""

    def __init__(self, spec: dict, d: int):
        super().__init__()
        self.form = spec["form"]
        self.between = spec["between"]
        self.f = Branch(spec["f"], d, cross=spec.get("cross", False))
        self.g = Branch(spec["g"], d) if "g" in spec else None
        if self.form == "postnorm":
            self.post = nn.LayerNorm(d)
        if self.form == "skip_in_branch":
            self.skip = nn.Linear(d, d, bias=False)
        if self.between == "bias":
            self.stream_bias = nn.Parameter(torch.randn(d) * 0.1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, x0, memory=None):
        f = self.f
        form = self.form
        if form == "plain":
            x = x + f(x, memory)
        elif form == "swapped":
            x = f(x, memory) + x
        elif form == "torch_add":
            x = torch.add(x, f(x, memory))
        elif form == "scaled":
            x = x + 0.5 * f(x, memory)
        elif form == "alpha":
            x = torch.add(x, f(x, memory), alpha=0.5)
        elif form == "inplace":  # in-place on a fresh copy (f's saved inputs stay intact)
            y = f(x, memory)
            x = x.clone()
            x += y
        elif form == "inplace_branch":  # `y = f(x); y += x`: the branch output takes the stream
            y = f(x, memory)
            if y.shape != x.shape:  # a pooled branch: make room for the stream
                y = y.expand_as(x).clone()
            y += x
            x = y
        elif form == "postnorm":
            x = self.post(x + f(x, memory))
        elif form == "parallel_left":
            x = (x + f(x, memory)) + self.g(x)
        elif form == "parallel_sum":
            x = x + (f(x, memory) + self.g(x))
        elif form == "parallel_right":
            x = f(x, memory) + self.g(x) + x
        elif form == "skip_in_branch":  # the branch also reads the stream's start
            x = x + (f(x, memory) + self.skip(x0))
        elif form == "flat":  # the residual add on the tokens flattened, then the stream's shape again
            y = f(x, memory)
            if y.shape == x.shape:
                x = (x.reshape(-1, x.shape[-1]) + y.reshape(-1, y.shape[-1])).view(x.shape)
            else:
                x = x + y
        elif form == "flat_branch":  # the whole step on flattened tokens (token-wise branches only)
            if f.kind in ("mlp", "gate", "nested") and memory is None:
                shape = x.shape
                flat = x.reshape(-1, shape[-1])
                x = (flat + f(flat, None)).view(shape)
            else:
                x = x + f(x, memory)
        elif form == "unit_scaled":  # `1.0 * x + f(x)`: the plain stream
            x = 1.0 * x + f(x, memory)
        elif form == "decayed":  # `0.5 * x + f(x)`: a decaying stream, refused
            x = 0.5 * x + f(x, memory)
        else:
            raise ValueError(form)
        between = self.between
        if between == "bias":
            x = x + self.stream_bias
        elif between == "scale":
            x = x * 0.5
        elif between == "view":
            x = x.reshape(-1, x.shape[-1]).view(x.shape)
        elif between == "dropout":
            x = self.drop(x)
        elif between == "cast":
            x = x.to(torch.float64).to(torch.float32)
        elif between == "inplace_scale":
            x.mul_(0.5)
        return x


class Stream(nn.Module):
    def __init__(self, spec: dict, d: int, ctx: int):
        super().__init__()
        self.steps = nn.ModuleList(Step(s, d) for s in spec["steps"])
        self.start = spec["start"]
        if self.start == "bias":
            self.start_bias = nn.Parameter(torch.randn(d) * 0.1)
        elif self.start == "pos":
            self.pos = nn.Embedding(ctx, d)

    def forward(self, x, memory=None):
        if self.start == "bias":
            x = x + self.start_bias
        elif self.start == "pos":
            x = x + self.pos(torch.arange(x.shape[-2], device=x.device))
        x0 = x
        states = [x]
        for step in self.steps:
            x = step(x, x0, memory)
            states.append(x)
        return x, states


class FuzzNet(nn.Module):
    VOCAB, FEATURES, CTX, OUT = 11, 5, 8, 3

    def __init__(self, spec: dict):
        super().__init__()
        torch.manual_seed(spec["seed"])
        d = spec["d"]
        self.spec = spec
        self.topology = spec["topology"]
        self.outside = spec["outside"]
        n = len(spec["streams"])
        kind = spec["input"]
        if kind == "tokens":
            self.embed = nn.ModuleList(nn.Embedding(self.VOCAB, d) for _ in range(n))
        elif kind == "features":
            self.embed = nn.ModuleList(nn.Linear(self.FEATURES, d) for _ in range(n))
        else:  # the first stream starts at the model's input itself
            self.embed = nn.ModuleList([nn.Identity()] + [nn.Linear(d, d) for _ in range(n - 1)])
        self.streams = nn.ModuleList(Stream(s, d, self.CTX) for s in spec["streams"])
        self.norms = nn.ModuleList(make_norm(spec["final_norm"], d) for _ in range(n))
        self.head = nn.Linear(d, self.OUT)
        self.cross_reads = any(
            step.get("cross") and step["f"]["kind"] == "attn" for st_ in spec["streams"] for step in st_["steps"]
        )
        if self.outside == "skip_to_head":
            self.skip = nn.Linear(d, self.OUT, bias=False)

    def example_inputs(self, batch: int = 2, seq: int = 5):
        g = torch.Generator().manual_seed(self.spec["seed"])
        shape = (batch, seq) if self.spec["seq"] else (batch,)
        if self.spec["input"] == "tokens":
            return (torch.randint(0, self.VOCAB, shape, generator=g),)
        width = self.FEATURES if self.spec["input"] == "features" else self.spec["d"]
        return (torch.randn(*shape, width, generator=g),)

    def forward(self, inp):
        topo = self.topology
        x = self.embed[0](inp)
        a, states = self.streams[0](x)
        if topo == "single":
            z = self.norms[0](a)
            all_states = states
        elif topo == "fork":  # two streams continue from the first one's end
            b, states_b = self.streams[1](a)
            c, states_c = self.streams[2](a)
            all_states = states + states_b + states_c
            z = self.norms[1](b) + self.norms[2](c)
        else:
            memory = self.norms[0](a) if topo == "enc_dec" else None
            if topo == "shared_start":
                y = x
            elif topo == "enc_dec" and not self.cross_reads:
                y = self.embed[1](inp) + memory  # no cross-attention: the decoder starts from it
            else:
                y = self.embed[1](inp)
            b, states_b = self.streams[1](y, memory)
            all_states = states + states_b
            if topo == "enc_dec":
                z = self.norms[1](b)
            else:
                z = self.norms[0](a) + self.norms[1](b)
        out = self.head(z)
        if self.outside == "skip_to_head":
            out = out + self.skip(all_states[len(all_states) // 2])
        if self.outside == "return_all":
            return out, tuple(all_states)
        if self.outside == "return_mid":
            return out, all_states[len(all_states) // 2]
        return out
