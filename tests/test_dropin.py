"""The converted model is the user's model (issue 10): any call, any precision, its own modules,
saved whole.

Every model is converted from `(input_ids,)` (or the image) alone, in exact mode, and then
called the way its users call it. Two references:

* at step 0 (zero queries), the original model itself: exact mode must reproduce it;
* with random queries, the SPEC schedule applied by another mechanism: the captured graph of
  that very call rewritten node by node (conversion/graph_rewrite.py) with the same weights, or,
  for the examples GPT, a hand-written loop over its blocks.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import attnres_compile as ac
from attnres_compile.conversion.capture import capture
from attnres_compile.ops.reference import depth_attention_reference
from attnres_compile.plan.schedule import block_schedule

from .models import architectures, main_output, perturb, rel_err

ROOT = Path(__file__).resolve().parents[1]
ARCH = architectures()
LMS = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox_parallel"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def build(name, seed=0):
    torch.manual_seed(seed)
    return ARCH[name]["factory"]().eval()


@pytest.fixture(scope="module", params=LMS)
def lm(request):
    model = build(request.param)
    conv = ac.convert(model, (IDS,), preserve="exact", num_blocks=2)  # no kwargs at all
    return request.param, model, conv


def graph_reference(model, conv, args, kwargs):
    """The call's captured graph, rewritten node by node with the converted model's weights."""
    gm = capture(model, args, kwargs, training=model.training, dynamic=False).module
    plan = conv.attnres.plan
    ref = ac.convert(gm, args, kwargs=kwargs, block_size=plan.chains[0].block_size, preserve=plan.preserve)
    ac.load_attnres_state_dict(ref, ac.attnres_state_dict(conv))
    with torch.no_grad():
        return ref(*args, **kwargs)


def padded_batch(batch=3, seq=9):
    ids = torch.randint(1, 64, (batch, seq), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


# -- 1. any call the original accepts ----------------------------------------------------------

CALLS = {
    "plain": lambda ids, mask: ((ids,), {}),
    "attention_mask": lambda ids, mask: ((ids,), {"attention_mask": mask}),
    "labels": lambda ids, mask: ((ids,), {"attention_mask": mask, "labels": ids}),
    "position_ids": lambda ids, mask: ((ids,), {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}),
    "mask_none": lambda ids, mask: ((ids,), {"attention_mask": None}),
    "keywords_only": lambda ids, mask: ((), {"input_ids": ids, "attention_mask": mask}),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_any_call_matches_the_original_at_step0(lm, call):
    name, model, conv = lm
    args, kwargs = CALLS[call](*padded_batch())
    with torch.no_grad():
        want, got = model(*args, **kwargs), conv(*args, **kwargs)
    assert rel_err(got.logits, want.logits) <= 1e-5
    if "labels" in kwargs:
        assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())


def test_hidden_states_return_dict_and_cache(lm):
    name, model, conv = lm
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_hidden_states=True)
        got = conv(ids, attention_mask=mask, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states)
        for g, w in zip(got.hidden_states, want.hidden_states):
            assert rel_err(g, w) <= 1e-5
        as_tuple = conv(ids, attention_mask=mask, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], want.logits) <= 1e-5
        cached = conv(ids, attention_mask=mask, use_cache=True)
        assert cached.past_key_values is not None and rel_err(cached.logits, want.logits) <= 1e-5


@pytest.mark.parametrize("call", ["attention_mask", "position_ids", "plain"])
def test_random_queries_match_the_graph_rewrite_of_the_same_call(lm, call):
    name, model, conv = lm
    conv = perturb(copy.deepcopy(conv))
    args, kwargs = CALLS[call](*padded_batch())
    kwargs = {**kwargs, "use_cache": False}
    with torch.no_grad():
        got = conv(*args, **kwargs)
        plain = model(*args, **kwargs)
    ref = graph_reference(model, conv, args, kwargs)
    assert rel_err(got.logits, ref.logits) <= 1e-5
    assert rel_err(got.logits, plain.logits) > 1e-3  # the queries matter


def _gpt_reference(model, params, idx, block_size):
    """The SPEC section 2 loop over the examples GPT's blocks, float64 sites (exact mode)."""
    tr = model.transformer
    pos = torch.arange(idx.shape[1])
    a0 = tr.drop(tr.wte(idx) + tr.wpe(pos))
    subs = []
    for blk in tr.h:
        subs += [lambda h, b=blk: b.attn(b.ln_1(h)), lambda h, b=blk: b.mlp(b.ln_2(h))]

    def site(name, sources):
        if len(sources) == 1:
            return sources[0]
        q = params[f"attnres.chain0.{name}.query"]
        g = params[f"attnres.chain0.{name}.norm_weight"]
        return depth_attention_reference([s.double() for s in sources], q.double(), g.double(),
                                         eps=tr.h[0].ln_1.eps).float() * len(sources)

    blocks, partial = [], a0
    for i, f in enumerate(subs):
        if i % block_size == 0:
            blocks.append(partial)
            partial = None
        h = site(f"site{i}", blocks + ([partial] if partial is not None else []))
        out = f(h)
        partial = out if partial is None else partial + out
    blocks.append(partial)
    return model.lm_head(tr.ln_f(site("final", blocks)))


