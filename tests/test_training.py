"""attnres_compile.training (optimizer groups) and the starts the retrofit recipe study (issue 22) measured."""

from __future__ import annotations

import pytest
import torch

import attnres_compile as ac
from attnres_compile import training
from attnres_compile.analysis import record_sites
from examples.gpt import GPT, GPTConfig
from examples.retrofit import add_gates, recency_queries_

from .models import architectures, rel_err

IDS = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))


def gpt(seed=0, dtype=torch.float64, n_layer=4):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)).to(dtype).eval()


def exact(model, **kw):
    return ac.convert(model, (IDS,), num_blocks=2, preserve="exact", **kw)


def randomize_queries(conv, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in training.sites(conv).values():
            site.query.copy_(scale * torch.randn(site.query.shape, generator=g, dtype=torch.float64))
            site.norm_weight.copy_(1 + 0.1 * torch.randn(site.query.shape, generator=g, dtype=torch.float64))


# -- param_groups --------------------------------------------------------------------------------

def test_param_groups_partition_the_trainable_parameters():
    conv = exact(gpt())
    conv.transformer.wte.weight.requires_grad_(False)          # a frozen parameter is left out
    groups = ac.param_groups(conv, 1e-3, weight_decay=0.1, attnres_lr_mult=30.0)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in conv.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    decay, no_decay, extra = groups
    attn = {id(p) for p in ac.attnres_parameters(conv).values()}
    assert {id(p) for p in extra["params"]} == attn and len(attn) == 2 * len(training.sites(conv))
    assert (extra["lr"], extra["lr_mult"], extra["weight_decay"]) == (pytest.approx(3e-2), 30.0, 0.0)
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["lr"] == no_decay["lr"] == 1e-3


def test_param_groups_refuse_a_model_that_is_not_converted():
    with pytest.raises(TypeError, match="expected a model converted by attnres_compile.convert"):
        ac.param_groups(gpt(), 1e-3)


def test_param_groups_under_peft_and_the_trainer_keep_the_multiplier(tmp_path):
    """LoRA on a converted HF Llama, the AttnRes parameters trained too (modules_to_save is not
    needed: they are plain parameters), the optimizer handed to transformers.Trainer, whose LR
    scheduler scales every group from its own initial lr: the ratio holds at every step."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    arch = architectures()["llama"]
    torch.manual_seed(0)
    conv = ac.convert(arch["factory"](), arch["args"], preserve="exact")
    model = get_peft_model(conv, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for p in ac.attnres_parameters(model).values():
        p.requires_grad_(True)
    groups = ac.param_groups(model, 2e-3, attnres_lr_mult=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_" in names[id(p)] for g in groups[:-1] for p in g["params"])
    assert all("attnres" in names[id(p)] for p in groups[-1]["params"])
    opt = torch.optim.AdamW(groups)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 16, (16, 8), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=2e-3, warmup_steps=2, lr_scheduler_type="cosine_with_min_lr",
                             lr_scheduler_kwargs={"min_lr_rate": 0.1}, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in ac.attnres_parameters(model).items()}
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    lrs = [grp["lr"] for grp in opt.param_groups]
    assert lrs[-1] == pytest.approx(10.0 * lrs[0]) and lrs[0] > 0
    assert any((p - before[n]).abs().max() > 0 for n, p in ac.attnres_parameters(model).items())


# -- gates ---------------------------------------------------------------------------------------

def test_gated_sites_at_zero_keep_the_function_for_any_queries():
    model = gpt()
    conv = exact(model)
    gates = add_gates(conv)
    assert set(gates) == set(training.sites(conv)) and all(float(g) == 0.0 for g in gates.values())
    randomize_queries(conv)
    with torch.no_grad():
        assert rel_err(conv(IDS), model(IDS)) < 1e-12
    conv.train()
    conv(IDS).logsumexp(-1).mean().backward()
    for name, site in training.sites(conv).items():
        assert float(site.query.grad.abs().max()) == 0.0, name      # d/dquery carries the gate (0)
        assert float(site.gate.grad.abs()) > 0, name                # the gate itself learns first


def test_gate_and_query_at_zero_are_a_stationary_point():
    """Why the gated arm needs a start for the queries: with both at zero, an exact site's output
    is the plain stream, so neither the gate nor the query gets a gradient."""
    conv = exact(gpt()).train()
    add_gates(conv)
    conv(IDS).logsumexp(-1).mean().backward()
    for site in training.sites(conv).values():
        assert float(site.gate.grad.abs()) < 1e-10 and float(site.query.grad.abs().max()) == 0.0


def test_a_gate_follows_the_model_through_a_state_dict():
    conv = exact(gpt())
    add_gates(conv)
    with torch.no_grad():
        for i, site in enumerate(training.sites(conv).values()):
            site.gate.fill_(0.1 * (i + 1))
    randomize_queries(conv, seed=3)
    other = exact(gpt())
    add_gates(other)
    other.load_state_dict(conv.state_dict())
    with torch.no_grad():
        assert rel_err(other(IDS), conv(IDS)) < 1e-13
        assert rel_err(conv(IDS), exact(gpt())(IDS)) > 1e-3        # the gates and queries act


# -- recency start -------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.25, 0.5])
def test_recency_queries_reach_their_target_and_keep_a_gated_model_exact(strength):
    model = gpt(n_layer=6)
    conv = exact(model)
    add_gates(conv)
    reached = recency_queries_(conv, [(IDS,)], strength=strength)
    recs = record_sites(conv, (IDS,))
    assert {r.key for r in recs} == set(reached)
    for r in recs:
        m = len(r.weights)
        assert r.weights[-1] == pytest.approx(1 / m + strength * (1 - 1 / m), abs=1e-6), r.key
    with torch.no_grad():
        assert rel_err(conv(IDS), model(IDS)) < 1e-12


def test_recency_start_is_never_exact_without_a_gate():
    """docs/results.md: an ungated exact site reproduces the stream only with uniform weights."""
    model = gpt()
    conv = exact(model)
    recency_queries_(conv, [(IDS,)], strength=0.5)
    with torch.no_grad():
        assert rel_err(conv(IDS), model(IDS)) > 1e-3


# -- exact vs the paper's scale ------------------------------------------------------------------

def test_the_output_scale_is_invisible_through_prenorm_consumers():
    """Why a schedule from exact (scale M) to the paper's mixture (scale 1) changes nothing in a
    PreNorm model: every site feeds a LayerNorm, which removes a positive factor, up to its eps.
    The eps is what is left: with 1e-5 the logits here move by 44% (GPT-2's init makes the stream's
    RMS about 0.03, and random queries make some tokens' mixtures small); with 1e-12 by 3e-7."""
    model = gpt()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-12
    conv = exact(model).train()
    randomize_queries(conv, seed=5)
    conv(IDS).logsumexp(-1).mean().backward()
    ref_out = conv(IDS).detach()
    ref_grads = {n: p.grad.clone() for n, p in conv.named_parameters()}
    conv.zero_grad()
    for site in training.sites(conv).values():
        site.scale = 1.0
    out = conv(IDS)
    out.logsumexp(-1).mean().backward()
    assert rel_err(out.detach(), ref_out) < 1e-6      # eps 1e-12 over token variances down to ~1e-5
    for n, p in conv.named_parameters():
        assert rel_err(p.grad, ref_grads[n]) < 1e-5, n
