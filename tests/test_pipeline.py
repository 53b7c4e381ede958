"""Pipeline stages of a converted model (attnres_compile.parallel.pipeline), in one process.

The stages run as a pipeline runs them (`run_locally`: every boundary detached, backward stage
by stage from the last); loss and gradients must equal the uncut converted model's for every
cache policy and for stage boundaries on and inside blocks. tests/test_distributed.py runs the
same stages under torch.distributed.pipelining's schedules on 2 gloo ranks.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import attnres_compile as ac
from attnres_compile.parallel.pipeline import PipelineSplitError, pipeline_stages, run_locally
from examples.gpt import GPT, GPTConfig, GPTEmbed as Embed, GPTHead as Head, loss_fn


def converted_gpt(num_blocks: int, layers: int = 4):
    conv, ids = _converted_gpt(num_blocks, layers)
    return copy.deepcopy(conv), ids


@functools.lru_cache(maxsize=None)
def _converted_gpt(num_blocks: int, layers: int):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=layers, n_head=2, n_embd=32, dropout=0.0))
    ids = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(1))
    return ac.convert(gpt, (ids[:, :-1],), num_blocks=num_blocks), ids


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("cache", ["none", "received", "held"])
@pytest.mark.parametrize("num_blocks,bounds,ranks", [
    (2, [0, 1, 2, 3, 4], 2),     # stage boundaries inside blocks: the partial sum crosses
    (4, [0, 1, 2, 3, 4], 2),     # one block per stage
    (4, [0, 2, 4], 2),           # two physical stages
    (3, [0, 1, 3, 4], 3),        # uneven stages, three ranks
    (6, [0, 1, 2, 3, 4, 5, 6], 2),   # three virtual stages per rank
])
def test_stages_equal_the_uncut_model(cache, num_blocks, bounds, ranks):
    layers = bounds[-1]
    conv, ids = converted_gpt(num_blocks, layers)
    x, y = ids[:, :-1], ids[:, 1:]
    ref = copy.deepcopy(conv)
    ref_loss = loss_fn(ref(x), y)
    ref_loss.backward()
    model = copy.deepcopy(conv)
    stages = pipeline_stages(model, model.transformer.h, bounds, embed=Embed(model), head=Head(model),
                             ranks=ranks, cache=cache)
    loss = run_locally(stages, x, loss_fn=loss_fn, target=y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    refs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert rel(p.grad, refs[n].grad) <= 1e-5, n
    # what each boundary sent: the blocks the receiving rank does not hold yet (and the partial sum)
    assert [st.blocks_sent[-1] for st in stages[:-1]] == blocks_to_send(stages, ranks, cache)


def blocks_to_send(stages, ranks: int, cache: str) -> list[int]:
    """Per boundary, from sets of block ids: what each rank holds after each of its stages."""
    S = stages[0]._runtime.chains[0].plan.block_size
    done = [set(range(1 + st.stop_link // S)) for st in stages[:-1]]      # blocks complete after stage k
    held = {r: set() for r in range(ranks)}
    sent = []
    for k in range(len(stages) - 1):
        sender, receiver = k % ranks, (k + 1) % ranks
        if cache == "held":
            held[sender] |= done[k]                  # a rank keeps what it had when its stage ended
        if cache == "none":
            sent.append(len(done[k]))
            continue
        sent.append(len(done[k] - held[receiver]))
        if cache == "received":
            held[receiver] |= done[k]                # it keeps what it received
    return sent


def test_each_stage_owns_the_site_parameters_it_uses():
    """A site parameter registered in two stages of one rank would be scaled twice by a schedule."""
    conv, _ = converted_gpt(4)
    stages = pipeline_stages(conv, conv.transformer.h, [0, 1, 2, 3, 4], embed=Embed(conv), head=Head(conv), ranks=2)
    seen = {}
    for st in stages:
        for n, p in st.named_parameters():
            if n.startswith("sites."):
                assert id(p) not in seen, (n, seen.get(id(p)))
                seen[id(p)] = (st.index, n)
    assert len(seen) == len(ac.attnres_parameters(conv))
    assert "final" in dict(stages[-1].sites.named_children())


def test_eval_without_grad():
    conv, ids = converted_gpt(2)
    stages = pipeline_stages(conv, conv.transformer.h, [0, 2, 4], embed=Embed(conv), head=Head(conv), cache="held")
    conv.eval()
    with torch.no_grad():
        torch.testing.assert_close(run_locally(stages, ids[:, :-1]), conv(ids[:, :-1]))


class OwnerLoopGPT(nn.Module):
    """Residual adds in the owner's loop, not inside the layers: no layer boundary holds a whole sublayer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(4)])
        self.fs = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
        self.out = nn.LayerNorm(16)

    def forward(self, idx):
        h = self.emb(idx)
        for norm, f in zip(self.norms, self.fs):
            h = h + f(norm(h))
        return self.out(h)


def test_bad_splits_name_the_stage_or_the_add():
    conv, _ = converted_gpt(2)
    h = conv.transformer.h
    kw = {"embed": Embed(conv), "head": Head(conv)}
    with pytest.raises(PipelineSplitError, match="not a model returned by attnres_compile.convert"):
        pipeline_stages(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)), h, [0, 2, 4], **kw)
    with pytest.raises(PipelineSplitError, match=r"bounds must rise strictly from 0 to the 4 layers.*\[0, 2, 2, 4\]"):
        pipeline_stages(conv, h, [0, 2, 2, 4], **kw)
    with pytest.raises(PipelineSplitError, match="bounds must rise"):
        pipeline_stages(conv, h, [0, 4], **kw)
    with pytest.raises(PipelineSplitError, match="cache must be one of"):
        pipeline_stages(conv, h, [0, 2, 4], cache="some", **kw)
    with pytest.raises(PipelineSplitError, match="chain 3 does not exist"):
        pipeline_stages(conv, h, [0, 2, 4], chain=3, **kw)
    with pytest.raises(PipelineSplitError, match="sublayer 0 .* outside the layers given"):
        pipeline_stages(conv, list(h)[1:] + [h[0]][:0], [0, 1, 3], **kw)
    with pytest.raises(PipelineSplitError, match="not in the order the sublayers run"):
        pipeline_stages(conv, [h[1], h[0], h[2], h[3]], [0, 2, 4], **kw)
    owner = OwnerLoopGPT()
    conv2 = ac.convert(owner, (torch.randint(0, 32, (2, 5)),), num_blocks=2)
    with pytest.raises(PipelineSplitError, match=r"chain 0, sublayer 0 \(.*\): its residual add at .* is in "
                                                 r"OwnerLoopGPT.forward, outside the layers given"):
        pipeline_stages(conv2, conv2.fs, [0, 2, 4], embed=conv2.emb, head=conv2.out)