def test_examples_gpt_random_queries_match_the_spec_loop():
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 256, (1, 1))  # batch 1, sequence 1 at conversion
    conv = perturb(ac.convert(model, (idx,), preserve="exact", block_size=2))
    other = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        got = conv(other)
        want = _gpt_reference(model, ac.attnres_state_dict(conv), other, 2)
    assert rel_err(got, want) <= 1e-5


# -- 2. shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batch1_seq1_example_runs_other_sizes(name):
    model = build(name)
    conv = ac.convert(model, (torch.tensor([[5]]),), preserve="exact")
    for shape in [(3, 9), (1, 16), (4, 1)]:
        ids = torch.randint(0, 64, shape)
        with torch.no_grad():
            assert rel_err(conv(ids).logits, model(ids).logits) <= 1e-5


def test_vit_other_image_size_with_interpolate_pos_encoding():
    model = build("vit")
    conv = perturb(ac.convert(model, ARCH["vit"]["args"], preserve="exact"))
    zero = ac.convert(model, ARCH["vit"]["args"], preserve="exact")
    img = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        want = model(img, interpolate_pos_encoding=True).last_hidden_state
        assert rel_err(zero(img, interpolate_pos_encoding=True).last_hidden_state, want) <= 1e-5
    kwargs = {"interpolate_pos_encoding": True}
    with torch.no_grad():
        got = conv(img, **kwargs).last_hidden_state
    assert rel_err(got, graph_reference(model, conv, (img,), kwargs).last_hidden_state) <= 1e-5


# -- 3. precision ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_bfloat16_matches_the_original_and_trains(name, training):
    model = build(name).train(training)
    conv = ac.convert(model, (IDS,), preserve="exact").train(training)
    ids, mask = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)  # GPT-2's dropout draws the same masks in both
        want = model(ids, attention_mask=mask, labels=ids)
        torch.manual_seed(1)
        got = conv(ids, attention_mask=mask, labels=ids)
    err = (got.logits.float() - want.logits.float()).norm() / want.logits.float().norm()
    assert err <= 1e-2
    perturb(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = conv(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in ac.attnres_parameters(conv).items()}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())


def test_to_bfloat16_keeps_the_models_float32_upcasts():
    """`.to(bfloat16)` after conversion runs the model's own code, RMSNorm's float32 variance
    included: the same as converting the bfloat16 model."""
    model = build("llama")
    after = perturb(ac.convert(model, (IDS,), preserve="exact")).to(torch.bfloat16)
    before = ac.convert(copy.deepcopy(model).to(torch.bfloat16), (IDS,), preserve="exact")
    ac.load_attnres_state_dict(before, ac.attnres_state_dict(after))
    with torch.no_grad():
        a, b = after(IDS).logits, before(IDS).logits
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    half = ac.convert(model, (IDS,), preserve="exact").half()
    with torch.no_grad():
        want = copy.deepcopy(model).half()(IDS).logits.float()
        assert (half(IDS).logits.float() - want).norm() / want.norm() <= 1e-2


