"""Small models for the tests, built from configs (no downloads)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The refusal cases are the models the command line is tested on (examples/cli_models.py).
from examples.cli_models import DataDependentNet, NoResidualNet  # noqa: F401


class TinyBlock(nn.Module):
    def __init__(self, d: int, heads: int = 2, norm: str = "layer"):
        super().__init__()
        Norm = nn.LayerNorm if norm == "layer" else nn.RMSNorm
        self.ln_1 = Norm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = Norm(d)
        self.fc = nn.Linear(d, 3 * d)
        self.out = nn.Linear(3 * d, d)
        self.heads = heads

    def attn(self, h):
        B, T, D = h.shape
        q, k, v = self.qkv(h).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def mlp(self, h):
        return self.out(F.gelu(self.fc(h)))

    def sublayers(self):
        """The block's two sublayers f(a) = branch(norm(a)), as the SPEC counts them."""
        return [lambda a: self.attn(self.ln_1(a)), lambda a: self.mlp(self.ln_2(a))]

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TinyPreNormLM(nn.Module):
    """A nanoGPT-shaped PreNorm LM whose sublayers the tests can call one by one."""

    def __init__(self, vocab=37, d=24, layers=3, ctx=16, norm="layer", dropout=0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([TinyBlock(d, norm=norm) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():  # O(1) activations so eps is negligible in scale mode
            if p.dim() > 1:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))
        nn.init.normal_(self.wte.weight, std=1.0)

    def embed(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def sublayers(self):
        return [f for b in self.blocks for f in b.sublayers()]

    def readout(self, h):
        return self.head(self.ln_f(h))

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.readout(x)


class PostNormBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(x + self.lin(x))


class PostNormNet(nn.Module):
    def __init__(self, d=16, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList([PostNormBlock(d) for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def hf_configs():
    """name -> (model factory, example args, kwargs, layers). Small eps: see test_convert."""
    from transformers import (
        GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel,
    )

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                          layer_norm_epsilon=1e-12, bos_token_id=0, eos_token_id=0))

    def llama():
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=32, rms_norm_eps=1e-12))

    def vit():
        return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, image_size=16, patch_size=4, layer_norm_eps=1e-12))

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {
        "hf_gpt2": (gpt2, (ids,), {"use_cache": False}, 3),
        "hf_llama": (llama, (ids,), {"use_cache": False}, 3),
        "hf_vit": (vit, (img,), {}, 3),
    }


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64 (both must be finite)."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def perturb(conv, scale=0.5, seed=0):
    """Move a converted model's AttnRes parameters off their zero init (non-trivial mixtures)."""
    import attnres_compile as ac

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ac.attnres_parameters(conv).values():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return conv


def main_output(out):
    """The tensor to compare from a model's output (logits, last hidden state, or the tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(type(out))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): x + conv(relu(norm(conv(relu(norm(x))))))."""

    def __init__(self, c: int, norm: str = "batch"):
        super().__init__()
        Norm = (lambda: nn.BatchNorm2d(c)) if norm == "batch" else (lambda: nn.GroupNorm(4, c, eps=1e-12))
        self.n1, self.n2 = Norm(), Norm()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.c2(F.relu(self.n2(self.c1(F.relu(self.n1(x))))))


class PreActResNet(nn.Module):
    """A pre-activation ResNet stage: stem conv, `blocks` residual blocks at one resolution, head.

    The residual stream is NCHW: channels are dim 1, not the last dim.
    """

    def __init__(self, c: int = 16, blocks: int = 3, classes: int = 10, norm: str = "batch"):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([PreActBlock(c, norm) for _ in range(blocks)])
        self.norm = nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(4, c, eps=1e-12)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


# -- the architecture zoo (tests/test_architectures.py, benchmarks/coverage.py) ---------------

