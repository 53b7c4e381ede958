"""The runtime in production (issue 19): calls from many threads, nested and interleaved runs,
no interception of the ops it does not convert, and the mode fallback for code it cannot
recompile. Every threaded result is compared with the serial result of the same call.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import attnres_compile as ac

from .models import TinyBlock, TinyPreNormLM, perturb

THREADS = 8


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyPreNormLM(layers=4).eval()
    idx = torch.randint(0, 37, (2, 9))
    return perturb(ac.convert(model, (idx,), num_blocks=2))


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                         max_position_embeddings=64)).eval()
    conv = ac.convert(model, (torch.randint(0, 97, (1, 8)),), num_blocks=2, preserve="exact")
    return perturb(conv, 1.0)


def _inputs(n, vocab, seed, lengths=(3, 5, 7, 9, 11, 13)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1 + i % 2, lengths[i % len(lengths)]), generator=g) for i in range(n)]


def _in_threads(fn, items, barrier=True):
    """fn(item) for every item, THREADS threads at a time, all released together."""
    gate = threading.Barrier(min(THREADS, len(items))) if barrier else None

    def run(x):
        if gate is not None:
            try:
                gate.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
        return fn(x)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, items))


# -- 1. concurrency ------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", ["no_grad", "inference_mode", "grad"])
def test_threads_calling_one_model_get_the_serial_results(tiny, grad):
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[grad]
    xs = _inputs(THREADS, 37, 1)

    def call(x):
        with ctx():
            return tiny(x).detach().clone()

    serial = [call(x) for x in xs]
    threaded = _in_threads(call, xs)
    for s, t in zip(serial, threaded):
        torch.testing.assert_close(t, s, rtol=0, atol=0)


def test_stress_many_short_calls_from_threads(tiny):
    xs = _inputs(200, 37, 2, lengths=(1, 2, 3))
    with torch.no_grad():
        serial = [tiny(x) for x in xs]
        threaded = _in_threads(lambda x: tiny(x), xs, barrier=False)
    bad = [i for i, (s, t) in enumerate(zip(serial, threaded)) if not torch.equal(s, t)]
    assert not bad, f"{len(bad)} of {len(xs)} threaded calls differ from their serial result (first: {bad[0]})"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_threads_training_get_the_serial_gradients(llama, checkpointing):
    model = llama
    params = [p for p in model.parameters() if p.requires_grad]
    xs = _inputs(THREADS, 97, 3)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        def grads(x):
            out = model(x, labels=x)
            return [out.loss.detach()] + list(torch.autograd.grad(out.loss, params))

        serial = [grads(x) for x in xs]
        threaded = _in_threads(grads, xs)
    finally:
        model.eval()
        if checkpointing:
            model.gradient_checkpointing_disable()
    names = ["loss"] + [n for n, p in model.named_parameters() if p.requires_grad]
    for s, t in zip(serial, threaded):
        for name, a, b in zip(names, s, t):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert any(n.startswith("attnres.") for n in names)


def test_threads_generating_get_the_serial_tokens(llama):
    prompts = _inputs(THREADS, 97, 4)

    def gen(x):
        return llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)

    serial = [gen(x) for x in prompts]
    threaded = _in_threads(gen, prompts)
    for s, t in zip(serial, threaded):
        assert torch.equal(s, t)


# -- 2. nested and interleaved runs on one thread ------------------------------------------------

def test_a_model_called_inside_a_hook_of_itself(tiny):
    x, other = _inputs(2, 37, 5)
    with torch.no_grad():
        want_x, want_other = tiny(x), tiny(other)
        seen = []

        def hook(mod, args, out):
            if not seen:
                seen.append(None)  # the inner call runs this hook too
                seen[0] = tiny(other)  # a whole run of the same chain, inside a run
        h = tiny.blocks[1].register_forward_hook(hook)
        try:
            got = tiny(x)
        finally:
            h.remove()
    torch.testing.assert_close(got, want_x, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], want_other, rtol=0, atol=0)


def test_two_decoders_stepping_one_model_alternately(llama):
    def decode(ids, steps):
        past = None
        cur = ids
        for _ in range(steps):
            out = llama(cur, past_key_values=past, use_cache=True)
            past = out.past_key_values
            cur = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, cur], 1)
            yield ids

    a, b = _inputs(2, 97, 6)
    with torch.no_grad():
        want_a = list(decode(a, 4))[-1]
        want_b = list(decode(b, 4))[-1]
        ga, gb = decode(a, 4), decode(b, 4)
        for got_a, got_b in zip(ga, gb):
            pass
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)


# -- 3. no per-op tax ------------------------------------------------------------------------------

def test_no_torch_function_mode_is_active_inside_a_converted_sublayer(tiny, llama):
    stacks = []

    def hook(mod, args):
        stacks.append(torch._C._len_torch_function_stack())

    for model, mlp in ((tiny, tiny.blocks[2].fc), (llama, llama.model.layers[2].mlp)):
        assert all("installed in code" in line for line in model.attnres.runtime.installed())
        h = mlp.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                model(torch.randint(0, 37, (1, 5)))
        finally:
            h.remove()
    assert stacks == [0, 0]


# -- 4. the fallback: an add in code that cannot be recompiled ------------------------------------

def _residual(x, y):
    return x + y  # a module-level helper: not a method of the block


class HelperBlock(TinyBlock):
    def forward(self, x):
        x = _residual(x, self.attn(self.ln_1(x)))
        x = _residual(x, self.mlp(self.ln_2(x)))
        return x


def test_an_add_in_a_plain_helper_is_watched_by_the_mode_and_reported():
    torch.manual_seed(0)
    plain = TinyPreNormLM(layers=3).eval()
    helper = TinyPreNormLM(layers=3).eval()
    helper.blocks = nn.ModuleList([HelperBlock(24) for _ in range(3)])
    helper.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 37, (2, 9))
    a = perturb(ac.convert(plain, (idx,), num_blocks=2))
    b = perturb(ac.convert(helper, (idx,), num_blocks=2))
    assert a.attnres.runtime.installed() == ["chain 0: installed in code"]
    (line,) = b.attnres.runtime.installed()
    assert "watched by a torch function mode" in line and "not in a method of HelperBlock" in line
    other = torch.randint(0, 37, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(b(other), a(other), rtol=1e-6, atol=1e-6)
    xs = _inputs(THREADS, 37, 7)
    with torch.no_grad():
        serial = [b(x) for x in xs]
        threaded = _in_threads(lambda x: b(x), xs)
    for s, t in zip(serial, threaded):
        assert torch.equal(s, t)


def test_a_copy_or_an_unpickled_model_compiles_in_one_graph(tiny):
    """Copies rebuild their recompiled functions when restored, not during Dynamo's trace (which
    cannot trace a recompilation and would split the model into graphs)."""
    import copy
    import io

    buf = io.BytesIO()
    torch.save(tiny, buf)
    buf.seek(0)
    x, = _inputs(1, 37, 6)
    with torch.no_grad():
        want = tiny(x)
        for c in (copy.deepcopy(tiny), torch.load(buf, weights_only=False)):
            torch._dynamo.reset()
            ex = torch._dynamo.explain(c)(x)
            assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
            torch.testing.assert_close(c(x), want, rtol=0, atol=0)