# -- 4. activation checkpointing -------------------------------------------------------------

def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _gpt_train():
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=32)).train()


@pytest.mark.parametrize("how", ["hf", "hf_copying_hooks", "checkpoint_wrapper"])
def test_activation_checkpointing_recomputes_with_equal_gradients(how):
    """Hugging Face's layer checkpointing (also under saved-tensor hooks that hand back other
    tensor objects, as offloading does) and torch's checkpoint_wrapper on the examples GPT's
    blocks: the recompute runs (a hook inside the first layer fires again in backward), the
    gradients equal the run without checkpointing, and fewer bytes are saved for backward."""
    if how == "checkpoint_wrapper":
        model = _gpt_train()
        x = torch.randint(0, 256, (2, 16))
        conv = perturb(ac.convert(model, (x,), preserve="exact"))
        probe = conv.transformer.h[0].mlp
        run = lambda: conv(x).square().mean()  # noqa: E731
    else:
        model = build("llama").train()
        conv = perturb(ac.convert(model, (IDS,), preserve="exact"))
        ids, mask = padded_batch()
        probe = conv.model.layers[0].mlp
        run = lambda: conv(ids, attention_mask=mask, labels=ids).loss  # noqa: E731
    calls = []
    probe.register_forward_hook(lambda *a: calls.append(1))

    def step(hooks=False):
        conv.zero_grad(set_to_none=True)
        ctx = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hooks
               else warnings.catch_warnings())
        with ctx:
            loss, saved = _saved_bytes(run)
            n_forward = len(calls)
            loss.backward()
        return _grads(conv), saved, len(calls) - n_forward

    plain, plain_saved, plain_recomputes = step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: gradient_checkpointing_enable is deprecated
        if how == "checkpoint_wrapper":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            from examples.gpt import Block

            apply_activation_checkpointing(conv, check_fn=lambda m: isinstance(m, Block))
        else:
            conv.gradient_checkpointing_enable()
    calls.clear()
    ckpt, ckpt_saved, recomputes = step(hooks=how == "hf_copying_hooks")
    assert plain_recomputes == 0 and recomputes == 1  # layer 0's MLP ran again in backward
    assert {n.replace("._checkpoint_wrapped_module", "") for n in ckpt} == plain.keys()
    for n, g in ckpt.items():
        assert rel_err(g, plain[n.replace("._checkpoint_wrapped_module", "")]) <= 1e-5, n
    assert ckpt_saved < plain_saved / 2


class _CheckpointedBlocks(torch.nn.Module):
    """A model that checkpoints its blocks itself, as modules (recompute goes through __call__)."""

    def __init__(self, d=16, n=3):
        super().__init__()
        from examples.gpt import Block, GPTConfig

        self.blocks = torch.nn.ModuleList(Block(GPTConfig(n_embd=d, n_head=2, block_size=8)) for _ in range(n))
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 5))
        self.reentrant = None  # None: no checkpointing

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for blk in self.blocks:
            x = blk(x) if self.reentrant is None or not self.training else checkpoint(
                blk, x, use_reentrant=self.reentrant)
        return self.head(x)


def test_torch_utils_checkpoint_of_modules_in_the_models_code():
    torch.manual_seed(0)
    model = _CheckpointedBlocks().train()
    model.reentrant = False
    x = torch.randn(2, 8, 16)
    conv = perturb(ac.convert(model, (x,), preserve="exact"))
    twin = copy.deepcopy(conv)
    twin.reentrant = None
    out, saved = _saved_bytes(lambda: conv(x))
    out.square().mean().backward()
    ref, ref_saved = _saved_bytes(lambda: twin(x))
    ref.square().mean().backward()
    assert rel_err(out, ref) <= 1e-5 and saved < ref_saved
    g, r = _grads(conv), _grads(twin)
    assert g.keys() == r.keys()
    for n in r:
        assert rel_err(g[n], r[n]) <= 1e-5, n