def architectures():
    """name -> dict(factory, args, kwargs, layers, note): tiny random configs, no downloads.

    Norm eps is 1e-12 wherever the config has one, so scale mode can be checked on
    Hugging Face's small random init (see tests/test_convert.py). `kwargs` holds what the
    converted model needs too (tensors are passed again at call time, the rest is fixed).
    """
    import transformers as T

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    small_img = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    decoder = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=32)
    lm = {"use_cache": False}

    def gpt2():
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                              layer_norm_epsilon=1e-12, bos_token_id=0, eos_token_id=0))

    def llama():
        return T.LlamaForCausalLM(T.LlamaConfig(**decoder, num_key_value_heads=2, rms_norm_eps=1e-12))

    def mistral():
        return T.MistralForCausalLM(T.MistralConfig(**decoder, num_key_value_heads=2, rms_norm_eps=1e-12))

    def qwen2():
        return T.Qwen2ForCausalLM(T.Qwen2Config(**decoder, num_key_value_heads=2, rms_norm_eps=1e-12))

    def neox():
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**decoder, use_parallel_residual=True, layer_norm_eps=1e-12))

    def vit():
        return T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=64, image_size=16, patch_size=4, layer_norm_eps=1e-12))

    def t5():
        return T.T5Model(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    layer_norm_epsilon=1e-12, decoder_start_token_id=0))

    def bert():
        return T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64))

    def resnet_bn():
        m = PreActResNet(c=8, blocks=3, norm="batch")
        with torch.no_grad():  # non-trivial running statistics for eval mode
            m.train()(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
        return m

    return {
        "gpt2": dict(factory=gpt2, args=(ids,), kwargs=lm, layers=3, note="GPT2LMHeadModel"),
        "llama": dict(factory=llama, args=(ids,), kwargs=lm, layers=2, note="LlamaForCausalLM"),
        "mistral": dict(factory=mistral, args=(ids,), kwargs=lm, layers=2, note="MistralForCausalLM"),
        "qwen2": dict(factory=qwen2, args=(ids,), kwargs=lm, layers=2, note="Qwen2ForCausalLM"),
        "gpt_neox_parallel": dict(factory=neox, args=(ids,), kwargs=lm, layers=2,
                                  note="GPTNeoXForCausalLM, use_parallel_residual=True"),
        "vit": dict(factory=vit, args=(img,), kwargs={}, layers=3, note="ViTModel"),
        "t5": dict(factory=t5, args=(ids,), kwargs={"decoder_input_ids": dec, "use_cache": False}, layers=2,
                   note="T5Model: encoder chain + decoder chain"),
        "bert": dict(factory=bert, args=(ids,), kwargs={}, layers=2, note="BertModel (PostNorm)"),
        "preact_resnet_bn": dict(factory=resnet_bn, args=(small_img,), kwargs={}, layers=3,
                                 note="pre-activation ResNet, BatchNorm, NCHW"),
        "preact_resnet_gn": dict(factory=lambda: PreActResNet(c=8, blocks=3, norm="group"), args=(small_img,),
                                 kwargs={}, layers=3, note="pre-activation ResNet, GroupNorm, NCHW"),
        "llama_hidden_states": dict(factory=llama, args=(ids,),
                                    kwargs={"use_cache": False, "output_hidden_states": True}, layers=2,
                                    note="LlamaForCausalLM, output_hidden_states=True"),
    }


# What a left-alone add's reason says, as a short kind (tests and benchmarks/coverage.py count these).
REASON_KINDS = [  # (kind, text in the reason), first match wins
    ("postnorm", "PostNorm"), ("rotary", "rotary"), ("eps", "eps added"), ("integer", "on integers"),
    ("non-floating", "non-floating"), ("broadcast", "broadcasting"), ("elementwise", "no matmul"),
    ("buffer", "buffer"), ("independent", "independent"), ("scalar", "scalar operand"),
    ("single", "single residual add"), ("not-prenorm", "not PreNorm"),
]


def reason_kind(reason: str) -> str:
    import re

    reason = re.sub(r"^inside sublayer .*? of the chain from \S+: ", "", reason)
    return next((k for k, key in REASON_KINDS if key in reason), "other")