def test_reentrant_checkpoint_is_refused_naming_the_sublayer():
    torch.manual_seed(0)
    model = _CheckpointedBlocks().train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    conv = ac.convert(model, (x,), preserve="exact")
    conv.reentrant = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ac.PlanMismatchError, match=r"sublayer \d+ \(blocks\.\d+\.\w+\) runs with gradients off.*"
                                                      r"use_reentrant=False"):
            conv(x)


# -- 5. the module tree, hooks, PEFT ----------------------------------------------------------

@pytest.mark.parametrize("name", [*LMS, "vit"])
def test_leaf_modules_keep_class_and_path(name):
    model = build(name)
    conv = ac.convert(model, ARCH[name]["args"], preserve="exact")
    assert type(conv) is type(model)
    mine = {n: type(m) for n, m in conv.named_modules() if not n.startswith("attnres")}
    theirs = {n: type(m) for n, m in model.named_modules()}
    assert mine == theirs


def test_layer_forward_hook_fires_once_per_forward(lm):
    name, model, conv = lm
    layers = [m for n, m in conv.named_modules() if n.endswith("layers.1") or n.endswith("h.1")]
    fired = []
    handle = layers[0].register_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            conv(IDS)
            conv(IDS)
    finally:
        handle.remove()
    assert len(fired) == 2


@pytest.mark.parametrize("train_attnres", [True, False], ids=["attnres_trained", "attnres_frozen"])
def test_peft_lora_trains_on_a_converted_model(train_attnres):
    from peft import LoraConfig, get_peft_model

    model = build("llama")
    conv = ac.convert(model, (IDS,), preserve="exact")
    peft = get_peft_model(conv, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert rel_err(peft(input_ids=IDS).logits, model(IDS).logits) <= 1e-5  # LoRA B starts at zero
    attn = ac.attnres_parameters(peft)
    assert attn and all(n.startswith("base_model.model.attnres.") for n in attn)
    for p in attn.values():
        p.requires_grad_(train_attnres)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    ids, _ = padded_batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        if not losses[1:]:
            lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
            assert lora and all(p.grad is not None for p in lora.values())
            assert all(p.grad.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0
            base = [n for n, p in peft.named_parameters() if "lora_" not in n and n not in attn]
            assert all(dict(peft.named_parameters())[n].grad is None for n in base)
            assert all((p.grad is not None) == train_attnres for p in attn.values())
        opt.step()
    assert losses[-1] < losses[0]


# -- 6. Hugging Face identity ------------------------------------------------------------------

def test_hf_attributes_and_methods_stay():
    model = build("llama")
    conv = ac.convert(model, (IDS,))
    assert conv.config is not model.config and conv.config.num_hidden_layers == model.config.num_hidden_layers
    assert conv.generation_config is not None and conv.can_generate()
    assert conv.device == torch.device("cpu") and conv.dtype == torch.float32
    assert "attnres" in conv.config.to_dict() and "attnres" not in model.config.to_dict()
    assert not hasattr(model, "attnres")


def _run_fresh(code: str, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("gpt_neox_parallel", marks=pytest.mark.slow)])
def test_save_pretrained_and_from_pretrained_in_a_fresh_process(tmp_path, name):
    model = build(name)
    conv = perturb(ac.convert(model, (IDS,), preserve="exact", num_blocks=2))
    conv.save_pretrained(tmp_path / "ckpt")
    ids, mask = padded_batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        want = conv(ids, attention_mask=mask).logits
    _run_fresh("""
        import sys, torch, attnres_compile as ac
        d = sys.argv[1]
        model = ac.from_pretrained(d + "/ckpt")
        x = torch.load(d + "/inputs.pt")
        with torch.no_grad():
            torch.save(model(x["ids"], attention_mask=x["mask"]).logits, d + "/out.pt")
        print(type(model).__name__, model.attnres_report if hasattr(model, "attnres_report") else "")
    """, tmp_path)
    got = torch.load(tmp_path / "out.pt")
    assert rel_err(got, want) <= 1e-6


def test_from_pretrained_refuses_another_class_or_no_plan(tmp_path):
    from transformers import MistralForCausalLM

    conv = ac.convert(build("llama"), (IDS,))
    conv.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="made for LlamaForCausalLM, not MistralForCausalLM"):
        ac.from_pretrained(tmp_path / "c", model_class=MistralForCausalLM)
    build("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'attnres' section"):
        ac.from_pretrained(tmp_path / "plain")


def test_transformers_trainer_trains_a_converted_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    conv = ac.convert(build("llama"), (IDS,))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 16, (32, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=5, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=conv, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3
    assert any(p.abs().max() > 0 for n, p in ac.attnres_parameters(conv).items() if n.endswith(".query"))


# -- 7. saving whole --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), pytest.param("vit", marks=pytest.mark.slow),
                                  "examples_gpt"])
def test_torch_save_load_in_a_fresh_process(tmp_path, name):
    if name == "examples_gpt":
        from examples.gpt import GPT, GPTConfig

        torch.manual_seed(0)
        model, x = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)).eval(), torch.randint(0, 256, (2, 9))
    else:
        model, x = build(name), ARCH[name]["args"][0]
    conv = perturb(ac.convert(model, (x,), num_blocks=2))
    buf = io.BytesIO()
    torch.save(conv, buf)  # the whole module: class, tree, parameters, plan
    (tmp_path / "model.pt").write_bytes(buf.getvalue())
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = main_output(conv(x))
    _run_fresh("""
        import sys, torch
        from tests.models import main_output
        d = sys.argv[1]
        m = torch.load(d + "/model.pt", weights_only=False)
        with torch.no_grad():
            torch.save(main_output(m(torch.load(d + "/x.pt"))), d + "/out.pt")
    """, tmp_path)
    assert rel_err(torch.load(tmp_path / "out.pt"), want) <= 1e-6
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # and in this process
    with torch.no_grad():
        assert rel_err(main_output(again(x)), want) <= 1e-6


# -- 8. selecting streams ----------------------------------------------------------------------

def test_filter_fn_selects_chains_and_reports_the_rest():
    model = build("t5")
    spec = ARCH["t5"]
    conv = ac.convert(model, spec["args"], kwargs=spec["kwargs"], preserve="exact",
                      filter_fn=lambda chain: chain.owner.startswith("decoder"))
    rep = conv.attnres_report
    assert len(rep.chains) == 1 and all(s.module.startswith("decoder.") for s in rep.chains[0].sites[:-1])
    assert [r["reason"] for r in rep.refused_chains] == ["not selected (filter_fn returned False)"]
    with torch.no_grad():
        got = conv(spec["args"][0], decoder_input_ids=spec["kwargs"]["decoder_input_ids"])
        want = model(spec["args"][0], decoder_input_ids=spec["kwargs"]["decoder_input_ids"])
    assert rel_err(got.last_hidden_state, want.last_hidden_state) <= 1e-5
    with pytest.raises(ac.NoEligibleChainError, match="not selected"):
        ac.convert(model, spec["args"], kwargs=spec["kwargs"], filter_fn=lambda chain: False)


# -- 9. verification as a library --------------------------------------------------------------

def test_verify_returns_a_report():
    model = build("llama")
    conv = ac.convert(model, (IDS,), preserve="exact")
    before = ac.attnres_state_dict(conv)
    report = ac.verify(conv, (IDS,), original=model, expect_sites=5, onnx=True)
    assert report.passed, str(report)
    assert [c.name for c in report.checks] == ["sites", "step-0 equivalence", "gradient flow", "onnx parity"]
    assert report.to_dict()["status"] == "pass" and "PASS" in str(report)
    after = ac.attnres_state_dict(conv)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the checks changed nothing
    bad = ac.verify(conv, (IDS,), expect_sites=3)
    assert not bad.passed and bad.checks[0].detail == "5 (expected 3)"


# -- bad input ---------------------------------------------------------------------------------

class _Skippable(torch.nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(n))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))

    def forward(self, x, depth: int | None = None):
        for i, (n, lin) in enumerate(zip(self.norms, self.lins)):
            if depth is not None and i >= depth:
                break
            x = x + lin(n(x))
        return x


def test_a_call_that_leaves_the_plan_names_the_chain():
    model = _Skippable()
    x = torch.randn(2, 8)
    conv = ac.convert(model, (x,), preserve="exact")
    with pytest.raises(ac.PlanMismatchError, match=r"chain 0 .* ran sublayers 0\.\.1 of 3 and stopped before "
                                                   r"sublayer 2 \(lins\.2"):
        conv(x, depth=2)
    with pytest.raises(ac.PlanMismatchError, match=r"chain 0 .* none of its 3 residual adds ran"):
        conv(x, depth=0)
    assert rel_err(conv(x), model(x)) <= 1e-5  # and the next call is fine


def test_the_users_model_is_not_touched():
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    conv = ac.convert(model, (IDS,), preserve="exact")
    perturb(conv)
    conv(IDS).logits.sum().backward()
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="already converted"):
        ac.convert(conv, (IDS,))


class _CheckpointedFunction(torch.nn.Module):
    """Checkpoints a plain function holding the residual adds: a method of the module (installed
    in code: its recompute runs the recompiled method) or a free function (watched by the mode,
    which cannot re-enter for the recompute)."""

    def __init__(self, d=8, n=3, free=False, ckpt=True):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(n))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
        self.free, self.ckpt = free, ckpt

    def _layer(self, x, i):
        return x + self.lins[i](self.norms[i](x))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for i in range(len(self.lins)):
            fn, args = (_free_layer, (x, self.lins[i], self.norms[i])) if self.free else (self._layer, (x, i))
            x = checkpoint(fn, *args, use_reentrant=False) if self.ckpt else fn(*args)
        return x


def _free_layer(x, lin, norm):
    return x + lin(norm(x))


def test_checkpointed_method_recomputes_through_the_installed_code():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv = perturb(ac.convert(_CheckpointedFunction(), (x,), preserve="exact"))
    assert conv.attnres_report.installed == ["chain 0: installed in code"] and not conv.attnres_report.warnings
    plain = copy.deepcopy(conv)
    plain.ckpt = False
    grads = []
    for m in (conv, plain):
        m.zero_grad()
        m(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_checkpointed_free_function_in_a_watched_chain_is_reported_with_a_warning():
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"inside an activation checkpoint of a plain function .*_free_layer"):
        conv = ac.convert(_CheckpointedFunction(free=True), (x,), preserve="exact")
    assert any("checkpoint of a plain function" in w for w in conv.attnres_report.warnings)
    assert "watched by a torch function mode" in conv.attnres_report.installed[0]


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_two_phase_inference_equals_the_single_pass(block_size):
    """Eager no-grad calls can serve sites by the two-phase schedule (SPEC section 3; on by
    default on CUDA): one phase-1 read per group of sites sharing their completed blocks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = build("llama")
    conv = perturb(ac.convert(model, (IDS,), preserve="exact", block_size=block_size))
    ids, mask = padded_batch()
    with torch.no_grad():
        plain = conv(ids, attention_mask=mask).logits
        conv.attnres.runtime.two_phase = True
        with Count() as seen:
            fast = conv(ids, attention_mask=mask).logits
    sites = sum(1 for s in conv.attnres_report.chains[0].sites if s.parameters)
    phase1 = sum("phase1" in o for o in seen.ops)
    phase2 = sum("phase2" in o for o in seen.ops)
    single = sum("attnres.depth_attention.default" in o for o in seen.ops)
    assert phase2 + single == sites
    if block_size == 1:  # Full AttnRes: no two sites share their completed blocks
        assert phase2 == 0
    else:
        assert phase2 > 0 and phase1 < phase2
    assert rel_err(fast, plain) <= 1e-5


def test_a_saved_plan_finds_the_models_code_by_module_and_rederives_when_it_moved():
    """A plan made in another environment names its files relative to their Python module and
    is found again through it; a plan whose lines no longer hold the adds (the library moved
    them) is re-derived from the model's code, with one warning, and serves the saved weights
    unchanged; a plan of another structure is refused naming the first difference. (The
    edited plans are sealed again with their digest, as a library upgrade's would be: an edit
    alone is refused, tests/test_plan_format.py.)"""
    from attnres_compile.conversion.build import ConversionPlan
    from attnres_compile.plan.format import plan_digest

    def sealed(doc):
        return {**doc, "digest": plan_digest(doc)}

    model = build("llama")
    conv = perturb(ac.convert(model, (IDS,), preserve="exact", num_blocks=2))
    saved = conv.attnres.plan.to_dict()
    files = {lk["add"]["file"] for c in saved["chains"] for lk in c["links"]}
    assert files == {"modeling_llama.py"}, files  # relative: no path of this machine in a checkpoint
    with torch.no_grad():
        want = conv(IDS).logits
    fresh = ac.apply_plan(build("llama"), ConversionPlan.from_dict(saved))
    ac.load_attnres_state_dict(fresh, ac.attnres_state_dict(conv))
    with torch.no_grad():
        assert rel_err(fresh(IDS).logits, want) <= 1e-6

    moved = copy.deepcopy(saved)
    for c in moved["chains"]:
        for lk in c["links"]:
            lk["add"]["line"] += 3  # as if the library had inserted three lines above every layer
    moved = sealed(moved)
    with pytest.warns(UserWarning, match=r"names code that moved \(chain 0, sublayer 0: the plan expects "
                                         r"`hidden_states = residual \+ hidden_states` at modeling_llama.py:\d+"):
        fresh = ac.apply_plan(build("llama"), ConversionPlan.from_dict(moved))
    assert fresh.config.attnres["chains"][0]["links"][0]["add"]["line"] == saved["chains"][0]["links"][0]["add"]["line"]
    ac.load_attnres_state_dict(fresh, ac.attnres_state_dict(conv))
    with torch.no_grad():
        assert rel_err(fresh(IDS).logits, want) <= 1e-6

    other = copy.deepcopy(moved)
    other["chains"][0]["links"][3]["sublayer"] = "model.layers.1.feed_forward"
    other["chains"][0]["sites"][3]["module"] = "model.layers.1.feed_forward"
    other = sealed(other)
    with pytest.raises(ac.LayoutChangedError, match=r"chain 0, sublayer 3: 'model.layers.1.feed_forward' when saved, "
                                                    r"'model.layers.1.mlp' now"):
        ac.apply_plan(build("llama"), ConversionPlan.from_dict(other))
    deeper = copy.deepcopy(moved)
    deeper["chains"][0]["block_size"] = 4
    deeper["chains"][0]["sites"] = [dict(s, schedule=dataclasses.asdict(want), scale=float(want.num_sources),
                                         param_prefix=None if want.num_sources == 1 else f"attnres.chain0.{s['name']}")
                                    for s, want in zip(deeper["chains"][0]["sites"], block_schedule(4, 4))]
    deeper = sealed(deeper)
    with pytest.raises(ac.LayoutChangedError, match="chain 0: block size 4 when saved, 2 now"):
        ac.apply_plan(build("llama"), ConversionPlan.from_dict(deeper))
